//! The handshake is refused without a certificate from the right CA, with an
//! expired one, and when the server's name does not match; a client never
//! accepts a server its CA did not sign.

use std::sync::Arc;

use quasar::embedded::{EmbeddedServer, SERVER_NAME};
use quasar_certs::{CertificateAuthority, Validity};
use quasar_client::{Call, Client, ClientConfig};
use quasar_transport::tls;

use crate::support::{assert_serving, client, server};

/// Connects with `config` and makes a call; returns the error, which must
/// come at the handshake or at the first call.
async fn refused(config: ClientConfig) -> String {
    let client = match Client::connect(config).await {
        Ok(c) => c,
        Err(e) => return format!("connect: {e}"),
    };
    match client
        .execute(Call::new("add").input("a", &[1.0f32]).input("b", &[2.0f32]))
        .await
    {
        Ok(_) => panic!("the call succeeded; the handshake should have been refused"),
        Err(e) => {
            assert!(e.is_transport(), "expected a transport failure, got {e}");
            format!("call: {e}")
        }
    }
}

fn config_with(server: &EmbeddedServer, cert: String, key: String) -> ClientConfig {
    ClientConfig::new(
        server.addr(),
        SERVER_NAME,
        server.ca_pem(),
        cert.into_bytes(),
        key.into_bytes(),
    )
}

#[tokio::test]
async fn a_valid_client_gets_in() {
    let server = server().await;
    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let server = server().await;
    let crypto = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(tls::roots_from_pem(&server.ca_pem()).expect("roots"))
    .with_no_client_auth();
    let mut crypto = crypto;
    crypto.alpn_protocols = vec![quasar_transport::ALPN.to_vec()];
    let quic = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic"),
    ));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    endpoint.set_default_client_config(quic);
    let failed = match endpoint
        .connect(server.addr(), SERVER_NAME)
        .expect("connect")
        .await
    {
        Err(e) => e.to_string(),
        Ok(conn) => {
            let result = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(b"QSAR").await?;
                send.finish()?;
                recv.read_to_end(1024).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            }
            .await;
            result
                .expect_err("a client without a certificate must not be served")
                .to_string()
        }
    };
    assert!(!failed.is_empty());
    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let server = server().await;
    let other = CertificateAuthority::generate("Some other CA").expect("ca");
    let id = other
        .issue_client("mallory", Validity::default())
        .expect("issue");
    let err = refused(config_with(&server, id.cert_pem, id.key_pem)).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let server = server().await;
    let id = server
        .ca()
        .issue_client("old", Validity::expired())
        .expect("issue");
    let err = refused(config_with(&server, id.cert_pem, id.key_pem)).await;
    assert!(err.contains("Expired"), "{err}");
    // The refusal says why, not what time the server thinks it is.
    assert!(
        !err.contains("verification time") && !err.contains("UNIX"),
        "{err}"
    );
    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn client_refuses_a_server_name_mismatch() {
    let server = server().await;
    let mut config = crate::support::config(&server);
    config.server_name = "not-the-server.example".into();
    let err = match Client::connect(config).await {
        Ok(_) => panic!("a server certificate for another name was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not valid for name"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn client_refuses_a_server_signed_by_another_ca() {
    let server = server().await;
    let mut config = crate::support::config(&server);
    let other = CertificateAuthority::generate("Not the server's CA").expect("ca");
    config.ca_pem = other.cert_pem().as_bytes().to_vec();
    let err = match Client::connect(config).await {
        Ok(_) => panic!("a server certificate from an untrusted CA was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("UnknownIssuer"), "{err}");
    drop(client(&server).await);
    server.stop().await;
}
