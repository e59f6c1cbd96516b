//! Builds the example and test policies (`policies/`) for `wasm32-wasip2` from source, so the
//! gateway can embed the examples and tests can load the fixtures. The nested cargo uses its
//! own target directory (`target/wasm`) so it never waits on the outer build's lock.

use std::path::PathBuf;
use std::process::Command;

const POLICIES: &[&str] = &[
    "cluster-role",
    "posture",
    "deny-all",
    "fixture-infinite-loop",
    "fixture-memory-bomb",
    "fixture-trap",
    "fixture-huge-result",
    "fixture-wrong-wit",
    "fixture-wasi-env",
    "fixture-grant",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().map(PathBuf::from).unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm");
    for watched in ["wit", "policy-sdk", "policies", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&root)
        .args([
            "build",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "policy",
        ])
        .arg("--target-dir")
        .arg(&target)
        // Flags and wrappers meant for the host build (clippy's driver, host rustflags) must
        // not leak into the wasm build; policy-sdk's build script carries the guest's link
        // settings.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR");
    for policy in POLICIES {
        build.args(["-p", policy]);
    }
    match build.status() {
        Ok(status) if status.success() => {}
        Ok(status) => {
            println!(
                "cargo::error=building the policies for wasm32-wasip2 failed ({status}); \
                 if the target is missing, run `rustup target add wasm32-wasip2`"
            );
            return;
        }
        Err(e) => {
            println!("cargo::error=cannot run cargo to build the policies: {e}");
            return;
        }
    }
    let out = target.join("wasm32-wasip2").join("policy");
    println!("cargo:rustc-env=OMNIRELAY_POLICY_DIR={}", out.display());
}
