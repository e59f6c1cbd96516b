//! Secret, state and trust-anchor files, for the node and the gateway alike. Secrets (private
//! keys, the admin credential) and state files are written atomically with mode 0600 and refused
//! on read when group or others can access them, so a key that leaked through permissions is
//! never used silently. Trust anchors (keys and CAs we verify against) may be world-readable but
//! are refused when group or others can write them or the directory holding them, as OpenSSH
//! refuses such files. Temporary files get a random name and are created exclusively without
//! following a symlink.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A secret, state or trust-anchor file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may access a secret or state file.
    #[error("{path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Group or others may write a trust anchor: anyone they include could make us trust
    /// their key.
    #[error(
        "trust anchor {path} is writable by group or others (mode {mode:o}); \
         run `chmod go-w {path}`"
    )]
    Writable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Group or others may write the directory holding a trust anchor (and it has no sticky
    /// bit), so they could replace the file.
    #[error(
        "{dir}, which holds trust anchor {path}, is writable by group or others \
         (mode {mode:o}); run `chmod go-w {dir}`"
    )]
    DirWritable {
        /// The directory.
        dir: PathBuf,
        /// The trust anchor in it.
        path: PathBuf,
        /// The directory's permission bits.
        mode: u32,
    },

    /// A trust anchor, or a directory holding one, belongs to a user other than root and
    /// the gateway's own, who can rewrite it whatever its mode.
    #[error(
        "{path} belongs to uid {uid}, neither root nor the gateway's user; \
         give it to one of them (`chown`)"
    )]
    ForeignOwner {
        /// The file or directory.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
}

const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Reads a secret file after checking it is private to its owner.
pub fn read(path: &Path) -> Result<String, SecretError> {
    let io = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io)
}

/// Reads a state file (one the gateway wrote 0600), or `None` when there is none yet. A file
/// that group or others may access is refused: its content cannot be trusted.
pub fn read_state(path: &Path) -> Result<Option<Vec<u8>>, SecretError> {
    if !check_state(path)? {
        return Ok(None);
    }
    fs::read(path).map(Some).map_err(|source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that a state file, if present, is private to its owner; `false` when it is absent.
pub fn check_state(path: &Path) -> Result<bool, SecretError> {
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(SecretError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(true)
}

/// Reads a trust anchor (a verification key, a CA, `allowed_signers`) after checking, as
/// OpenSSH does, that neither it nor the directory holding it (as named, and after resolving
/// symlinks) is writable by group or others or owned by a user other than root and ours. A
/// directory with the sticky bit (`/tmp`) may be writable: others cannot replace a file they
/// do not own there.
pub fn read_trust_anchor(path: &Path) -> Result<String, SecretError> {
    let io = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    owned_by_root_or_us(path, &meta)?;
    let mode = meta.permissions().mode();
    if mode & GROUP_OR_OTHER_WRITE != 0 {
        return Err(SecretError::Writable {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let real = fs::canonicalize(path).map_err(io)?;
    for dir in [parent(path), parent(&real)] {
        let meta = fs::metadata(dir).map_err(|source| SecretError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        owned_by_root_or_us(dir, &meta)?;
        let mode = meta.permissions().mode();
        if mode & GROUP_OR_OTHER_WRITE != 0 && mode & STICKY == 0 {
            return Err(SecretError::DirWritable {
                dir: dir.to_path_buf(),
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
    }
    fs::read_to_string(path).map_err(io)
}

/// Refuses a file or directory owned by neither root nor this process's effective user (read
/// from `/proc/self`, which belongs to it; without `/proc` the owner is not checked).
fn owned_by_root_or_us(path: &Path, meta: &fs::Metadata) -> Result<(), SecretError> {
    use std::os::unix::fs::MetadataExt;
    let uid = meta.uid();
    match fs::metadata("/proc/self").map(|m| m.uid()) {
        Ok(ours) if uid != 0 && uid != ours => Err(SecretError::ForeignOwner {
            path: path.to_path_buf(),
            uid,
        }),
        _ => Ok(()),
    }
}

pub(crate) fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `contents` to `path` with mode 0600: a temporary file in the same directory, fsync,
/// rename, fsync of the directory. Readers see the old file or the new one, never a torn one.
pub fn write(path: &Path, contents: &[u8]) -> Result<(), SecretError> {
    write_file(path, contents, 0o600)
}

/// [`write()`] with another mode, for public files that must also never be torn (certificates).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SecretError> {
    let io = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", random_suffix().map_err(io)?));
    // Nothing is removed when the create fails: whatever holds that name is not ours.
    let file = create_exclusive(&tmp, mode).map_err(io)?;
    let result = fill(file, contents, mode).and_then(|()| {
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Creates `path`, which must not exist yet (nor be a symlink), with exactly `mode`, writes
/// `contents` and flushes them to disk. The caller makes it visible (a rename, or a directory
/// swap) and syncs the directory.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    fill(create_exclusive(path, mode)?, contents, mode)
}

fn fill(mut file: File, contents: &[u8], mode: u32) -> std::io::Result<()> {
    // `mode` is filtered by the umask on create; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Flushes a directory's entries (a rename, a new file, a new link) to disk.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A random suffix for a temporary name, so that nothing planted can be in the writer's way.
pub(crate) fn random_suffix() -> std::io::Result<String> {
    let mut random = [0u8; 16];
    aws_lc_rs::rand::fill(&mut random).map_err(|_| std::io::Error::other("no randomness"))?;
    Ok(hex::encode(random))
}

/// Creates a new file at `path` with `mode` (before the umask): `O_CREAT|O_EXCL|O_NOFOLLOW`,
/// so an existing file, or a symlink planted at `path`, is an error and never written through.
fn create_exclusive(path: &Path, mode: u32) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("omnirelay-secrets-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir.join("key.pem")
    }

    #[test]
    fn written_secrets_are_0600_and_read_back() {
        let path = temp("roundtrip");
        write(&path, b"secret").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read(&path).unwrap(), "secret");
        write(&path, b"rotated").unwrap();
        assert_eq!(read(&path).unwrap(), "rotated");
    }

    #[test]
    fn group_or_world_readable_secrets_are_refused() {
        let path = temp("open");
        write(&path, b"secret").unwrap();
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read(&path).unwrap_err();
            assert!(
                matches!(err, SecretError::TooOpen { mode: m, .. } if m == mode),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"));
        }
    }

    /// A fresh private directory for one test.
    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("omnirelay-secrets-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn temp_files_never_follow_a_planted_symlink_nor_reuse_a_file() {
        let dir = dir("exclusive");
        let victim = dir.join("victim");
        fs::write(&victim, b"untouched").unwrap();
        let planted = dir.join(".key.pem.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let err = create_exclusive(&planted, 0o600).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        // A dangling symlink is not created through either.
        let dangling = dir.join(".dangling.tmp");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
        assert!(create_exclusive(&dangling, 0o600).is_err());
        assert!(!dir.join("nowhere").exists());
        let existing = dir.join(".existing.tmp");
        fs::write(&existing, b"someone else's").unwrap();
        assert_eq!(
            create_exclusive(&existing, 0o600).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(fs::read(&existing).unwrap(), b"someone else's");
        // The writer's own temp names are random, so nothing planted can be in its way.
        write(&dir.join("key.pem"), b"secret").unwrap();
        write(&dir.join("key.pem"), b"rotated").unwrap();
        assert_eq!(read(&dir.join("key.pem")).unwrap(), "rotated");
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".key.pem.tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn trust_anchors_writable_by_others_are_refused() {
        let dir = dir("anchor");
        let anchor = dir.join("allowed_signers");
        fs::write(&anchor, b"ci ssh-ed25519 AAAA").unwrap();
        for mode in [0o600, 0o644, 0o444] {
            fs::set_permissions(&anchor, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_trust_anchor(&anchor).unwrap(), "ci ssh-ed25519 AAAA");
        }
        for mode in [0o664, 0o646, 0o666] {
            fs::set_permissions(&anchor, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_trust_anchor(&anchor).unwrap_err();
            assert!(
                matches!(&err, SecretError::Writable { mode: m, .. } if *m == mode),
                "{err}"
            );
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        fs::set_permissions(&anchor, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = read_trust_anchor(&anchor).unwrap_err();
        assert!(matches!(err, SecretError::DirWritable { .. }), "{err}");
        // Sticky (as /tmp): others cannot replace a file they do not own.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(read_trust_anchor(&anchor).is_ok());
        // Another user could rewrite it whatever its mode (checkable only as root).
        let ours = std::os::unix::fs::MetadataExt::uid(&fs::metadata(&anchor).unwrap());
        if std::os::unix::fs::chown(&anchor, Some(54_321), None).is_ok() {
            assert!(matches!(
                read_trust_anchor(&anchor),
                Err(SecretError::ForeignOwner { uid: 54_321, .. })
            ));
            std::os::unix::fs::chown(&anchor, Some(ours), None).unwrap();
        }
        // Through a symlink, the directory the file really lives in counts too.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let safe = self::dir("anchor-link");
        let link = safe.join("allowed_signers");
        std::os::unix::fs::symlink(&anchor, &link).unwrap();
        assert!(matches!(
            read_trust_anchor(&link),
            Err(SecretError::DirWritable { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&safe);
    }

    #[test]
    fn state_files_are_refused_when_others_can_access_them() {
        let dir = dir("state");
        let state = dir.join("active.json");
        assert_eq!(read_state(&state).unwrap(), None);
        write(&state, b"{}").unwrap();
        assert_eq!(read_state(&state).unwrap(), Some(b"{}".to_vec()));
        fs::set_permissions(&state, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_state(&state).unwrap_err();
        assert!(
            matches!(err, SecretError::TooOpen { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
