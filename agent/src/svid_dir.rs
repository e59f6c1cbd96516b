//! The node's identity directory, written the way Kubernetes writes projected volumes (its
//! `AtomicWriter`): each version of the SVID goes into a fresh directory `..svid-<serial>`
//! (key 0600, certificate, bundle, each fsync'd, then the directory), the link `..data` is
//! swapped to it in one rename, and `key.pem`, `cert.pem`, `bundle.pem` are stable links into
//! `..data`. Promise: whoever resolves `..data` once reads a key and a certificate of the same
//! SVID; a crash at any point leaves the previous version or the new one, whole. One writer at
//! a time (an advisory lock on `DIR/.lock`); the previous version is removed after the swap.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::leaf::Leaf;
use crate::secrets::{self, SecretError, random_suffix, sync_dir, write_new};

/// The link naming the current version.
pub const DATA: &str = "..data";
/// The private key, PKCS#8 PEM (0600).
pub const KEY: &str = "key.pem";
/// The SVID and its intermediates, PEM, leaf first.
pub const CERT: &str = "cert.pem";
/// The trust bundle, PEM.
pub const BUNDLE: &str = "bundle.pem";
const VERSION_PREFIX: &str = "..svid-";
/// Links being put in place; a crash may leave one, which the next install removes.
const TMP_LINK_PREFIX: &str = "..tmp-link-";
const LOCK: &str = ".lock";

/// The identity directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SvidDirError {
    /// Nothing was installed here yet (no `..data`).
    #[error(
        "{} holds no SVID written by this agent (no {DATA}); join with `--out {}` first",
        .dir.display(),
        .dir.display()
    )]
    NotJoined {
        /// The directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// What it was done to.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The key file is open to others, or unreadable.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A version name must be a hex serial (with our own suffixes).
    #[error("{0:?} cannot name a version directory")]
    BadVersion(String),
    /// The current certificate cannot be read (needed to name a bundle-only version).
    #[error("the current certificate: {0}")]
    Certificate(#[from] crate::leaf::LeafError),
}

/// One SVID's files, PEM. `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct SvidFiles {
    /// The private key (PKCS#8).
    pub key_pem: String,
    /// The certificate chain, leaf first.
    pub chain_pem: String,
    /// The trust bundle.
    pub bundle_pem: String,
}

impl std::fmt::Debug for SvidFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidFiles")
            .field("key_pem", &"<redacted>")
            .field("chain_pem", &self.chain_pem.len())
            .field("bundle_pem", &self.bundle_pem.len())
            .finish()
    }
}

/// An identity directory.
#[derive(Debug, Clone)]
pub struct SvidDir {
    root: PathBuf,
}

impl SvidDir {
    /// The directory at `root` (created on the first install).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stable path of one of the files (`DIR/key.pem`, …).
    pub fn link(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Installs `files` as the current SVID, version `serial` (hex). Returns the version's
    /// directory. Installing the version that is already current changes nothing.
    pub fn install(&self, serial: &str, files: &SvidFiles) -> Result<PathBuf, SvidDirError> {
        fs::create_dir_all(&self.root).map_err(|e| self.io(&self.root, e))?;
        let _lock = self.lock()?;
        self.install_locked(serial, files)
    }

    /// Reads the current SVID: resolves `..data` once and reads the three files from the
    /// version it names. The key must be private (0600).
    pub fn current(&self) -> Result<SvidFiles, SvidDirError> {
        let version = self
            .current_version()?
            .ok_or_else(|| SvidDirError::NotJoined {
                dir: self.root.clone(),
            })?;
        let dir = self.root.join(version);
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|e| self.io(&path, e))
        };
        Ok(SvidFiles {
            key_pem: secrets::read(&dir.join(KEY))?,
            chain_pem: read(CERT)?,
            bundle_pem: read(BUNDLE)?,
        })
    }

    /// Replaces the trust bundle when it differs from the current one: a new version holding
    /// the same key and certificate. Returns whether anything changed.
    pub fn replace_bundle(&self, bundle_pem: &str) -> Result<bool, SvidDirError> {
        if fs::symlink_metadata(self.root.join(DATA)).is_err() {
            return Err(SvidDirError::NotJoined {
                dir: self.root.clone(),
            });
        }
        let _lock = self.lock()?;
        let mut files = self.current()?;
        if files.bundle_pem == bundle_pem {
            return Ok(false);
        }
        let serial = Leaf::parse(files.chain_pem.as_bytes())?.serial;
        let digest = hex::encode(&Sha256::digest(bundle_pem.as_bytes())[..6]);
        files.bundle_pem = bundle_pem.to_string();
        self.install_locked(&format!("{serial}-bundle-{digest}"), &files)?;
        Ok(true)
    }

    fn install_locked(&self, version: &str, files: &SvidFiles) -> Result<PathBuf, SvidDirError> {
        if version.is_empty()
            || version.len() > 128
            || !version
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b.is_ascii_lowercase() || b == b'-')
        {
            return Err(SvidDirError::BadVersion(version.to_string()));
        }
        let name = format!("{VERSION_PREFIX}{version}");
        let dir = self.root.join(&name);
        if self.current_version()?.as_deref() == Some(name.as_str()) {
            return Ok(dir);
        }
        // A directory of that name that is not current is a crash's leftover: start afresh.
        if fs::symlink_metadata(&dir).is_ok() {
            fs::remove_dir_all(&dir).map_err(|e| self.io(&dir, e))?;
        }
        self.write_version(&dir, files)?;
        self.swap_data(&name)?;
        for file in [KEY, CERT, BUNDLE] {
            self.ensure_link(file)?;
        }
        sync_dir(&self.root).map_err(|e| self.io(&self.root, e))?;
        self.remove_old_versions(&name);
        Ok(dir)
    }

    /// Writes a fresh version directory, every file and the directory flushed to disk.
    fn write_version(&self, dir: &Path, files: &SvidFiles) -> Result<(), SvidDirError> {
        DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| self.io(dir, e))?;
        // Exactly 0755, whatever the umask: the certificate and bundle are for every local
        // reader (the key keeps its own 0600).
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(|e| self.io(dir, e))?;
        for (file, contents, mode) in [
            (KEY, &files.key_pem, 0o600),
            (CERT, &files.chain_pem, 0o644),
            (BUNDLE, &files.bundle_pem, 0o644),
        ] {
            let path = dir.join(file);
            write_new(&path, contents.as_bytes(), mode).map_err(|e| self.io(&path, e))?;
        }
        sync_dir(dir).map_err(|e| self.io(dir, e))
    }

    /// Points `..data` at `name` in one rename over the old link.
    fn swap_data(&self, name: &str) -> Result<(), SvidDirError> {
        self.replace_with_link(DATA, Path::new(name))
    }

    /// Makes `DIR/<file>` a link to `..data/<file>` unless it already is one (a directory from
    /// an older agent holds plain files: each is replaced by its link in one rename).
    fn ensure_link(&self, file: &str) -> Result<(), SvidDirError> {
        let target = Path::new(DATA).join(file);
        if fs::read_link(self.root.join(file)).is_ok_and(|t| t == target) {
            return Ok(());
        }
        self.replace_with_link(file, &target)
    }

    fn replace_with_link(&self, name: &str, target: &Path) -> Result<(), SvidDirError> {
        let suffix = random_suffix().map_err(|e| self.io(&self.root, e))?;
        let tmp = self.root.join(format!("{TMP_LINK_PREFIX}{name}-{suffix}"));
        let path = self.root.join(name);
        symlink(target, &tmp).map_err(|e| self.io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io(&path, e)
        })
    }

    /// The name `..data` points at, if it exists.
    fn current_version(&self) -> Result<Option<String>, SvidDirError> {
        let data = self.root.join(DATA);
        let target = match fs::read_link(&data) {
            Ok(target) => target,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(&data, e)),
        };
        match target.to_str() {
            Some(name) if name.starts_with(VERSION_PREFIX) && !name.contains('/') => {
                Ok(Some(name.to_string()))
            }
            _ => Err(self.io(
                &data,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "points at {}, not at a version of this directory",
                        target.display()
                    ),
                ),
            )),
        }
    }

    /// Removes every version but `keep`, and temporary links a crash left. Failures are logged:
    /// the new version is live either way.
    fn remove_old_versions(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            let outcome = if name.starts_with(VERSION_PREFIX) && name != keep {
                fs::remove_dir_all(&path)
            } else if name.starts_with(TMP_LINK_PREFIX) {
                fs::remove_file(&path)
            } else {
                continue;
            };
            if let Err(e) = outcome {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old version");
            }
        }
    }

    /// One writer at a time: an exclusive advisory lock on `DIR/.lock`, held until dropped.
    fn lock(&self) -> Result<File, SvidDirError> {
        let path = self.root.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| self.io(&path, e))?;
        file.lock().map_err(|e| self.io(&path, e))?;
        Ok(file)
    }

    fn io(&self, path: &Path, source: std::io::Error) -> SvidDirError {
        SvidDirError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests;
