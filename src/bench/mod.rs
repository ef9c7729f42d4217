//! The engine of `quasar bench`: load shapes, targets, statistics, reports
//! and plots. The command line (`src/cli/bench.rs`) only parses arguments and
//! sets up the targets; everything measurable lives here, where the tests
//! can drive it too.
//!
//! # Layout
//! - [`load`]: targets (remote server, local executor, raw QUIC echo), the
//!   closed and open loops, warm-up and stop conditions.
//! - [`stats`]: hdrhistogram recording, per-call time parts, summaries.
//! - [`report`]: the terminal table, JSON, and `.hgrm` text.
//! - [`plot`]: SVG/PNG plots.
//! - [`raw`]: the raw QUIC echo baseline.

pub mod load;
pub mod plot;
pub mod raw;
pub mod report;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use load::{Live, Load, Phases, Stop, Target, TransportCounts, Workload};
use report::{LoadJson, RunReport};
use stats::Recorder;

/// What to run against which targets.
#[derive(Clone)]
pub struct Plan {
    /// One step per load (a sweep has several).
    pub steps: Vec<Load>,
    /// Connections calls are spread over (for labels; the targets hold them).
    pub connections: usize,
    /// Warm-up and stop.
    pub phases: Phases,
    /// The Quasar server.
    pub remote: Target,
    /// The in-process baseline, if compared.
    pub local: Option<Target>,
    /// The raw QUIC echo baseline, if compared.
    pub raw: Option<Target>,
    /// Show live progress on the terminal.
    pub progress: bool,
    /// Rounds the targets take turns in, each measured for a share of the
    /// run (at least 1).
    pub rounds: u32,
    /// The Quasar server runs in this process (`--embedded`), as the
    /// baselines' servers always do, so their CPU time per call compares.
    pub server_in_process: bool,
}

/// Runs every step against every target: remote first, then the baselines
/// under the same load, in `plan.rounds` alternating rounds. Stops early
/// (keeping what was measured) when `cancel` fires.
pub async fn execute(
    plan: &Plan,
    work: Arc<Workload>,
    cancel: &CancellationToken,
) -> (Vec<RunReport>, Vec<report::Comparison>) {
    let mut runs = Vec::new();
    let mut comparisons = Vec::new();
    let rounds = plan.rounds.max(1);
    for &load in &plan.steps {
        let targets: Vec<&Target> = std::iter::once(&plan.remote)
            .chain(plan.local.iter())
            .chain(plan.raw.iter())
            .collect();
        let mut sums: Vec<Rounds> = targets.iter().map(|_| Rounds::default()).collect();
        let load_json = LoadJson::of(load, plan.connections);
        // Targets take turns, so a machine whose speed drifts over the
        // minutes of a run (a shared VM, a CPU changing clocks) slows each
        // of them alike rather than whichever ran last.
        'rounds: for round in 0..rounds {
            for (target, sum) in targets.iter().zip(&mut sums) {
                if cancel.is_cancelled() {
                    break 'rounds;
                }
                let mut label = format!("{} {}", target.name(), load_json.label());
                if rounds > 1 {
                    label = format!("{label} ({}/{rounds})", round + 1);
                }
                let phases = plan.phases.round(round, rounds);
                let live = load::live();
                let before = target.transport();
                let cpu_before = process_cpu();
                let bar = plan.progress.then(|| progress(&label, &live, phases));
                let out = load::run(
                    (*target).clone(),
                    work.clone(),
                    load,
                    phases,
                    live.clone(),
                    cancel.clone(),
                )
                .await;
                let cpu = cpu_before
                    .zip(process_cpu())
                    .map(|(b, a)| a.saturating_sub(b));
                if let Some((bar, ticker)) = bar {
                    ticker.abort();
                    bar.finish_and_clear();
                }
                sum.add(
                    out,
                    before.zip(target.transport()),
                    cpu,
                    live.finished.load(Ordering::Relaxed),
                );
            }
        }
        flag_short_rounds(&mut sums);
        let mut remote_run: Option<RunReport> = None;
        for (target, sum) in targets.iter().zip(sums) {
            if sum.rounds == 0 {
                continue;
            }
            let run = RunReport {
                label: format!("{} {}", target.name(), load_json.label()),
                target: target.name(),
                load: load_json,
                rounds: sum.rounds,
                interrupted: sum.interrupted,
                summary: sum.recorder.summary(sum.elapsed),
                // Calls cut short by Ctrl-C are not counted, their packets
                // are: no per-call figure then.
                transport: sum
                    .transport
                    .filter(|_| !sum.interrupted)
                    .and_then(|(counts, calls)| report::TransportJson::of(counts, calls)),
                cpu_us_per_call: sum
                    .cpu
                    .filter(|&(_, calls)| !sum.interrupted && calls > 0)
                    .map(|(cpu, calls)| cpu.as_secs_f64() * 1e6 / calls as f64),
                recorder: sum.recorder,
            };
            match &remote_run {
                None => remote_run = Some(run.clone()),
                Some(remote) => {
                    comparisons.push(report::compare(remote, &run, plan.server_in_process))
                }
            }
            runs.push(run);
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    (runs, comparisons)
}

/// Marks as interrupted the targets that ran fewer rounds than another:
/// Ctrl-C during a round leaves the targets after it a round short, and
/// their comparison is no longer like with like.
fn flag_short_rounds(sums: &mut [Rounds]) {
    let most = sums.iter().map(|s| s.rounds).max().unwrap_or(0);
    for sum in sums {
        sum.interrupted |= sum.rounds < most;
    }
}

/// One target's rounds of one step, added up.
#[derive(Default)]
struct Rounds {
    rounds: u32,
    recorder: Recorder,
    elapsed: Duration,
    interrupted: bool,
    /// QUIC traffic over the rounds and the calls it carried (warm-ups
    /// included); none once a round saw a reconnection or for the
    /// in-process target.
    transport: Option<(TransportCounts, u64)>,
    /// This process's CPU time over the rounds and the calls it served
    /// (warm-ups included); none without a process CPU clock.
    cpu: Option<(Duration, u64)>,
}

impl Rounds {
    fn add(
        &mut self,
        out: load::RunOutput,
        transport: Option<(TransportCounts, TransportCounts)>,
        cpu: Option<Duration>,
        calls: u64,
    ) {
        let first = self.rounds == 0;
        self.cpu = match (first, self.cpu, cpu) {
            (true, _, Some(c)) => Some((c, calls)),
            (false, Some((sum, n)), Some(c)) => Some((sum + c, n + calls)),
            _ => None,
        };
        self.rounds += 1;
        self.recorder.merge(out.recorder);
        self.elapsed += out.elapsed;
        self.interrupted |= out.interrupted;
        self.transport = match (first, self.transport, transport) {
            (_, _, Some((b, a))) if b.reconnects != a.reconnects => None,
            (true, _, Some((b, a))) => Some((a.since(b), calls)),
            (false, Some((sum, n)), Some((b, a))) => Some((sum.plus(a.since(b)), n + calls)),
            _ => None,
        };
    }
}

/// This process's CPU time so far: user and system, every thread.
///
/// Client and server share the machine's cores in a loopback run, so on a
/// small host throughput follows the CPU a call costs; this figure is that
/// cost without the run-to-run noise of wake-up latencies.
// On the targets below the trailing `None` is unreachable: one list of
// them, not a second negated copy for the fallback.
#[allow(unreachable_code)]
fn process_cpu() -> Option<Duration> {
    // Where rustix has a process CPU clock.
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "openbsd"
    ))]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        return Some(Duration::new(
            u64::try_from(t.tv_sec).ok()?,
            u32::try_from(t.tv_nsec).ok()?,
        ));
    }
    None
}

/// A progress bar fed from the live recorder every 200 ms: elapsed and
/// remaining, calls/s, current p50 and p99, errors.
fn progress(
    label: &str,
    live: &Arc<Live>,
    phases: Phases,
) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let (len, unit) = match phases.stop {
        Stop::After(d) => (d.as_millis() as u64, "ms"),
        Stop::Requests(n) => (n, "calls"),
    };
    let bar = ProgressBar::new(len);
    let template = if unit == "ms" {
        "{prefix:>16} [{elapsed_precise}] {wide_bar} eta {eta} {msg}"
    } else {
        "{prefix:>16} [{elapsed_precise}] {wide_bar} {pos}/{len} calls {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_owned());
    let (b, live) = (bar.clone(), live.clone());
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let since = live.measuring_since.lock().ok().and_then(|s| *s);
            let Some(since) = since else {
                b.set_message("warming up");
                continue;
            };
            let elapsed = since.elapsed();
            let (ok, errors, p50, p99) = match live.recorder.lock() {
                Ok(r) => (
                    r.ok(),
                    r.errors(),
                    r.corrected().value_at_quantile(0.5),
                    r.corrected().value_at_quantile(0.99),
                ),
                Err(_) => continue,
            };
            b.set_position(match unit {
                "ms" => elapsed.as_millis() as u64,
                _ => live.issued.load(Ordering::Relaxed),
            });
            b.set_message(format!(
                "{:.0} calls/s  p50 {}  p99 {}  errors {errors}",
                ok as f64 / elapsed.as_secs_f64().max(1e-3),
                report::us(p50 as f64),
                report::us(p99 as f64),
            ));
        }
    });
    (bar, ticker)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(rounds: u32, interrupted: bool) -> Rounds {
        Rounds {
            rounds,
            interrupted,
            ..Rounds::default()
        }
    }

    #[test]
    fn targets_a_round_short_are_marked_interrupted() {
        // Ctrl-C in remote's second round: the baselines ran one.
        let mut cut = [rounds(2, true), rounds(1, false), rounds(1, false)];
        flag_short_rounds(&mut cut);
        assert!(cut.iter().all(|s| s.interrupted));

        // Ctrl-C in the last baseline's round: the others are whole.
        let mut late = [rounds(2, false), rounds(2, false), rounds(2, true)];
        flag_short_rounds(&mut late);
        assert_eq!(late.map(|s| s.interrupted), [false, false, true]);

        let mut whole = [rounds(5, false), rounds(5, false)];
        flag_short_rounds(&mut whole);
        assert!(whole.iter().all(|s| !s.interrupted));
    }
}
