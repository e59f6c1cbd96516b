//! Shared helpers for the end-to-end tests: locating and running the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the build put the compiled policies (examples and hostile fixtures).
pub fn policy_dir() -> &'static Path {
    Path::new(gateway::policy::examples::BUILT_POLICY_DIR)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `omnirelay` with `args` to completion and returns what it printed.
pub fn omnirelay(bin: &str, args: &[&str]) -> std::io::Result<Output> {
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
}
