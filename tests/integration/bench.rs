//! `quasar bench`: its JSON adds up, its percentiles are monotonic, its
//! `.hgrm` parses back, its plot is drawn, coordinated-omission correction
//! really happens, and each call's measured parts fit inside its latency.
//! No timing thresholds: only relations that hold on any machine.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use quasar::bench::load::{Target, Workload, call_once};
use quasar::samples::call_for;
use quasar_shaders::{Sample, sample::seeded};
use serde_json::Value;

use crate::support::{client, server};

const BIN: &str = env!("CARGO_BIN_EXE_quasar");

fn bench(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--no-progress")
        .output()
        .expect("run quasar bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "quasar bench failed:\n{text}");
    text
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("valid JSON")
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Parses an .hgrm file back: (value, percentile, total count) rows.
fn parse_hgrm(path: &Path) -> Vec<(f64, f64, u64)> {
    let text = std::fs::read_to_string(path).expect("hgrm file");
    let mut lines = text.lines();
    let head = lines.next().expect("header line");
    assert!(head.contains("Value") && head.contains("Percentile") && head.contains("TotalCount"));
    lines
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols[0].parse().expect("value"),
                cols[1].parse().expect("percentile"),
                cols[2].parse().expect("count"),
            )
        })
        .collect()
}

/// Every comparison of an `--embedded` run has a CPU ratio.
fn comparisons_have_cpu(doc: &Value) -> bool {
    doc["comparisons"]
        .as_array()
        .is_some_and(|c| !c.is_empty() && c.iter().all(|c| f(c, "cpu_ratio") > 0.0))
}

#[test]
fn json_hgrm_and_plot_of_a_short_run_are_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("run.json");
    let hgrm = dir.path().join("lat.hgrm");
    let svg = dir.path().join("plot.svg");
    let text = bench(&[
        "--embedded",
        "--kernel",
        "saxpy",
        "--size",
        "300",
        "--concurrency",
        "4",
        "--requests",
        "150",
        "--warmup",
        "100ms",
        "--compare-local",
        "--compare-raw",
        "--rounds",
        "4",
        "--json",
        json.to_str().expect("path"),
        "--hgrm",
        hgrm.to_str().expect("path"),
        "--plot",
        svg.to_str().expect("path"),
    ]);
    assert!(text.contains("the price of remote"), "{text}");

    let doc = read_json(&json);
    assert_eq!(doc["schema"], 1);
    // x and y of 300 f32 each; 1200 is a multiple of the 16-byte alignment.
    assert_eq!(u(&doc, "request_bytes"), 2 * 300 * 4);
    assert_eq!(u(&doc, "response_bytes"), 300 * 4);
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 3);
    for (run, target) in runs.iter().zip(["remote", "local", "raw"]) {
        assert_eq!(run["target"], target);
        let errors: u64 = run["errors"]
            .as_object()
            .expect("errors")
            .values()
            .map(|v| v.as_u64().expect("count"))
            .sum();
        assert_eq!(u(run, "calls"), u(run, "ok") + errors, "{run}");
        // Four alternating rounds of 38, 38, 37 and 37 calls, added up.
        assert_eq!(u(run, "calls"), 150, "--requests 150 measured calls");
        assert_eq!(u(run, "rounds"), 4);
        let l = &run["latency_us"];
        let seq: Vec<u64> = ["min", "p50", "p90", "p99", "p99_9", "p99_99", "max"]
            .iter()
            .map(|k| u(l, k))
            .collect();
        assert!(
            seq.windows(2).all(|w| w[0] <= w[1]),
            "percentiles not monotonic: {seq:?}"
        );
        assert!(f(l, "mean") >= seq[0] as f64 && f(l, "mean") <= seq[6] as f64);
        for row in run["breakdown_us"].as_array().expect("breakdown") {
            let parts = [
                "wait", "client", "queue", "submit", "gpu", "readback", "server", "network",
            ]
            .map(|k| f(row, k));
            assert!(parts.iter().all(|p| *p >= 0.0), "{row}");
            let sum: f64 = parts.iter().sum();
            assert!(
                sum <= f(row, "total") + 1e-6,
                "parts exceed the total: {row}"
            );
        }
    }
    // The QUIC traffic per call: 2,400 bytes up and 1,200 down, for Quasar
    // as for the raw echo; the in-process run has none. Packets of up to
    // 6,500 bytes may carry several calls' frames at concurrency 4, and up
    // to three and two datagrams each way before path MTU discovery has
    // raised quinn's initial 1,200-byte packets, plus acknowledgements: so
    // no fewer datagrams than the bytes need, and no more than three and
    // two and a half per call.
    for run in [&runs[0], &runs[2]] {
        let t = &run["transport"];
        let (up, down) = (
            f(t, "datagrams_up_per_call"),
            f(t, "datagrams_down_per_call"),
        );
        let max = f64::from(quasar_transport::tls::MAX_UDP_PAYLOAD);
        assert!((2_400.0 / max..=3.5).contains(&up), "{t}");
        assert!((1_200.0 / max..=2.5).contains(&down), "{t}");
        assert!(u(t, "mtu") >= 1200, "{t}");
        assert!(u(t, "rtt_us") > 0, "{t}");
        assert!(t["lost_packets"].is_u64(), "{t}");
    }
    assert!(runs[1]["transport"].is_null());
    assert!(text.contains("datagrams up"), "{text}");

    // Every call costs this process some CPU (client and server both run
    // in it); fifty milliseconds a call would be a broken clock or count.
    // (The process CPU clock is there on Linux, where CI runs.)
    if cfg!(target_os = "linux") {
        for run in runs {
            assert!(
                (0.1..50_000.0).contains(&f(run, "cpu_us_per_call")),
                "{run}"
            );
        }
        assert!(text.contains("us per call in this process"), "{text}");
        assert!(comparisons_have_cpu(&doc), "{doc}");
    }

    let comparisons = doc["comparisons"].as_array().expect("comparisons");
    assert_eq!(comparisons.len(), 2);
    assert!(comparisons.iter().all(|c| f(c, "p50_ratio") > 0.0));

    // One .hgrm per run; each parses back to its run's successful calls.
    for (run, label) in runs.iter().zip(["remote_c_4", "local_c_4", "raw_c_4"]) {
        let rows = parse_hgrm(&dir.path().join(format!("lat-{label}.hgrm")));
        assert!(rows.len() > 5);
        assert!(
            rows.windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1 && w[0].2 <= w[1].2)
        );
        assert_eq!(rows.last().map(|r| r.2), Some(u(run, "ok")));
        assert_eq!(rows.last().map(|r| r.1), Some(1.0));
    }

    let plot = std::fs::read_to_string(&svg).expect("svg");
    assert!(plot.len() > 5_000, "plot too small: {} bytes", plot.len());
    assert!(
        plot.contains("<svg") && plot.contains("polyline"),
        "not an SVG with lines"
    );
    assert!(
        plot.contains("remote c=4") && plot.contains("raw c=4"),
        "legend missing"
    );
}

#[test]
fn open_loop_latency_is_corrected_for_coordinated_omission() {
    // A kernel slow on purpose, offered at a rate it cannot keep up with,
    // one call at a time: calls start late, and the corrected latency (from
    // each call's intended start) must show it.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("spin.wgsl"),
        r#"// quasar: output out = 1
// quasar: stage main = 1
struct Params { iters: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> seed: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1)
fn main() {
    var x = seed[0];
    for (var i = 0u; i < params.iters; i++) { x = fract(x * 1.0001 + 0.1); }
    out[0] = x;
}
"#,
    )
    .expect("write kernel");
    let json = dir.path().join("open.json");
    bench(&[
        "--embedded",
        "--kernels",
        dir.path().to_str().expect("path"),
        "--kernel",
        "spin",
        "--arg",
        "iters=200000:u32",
        "--input",
        "seed=0.5",
        "--rate",
        "5000",
        "--max-inflight",
        "1",
        "--requests",
        "40",
        "--warmup",
        "0s",
        "--json",
        json.to_str().expect("path"),
    ]);
    let doc = read_json(&json);
    let run = &doc["runs"][0];
    assert_eq!(run["load"]["mode"], "open");
    let corrected = &run["latency_us"];
    let uncorrected = &run["latency_uncorrected_us"];
    assert!(u(run, "ok") == 40, "{run}");
    assert!(
        u(corrected, "p50") > u(uncorrected, "p50") && u(corrected, "max") > u(uncorrected, "max"),
        "no correction: corrected {corrected} vs uncorrected {uncorrected}"
    );
    // The late start shows up as wait in the breakdown.
    assert!(f(&run["breakdown_us"][0], "wait") > 0.0, "{run}");
}

#[tokio::test]
async fn each_calls_measured_parts_fit_inside_its_latency() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(9);
    let sample = Sample::saxpy(5000, &mut rng);
    let work = Workload::new(call_for(&sample), 5000 * 4).expect("workload");
    let target = Target::Remote(Arc::new(vec![client]));
    for i in 0..50 {
        let r = call_once(&target, &work, i, None).await;
        assert!(r.outcome.is_ok(), "call {i}: {:?}", r.outcome);
        let t = r.server.expect("server timings");
        let parts_us = r.client.as_micros() as u64 + t.queued_us + t.gpu_us + t.readback_us;
        assert!(
            parts_us <= r.corrected.as_micros() as u64,
            "call {i}: parts {parts_us} us > total {} us ({t:?}, client {:?})",
            r.corrected.as_micros(),
            r.client
        );
        assert!(
            t.total_us <= r.corrected.as_micros() as u64,
            "server time exceeds the round trip"
        );
        assert_eq!(r.down, 5000 * 4);
    }
    server.stop().await;
}

fn bench_fails(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--no-progress")
        .output()
        .expect("run quasar bench");
    assert!(
        !out.status.success(),
        "quasar bench {args:?} should have failed"
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let last = err.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("error: "), "no one-line error: {err}");
    last
}

#[test]
fn clear_one_line_errors() {
    let e = bench_fails(&[
        "--embedded",
        "--kernel",
        "nope",
        "--input",
        "x=1.0",
        "--requests",
        "1",
    ]);
    assert!(e.contains("not on the server"), "{e}");
    let e = bench_fails(&[
        "--embedded",
        "--kernel",
        "prefix_sum",
        "--size",
        "100000000",
        "--requests",
        "1",
    ]);
    assert!(
        e.contains("payload limit") && e.contains("smaller --size"),
        "{e}"
    );
    let e = bench_fails(&[
        "--embedded",
        "--kernel",
        "matmul",
        "--size",
        "8",
        "--arg",
        "m=9",
        "--input",
        "a=1.0",
        "--requests",
        "1",
    ]);
    assert!(e.contains("rejects this call"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_a_wrong_address_and_a_refused_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server().await;
    std::fs::write(dir.path().join("ca.pem"), server.ca_pem()).expect("ca");
    let other = quasar_certs::CertificateAuthority::generate("another CA").expect("ca");
    let id = other
        .issue_client("mallory", quasar_certs::Validity::default())
        .expect("id");
    std::fs::write(dir.path().join("m.pem"), &id.cert_pem).expect("cert");
    std::fs::write(dir.path().join("m.key"), &id.key_pem).expect("key");
    let args_for = |addr: String| -> Vec<String> {
        let p = |f: &str| dir.path().join(f).display().to_string();
        vec![
            "--server".into(),
            addr,
            "--ca".into(),
            p("ca.pem"),
            "--cert".into(),
            p("m.pem"),
            "--key".into(),
            p("m.key"),
            "--kernel".into(),
            "saxpy".into(),
            "--requests".into(),
            "1".into(),
        ]
    };
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            bench_fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };
    let refused = run(args_for(server.addr().to_string()))
        .await
        .expect("join");
    assert!(refused.contains("certificate"), "{refused}");
    // Nothing answers on this port: no reply within the connect timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dead = silent.local_addr().expect("addr").to_string();
    let unreachable = run(args_for(dead)).await.expect("join");
    assert!(unreachable.contains("no answer"), "{unreachable}");
    drop(silent);
    server.stop().await;
}

/// `--max-udp-payload` reaches the SDK's connections, the embedded server
/// and the raw echo alike: a 16 KiB echo with a 1472-byte ceiling takes at
/// least 12 datagrams each way, for Quasar as for raw quinn.
#[test]
fn the_datagram_ceiling_applies_to_remote_and_raw_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("run.json");
    bench(&[
        "--embedded",
        "--kernel",
        "quasar.echo",
        "--size",
        "4096",
        "--requests",
        "20",
        "--warmup",
        "0s",
        "--compare-raw",
        "--max-udp-payload",
        "1472",
        "--json",
        json.to_str().expect("path"),
    ]);
    let doc = read_json(&json);
    let runs = doc["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{doc}");
    for run in runs {
        let t = &run["transport"];
        assert!(u(t, "mtu") <= 1472, "{t}");
        // 16 KiB plus headers over at most 1472-byte packets.
        assert!(f(t, "datagrams_up_per_call") >= 12.0, "{t}");
        assert!(f(t, "datagrams_down_per_call") >= 12.0, "{t}");
    }
    // Out of range is refused before anything starts.
    let out = Command::new(BIN)
        .args(["bench", "--embedded", "--max-udp-payload", "9000"])
        .output()
        .expect("run quasar bench");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1200..=6500"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_embedded_servers_fusion_and_batch_bounds_are_the_benchs_to_set() {
    // Concurrent small calls: fused unless the bound says no call is
    // small enough; the report says how many were.
    let run = |kib: &str| {
        bench(&[
            "--embedded",
            "--kernel",
            "saxpy",
            "--size",
            "256",
            "--concurrency",
            "32",
            "--requests",
            "2000",
            "--warmup",
            "100ms",
            "--max-batch-ms",
            "5",
            "--max-fused-call-kib",
            kib,
        ])
    };
    let fused_of = |text: &str| -> u64 {
        let at = text.find(" of them fused into ").expect("fusion reported");
        let before = &text[..at];
        let start = before.rfind(' ').map_or(0, |i| i + 1);
        before[start..].parse().expect("a count of fused calls")
    };
    let none = run("0");
    assert_eq!(fused_of(&none), 0, "{none}");
    let some = run("64");
    assert!(fused_of(&some) > 0, "{some}");
}
