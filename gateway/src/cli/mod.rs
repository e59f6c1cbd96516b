//! The `omnirelay` command line: argument parsing, logging setup and the subcommands. The only
//! place besides startup where `anyhow` is used and where output is printed.

#![allow(clippy::print_stdout, reason = "a CLI prints its results")]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
pub(crate) use omnirelay_agent::cli::init_tracing;
use omnirelay_agent::cli::{LogFormat, MeshCommand};

mod audit;
mod ca;
mod demo;
mod identities;
pub mod init;
mod layout;
mod policy;
mod publish;
mod remote;
mod replay;
mod revoke;
mod scaffold;
mod serve;
mod token;

/// OmniRelay bootstrap gateway: SPIFFE identities for mesh nodes, decided by WebAssembly policy.
#[derive(Debug, Parser)]
#[command(name = "omnirelay", version, about)]
pub struct Cli {
    /// Log format on stderr (`serve` takes it from the config file instead).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a development state: CA, token key, TLS certificate, admin credential, config.
    Init {
        /// Directory to create it in.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain, e.g. `omnirelay.example`.
        #[arg(long)]
        trust_domain: String,
        /// Node listener address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Admin listener address.
        #[arg(long, default_value = "127.0.0.1:8444")]
        admin_listen: String,
        /// Replace an existing state in `dir`.
        #[arg(long)]
        force: bool,
    },
    /// Run the gateway.
    Serve {
        /// The configuration file.
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Report every problem in a configuration and the files it names.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Start a gateway on embedded defaults, join a simulated node, print what it got, stop.
    Demo {
        /// Where to keep the state (a new temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Issue, list and revoke bootstrap tokens (through the admin API).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Rotate the CA in stages: prepare, activate, retire (through the admin API).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// List issued identities (the inventory), or issue one by hand during a renewal outage
    /// (through the admin API).
    #[command(subcommand)]
    Identities(identities::IdentitiesCommand),
    /// Revoke a token's, a SPIFFE ID's or a certificate's identities, with their renewals
    /// (through the admin API); their SPIFFE IDs are quarantined.
    Revoke(revoke::RevokeArgs),
    /// List or lift the quarantines of revoked SPIFFE IDs (through the admin API).
    #[command(subcommand)]
    Quarantine(revoke::QuarantineCommand),
    /// Node-side commands (the same as `omnirelay-agent`'s).
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Verify and query the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Author and test policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Live decisions the gateway kept for replay.
    #[command(subcommand)]
    Decisions(replay::DecisionsCommand),
}

/// Parses arguments, sets up logging and runs the command. Exit codes: 0 success, 1 the
/// command's check failed (a vector mismatched, the audit log is broken, the config has
/// problems), 2 usage, setup or runtime error, 3 `mesh bootstrap renew`: re-join needed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let json = cli.log_format == LogFormat::Json;
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve::serve(&config).await,
            command => {
                // The demo prints its own story; the gateway's info lines would drown it.
                let quiet = matches!(command, Command::Demo { .. });
                init_tracing(json, quiet.then_some("warn"));
                run(command).await
            }
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

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init {
            dir,
            trust_domain,
            listen,
            admin_listen,
            force,
        } => {
            let options = init::InitOptions {
                dir,
                trust_domain: crate::identity::TrustDomain::parse(&trust_domain)?,
                listen: listen.parse()?,
                admin_listen: admin_listen.parse()?,
                force,
            };
            let config = init::init(&options)?;
            println!("created a development state in {}", options.dir.display());
            println!("  config:      {}", config.display());
            println!(
                "  trust bundle (give it to nodes): {}",
                options.dir.join("ca/ca.pem").display()
            );
            println!(
                "start it with: omnirelay serve --config {}",
                config.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config } => serve::serve(&config).await,
        Command::CheckConfig { config } => serve::check_config(&config),
        Command::Demo { dir } => demo::demo(dir).await,
        Command::Token(cmd) => token::run(cmd).await,
        Command::Ca(cmd) => ca::run(cmd).await,
        Command::Identities(cmd) => identities::run(cmd).await,
        Command::Revoke(args) => revoke::revoke(args).await,
        Command::Quarantine(cmd) => revoke::quarantine(cmd).await,
        Command::Mesh(cmd) => omnirelay_agent::cli::run(cmd).await,
        Command::Audit(cmd) => audit::run(cmd),
        Command::Policy(cmd) => policy::run(cmd).await,
        Command::Decisions(cmd) => replay::run(cmd).await,
    }
}
