//! `omnirelay audit verify|query`.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::Config;

/// Which log: a file, or the one a gateway config names.
#[derive(Debug, Args)]
pub(super) struct LogArgs {
    /// The audit log file.
    #[arg(long, conflicts_with = "config")]
    file: Option<PathBuf>,
    /// Take the audit log path from this gateway config.
    #[arg(long, default_value = "gateway.toml")]
    config: PathBuf,
}

impl LogArgs {
    fn open(&self) -> anyhow::Result<(PathBuf, BufReader<std::fs::File>)> {
        let path = match &self.file {
            Some(file) => file.clone(),
            None => Config::load(&self.config)?.store.audit_file,
        };
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok((path, BufReader::new(file)))
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Check the hash chain: every line intact, in order, none missing. Exit 1 names the line.
    Verify {
        #[command(flatten)]
        log: LogArgs,
    },
    /// Print the entries that mention a token GUID, SPIFFE ID, serial or request id.
    Query {
        /// What to look for.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        log: LogArgs,
    },
}

pub(super) fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { log } => {
            let (path, reader) = log.open()?;
            match crate::audit::verify(reader) {
                Ok(summary) => {
                    println!(
                        "{}: ok, {} entries, head {} {}",
                        path.display(),
                        summary.entries,
                        summary.head.seq,
                        hex::encode(summary.head.hash)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("{}: BROKEN at {e}", path.display());
                    Ok(ExitCode::from(1))
                }
            }
        }
        AuditCommand::Query { id, log } => {
            let (_, reader) = log.open()?;
            let lines = crate::audit::query(reader, &id)?;
            for line in &lines {
                println!("{line}");
            }
            Ok(if lines.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
