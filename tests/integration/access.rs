//! Identity-based access: the access policy grants kernels to certificate
//! identities (DNS or URI SANs), a denied call gets PERMISSION_DENIED, and a
//! revoked certificate is refused at the handshake; a connection ends when
//! its certificate expires.

use std::time::Duration;

use quasar::embedded::{EmbeddedServer, SERVER_NAME};
use quasar_certs::{PkiDir, Validity};
use quasar_client::{Call, Client, ClientConfig, StatusCode};
use quasar_server::Policy;
use quasar_transport::CloseCode;

use crate::support::server_with;

fn policy(text: &str) -> Policy {
    toml::from_str(text).expect("policy")
}

async fn connect(server: &EmbeddedServer, name: &str, uris: &[&str]) -> Client {
    let uris: Vec<String> = uris.iter().map(|u| (*u).to_owned()).collect();
    let id = server
        .ca()
        .issue_client_with_uris(name, &uris, Validity::default())
        .expect("issue");
    let config = ClientConfig::new(
        server.addr(),
        SERVER_NAME,
        server.ca_pem(),
        id.cert_pem.into_bytes(),
        id.key_pem.into_bytes(),
    );
    Client::connect(config).await.expect("connect")
}

fn add() -> Call {
    Call::new("add").input("a", &[1.0f32]).input("b", &[2.0f32])
}

fn saxpy() -> Call {
    Call::new("saxpy")
        .arg("a", 2.0f32)
        .input("x", &[1.0f32])
        .input("y", &[1.0f32])
}

#[tokio::test]
async fn the_policy_grants_kernels_to_identities() {
    let server = server_with(|c| {
        c.policy = policy(
            r#"
            default = "deny"
            [[rule]]
            identity = "alice"
            kernels = ["saxpy"]
            [[rule]]
            identity = "spiffe://example.org/ns/team-a/*"
            kernels = ["*"]
            "#,
        )
    })
    .await;

    let alice = connect(&server, "alice", &[]).await;
    let r = alice.execute(saxpy()).await.expect("alice may call saxpy");
    assert_eq!(r.output::<f32>("y").expect("y"), &[3.0]);
    let e = alice
        .execute(add())
        .await
        .expect_err("alice may not call add");
    assert_eq!(e.code(), StatusCode::PermissionDenied, "{e}");
    assert!(
        e.to_string().contains("alice") && e.to_string().contains("`add`"),
        "{e}"
    );
    // Unknown kernels list only what this identity may call.
    let e = alice.execute(Call::new("nope")).await.expect_err("unknown");
    assert_eq!(e.code(), StatusCode::NotFound);
    assert!(
        e.to_string().contains("saxpy") && !e.to_string().contains("matmul"),
        "{e}"
    );

    let bob = connect(&server, "bob", &[]).await;
    let e = bob.execute(saxpy()).await.expect_err("default deny");
    assert_eq!(e.code(), StatusCode::PermissionDenied, "{e}");

    let trainer = connect(
        &server,
        "trainer",
        &["spiffe://example.org/ns/team-a/sa/trainer"],
    )
    .await;
    trainer
        .execute(add())
        .await
        .expect("team-a may call anything");
    let other = connect(&server, "other", &["spiffe://example.org/ns/team-b/sa/x"]).await;
    let e = other
        .execute(add())
        .await
        .expect_err("team-b is not granted");
    assert_eq!(e.code(), StatusCode::PermissionDenied);

    // A denied call does not disturb the connection.
    alice.execute(saxpy()).await.expect("still serving alice");
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = PkiDir::new(dir.path());
    pki.init(
        &["localhost".into()],
        &["127.0.0.1".parse().expect("ip")],
        &["alice".into(), "bob".into()],
        false,
    )
    .expect("pki");
    pki.revoke("bob").expect("revoke");
    let read = |p: std::path::PathBuf| std::fs::read(p).expect("read");
    let (cert, key, ca, crl) = (
        read(pki.server_cert()),
        read(pki.server_key()),
        read(pki.ca_cert()),
        read(pki.crl()),
    );
    let server = server_with(move |c| {
        c.tls.cert_chain = cert;
        c.tls.key = key;
        c.tls.client_ca = ca;
        c.tls.crls = vec![crl];
    })
    .await;
    let client = |name: &str| {
        ClientConfig::new(
            server.addr(),
            "localhost",
            read(pki.ca_cert()),
            read(pki.client_cert(name)),
            read(pki.client_key(name)),
        )
    };
    let alice = Client::connect(client("alice"))
        .await
        .expect("alice connects");
    alice.execute(add()).await.expect("alice is served");

    let refused = match Client::connect(client("bob")).await {
        Err(e) => e.to_string(),
        Ok(bob) => bob
            .execute(add())
            .await
            .expect_err("bob is revoked")
            .to_string(),
    };
    assert!(refused.contains("Revoked"), "{refused}");
    alice.execute(add()).await.expect("alice is still served");
    server.stop().await;
}

#[tokio::test]
async fn a_crl_file_without_a_crl_is_refused_at_start() {
    let ca = quasar_certs::CertificateAuthority::generate("ca").expect("ca");
    let pem = ca.cert_pem().as_bytes().to_vec();
    let result = EmbeddedServer::start(move |c| c.tls.crls = vec![pem]).await;
    let err = result.expect_err("a CA given as a CRL must not start a server");
    assert!(err.to_string().contains("no X509 CRL"), "{err}");
}

/// A session does not outlive its certificate: the connection of a
/// certificate that expires while connected is closed with
/// CERTIFICATE_REFUSED, not kept until the client leaves.
#[tokio::test]
async fn a_connection_is_closed_when_its_certificate_expires() {
    let server = server_with(|_| {}).await;
    let id = server
        .ca()
        .issue_client("brief", Validity::lasting(Duration::from_secs(8)))
        .expect("issue");
    let endpoint = crate::support::raw_endpoint(&server.ca_pem(), &id);
    let conn = endpoint
        .connect(server.addr(), SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    // Accepted: a call is answered while the certificate is valid.
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"not a frame").await.expect("write");
    send.finish().expect("finish");
    let _ = recv.read_to_end(1 << 16).await;
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());

    let closed = tokio::time::timeout(Duration::from_secs(30), conn.closed())
        .await
        .expect("closed once the certificate expired");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CloseCode::CertificateRefused.varint());
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("Expired"), "{reason}");
        }
        other => panic!("closed otherwise: {other}"),
    }
    server.stop().await;
}
