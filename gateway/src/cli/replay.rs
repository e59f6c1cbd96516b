//! `omnirelay decisions export` and `omnirelay policy replay`: live decisions the gateway
//! kept (the policy input, never the token, and the outcome) re-run through a candidate bundle
//! in the real wasmtime host, and the flips they show.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use http::StatusCode;
use policy_sdk as sdk;

use super::token::{AdminArgs, expect};
use crate::config::Config;
use crate::policy::{Metering, PolicyConfig, PolicyHost, PolicySet, Verdict};
use crate::reload::remote::Remote;
use crate::shadow::{Flip, Outcome};
use crate::store::DecisionRecord;

/// Examples printed per kind of flip.
const EXAMPLES: usize = 5;

#[derive(Debug, Subcommand)]
pub(super) enum DecisionsCommand {
    /// Write the decisions the gateway kept (JSON lines) to a file that `policy replay
    /// --decisions` reads, e.g. for CI to replay before publishing.
    Export {
        /// The file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Only decisions made within this long (`24h`, `7d`).
        #[arg(long, default_value = "24h")]
        since: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

pub(super) async fn run(cmd: DecisionsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DecisionsCommand::Export { out, since, admin } => {
            let decisions = fetch(&admin, &since).await?;
            let mut text = String::new();
            for d in &decisions {
                text.push_str(&serde_json::to_string(d)?);
                text.push('\n');
            }
            crate::secrets::write(&out, text.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "exported {} decisions to {}",
                decisions.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `policy replay`: the decisions (from `file`, or from the gateway within `since`) through
/// the bundle in `candidate`; prints the flips, and exits 1 on any with `fail_on_flip`.
pub(super) async fn replay(
    candidate: &str,
    repo: Option<Remote>,
    file: Option<&Path>,
    since: Option<&str>,
    fail_on_flip: bool,
    admin: &AdminArgs,
) -> anyhow::Result<ExitCode> {
    let decisions = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let cutoff = since.map(cutoff).transpose()?.unwrap_or(0);
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str::<DecisionRecord>)
                .filter(|d| d.as_ref().map_or(true, |d| d.at >= cutoff))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => fetch(admin, since.unwrap_or("24h")).await?,
    };
    let (manifest, files) = candidate_bundle(candidate, repo, admin).await?;
    let bindings = crate::reload::bindings(&manifest, &mut |path| {
        files.get(path).cloned().ok_or_else(|| {
            crate::reload::ReloadError::Schema(format!("{path} is missing from the bundle"))
        })
    })?;
    let bindings: Vec<_> = bindings.into_iter().map(|(b, _)| b).collect();
    let host = PolicyHost::new(PolicyConfig::default(), Metering::Off)?;
    let set = PolicySet::load(
        &host,
        &bindings,
        &manifest.bundle,
        Some(&manifest.version),
        None,
    )
    .await
    .context("loading the candidate")?;
    let mut flips: BTreeMap<Flip, Vec<(DecisionRecord, Outcome, Outcome)>> = BTreeMap::new();
    for d in &decisions {
        let recorded: Outcome = serde_json::from_str(&d.outcome)
            .with_context(|| format!("decision {}: outcome", d.request_id))?;
        let input: sdk::Request = serde_json::from_str(&d.input)
            .with_context(|| format!("decision {}: input", d.request_id))?;
        let now = decide(&host, &set, &input).await;
        if let Some(flip) = Flip::between(&recorded, &now) {
            flips
                .entry(flip)
                .or_default()
                .push((d.clone(), recorded, now));
        }
    }
    let total: usize = flips.values().map(Vec::len).sum();
    println!(
        "replayed {} decisions through {} {}: {total} flips",
        decisions.len(),
        set.bundle(),
        set.version()
    );
    for (flip, cases) in &flips {
        println!("  {flip}: {}", cases.len());
        for (d, before, after) in cases.iter().take(EXAMPLES) {
            let node = serde_json::from_str::<serde_json::Value>(&d.input)
                .ok()
                .and_then(|v| v["node_name"].as_str().map(str::to_string))
                .unwrap_or_default();
            println!(
                "    {} {}/{} node {node} (was {}): {} -> {}",
                d.request_id,
                d.cluster,
                d.role,
                d.policy_version,
                serde_json::to_string(before)?,
                serde_json::to_string(after)?
            );
        }
    }
    Ok(if fail_on_flip && total > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The candidate bundle: the directory `candidate` names, or else the version `candidate` in
/// the policy repository (`repo`, or the one the gateway config follows), fetched into a
/// scratch mirror that is removed afterwards.
async fn candidate_bundle(
    candidate: &str,
    repo: Option<Remote>,
    admin: &AdminArgs,
) -> anyhow::Result<(crate::reload::Manifest, BTreeMap<String, Vec<u8>>)> {
    if Path::new(candidate).is_dir() {
        return super::policy::bundle_files(Path::new(candidate));
    }
    let remote = match repo {
        Some(remote) => remote,
        None => {
            let path = admin.config_path();
            let source = Config::load(path)?.policy_source.with_context(|| {
                format!(
                    "--candidate {candidate:?} is no directory, and {} follows no policy \
                     repository ([policy.source]) to take it from: name one with --repo",
                    path.display()
                )
            })?;
            Remote {
                url: source.url,
                transport: source.transport,
            }
        }
    };
    let scratch = std::env::temp_dir().join(format!(
        "omnirelay-replay-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let spec = candidate.to_string();
    let at = scratch.clone();
    let fetched =
        tokio::task::spawn_blocking(move || crate::reload::fetch_bundle(remote, &at, &spec))
            .await
            .context("the git worker failed")?;
    let _ = std::fs::remove_dir_all(&scratch);
    let fetched = fetched
        .with_context(|| format!("taking version {candidate:?} from the policy repository"))?;
    println!(
        "candidate: bundle {} {} (commit {})",
        fetched.manifest.bundle, fetched.manifest.version, fetched.commit
    );
    Ok((fetched.manifest, fetched.files))
}

/// The candidate's outcome for one input, with the DNS admission the gateway applies (its own
/// names are not known here).
async fn decide(host: &PolicyHost, set: &PolicySet, input: &sdk::Request) -> Outcome {
    let Some(bound) = set.select(&input.token.cluster, &input.token.role) else {
        return Outcome::Error {
            kind: "no-policy-binding".into(),
        };
    };
    let result = host
        .evaluate(&bound.policy, input)
        .await
        .and_then(|v| match v {
            Verdict::Allow(grant) => match bound.admit(&grant, &[]) {
                Ok(()) => Ok(Verdict::Allow(grant)),
                Err(invalid) => Err(invalid.into()),
            },
            deny => Ok(deny),
        });
    Outcome::of(&result)
}

/// Unix seconds `since` (`24h`) ago.
fn cutoff(since: &str) -> anyhow::Result<u64> {
    let span: Duration =
        humantime::parse_duration(since).with_context(|| format!("--since {since:?}"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    Ok(now.saturating_sub(span.as_secs()))
}

/// Every decision the gateway kept within `since`, page by page.
async fn fetch(admin: &AdminArgs, since: &str) -> anyhow::Result<Vec<DecisionRecord>> {
    let since = cutoff(since)?;
    let client = admin.client()?;
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page: Vec<DecisionRecord> = expect(
            client
                .get(&format!(
                    "/admin/v1/decisions?since={since}&after={after}&limit=1000"
                ))
                .await?,
            StatusCode::OK,
        )?;
        let full = page.len() == 1000;
        after = page.last().map_or(after, |d| d.seq);
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}
