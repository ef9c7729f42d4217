//! The Quasar SDK: connect once to a Quasar server over QUIC with mutual TLS,
//! then run compute kernels on its GPU from as many tasks as you like.
//!
//! Every call travels on its own QUIC stream, so calls never wait for each
//! other; a [`Client`] is a cheap handle (clone it into each task) on one
//! connection.
//!
//! ```no_run
//! use quasar_client::{Call, Client, ClientConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::from_pem_files(
//!     "127.0.0.1:4433".parse()?,
//!     "localhost",
//!     "pki/ca.pem",
//!     "pki/alice.pem",
//!     "pki/alice.key",
//! )
//! .await?;
//! let client = Client::connect(config).await?;
//!
//! let x = vec![1.0f32, 2.0, 3.0];
//! let y = vec![10.0f32, 20.0, 30.0];
//! let response = client
//!     .execute(Call::new("saxpy").arg("a", 2.0f32).input("x", &x).input("y", &y))
//!     .await?;
//! assert_eq!(response.output::<f32>("y")?, &[12.0, 24.0, 36.0]);
//! println!("GPU time: {} us", response.timings().gpu_us);
//! # Ok(())
//! # }
//! ```
//!
//! A runnable version, which starts its own server, is `examples/sdk.rs` at
//! the root of the workspace (`cargo run --example sdk`).
//!
//! # Layout
//! - this file: [`ClientConfig`], [`Client`] and the call path.
//! - [`call`]: [`Call`] (what to run) and [`Response`] (typed outputs and
//!   server timings).
//! - [`error`]: [`ConnectError`], [`CallError`], [`OutputError`].
//!
//! # Errors
//! A call fails with [`CallError::Status`] when the server refused or failed
//! it (its [`StatusCode`] and message), with a transport variant when the
//! connection or stream broke, and with [`CallError::DeadlineExceeded`] when
//! the call's own deadline passed on the client's clock.

pub mod call;
pub mod error;

use std::borrow::Borrow;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};

use quasar_transport::frame::{FrameKind, PREFIX_LEN};
use quasar_transport::io::{FrameReader, write_frame_chunks};
use quasar_transport::socket;
use quasar_transport::tls::{self, QuicTuning};
use quasar_transport::wire::{PAYLOAD_ALIGN, PayloadLayout, access_response, encode_request_frame};
use quasar_transport::{CloseCode, Limits, ReadFrameError, StreamCode};

pub use call::{Call, Element, OutputRef, Response};
pub use error::{CallError, ConnectError, OutputError, ProtocolError};
pub use quasar_transport::{ECHO_KERNEL, ElemType, Scalar, StatusCode, Timings};

/// How to reach and authenticate to a server.
#[derive(Clone)]
pub struct ClientConfig {
    /// The server's UDP address.
    pub server: SocketAddr,
    /// The name the server's certificate must be valid for.
    pub server_name: String,
    /// The CA that signed the server's certificate, PEM.
    pub ca_pem: Vec<u8>,
    /// This client's certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// This client's private key, PEM.
    pub key_pem: Vec<u8>,
    /// QUIC transport parameters.
    pub quic: QuicTuning,
    /// Caps on what the server may send back.
    pub limits: Limits,
    /// How long the handshake may take.
    pub connect_timeout: Duration,
    /// When and how calls are retried (and the connection re-established).
    pub retry: RetryPolicy,
}

/// When and how calls are retried.
///
/// A call is tried again when the connection or its stream failed, or the
/// server answered UNAVAILABLE, or an attempt outlived `per_try_timeout`;
/// never after any other answer, and never if the call is marked
/// [`Call::retryable`]`(false)`. A lost connection is re-established before
/// the next attempt. Attempts are spaced by exponential backoff with full
/// jitter (a random wait up to the current backoff, which doubles from
/// `initial_backoff` to `max_backoff`, never above `max_backoff`), and all
/// of them together stay within the call's own deadline, if it has one.
/// Each attempt tells the server the shorter of the call's remaining time
/// and `per_try_timeout`, so the server stops working on an attempt the
/// client has given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retries).
    pub max_attempts: u32,
    /// Longest one attempt may take.
    pub per_try_timeout: Option<Duration>,
    /// Backoff before the first retry.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            per_try_timeout: None,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries: every call gets exactly one attempt.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration from PEM bytes, with default tuning: keep-alives every
    /// 5 s so an idle connection survives the server's idle timeout.
    pub fn new(
        server: SocketAddr,
        server_name: impl Into<String>,
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Self {
        Self {
            server,
            server_name: server_name.into(),
            ca_pem,
            cert_pem,
            key_pem,
            quic: QuicTuning {
                keep_alive: Some(Duration::from_secs(5)),
                ..QuicTuning::default()
            },
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }

    /// A configuration from PEM files (read without blocking the runtime).
    ///
    /// # Errors
    /// [`ConnectError::Io`] naming the file that could not be read.
    pub async fn from_pem_files(
        server: SocketAddr,
        server_name: impl Into<String>,
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, ConnectError> {
        async fn read(p: &Path) -> Result<Vec<u8>, ConnectError> {
            tokio::fs::read(p).await.map_err(|source| ConnectError::Io {
                path: p.to_owned(),
                source,
            })
        }
        Ok(Self::new(
            server,
            server_name,
            read(ca.as_ref()).await?,
            read(cert.as_ref()).await?,
            read(key.as_ref()).await?,
        ))
    }
}

/// A connection to a Quasar server. Cheap to clone; every clone shares the
/// one QUIC connection, and calls from any number of tasks run concurrently.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    /// The current connection, replaced when it is lost.
    /// Behind an `Arc` because cloning a `quinn::Connection` itself locks
    /// the connection's state (contended with its driver) to count handles.
    conn: std::sync::RwLock<Arc<quinn::Connection>>,
    /// The dial under way, if any: concurrent calls that find the
    /// connection lost share one dial and its outcome (N waiters dialling
    /// in turn would take N connect timeouts). Held only briefly, never
    /// across an await.
    reconnecting: std::sync::Mutex<Option<Dial>>,
    /// The number of dials finished, readable without the lock.
    dials: std::sync::atomic::AtomicU64,
    /// Set by [`Client::close`]: a closed client never reconnects.
    closed: std::sync::atomic::AtomicBool,
    server: SocketAddr,
    server_name: String,
    connect_timeout: Duration,
    limits: Limits,
    retry: RetryPolicy,
}

impl Client {
    /// Connects and completes the mutual-TLS handshake.
    ///
    /// # Errors
    /// [`ConnectError`]: unusable PEM, a socket error, a handshake the server
    /// or this client refused (wrong CA, wrong server name, expired
    /// certificate), or no answer within the connect timeout.
    pub async fn connect(config: ClientConfig) -> Result<Self, ConnectError> {
        let roots = tls::roots_from_pem(&config.ca_pem)?;
        let chain = tls::certs_from_pem(&config.cert_pem, "client certificate")?;
        let key = tls::key_from_pem(&config.key_pem)?;
        let quic = tls::client_config(roots, chain, key, &config.quic)?;
        let bind: SocketAddr = if config.server.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let (socket, _) =
            socket::bind_udp(bind, socket::DEFAULT_BUFFER).map_err(ConnectError::Bind)?;
        let runtime = quinn::default_runtime().ok_or_else(|| {
            ConnectError::Bind(std::io::Error::other("not inside a tokio runtime"))
        })?;
        let mut endpoint =
            quinn::Endpoint::new(config.quic.endpoint_config(), None, socket, runtime)
                .map_err(ConnectError::Bind)?;
        endpoint.set_default_client_config(quic);
        let conn = dial(
            &endpoint,
            config.server,
            &config.server_name,
            config.connect_timeout,
        )
        .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                conn: std::sync::RwLock::new(Arc::new(conn)),
                reconnecting: std::sync::Mutex::new(None),
                dials: std::sync::atomic::AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
                server: config.server,
                server_name: config.server_name,
                connect_timeout: config.connect_timeout,
                limits: config.limits,
                retry: config.retry,
            }),
        })
    }

    /// The server's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.server
    }

    fn current(&self) -> Arc<quinn::Connection> {
        self.inner
            .conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The connection, re-established first if it was lost.
    ///
    /// The dial runs in a task of its own: a call whose deadline passes, or
    /// whose future is dropped, while it waits stops waiting, but the dial
    /// goes on and installs its connection for the calls after it.
    /// Otherwise a handshake slower than callers' deadlines would be
    /// abandoned by each caller in turn, and the client would never
    /// reconnect.
    async fn connection(&self) -> Result<Arc<quinn::Connection>, CallError> {
        use std::sync::atomic::Ordering;
        let conn = self.current();
        let Some(lost) = conn.close_reason() else {
            return Ok(conn);
        };
        let i = &self.inner;
        let dial = {
            let mut under_way = i.dial_state();
            if i.closed.load(Ordering::Acquire) {
                return Err(CallError::Connection(quinn::ConnectionError::LocallyClosed));
            }
            let conn = self.current();
            if conn.close_reason().is_none() {
                return Ok(conn);
            }
            match under_way.as_ref() {
                // A task that finished without clearing its entry was
                // aborted or panicked: it is not waited on again.
                Some(dial) if !dial.abort.is_finished() => dial.outcome.clone(),
                _ => {
                    let dial = redial(i.clone()).map_err(|e| CallError::Reconnect {
                        lost: lost.clone(),
                        source: Arc::new(e),
                    })?;
                    let outcome = dial.outcome.clone();
                    *under_way = Some(dial);
                    outcome
                }
            }
        };
        match dial.await {
            Ok(fresh) => Ok(fresh),
            Err(_) if i.closed.load(Ordering::Acquire) => {
                Err(CallError::Connection(quinn::ConnectionError::LocallyClosed))
            }
            Err(source) => Err(CallError::Reconnect { lost, source }),
        }
    }

    /// A round trip through the server's built-in echo with no data: the
    /// connection is up and the server answers. Returns the time the call
    /// took, retries and a reconnection included if it needed them.
    ///
    /// # Errors
    /// [`CallError`], as for [`Client::execute`].
    pub async fn ping(&self) -> Result<Duration, CallError> {
        let started = Instant::now();
        self.execute(Call::new(ECHO_KERNEL)).await?;
        Ok(started.elapsed())
    }

    /// Runs a call and waits for its outputs.
    ///
    /// Dropping the returned future cancels the call: its stream is reset
    /// with [`StreamCode::Cancelled`], and the server does not run it if it
    /// has not started.
    ///
    /// Takes the call by value or by reference: a call run many times is
    /// built once and need not be cloned for each run.
    ///
    /// # Errors
    /// [`CallError`]; see the crate docs.
    pub async fn execute(&self, call: impl Borrow<Call>) -> Result<Response, CallError> {
        let call = call.borrow();
        match call.deadline {
            Some(limit) => tokio::time::timeout(limit, self.with_retries(call))
                .await
                .map_err(|_| CallError::DeadlineExceeded(limit))?,
            None => self.with_retries(call).await,
        }
    }

    /// Attempts under the retry policy; every call ends with exactly one
    /// outcome, the last attempt's.
    async fn with_retries(&self, call: &Call) -> Result<Response, CallError> {
        let policy = &self.inner.retry;
        let attempts = if call.retryable {
            policy.max_attempts.max(1)
        } else {
            1
        };
        // Checked and laid out once; attempts share the payload's bytes.
        let payload = laid_out(call, &self.inner.limits)?;
        let mut backoff = policy.initial_backoff.min(policy.max_backoff);
        let mut attempt = 1;
        let budget = Budget {
            deadline: call.deadline.map(|d| Instant::now() + d),
            per_try: policy.per_try_timeout,
        };
        loop {
            let result = match policy.per_try_timeout {
                // A lost connection is re-established before the attempt,
                // outside its time, so that the attempt's timer does not
                // count the handshake.
                Some(t) => match self.connection().await {
                    Ok(_) => {
                        let per_try_binds = budget.per_try_binds(t, Instant::now());
                        match tokio::time::timeout(t, self.attempt(call, &payload, &budget)).await {
                            // The server was told the per-try budget and
                            // counts it from a little later; its verdict can
                            // still beat this side's timer, and means the same.
                            Ok(Err(CallError::Status {
                                code: StatusCode::DeadlineExceeded,
                                ..
                            })) if per_try_binds => Err(CallError::AttemptTimeout(t)),
                            Ok(result) => result,
                            Err(_) => Err(CallError::AttemptTimeout(t)),
                        }
                    }
                    Err(e) => Err(e),
                },
                None => self.attempt(call, &payload, &budget).await,
            };
            match result {
                Err(e) if attempt < attempts && e.is_retryable() => {
                    tracing::debug!(attempt, error = %e, "retrying");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = backoff.saturating_mul(2).min(policy.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// A call's stream, on the current connection, re-established first if
    /// it was lost (which `open_bi` reports at once, so a healthy connection
    /// costs no separate check); true if it had to be.
    async fn open(&self) -> Result<(CallStream, bool), CallError> {
        let (opened, reconnected) = match self.current().open_bi().await {
            Ok(streams) => (streams, false),
            Err(_) => (self.connection().await?.open_bi().await?, true),
        };
        let (send, recv) = opened;
        Ok((
            CallStream {
                send,
                recv,
                done: false,
            },
            reconnected,
        ))
    }

    /// One attempt at `call`, whose laid-out `payload` it sends, within
    /// `budget`.
    async fn attempt(
        &self,
        call: &Call,
        payload: &[Bytes],
        budget: &Budget,
    ) -> Result<Response, CallError> {
        let started = Instant::now();
        let limits = &self.inner.limits;
        let mut head = encode_head(call, payload, budget.left(started), limits)?;
        let encoded = started.elapsed();

        let (mut stream, reconnected) = self.open().await?;
        if reconnected {
            // The dial took time the header's budget did not know about.
            head = encode_head(call, payload, budget.left(Instant::now()), limits)?;
        }
        // One write of every piece: one lock of the connection and one wake
        // of its driver, however many buffers the call has.
        match write_frame_chunks(&mut stream.send, head, payload).await {
            Ok(()) => {
                let _ = stream.send.finish();
            }
            // The server refused the call before reading all of it; its
            // reply says why.
            Err(quinn::WriteError::Stopped(_)) => {}
            Err(quinn::WriteError::ConnectionLost(e)) => return Err(CallError::Connection(e)),
            Err(e) => return Err(CallError::Send(e)),
        }
        let sent = started.elapsed();

        let mut reader = FrameReader::new(&mut stream.recv);
        let (prefix, header) = reader
            .head(FrameKind::Response, limits)
            .await
            .map_err(receive_error)?;
        let first_byte = started.elapsed();
        let archived = access_response(&header).map_err(ProtocolError::Wire)?;
        let status = archived.status.to_native();
        let Some(code) = StatusCode::from_u16(status) else {
            stream.done = true;
            return Err(ProtocolError::UnknownStatus {
                code: status,
                message: archived.message.as_str().to_owned(),
            }
            .into());
        };
        let timings = archived.timings.to_native();
        if code != StatusCode::Ok {
            // Read the end, as below; an error reply carries no payload.
            if prefix.payload_len == 0 {
                let _ = reader.end_if_arrived();
            }
            stream.done = true;
            return Err(CallError::Status {
                code,
                message: archived.message.as_str().to_owned(),
                timings,
            });
        }
        let outputs = call::outputs_of(archived, prefix.payload_len)?;
        let payload = reader
            .aligned(prefix.payload_len, "payload")
            .await
            .map_err(receive_error)?;
        // The FIN normally arrives with the payload: reading it spares a
        // STOP_SENDING packet per call (the stream is not waited on for it).
        // Whatever else happens to the stream now, the response is whole.
        if let Err(ReadFrameError::Trailing { len }) = reader.end_if_arrived() {
            return Err(ProtocolError::Trailing(len).into());
        }
        stream.done = true;
        Ok(Response::new(
            outputs,
            payload,
            timings,
            call::ClientTimings {
                encode: encoded,
                sent,
                first_byte,
                total: started.elapsed(),
            },
        ))
    }

    /// How many times this client has dialled the server again after
    /// losing its connection (successful or not).
    pub fn reconnect_attempts(&self) -> u64 {
        self.inner.dials.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current connection's QUIC statistics: round-trip time, packets
    /// and bytes each way, losses, congestion window. A reconnection starts
    /// them again.
    pub fn connection_stats(&self) -> quinn::ConnectionStats {
        self.current().stats()
    }

    /// Closes the connection (calls in flight fail) and waits until the
    /// server has been told.
    pub async fn close(&self) {
        {
            // In the order a reconnection takes them.
            let under_way = self.inner.dial_state();
            // Under the lock a reconnection installs its connection with:
            // either that connection is closed here, or the dialler sees
            // the flag and closes it.
            let current = self
                .inner
                .conn
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            self.inner
                .closed
                .store(true, std::sync::atomic::Ordering::Release);
            current.close(CloseCode::ClientDone.varint(), b"client closed");
            // A dial under way would keep the endpoint busy (and `wait_idle`
            // waiting) until it succeeded or timed out. Stopped after the
            // flag is set, so its waiters report LocallyClosed.
            if let Some(dial) = under_way.as_ref() {
                dial.abort.abort();
            }
        }
        self.inner.endpoint.wait_idle().await;
    }
}

/// The time a call has, as the server is told it in each attempt's header.
struct Budget {
    /// When the call's own deadline passes.
    deadline: Option<Instant>,
    /// The retry policy's per-attempt timeout.
    per_try: Option<Duration>,
}

impl Budget {
    /// What is left at `now`: the call's remaining time or the attempt's,
    /// whichever is shorter, so the server does not keep working on an
    /// attempt the client has given up.
    fn left(&self, now: Instant) -> Option<Duration> {
        let to_deadline = self.deadline.map(|d| d.saturating_duration_since(now));
        match (to_deadline, self.per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether an attempt starting at `now` with the per-try timeout `t`
    /// ends on that timeout rather than on the call's own deadline.
    fn per_try_binds(&self, t: Duration, now: Instant) -> bool {
        self.deadline
            .is_none_or(|d| d.saturating_duration_since(now) > t)
    }
}

/// The frame head (prefix and header archive) of one attempt at `call`.
///
/// # Errors
/// [`CallError::InvalidCall`] if it cannot be encoded or is over `limits`.
fn encode_head(
    call: &Call,
    payload: &[Bytes],
    left: Option<Duration>,
    limits: &Limits,
) -> Result<Bytes, CallError> {
    let head = encode_request_frame(&call.header(left), payload)
        .map_err(|e| CallError::InvalidCall(e.to_string()))?;
    let header_len = head.len() - PREFIX_LEN;
    if header_len > limits.max_header_len as usize {
        return Err(CallError::InvalidCall(format!(
            "request header of {header_len} bytes exceeds the limit of {} bytes",
            limits.max_header_len
        )));
    }
    Ok(head)
}

/// A call's payload: its buffers' bytes at their slots, with the padding
/// between them, as pieces QUIC takes without copying (it copies each
/// into a packet only as it encrypts it).
///
/// # Errors
/// [`CallError::InvalidCall`] if a buffer is not a whole number of
/// elements, a size overflows, or the payload is over `limits`.
fn laid_out(call: &Call, limits: &Limits) -> Result<Vec<Bytes>, CallError> {
    call.check()?;
    static PADDING: [u8; PAYLOAD_ALIGN] = [0; PAYLOAD_ALIGN];
    let slots = PayloadLayout::slots_of(
        call.descs()
            .iter()
            .map(|b| (b.name.as_str(), b.elem, b.len)),
    );
    let mut payload = Vec::with_capacity(2 * call.data().len());
    let mut at = 0;
    for (slot, data) in slots.zip(call.data()) {
        let slot = slot.map_err(|e| CallError::InvalidCall(e.to_string()))?;
        // Slots start at multiples of PAYLOAD_ALIGN: a gap is shorter.
        let pad = slot.start.saturating_sub(at).min(PAYLOAD_ALIGN);
        if pad > 0 {
            payload.push(Bytes::from_static(&PADDING[..pad]));
        }
        if !data.is_empty() {
            payload.push(data.clone());
        }
        at = slot.end;
    }
    if at as u64 > limits.max_payload_len {
        return Err(CallError::InvalidCall(format!(
            "payload of {at} bytes exceeds the limit of {} bytes",
            limits.max_payload_len
        )));
    }
    Ok(payload)
}

/// A reconnection's outcome, shared by every call that waited for it.
type DialOutcome = Result<Arc<quinn::Connection>, Arc<ConnectError>>;

/// A reconnection under way: its task's outcome, awaitable by many calls.
type DialInFlight = Shared<BoxFuture<'static, DialOutcome>>;

/// A reconnection under way.
struct Dial {
    /// Its outcome, awaited by every call that found the connection lost.
    outcome: DialInFlight,
    /// Its task, stopped by [`Client::close`].
    abort: tokio::task::AbortHandle,
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dial")
            .field("finished", &self.abort.is_finished())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn dial_state(&self) -> std::sync::MutexGuard<'_, Option<Dial>> {
        self.reconnecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a finished dial and installs its connection, unless the
    /// client was closed meanwhile.
    fn finish_dial(&self, dialled: Result<quinn::Connection, ConnectError>) -> DialOutcome {
        use std::sync::atomic::Ordering;
        let mut under_way = self.dial_state();
        *under_way = None;
        self.dials.fetch_add(1, Ordering::AcqRel);
        let fresh = Arc::new(dialled.map_err(Arc::new)?);
        // Checked and installed under the lock `close` takes: a client
        // closed while dialling must not keep the new connection (`close`
        // waits for the endpoint to go idle).
        let mut current = self.conn.write().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            fresh.close(CloseCode::ClientDone.varint(), b"client closed");
            return Err(Arc::new(ConnectError::Handshake(
                quinn::ConnectionError::LocallyClosed,
            )));
        }
        *current = fresh.clone();
        tracing::debug!(server = %self.server, "reconnected");
        Ok(fresh)
    }
}

/// Starts a reconnection in a task of its own (see [`Client::connection`]).
///
/// # Errors
/// [`ConnectError::Interrupted`] outside a tokio runtime.
fn redial(inner: Arc<Inner>) -> Result<Dial, ConnectError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| ConnectError::Interrupted(e.to_string()))?;
    let task = runtime.spawn(async move {
        let dialled = dial(
            &inner.endpoint,
            inner.server,
            &inner.server_name,
            inner.connect_timeout,
        )
        .await;
        inner.finish_dial(dialled)
    });
    let abort = task.abort_handle();
    let outcome = async move {
        task.await
            .unwrap_or_else(|e| Err(Arc::new(ConnectError::Interrupted(e.to_string()))))
    }
    .boxed()
    .shared();
    Ok(Dial { outcome, abort })
}

/// Connects and completes the handshake within `timeout`.
async fn dial(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = endpoint.connect(server, server_name)?;
    Ok(tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))??)
}

/// A random wait up to `max` ("full jitter"), so clients that lost the same
/// server do not come back in step.
fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random::<f64>())
}

/// A lost connection is reported as such, with its reason (a refused
/// handshake's TLS alert, say), whatever the call was doing; a prefix that
/// fails its checks is the server breaking the protocol (a newer version,
/// or a reply over this client's limits), not a transport failure.
fn receive_error(e: ReadFrameError) -> CallError {
    match e {
        ReadFrameError::ConnectionLost { source, .. } => CallError::Connection(source),
        ReadFrameError::Frame(f) => CallError::Protocol(ProtocolError::Frame(f)),
        other => CallError::Receive(other),
    }
}

/// A call's stream; resets itself if dropped before the reply was read.
struct CallStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    done: bool,
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(StreamCode::Cancelled.varint());
            let _ = self.recv.stop(StreamCode::Cancelled.varint());
        }
    }
}
