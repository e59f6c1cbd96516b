//! Device attestation (`x509pop`) end to end: the node CLI signs with a device certificate that
//! chains to a configured device CA, and the `posture` policy admits only verified secure boot.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failed unwrap is a failed test"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use omnirelay_e2e::*;

/// A device CA and one device certificate (CN `sec-1`, the node it may join as) written under
/// `dir`.
fn device_pki(dir: &Path, name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} device CA"));
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let device_key = rcgen::KeyPair::generate().unwrap();
    let mut device = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    device
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sec-1");
    device.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let device_cert = device.signed_by(&device_key, &issuer).unwrap();

    let write = |file: &str, text: &str, mode: u32| {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.to_str().unwrap().to_string()
    };
    (
        write(&format!("{name}-ca.pem"), &ca_cert.pem(), 0o644),
        write(&format!("{name}-device.pem"), &device_cert.pem(), 0o644),
        write(
            &format!("{name}-device.key"),
            &device_key.serialize_pem(),
            0o600,
        ),
    )
}

fn join(gw: &Gateway, token: &str, node: &str, extra: &[&str]) -> (bool, String) {
    let token_file = gw.path(&format!("{node}.token"));
    std::fs::write(&token_file, token).unwrap();
    let out_dir = gw.path(&format!("out-{node}"));
    let gateway = format!("https://{}", gw.node_addr);
    let ca = gw.path("ca/ca.pem");
    let mut args = vec![
        "mesh",
        "bootstrap",
        "join",
        "--gateway",
        &gateway,
        "--token-file",
        token_file.to_str().unwrap(),
        "--ca-bundle",
        ca.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--node-name",
        node,
        "--attempts",
        "1",
    ];
    args.extend_from_slice(extra);
    let out = omnirelay(&args).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_verified_secure_boot_joins_the_secure_cluster_and_nothing_less_does() {
    let pki = TempDir::new("device-pki");
    let (trusted_ca, device_cert, device_key) = device_pki(&pki.0, "trusted");
    let (_, rogue_cert, rogue_key) = device_pki(&pki.0, "rogue");
    let gw = Gateway::start_with("x509pop", |toml| {
        toml.push_str(&format!(
            "\n[attestation]\ndevice_cas = [\"{trusted_ca}\"]\n"
        ));
    });

    // Verified: the device certificate chains to the configured CA and signed secure-boot.
    let token = gw.issue_token("secure", "dispatcher", 4).await;
    let device = [
        "--device-cert",
        device_cert.as_str(),
        "--device-key",
        device_key.as_str(),
    ];
    let (ok, out) = join(
        &gw,
        &token.token,
        "sec-1",
        &[&device[..], &["--claim", "secure-boot=true"]].concat(),
    );
    assert!(ok, "{out}");
    let want = format!("spiffe://{TRUST_DOMAIN}/cluster/secure/role/dispatcher/node/sec-1");
    assert!(out.contains(&format!("joined as {want}")), "{out}");
    let issued = gw.wait_for_audit("identity-issued", |e| e["spiffe_id"] == want);
    assert_eq!(issued["policy"]["name"], "posture");

    // The same claim without device attestation is only self-reported: refused by the policy.
    let (ok, out) = join(&gw, &token.token, "sec-2", &["--claim", "secure-boot=true"]);
    assert!(
        !ok && out.contains("stage policy") && out.contains("attestation-kind"),
        "{out}"
    );
    assert!(
        out.contains("this gateway requires device attestation"),
        "{out}"
    );

    // The same device under another node's name: the name is the device certificate's.
    let (ok, out) = join(
        &gw,
        &token.token,
        "sec-9",
        &[&device[..], &["--claim", "secure-boot=true"]].concat(),
    );
    assert!(
        !ok && out.contains("stage attestation") && out.contains("node-not-device"),
        "{out}"
    );

    // Device attestation that reports secure boot off.
    let (ok, out) = join(
        &gw,
        &token.token,
        "sec-1",
        &[&device[..], &["--claim", "secure-boot=false"]].concat(),
    );
    assert!(!ok && out.contains("posture-requirement"), "{out}");

    // A device certificate from a CA the gateway does not trust.
    let rogue = [
        "--device-cert",
        rogue_cert.as_str(),
        "--device-key",
        rogue_key.as_str(),
        "--claim",
        "secure-boot=true",
    ];
    let (ok, out) = join(&gw, &token.token, "sec-4", &rogue);
    assert!(
        !ok && out.contains("stage attestation") && out.contains("untrusted-device"),
        "{out}"
    );

    // Only the first join consumed a use.
    let tokens = gw.admin().get("/admin/v1/tokens").await.unwrap();
    let list: serde_json::Value = serde_json::from_slice(&tokens.body).unwrap();
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == token.id)
        .unwrap();
    assert_eq!(mine["uses"], 1);
}

#[test]
fn the_gateway_refuses_to_start_with_a_key_others_can_read() {
    let dir = init_state("open-key");
    let key = dir.0.join("ca/ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.0.join("gateway.toml");
    let out = omnirelay(&["serve", "--config", config.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ca.key") && stderr.contains("accessible by group or others"),
        "{stderr}"
    );
    let check = omnirelay(&["check-config", "--config", config.to_str().unwrap()]).unwrap();
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("identity.ca_key"));
}
