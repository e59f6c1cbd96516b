//! Authoring and CI: `policy build` compiles a bundle's policy crates for `wasm32-wasip2`,
//! `policy publish` builds, tests (budgets included), writes the manifest with digests, and
//! commits, tags and pushes a new version to the policy repository (optionally SSH-signed).
//! The CLI may run `cargo`; git is driven in-process (git2), and reaches a network
//! repository (`https://`, `ssh://`) through `reload::remote`, as the gateway does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::reload::manifest::{self, Manifest, ManifestPolicy, version_key};
use crate::reload::remote::Remote;
use crate::reload::sshsig;

/// The author's description of a bundle (`bundle.source.json`): like the published
/// `bundle.json`, with the crate to build instead of a module and its digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SourceManifest {
    bundle: String,
    #[serde(default)]
    description: Option<String>,
    policies: Vec<SourcePolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcePolicy {
    name: String,
    /// The directory of the policy's cargo package (a `cdylib`), relative to the source
    /// manifest; built for wasm32-wasip2 with the `policy` profile of its workspace.
    #[serde(rename = "crate")]
    crate_dir: PathBuf,
    #[serde(default)]
    clusters: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    settings: Option<serde_json::Value>,
    #[serde(default)]
    evidence_schema: Option<String>,
    #[serde(default)]
    vectors: Option<String>,
    #[serde(default)]
    fuel_budget: Option<u64>,
    #[serde(default)]
    dns_suffixes: Vec<String>,
}

/// The source manifest's file name.
pub(super) const SOURCE_FILE: &str = "bundle.source.json";

/// A bundle built from source: the manifest (digests filled in, version still to set) and,
/// per file path in the bundle, its bytes.
pub(super) struct Built {
    pub manifest: Manifest,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Compiles every policy crate of `source` and assembles the bundle's files.
pub(super) fn build(source: &Path) -> anyhow::Result<Built> {
    let path = source.join(SOURCE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let src: SourceManifest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut files = BTreeMap::new();
    let mut policies = Vec::new();
    for p in &src.policies {
        let manifest_path = source.join(&p.crate_dir).join("Cargo.toml");
        let wasm = cargo_build(&manifest_path)?;
        let bytes = std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
        let layout = super::layout::read(&bytes)
            .with_context(|| format!("reading the layout of {}", wasm.display()))?;
        super::layout::check(&p.name, layout)?;
        let module = format!("modules/{}.wasm", p.name);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        files.insert(module.clone(), bytes);
        for extra in [&p.evidence_schema, &p.vectors].into_iter().flatten() {
            let file = source.join(extra);
            files.insert(
                extra.clone(),
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?,
            );
        }
        policies.push(ManifestPolicy {
            name: p.name.clone(),
            module,
            sha256,
            clusters: p.clusters.clone(),
            roles: p.roles.clone(),
            settings: p.settings.clone().unwrap_or_else(|| serde_json::json!({})),
            evidence_schema: p.evidence_schema.clone(),
            vectors: p.vectors.clone(),
            fuel_budget: p.fuel_budget,
            dns_suffixes: p.dns_suffixes.clone(),
        });
    }
    Ok(Built {
        manifest: Manifest {
            bundle: src.bundle,
            version: "0.0.0".into(),
            description: src.description,
            policies,
        },
        files,
    })
}

/// `<the workspace's target dir>/wasm`: the same directory the gateway's own build uses for
/// policies, so dependencies are shared and the outer build's lock is never waited on.
fn wasm_target_dir(manifest_path: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir).join("wasm"));
    }
    let out = Command::new(cargo())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest_path)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let target = meta["target_directory"]
        .as_str()
        .context("cargo metadata: no target_directory")?;
    Ok(Path::new(target).join("wasm"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds the package at `manifest_path` for wasm32-wasip2 and returns the `.wasm` it produced.
fn cargo_build(manifest_path: &Path) -> anyhow::Result<PathBuf> {
    let package = manifest_path.display().to_string();
    let manifest_path = manifest_path
        .canonicalize()
        .with_context(|| format!("{package}: no such policy crate"))?;
    let target_dir = wasm_target_dir(&manifest_path)?;
    let out = Command::new(cargo())
        .args([
            "build",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "policy",
            "--message-format",
            "json",
            "--manifest-path",
        ])
        .arg(&manifest_path)
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .with_context(|| format!("running cargo build for {package}"))?;
    if !out.status.success() {
        bail!(
            "building {package} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && m["manifest_path"].as_str().map(Path::new) == Some(manifest_path.as_path())
        })
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .map(|files| {
                    files
                        .iter()
                        .filter_map(|f| f.as_str().map(PathBuf::from))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|f| f.extension().is_some_and(|e| e == "wasm"))
        .with_context(|| format!("cargo built no .wasm for {package} (is it a cdylib?)"))
}

/// What `policy publish` needs.
pub(super) struct Publish<'a> {
    pub remote: &'a Remote,
    pub version: &'a str,
    pub branch: &'a str,
    /// Publish as a shadow candidate on this branch instead: its parent is `branch`'s head
    /// (so it comes after the version gateways serve), the branch is replaced, and the tag is
    /// `candidate-vX.Y.Z`, which no `v*` tag pattern follows.
    pub candidate: Option<&'a str>,
    pub sign_key: Option<&'a Path>,
    pub message: Option<&'a str>,
}

/// Writes `built` as version `p.version` into the repository and pushes branch and tag.
/// Refuses a version that is not newer than the one on the branch, or a tag that exists.
pub(super) fn commit_and_push(p: &Publish<'_>, built: &mut Built) -> anyhow::Result<git2::Oid> {
    version_key(p.version).with_context(|| format!("--version {:?} is not X.Y.Z", p.version))?;
    built.manifest.version = p.version.to_string();
    let manifest_json = built.manifest.to_json();
    // The published manifest must pass the same schema the gateway enforces.
    Manifest::parse(manifest_json.as_bytes()).context("the manifest to publish is invalid")?;
    // The clone is removed however this ends (a refused push included).
    let clone = TempDir::new("publish")?;
    let work = clone.path();
    let repo = p
        .remote
        .run(|url| git2::Repository::clone(url, work))
        .map_err(|e| anyhow::anyhow!("cloning {e}"))?;
    let branch_ref = format!("refs/heads/{}", p.candidate.unwrap_or(p.branch));
    let parent = match repo.find_reference(&format!("refs/remotes/origin/{}", p.branch)) {
        Ok(r) => Some(r.peel_to_commit()?),
        Err(_) => None,
    };
    if let Some(parent) = &parent
        && let Ok(entry) = parent.tree()?.get_path(Path::new(manifest::FILE))
    {
        let blob = entry.to_object(&repo)?.peel_to_blob()?;
        if let Ok(previous) = Manifest::parse(blob.content())
            && version_key(&previous.version) >= version_key(p.version)
        {
            bail!(
                "{} already has version {}; publish a newer one",
                p.branch,
                previous.version
            );
        }
    }
    let tag = match p.candidate {
        Some(_) => format!("candidate-v{}", p.version),
        None => format!("v{}", p.version),
    };
    if repo.find_reference(&format!("refs/tags/{tag}")).is_ok() {
        bail!("tag {tag} already exists in {}", p.remote.url);
    }
    // The bundle's files replace the tree whole: what is not in this version is not in it.
    let mut index = repo.index()?;
    index.clear()?;
    let mut all = built.files.clone();
    all.insert(manifest::FILE.to_string(), manifest_json.into_bytes());
    for (path, bytes) in &all {
        let file = work.join(path);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&file, bytes)?;
        index.add_path(Path::new(path))?;
    }
    let tree = repo.find_tree(index.write_tree()?)?;
    let who = git2::Signature::now(
        "omnirelay policy publish",
        "policy-publish@omnirelay.invalid",
    )?;
    let message = p
        .message
        .map(str::to_string)
        .unwrap_or_else(|| format!("{} {}\n", built.manifest.bundle, p.version));
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let buffer = repo.commit_create_buffer(&who, &who, &message, &tree, &parents)?;
    let content = buffer.as_str().context("commit is not UTF-8")?.to_string();
    let oid = match p.sign_key {
        Some(key) => {
            let pair = load_signing_key(key)?;
            repo.commit_signed(
                &content,
                &sshsig::sign(&pair, content.as_bytes()),
                Some("gpgsig"),
            )?
        }
        None => repo
            .odb()?
            .write(git2::ObjectType::Commit, content.as_bytes())?,
    };
    repo.reference(&branch_ref, oid, true, "policy publish")?;
    repo.reference(&format!("refs/tags/{tag}"), oid, false, "policy publish")?;
    push(
        p.remote,
        &repo,
        &[
            // A candidate replaces the one before it: forced.
            if p.candidate.is_some() {
                format!("+{branch_ref}:{branch_ref}")
            } else {
                format!("{branch_ref}:{branch_ref}")
            },
            format!("refs/tags/{tag}:refs/tags/{tag}"),
        ],
    )?;
    Ok(oid)
}

/// Pushes `refspecs` to the clone's origin; a reference the server refused (a push that lost
/// a race, a hook that declined) is an error, not a silent success.
fn push(remote: &Remote, repo: &git2::Repository, refspecs: &[String]) -> anyhow::Result<()> {
    let refused = std::cell::RefCell::new(Vec::new());
    remote
        .run(|_| {
            let mut callbacks = git2::RemoteCallbacks::new();
            callbacks.push_update_reference(|name, status| {
                if let Some(status) = status {
                    refused.borrow_mut().push(format!("{name}: {status}"));
                }
                Ok(())
            });
            let mut options = git2::PushOptions::new();
            options.remote_callbacks(callbacks);
            repo.find_remote("origin")?
                .push(refspecs, Some(&mut options))
        })
        .map_err(|e| anyhow::anyhow!("pushing to {e}"))?;
    let refused = refused.into_inner();
    if !refused.is_empty() {
        bail!("{} refused the push: {}", remote.url, refused.join("; "));
    }
    Ok(())
}

/// An Ed25519 PKCS#8 PEM key, as `policy keygen` writes it.
fn load_signing_key(path: &Path) -> anyhow::Result<Ed25519KeyPair> {
    let pem = crate::secrets::read(path)?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .with_context(|| format!("{}: not a PKCS#8 key", path.display()))?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
        .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 key: {e}", path.display()))
}

/// Creates an Ed25519 signing key (0600) and returns its `allowed_signers` line.
pub(super) fn keygen(out: &Path, principal: &str) -> anyhow::Result<String> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("key generation failed"))?;
    let pem = pem_encode("PRIVATE KEY", pkcs8.as_ref());
    crate::secrets::write(out, pem.as_bytes())?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(sshsig::AllowedSigners::line(
        principal,
        &sshsig::public_key_blob(&pair),
    ))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A private working directory under the system's temp directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("omnirelay-{name}-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
