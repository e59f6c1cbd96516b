//! Policy repositories for the hot-reload tests: a bare git repository, bundle sources built
//! from `examples/policy-repo`, `policy publish` through the real binary, and hand-made
//! commits for the candidates `publish` would refuse to write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{TempDir, omnirelay, repo_root};

/// A bare repository standing in for the policy repository CI publishes to.
#[derive(Debug)]
pub struct PolicyRepo {
    /// Its directory (also its URL, as a local path).
    pub dir: TempDir,
}

impl PolicyRepo {
    /// A new, empty bare repository.
    pub fn new(name: &str) -> Self {
        let dir = TempDir::new(&format!("{name}-repo"));
        git2::Repository::init_bare(&dir.0).unwrap();
        Self { dir }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.dir.0.display().to_string()
    }

    /// `omnirelay policy publish` of `source` as `version`, returning the commit id.
    pub fn publish(&self, source: &Path, version: &str, sign_key: Option<&Path>) -> String {
        let mut args = vec![
            "policy".to_string(),
            "publish".into(),
            "--source".into(),
            source.display().to_string(),
            "--repo".into(),
            self.url(),
            "--version".into(),
            version.into(),
        ];
        if let Some(key) = sign_key {
            args.extend(["--sign-key".into(), key.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = omnirelay(&args).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "publish {version}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .split("as commit ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .to_string()
    }

    /// The commit `main` points at.
    pub fn head(&self) -> String {
        let repo = git2::Repository::open_bare(&self.dir.0).unwrap();
        repo.find_reference("refs/heads/main")
            .unwrap()
            .peel_to_commit()
            .unwrap()
            .id()
            .to_string()
    }

    /// The files of `main`'s tree.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let repo = git2::Repository::open_bare(&self.dir.0).unwrap();
        let tree = repo
            .find_reference("refs/heads/main")
            .unwrap()
            .peel_to_tree()
            .unwrap();
        let mut files = BTreeMap::new();
        tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
            if let Some(git2::ObjectType::Blob) = entry.kind() {
                let blob = entry.to_object(&repo).unwrap().peel_to_blob().unwrap();
                files.insert(
                    format!("{dir}{}", entry.name().unwrap()),
                    blob.content().to_vec(),
                );
            }
            git2::TreeWalkResult::Ok
        })
        .unwrap();
        files
    }

    /// Commits `files` on top of `main` directly (as a careless or hostile push would),
    /// optionally with a raw signature header; returns the commit id.
    pub fn commit_files(
        &self,
        files: &BTreeMap<String, Vec<u8>>,
        signature: Option<&dyn Fn(&str) -> String>,
    ) -> String {
        let repo = git2::Repository::open_bare(&self.dir.0).unwrap();
        let mut index = git2::Index::new().unwrap();
        for (path, bytes) in files {
            let oid = repo.blob(bytes).unwrap();
            let entry = git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode: 0o100644,
                uid: 0,
                gid: 0,
                file_size: bytes.len() as u32,
                id: oid,
                flags: 0,
                flags_extended: 0,
                path: path.as_bytes().to_vec(),
            };
            index.add(&entry).unwrap();
        }
        let tree = repo.find_tree(index.write_tree_to(&repo).unwrap()).unwrap();
        let parent = repo
            .find_reference("refs/heads/main")
            .unwrap()
            .peel_to_commit()
            .unwrap();
        let who = git2::Signature::now("e2e", "e2e@omnirelay.invalid").unwrap();
        let buffer = repo
            .commit_create_buffer(&who, &who, "hand-made candidate\n", &tree, &[&parent])
            .unwrap();
        let content = buffer.as_str().unwrap().to_string();
        let oid = match signature {
            Some(sign) => repo
                .commit_signed(&content, &sign(&content), Some("gpgsig"))
                .unwrap(),
            None => repo
                .odb()
                .unwrap()
                .write(git2::ObjectType::Commit, content.as_bytes())
                .unwrap(),
        };
        repo.reference("refs/heads/main", oid, true, "e2e").unwrap();
        oid.to_string()
    }

    /// Moves `main` back to `commit` (a force-push of an older version).
    pub fn reset_main(&self, commit: &str) {
        let repo = git2::Repository::open_bare(&self.dir.0).unwrap();
        repo.reference(
            "refs/heads/main",
            git2::Oid::from_str(commit).unwrap(),
            true,
            "e2e",
        )
        .unwrap();
    }
}

/// A bundle source like `examples/policy-repo`, with its settings' `release` and `ttl_seconds`
/// set, in a directory of its own (the policy crate stays where it is in the workspace).
pub fn bundle_source(name: &str, release: &str, ttl_seconds: u32) -> TempDir {
    let example = repo_root().join("examples/policy-repo");
    let dir = TempDir::new(&format!("{name}-source-{release}"));
    for sub in ["schemas", "vectors"] {
        std::fs::create_dir_all(dir.0.join(sub)).unwrap();
        for entry in std::fs::read_dir(example.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.0.join(sub).join(entry.file_name())).unwrap();
        }
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(example.join("bundle.source.json")).unwrap())
            .unwrap();
    let policy = &mut manifest["policies"][0];
    policy["crate"] = serde_json::Value::String(example.join("edge-gate").display().to_string());
    policy["settings"]["release"] = release.into();
    policy["settings"]["ttl_seconds"] = ttl_seconds.into();
    // The example's first vector pins the TTL; keep it in step with the settings.
    let vectors_path = dir.0.join("vectors/edge-gate.json");
    let mut vectors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&vectors_path).unwrap()).unwrap();
    vectors["vectors"][0]["expect"]["allow"]["ttl_seconds"] = ttl_seconds.into();
    std::fs::write(&vectors_path, serde_json::to_vec_pretty(&vectors).unwrap()).unwrap();
    std::fs::write(
        dir.0.join("bundle.source.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    dir
}

/// Replaces the `[[policies]]` of an `omnirelay init` config with a `[policy.source]` on
/// `url`, and lifts the per-IP and per-token limits the tests' single client would trip.
pub fn follow_repo(toml: &mut String, url: &str, extra: &str) {
    let start = toml.find("# Nodes of the `secure` cluster").unwrap();
    let end = toml.find("[log]").unwrap();
    toml.replace_range(
        start..end,
        &format!(
            "[policy.source]\ngit = \"{url}\"\npoll_interval = \"200ms\"\n{extra}\n\n\
             [limits]\nper_ip = {{ per_second = 100000, burst = 100000 }}\n\
             per_token = {{ per_second = 100000, burst = 100000 }}\n\n"
        ),
    );
}

/// Where a test keeps a key.
pub fn key_path(dir: &TempDir, name: &str) -> PathBuf {
    dir.0.join(name)
}

/// The policy status from the admin API (`GET /admin/v1/policy/status`).
pub async fn policy_status(gw: &super::Gateway) -> serde_json::Value {
    let reply = gw.admin().get("/admin/v1/policy/status").await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    serde_json::from_slice(&reply.body).unwrap()
}

/// Polls the policy status (with a deadline) until `done` holds for it, and returns it.
pub async fn policy_status_until(
    gw: &super::Gateway,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = policy_status(gw).await;
        if done(&status) {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never happened; last status {status:#}"
        );
        tokio::task::yield_now().await;
    }
}

/// `omnirelay policy keygen` into `dir`: the key's path and an `allowed_signers` file (0644)
/// trusting it.
pub fn signing_key(dir: &TempDir) -> (PathBuf, PathBuf) {
    let key = dir.0.join("ci.key");
    let out = omnirelay(&["policy", "keygen", "--out", key.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let signers = dir.0.join("allowed_signers");
    std::fs::write(&signers, &out.stdout).unwrap();
    (key, signers)
}
