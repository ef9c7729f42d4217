//! `quasar bench`: latency and throughput of a kernel call under load, with
//! where the time went and what going remote costs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use quasar::bench::load::{Load, Phases, Stop, Target, Workload};
use quasar::bench::raw::{RawClient, RawEchoServer};
use quasar::bench::report::{self, Report};
use quasar::bench::{self, Plan, plot};
use quasar::embedded::EmbeddedServer;
use quasar::samples::{call_for, host_outputs};
use quasar_certs::CertificateAuthority;
use quasar_client::{Call, CallError, Client, ClientConfig, ConnectError, ECHO_KERNEL, StatusCode};
use quasar_server::local::LocalDispatcher;
use quasar_server::{GpuConfig, MAX_IDLE_SPIN};
use quasar_shaders::{SHIPPED, Sample, sample::seeded};
use quasar_transport::tls::{self, QuicTuning};
use tokio_util::sync::CancellationToken;

use super::call::{input, parse_arg};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub lavapipe: super::LavapipeArgs,
    /// Server address (or --embedded).
    #[arg(
        long,
        required_unless_present = "embedded",
        conflicts_with = "embedded"
    )]
    server: Option<SocketAddr>,
    /// Start a server in this process on 127.0.0.1 with a fresh PKI.
    #[arg(long)]
    embedded: bool,
    /// Name the server's certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA that signed the server's certificate (PEM).
    #[arg(long, required_unless_present = "embedded")]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, required_unless_present = "embedded")]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, required_unless_present = "embedded")]
    key: Option<PathBuf>,
    /// Kernel to call; `quasar.echo` is the server's built-in echo (no GPU
    /// work: the framework's own cost).
    #[arg(long)]
    kernel: String,
    /// Problem size for a shipped kernel: elements of its main input (the
    /// matrix side for matmul), or u32s for `quasar.echo`. Random inputs;
    /// the first result is checked against the CPU reference.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// For other kernels: scalar argument NAME=VALUE[:TYPE], as in `quasar call`.
    #[arg(long = "arg", value_parser = parse_arg)]
    args: Vec<(String, quasar_client::Scalar)>,
    /// For other kernels: input NAME=@FILE or NAME=1,2,3[:TYPE], as in `quasar call`.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Closed loop: calls in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Spread calls over this many connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Open loop: start calls at this rate (calls/s); latency counts from
    /// each call's intended start (coordinated-omission corrected).
    #[arg(long)]
    rate: Option<f64>,
    /// One run per value: concurrencies, or rates with --rate.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<f64>,
    /// Open loop: most calls in flight; past it the generator waits (and the
    /// wait counts in corrected latency).
    #[arg(long, default_value_t = 10_000)]
    max_inflight: usize,
    /// Unrecorded warm-up before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of each measured run (default 10s).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Calls per measured run, instead of a duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Also run in-process on the local adapter, without the network.
    #[arg(long)]
    compare_local: bool,
    /// Also run a raw QUIC echo of the same payload sizes over mutual TLS
    /// (in-process, on loopback).
    #[arg(long)]
    compare_raw: bool,
    /// Alternate the targets (remote and the --compare baselines) in this
    /// many rounds, each measured for its share of the run, the first after
    /// the warm-up and later ones after a 200 ms one. On a machine whose
    /// speed drifts (a shared VM), ratios then compare like with like.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Write the results as JSON (schema in benches/README.md).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write each run's latency histogram in HdrHistogram's .hgrm text format
    /// (several runs: FILE's stem gets the run's label).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Plot latency by percentile (and, for sweeps, throughput against
    /// latency) to an .svg or .png file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Extra kernels for --embedded and --compare-local.
    #[arg(long)]
    kernels: Option<PathBuf>,
    /// Per-call deadline in milliseconds.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// No live progress display.
    #[arg(long)]
    no_progress: bool,
    /// --embedded and --compare-local: GPU timestamp queries, as
    /// `quasar serve --gpu-timestamps`.
    #[arg(long, value_enum, default_value_t = super::serve::Timestamps::Auto)]
    gpu_timestamps: super::serve::Timestamps,
    /// --embedded and --compare-local: how long the GPU thread spins for the
    /// next call before it sleeps, microseconds, as `quasar serve
    /// --gpu-idle-spin-us`, at most 10000 [default: 150; 0 on one CPU].
    #[arg(long, value_parser = clap::value_parser!(u64).range(
        0..=u64::try_from(MAX_IDLE_SPIN.as_micros()).unwrap_or(u64::MAX)
    ))]
    gpu_idle_spin_us: Option<u64>,
    /// --embedded and --compare-local: run calls of one kernel that meet in
    /// a batch as one dispatch, as `quasar serve --fuse-calls`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fuse_calls: bool,
    /// --embedded and --compare-local: fuse only calls of at most this many
    /// KiB of buffers, as `quasar serve --max-fused-call-kib` [default: 64].
    #[arg(long)]
    max_fused_call_kib: Option<u64>,
    /// --embedded and --compare-local: most GPU time one submission may
    /// take, ms, as `quasar serve --max-batch-ms` [default: 10].
    #[arg(long)]
    max_batch_ms: Option<u64>,
    /// Seed for random inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Largest UDP datagram in bytes, 1200-6500, for the SDK's connections,
    /// the --embedded server and the --compare-raw echo alike (as `quasar
    /// serve --max-udp-payload`) [default: 6500].
    #[arg(long, value_parser = clap::value_parser!(u16).range(
        i64::from(tls::MIN_UDP_PAYLOAD)..=i64::from(tls::MAX_UDP_PAYLOAD)
    ))]
    max_udp_payload: Option<u16>,
}

/// A connection failure as one line saying what and what to do.
fn explain_connect(server: SocketAddr, e: &ConnectError) -> anyhow::Error {
    let text = e.to_string();
    match e {
        ConnectError::Timeout(d) => anyhow!(
            "no answer from {server} within {d:?}: is `quasar serve` running there, and is UDP open?"
        ),
        ConnectError::Handshake(_)
            if text.contains("peer sent") || text.contains("aborted by peer") =>
        {
            anyhow!(
                "the server refused this client's certificate ({text}): use a certificate issued by the server's client CA, still valid"
            )
        }
        ConnectError::Handshake(_) => anyhow!(
            "the server's certificate was not accepted ({text}): check --ca and --server-name"
        ),
        _ => anyhow!("connecting to {server}: {text}"),
    }
}

/// A failed probe call as one line saying what and what to do.
fn explain_call(kernel: &str, e: &CallError) -> anyhow::Error {
    match e {
        CallError::Status {
            code: StatusCode::NotFound,
            message,
            ..
        } => {
            anyhow!("kernel `{kernel}` is not on the server: {message}")
        }
        CallError::Status {
            code: StatusCode::InvalidArgument,
            message,
            ..
        } => {
            anyhow!("the server rejects this call: {message}; change --size, --arg or --input")
        }
        CallError::Status {
            code: StatusCode::ResourceExhausted,
            message,
            ..
        } => {
            anyhow!("the call is too large for the server: {message}; use a smaller --size")
        }
        CallError::InvalidCall(why) => {
            anyhow!("this call cannot be sent: {why}; change --size or --input")
        }
        e if e.is_transport() => anyhow!(
            "the connection failed on the first call ({e}): the server may have refused this client's certificate"
        ),
        e => anyhow!("the first call failed: {e}"),
    }
}

async fn connect_all(config: &ClientConfig, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let c = Client::connect(config.clone())
            .await
            .map_err(|e| explain_connect(config.server, &e))?;
        clients.push(c);
    }
    Ok(clients)
}

pub async fn run(a: BenchArgs) -> Result<()> {
    if a.concurrency == 0 || a.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if a.rate.is_some_and(|r| !positive(r)) || a.sweep.iter().any(|v| !positive(*v)) {
        bail!("rates and sweep values must be positive");
    }
    if a.requests.is_some_and(|n| n < u64::from(a.rounds)) {
        bail!("--requests must be at least --rounds: each round measures some calls");
    }
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nCtrl-C: stopping; results so far follow");
                cancel.cancel();
            }
        });
    }

    // The server and its clients.
    let mut gpu = GpuConfig {
        kernel_dir: a.kernels.clone(),
        timestamps: a.gpu_timestamps.into(),
        fuse_calls: a.fuse_calls,
        ..GpuConfig::default()
    };
    if let Some(us) = a.gpu_idle_spin_us {
        gpu.idle_spin = Duration::from_micros(us);
    }
    if let Some(kib) = a.max_fused_call_kib {
        gpu.max_fused_call_bytes = kib.saturating_mul(1024);
    }
    if let Some(ms) = a.max_batch_ms {
        gpu.max_batch_time = Duration::from_millis(ms);
    }
    let tuning = QuicTuning {
        max_udp_payload: a.max_udp_payload.unwrap_or(tls::MAX_UDP_PAYLOAD),
        ..QuicTuning::default()
    };
    let mut embedded = None;
    let (clients, server_label, server_is_loopback) = if a.embedded {
        // The same GPU settings as local dispatch, so the two compare.
        let server_gpu = gpu.clone();
        let max_udp_payload = tuning.max_udp_payload;
        let server = EmbeddedServer::start(move |c| {
            // The bench decides the load; let the GPU queue hold all of it.
            // Its connections are one client (one certificate), so the
            // per-client bounds are the totals.
            c.gpu = GpuConfig {
                queue_depth: 4096,
                max_queued_per_client: 4096,
                ..server_gpu
            };
            c.max_inflight_bytes_per_client = c.max_inflight_bytes;
            c.quic.max_udp_payload = max_udp_payload;
        })
        .await
        .context("starting the embedded server")?;
        let mut config = server.client_config("bench")?;
        config.quic.max_udp_payload = max_udp_payload;
        let clients = connect_all(&config, a.connections).await?;
        let label = format!("embedded {} on {}", server.addr(), server.adapter());
        embedded = Some(server);
        (clients, label, true)
    } else {
        let server = a
            .server
            .context("--server is required without --embedded")?;
        let (ca, cert, key) = match (&a.ca, &a.cert, &a.key) {
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            _ => bail!("--ca, --cert and --key are required with --server"),
        };
        let mut config = ClientConfig::from_pem_files(server, &a.server_name, ca, cert, key)
            .await
            .context("reading the certificates")?;
        config.connect_timeout = Duration::from_secs(5);
        config.quic.max_udp_payload = tuning.max_udp_payload;
        let clients = connect_all(&config, a.connections).await?;
        (clients, server.to_string(), server.ip().is_loopback())
    };

    // The call: a shipped kernel's sample, or the given args and inputs.
    let shipped = SHIPPED.iter().any(|k| k.name == a.kernel);
    let echo_default = a.kernel == ECHO_KERNEL && a.inputs.is_empty() && a.args.is_empty();
    let (mut call, sample) = if echo_default {
        // The framework alone: `--size` u32s up and the same back.
        let data: Vec<u32> = (0..a.size as u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        (Call::new(ECHO_KERNEL).input("data", &data), None)
    } else if shipped && a.inputs.is_empty() && a.args.is_empty() {
        let limit = quasar_transport::Limits::default().max_payload_len;
        if let Some(bytes) = quasar_shaders::sample::request_bytes(&a.kernel, a.size)
            && bytes > limit
        {
            bail!(
                "--size {} makes {bytes}-byte requests, over the {limit}-byte payload limit; use a smaller --size",
                a.size
            );
        }
        let mut rng = seeded(a.seed);
        let sample = Sample::for_kernel(&a.kernel, a.size, &mut rng)
            .with_context(|| format!("no sample for `{}`", a.kernel))?;
        (call_for(&sample), Some(sample))
    } else {
        if a.inputs.is_empty() {
            bail!(
                "`{}` is not a shipped kernel: give its buffers with --input (and scalars with --arg)",
                a.kernel
            );
        }
        let mut call = Call::new(&a.kernel);
        for (name, value) in &a.args {
            call = call.arg(name.clone(), *value);
        }
        for spec in &a.inputs {
            call = input(call, spec).await?;
        }
        (call, None)
    };
    if let Some(ms) = a.deadline_ms {
        call = call.deadline(Duration::from_millis(ms));
    }
    // Every attempt is a measured call: a retry would hide a failure inside
    // one slow success (and the local and raw targets never retry).
    call = call.retryable(false);

    // A probe call: clear errors before any load, the response size, and a
    // correctness check against the CPU reference.
    let probe = clients[0]
        .execute(&call)
        .await
        .map_err(|e| explain_call(&a.kernel, &e))?;
    if let Some(s) = &sample {
        s.check(&host_outputs(&probe))
            .map_err(|m| anyhow!("the server's result differs from the CPU reference: {m}"))?;
    }
    if echo_default {
        let sent = call.clone().into_request()?.1;
        let back = probe.output::<u32>("data")?;
        if bytemuck::cast_slice::<u32, u8>(back) != sent[0].as_ref() {
            bail!("the echo came back different from what was sent");
        }
    }
    let work = Arc::new(Workload::new(call, probe.payload_len() as u64)?);

    let mut adapter = embedded.as_ref().map(|s| s.adapter().to_string());
    let dispatcher = if a.compare_local {
        let d = LocalDispatcher::start(gpu)
            .await
            .context("starting the local GPU executor for --compare-local")?;
        adapter.get_or_insert_with(|| d.adapter().to_string());
        Some(Arc::new(d))
    } else {
        None
    };
    let local = dispatcher.clone().map(Target::Local);
    let mut echo = None;
    let raw = if a.compare_raw {
        if !server_is_loopback {
            eprintln!(
                "note: the raw echo runs on loopback in this process; against a remote server it is a floor for this host only"
            );
        }
        let ca = CertificateAuthority::generate("Quasar bench echo CA")?;
        let server = RawEchoServer::start(&ca, &tuning)
            .await
            .context("starting the raw echo server")?;
        let mut raw_clients = Vec::new();
        for _ in 0..a.connections {
            raw_clients.push(
                RawClient::connect(server.addr(), &ca, &tuning)
                    .await
                    .context("connecting to the raw echo server")?,
            );
        }
        echo = Some(server);
        Some(Target::Raw(Arc::new(raw_clients)))
    } else {
        None
    };

    let values: Vec<f64> = if a.sweep.is_empty() {
        vec![a.rate.unwrap_or(a.concurrency as f64)]
    } else {
        a.sweep.clone()
    };
    let steps: Vec<Load> = values
        .iter()
        .map(|&v| match a.rate {
            Some(_) => Load::Open {
                rate: v,
                max_inflight: a.max_inflight,
            },
            None => Load::Closed {
                concurrency: (v.round() as usize).max(1),
            },
        })
        .collect();
    let stop = match (a.requests, a.duration) {
        (Some(n), _) => Stop::Requests(n),
        (None, Some(d)) => Stop::After(d),
        (None, None) => Stop::After(Duration::from_secs(10)),
    };
    let plan = Plan {
        steps,
        connections: a.connections,
        phases: Phases {
            warmup: a.warmup,
            stop,
        },
        remote: Target::Remote(Arc::new(clients.clone())),
        local,
        raw,
        progress: !a.no_progress,
        rounds: a.rounds,
        server_in_process: a.embedded,
    };
    let (runs, comparisons) = bench::execute(&plan, work.clone(), &cancel).await;

    let report = Report {
        schema: 1,
        quasar_version: env!("CARGO_PKG_VERSION"),
        server: server_label,
        adapter,
        kernel: a.kernel.clone(),
        size: sample.as_ref().map(|_| a.size),
        request_bytes: work.up_bytes(),
        response_bytes: work.down_bytes,
        runs,
        comparisons,
    };
    let mut table = Vec::new();
    report::print_table(&report, &mut table)?;
    print!("{}", String::from_utf8_lossy(&table));

    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        tokio::fs::write(path, text)
            .await
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let sweep = plan.steps.len() > 1;
    let (hgrm, plot_path) = (a.hgrm.clone(), a.plot.clone());
    let report = Arc::new(report);
    let r2 = report.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        if let Some(path) = hgrm {
            for run in &r2.runs {
                let file = if r2.runs.len() == 1 {
                    path.clone()
                } else {
                    let stem = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("latency");
                    let label = run.label.replace(['=', ' ', '/'], "_");
                    path.with_file_name(format!("{stem}-{label}.hgrm"))
                };
                let mut f = std::io::BufWriter::new(
                    std::fs::File::create(&file)
                        .with_context(|| format!("creating {}", file.display()))?,
                );
                report::write_hgrm(run.recorder.corrected(), &mut f)
                    .with_context(|| format!("writing {}", file.display()))?;
            }
        }
        if let Some(path) = plot_path {
            plot::plot(&r2.runs, sweep, &path)?;
        }
        Ok(())
    })
    .await??;

    for c in clients {
        c.close().await;
    }
    // Join the local GPU thread before the process exits: a device torn
    // down by process exit while its thread still runs can crash the driver.
    drop(plan);
    if let Some(d) = dispatcher.and_then(Arc::into_inner) {
        d.shutdown().await;
    }
    if let Some(s) = echo {
        s.stop().await;
    }
    if let Some(s) = embedded {
        // How the embedded server's executor batched the remote calls
        // (warm-up and probe included).
        let stats = s.stats();
        let calls = stats.calls.load(std::sync::atomic::Ordering::Relaxed);
        let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
        let created = stats
            .buffers_created
            .load(std::sync::atomic::Ordering::Relaxed);
        let spun = stats.waits_spun.load(std::sync::atomic::Ordering::Relaxed);
        let slept = stats.waits_slept.load(std::sync::atomic::Ordering::Relaxed);
        let fused = stats.fused_calls.load(std::sync::atomic::Ordering::Relaxed);
        let fused_dispatches = stats
            .fused_dispatches
            .load(std::sync::atomic::Ordering::Relaxed);
        if batches > 0 {
            eprintln!(
                "server GPU executor: {calls} calls in {batches} submissions ({:.1} calls per submission), {fused} of them fused into {fused_dispatches} dispatches, {created} GPU buffers created; the GPU thread found work while spinning {spun} times, was woken from sleep {slept} times",
                calls as f64 / batches as f64
            );
        }
        s.stop().await;
    }
    if cancel.is_cancelled() {
        bail!("interrupted");
    }
    Ok(())
}
