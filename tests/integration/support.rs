//! Helpers: a real server on 127.0.0.1:0, clients for it, and a raw stream
//! for sending bytes the SDK would never send.

use quasar::embedded::EmbeddedServer;
use quasar_client::{Client, ClientConfig};
use quasar_server::ServerConfig;
use quasar_transport::frame::FrameKind;
use quasar_transport::io::{read_aligned, read_frame};
use quasar_transport::tls::{self, QuicTuning};
use quasar_transport::wire::access_response;
use quasar_transport::{Limits, StatusCode};

/// A server with the default configuration.
pub async fn server() -> EmbeddedServer {
    server_with(|_| {}).await
}

/// A server with a changed configuration.
pub async fn server_with(configure: impl FnOnce(&mut ServerConfig)) -> EmbeddedServer {
    match EmbeddedServer::start(configure).await {
        Ok(s) => s,
        Err(e) => panic!("the test server did not start: {e}"),
    }
}

/// A connected SDK client with a fresh certificate.
pub async fn client(server: &EmbeddedServer) -> Client {
    Client::connect(config(server))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// A client configuration with a fresh certificate.
pub fn config(server: &EmbeddedServer) -> ClientConfig {
    server
        .client_config("tester")
        .unwrap_or_else(|e| panic!("issue: {e}"))
}

/// A raw quinn connection with a valid client certificate.
pub async fn raw_connection(server: &EmbeddedServer) -> (quinn::Endpoint, quinn::Connection) {
    let id = server.issue_client("raw").expect("issue");
    let quic = tls::client_config(
        tls::roots_from_pem(&server.ca_pem()).expect("roots"),
        tls::certs_from_pem(id.cert_pem.as_bytes(), "cert").expect("cert"),
        tls::key_from_pem(id.key_pem.as_bytes()).expect("key"),
        &QuicTuning::default(),
    )
    .expect("client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    endpoint.set_default_client_config(quic);
    let conn = endpoint
        .connect(server.addr(), quasar::embedded::SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, conn)
}

/// Sends `bytes` on a new stream, finishes it, and returns the status and
/// message of the reply.
pub async fn raw_call(conn: &quinn::Connection, bytes: &[u8]) -> (StatusCode, String) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    // The server may stop reading early (STOP_SENDING); its reply still comes.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let (prefix, header) = read_frame(&mut recv, FrameKind::Response, &Limits::default())
        .await
        .expect("a reply frame");
    let archived = access_response(&header).expect("a valid reply");
    let code = StatusCode::from_u16(archived.status.to_native()).expect("known status");
    let message = archived.message.as_str().to_owned();
    let _payload = read_aligned(&mut recv, prefix.payload_len, "payload")
        .await
        .expect("payload");
    (code, message)
}

/// Asserts that a fresh client can still make a correct call.
pub async fn assert_serving(server: &EmbeddedServer) {
    let c = client(server).await;
    let r = c
        .execute(
            quasar_client::Call::new("add")
                .input("a", &[1.0f32, 2.0])
                .input("b", &[10.0f32, 20.0]),
        )
        .await
        .expect("the server must keep serving");
    assert_eq!(r.output::<f32>("out").expect("out"), &[11.0, 22.0]);
    c.close().await;
}
