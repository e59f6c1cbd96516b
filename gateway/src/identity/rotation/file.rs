//! `rotation.json`: the durable record of a CA rotation. It lists every CA the gateway has
//! had since its first rotation (the configured one included), each with its state, its
//! certificate's SHA-256 and notAfter, and the files it lives in (none for the CA configured
//! under `[identity]`), plus the bundle sequence. Written 0600 and atomically; read back only
//! when it is private, well-formed and consistent with the files it names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::RotationError;
use crate::identity::config::IdentityConfig;
use crate::identity::{Ca, CaState};
use crate::secrets;

/// The only format this binary reads and writes.
const FORMAT: u32 = 1;
/// The state file's name inside the rotation directory.
pub(super) const STATE_FILE: &str = "rotation.json";

/// The file as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateFile {
    pub format: u32,
    pub sequence: u64,
    pub cas: Vec<Entry>,
}

/// One CA of the rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Entry {
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    pub state: CaState,
    /// The certificate's notAfter, Unix seconds.
    pub not_after: u64,
    /// Certificate file name inside the rotation directory; absent for the configured CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// Private key file name inside the rotation directory (0600); absent for the configured CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Entry {
    /// Whether this is the CA configured as `[identity] ca_cert`/`ca_key`.
    pub fn is_configured(&self) -> bool {
        self.cert.is_none()
    }
}

/// Where the files are.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub configured_cert: PathBuf,
    pub configured_key: PathBuf,
}

impl Paths {
    pub fn new(config: &IdentityConfig) -> Self {
        Self {
            dir: config.rotation_dir.clone(),
            state: config.rotation_dir.join(STATE_FILE),
            configured_cert: config.ca_cert.clone(),
            configured_key: config.ca_key.clone(),
        }
    }

    /// The certificate and key files of `entry`.
    pub fn of(&self, entry: &Entry) -> (PathBuf, PathBuf) {
        match (&entry.cert, &entry.key) {
            (Some(cert), Some(key)) => (self.dir.join(cert), self.dir.join(key)),
            _ => (self.configured_cert.clone(), self.configured_key.clone()),
        }
    }

    fn inconsistent(&self, problem: impl Into<String>) -> RotationError {
        RotationError::Inconsistent {
            path: self.state.clone(),
            problem: problem.into(),
        }
    }
}

/// The state file and the CAs it keeps in the bundle, loaded.
#[derive(Debug, Clone)]
pub(super) struct Durable {
    pub file: StateFile,
    /// One per entry, in order: loaded for every CA in the bundle, `None` for retired ones
    /// (whose files are no longer read and may be gone).
    pub loaded: Vec<Option<Arc<Ca>>>,
    /// Whether `file` is on disk (a gateway that never rotated has none).
    pub on_disk: bool,
}

impl Durable {
    /// The state at `paths`: the file when there is one, else the configured CA alone.
    pub fn load(paths: &Paths) -> Result<Self, RotationError> {
        let Some(bytes) = secrets::read_state(&paths.state)? else {
            let ca = load_ca(&paths.configured_cert, &paths.configured_key)?;
            let file = StateFile {
                format: FORMAT,
                sequence: 1,
                cas: vec![entry_for(&ca, CaState::Active, None)],
            };
            return Ok(Self {
                file,
                loaded: vec![Some(Arc::new(ca))],
                on_disk: false,
            });
        };
        let file: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| RotationError::Parse {
                path: paths.state.clone(),
                source,
            })?;
        check(&file).map_err(|problem| paths.inconsistent(problem))?;
        let mut loaded = Vec::with_capacity(file.cas.len());
        for entry in &file.cas {
            loaded.push(load_entry(paths, entry)?);
        }
        Ok(Self {
            file,
            loaded,
            on_disk: true,
        })
    }

    /// Writes the state file (0600, atomically), creating the directory (0700) if needed.
    pub fn save(&self, paths: &Paths) -> Result<(), RotationError> {
        create_dir(&paths.dir)?;
        let mut text =
            serde_json::to_vec_pretty(&self.file).map_err(|source| RotationError::Parse {
                path: paths.state.clone(),
                source,
            })?;
        text.push(b'\n');
        secrets::write(&paths.state, &text)?;
        Ok(())
    }
}

/// The entry recording `ca` in `state`; `files` are its certificate and key file names, `None`
/// for the configured CA.
pub(super) fn entry_for(ca: &Ca, state: CaState, files: Option<(String, String)>) -> Entry {
    let (cert, key) = files.unzip();
    Entry {
        fingerprint: ca.fingerprint().to_string(),
        state,
        not_after: unix(ca.not_after()),
        cert,
        key,
    }
}

/// Loads the CA of a bundle entry and checks it is the one recorded; `None` for a retired one.
fn load_entry(paths: &Paths, entry: &Entry) -> Result<Option<Arc<Ca>>, RotationError> {
    if entry.state == CaState::Retired {
        return Ok(None);
    }
    let (cert, key) = paths.of(entry);
    let ca = load_ca(&cert, &key)?;
    if ca.fingerprint() != entry.fingerprint {
        return Err(paths.inconsistent(format!(
            "{} has SHA-256 {}, but the rotation records {} there",
            cert.display(),
            ca.fingerprint(),
            entry.fingerprint
        )));
    }
    if unix(ca.not_after()) != entry.not_after {
        return Err(paths.inconsistent(format!(
            "{} expires at {}, but the rotation records {}",
            cert.display(),
            unix(ca.not_after()),
            entry.not_after
        )));
    }
    Ok(Some(Arc::new(ca)))
}

/// Reads a CA: the certificate as a public file, the key as a secret (refused if others can
/// read it).
pub(super) fn load_ca(cert: &Path, key: &Path) -> Result<Ca, RotationError> {
    let cert_pem = std::fs::read_to_string(cert).map_err(|source| secrets::SecretError::Io {
        path: cert.to_path_buf(),
        source,
    })?;
    let key_pem = secrets::read(key)?;
    Ca::load(&cert_pem, &key_pem).map_err(|source| RotationError::Ca {
        path: cert.to_path_buf(),
        source,
    })
}

/// The rules every state file keeps: exactly one active CA, at most one other CA in the bundle
/// (prepared or previous), distinct well-formed fingerprints, plain file names, one configured
/// CA at most.
pub(super) fn check(file: &StateFile) -> Result<(), String> {
    if file.format != FORMAT {
        return Err(format!(
            "format {} (this gateway reads format {FORMAT})",
            file.format
        ));
    }
    if file.sequence == 0 {
        return Err("sequence 0 (the bundle sequence starts at 1)".into());
    }
    let count = |state| file.cas.iter().filter(|e| e.state == state).count();
    if count(CaState::Active) != 1 {
        return Err(format!(
            "{} active CAs (exactly one signs)",
            count(CaState::Active)
        ));
    }
    if count(CaState::Prepared) + count(CaState::Previous) > 1 {
        return Err("more than one CA besides the active one is in the bundle".into());
    }
    if file.cas.iter().filter(|e| e.is_configured()).count() > 1 {
        return Err("more than one entry names the configured CA".into());
    }
    for (i, entry) in file.cas.iter().enumerate() {
        let is_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if entry.fingerprint.len() != 64 || !entry.fingerprint.chars().all(is_hex) {
            return Err(format!(
                "cas[{i}]: fingerprint is not 64 lowercase hex digits"
            ));
        }
        if file.cas[..i]
            .iter()
            .any(|e| e.fingerprint == entry.fingerprint)
        {
            return Err(format!("cas[{i}]: {} is listed twice", entry.fingerprint));
        }
        match (&entry.cert, &entry.key) {
            (None, None) => {}
            (Some(cert), Some(key)) if plain_name(cert) && plain_name(key) && cert != key => {}
            _ => {
                return Err(format!(
                    "cas[{i}]: cert and key must both be file names in the rotation \
                     directory (or both absent for the configured CA)"
                ));
            }
        }
    }
    Ok(())
}

/// A file name without a directory part.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Creates the rotation directory private to the gateway when it is missing.
pub(super) fn create_dir(dir: &Path) -> Result<(), RotationError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| {
            RotationError::Files(secrets::SecretError::Io {
                path: dir.to_path_buf(),
                source,
            })
        })
}

pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
