//! Secret files (private keys, the admin credential): written atomically with mode 0600, and
//! refused on read when group- or world-accessible, so a key that leaked through permissions is
//! never used silently.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A secret file could not be used.
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
    /// Group or others may access the file.
    #[error("{path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

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
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask on create; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
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
}
