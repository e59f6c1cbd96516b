//! Guest build settings that every policy needs, so no author has to remember them.
//!
//! On `wasm32-wasip2`:
//!
//! - A `no_std` policy still needs `memcmp`, `memcpy` and friends, which that target expects
//!   from wasi-libc. Linking wasi-libc's static `libc.a` (shipped with the target) pulls in
//!   just those objects; none of them imports anything from WASI.
//! - The policy's component starts small and never grows its memory during a decision: a 64
//!   KiB shadow stack instead of rustc's 1 MiB, and 256 KiB of heap inside the initial memory
//!   for the SDK's bump allocator. Growing a pooled memory costs the host page-protection
//!   changes on every fresh instance (it halved the per-decision cost; `bench/README.md`).
//!   These are linker arguments of the policy's own `cdylib`, which only its package can set
//!   with `cargo:rustc-link-arg`; cargo passes `rustc-link-arg-cdylib` from a direct
//!   dependency's build script on to the dependent `cdylib` (rust-lang/cargo#9562), which is
//!   how they reach every policy crate that depends on this SDK. Cargo prints a warning about
//!   that for path dependencies; `omnirelay policy test` and `policy publish` check the
//!   result (the module's stack and initial memory), so a policy linked without them is
//!   refused rather than silently slower.

/// The shadow stack of a policy, bytes.
const STACK_BYTES: u32 = 64 * 1024;
/// Heap reserved in the initial memory, bytes.
const INITIAL_HEAP_BYTES: u32 = 256 * 1024;

fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch == "wasm32" {
        println!("cargo:rustc-link-arg-cdylib=-zstack-size={STACK_BYTES}");
        println!("cargo:rustc-link-arg-cdylib=--initial-heap={INITIAL_HEAP_BYTES}");
        if os == "wasi" {
            println!("cargo:rustc-link-lib=c");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../wit");
}
