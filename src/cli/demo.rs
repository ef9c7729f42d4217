//! `quasar demo`: the whole path on one machine. A throw-away PKI, a server
//! on 127.0.0.1 with mutual TLS, a client over QUIC; every shipped kernel on
//! random input, each result checked against the CPU reference.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use quasar::embedded::EmbeddedServer;
use quasar::samples::{call_for, host_outputs};
use quasar_client::Client;
use quasar_shaders::{SHIPPED, Sample, sample::seeded};

use super::{fmt_us, micros};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub lavapipe: super::LavapipeArgs,
    /// Calls per kernel; latency percentiles are over these.
    #[arg(long, default_value_t = 200)]
    calls: usize,
    /// Unrecorded calls per kernel before measuring.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Run only this kernel (repeatable).
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Problem size for every kernel (elements; matrix side for matmul)
    /// instead of each kernel's default.
    #[arg(long)]
    size: Option<usize>,
    /// Seed for the random inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Default problem sizes: large enough to be real work, small enough that
/// 200 calls of each take seconds on a CPU rasterizer.
fn default_size(kernel: &str) -> usize {
    match kernel {
        "matmul" => 128,
        "saxpy" | "add" | "mul" => 1 << 16,
        _ => 1 << 18,
    }
}

fn describe(kernel: &str, size: usize) -> String {
    if kernel == "matmul" {
        format!("{size}x{size}")
    } else {
        size.to_string()
    }
}

pub async fn run(a: DemoArgs) -> Result<()> {
    if a.calls == 0 {
        bail!("--calls must be at least 1");
    }
    let wanted: Vec<&str> = if a.kernels.is_empty() {
        SHIPPED.iter().map(|k| k.name).collect()
    } else {
        for k in &a.kernels {
            if !SHIPPED.iter().any(|s| s.name == k) {
                bail!(
                    "no shipped kernel `{k}`; choose from {}",
                    SHIPPED
                        .iter()
                        .map(|s| s.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        a.kernels.iter().map(String::as_str).collect()
    };

    let server = EmbeddedServer::start(|_| {})
        .await
        .context("starting the embedded server")?;
    println!("adapter:   {}", server.adapter());
    println!(
        "server:    {} (QUIC, mutual TLS 1.3, ALPN quasar/1, fresh CA)",
        server.addr()
    );
    let client = Client::connect(server.client_config("demo")?)
        .await
        .context("connecting to the embedded server")?;
    println!(
        "kernels:   {}\n",
        server
            .kernels()
            .iter()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{:<11} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}  result",
        "kernel", "size", "calls", "p50", "p99", "max", "GPU p50"
    );

    let mut rng = seeded(a.seed);
    let mut failures = Vec::new();
    for kernel in wanted {
        let size = a.size.unwrap_or_else(|| default_size(kernel));
        let limit = quasar_transport::Limits::default().max_payload_len;
        if let Some(bytes) = quasar_shaders::sample::request_bytes(kernel, size)
            && bytes > limit
        {
            bail!(
                "--size {size} makes {kernel} requests of {bytes} bytes, over the {limit}-byte payload limit"
            );
        }
        let sample = Sample::for_kernel(kernel, size, &mut rng)
            .with_context(|| format!("no sample for `{kernel}`"))?;
        let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        let mut gpu = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        let mut mismatches = 0usize;
        let mut first_error = None;
        for i in 0..a.warmup + a.calls {
            let started = Instant::now();
            let response = client
                .execute(call_for(&sample))
                .await
                .with_context(|| format!("calling `{kernel}`"))?;
            let elapsed = micros(started.elapsed()).max(1);
            if let Err(m) = sample.check(&host_outputs(&response)) {
                mismatches += 1;
                first_error.get_or_insert(m);
            }
            if i >= a.warmup {
                latency.saturating_record(elapsed);
                gpu.saturating_record(response.timings().gpu_us.max(1));
            }
        }
        let result = match &first_error {
            None => "ok (matches CPU reference)".to_owned(),
            Some(m) => format!("MISMATCH in {mismatches} calls: {m}"),
        };
        println!(
            "{:<11} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}  {result}",
            kernel,
            describe(kernel, size),
            a.calls,
            fmt_us(latency.value_at_quantile(0.5) as f64),
            fmt_us(latency.value_at_quantile(0.99) as f64),
            fmt_us(latency.max() as f64),
            fmt_us(gpu.value_at_quantile(0.5) as f64),
        );
        if let Some(m) = first_error {
            failures.push(format!("{kernel}: {m}"));
        }
    }
    client.close().await;
    server.stop().await;
    if !failures.is_empty() {
        bail!(
            "results differ from the CPU reference:\n{}",
            failures.join("\n")
        );
    }
    println!(
        "\nEvery result matched its CPU reference. Latency is the client's round trip over loopback."
    );
    Ok(())
}
