//! `DIR/agent.json`: what renewal needs beyond the key and the certificate — the gateway's URL
//! and the node's name — and what the gateway said about the current SVID (its `renew_after`
//! hint). Public (0644), written atomically after the SVID it describes; the certificate stays
//! the authority on its own validity, and the hint counts only while the serials agree.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::json_file::{self, JsonFileError};
use crate::leaf::{Leaf, normal_serial_hex};
use crate::wire::JoinResponse;

/// The file's name in the identity directory.
pub const FILE: &str = "agent.json";

/// `agent.json` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// There is none: the directory was not written by a join of this agent.
    #[error(
        "{} is missing: join with this agent (`mesh bootstrap join --out {}`) first",
        .path.display(),
        .dir.display()
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// It cannot be read, parsed or written.
    #[error(transparent)]
    File(#[from] JsonFileError),
}

/// The contents of `agent.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The gateway, `https://host:port`.
    pub gateway: String,
    /// The node's name (the CN of its CSRs).
    pub node_name: String,
    /// The SPIFFE ID of the current SVID.
    pub spiffe_id: String,
    /// Its serial, hex.
    pub serial: String,
    /// Validity start, Unix seconds.
    pub not_before: u64,
    /// Validity end, Unix seconds.
    pub not_after: u64,
    /// The gateway's hint: renew at this time, Unix seconds.
    pub renew_after: u64,
}

impl AgentRecord {
    /// The record of an SVID the gateway just issued.
    pub fn new(gateway: &str, node_name: &str, response: &JoinResponse) -> Self {
        Self {
            gateway: gateway.to_string(),
            node_name: node_name.to_string(),
            spiffe_id: response.spiffe_id.clone(),
            serial: response.serial.clone(),
            not_before: response.not_before,
            not_after: response.not_after,
            renew_after: response.renew_after,
        }
    }

    /// Reads `DIR/agent.json`.
    pub fn load(dir: &Path) -> Result<Self, RecordError> {
        let path = dir.join(FILE);
        json_file::read(&path)?.ok_or_else(|| RecordError::Missing {
            path,
            dir: dir.to_path_buf(),
        })
    }

    /// Writes `DIR/agent.json` atomically, 0644.
    pub fn store(&self, dir: &Path) -> Result<(), RecordError> {
        Ok(json_file::write(&dir.join(FILE), self)?)
    }

    /// The gateway's `renew_after` hint, if this record describes `leaf` (a record left behind
    /// by a crash between the SVID and the record describes another one: no hint then).
    pub fn hint_for(&self, leaf: &Leaf) -> Option<SystemTime> {
        (normal_serial_hex(&self.serial) == leaf.serial)
            .then(|| UNIX_EPOCH + Duration::from_secs(self.renew_after))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testutil::TempDir;
    use crate::wire::PolicyVersion;

    fn response(serial: &str) -> JoinResponse {
        JoinResponse {
            spiffe_id: "spiffe://td.example/node/n1".into(),
            serial: serial.into(),
            not_before: 100,
            not_after: 200,
            renew_after: 170,
            certificate_chain: String::new(),
            bundle: String::new(),
            policy: PolicyVersion {
                name: "p".into(),
                version: "1".into(),
            },
        }
    }

    #[test]
    fn round_trips_public_and_atomic() {
        let tmp = TempDir::new("record");
        assert!(matches!(
            AgentRecord::load(tmp.path()),
            Err(RecordError::Missing { .. })
        ));
        let record = AgentRecord::new("https://gw.example:8443", "n1", &response("008a01"));
        record.store(tmp.path()).unwrap();
        assert_eq!(AgentRecord::load(tmp.path()).unwrap(), record);
        let mode = std::fs::metadata(tmp.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        std::fs::write(tmp.path().join(FILE), b"{").unwrap();
        assert!(matches!(
            AgentRecord::load(tmp.path()),
            Err(RecordError::File(JsonFileError::Parse { .. }))
        ));
    }

    #[test]
    fn the_hint_counts_only_for_the_certificate_it_was_given_with() {
        let record = AgentRecord::new("https://gw", "n1", &response("008A01"));
        let leaf = |serial: &str| Leaf {
            serial: serial.into(),
            spiffe_id: None,
            not_before: 100,
            not_after: 200,
            public_key: Vec::new(),
        };
        assert_eq!(
            record.hint_for(&leaf("8a01")),
            Some(UNIX_EPOCH + Duration::from_secs(170))
        );
        assert_eq!(record.hint_for(&leaf("8a02")), None);
    }
}
