//! A raw QUIC echo over the same mutual-TLS configuration as Quasar: the
//! transport floor that `quasar bench --compare-raw` measures against.
//!
//! Per stream the client sends the number of bytes it wants back (u64 LE)
//! followed by the request payload and finishes; the server discards the
//! payload as it arrives, writes that many bytes, and finishes. No framing,
//! no archive, no GPU: whatever Quasar adds on top is the framework's cost.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use quasar_certs::{CertError, CertificateAuthority, Validity};
use quasar_transport::socket::{self, DEFAULT_BUFFER};
use quasar_transport::tls::{self, QuicTuning, TlsError};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest echo the server sends back.
const MAX_ECHO: u64 = 256 * 1024 * 1024;
/// Bytes written per write call.
const CHUNK: usize = 64 * 1024;

/// Why the echo server or client failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RawError {
    /// Certificates could not be made.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A socket could not be bound.
    #[error("binding: {0}")]
    Io(#[from] std::io::Error),
    /// Connecting failed.
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream was already closed.
    #[error("stream closed")]
    Closed(#[from] quinn::ClosedStream),
}

/// An echo server on 127.0.0.1, running until [`RawEchoServer::stop`].
#[derive(Debug)]
pub struct RawEchoServer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

fn runtime() -> Result<Arc<dyn quinn::Runtime>, RawError> {
    quinn::default_runtime()
        .ok_or_else(|| RawError::Io(std::io::Error::other("not inside a tokio runtime")))
}

impl RawEchoServer {
    /// Starts an echo server whose certificate is issued by `ca`, which
    /// accepts clients whose certificates `ca` issued, with the QUIC
    /// `tuning` the Quasar server under test has (a floor measured with
    /// other settings would not be one).
    ///
    /// # Errors
    /// [`RawError`] if certificates or the socket cannot be set up.
    pub async fn start(ca: &CertificateAuthority, tuning: &QuicTuning) -> Result<Self, RawError> {
        let id = ca.issue_server(
            &["localhost".into()],
            &[Ipv4Addr::LOCALHOST.into()],
            Validity::default(),
        )?;
        let crypto = tls::server_crypto(
            tls::certs_from_pem(id.cert_pem.as_bytes(), "echo certificate")?,
            tls::key_from_pem(id.key_pem.as_bytes())?,
            tls::roots_from_pem(ca.cert_pem().as_bytes())?,
            Vec::new(),
        )?;
        let config = tls::server_config(crypto, tuning)?;
        let (sock, _) = socket::bind_udp((Ipv4Addr::LOCALHOST, 0).into(), DEFAULT_BUFFER)?;
        let endpoint =
            quinn::Endpoint::new(tuning.endpoint_config(), Some(config), sock, runtime()?)?;
        let addr = endpoint.local_addr()?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (ep, c, t) = (endpoint.clone(), cancel.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    i = ep.accept() => match i { Some(i) => i, None => break },
                    () = c.cancelled() => break,
                };
                let t2 = t.clone();
                t.spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        t2.spawn(echo_stream(send, recv));
                    }
                });
            }
        });
        Ok(Self {
            endpoint,
            addr,
            cancel,
            tracker,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.endpoint.close(0u32.into(), b"done");
        self.tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.tracker.wait()).await;
    }
}

async fn echo_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut len = [0u8; 8];
    if recv.read_exact(&mut len).await.is_err() {
        return;
    }
    let want = u64::from_le_bytes(len).min(MAX_ECHO);
    // Discard the payload as it arrives.
    while let Ok(Some(_)) = recv.read_chunk(usize::MAX, true).await {}
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut left = want;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        if send.write_all(&ZEROS[..n]).await.is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = send.finish();
}

/// A connection to an echo server.
#[derive(Debug)]
pub struct RawClient {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl RawClient {
    /// Connects to `addr` with a fresh client certificate from `ca` and the
    /// QUIC `tuning` given (the bench gives the datagram size and windows
    /// of the SDK's connections; their keep-alive does not matter here).
    ///
    /// # Errors
    /// [`RawError`] if the handshake fails.
    pub async fn connect(
        addr: SocketAddr,
        ca: &CertificateAuthority,
        tuning: &QuicTuning,
    ) -> Result<Self, RawError> {
        let id = ca.issue_client("raw-echo", Validity::default())?;
        let config = tls::client_config(
            tls::roots_from_pem(ca.cert_pem().as_bytes())?,
            tls::certs_from_pem(id.cert_pem.as_bytes(), "client certificate")?,
            tls::key_from_pem(id.key_pem.as_bytes())?,
            tuning,
        )?;
        let (sock, _) = socket::bind_udp((Ipv4Addr::UNSPECIFIED, 0).into(), DEFAULT_BUFFER)?;
        let mut endpoint = quinn::Endpoint::new(tuning.endpoint_config(), None, sock, runtime()?)?;
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(addr, "localhost")?.await?;
        Ok(Self {
            _endpoint: endpoint,
            conn,
        })
    }

    /// The connection's QUIC statistics.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Sends `payload` and reads back `down` bytes; returns the bytes read.
    ///
    /// # Errors
    /// [`RawError`] if the stream fails.
    pub async fn echo(&self, payload: &[u8], down: u64) -> Result<u64, RawError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(&down.to_le_bytes()).await?;
        send.write_all(payload).await?;
        send.finish()?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            got += chunk.bytes.len() as u64;
        }
        Ok(got)
    }
}
