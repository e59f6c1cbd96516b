//! The `omnirelay` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
