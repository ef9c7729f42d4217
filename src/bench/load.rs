//! Load generation: closed loops (N calls in flight) and open loops (a fixed
//! rate, latency counted from each call's intended start), against a remote
//! server, the local in-process executor, or a raw QUIC echo.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quasar_client::{Call, CallError, Client};
use quasar_server::local::LocalDispatcher;
use quasar_transport::{Payload, RequestHeader};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::raw::RawClient;
use super::stats::{CallRecord, Recorder};

/// What a call goes to.
#[derive(Clone)]
pub enum Target {
    /// A Quasar server, over one or more connections.
    Remote(Arc<Vec<Client>>),
    /// The GPU executor in this process, without the network.
    Local(Arc<LocalDispatcher>),
    /// A raw QUIC echo over mutual TLS: the transport floor.
    Raw(Arc<Vec<RawClient>>),
}

impl Target {
    /// The QUIC statistics of the target's connections, summed (none for
    /// the in-process target).
    pub fn transport(&self) -> Option<TransportCounts> {
        let (stats, reconnects): (Vec<quinn::ConnectionStats>, u64) = match self {
            Self::Remote(clients) => (
                clients.iter().map(Client::connection_stats).collect(),
                clients.iter().map(Client::reconnect_attempts).sum(),
            ),
            Self::Raw(clients) => (clients.iter().map(RawClient::stats).collect(), 0),
            Self::Local(_) => return None,
        };
        let mut sum = TransportCounts {
            reconnects,
            mtu: stats.iter().map(|s| s.path.current_mtu).min().unwrap_or(0),
            ..TransportCounts::default()
        };
        for s in &stats {
            sum.datagrams_up += s.udp_tx.datagrams;
            sum.datagrams_down += s.udp_rx.datagrams;
            sum.lost_packets += s.path.lost_packets;
            sum.rtt = sum.rtt.max(s.path.rtt);
        }
        Some(sum)
    }

    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Remote(_) => "remote",
            Self::Local(_) => "local",
            Self::Raw(_) => "raw",
        }
    }
}

/// What a target's QUIC connections have counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportCounts {
    /// UDP datagrams sent.
    pub datagrams_up: u64,
    /// UDP datagrams received.
    pub datagrams_down: u64,
    /// Packets QUIC declared lost.
    pub lost_packets: u64,
    /// The current round-trip estimate (the largest over the connections).
    pub rtt: Duration,
    /// The largest UDP payload the client sends now, as MTU discovery left
    /// it (the smallest over the connections).
    pub mtu: u16,
    /// Reconnections so far: counters start again on a new connection, so
    /// two snapshots are comparable only if this did not change.
    pub reconnects: u64,
}

impl TransportCounts {
    /// What was counted between `before` and this snapshot (the round-trip
    /// estimate and MTU are this snapshot's).
    pub fn since(self, before: Self) -> Self {
        Self {
            datagrams_up: self.datagrams_up.saturating_sub(before.datagrams_up),
            datagrams_down: self.datagrams_down.saturating_sub(before.datagrams_down),
            lost_packets: self.lost_packets.saturating_sub(before.lost_packets),
            rtt: self.rtt,
            mtu: self.mtu,
            reconnects: self.reconnects.saturating_sub(before.reconnects),
        }
    }

    /// Two periods' counts together (the round-trip estimate and MTU are
    /// the later one's).
    pub fn plus(self, later: Self) -> Self {
        Self {
            datagrams_up: self.datagrams_up + later.datagrams_up,
            datagrams_down: self.datagrams_down + later.datagrams_down,
            lost_packets: self.lost_packets + later.lost_packets,
            rtt: later.rtt,
            mtu: later.mtu,
            reconnects: self.reconnects + later.reconnects,
        }
    }
}

/// The call a run repeats, in the forms each target needs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The SDK call.
    pub call: Call,
    /// The same call as a header and a laid-out payload (for the local
    /// executor and the raw echo).
    pub header: RequestHeader,
    /// The request payload.
    pub payload: Payload,
    /// Payload bytes a response carries (for the raw echo to send back).
    pub down_bytes: u64,
}

impl Workload {
    /// Builds the forms of `call`; `down_bytes` is what its response
    /// carries (known from a probe call).
    ///
    /// # Errors
    /// The call's own validation error.
    pub fn new(call: Call, down_bytes: u64) -> Result<Self, CallError> {
        let (header, buffers) = call.clone().into_request()?;
        let payload = quasar_transport::wire::lay_out(&buffers);
        Ok(Self {
            call,
            header,
            payload,
            down_bytes,
        })
    }

    /// Request payload bytes.
    pub fn up_bytes(&self) -> u64 {
        self.payload.len() as u64
    }
}

fn code_name(e: &CallError) -> &'static str {
    e.code().name()
}

/// Runs one call on `target` (connection `idx` modulo the connection count).
/// `intended` is when an open loop meant to start it; `None` (closed loop)
/// means now, so corrected and uncorrected latency are the same.
pub async fn call_once(
    target: &Target,
    work: &Workload,
    idx: usize,
    intended: Option<Instant>,
) -> CallRecord {
    let start = Instant::now();
    let intended = intended.unwrap_or(start);
    let mut record = CallRecord {
        corrected: Duration::ZERO,
        uncorrected: Duration::ZERO,
        outcome: Ok(()),
        client: Duration::ZERO,
        server: None,
        up: work.up_bytes(),
        down: 0,
    };
    match target {
        Target::Remote(clients) => {
            let client = &clients[idx % clients.len()];
            match client.execute(&work.call).await {
                Ok(r) => {
                    record.client = r.client_timings().encode;
                    record.server = Some(r.timings());
                    record.down = r.payload_len() as u64;
                }
                Err(e) => {
                    if let CallError::Status { timings, .. } = &e {
                        record.server = Some(*timings);
                    }
                    record.outcome = Err(code_name(&e));
                }
            }
        }
        Target::Local(dispatcher) => {
            let payload = work.payload.clone();
            record.client = start.elapsed();
            match dispatcher.dispatch(&work.header, payload).await {
                Ok(out) => {
                    record.server = Some(out.timings);
                    record.down = out.payload.len() as u64;
                }
                Err(e) => record.outcome = Err(e.code.name()),
            }
        }
        Target::Raw(clients) => {
            let client = &clients[idx % clients.len()];
            match client.echo(&work.payload, work.down_bytes).await {
                Ok(n) => record.down = n,
                Err(_) => record.outcome = Err("UNAVAILABLE"),
            }
        }
    }
    let end = Instant::now();
    record.uncorrected = end - start;
    record.corrected = end.saturating_duration_since(intended);
    record
}

/// The shape of the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// `concurrency` calls always in flight.
    Closed {
        /// Calls in flight.
        concurrency: usize,
    },
    /// Calls started at a fixed rate, at most `max_inflight` at once.
    Open {
        /// Calls per second.
        rate: f64,
        /// Cap on calls in flight; past it the generator waits, and the
        /// wait counts in corrected latency.
        max_inflight: usize,
    },
}

/// When the measured phase ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long.
    After(Duration),
    /// After this many calls.
    Requests(u64),
}

/// A run's phases.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Unrecorded warm-up.
    pub warmup: Duration,
    /// The measured phase's end.
    pub stop: Stop,
}

/// The warm-up of a target's later rounds, when its first round had the
/// full one: enough for its connection to come back from idle.
const REWARM: Duration = Duration::from_millis(200);

impl Phases {
    /// Round `round` (from 0) of `rounds`: a share of the measured phase
    /// (calls split as evenly as they go), after the full warm-up in the
    /// first round and a short one in later rounds.
    pub fn round(self, round: u32, rounds: u32) -> Self {
        let rounds = rounds.max(1);
        Self {
            warmup: if round == 0 {
                self.warmup
            } else {
                self.warmup.min(REWARM)
            },
            stop: match self.stop {
                Stop::After(d) => Stop::After(d / rounds),
                Stop::Requests(n) => {
                    let (each, extra) = (n / u64::from(rounds), n % u64::from(rounds));
                    Stop::Requests(each + u64::from(u64::from(round) < extra))
                }
            },
        }
    }
}

/// Live state of a run, for the progress display.
#[derive(Debug)]
pub struct Live {
    /// The recorder of the measured phase.
    pub recorder: Mutex<Recorder>,
    /// When measuring started (set after warm-up).
    pub measuring_since: Mutex<Option<Instant>>,
    /// Measured calls started.
    pub issued: AtomicU64,
    /// Calls finished, warm-up included (what the transport counts cover).
    pub finished: AtomicU64,
}

impl Live {
    fn new() -> Self {
        Self {
            recorder: Mutex::new(Recorder::new()),
            measuring_since: Mutex::new(None),
            issued: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        }
    }

    fn record(&self, r: &CallRecord) {
        if let Ok(mut rec) = self.recorder.lock() {
            rec.record(r);
        }
    }
}

/// The outcome of one run.
#[derive(Debug)]
pub struct RunOutput {
    /// Everything recorded.
    pub recorder: Recorder,
    /// Length of the measured phase.
    pub elapsed: Duration,
    /// True if the run was stopped early (Ctrl-C).
    pub interrupted: bool,
}

/// Runs `load` against `target` through the warm-up and measured phases.
/// `live` is updated as calls finish (for a progress display); `cancel`
/// stops the run early, keeping what was measured.
pub async fn run(
    target: Target,
    work: Arc<Workload>,
    load: Load,
    phases: Phases,
    live: Arc<Live>,
    cancel: CancellationToken,
) -> RunOutput {
    let t0 = Instant::now();
    let measure_from = t0 + phases.warmup;
    let measure_until = match phases.stop {
        Stop::After(d) => Some(measure_from + d),
        Stop::Requests(_) => None,
    };
    let limit = match phases.stop {
        Stop::Requests(n) => n,
        Stop::After(_) => u64::MAX,
    };
    // Claims a measured slot for a call intended to start at `at`: None when
    // the run is over, Some(false) in warm-up, Some(true) when measured.
    let claim = {
        let live = live.clone();
        move |at: Instant| -> Option<bool> {
            if measure_until.is_some_and(|end| at >= end) {
                return None;
            }
            if at < measure_from {
                return Some(false);
            }
            if let Ok(mut since) = live.measuring_since.lock() {
                since.get_or_insert(measure_from);
            }
            let n = live.issued.fetch_add(1, Ordering::Relaxed);
            (n < limit).then_some(true)
        }
    };
    let mut tasks = JoinSet::new();
    match load {
        Load::Closed { concurrency } => {
            for worker in 0..concurrency.max(1) {
                let (target, work, live, cancel, claim) = (
                    target.clone(),
                    work.clone(),
                    live.clone(),
                    cancel.clone(),
                    claim.clone(),
                );
                tasks.spawn(async move {
                    while !cancel.is_cancelled() {
                        let now = Instant::now();
                        let Some(measured) = claim(now) else { break };
                        let r = tokio::select! {
                            r = call_once(&target, &work, worker, None) => r,
                            () = cancel.cancelled() => break,
                        };
                        live.finished.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            live.record(&r);
                        }
                    }
                });
            }
        }
        Load::Open { rate, max_inflight } => {
            // Calls start from a thread of their own, which sleeps until
            // just before each intended start and yields for the rest.
            // tokio's timer has millisecond granularity: on it, calls
            // started in bursts at each tick, and every corrected latency
            // carried up to a millisecond of the generator's own lateness.
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
            let slots = Arc::new(Semaphore::new(max_inflight.max(1)));
            let handle = tokio::runtime::Handle::current();
            let (target, work, live, cancel) =
                (target.clone(), work.clone(), live.clone(), cancel.clone());
            let issuer = tokio::task::spawn_blocking(move || {
                let mut tasks = JoinSet::new();
                let mut i: u64 = 0;
                loop {
                    let intended = t0 + interval.mul_f64(i as f64);
                    i += 1;
                    let Some(measured) = claim(intended) else {
                        break;
                    };
                    if !wait_until(intended, &cancel) {
                        break;
                    }
                    // Waiting on the runtime only when every slot is taken.
                    let permit = slots.clone().try_acquire_owned().ok().or_else(|| {
                        handle.block_on(async {
                            tokio::select! {
                                p = slots.clone().acquire_owned() => p.ok(),
                                () = cancel.cancelled() => None,
                            }
                        })
                    });
                    let Some(permit) = permit else { break };
                    let (target, work, live) = (target.clone(), work.clone(), live.clone());
                    let idx = i as usize;
                    tasks.spawn_on(
                        async move {
                            let r = call_once(&target, &work, idx, Some(intended)).await;
                            drop(permit);
                            live.finished.fetch_add(1, Ordering::Relaxed);
                            if measured {
                                live.record(&r);
                            }
                        },
                        &handle,
                    );
                    // Reap finished tasks so the set does not grow with the run.
                    while tasks.try_join_next().is_some() {}
                }
                tasks
            });
            match issuer.await {
                Ok(issued) => tasks = issued,
                // The issuer's calls were aborted with it; what they
                // recorded stays.
                Err(e) => eprintln!("the open-loop call generator failed: {e}"),
            }
        }
    }
    // Let calls in flight finish; on Ctrl-C, give them a moment, no more.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if cancel.is_cancelled() {
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    } else {
        tokio::select! {
            () = drain => {}
            () = cancel.cancelled() => {}
        }
    }
    tasks.abort_all();
    let end = Instant::now();
    let started = live
        .measuring_since
        .lock()
        .ok()
        .and_then(|s| *s)
        .unwrap_or(end);
    let recorder = live.recorder.lock().map(|r| r.clone()).unwrap_or_default();
    RunOutput {
        recorder,
        elapsed: end.saturating_duration_since(started),
        interrupted: cancel.is_cancelled(),
    }
}

/// Blocks until `deadline`, to within a few microseconds: sleeps until
/// shortly before it (a sleeping thread is woken up to about 100 us late)
/// and yields the processor for the rest. False if `cancel` fired first.
fn wait_until(deadline: Instant, cancel: &CancellationToken) -> bool {
    const YIELD_FOR: Duration = Duration::from_micros(150);
    loop {
        if cancel.is_cancelled() {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        if left > YIELD_FOR {
            // In slices, so a cancellation is seen within 50 ms.
            std::thread::sleep((left - YIELD_FOR).min(Duration::from_millis(50)));
        } else {
            std::thread::yield_now();
        }
    }
}

/// A fresh live state for a run.
pub fn live() -> Arc<Live> {
    Arc::new(Live::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_share_the_measured_phase_and_rewarm_briefly() {
        let phases = Phases {
            warmup: Duration::from_secs(1),
            stop: Stop::Requests(150),
        };
        let shares: Vec<Phases> = (0..4).map(|r| phases.round(r, 4)).collect();
        let calls: Vec<u64> = shares
            .iter()
            .map(|p| match p.stop {
                Stop::Requests(n) => n,
                Stop::After(_) => 0,
            })
            .collect();
        assert_eq!(calls, [38, 38, 37, 37]);
        assert_eq!(shares[0].warmup, Duration::from_secs(1));
        assert!(shares[1..].iter().all(|p| p.warmup == REWARM));

        let timed = Phases {
            warmup: Duration::from_millis(50),
            stop: Stop::After(Duration::from_secs(5)),
        };
        let later = timed.round(3, 5);
        assert_eq!(later.stop, Stop::After(Duration::from_secs(1)));
        // A warm-up shorter than the re-warm is kept as it is.
        assert_eq!(later.warmup, Duration::from_millis(50));
        assert_eq!(timed.round(0, 1).stop, timed.stop);
    }

    #[test]
    fn transport_counts_add_up_over_rounds() {
        let at = |up, down, lost, rtt_us, mtu| TransportCounts {
            datagrams_up: up,
            datagrams_down: down,
            lost_packets: lost,
            rtt: Duration::from_micros(rtt_us),
            mtu,
            reconnects: 0,
        };
        let first = at(110, 60, 1, 90, 1452).since(at(10, 5, 0, 80, 1200));
        let second = at(400, 300, 4, 70, 6480).since(at(300, 250, 3, 100, 1452));
        let sum = first.plus(second);
        assert_eq!(sum, at(200, 105, 2, 70, 6480));
    }
}
