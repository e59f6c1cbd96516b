//! The `omnirelay` command line: argument parsing, logging setup and the subcommands. The only
//! place besides startup where `anyhow` is used and where output is printed.

#![allow(clippy::print_stdout, reason = "a CLI prints its results")]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod policy;

/// OmniRelay bootstrap gateway: SPIFFE identities for mesh nodes, decided by WebAssembly policy.
#[derive(Debug, Parser)]
#[command(name = "omnirelay", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Author and test policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

/// Parses arguments, sets up logging and runs the command. Exit codes: 0 success, 1 the
/// command's check failed (e.g. a vector mismatched), 2 usage or setup error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Policy(cmd) => policy::run(cmd).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
