//! The `omnirelay-agent` binary: the node commands alone (`mesh bootstrap join|renew`), without
//! the gateway. Everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    omnirelay_agent::cli::main()
}
