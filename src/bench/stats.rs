//! What a run records: latency histograms (hdrhistogram, 3 significant
//! digits, microseconds), per-call time components for the breakdown,
//! throughput, and errors by status code.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold: an hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

/// Where one call's time went, in microseconds. `network` is the remainder:
/// the call's total minus every part measured on either side, so the parts
/// always add up to the total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Parts {
    /// The call's latency (from its intended start in an open loop).
    pub total: f64,
    /// Open loop: waiting to be sent, from the intended start to the actual
    /// one (what coordinated-omission correction adds). Zero in a closed loop.
    pub wait: f64,
    /// Client-side preparation: encoding the request header (remote), or
    /// copying the payload (in-process).
    pub client: f64,
    /// Waiting in the server's GPU queue.
    pub queue: f64,
    /// Device work around the dispatches: uploads staged by the queue,
    /// clears, output copies, submission and completion latency (zero where
    /// the adapter has no timestamp queries: then it is all in `gpu`).
    pub submit: f64,
    /// GPU execution: the compute pass from timestamp queries, or where the
    /// adapter has none, submission to completion on the executor's clock.
    pub gpu: f64,
    /// Copying the outputs out of the mapped readback buffer.
    pub readback: f64,
    /// The server's own handling, from the request's header read to the
    /// reply ready, less queue, device and readback: reading the payload,
    /// checking the request, handing the call to the GPU thread and being
    /// woken with its result (for the local baseline, the same minus any
    /// reading).
    pub server: f64,
    /// The rest: transfer both ways, the client's and the server's stream
    /// I/O outside `server`, and writing the reply.
    pub network: f64,
}

impl Parts {
    /// Parts of a call whose total is `total_us`, with the measured parts;
    /// if the measured parts exceed the total (clocks of two machines), they
    /// are scaled down to fit and the remainder is zero.
    pub fn new(
        total_us: u64,
        wait: u64,
        client: u64,
        queue: u64,
        device: Device,
        readback: u64,
        server: u64,
    ) -> Self {
        let total = total_us as f64;
        let (submit, gpu) = match device.kernel_us {
            Some(k) => (device.gpu_us.saturating_sub(k), k.min(device.gpu_us)),
            None => (0, device.gpu_us),
        };
        let mut v = [
            wait as f64,
            client as f64,
            queue as f64,
            submit as f64,
            gpu as f64,
            readback as f64,
            server as f64,
        ];
        let measured: f64 = v.iter().sum();
        if measured > total && measured > 0.0 {
            let k = total / measured;
            v.iter_mut().for_each(|x| *x *= k);
        }
        let [w, c, q, s, g, r, h] = v;
        Self {
            total,
            wait: w,
            client: c,
            queue: q,
            submit: s,
            gpu: g,
            readback: r,
            server: h,
            network: (total - v.iter().sum::<f64>()).max(0.0),
        }
    }

    fn add(&mut self, o: &Parts) {
        self.total += o.total;
        self.wait += o.wait;
        self.client += o.client;
        self.queue += o.queue;
        self.submit += o.submit;
        self.gpu += o.gpu;
        self.readback += o.readback;
        self.server += o.server;
        self.network += o.network;
    }

    fn scale(&mut self, k: f64) {
        self.total *= k;
        self.wait *= k;
        self.client *= k;
        self.queue *= k;
        self.submit *= k;
        self.gpu *= k;
        self.readback *= k;
        self.server *= k;
        self.network *= k;
    }
}

/// The server's device timings of a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Device {
    /// Submission to completion, executor clock.
    pub gpu_us: u64,
    /// The compute pass alone, from timestamp queries.
    pub kernel_us: Option<u64>,
}

/// One finished call, as the load generator saw it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// Latency from the intended start (open loop) or the actual start.
    pub corrected: Duration,
    /// Latency from the actual start.
    pub uncorrected: Duration,
    /// `Ok` or the status code's name.
    pub outcome: Result<(), &'static str>,
    /// Client-side preparation time.
    pub client: Duration,
    /// The server's (or local executor's) timings, if it answered.
    pub server: Option<quasar_transport::Timings>,
    /// Payload bytes sent.
    pub up: u64,
    /// Payload bytes received.
    pub down: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Accumulates the calls of one run.
#[derive(Debug, Clone)]
pub struct Recorder {
    corrected: Histogram<u64>,
    uncorrected: Histogram<u64>,
    parts: Vec<Parts>,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    up: u64,
    down: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

#[allow(clippy::expect_used)] // Constant bounds that hdrhistogram accepts: it cannot fail.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self {
            corrected: histogram(),
            uncorrected: histogram(),
            parts: Vec::new(),
            ok: 0,
            errors: BTreeMap::new(),
            up: 0,
            down: 0,
        }
    }

    /// Records one call. Failed calls count as errors and are not in the
    /// latency histograms (their latency says nothing about the service).
    pub fn record(&mut self, r: &CallRecord) {
        match r.outcome {
            Ok(()) => {
                self.ok += 1;
                let total = micros(r.corrected);
                self.corrected.saturating_record(total);
                self.uncorrected.saturating_record(micros(r.uncorrected));
                let t = r.server.unwrap_or_default();
                self.parts.push(Parts::new(
                    total,
                    u64::try_from(r.corrected.saturating_sub(r.uncorrected).as_micros())
                        .unwrap_or(u64::MAX),
                    u64::try_from(r.client.as_micros()).unwrap_or(u64::MAX),
                    t.queued_us,
                    Device {
                        gpu_us: t.gpu_us,
                        kernel_us: t.kernel_us,
                    },
                    t.readback_us,
                    t.total_us
                        .saturating_sub(t.queued_us)
                        .saturating_sub(t.gpu_us)
                        .saturating_sub(t.readback_us),
                ));
                self.up += r.up;
                self.down += r.down;
            }
            Err(code) => *self.errors.entry(code).or_default() += 1,
        }
    }

    /// Adds another recorder's calls (a later round of the same run),
    /// taking its per-call parts rather than copying them.
    pub fn merge(&mut self, other: Recorder) {
        for (mine, theirs) in [
            (&mut self.corrected, &other.corrected),
            (&mut self.uncorrected, &other.uncorrected),
        ] {
            // Both have the same bounds, so `add` cannot refuse; were it
            // to, the values go in one by one, saturating like `record`.
            if mine.add(theirs).is_err() {
                for v in theirs.iter_recorded() {
                    mine.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                }
            }
        }
        if self.parts.is_empty() {
            self.parts = other.parts;
        } else {
            self.parts.extend(other.parts);
        }
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.up += other.up;
        self.down += other.down;
    }

    /// Successful calls so far.
    pub fn ok(&self) -> u64 {
        self.ok
    }

    /// Failed calls so far.
    pub fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The corrected latency histogram.
    pub fn corrected(&self) -> &Histogram<u64> {
        &self.corrected
    }

    /// The uncorrected latency histogram.
    pub fn uncorrected(&self) -> &Histogram<u64> {
        &self.uncorrected
    }

    /// Every successful call's parts, in completion order.
    pub fn parts(&self) -> &[Parts] {
        &self.parts
    }

    /// Summarises the run, which lasted `elapsed` (measured phase only).
    pub fn summary(&self, elapsed: Duration) -> Summary {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Summary {
            calls: self.ok + self.errors(),
            ok: self.ok,
            errors: self
                .errors
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            duration_s: elapsed.as_secs_f64(),
            throughput: Throughput {
                calls_per_s: self.ok as f64 / secs,
                mb_per_s_up: self.up as f64 / secs / 1e6,
                mb_per_s_down: self.down as f64 / secs / 1e6,
            },
            latency_us: LatencySummary::of(&self.corrected),
            latency_uncorrected_us: LatencySummary::of(&self.uncorrected),
            breakdown_us: breakdown(&self.parts),
        }
    }
}

/// Latency statistics in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stdev: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
    /// 99.99th percentile.
    pub p99_99: u64,
    /// Largest.
    pub max: u64,
}

impl LatencySummary {
    /// Statistics of a histogram (all zero if it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            min: h.min(),
            mean: h.mean(),
            stdev: h.stdev(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            p99_99: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }
}

/// Calls per second and payload megabytes (10^6 bytes) per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Throughput {
    /// Successful calls per second.
    pub calls_per_s: f64,
    /// Request payload sent per second.
    pub mb_per_s_up: f64,
    /// Response payload received per second.
    pub mb_per_s_down: f64,
}

/// Where the time went at one percentile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakdownRow {
    /// The percentile, e.g. 99.0.
    pub percentile: f64,
    /// Mean parts of the calls ranked around that percentile.
    #[serde(flatten)]
    pub parts: Parts,
}

/// A run's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Calls measured (ok + errors).
    pub calls: u64,
    /// Successful calls.
    pub ok: u64,
    /// Failed calls by status code name.
    pub errors: BTreeMap<String, u64>,
    /// Length of the measured phase.
    pub duration_s: f64,
    /// Throughput.
    pub throughput: Throughput,
    /// Latency, coordinated-omission corrected (from each call's intended
    /// start; the same as uncorrected in a closed loop).
    pub latency_us: LatencySummary,
    /// Latency from each call's actual start.
    pub latency_uncorrected_us: LatencySummary,
    /// Where the time went at p50, p90, p99, p99.9 and p99.99.
    pub breakdown_us: Vec<BreakdownRow>,
}

/// Percentiles the breakdown reports.
pub const BREAKDOWN_PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 99.99];

/// For each percentile, the mean parts of the calls ranked around it (at
/// least the one call at that rank), so the parts add up to a latency at
/// that percentile. The window is half a percent of the calls, narrowed to
/// a tenth of the tail above the percentile, so that a p99.9 row averages
/// calls near p99.9 and not the whole top percent. Percentiles finer than
/// the sample resolves (99.99 with fewer than 10,000 calls) are left out.
pub fn breakdown(parts: &[Parts]) -> Vec<BreakdownRow> {
    let n = parts.len();
    if n == 0 {
        return Vec::new();
    }
    let mut sorted: Vec<&Parts> = parts.iter().collect();
    sorted.sort_by(|a, b| a.total.total_cmp(&b.total));
    BREAKDOWN_PERCENTILES
        .iter()
        .filter(|&&p| p <= 50.0 || (n as f64) * (1.0 - p / 100.0) >= 1.0 - 1e-9)
        .map(|&p| {
            let rank = (((p / 100.0) * n as f64).ceil() as usize).clamp(1, n) - 1;
            let tail = (n as f64) * (1.0 - p / 100.0) * 0.1;
            let window = ((n as f64) * 0.005).min(tail).floor() as usize;
            let lo = rank.saturating_sub(window);
            let hi = (rank + window).min(n - 1);
            let mut acc = Parts::default();
            for q in &sorted[lo..=hi] {
                acc.add(q);
            }
            acc.scale(1.0 / (hi - lo + 1) as f64);
            BreakdownRow {
                percentile: p,
                parts: acc,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_recorders_hold_both_rounds() {
        let call = |us: u64, outcome| CallRecord {
            outcome,
            corrected: Duration::from_micros(us),
            uncorrected: Duration::from_micros(us),
            client: Duration::ZERO,
            server: None,
            up: 64,
            down: 32,
        };
        let (mut a, mut b) = (Recorder::new(), Recorder::new());
        a.record(&call(100, Ok(())));
        a.record(&call(0, Err("UNAVAILABLE")));
        b.record(&call(300, Ok(())));
        b.record(&call(200, Ok(())));
        b.record(&call(0, Err("UNAVAILABLE")));
        a.merge(b);
        assert_eq!((a.ok(), a.errors()), (3, 2));
        assert_eq!(a.corrected().len(), 3);
        assert_eq!(a.uncorrected().max(), 300);
        assert_eq!(a.parts().len(), 3);
        let s = a.summary(Duration::from_secs(1));
        assert_eq!(s.errors.get("UNAVAILABLE"), Some(&2));
        assert_eq!(s.throughput.mb_per_s_up, 3.0 * 64.0 / 1e6);
        assert_eq!(s.latency_us.p50, 200);
    }

    #[test]
    fn parts_add_up_and_never_exceed_the_total() {
        let dev = |gpu_us, kernel_us| Device { gpu_us, kernel_us };
        let p = Parts::new(100, 0, 10, 20, dev(30, Some(12)), 5, 7);
        assert_eq!(
            (p.submit, p.gpu, p.server, p.network),
            (18.0, 12.0, 7.0, 28.0)
        );
        let sum =
            p.wait + p.client + p.queue + p.submit + p.gpu + p.readback + p.server + p.network;
        assert!((sum - p.total).abs() < 1e-9);
        let p = Parts::new(100, 0, 10, 20, dev(30, None), 5, 0);
        assert_eq!((p.submit, p.gpu), (0.0, 30.0));
        // Server parts larger than the client's total (another clock).
        let p = Parts::new(100, 10, 50, 50, dev(50, None), 50, 20);
        assert!(
            p.wait + p.client + p.queue + p.submit + p.gpu + p.readback + p.server
                <= p.total + 1e-9
        );
        assert_eq!(p.network, 0.0);
    }

    /// Calls of total 1, 2, ... `n` us with the same small parts.
    fn calls_up_to(n: u64) -> Vec<Parts> {
        let device = Device {
            gpu_us: 3,
            kernel_us: None,
        };
        (1..=n)
            .map(|t| Parts::new(t, 0, 1, 2, device, 4, 0))
            .collect()
    }

    #[test]
    fn breakdown_rows_follow_the_totals() {
        let rows = breakdown(&calls_up_to(1000));
        assert_eq!(rows.len(), 4, "99.99 needs 10,000 calls");
        assert!((rows[0].parts.total - 500.0).abs() <= 5.0);
        assert!(
            rows.windows(2)
                .all(|w| w[0].parts.total <= w[1].parts.total)
        );
    }

    #[test]
    fn tail_rows_average_calls_near_their_percentile() {
        let rows = breakdown(&calls_up_to(100_000));
        for (row, want) in rows
            .iter()
            .zip([50_000.0, 90_000.0, 99_000.0, 99_900.0, 99_990.0])
        {
            assert!(
                (row.parts.total - want).abs() <= want * 0.0005,
                "p{} row averages {} us, the percentile is {want} us",
                row.percentile,
                row.parts.total
            );
        }
    }
}
