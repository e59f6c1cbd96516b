//! SSH signatures (OpenSSH `PROTOCOL.sshsig`, what `git commit -S` with `gpg.format=ssh`
//! writes), verified in-process against an `allowed_signers` file. Ed25519 keys only.
//! Signing, for `policy publish`, uses an Ed25519 PKCS#8 key.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha512};

mod allowed;

pub use allowed::AllowedSigners;

const MAGIC: &[u8] = b"SSHSIG";
const BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";
const END: &str = "-----END SSH SIGNATURE-----";
const KEY_TYPE: &str = "ssh-ed25519";
/// The namespace git signs commits in.
pub const GIT_NAMESPACE: &str = "git";

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// The commit carries no signature.
    #[error("the commit is not signed")]
    Unsigned,
    /// Not an armored SSH signature, or its fields do not parse.
    #[error("malformed SSH signature: {0}")]
    Malformed(&'static str),
    /// Signed for another purpose.
    #[error("signature namespace is {0:?}, expected \"git\"")]
    Namespace(String),
    /// A key type other than Ed25519.
    #[error("unsupported signature key type {0:?} (ssh-ed25519 only)")]
    KeyType(String),
    /// The key is not in `allowed_signers`.
    #[error("signed by a key not in allowed_signers")]
    UnknownSigner,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A line of `allowed_signers` does not parse.
    #[error("allowed_signers line {line}: {why}")]
    AllowedSigners {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// A line is a `cert-authority`: only plain keys are supported, and skipping the option
    /// would trust the CA key itself as a signer.
    #[error(
        "allowed_signers line {line}: option \"cert-authority\" is not supported \
         (only plain ssh-ed25519 keys may sign policy commits)"
    )]
    CertAuthority {
        /// 1-based line number.
        line: usize,
    },
    /// A line carries an option this gateway does not know, so cannot honour.
    #[error("allowed_signers line {line}: unknown option {option:?}")]
    UnknownOption {
        /// 1-based line number.
        line: usize,
        /// The option's name (at most 64 characters of it).
        option: String,
    },
    /// The signer's line does not allow the signature's namespace.
    #[error("{principals}: the allowed_signers line does not allow namespace {namespace:?}")]
    NamespaceNotAllowed {
        /// The line's principals.
        principals: String,
        /// The namespace signed in.
        namespace: String,
    },
    /// The signer's `valid-after` is later than the time checked.
    #[error("{principals}: key valid only after {valid_after} (Unix time), checked at {at}")]
    NotYetValid {
        /// The line's principals.
        principals: String,
        /// Its `valid-after`, Unix seconds.
        valid_after: i64,
        /// The time checked, Unix seconds.
        at: i64,
    },
    /// The signer's `valid-before` is earlier than the time checked.
    #[error("{principals}: key valid only before {valid_before} (Unix time), checked at {at}")]
    Expired {
        /// The line's principals.
        principals: String,
        /// Its `valid-before`, Unix seconds.
        valid_before: i64,
        /// The time checked, Unix seconds.
        at: i64,
    },
}

impl AllowedSigners {
    /// Verifies an armored signature over `message` in the git namespace, by a key whose
    /// `allowed_signers` line allows it at every one of `times` (Unix seconds: `ssh-keygen -Y
    /// verify` checks one, the time git passes as `-Overify-time`); returns the principals.
    pub fn verify(&self, armored: &str, message: &[u8], times: &[i64]) -> Result<&str, SigError> {
        let blob = dearmor(armored)?;
        let mut r = Reader(&blob);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(SigError::Malformed("no SSHSIG preamble"));
        }
        if r.u32()? != 1 {
            return Err(SigError::Malformed("unknown version"));
        }
        let public_key = r.string()?;
        let namespace = r.string()?;
        let reserved = r.string()?;
        let hash = r.string()?;
        let signature = r.string()?;
        if namespace != GIT_NAMESPACE.as_bytes() {
            return Err(SigError::Namespace(
                String::from_utf8_lossy(namespace).into_owned(),
            ));
        }
        let digest = match hash {
            b"sha512" => Sha512::digest(message).to_vec(),
            b"sha256" => sha2::Sha256::digest(message).to_vec(),
            _ => return Err(SigError::Malformed("unknown hash algorithm")),
        };
        let raw_key = ed25519_key(public_key)?;
        let mut sig = Reader(signature);
        let sig_type = sig.string()?;
        if sig_type != KEY_TYPE.as_bytes() {
            return Err(SigError::KeyType(
                String::from_utf8_lossy(sig_type).into_owned(),
            ));
        }
        let sig_bytes = sig.string()?;
        let signed = signed_data(namespace, reserved, hash, &digest);
        UnparsedPublicKey::new(&ED25519, raw_key)
            .verify(&signed, sig_bytes)
            .map_err(|_| SigError::BadSignature)?;
        self.authorize(public_key, GIT_NAMESPACE, times)
    }
}

/// The SSH public key blob (`string "ssh-ed25519" || string key`) of an Ed25519 key pair.
pub fn public_key_blob(pair: &Ed25519KeyPair) -> Vec<u8> {
    let mut blob = Vec::new();
    put_string(&mut blob, KEY_TYPE.as_bytes());
    put_string(&mut blob, pair.public_key().as_ref());
    blob
}

/// Signs `message` in the git namespace (sha512), returning the armored signature git stores.
pub fn sign(pair: &Ed25519KeyPair, message: &[u8]) -> String {
    let digest = Sha512::digest(message);
    let signed = signed_data(GIT_NAMESPACE.as_bytes(), b"", b"sha512", &digest);
    let mut sig = Vec::new();
    put_string(&mut sig, KEY_TYPE.as_bytes());
    put_string(&mut sig, pair.sign(&signed).as_ref());
    let mut blob = MAGIC.to_vec();
    blob.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut blob, &public_key_blob(pair));
    put_string(&mut blob, GIT_NAMESPACE.as_bytes());
    put_string(&mut blob, b"");
    put_string(&mut blob, b"sha512");
    put_string(&mut blob, &sig);
    let body = STANDARD.encode(blob);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(70)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!("{BEGIN}\n{}\n{END}", lines.join("\n"))
}

fn signed_data(namespace: &[u8], reserved: &[u8], hash: &[u8], digest: &[u8]) -> Vec<u8> {
    let mut data = MAGIC.to_vec();
    put_string(&mut data, namespace);
    put_string(&mut data, reserved);
    put_string(&mut data, hash);
    put_string(&mut data, digest);
    data
}

fn ed25519_key(blob: &[u8]) -> Result<&[u8], SigError> {
    let mut r = Reader(blob);
    let kind = r.string()?;
    if kind != KEY_TYPE.as_bytes() {
        return Err(SigError::KeyType(
            String::from_utf8_lossy(kind).into_owned(),
        ));
    }
    let key = r.string()?;
    if key.len() != 32 {
        return Err(SigError::Malformed("Ed25519 key is not 32 bytes"));
    }
    Ok(key)
}

fn dearmor(armored: &str) -> Result<Vec<u8>, SigError> {
    let text = armored.trim();
    let body = text
        .strip_prefix(BEGIN)
        .and_then(|t| t.strip_suffix(END))
        .ok_or(SigError::Malformed("not an armored SSH signature"))?;
    let joined: String = body.split_whitespace().collect();
    STANDARD
        .decode(joined)
        .map_err(|_| SigError::Malformed("body is not base64"))
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SigError> {
        if self.0.len() < n {
            return Err(SigError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, SigError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<&'a [u8], SigError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;

    fn pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn our_signatures_verify_and_name_the_signer() {
        let (alice, mallory) = (pair(), pair());
        let signers = AllowedSigners::parse(&format!(
            "# CI keys\n{}\n",
            AllowedSigners::line("ci@omnirelay", &public_key_blob(&alice))
        ))
        .unwrap();
        let sig = sign(&alice, b"tree 1234\n\nv2\n");
        assert_eq!(
            signers.verify(&sig, b"tree 1234\n\nv2\n", &[NOW]),
            Ok("ci@omnirelay")
        );
        assert_eq!(
            signers.verify(&sig, b"tree 1234\n\nv3\n", &[NOW]),
            Err(SigError::BadSignature)
        );
        let forged = sign(&mallory, b"tree 1234\n\nv2\n");
        assert_eq!(
            signers.verify(&forged, b"tree 1234\n\nv2\n", &[NOW]),
            Err(SigError::UnknownSigner)
        );
        assert!(matches!(
            signers.verify("not a signature", b"", &[NOW]),
            Err(SigError::Malformed(_))
        ));
    }

    /// A time inside every window the tests write (2026-11-29).
    pub(super) const NOW: i64 = 1_796_000_000;

    /// The message every `ssh-keygen` signature in these tests covers.
    pub(super) const MESSAGE: &[u8] = b"tree 89ab\nauthor ci\n\npolicy v2\n";

    /// A fresh key signs [`MESSAGE`] with `ssh-keygen -Y sign -n namespace`: returns the
    /// armored signature and the public key line (`ssh-ed25519 AAAA… comment`).
    pub(super) fn ssh_keygen_signature(name: &str, namespace: &str) -> (String, String) {
        let dir =
            std::env::temp_dir().join(format!("omnirelay-sshsig-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("id_ed25519");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(status.success());
        let message = dir.join("message");
        std::fs::write(&message, MESSAGE).unwrap();
        let status = std::process::Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", namespace, "-f"])
            .arg(&key)
            .arg(&message)
            .status()
            .unwrap();
        assert!(status.success());
        let sig = std::fs::read_to_string(dir.join("message.sig")).unwrap();
        let public = std::fs::read_to_string(dir.join("id_ed25519.pub")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (sig, public.trim().to_string())
    }

    /// `ssh-keygen -Y sign` is the oracle: what OpenSSH (and so git) writes must verify.
    #[test]
    fn signatures_made_by_ssh_keygen_verify() {
        let (sig, public) = ssh_keygen_signature("oracle", "git");
        let signers =
            AllowedSigners::parse(&format!("ci@omnirelay namespaces=\"git\" {public}")).unwrap();
        assert_eq!(signers.verify(&sig, MESSAGE, &[NOW]), Ok("ci@omnirelay"));
        assert_eq!(
            signers.verify(&sig, b"tampered", &[NOW]),
            Err(SigError::BadSignature)
        );
    }

    #[test]
    fn other_namespaces_are_refused() {
        let alice = pair();
        let signers =
            AllowedSigners::parse(&AllowedSigners::line("a", &public_key_blob(&alice))).unwrap();
        // Re-sign the same message claiming the "file" namespace.
        let digest = Sha512::digest(b"m");
        let signed = signed_data(b"file", b"", b"sha512", &digest);
        let mut sig = Vec::new();
        put_string(&mut sig, KEY_TYPE.as_bytes());
        put_string(&mut sig, alice.sign(&signed).as_ref());
        let mut blob = MAGIC.to_vec();
        blob.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut blob, &public_key_blob(&alice));
        put_string(&mut blob, b"file");
        put_string(&mut blob, b"");
        put_string(&mut blob, b"sha512");
        put_string(&mut blob, &sig);
        let armored = format!("{BEGIN}\n{}\n{END}", STANDARD.encode(blob));
        assert_eq!(
            signers.verify(&armored, b"m", &[NOW]),
            Err(SigError::Namespace("file".into()))
        );
    }
}
