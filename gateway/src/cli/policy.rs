//! `omnirelay policy ...`: what policy authors and CI run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::policy::{Metering, PolicyConfig, PolicyHost, vectors};

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Run a vector file (request → expected decision) against a compiled policy through the
    /// real host, with fuel metering. Exits 1 on any mismatch or budget overrun.
    Test {
        /// The policy component (`.wasm`, built for wasm32-wasip2).
        policy: PathBuf,
        /// The vector file (JSON; see the policy-sdk README for the format).
        vectors: PathBuf,
    },
}

pub(super) async fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Test { policy, vectors } => test(policy, vectors).await,
    }
}

async fn test(policy_path: PathBuf, vectors_path: PathBuf) -> anyhow::Result<ExitCode> {
    let module = tokio::fs::read(&policy_path)
        .await
        .with_context(|| format!("reading {}", policy_path.display()))?;
    let text = tokio::fs::read_to_string(&vectors_path)
        .await
        .with_context(|| format!("reading {}", vectors_path.display()))?;
    let file: vectors::VectorFile = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", vectors_path.display()))?;
    let host = PolicyHost::new(PolicyConfig::default(), Metering::Fuel)?;
    let name = policy_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".into());
    let settings = file.settings.to_string();
    let loaded = host
        .load(&name, module, &settings)
        .await
        .with_context(|| format!("loading {}", policy_path.display()))?;
    let budget = file
        .fuel_budget
        .map_or_else(|| "none".to_string(), |b| b.to_string());
    println!(
        "{name} ({}): {} vectors, fuel budget {budget}",
        loaded.digest(),
        file.vectors.len()
    );
    let results = vectors::run(&host, &loaded, &file).await;
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in &results {
        let status = if r.failure.is_none() { "PASS" } else { "FAIL" };
        let detail = r.failure.as_deref().unwrap_or("");
        println!(
            "  {status}  {:<width$}  fuel {:>10}  {detail}",
            r.name, r.fuel
        );
    }
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    println!("{} passed, {failed} failed", results.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
