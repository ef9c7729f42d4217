//! One connection, and one call per stream.
//!
//! A call's steps, each bounded: read the 20-byte prefix and check it; read
//! the header (at most `max_header_len`) and validate the archive; find the
//! kernel and check the request against it ([`crate::kernel::plan`]);
//! reserve the call's bytes from the server's in-flight budget; read the
//! payload; queue the job for the GPU; await the result, the caller going
//! away, or the deadline; write the reply and finish the stream.
//!
//! The built-in echo ([`ECHO_KERNEL`]) takes the same path up to the
//! kernel lookup, then sends the request's payload back as the response's,
//! with no GPU work: what remains is the framework's own cost.
//!
//! Every refusal is a status reply with a message. When the request was not
//! read to its end, the server also sends `STOP_SENDING` with
//! [`StreamCode::RequestRejected`] so the client stops uploading. A
//! request's header must arrive within the read timeout of its stream
//! opening, and its payload keep pace with the minimum transfer rate from
//! then on (each byte due by the timeout plus the time the bytes before it
//! take at that rate: a client that declares a large payload and sends
//! nothing is cut off at the timeout, not at the end of its length's
//! allowance); a request that does not is reset with
//! [`StreamCode::RequestTimeout`] on both halves. A reply the client does
//! not read within the read timeout plus its length at that rate is reset
//! with [`StreamCode::ResponseTimeout`].
//!
//! The call's reservations of the in-flight byte budgets (its client's and
//! the server's) travel with its bytes: into the GPU job, then into the
//! job's output, then with the reply's stream until the client has
//! acknowledged the reply (quinn holds a reply's bytes until then, however
//! early the write returns). So they are released only when neither the
//! request nor the response is held any more.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use bytes::Bytes;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use quasar_transport::frame::FrameKind;
use quasar_transport::io::{ChunkedPayload, FrameReader, Pace, write_frame_chunks};
use quasar_transport::tls;
use quasar_transport::wire::{ArchivedRequestHeader, access_request, encode_response_frame};
use quasar_transport::{
    BufferDesc, CloseCode, ECHO_KERNEL, FrameError, ReadFrameError, ResponseHeader, StatusCode,
    StreamCode, Timings,
};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::access::{Identity, peer_chain};
use crate::admission::{Admission, ConnectionStats, Slot};
use crate::budget::kib_for;
use crate::clients::Client;
use crate::gpu::executor::{Job, Reservation};
use crate::kernel::plan::{plan, plan_echo, shown};
use crate::{Shared, TlsInForce};

/// What one connection's calls share.
struct Conn {
    identity: Identity,
    /// What this connection shares with the client's others: the client's
    /// in-flight byte budget and its turns in the GPU queue.
    client: Arc<Client>,
    /// Replies written and finished but perhaps not yet acknowledged by
    /// the client.
    lingering: Arc<Lingering>,
}

/// Replies written and finished whose acknowledgement by the client is not
/// yet known, each with its call's reservation.
///
/// quinn keeps a reply's bytes until the client acknowledges them, so the
/// call's share of the in-flight budgets stays with its stream until then,
/// shrunk to the reply's size: a client that reads its replies but
/// withholds acknowledgements cannot make the server hold more than the
/// budgets say. Nor for long: a reply not acknowledged within the time it
/// was given to be read (the request timeout plus its length at the
/// minimum transfer rate) is reset, which frees its bytes. A connection
/// closed by shutdown discards unacknowledged data, so on shutdown every
/// reply still listed is waited for before the close.
///
/// In steady state the list is only pruned, in batches: each stream is
/// asked once, without waiting, whether its reply is settled, and the
/// settled ones (and their reservations) are dropped. A check runs when the
/// list has grown to twice the length, or twice the KiB held, that the last
/// check kept; when a reservation does not fit in a budget (every list of
/// the client's, and of every client when the server's budget is short,
/// before the call is refused); and every [`SWEEP_EVERY`]
/// from the connection's task, so an idle connection does not keep its
/// last replies' shares. Watching each reply instead (a future per stream
/// woken by its acknowledgement) cost a wake-up, a `Notify` and a task-set
/// entry per call: echo 64 B at concurrency 1 went from x1.27 to x1.39 of
/// raw QUIC with that watch in the call's task, and still cost about x0.03
/// in the connection's task.
pub(crate) struct Lingering {
    replied: std::sync::Mutex<Replied>,
    /// The server-wide count of KiB that lingering replies hold.
    server_kib: Arc<AtomicI64>,
}

#[derive(Default)]
struct Replied {
    streams: Vec<Reply>,
    /// The KiB the listed reservations hold.
    kib: u64,
    /// The length at which the list is next checked.
    check_at: usize,
    /// The KiB held at which the list is next checked.
    check_at_kib: u64,
}

/// A reply written and finished, and what it holds until acknowledged.
struct Reply {
    send: quinn::SendStream,
    held: Reservation,
    /// Reset if not acknowledged by then.
    due: tokio::time::Instant,
}

/// The smallest list worth checking: a few checks' worth of calls.
const CHECK_REPLIES_FROM: usize = 64;

/// The KiB of replies a connection may hold unchecked, however few: 1 MiB,
/// so the shares that acknowledged replies still hold stay small next to
/// any budget, at a check per MiB sent or less.
const CHECK_KIB_FROM: u64 = 1024;

/// How often the connection's task checks the lingering replies.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Drop for Lingering {
    fn drop(&mut self) {
        let kib = self.replied().kib;
        self.uncount(kib);
    }
}

impl Lingering {
    fn new(server_kib: Arc<AtomicI64>) -> Self {
        Self {
            replied: std::sync::Mutex::default(),
            server_kib,
        }
    }

    /// Takes `kib`, no longer listed, off the server-wide count.
    fn uncount(&self, kib: u64) {
        self.server_kib
            .fetch_sub(i64::try_from(kib).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn replied(&self) -> std::sync::MutexGuard<'_, Replied> {
        self.replied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `send`, whose reply is written and finished, and the call's
    /// reservation `held` until the reply's acknowledgement is known, or
    /// until `due`; checks the list when it has doubled (in length or KiB
    /// held).
    fn push(&self, send: quinn::SendStream, held: Reservation, due: tokio::time::Instant) {
        let taken = {
            self.server_kib
                .fetch_add(i64::from(held.kib()), Ordering::Relaxed);
            let mut replied = self.replied();
            replied.kib += u64::from(held.kib());
            replied.streams.push(Reply { send, held, due });
            if replied.streams.len() < replied.check_at.max(CHECK_REPLIES_FROM)
                && replied.kib < replied.check_at_kib.max(CHECK_KIB_FROM)
            {
                return;
            }
            Self::take(&mut replied)
        };
        self.prune(taken);
    }

    /// Checks every lingering reply now; returns the KiB released.
    pub(crate) fn sweep(&self) -> u64 {
        let taken = {
            let mut replied = self.replied();
            if replied.streams.is_empty() {
                return 0;
            }
            Self::take(&mut replied)
        };
        self.prune(taken)
    }

    /// The whole list, to be checked outside its lock.
    fn take(replied: &mut Replied) -> Vec<Reply> {
        replied.kib = 0;
        std::mem::take(&mut replied.streams)
    }

    /// Drops the settled replies of `taken` (and their reservations),
    /// resets the overdue ones, and puts the rest back; returns the KiB
    /// released.
    fn prune(&self, mut taken: Vec<Reply>) -> u64 {
        let now = tokio::time::Instant::now();
        let mut released = 0;
        let mut kept = 0;
        // Outside the list's lock: each check, and each drop, locks the
        // connection.
        taken.retain_mut(|reply| {
            use futures_util::FutureExt;
            let kib = u64::from(reply.held.kib());
            if reply.send.stopped().now_or_never().is_some() {
                released += kib;
                return false;
            }
            if now >= reply.due {
                tracing::debug!("a reply was not acknowledged in time");
                // Frees the bytes quinn holds for it.
                let _ = reply.send.reset(StreamCode::ResponseTimeout.varint());
                released += kib;
                return false;
            }
            kept += kib;
            true
        });
        let mut replied = self.replied();
        // Back into the taken list, whose buffer has grown to a check's
        // size, rather than regrowing the emptied one from nothing. What
        // was listed meanwhile is already counted in `kib`.
        taken.append(&mut replied.streams);
        std::mem::swap(&mut replied.streams, &mut taken);
        replied.kib += kept;
        replied.check_at = 2 * replied.streams.len();
        replied.check_at_kib = 2 * replied.kib;
        drop(replied);
        self.uncount(released);
        released
    }

    /// Waits until every reply still listed is settled: acknowledged,
    /// stopped by the client, or lost with the connection.
    async fn settle(&self) {
        let streams = Self::take(&mut self.replied());
        self.uncount(streams.iter().map(|r| u64::from(r.held.kib())).sum());
        let mut waiting: FuturesUnordered<_> = streams
            .into_iter()
            .map(|reply| {
                let acked = reply.send.stopped();
                async move {
                    let _ = acked.await;
                    drop(reply);
                }
            })
            .collect();
        while waiting.next().await.is_some() {}
    }
}

/// Serves one admitted connection: completes the handshake (within the
/// handshake timeout), then spawns a task per incoming stream until the
/// connection closes or the server shuts down. `slot` holds the
/// connection's place in the admission counts until it ends.
pub(crate) async fn connection(
    incoming: quinn::Incoming,
    mut slot: Slot,
    admission: &Admission,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let remote = incoming.remote_address();
    let stats = admission.stats();
    // The handshake runs under the TLS configuration in force now; a
    // reload from here on is seen by `close_if_refused`.
    let mut tls_watch = shared.tls.subscribe();
    let in_force = tls_watch.borrow_and_update().server_config.clone();
    let handshake = async {
        match incoming.accept_with(in_force) {
            Ok(connecting) => connecting.await,
            Err(e) => Err(e),
        }
    };
    let conn = match tokio::time::timeout(admission.handshake_timeout(), handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            // Dropping the handshake future abandons the attempt.
            stats.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%remote, "handshake timed out");
            return;
        }
    };
    slot.established();
    let chain = peer_chain(&conn);
    let identity = chain
        .first()
        .map(|c| Identity::from_cert(c))
        .unwrap_or_default();
    if identity.names().is_empty() {
        // Access is decided by identity: a certificate with none must not
        // fall to the policy's default (fail closed).
        tracing::warn!(%remote, "client certificate names no readable identity; connection refused");
        conn.close(
            CloseCode::Unidentified.varint(),
            b"client certificate names no identity",
        );
        return;
    }
    let conn_state = Arc::new(Conn {
        client: shared.clients.join(&identity),
        identity,
        lingering: Arc::new(Lingering::new(shared.clients.lingering_kib())),
    });
    conn_state.client.watch(&conn_state.lingering);
    tracing::info!(%remote, identity = %conn_state.identity, "connection established");
    // This connection's calls: on shutdown the connection stays open until
    // they have answered (dropping the last handle would close it at once).
    let calls = TaskTracker::new();
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    // Beside the loop rather than in it, so that calls do not pay for
    // watching; closing the connection ends the loop. Aborted however this
    // task ends, so it never holds the connection open by itself.
    let recheck = AbortOnDropHandle::new(tokio::spawn(close_if_refused(
        conn.clone(),
        chain,
        tls_watch,
        shared.recheck_permits.clone(),
        stats.clone(),
        remote,
        conn_state.identity.to_string(),
    )));
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let shared = shared.clone();
                    let conn_state = conn_state.clone();
                    // Boxed: the call's future is about 2 KB, and a task
                    // is moved by value on its way into the runtime.
                    calls.spawn(Box::pin(async move {
                        call(send, recv, &shared, &conn_state).await;
                    }));
                }
                Err(e) => {
                    tracing::info!(%remote, reason = %e, "connection closed");
                    break;
                }
            },
            _ = sweep.tick() => {
                conn_state.lingering.sweep();
            }
            () = &mut cancelled => break,
        }
    }
    drop(recheck);
    calls.close();
    calls.wait().await;
    if cancel.is_cancelled() {
        // Replies already written reach the client before the close
        // discards what it has not acknowledged.
        let _ = tokio::time::timeout(shared.request_timeout, conn_state.lingering.settle()).await;
        // Say why, rather than the implicit close of a dropped connection.
        conn.close(CloseCode::ServerShutdown.varint(), b"server shutting down");
    }
}

/// Closes the connection with [`CloseCode::CertificateRefused`] when its
/// certificate expires, or when a reload changes the client CA or CRLs
/// and they refuse it. The checks run on blocking threads, a few at a
/// time (each verifies signatures, and a CRL's over all of it), so a
/// reload with many connections open does not stall the runtime.
async fn close_if_refused(
    conn: quinn::Connection,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    mut tls_watch: watch::Receiver<TlsInForce>,
    permits: Arc<Semaphore>,
    stats: Arc<ConnectionStats>,
    remote: SocketAddr,
    identity: String,
) {
    let chain = Arc::new(chain);
    let refuse = |reason: &str| {
        stats.certificates_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            %remote,
            %identity,
            reason,
            "client certificate no longer accepted; connection closed"
        );
        let reason = format!("client certificate no longer accepted: {reason}");
        conn.close(CloseCode::CertificateRefused.varint(), reason.as_bytes());
    };
    // A second after: a certificate is valid through its last second.
    let expires_in = chain_expiry(&chain).map(|t| {
        t.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_secs(1)
    });
    let expiry = async move {
        match expires_in {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            changed = tls_watch.changed() => {
                // An error: the server's state is gone, nothing to watch.
                if changed.is_err() {
                    return;
                }
                let verifier = tls_watch.borrow_and_update().client_check.clone();
                let Ok(_permit) = permits.acquire().await else { return };
                let chain = chain.clone();
                stats.certificates_rechecked.fetch_add(1, Ordering::Relaxed);
                let verdict = tokio::task::spawn_blocking(move || {
                    tls::verify_peer(verifier.as_ref(), &chain)
                })
                .await;
                match verdict {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return refuse(&e.to_string()),
                    // A check that panicked proves nothing: fail closed.
                    Err(_) => return refuse("the check failed"),
                }
            }
            () = &mut expiry => {
                // In rustls's words, as a handshake would have refused it.
                let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
                return refuse(&expired.to_string());
            }
        }
    }
}

/// When the first certificate of a chain to expire does (its `notAfter`);
/// `None` if none parses (the timer is then left to the reload checks).
fn chain_expiry(
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> Option<std::time::SystemTime> {
    chain
        .iter()
        .filter_map(|der| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
            std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
        })
        .min()
}

/// How a call ended, short of a successful reply.
enum Failure {
    /// Reply with this status; `unread` if the request was not read to its end.
    Status {
        code: StatusCode,
        message: String,
        unread: bool,
    },
    /// Reset both halves of the stream with this code.
    Reset(StreamCode),
    /// The client is gone (reset, stopped, connection lost): nobody to tell.
    Gone,
}

impl Failure {
    fn status(code: StatusCode, message: impl Into<String>, unread: bool) -> Self {
        Self::Status {
            code,
            message: message.into(),
            unread,
        }
    }
}

struct Success {
    header: ResponseHeader,
    /// The response payload, handed to QUIC without copying.
    body: Vec<Bytes>,
    /// The call's share of the in-flight budgets, released once the client
    /// has acknowledged the reply.
    reservation: Reservation,
}

async fn call(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
    conn: &Conn,
) {
    let identity = &conn.identity;
    let opened = Instant::now();
    // Server timings and the call's deadline count from the header being
    // read, so a slow upload does not eat into the caller's budget.
    let mut header_read = None;
    let mut kernel = None;
    let outcome = run(
        &mut send,
        &mut recv,
        shared,
        conn,
        opened,
        &mut header_read,
        &mut kernel,
    )
    .await;
    let access_log = |status: &dyn std::fmt::Display, total_us: u64| {
        if shared.access_log {
            tracing::info!(
                target: "quasar::access",
                %identity,
                kernel = kernel.as_deref().unwrap_or("-"),
                %status,
                total_us,
                "call"
            );
        }
    };
    let total_us = || micros(header_read.unwrap_or(opened).elapsed());
    let (header, body, mut held) = match outcome {
        Ok(Success {
            mut header,
            body,
            reservation,
        }) => {
            header.timings.total_us = total_us();
            (header, body, reservation)
        }
        Err(Failure::Status {
            code,
            message,
            unread,
        }) => {
            if unread {
                let _ = recv.stop(StreamCode::RequestRejected.varint());
            }
            tracing::debug!(status = %code, %message, "call refused");
            let timings = Timings {
                total_us: total_us(),
                ..Timings::default()
            };
            (
                ResponseHeader::error(code, message, timings),
                Vec::new(),
                Reservation::default(),
            )
        }
        Err(Failure::Reset(code)) => {
            access_log(&format_args!("reset {code:?}"), total_us());
            let _ = recv.stop(code.varint());
            let _ = send.reset(code.varint());
            return;
        }
        Err(Failure::Gone) => {
            access_log(&"client gone", total_us());
            let _ = send.reset(StreamCode::Cancelled.varint());
            return;
        }
    };
    let status = StatusCode::from_u16(header.status).unwrap_or(StatusCode::Internal);
    access_log(&status, header.timings.total_us);
    let head = match encode_response_frame(&header, &body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "encoding a reply");
            let _ = send.reset(StreamCode::Internal.varint());
            return;
        }
    };
    // A client that stops reading would otherwise hold this call's memory
    // (and its share of the in-flight budget) for as long as it likes.
    let reply_len = head.len() + body.iter().map(Bytes::len).sum::<usize>();
    let started_writing = tokio::time::Instant::now();
    // The request's pace, for the reply: its length at the minimum rate on
    // top of the request timeout.
    let write_deadline = Pace {
        start: started_writing + shared.request_timeout,
        rate: shared.min_transfer_rate,
    }
    .due(reply_len);
    let write = write_frame_chunks(&mut send, head, &body);
    match by(write_deadline, write).await {
        Ok(Ok(())) => {
            let _ = send.finish();
            tracing::debug!(
                status = header.status,
                total_us = header.timings.total_us,
                "call done"
            );
            // quinn holds the reply's bytes until the client acknowledges
            // them: their share of the budgets stays with the stream until
            // then, and the reply is given as long again to be acknowledged
            // as it was to be read.
            held.shrink_to(reply_len as u64);
            drop(body);
            let due = tokio::time::Instant::now() + (write_deadline - started_writing);
            conn.lingering.push(send, held, due);
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "writing a reply"),
        Err(_) => {
            tracing::debug!("the client did not read its reply in time");
            let _ = send.reset(StreamCode::ResponseTimeout.varint());
        }
    }
}

/// Reserves `bytes` from the client's in-flight budget (so one client,
/// however many connections it opens, cannot take it all), then from the
/// server's; the shares travel with the call's bytes. When either is
/// short, acknowledged replies give theirs back first: the client's, and
/// every client's when the server's budget is the short one.
fn reserve(shared: &Shared, conn: &Conn, bytes: u64) -> Result<Reservation, Failure> {
    let kib = kib_for(bytes);
    let exhausted = |whose: &str, budget: u32| {
        Failure::status(
            StatusCode::ResourceExhausted,
            format!(
                "{whose} in-flight byte budget ({budget} KiB) cannot take this call's {kib} KiB now; retry later"
            ),
            true,
        )
    };
    // A call larger than a whole budget would be refused forever: say so,
    // rather than "retry later".
    for (whose, total, flag) in [
        (
            "this client's",
            shared.clients.budget_kib(),
            "--max-inflight-per-client-mib",
        ),
        ("the server's", shared.budget_kib, "--max-inflight-mib"),
    ] {
        if kib > total {
            return Err(Failure::status(
                StatusCode::ResourceExhausted,
                format!(
                    "this call needs {kib} KiB in flight, more than {whose} whole in-flight budget ({total} KiB); the server's {flag} is too small for it"
                ),
                true,
            ));
        }
    }
    let take = || {
        let client_share = conn
            .client
            .budget
            .try_take(kib)
            .ok_or_else(|| exhausted("this client's", shared.clients.budget_kib()))?;
        let server_share = shared
            .budget
            .try_take(kib)
            .ok_or_else(|| exhausted("the server's", shared.budget_kib))?;
        Ok(Reservation::new(
            conn.client.clone(),
            client_share,
            server_share,
        ))
    };
    if let Ok(held) = take() {
        return Ok(held);
    }
    // Acknowledged replies may still hold shares, waiting for their
    // connection's next check: check the client's, on all its connections,
    // before refusing; and every client's when the server's budget is the
    // short one.
    conn.client.sweep();
    if conn.client.budget.free() >= kib {
        shared
            .clients
            .sweep_all(kib.saturating_sub(shared.budget.free()));
    }
    // Whatever the checks found (or another caller's freed meanwhile).
    take()
}

/// The built-in echo: the request's buffers back, unchanged, with no GPU
/// work. The request payload becomes the response payload (moved, not
/// copied), so the call holds its bytes once.
async fn echo(
    reader: &mut FrameReader<'_>,
    shared: &Shared,
    conn: &Conn,
    header: &ArchivedRequestHeader,
    payload_len: u64,
    pace: Pace,
) -> Result<Success, Failure> {
    let buffers = plan_echo(header, payload_len, &shared.limits)
        .map_err(|e| Failure::status(e.code, e.message, true))?;
    let reservation = reserve(shared, conn, payload_len)?;
    let payload = read_payload(reader, payload_len, pace).await?;
    Ok(Success {
        header: ResponseHeader {
            status: StatusCode::Ok.as_u16(),
            message: String::new(),
            buffers,
            timings: Timings::default(),
        },
        // The request's chunks go back out as they came in: no copy.
        body: payload.into_chunks(),
        reservation,
    })
}

/// Reads the request's payload at `pace`, then its end if that came with it
/// (otherwise dropping the stream costs a `STOP_SENDING` packet per call).
async fn read_payload(
    reader: &mut FrameReader<'_>,
    len: u64,
    pace: Pace,
) -> Result<ChunkedPayload, Failure> {
    let payload = reader
        .chunked_paced(len, "payload", pace)
        .await
        .map_err(read_failure)?;
    reader.end_if_arrived().map_err(read_failure)?;
    Ok(payload)
}

/// `fut` by `deadline`, arming a timer only if it is not ready at once: a
/// request that arrived whole and a reply that fits the send window (the
/// usual case) cost no timer, which is a runtime lookup and an entry each.
async fn by<F: Future>(
    deadline: tokio::time::Instant,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    use futures_util::FutureExt;
    let mut fut = std::pin::pin!(fut);
    if let Some(out) = fut.as_mut().now_or_never() {
        return Ok(out);
    }
    tokio::time::timeout_at(deadline, fut).await
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn read_failure(e: ReadFrameError) -> Failure {
    match e {
        ReadFrameError::Frame(f) => {
            let code = match f {
                FrameError::HeaderTooLarge { .. } | FrameError::PayloadTooLarge { .. } => {
                    StatusCode::ResourceExhausted
                }
                _ => StatusCode::InvalidArgument,
            };
            Failure::status(code, f.to_string(), true)
        }
        ReadFrameError::Truncated { .. } => Failure::status(
            StatusCode::InvalidArgument,
            format!("truncated request: {e}"),
            false,
        ),
        ReadFrameError::TooLarge { .. } => {
            Failure::status(StatusCode::ResourceExhausted, e.to_string(), true)
        }
        // The payload fell behind the minimum transfer rate.
        ReadFrameError::Behind { .. } => Failure::Reset(StreamCode::RequestTimeout),
        ReadFrameError::Trailing { .. } => Failure::status(
            StatusCode::InvalidArgument,
            format!("request stream does not end with its frame: {e}"),
            true,
        ),
        _ => Failure::Gone,
    }
}

async fn run(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    shared: &Shared,
    conn: &Conn,
    opened: Instant,
    header_read: &mut Option<Instant>,
    kernel_name: &mut Option<String>,
) -> Result<Success, Failure> {
    let identity = &conn.identity;
    let read_deadline = tokio::time::Instant::from_std(opened + shared.request_timeout);
    let mut reader = FrameReader::new(recv);
    let (prefix, header_bytes) = by(
        read_deadline,
        reader.head(FrameKind::Request, &shared.limits),
    )
    .await
    .map_err(|_| Failure::Reset(StreamCode::RequestTimeout))?
    .map_err(read_failure)?;
    let started = Instant::now();
    *header_read = Some(started);
    let header = access_request(&header_bytes)
        .map_err(|e| Failure::status(StatusCode::InvalidArgument, e.to_string(), true))?;
    // Each byte of the payload is due by the read deadline plus the time
    // the bytes before it take at the minimum rate.
    let pace = Pace {
        start: read_deadline,
        rate: shared.min_transfer_rate,
    };
    let requested = header.kernel.as_str();
    // Kept only for the access log, when something records it: no
    // allocation per call otherwise.
    if shared.access_log && tracing::enabled!(target: "quasar::access", tracing::Level::INFO) {
        *kernel_name = Some(requested.chars().take(64).collect());
    }
    if requested == ECHO_KERNEL {
        return echo(&mut reader, shared, conn, header, prefix.payload_len, pace).await;
    }
    // Checked against the kernels and policy as they are now; a reload
    // meanwhile does not change what this call runs.
    let registry = shared.kernels.current();
    let policy = shared.policy();
    let (index, kernel) = registry.get(requested).ok_or_else(|| {
        // Only what this client may call: the list is not an oracle for
        // kernels it cannot use.
        let names: Vec<&str> = registry
            .kernels()
            .iter()
            .map(|k| k.name.as_str())
            .filter(|k| policy.allows(identity, k))
            .collect();
        Failure::status(
            StatusCode::NotFound,
            format!(
                "no kernel named `{}`; this server has: {}",
                shown(requested),
                names.join(", ")
            ),
            true,
        )
    })?;
    if !policy.allows(identity, requested) {
        return Err(Failure::status(
            StatusCode::PermissionDenied,
            format!(
                "identity `{identity}` may not call kernel `{}`",
                shown(requested)
            ),
            true,
        ));
    }
    let plan = plan(
        index,
        kernel,
        header,
        prefix.payload_len,
        &shared.limits,
        &registry.caps(),
    )
    .map_err(|e| Failure::status(e.code, e.message, true))?;

    // Reserve the request and response bytes before allocating either.
    let bytes = prefix.payload_len + plan.response_layout.total() as u64;
    let reservation = reserve(shared, conn, bytes)?;

    let payload = read_payload(&mut reader, prefix.payload_len, pace).await?;

    let timeout = header.timeout_us.as_ref().map(|us| us.to_native());
    // A budget too large to represent is no deadline at all.
    let deadline = timeout.and_then(|us| started.checked_add(Duration::from_micros(us)));
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Failure::status(
            StatusCode::DeadlineExceeded,
            "the deadline passed before the request was read",
            false,
        ));
    }
    let outputs: Vec<BufferDesc> = plan
        .returned
        .iter()
        .map(|&i| BufferDesc {
            name: kernel.buffers[i].name.clone(),
            elem: kernel.buffers[i].elem,
            len: plan.lens[i],
        })
        .collect();

    let (reply_tx, reply_rx) = oneshot::channel();
    shared
        .queue
        .try_submit(Job {
            plan,
            kernels: registry.clone(),
            source: conn.client.id,
            payload,
            enqueued: Instant::now(),
            deadline,
            reply: reply_tx,
            reservation,
        })
        .map_err(|e| Failure::status(e.status(), e.to_string(), false))?;

    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
            None => std::future::pending().await,
        }
    };
    // Dropping reply_rx (on cancellation or deadline) tells the executor
    // not to run the job if it has not started.
    let output = tokio::select! {
        r = reply_rx => match r {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(Failure::status(e.status(), e.to_string(), false)),
            Err(_) => return Err(Failure::status(StatusCode::Internal, "the GPU executor dropped the call", false)),
        },
        _ = send.stopped() => return Err(Failure::Gone),
        () = expired => return Err(Failure::status(
            StatusCode::DeadlineExceeded,
            format!("deadline of {} us exceeded", timeout.unwrap_or_default()),
            false,
        )),
    };
    Ok(Success {
        header: ResponseHeader {
            status: StatusCode::Ok.as_u16(),
            message: String::new(),
            buffers: outputs,
            timings: Timings {
                queued_us: micros(output.queued),
                gpu_us: micros(output.gpu),
                kernel_us: output.kernel.map(micros),
                readback_us: micros(output.readback),
                total_us: 0,
            },
        },
        body: vec![Bytes::from_owner(output.payload)],
        reservation: output.reservation,
    })
}
