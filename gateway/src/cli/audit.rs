//! `omnirelay audit verify|export|query|pubkey|keygen`.

use std::io::{BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use std::collections::BTreeMap;

use crate::audit::{Anchor, AuditKey, AuditPublicKey, ChainHead, Problem, SignedSummary};
use crate::config::Config;
use crate::store::{Backend, Checkpoints, SqliteStore};

/// Which log: a file, or the database a gateway config names.
#[derive(Debug, Args)]
pub(super) struct LogArgs {
    /// The audit log file.
    #[arg(long, conflicts_with = "config")]
    file: Option<PathBuf>,
    /// Read the audit in this gateway config's database (every chain, on PostgreSQL).
    #[arg(long, default_value = "gateway.toml")]
    config: PathBuf,
}

fn open(path: &Path) -> anyhow::Result<BufReader<std::fs::File>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(BufReader::new(file))
}

/// What `audit verify` checks against.
#[derive(Debug, Args)]
pub(super) struct VerifyArgs {
    /// An exported audit log, checked without a database (needs `--public-key`).
    #[arg(long, conflicts_with = "config", requires = "public_key")]
    file: Option<PathBuf>,
    /// The gateway config: its audit log, checked against its database and audit key.
    #[arg(long, default_value = "gateway.toml")]
    config: PathBuf,
    /// A trusted audit public key (PEM; repeat for rotated keys). With `--config`, the default
    /// is the public half of the configured audit key.
    #[arg(long)]
    public_key: Vec<PathBuf>,
    /// An entry the log must hold, as `SEQ:HASH` (or `CHAIN/SEQ:HASH` for one of a shared
    /// database's chains) — normally the signed head an earlier `verify` printed and you kept
    /// elsewhere. Catches a log cut short before it.
    #[arg(long, value_parser = parse_anchor)]
    anchor: Option<Anchor>,
}

fn parse_anchor(text: &str) -> Result<Anchor, String> {
    let (chain, text) = match text.split_once('/') {
        Some((chain, rest)) => (
            chain.parse().map_err(|e| format!("chain {chain:?}: {e}"))?,
            rest,
        ),
        None => (0, text),
    };
    let (seq, hash) = text
        .split_once(':')
        .ok_or("expected SEQ:HASH or CHAIN/SEQ:HASH, as `audit verify` prints a signed head")?;
    let seq = seq.parse().map_err(|e| format!("seq {seq:?}: {e}"))?;
    let hash = hex::decode(hash)
        .ok()
        .and_then(|h| <[u8; 32]>::try_from(h).ok())
        .ok_or("the hash must be 64 hex digits")?;
    Ok(Anchor {
        chain,
        head: ChainHead { seq, hash },
    })
}

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Check the log: the hash chain, every checkpoint's signature under the audit public key,
    /// and (with `--config`) that the log ends where the database does. Exit 1 names the line.
    Verify(VerifyArgs),
    /// Write the database's whole audit chain (every replica's entries, on PostgreSQL) to a
    /// new file, which `verify --file` checks without the database.
    Export {
        /// The gateway config naming the database.
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
        /// The file to create (refused if it exists).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the entries that mention a token GUID, SPIFFE ID, serial or request id.
    Query {
        /// What to look for.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Print the public half of the configured audit key (PEM), for auditors.
    Pubkey {
        /// The gateway config.
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Create the configured audit key (for a state made before audit checkpoints existed).
    Keygen {
        /// The gateway config.
        #[arg(long, default_value = "gateway.toml")]
        config: PathBuf,
    },
}

pub(super) fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(args) => verify(&args),
        AuditCommand::Query { id, log } => {
            let lines = match &log.file {
                Some(file) => crate::audit::query(open(file)?, &id)?,
                // The database's audit, the durable copy: the audit file is its mirror, which
                // may trail the latest commit by a moment.
                None => {
                    let config = Config::load(&log.config)?;
                    let mut exported = Vec::new();
                    export(&config, &mut exported)?;
                    crate::audit::query(&exported[..], &id)?
                }
            };
            for line in &lines {
                println!("{line}");
            }
            Ok(if lines.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        AuditCommand::Export { config, out } => {
            let config = Config::load(&config)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let (entries, heads) = export(&config, &mut file)?;
            file.sync_all()
                .with_context(|| format!("syncing {}", out.display()))?;
            println!("{}: {entries} entries", out.display());
            for (chain, head) in &heads {
                println!(
                    "chain {chain}: head {} {}",
                    head.seq,
                    hex::encode(head.hash)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Pubkey { config } => {
            let config = Config::load(&config)?;
            print!("{}", configured_key(&config)?.to_public_pem());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Keygen { config } => {
            let path = Config::load(&config)?.audit.signing_key;
            if path.exists() {
                bail!("{} exists; it is not replaced", path.display());
            }
            print!("{}", super::init::write_audit_key(&path)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The database's whole audit (every chain, each oldest first) written to `out`: how many
/// entries, and each chain's head.
fn export(
    config: &Config,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<(u64, BTreeMap<u64, ChainHead>)> {
    match &config.store.backend {
        Backend::Sqlite => SqliteStore::export_audit(&config.store.sqlite, out)
            .map(|head| (head.seq, BTreeMap::from([(0, head)])))
            .with_context(|| format!("reading {}", config.store.sqlite.display())),
        Backend::Postgres(pg) => block_on(crate::store::postgres::export_audit(
            pg,
            checkpoints(config)?,
            out,
        ))
        .with_context(|| format!("reading the PostgreSQL database at {}", pg.url)),
    }
}

/// What opening the PostgreSQL store needs of the `[audit]` section (its key signs nothing
/// here: the CLI only reads).
fn checkpoints(config: &Config) -> anyhow::Result<Checkpoints> {
    let path = &config.audit.signing_key;
    let key = AuditKey::from_pkcs8_pem(&crate::secrets::read(path)?)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(Checkpoints::new(Arc::new(key), &config.audit))
}

/// Runs `future` to completion from this synchronous command, on the CLI's (multi-thread)
/// runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// The public half of the audit key a config names.
fn configured_key(config: &Config) -> anyhow::Result<AuditPublicKey> {
    let path = &config.audit.signing_key;
    let key = AuditKey::from_pkcs8_pem(&crate::secrets::read(path)?)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(key.public().clone())
}

fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut keys = Vec::new();
    for path in &args.public_key {
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        keys.push(
            AuditPublicKey::from_public_pem(&pem)
                .with_context(|| format!("loading {}", path.display()))?,
        );
    }
    let anchors: Vec<Anchor> = args.anchor.iter().copied().collect();
    let Some(file) = &args.file else {
        let config = Config::load(&args.config)?;
        if keys.is_empty() {
            keys.push(configured_key(&config)?);
        }
        return match &config.store.backend {
            Backend::Sqlite => against_database(&config, &keys, anchors),
            Backend::Postgres(_) => against_postgres(&config, &keys, anchors),
        };
    };
    match crate::audit::verify_chains(open(file)?, &keys, &anchors) {
        Ok(summary) => {
            report(file, &summary, false);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(broken(file, &e.to_string())),
    }
}

/// How long a file that ends before the database's head is given to catch up: a running
/// gateway mirrors each commit to the file right after it.
const MIRROR_LAG: Duration = Duration::from_secs(2);

/// Verifies the configured log and checks it against the database, the durable copy: the file
/// must hold the database's head (read first), and its own head must be an entry of the
/// database with the same hash (read after). So a cut file, a file extended past the database
/// and a file that differs from it all fail, even while the gateway runs and appends.
fn against_database(
    config: &Config,
    keys: &[AuditPublicKey],
    anchors: Vec<Anchor>,
) -> anyhow::Result<ExitCode> {
    let db = &config.store.sqlite;
    let reading = |e| anyhow::Error::new(e).context(format!("reading {}", db.display()));
    let db_head = SqliteStore::audit_head(db).map_err(reading)?;
    let db_heads = vec![Anchor {
        chain: 0,
        head: db_head,
    }];
    file_against(
        &config.store.audit_file,
        keys,
        anchors,
        &db_heads,
        |_, seq| SqliteStore::audit_hash_at(db, seq).map_err(reading),
    )
}

/// On PostgreSQL the database's audit is verified itself first (every replica's chain: the
/// hash chain, every checkpoint's signature and every other chain's head it binds, no gap),
/// then this replica's file (the chains it wrote) against it.
fn against_postgres(
    config: &Config,
    keys: &[AuditPublicKey],
    anchors: Vec<Anchor>,
) -> anyhow::Result<ExitCode> {
    let Backend::Postgres(pg) = &config.store.backend else {
        bail!("not a PostgreSQL store");
    };
    let mut exported = Vec::new();
    let (_, db_heads) = export(config, &mut exported)?;
    let label = PathBuf::from(format!("the database's audit ({})", pg.url));
    match crate::audit::verify_chains(&exported[..], keys, &anchors) {
        Ok(summary) if !summary.absent_bound.is_empty() => {
            let missing: Vec<String> = summary.absent_bound.iter().map(u64::to_string).collect();
            return Ok(broken(
                &label,
                &format!(
                    "chain {}: a checkpoint binds its head, but the database holds none of it                      (removed)",
                    missing.join(", ")
                ),
            ));
        }
        Ok(summary) => report(&label, &summary, false),
        Err(e) => return Ok(broken(&label, &e.to_string())),
    }
    drop(exported);
    // The database's heads of the chains the file holds (the file does not hold the others').
    let path = &config.store.audit_file;
    let in_file = match crate::audit::verify_chains(open(path)?, keys, &[]) {
        Ok(summary) => summary.chains,
        Err(e) => return Ok(broken(path, &e.to_string())),
    };
    let db_heads: Vec<Anchor> = db_heads
        .into_iter()
        .filter(|(chain, _)| in_file.contains_key(chain))
        .map(|(chain, head)| Anchor { chain, head })
        .collect();
    let checkpoints = checkpoints(config)?;
    file_against(path, keys, anchors, &db_heads, |chain, seq| {
        block_on(crate::store::postgres::audit_hash_at(
            pg,
            checkpoints.clone(),
            chain,
            seq,
        ))
        .with_context(|| format!("reading the PostgreSQL database at {}", pg.url))
    })
}

/// Verifies the log at `path` against the database whose heads of the file's chains were
/// `db_heads` (read first) and whose entries' hashes `hash_at` reads (after).
fn file_against(
    path: &Path,
    keys: &[AuditPublicKey],
    mut anchors: Vec<Anchor>,
    db_heads: &[Anchor],
    hash_at: impl Fn(u64, u64) -> anyhow::Result<Option<[u8; 32]>>,
) -> anyhow::Result<ExitCode> {
    anchors.extend_from_slice(db_heads);
    let deadline = Instant::now() + MIRROR_LAG;
    let summary = loop {
        match crate::audit::verify_chains(open(path)?, keys, &anchors) {
            Ok(summary) => break summary,
            Err(e) => {
                let behind = matches!(e.problem,
                    Problem::Truncated { expected_seq, .. }
                        if db_heads.iter().any(|h| h.head.seq == expected_seq));
                if behind && Instant::now() < deadline {
                    // Not a test: a CLI giving a running gateway's mirror a moment.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                let whose = if behind {
                    " (that entry is the database's head)"
                } else {
                    ""
                };
                return Ok(broken(path, &format!("{e}{whose}")));
            }
        }
    };
    for (&chain, head) in &summary.chains {
        if head.seq == 0 {
            continue;
        }
        let db_head = db_heads
            .iter()
            .find(|h| h.chain == chain)
            .map_or(0, |h| h.head.seq);
        let problem = match hash_at(chain, head.seq)? {
            Some(hash) if hash == head.hash => None,
            Some(_) => Some((head.seq, "the file and the database differ here")),
            None => Some((
                db_head + 1,
                "the file goes on past the database's head (entries the database never committed)",
            )),
        };
        if let Some((line, problem)) = problem {
            // On a single writer's log the seq is the line number.
            let at = if chain == 0 {
                format!("line {line}")
            } else {
                format!("seq {line} of chain {chain}")
            };
            return Ok(broken(path, &format!("{at}: {problem}")));
        }
    }
    report(path, &summary, true);
    Ok(ExitCode::SUCCESS)
}

fn broken(path: &Path, problem: &str) -> ExitCode {
    println!("{}: BROKEN at {problem}", path.display());
    ExitCode::from(1)
}

fn report(path: &Path, summary: &SignedSummary, with_database: bool) {
    let head = &summary.head;
    let with_database = if with_database {
        " (the database's head)"
    } else {
        ""
    };
    if summary.chains.len() > 1 || summary.chains.keys().any(|&c| c != 0) {
        let chains = match summary.chains.len() {
            1 => "1 chain".to_string(),
            n => format!("{n} chains"),
        };
        println!(
            "{}: ok, {} entries in {chains}{with_database}",
            path.display(),
            summary.entries,
        );
        for (chain, head) in &summary.chains {
            println!(
                "chain {chain}: head {} {}",
                head.seq,
                hex::encode(head.hash)
            );
        }
        if !summary.absent_bound.is_empty() {
            let chains: Vec<String> = summary.absent_bound.iter().map(u64::to_string).collect();
            println!(
                "bound by checkpoints but not in this log (other replicas' chains, which \
                 `audit verify --config` checks in the database): chain {}",
                chains.join(", ")
            );
        }
    } else {
        println!(
            "{}: ok, {} entries, head {} {}{with_database}",
            path.display(),
            summary.entries,
            head.seq,
            hex::encode(head.hash),
        );
    }
    match &summary.last_checkpoint {
        Some(signed) => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(signed.signed_at);
            let chain = if signed.chain == 0 {
                String::new()
            } else {
                format!("{}/", signed.chain)
            };
            println!(
                "signed head {chain}{}:{} (signed {} by {})",
                signed.entry.seq,
                hex::encode(signed.entry.hash),
                humantime::format_rfc3339_millis(at),
                signed.key_id
            );
        }
        None => println!("no signed checkpoint"),
    }
    println!(
        "{} unsigned entries after the last checkpoint",
        summary.unsigned
    );
}
