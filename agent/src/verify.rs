//! The agent's check of the server it talks to: the usual WebPKI verification against the CA
//! bundle, and then that the certificate is the *gateway's* identity. Node SVIDs chain to the
//! same CA, so the chain alone cannot tell the gateway from a node that got hold of a
//! certificate for a name the agent dials; the SPIFFE ID can (paths under `/omnirelay/` are
//! reserved for the gateway, and no policy can grant them).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Where the gateway's own identities live in its trust domain.
const GATEWAY_PATH: &str = "/omnirelay/";

/// WebPKI verification plus the gateway's SPIFFE ID.
#[derive(Debug)]
pub(crate) struct GatewayVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// `spiffe://<trust domain>/omnirelay/` for each trust domain the bundle's CAs name. Empty
    /// when the bundle is not a SPIFFE bundle (a gateway behind a certificate from another
    /// CA): then only the chain and the name are checked.
    expected_prefixes: Vec<String>,
}

impl GatewayVerifier {
    pub(crate) fn new(
        roots: RootCertStore,
        bundle: &[CertificateDer<'_>],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let expected_prefixes = bundle
            .iter()
            .flat_map(|ca| spiffe_uris(ca))
            .map(|td| format!("{}{GATEWAY_PATH}", td.trim_end_matches('/')))
            .collect();
        Ok(Self {
            inner,
            expected_prefixes,
        })
    }
}

/// The `spiffe://` URI SANs of a certificate.
fn spiffe_uris(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(uri.to_string())
            }
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.expected_prefixes.is_empty() {
            return Ok(verified);
        }
        let ids = spiffe_uris(end_entity);
        if ids
            .iter()
            .any(|id| self.expected_prefixes.iter().any(|p| id.starts_with(p)))
        {
            return Ok(verified);
        }
        Err(rustls::Error::General(format!(
            "the server's certificate is not the gateway's: it names {}, expected an ID under {}",
            if ids.is_empty() {
                "no SPIFFE ID".to_string()
            } else {
                ids.join(", ")
            },
            self.expected_prefixes.join(" or ")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
