//! The SDK against a server that breaks the protocol: a peer with a valid
//! certificate from the client's CA whose replies are not what a Quasar
//! server sends. Each gets its documented error; none is taken for a
//! transport failure and retried.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quasar_certs::{CertificateAuthority, Validity};
use quasar_client::{CallError, Client, ClientConfig, ProtocolError, StatusCode};
use quasar_transport::frame::FrameError;
use quasar_transport::socket::{self, DEFAULT_BUFFER};
use quasar_transport::tls::{self, QuicTuning};
use quasar_transport::wire::encode_response_frame;
use quasar_transport::{ResponseHeader, Timings};

/// A bare quinn server on 127.0.0.1 with Quasar's TLS and QUIC
/// configuration and a certificate from `ca`, accepting `ca`'s clients.
pub(crate) fn tls_server(ca: &CertificateAuthority) -> quinn::Endpoint {
    let id = ca
        .issue_server(
            &["localhost".into()],
            &[Ipv4Addr::LOCALHOST.into()],
            Validity::default(),
        )
        .expect("server certificate");
    let crypto = tls::server_crypto(
        tls::certs_from_pem(id.cert_pem.as_bytes(), "server").expect("chain"),
        tls::key_from_pem(id.key_pem.as_bytes()).expect("key"),
        tls::roots_from_pem(ca.cert_pem().as_bytes()).expect("roots"),
        Vec::new(),
    )
    .expect("crypto");
    let tuning = QuicTuning::default();
    let config = tls::server_config(crypto, &tuning).expect("config");
    let (sock, _) =
        socket::bind_udp((Ipv4Addr::LOCALHOST, 0).into(), DEFAULT_BUFFER).expect("bind");
    quinn::Endpoint::new(
        tuning.endpoint_config(),
        Some(config),
        sock,
        quinn::default_runtime().expect("tokio"),
    )
    .expect("endpoint")
}

/// A server that answers every stream with `reply`, after reading the
/// request to its end; a client configuration for it; and the number of
/// streams it has been sent.
async fn answering(reply: Bytes) -> (quinn::Endpoint, ClientConfig, Arc<AtomicU64>) {
    let ca = CertificateAuthority::generate("hostile CA").expect("ca");
    let endpoint = tls_server(&ca);
    let addr = endpoint.local_addr().expect("addr");
    let ep = endpoint.clone();
    let streams = Arc::new(AtomicU64::new(0));
    let counted = streams.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let reply = reply.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let reply = reply.clone();
                    tokio::spawn(async move {
                        let _ = recv.read_to_end(usize::MAX).await;
                        let _ = send.write_all(&reply).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    let client = ca
        .issue_client("victim", Validity::default())
        .expect("client certificate");
    let config = ClientConfig::new(
        addr,
        "localhost",
        ca.cert_pem().as_bytes().to_vec(),
        client.cert_pem.into_bytes(),
        client.key_pem.into_bytes(),
    );
    (endpoint, config, streams)
}

/// The error a ping gets from a server answering `reply`, and how many
/// streams the client opened for it (retries would open more).
async fn ping_error(reply: Bytes) -> (CallError, u64) {
    let (server, config, streams) = answering(reply).await;
    let client = Client::connect(config).await.expect("connect");
    let e = client.ping().await.expect_err("a broken reply");
    let streams = streams.load(Ordering::Relaxed);
    client.close().await;
    server.close(0u32.into(), b"done");
    (e, streams)
}

fn reply(status: u16, message: &str) -> Bytes {
    let header = ResponseHeader {
        status,
        message: message.into(),
        buffers: Vec::new(),
        timings: Timings::default(),
    };
    encode_response_frame(&header, &[]).expect("encode")
}

#[tokio::test]
async fn a_status_from_a_newer_server_keeps_its_number_and_message() {
    let (e, _) = ping_error(reply(99, "a code from the future")).await;
    match &e {
        CallError::Protocol(ProtocolError::UnknownStatus { code, message }) => {
            assert_eq!(*code, 99);
            assert_eq!(message, "a code from the future");
        }
        other => panic!("expected an unknown status, got {other:?}"),
    }
    assert_eq!(e.code(), StatusCode::Internal);
    assert!(!e.is_retryable() && !e.is_transport(), "{e}");
    assert!(e.to_string().contains("a code from the future"), "{e}");
}

#[tokio::test]
async fn another_protocol_version_is_a_protocol_error_not_a_lost_connection() {
    let mut bytes = reply(StatusCode::Ok.as_u16(), "").to_vec();
    // The version, right after the magic (PROTOCOL.md, frame prefix).
    bytes[4..6].copy_from_slice(&999u16.to_le_bytes());
    let (e, streams) = ping_error(bytes.into()).await;
    assert!(
        matches!(
            e,
            CallError::Protocol(ProtocolError::Frame(FrameError::UnsupportedVersion { .. }))
        ),
        "{e:?}"
    );
    assert_eq!(e.code(), StatusCode::Internal);
    assert!(!e.is_retryable() && !e.is_transport(), "{e}");
    assert_eq!(streams, 1, "a protocol error must not be retried");
}

#[tokio::test]
async fn a_reply_over_the_client_limits_is_resource_exhausted() {
    let mut bytes = reply(StatusCode::Ok.as_u16(), "").to_vec();
    // The payload length, the prefix's last eight bytes: far over the
    // client's default limit, and never sent.
    bytes[12..20].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let (e, _) = ping_error(bytes.into()).await;
    assert!(
        matches!(
            e,
            CallError::Protocol(ProtocolError::Frame(FrameError::PayloadTooLarge { .. }))
        ),
        "{e:?}"
    );
    assert_eq!(e.code(), StatusCode::ResourceExhausted);
    assert!(!e.is_retryable(), "{e}");
}
