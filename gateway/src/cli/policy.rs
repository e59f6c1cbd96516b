//! `omnirelay policy ...`: what policy authors and CI run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use http::StatusCode;

use super::{publish, scaffold};
use crate::policy::{Metering, PolicyConfig, PolicyHost, vectors};
use crate::reload::Manifest;
use crate::wire::{PinRequest, ReloadResponse, UnpinRequest};

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Scaffold a standalone policy repository: its own Cargo workspace, a policy crate with
    /// one rule and native unit tests, `bundle.source.json`, vectors, an evidence schema, a
    /// README of the author's loop and CI (a GitHub workflow and `ci/publish.sh`).
    New {
        /// The directory to create (it must not exist, or be empty).
        dir: PathBuf,
        /// The policy's name, also its crate's and its bundle's: lowercase letters, digits,
        /// '-'.
        #[arg(long)]
        name: String,
        /// Take `policy-sdk` from this directory (a checkout's `policy-sdk/`). A relative path
        /// is written relative to the new repository.
        #[arg(long, conflicts_with = "sdk_git")]
        sdk_path: Option<PathBuf>,
        /// Take `policy-sdk` from this git repository (default: the gateway's own).
        #[arg(long)]
        sdk_git: Option<String>,
    },
    /// Run test vectors (request → expected decision) through the real host with fuel
    /// metering: `policy test <policy.wasm> <vectors.json>`, or `policy test <dir>` for every
    /// policy of a bundle (`bundle.json`, or `bundle.source.json`, which is built first).
    /// Exits 1 on any mismatch or fuel-budget overrun.
    Test {
        /// A compiled policy (`.wasm`) or a bundle directory.
        target: PathBuf,
        /// The vector file, when `target` is a module.
        vectors: Option<PathBuf>,
    },
    /// Compile the policy crates of a bundle source (`bundle.source.json`) for wasm32-wasip2.
    Build {
        /// The bundle source directory.
        #[arg(long, default_value = ".")]
        source: PathBuf,
    },
    /// What CI runs: build, test (budgets included), write the manifest with digests, commit,
    /// tag `vX.Y.Z` and push to the policy repository. Refuses a failing or older version.
    Publish {
        /// The bundle source directory.
        #[arg(long, default_value = ".")]
        source: PathBuf,
        /// The policy repository: a path or `file://` URL of a bare repository, or a network
        /// URL (`https://host/repo.git`, `ssh://[user@]host[:port]/repo.git`, `user@host:repo`).
        #[arg(long)]
        repo: String,
        /// The new version, `X.Y.Z`.
        #[arg(long)]
        version: String,
        /// The branch to publish on.
        #[arg(long, default_value = "main")]
        branch: String,
        /// Publish a shadow candidate instead of a release: a commit on top of `--branch`'s
        /// head, pushed (replacing the previous candidate) to the branch named here (default
        /// `candidate`), tagged `candidate-vX.Y.Z`. Gateways with `candidate_branch` run it in
        /// shadow; `policy promote` makes it active.
        #[arg(long, num_args = 0..=1, default_missing_value = "candidate")]
        candidate: Option<String>,
        /// Ed25519 key (from `policy keygen`) to SSH-sign the commit with.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// Commit message.
        #[arg(long)]
        message: Option<String>,
        #[command(flatten)]
        transport: super::remote::TransportArgs,
    },
    /// Create an Ed25519 key for signing policy commits; prints its allowed_signers line.
    Keygen {
        /// Where to write the key (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// The principal to name in allowed_signers.
        #[arg(long, default_value = "policy-ci")]
        principal: String,
    },
    /// The active policy version, the pin, the last candidate and why it failed, the last poll.
    Status {
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
    /// Fetch the policy repository now and take a new version live if it passes.
    Reload {
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
    /// Hold the gateway to a version (`1.2.0`), tag or commit, even an older one.
    Pin {
        /// Version, tag or commit id.
        target: String,
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
    /// Follow the policy repository again.
    Unpin {
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
    /// The shadow candidate's disagreements with the active version.
    Shadow {
        #[command(subcommand)]
        command: ShadowCommand,
    },
    /// Re-run the decisions the gateway kept (or a `decisions export` file) through a
    /// candidate bundle in the real host, and print the flips (allow→deny, deny→allow, changed
    /// SPIFFE ID, TTL or DNS names) with counts and examples.
    Replay {
        /// The candidate: a bundle directory (`bundle.json`, or `bundle.source.json`, built
        /// first), or a version in the policy repository (`1.2.0`, its release tag `v1.2.0`,
        /// or any tag, branch or commit) that the gateway follows or `--repo` names.
        #[arg(long, value_name = "DIR|VERSION")]
        candidate: String,
        /// The policy repository to take a `--candidate VERSION` from (default: the gateway
        /// config's `[policy.source] git`), reached with the transport flags below.
        #[arg(long)]
        repo: Option<String>,
        #[command(flatten)]
        transport: super::remote::TransportArgs,
        /// Decisions from this file (`omnirelay decisions export`) instead of the gateway.
        #[arg(long)]
        decisions: Option<PathBuf>,
        /// Only decisions made within this long (default for the gateway: 24h; for a file:
        /// all).
        #[arg(long)]
        since: Option<String>,
        /// Exit 1 when any decision flips.
        #[arg(long)]
        fail_on_flip: bool,
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
    /// Make the shadow candidate the active version (through the same checks; audited).
    Promote {
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum ShadowCommand {
    /// The candidate in shadow and its newest disagreements (both decisions and the node).
    Report {
        /// How many disagreements to list (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print the report as JSON (the policy inputs included).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: super::token::AdminArgs,
    },
}

pub(super) async fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::New {
            dir,
            name,
            sdk_path,
            sdk_git,
        } => {
            let sdk = match (sdk_path, sdk_git) {
                (Some(path), _) => scaffold::Sdk::Path(path),
                (None, Some(url)) => scaffold::Sdk::Git(url),
                (None, None) => scaffold::Sdk::Git(scaffold::DEFAULT_SDK_GIT.to_string()),
            };
            let written = scaffold::new(&dir, &name, &sdk)?;
            println!("created policy repository {name} in {}:", dir.display());
            for file in written {
                println!("  {}", file.display());
            }
            println!(
                "next: cd {} && cargo test && omnirelay policy test .",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test {
            target,
            vectors: Some(vectors),
        } => test(target, vectors).await,
        PolicyCommand::Test {
            target,
            vectors: None,
        } => {
            let (manifest, files) = bundle_files(&target)?;
            Ok(if test_bundle(&manifest, &files).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Build { source } => {
            let built = publish::build(&source)?;
            for p in &built.manifest.policies {
                println!("{}: {} sha256:{}", p.name, p.module, p.sha256);
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Publish {
            source,
            repo,
            version,
            branch,
            candidate,
            sign_key,
            message,
            transport,
        } => {
            // Before the build: a refused URL or flag should not cost a compile.
            let remote = transport.remote(&repo)?;
            if remote.url.scheme().is_network() && sign_key.is_none() {
                eprintln!(
                    "warning: publishing an unsigned commit to a network remote; gateways \
                     follow one only with require_signed_commits (give --sign-key) or an \
                     explicit allow_unsigned_remote"
                );
            }
            let mut built = publish::build(&source)?;
            built.manifest.version = version.clone();
            if !test_bundle(&built.manifest, &built.files).await? {
                anyhow::bail!("not publishing {version}: its own tests fail");
            }
            let publish = publish::Publish {
                remote: &remote,
                version: &version,
                branch: &branch,
                candidate: candidate.as_deref(),
                sign_key: sign_key.as_deref(),
                message: message.as_deref(),
            };
            // git blocks (and a network transport runs its own I/O): on a thread of its own,
            // outside the CLI's runtime.
            let commit = std::thread::scope(|scope| {
                scope
                    .spawn(|| publish::commit_and_push(&publish, &mut built))
                    .join()
                    .map_err(|_| anyhow::anyhow!("the publishing thread panicked"))?
            })?;
            let tag = match &candidate {
                Some(branch) => format!("candidate-v{version} on {branch}"),
                None => format!("v{version}"),
            };
            println!(
                "published {} {version} as commit {commit} (tag {tag}){}",
                built.manifest.bundle,
                if sign_key.is_some() { ", signed" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Keygen { out, principal } => {
            let line = publish::keygen(&out, &principal)?;
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Status { admin } => {
            let status: crate::reload::Status = super::token::expect(
                admin.client()?.get("/admin/v1/policy/status").await?,
                StatusCode::OK,
            )?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Reload { admin } => {
            admin_call(admin, "/admin/v1/policy/reload", Vec::new()).await
        }
        PolicyCommand::Pin { target, admin } => {
            let body = serde_json::to_vec(&PinRequest {
                target,
                by: Some(super::token::whoami()),
            })?;
            admin_call(admin, "/admin/v1/policy/pin", body).await
        }
        PolicyCommand::Replay {
            candidate,
            repo,
            transport,
            decisions,
            since,
            fail_on_flip,
            admin,
        } => {
            let remote = repo.map(|r| transport.remote(&r)).transpose()?;
            super::replay::replay(
                &candidate,
                remote,
                decisions.as_deref(),
                since.as_deref(),
                fail_on_flip,
                &admin,
            )
            .await
        }
        PolicyCommand::Promote { admin } => {
            let body = serde_json::to_vec(&UnpinRequest {
                by: Some(super::token::whoami()),
            })?;
            admin_call(admin, "/admin/v1/policy/promote", body).await
        }
        PolicyCommand::Shadow {
            command: ShadowCommand::Report { limit, json, admin },
        } => {
            let report: crate::shadow::Report = super::token::expect(
                admin
                    .client()?
                    .get(&format!("/admin/v1/policy/shadow?limit={limit}"))
                    .await?,
                StatusCode::OK,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_shadow(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Unpin { admin } => {
            let body = serde_json::to_vec(&UnpinRequest {
                by: Some(super::token::whoami()),
            })?;
            admin_call(admin, "/admin/v1/policy/unpin", body).await
        }
    }
}

fn print_shadow(report: &crate::shadow::Report) {
    match &report.candidate {
        Some(v) => println!(
            "candidate in shadow: {} {} (commit {})",
            v.bundle, v.version, v.commit
        ),
        None => println!("no candidate in shadow"),
    }
    println!(
        "{} disagreements (newest first)",
        report.disagreements.len()
    );
    for d in &report.disagreements {
        let node = serde_json::from_str::<serde_json::Value>(&d.input)
            .ok()
            .and_then(|v| v["node_name"].as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "  {} {} {}/{} node {node}: active {} {} | candidate {} {}",
            d.at,
            d.request_id,
            d.cluster,
            d.role,
            d.active_version,
            d.active,
            d.candidate_version,
            d.candidate
        );
    }
}

async fn admin_call(
    admin: super::token::AdminArgs,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<ExitCode> {
    let reply: ReloadResponse =
        super::token::expect(admin.client()?.post(path, body).await?, StatusCode::OK)?;
    match reply.active {
        Some(v) => println!(
            "{}: active {} {} (commit {})",
            reply.result, v.bundle, v.version, v.commit
        ),
        None => println!("{}: no version active", reply.result),
    }
    Ok(ExitCode::SUCCESS)
}

/// The manifest and files of a bundle directory: a published one (`bundle.json`) read as it
/// is, or a source (`bundle.source.json`) built first.
pub(super) fn bundle_files(dir: &Path) -> anyhow::Result<(Manifest, BTreeMap<String, Vec<u8>>)> {
    let published = dir.join(crate::reload::manifest::FILE);
    if published.exists() {
        let manifest = Manifest::parse(&std::fs::read(&published)?)?;
        let mut files = BTreeMap::new();
        for p in &manifest.policies {
            for path in std::iter::once(&p.module)
                .chain(&p.evidence_schema)
                .chain(&p.vectors)
            {
                let file = dir.join(path);
                files.insert(
                    path.clone(),
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?,
                );
            }
        }
        return Ok((manifest, files));
    }
    let built = publish::build(dir)?;
    Ok((built.manifest, built.files))
}

/// Every vector of every policy of a bundle through a fuel-metered host, with each policy's
/// budget; prints one line per vector and returns whether all passed.
async fn test_bundle(
    manifest: &Manifest,
    files: &BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<bool> {
    let bindings = crate::reload::bindings(manifest, &mut |path| {
        files.get(path).cloned().ok_or_else(|| {
            crate::reload::ReloadError::Schema(format!("{path} is missing from the bundle"))
        })
    })?;
    let host = PolicyHost::new(PolicyConfig::default(), Metering::Fuel)?;
    let mut all_passed = true;
    println!("bundle {} {}", manifest.bundle, manifest.version);
    for ((binding, file), policy) in bindings.into_iter().zip(&manifest.policies) {
        let crate::policy::ModuleSource::Bytes(module) = &binding.module else {
            continue;
        };
        let loaded = host
            .load(
                &binding.name,
                module.to_vec(),
                &binding.settings.to_string(),
            )
            .await
            .with_context(|| format!("loading policy {}", binding.name))?;
        let Some(mut file) = file else {
            println!("  {}: no vectors", binding.name);
            continue;
        };
        file.fuel_budget = policy.fuel_budget.or(file.fuel_budget);
        let results = vectors::run(&host, &loaded, &file).await;
        let budget = file
            .fuel_budget
            .map_or_else(|| "none".to_string(), |b| b.to_string());
        println!(
            "  {} ({}): {} vectors, fuel budget {budget}",
            binding.name,
            loaded.digest(),
            results.len()
        );
        for r in &results {
            let status = if r.failure.is_none() { "PASS" } else { "FAIL" };
            println!(
                "    {status}  {}  fuel {}  {}",
                r.name,
                r.fuel,
                r.failure.as_deref().unwrap_or("")
            );
            all_passed &= r.failure.is_none();
        }
    }
    println!(
        "{}",
        if all_passed {
            "all vectors passed"
        } else {
            "FAILED"
        }
    );
    Ok(all_passed)
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
