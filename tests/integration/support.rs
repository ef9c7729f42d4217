//! Helpers: a real server on 127.0.0.1:0, clients for it, and a raw stream
//! for sending bytes the SDK would never send.

use std::time::{Duration, Instant};

use quasar::embedded::EmbeddedServer;
use quasar_client::{Call, Client, ClientConfig};
use quasar_server::ServerConfig;
use quasar_transport::frame::FrameKind;
use quasar_transport::io::FrameReader;
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
    client_named(server, "tester").await
}

/// A connected SDK client with a fresh certificate naming `name`: a
/// client of its own to the server's per-client bounds.
pub async fn client_named(server: &EmbeddedServer, name: &str) -> Client {
    let config = server
        .client_config(name)
        .unwrap_or_else(|e| panic!("issue {name}: {e}"));
    Client::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect {name}: {e}"))
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
    let endpoint = raw_endpoint(&server.ca_pem(), &id);
    let conn = endpoint
        .connect(server.addr(), quasar::embedded::SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, conn)
}

/// A bare quinn client endpoint on 127.0.0.1 with Quasar's TLS and QUIC
/// configuration, trusting `ca_pem` and presenting `id`. Needs a runtime.
pub fn raw_endpoint(ca_pem: &[u8], id: &quasar_certs::Identity) -> quinn::Endpoint {
    let quic = tls::client_config(
        tls::roots_from_pem(ca_pem).expect("roots"),
        tls::certs_from_pem(id.cert_pem.as_bytes(), "cert").expect("cert"),
        tls::key_from_pem(id.key_pem.as_bytes()).expect("key"),
        &QuicTuning::default(),
    )
    .expect("client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    endpoint.set_default_client_config(quic);
    endpoint
}

/// Sends `bytes` on a new stream, finishes it, and returns the status and
/// message of the reply.
pub async fn raw_call(conn: &quinn::Connection, bytes: &[u8]) -> (StatusCode, String) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    // The server may stop reading early (STOP_SENDING); its reply still comes.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    read_reply(&mut recv).await
}

/// Reads a whole reply frame; returns its status and message.
pub async fn read_reply(recv: &mut quinn::RecvStream) -> (StatusCode, String) {
    let mut reader = FrameReader::new(recv);
    let (prefix, header) = reader
        .head(FrameKind::Response, &Limits::default())
        .await
        .expect("a reply frame");
    let archived = access_response(&header).expect("a valid reply");
    let code = StatusCode::from_u16(archived.status.to_native()).expect("known status");
    let message = archived.message.as_str().to_owned();
    let _payload = reader
        .aligned(prefix.payload_len, "payload")
        .await
        .expect("payload");
    (code, message)
}

/// Waits (at most 10 s) for the server to reset `recv`, and asserts that it
/// did so with `code`.
pub async fn expect_reset(recv: &mut quinn::RecvStream, code: quasar_transport::StreamCode) {
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("the server must not wait this long");
    match read {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(got))) => {
            assert_eq!(got, code.varint(), "reset with {code:?}");
        }
        other => panic!("expected a reset, got {other:?}"),
    }
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

/// A kernel slow on purpose: one invocation spinning `iters` times.
// Slow by the number of workgroups: lavapipe stops any loop of one
// invocation after 65,535 iterations, so the work is spread over
// `iters` workgroups of a fixed, loop-carried chain the compiler cannot fold.
pub const SPIN: &str = r#"// quasar: output out = iters * 64
// quasar: stage main = iters
struct Params { iters: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> seed: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    var x = seed[0] + f32(gid.x);
    for (var i = 0u; i < 60000u; i++) { x = fract(x * 1.0001 + 0.1); }
    out[gid.x] = x;
}
"#;

pub fn spin(iters: u32) -> Call {
    Call::new("spin")
        .arg("iters", iters)
        .input("seed", &[0.5f32])
}

pub async fn spin_server() -> (EmbeddedServer, tempfile::TempDir) {
    spin_server_with(|_| {}).await
}

/// A server with the `spin` kernel and a changed configuration.
pub async fn spin_server_with(
    configure: impl FnOnce(&mut ServerConfig),
) -> (EmbeddedServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("spin.wgsl"), SPIN).expect("write");
    let path = dir.path().to_owned();
    let server = server_with(|c| {
        c.gpu.kernel_dir = Some(path);
        configure(c);
    })
    .await;
    (server, dir)
}

/// Finds an iteration count whose call takes at least 100 ms here (bounded),
/// and returns it with that call's duration.
pub async fn calibrate(client: &quasar_client::Client) -> (u32, Duration) {
    // The first call of a kernel is slow for reasons of its own (the driver
    // compiles on first use); keep it out of the measurement.
    client.execute(spin(1)).await.expect("warm-up");
    let mut iters = 1u32;
    loop {
        let started = Instant::now();
        client.execute(spin(iters)).await.expect("spin");
        let took = started.elapsed();
        if took >= Duration::from_millis(250) || iters >= 16384 {
            return (iters, took);
        }
        iters = iters.saturating_mul(2);
    }
}

/// Polls `cond` every 20 ms until it holds; fails the test, naming
/// `what`, if it does not within 10 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
