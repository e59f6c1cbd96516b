//! Fresh leaf certificate parameters and the time and encoding helpers issuance shares. Promises
//! that leaf parameters are built from nothing but the caller's grant: empty subject, CA:false,
//! the given SANs, the given key usages, serverAuth + clientAuth, a random serial, and an
//! authority key identifier.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

use super::error::IdentityError;
use super::serial::Serial;
use super::spiffe::SpiffeId;

/// Fresh leaf parameters; nothing in them comes from a CSR.
pub(super) fn leaf_params(
    subject_alt_names: Vec<SanType>,
    key_usages: Vec<KeyUsagePurpose>,
    serial: Serial,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    // Empty subject: rcgen then marks the SAN extension critical, as X.509-SVID wants.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = subject_alt_names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = key_usages;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    params.not_before = datetime(not_before)?;
    params.not_after = datetime(not_after)?;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The SPIFFE ID first, then each distinct DNS name (validated), then the IP addresses.
pub(super) fn subject_alt_names(
    spiffe_id: &SpiffeId,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<Vec<SanType>, IdentityError> {
    let mut sans = vec![SanType::URI(ia5(spiffe_id.to_string())?)];
    for name in dns {
        if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
            return Err(IdentityError::InvalidDnsName(name.clone()));
        }
        let san = SanType::DnsName(ia5(name.clone())?);
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    Ok(sans)
}

pub(super) fn ia5(s: String) -> Result<Ia5String, IdentityError> {
    Ia5String::try_from(s).map_err(IdentityError::Signing)
}

pub(super) fn unix_secs(t: SystemTime) -> Result<i64, IdentityError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| IdentityError::TimeOutOfRange)?
        .as_secs();
    i64::try_from(secs).map_err(|_| IdentityError::TimeOutOfRange)
}

pub(super) fn checked_add(t: i64, d: Duration) -> Result<i64, IdentityError> {
    i64::try_from(d.as_secs())
        .ok()
        .and_then(|d| t.checked_add(d))
        .ok_or(IdentityError::TimeOutOfRange)
}

pub(super) fn checked_sub(t: i64, d: Duration) -> Result<i64, IdentityError> {
    i64::try_from(d.as_secs())
        .ok()
        .and_then(|d| t.checked_sub(d))
        .ok_or(IdentityError::TimeOutOfRange)
}

pub(super) fn datetime(unix: i64) -> Result<OffsetDateTime, IdentityError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| IdentityError::TimeOutOfRange)
}

/// Unix seconds to `SystemTime`; times before 1970 (never issued) clamp to the epoch.
pub(super) fn to_system_time(unix: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

/// PEM with 64-column base64 lines and LF endings, as rcgen writes it.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
