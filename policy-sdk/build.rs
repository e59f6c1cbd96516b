//! On `wasm32-wasip2` a `no_std` policy still needs `memcmp`, `memcpy` and friends, which that
//! target expects from wasi-libc. Linking wasi-libc's static `libc.a` (shipped with the target)
//! pulls in just those objects; none of them imports anything from WASI.

fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch == "wasm32" && os == "wasi" {
        println!("cargo:rustc-link-lib=c");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../wit");
}
