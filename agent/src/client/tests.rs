//! The client against a real rustls server on loopback that demands a client certificate from
//! the same CA, as the gateway's renewal listener does: what the handshake carries is tested,
//! not the gateway's answers.

use std::sync::Arc;

use hyper::service::service_fn;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;

use super::*;

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Self {
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `san` (an IP address or a `spiffe://` URI), PEM certificate and key.
    fn leaf(&self, san: SanType) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![san];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Serves HTTP/1.1 over TLS requiring a client certificate from `pki`'s CA; reports the leaf
/// each accepted connection presented.
async fn mtls_server(pki: &Pki) -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (cert, key) = pki.leaf(SanType::IpAddress([127, 0, 0, 1].into()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap(),
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (seen, presented) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            let _ = seen.send(leaf);
            let service = service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service),
            );
        }
    });
    (url, presented)
}

#[tokio::test]
async fn the_client_identity_is_presented_in_the_handshake() {
    let pki = Pki::new();
    let (url, mut presented) = mtls_server(&pki).await;
    let (node_cert, node_key) = pki.leaf(SanType::URI(
        "spiffe://td.example/node/n1".try_into().unwrap(),
    ));
    let client = GatewayClient::new(&url, pki.ca_pem.as_bytes())
        .unwrap()
        .with_client_identity(node_cert.as_bytes(), node_key.as_bytes())
        .unwrap();
    let reply = client.get("/v1/bundle").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"ok");
    let expected = CertificateDer::from_pem_slice(node_cert.as_bytes()).unwrap();
    assert_eq!(presented.recv().await.unwrap(), expected.to_vec());
    assert_eq!(client.url(), url);
}

#[tokio::test]
async fn without_an_identity_a_server_demanding_one_refuses_the_handshake() {
    let pki = Pki::new();
    let (url, _presented) = mtls_server(&pki).await;
    let client = GatewayClient::new(&url, pki.ca_pem.as_bytes()).unwrap();
    let err = client.get("/v1/bundle").await.unwrap_err();
    assert!(matches!(err, AgentError::Transport(_)), "{err}");
}

#[test]
fn an_identity_without_a_certificate_or_with_a_bad_key_is_refused() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf(SanType::URI("spiffe://td.example/n".try_into().unwrap()));
    let client = || GatewayClient::new("https://127.0.0.1:1", pki.ca_pem.as_bytes()).unwrap();
    assert!(matches!(
        client().with_client_identity(b"", key.as_bytes()),
        Err(AgentError::Usage(_))
    ));
    let err = client()
        .with_client_identity(
            cert.as_bytes(),
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap_err();
    assert!(matches!(err, AgentError::Usage(_)), "{err}");
    assert!(
        !err.to_string().contains("AAAA"),
        "key bytes never shown: {err}"
    );
}
