//! The node's command line, one definition for both binaries: `omnirelay-agent mesh bootstrap
//! join|renew` and `omnirelay mesh bootstrap join|renew` (the gateway delegates here). The only
//! place in this crate where `anyhow` is used and where output is printed.
//!
//! Exit codes: 0 success (or the daemon stopped by SIGTERM/SIGINT), 2 usage, setup or runtime
//! error (worth restarting), [`EXIT_REJOIN`] the identity is gone (expired, revoked, refused
//! for good) and only a new join helps.

#![allow(clippy::print_stdout, reason = "a CLI prints its results")]

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod join;
mod renew;

pub use join::JoinArgs;
pub use renew::RenewArgs;

/// Exit code when only a new join helps: the certificate expired, or the gateway refused its
/// renewal for good. The systemd unit does not restart on it (`RestartPreventExitStatus=3`).
pub const EXIT_REJOIN: u8 = 3;

/// OmniRelay node agent: join the mesh, keep the SVID renewed, follow revocations.
#[derive(Debug, Parser)]
#[command(name = "omnirelay-agent", version, about)]
pub struct AgentCli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Node-side commands.
    #[command(subcommand)]
    Mesh(MeshCommand),
}

/// Log output on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Text, coloured on a terminal.
    Human,
    /// One JSON object per line.
    Json,
}

/// `mesh …`: the node-side commands.
#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Bootstrap this node's identity.
    #[command(subcommand)]
    Bootstrap(BootstrapCommand),
}

/// `mesh bootstrap …`.
#[derive(Debug, Subcommand)]
pub enum BootstrapCommand {
    /// Join: generate a key here (it never leaves this machine), attest, and write
    /// `key.pem` (0600), `cert.pem` and `bundle.pem` into --out.
    Join(JoinArgs),
    /// Renew the SVID in --dir over mTLS (once, or with --daemon for as long as it lives).
    Renew(RenewArgs),
}

/// Runs a node command.
pub async fn run(cmd: MeshCommand) -> anyhow::Result<ExitCode> {
    let MeshCommand::Bootstrap(cmd) = cmd;
    match cmd {
        BootstrapCommand::Join(args) => join::run(args).await,
        BootstrapCommand::Renew(args) => renew::run(args).await,
    }
}

/// The `omnirelay-agent` binary: parses arguments, sets up logging, runs the command.
pub fn main() -> ExitCode {
    let cli = AgentCli::parse();
    init_tracing(cli.log_format == LogFormat::Json, None);
    let AgentCommand::Mesh(cmd) = cli.command;
    // One thread is plenty for one node's identity.
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(cmd)));
    outcome.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

/// Logs go to stderr; `RUST_LOG` overrides the filter. Human logs are coloured only when
/// stderr is a terminal, so `2>file` (or a pipe to a log shipper) gets plain text.
pub fn init_tracing(json: bool, filter: Option<&str>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter.unwrap_or("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Unix seconds as RFC 3339, for people.
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// What a node command prints about the SVID it got.
fn print_svid(r: &crate::wire::JoinResponse, dir: &crate::svid_dir::SvidDir) {
    use crate::svid_dir::{BUNDLE, CERT, KEY};
    println!("  serial:      {}", r.serial);
    println!("  expires:     {}", rfc3339(r.not_after));
    println!("  renew after: {}", rfc3339(r.renew_after));
    println!("  policy:      {} {}", r.policy.name, r.policy.version);
    println!("  key:         {}", dir.link(KEY).display());
    println!("  certificate: {}", dir.link(CERT).display());
    println!("  bundle:      {}", dir.link(BUNDLE).display());
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<AgentCli, clap::Error> {
        AgentCli::try_parse_from(
            ["omnirelay-agent", "mesh", "bootstrap"]
                .iter()
                .chain(args)
                .copied(),
        )
    }

    #[test]
    fn the_command_line_is_well_formed() {
        AgentCli::command().debug_assert();
    }

    #[test]
    fn renew_takes_the_daemon_flags_only_with_daemon() {
        let cli = parse(&[
            "renew",
            "--dir",
            "/var/lib/omnirelay-agent",
            "--daemon",
            "--on-renew",
            "systemctl reload envoy",
            "--renew-remaining-percent",
            "30",
            "--bundle-refresh",
            "90s",
            "--follow-revocations",
            "/run/omnirelay/revoked.json",
        ])
        .unwrap();
        let AgentCommand::Mesh(MeshCommand::Bootstrap(BootstrapCommand::Renew(args))) = cli.command
        else {
            panic!("not renew");
        };
        assert!(args.daemon);
        assert_eq!(args.renew_remaining_percent, 30);
        assert_eq!(args.bundle_refresh, std::time::Duration::from_secs(90));
        assert_eq!(args.on_renew.as_deref(), Some("systemctl reload envoy"));
        for refused in [
            &["renew", "--dir", "d", "--follow-revocations", "f"][..],
            &["renew", "--dir", "d", "--renew-remaining-percent", "30"],
            &["renew", "--dir", "d", "--daemon", "--attempts", "3"],
            &[
                "renew",
                "--dir",
                "d",
                "--daemon",
                "--renew-remaining-percent",
                "0",
            ],
            &[
                "renew",
                "--dir",
                "d",
                "--daemon",
                "--renew-remaining-percent",
                "100",
            ],
        ] {
            assert!(parse(refused).is_err(), "{refused:?}");
        }
        assert!(parse(&["renew", "--dir", "d", "--on-renew", "true"]).is_ok());
    }

    #[test]
    fn join_keeps_its_flags() {
        let cli = parse(&[
            "join",
            "--gateway",
            "https://gw.example:8443",
            "--token-file",
            "t",
            "--ca-bundle",
            "ca.pem",
            "--out",
            "id",
            "--claim",
            "secure-boot=true",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        assert!(parse(&["join", "--gateway", "g", "--ca-bundle", "c"]).is_err());
    }
}
