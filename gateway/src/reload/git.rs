//! The local mirror of the policy repository (git2, in-process; never a shelled-out `git`):
//! fetch (through [`super::remote`] for network remotes), pick the candidate commit, read a
//! commit's files, check ancestry and signatures. Blocking: call from a blocking thread.

use std::path::Path;

use git2::{FetchOptions, Oid, Repository};

use super::manifest::version_key;
use super::remote::{Remote, RemoteError};

/// A git operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct GitError {
    what: String,
    #[source]
    source: git2::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let what = what.into();
    move |source| GitError { what, source }
}

/// Which commit of the remote to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Track {
    /// The head of a branch.
    Branch(String),
    /// The highest version among tags starting with this prefix (`v` for `v*`).
    Tags(String),
}

/// A bare mirror under the cache directory.
pub struct Mirror {
    repo: Repository,
    remote: Remote,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("remote", &self.remote.url)
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// Opens the mirror of `remote` at `path`, creating an empty bare repository the first
    /// time.
    pub fn open(path: &Path, remote: Remote) -> Result<Self, GitError> {
        let repo = match Repository::open_bare(path) {
            Ok(repo) => repo,
            Err(_) => {
                Repository::init_bare(path).map_err(err(format!("creating {}", path.display())))?
            }
        };
        Ok(Self { repo, remote })
    }

    /// Fetches every branch and tag of the remote into the mirror (forced: the remote is the
    /// source of truth for names; ancestry decides what may serve).
    pub fn fetch(&self) -> Result<(), RemoteError> {
        self.remote.run(|url| {
            let mut remote = self.repo.remote_anonymous(url)?;
            let mut options = FetchOptions::new();
            options.download_tags(git2::AutotagOption::All);
            remote.fetch(
                &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
                Some(&mut options),
                None,
            )
        })
    }

    /// The commit `track` points at in the mirror, if any.
    pub fn candidate(&self, track: &Track) -> Result<Option<Oid>, GitError> {
        match track {
            Track::Branch(branch) => {
                let name = format!("refs/heads/{branch}");
                match self.repo.find_reference(&name) {
                    Ok(r) => Ok(Some(r.peel_to_commit().map_err(err(&name))?.id())),
                    Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
                    Err(e) => Err(err(name)(e)),
                }
            }
            Track::Tags(prefix) => {
                let names = self
                    .repo
                    .tag_names(Some(&format!("{prefix}*")))
                    .map_err(err("listing tags"))?;
                let best = names
                    .iter()
                    .filter_map(|n| n.ok().flatten())
                    .filter_map(|n| Some((version_key(n.strip_prefix(prefix.as_str())?)?, n)))
                    .max_by_key(|(key, _)| *key);
                match best {
                    Some((_, name)) => self.resolve(&format!("refs/tags/{name}")).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// A commit id, tag (`v1.2.0` or `refs/tags/…`) or branch, resolved to a commit.
    pub fn resolve(&self, spec: &str) -> Result<Oid, GitError> {
        let object = self
            .repo
            .revparse_single(spec)
            .map_err(err(format!("resolving {spec:?}")))?;
        let commit = object
            .peel_to_commit()
            .map_err(err(format!("{spec:?} is not a commit")))?;
        Ok(commit.id())
    }

    /// The bytes of `path` in `commit`'s tree.
    pub fn read(&self, commit: Oid, path: &str) -> Result<Vec<u8>, GitError> {
        let tree = self
            .repo
            .find_commit(commit)
            .and_then(|c| c.tree())
            .map_err(err(format!("commit {commit}")))?;
        let entry = tree
            .get_path(Path::new(path))
            .map_err(err(format!("{path} in {commit}")))?;
        let blob = entry
            .to_object(&self.repo)
            .and_then(|o| o.peel_to_blob())
            .map_err(err(format!("{path} in {commit}")))?;
        Ok(blob.content().to_vec())
    }

    /// Whether `commit` is `base` or comes after it in history.
    pub fn is_at_or_after(&self, commit: Oid, base: Oid) -> Result<bool, GitError> {
        if commit == base {
            return Ok(true);
        }
        self.repo
            .graph_descendant_of(commit, base)
            .map_err(err(format!("ancestry of {commit}")))
    }

    /// The committer time, Unix seconds: the time git checks a signer's `valid-after` and
    /// `valid-before` against (`ssh-keygen -Y verify -Overify-time`).
    pub fn commit_time(&self, commit: Oid) -> Result<i64, GitError> {
        self.repo
            .find_commit(commit)
            .map(|c| c.committer().when().seconds())
            .map_err(err(format!("commit {commit}")))
    }

    /// The commit's signature (armored) and the exact bytes it signs, or `None` if unsigned.
    pub fn signature(&self, commit: Oid) -> Result<Option<(String, Vec<u8>)>, GitError> {
        match self.repo.extract_signature(&commit, Some("gpgsig")) {
            Ok((sig, data)) => Ok(Some((
                String::from_utf8_lossy(&sig).into_owned(),
                data.to_vec(),
            ))),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(err(format!("signature of {commit}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository with commits tagged `v1.2.0`, `v1.10.0`, `v1.9.3` and `x2.0.0`.
    fn tagged() -> (std::path::PathBuf, Repository) {
        let dir = std::env::temp_dir().join(format!("omnirelay-git-tags-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let repo = Repository::init_bare(&dir).unwrap();
        let who = git2::Signature::now("t", "t@example.invalid").unwrap();
        let tree_id = repo.treebuilder(None).unwrap().write().unwrap();
        let mut parent: Option<Oid> = None;
        for tag in ["v1.2.0", "v1.10.0", "v1.9.3", "x2.0.0"] {
            let tree = repo.find_tree(tree_id).unwrap();
            let parents: Vec<git2::Commit<'_>> = parent
                .iter()
                .map(|p| repo.find_commit(*p).unwrap())
                .collect();
            let refs: Vec<&git2::Commit<'_>> = parents.iter().collect();
            let oid = repo
                .commit(Some("refs/heads/main"), &who, &who, tag, &tree, &refs)
                .unwrap();
            repo.tag_lightweight(tag, &repo.find_object(oid, None).unwrap(), false)
                .unwrap();
            parent = Some(oid);
        }
        (dir, repo)
    }

    #[test]
    fn tag_tracking_follows_the_highest_version_with_the_prefix() {
        let (dir, repo) = tagged();
        let remote = Remote {
            url: super::super::remote::RemoteUrl::parse(&dir.display().to_string()).unwrap(),
            transport: Default::default(),
        };
        let mirror = Mirror::open(&dir, remote).unwrap();
        let want = repo
            .revparse_single("refs/tags/v1.10.0")
            .unwrap()
            .peel_to_commit()
            .unwrap()
            .id();
        assert_eq!(
            mirror.candidate(&Track::Tags("v".into())).unwrap(),
            Some(want)
        );
        let head = repo.revparse_single("refs/heads/main").unwrap().id();
        assert_eq!(
            mirror.candidate(&Track::Branch("main".into())).unwrap(),
            Some(head)
        );
        assert_eq!(
            mirror.candidate(&Track::Branch("nope".into())).unwrap(),
            None
        );
        assert!(mirror.is_at_or_after(head, want).unwrap());
        assert!(!mirror.is_at_or_after(want, head).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
