//! Reports: the terminal table, the JSON document (schema in
//! `benches/README.md`), and HdrHistogram's percentile-distribution text.

use std::io::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::load::{Load, TransportCounts};
use super::stats::{BreakdownRow, Recorder, Summary};

/// The load of a run, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum LoadJson {
    /// Closed loop.
    Closed {
        /// Calls in flight.
        concurrency: usize,
        /// Connections the calls are spread over.
        connections: usize,
    },
    /// Open loop.
    Open {
        /// Target calls per second.
        rate: f64,
        /// Cap on calls in flight.
        max_inflight: usize,
        /// Connections the calls are spread over.
        connections: usize,
    },
}

impl LoadJson {
    /// The report form of `load`.
    pub fn of(load: Load, connections: usize) -> Self {
        match load {
            Load::Closed { concurrency } => Self::Closed {
                concurrency,
                connections,
            },
            Load::Open { rate, max_inflight } => Self::Open {
                rate,
                max_inflight,
                connections,
            },
        }
    }

    /// A short label: `c=64` or `rate=1000/s`.
    pub fn label(&self) -> String {
        match self {
            Self::Closed { concurrency, .. } => format!("c={concurrency}"),
            Self::Open { rate, .. } => format!("rate={rate}/s"),
        }
    }
}

/// One run (one sweep step against one target).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `remote c=64`, `local c=64`, `raw c=64`...
    pub label: String,
    /// `remote`, `local` or `raw`.
    pub target: &'static str,
    /// The load.
    pub load: LoadJson,
    /// Rounds the run was measured in, alternating with the other
    /// targets (`--rounds`); the numbers are over all of them.
    pub rounds: u32,
    /// True if Ctrl-C cut the run short.
    pub interrupted: bool,
    /// The numbers.
    #[serde(flatten)]
    pub summary: Summary,
    /// What the QUIC connections carried during the run (warm-up
    /// included); none for the in-process target.
    pub transport: Option<TransportJson>,
    /// This process's CPU time (user and system, every thread) per call
    /// over the run, warm-up included, microseconds: the client's, and the
    /// server's where it runs in this process (`--embedded`, the in-process
    /// target, the raw echo); none without a process CPU clock or when the
    /// run was interrupted.
    pub cpu_us_per_call: Option<f64>,
    /// The recorder, for the `.hgrm` files and plots.
    #[serde(skip)]
    pub recorder: Recorder,
}

/// A run's QUIC traffic, per call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TransportJson {
    /// UDP datagrams the client sent per call.
    pub datagrams_up_per_call: f64,
    /// UDP datagrams the client received per call.
    pub datagrams_down_per_call: f64,
    /// Packets QUIC declared lost during the run.
    pub lost_packets: u64,
    /// QUIC's round-trip estimate at the end of the run, microseconds.
    pub rtt_us: u64,
    /// The largest UDP payload the client sent at the end of the run, as
    /// MTU discovery left it, bytes.
    pub mtu: u16,
}

impl TransportJson {
    /// The traffic `counts` (what was counted over a run) over `calls`
    /// calls; none without calls.
    pub fn of(counts: TransportCounts, calls: u64) -> Option<Self> {
        if calls == 0 {
            return None;
        }
        let per_call = |n: u64| n as f64 / calls as f64;
        Some(Self {
            datagrams_up_per_call: per_call(counts.datagrams_up),
            datagrams_down_per_call: per_call(counts.datagrams_down),
            lost_packets: counts.lost_packets,
            rtt_us: u64::try_from(counts.rtt.as_micros()).unwrap_or(u64::MAX),
            mtu: counts.mtu,
        })
    }
}

/// Remote against a baseline, for one step.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The step's load label.
    pub step: String,
    /// `local` or `raw`.
    pub baseline: &'static str,
    /// Remote p50 / baseline p50.
    pub p50_ratio: f64,
    /// Remote p99 / baseline p99.
    pub p99_ratio: f64,
    /// Remote calls/s / baseline calls/s.
    pub throughput_ratio: f64,
    /// Remote p50 minus baseline p50, microseconds: what going remote adds.
    pub p50_added_us: f64,
    /// Remote CPU time per call / baseline CPU time per call; only where
    /// the Quasar server runs in this process as the baseline's does
    /// (`--embedded`), so that both count client and server.
    pub cpu_ratio: Option<f64>,
}

/// The whole JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Schema version of this document.
    pub schema: u32,
    /// The Quasar version that wrote it.
    pub quasar_version: &'static str,
    /// The server: its address, or `embedded`.
    pub server: String,
    /// The local adapter, when the server is embedded or `--compare-local` ran.
    pub adapter: Option<String>,
    /// Kernel name.
    pub kernel: String,
    /// Problem size of a shipped kernel's sample (none for given inputs).
    pub size: Option<usize>,
    /// Request payload bytes per call.
    pub request_bytes: u64,
    /// Response payload bytes per call.
    pub response_bytes: u64,
    /// Every run, remote first for each step.
    pub runs: Vec<RunReport>,
    /// Remote against the baselines, per step.
    pub comparisons: Vec<Comparison>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// Compares a remote run with a baseline run of the same step;
/// `server_in_process` says whether the remote run's CPU time includes its
/// server's, as the baseline's does.
pub fn compare(remote: &RunReport, base: &RunReport, server_in_process: bool) -> Comparison {
    let (r, b) = (&remote.summary, &base.summary);
    Comparison {
        step: remote.load.label(),
        baseline: base.target,
        p50_ratio: ratio(r.latency_us.p50 as f64, b.latency_us.p50 as f64),
        p99_ratio: ratio(r.latency_us.p99 as f64, b.latency_us.p99 as f64),
        throughput_ratio: ratio(r.throughput.calls_per_s, b.throughput.calls_per_s),
        p50_added_us: r.latency_us.p50 as f64 - b.latency_us.p50 as f64,
        cpu_ratio: remote
            .cpu_us_per_call
            .zip(base.cpu_us_per_call)
            .filter(|_| server_in_process)
            .map(|(r, b)| ratio(r, b)),
    }
}

/// Formats microseconds for the table.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}ms", v / 1000.0)
    } else {
        format!("{v:.0}us")
    }
}

fn breakdown_line(row: &BreakdownRow) -> String {
    let p = &row.parts;
    let wait = if p.wait > 0.0 {
        format!("wait {:>8} + ", us(p.wait))
    } else {
        String::new()
    };
    format!(
        "    p{:<6} {:>9} = {wait}client {:>7} + queue {:>7} + submit {:>7} + gpu {:>7} + readback {:>7} + server {:>7} + network {:>7}",
        row.percentile,
        us(p.total),
        us(p.client),
        us(p.queue),
        us(p.submit),
        us(p.gpu),
        us(p.readback),
        us(p.server),
        us(p.network)
    )
}

/// Writes the human-readable report.
pub fn print_table(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "kernel {}{}: {} B up, {} B down per call; server {}",
        report.kernel,
        report
            .size
            .map(|s| format!(" size {s}"))
            .unwrap_or_default(),
        report.request_bytes,
        report.response_bytes,
        report.server
    )?;
    if let Some(a) = &report.adapter {
        writeln!(out, "local adapter: {a}")?;
    }
    for run in &report.runs {
        let s = &run.summary;
        let l = &s.latency_us;
        writeln!(out)?;
        writeln!(
            out,
            "{}{}{}: {} calls ({} ok{}) in {:.2}s: {:.0} calls/s, {:.2} MB/s up, {:.2} MB/s down",
            run.label,
            if run.rounds > 1 {
                format!(" in {} rounds", run.rounds)
            } else {
                String::new()
            },
            if run.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            s.calls,
            s.ok,
            if s.errors.is_empty() {
                String::new()
            } else {
                format!(
                    ", errors: {}",
                    s.errors
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            s.duration_s,
            s.throughput.calls_per_s,
            s.throughput.mb_per_s_up,
            s.throughput.mb_per_s_down,
        )?;
        writeln!(
            out,
            "    {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "min", "mean", "stdev", "p50", "p90", "p99", "p99.9", "p99.99", "max"
        )?;
        let row = |l: &super::stats::LatencySummary| {
            format!(
                "    {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                us(l.min as f64),
                us(l.mean),
                us(l.stdev),
                us(l.p50 as f64),
                us(l.p90 as f64),
                us(l.p99 as f64),
                us(l.p99_9 as f64),
                us(l.p99_99 as f64),
                us(l.max as f64)
            )
        };
        writeln!(out, "{}", row(l))?;
        if matches!(run.load, LoadJson::Open { .. }) {
            writeln!(out, "{}  (uncorrected)", row(&s.latency_uncorrected_us))?;
        }
        if let Some(t) = &run.transport {
            writeln!(
                out,
                "  transport: {:.2} datagrams up, {:.2} down per call; {} lost; rtt {}; mtu {}",
                t.datagrams_up_per_call,
                t.datagrams_down_per_call,
                t.lost_packets,
                us(t.rtt_us as f64),
                t.mtu
            )?;
        }
        if let Some(cpu) = run.cpu_us_per_call {
            writeln!(out, "  cpu: {cpu:.1} us per call in this process")?;
        }
        if !s.breakdown_us.is_empty() && run.target != "raw" {
            writeln!(out, "  where the time went:")?;
            for b in &s.breakdown_us {
                writeln!(out, "{}", breakdown_line(b))?;
            }
        }
    }
    if !report.comparisons.is_empty() {
        writeln!(out)?;
        writeln!(out, "the price of remote:")?;
        for c in &report.comparisons {
            writeln!(
                out,
                "  {:<14} vs {:<5}  p50 x{:.2} ({:+.0} us)   p99 x{:.2}   throughput x{:.2}{}",
                c.step,
                c.baseline,
                c.p50_ratio,
                c.p50_added_us,
                c.p99_ratio,
                c.throughput_ratio,
                c.cpu_ratio
                    .map(|r| format!("   cpu x{r:.2}"))
                    .unwrap_or_default()
            )?;
        }
    }
    Ok(())
}

/// Writes a histogram in HdrHistogram's percentile-distribution text format
/// (values in milliseconds, 5 ticks per half distance), which the standard
/// HdrHistogram plotter loads.
pub fn write_hgrm(h: &Histogram<u64>, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let value = v.value_iterated_to() as f64 / 1000.0;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            writeln!(
                out,
                "{value:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            )?;
        } else {
            writeln!(out, "{value:12.3} {q:2.12} {total:10}")?;
        }
    }
    let sub_buckets = 2u64.pow((2.0 * 10f64.powi(i32::from(h.sigfig()))).log2().ceil() as u32);
    writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    )?;
    writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn run(target: &'static str, cpu_us_per_call: Option<f64>) -> RunReport {
        let recorder = Recorder::new();
        RunReport {
            label: format!("{target} c=1"),
            target,
            load: LoadJson::of(Load::Closed { concurrency: 1 }, 1),
            rounds: 1,
            interrupted: false,
            summary: recorder.summary(Duration::from_secs(1)),
            transport: None,
            cpu_us_per_call,
            recorder,
        }
    }

    #[test]
    fn cpu_is_compared_only_when_both_runs_count_their_server() {
        let (remote, raw) = (run("remote", Some(30.0)), run("raw", Some(20.0)));
        assert_eq!(compare(&remote, &raw, true).cpu_ratio, Some(1.5));
        // A remote server's CPU is not this process's: no ratio.
        assert_eq!(compare(&remote, &raw, false).cpu_ratio, None);
        assert_eq!(compare(&remote, &run("raw", None), true).cpu_ratio, None);
    }

    #[test]
    fn hgrm_lines_parse_and_end_at_the_total() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram");
        for v in 1..=10_000u64 {
            h.record(v * 7).expect("record");
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let rows: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                l.split_whitespace()
                    .map(|c| c.parse().expect("number"))
                    .collect()
            })
            .collect();
        assert!(rows.len() > 20);
        assert!(
            rows.windows(2)
                .all(|w| w[0][1] <= w[1][1] && w[0][0] <= w[1][0])
        );
        assert_eq!(rows.last().map(|r| r[2]), Some(10_000.0));
        assert!(text.contains("#[Buckets ="));
    }
}
