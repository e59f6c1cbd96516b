//! The small public JSON files the agent keeps beside the SVID (`agent.json`, the revocation
//! file): read whole, written atomically (0644) with a trailing newline, so a reader sees the
//! old file or the new one.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::secrets::{self, SecretError};

/// A JSON file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JsonFileError {
    /// Reading failed.
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It does not hold the JSON expected (or the value does not serialise).
    #[error("{}: {source}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] SecretError),
}

/// Reads `path`, or `None` when there is no such file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, JsonFileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JsonFileError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| JsonFileError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `value` to `path` atomically, mode 0644.
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), JsonFileError> {
    let mut json = serde_json::to_vec_pretty(value).map_err(|source| JsonFileError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    json.push(b'\n');
    secrets::write_file(path, &json, 0o644)?;
    Ok(())
}
