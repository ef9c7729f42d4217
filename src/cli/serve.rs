//! `quasar serve`: run a server until Ctrl-C or SIGTERM; SIGHUP reloads.
//!
//! On SIGHUP the config file and every file it names are read again, and
//! the server certificate and key, client CA, CRLs, access policy and
//! kernel directory are swapped in without dropping a connection. A broken
//! file is rejected with one log line and the running configuration keeps
//! serving. Other settings (address, limits) take effect on restart.
//!
//! Every flag but `--lavapipe-threads` (which acts before the file is read;
//! set `LP_NUM_THREADS` in the service's environment instead) has a key of
//! the same name (with `_` for `-`) in the TOML file given with
//! `--config`; a flag on the command line wins over the file. The
//! file also holds the access policy, in an `[access]` table:
//!
//! ```toml
//! listen = "0.0.0.0:4433"
//! cert = "pki/server.pem"
//! key = "pki/server.key"
//! client_ca = "pki/ca.pem"
//! crl = ["pki/crl.pem"]
//!
//! [access]
//! default = "deny"              # identities no rule names: "allow" (default) or "deny"
//! [[access.rule]]
//! identity = "alice"            # a DNS SAN, URI SAN or common name; a trailing * is a prefix
//! kernels = ["saxpy", "matmul"] # names or prefixes; "*" for all
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use quasar_server::{
    AddressValidation, Policy, ReloadConfig, Reloader, Server, ServerConfig, TlsPem,
};
use serde::Deserialize;

#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub lavapipe: super::LavapipeArgs,
    /// TOML file with any of these settings (keys named like the flags) and
    /// the `[access]` policy.
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: 0.0.0.0:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM).
    #[arg(long = "client-ca")]
    client_ca: Option<PathBuf>,
    /// Certificate revocation list (PEM), checked on every handshake; repeatable.
    #[arg(long = "crl")]
    crl: Vec<PathBuf>,
    /// Directory of extra kernels (*.wgsl); a file named like a shipped kernel replaces it.
    #[arg(long)]
    kernels: Option<PathBuf>,
    /// Use only an adapter whose name contains this.
    #[arg(long, env = "QUASAR_ADAPTER")]
    adapter: Option<String>,
    /// Calls that may wait for the GPU, all connections together, before new ones get RESOURCE_EXHAUSTED [default: 1024].
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Calls one client (all connections of one certificate identity) may have waiting for the GPU [default: 256].
    #[arg(long)]
    max_queued_per_client: Option<usize>,
    /// Most calls encoded into one GPU submission (calls that arrive together share it) [default: 64].
    #[arg(long)]
    max_batch: Option<usize>,
    /// Most GPU time one submission may take, ms, as estimated from each client's recent calls (a submission always takes one call, so 0 runs every call alone; calls that run long then go alone rather than make the calls beside them wait) [default: 10].
    #[arg(long)]
    max_batch_ms: Option<u64>,
    /// Request and response bytes held for in-flight calls, all connections together, MiB [default: 1024].
    #[arg(long)]
    max_inflight_mib: Option<u64>,
    /// The same, for one client's calls (all connections of one certificate identity), MiB [default: 512].
    #[arg(long)]
    max_inflight_per_client_mib: Option<u64>,
    /// Open connections, all clients together [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Open connections from one IP address [default: 64].
    #[arg(long)]
    max_connections_per_address: Option<usize>,
    /// Handshakes in progress at once; past half of it, new addresses must
    /// answer a QUIC Retry first (with --address-validation auto) [default: 128].
    #[arg(long)]
    max_handshakes: Option<usize>,
    /// A handshake not finished in this many seconds is dropped [default: 5].
    #[arg(long)]
    handshake_timeout_s: Option<u64>,
    /// When to validate client addresses with a QUIC Retry [default: auto].
    #[arg(long, value_enum)]
    address_validation: Option<Validation>,
    /// Send QUIC keep-alives this often, seconds [default: none; clients send them].
    #[arg(long)]
    keep_alive_s: Option<u64>,
    /// Largest UDP datagram accepted and probed for by MTU discovery, bytes,
    /// 1200-6500; paths that carry less settle lower by themselves [default: 6500].
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// Largest request payload accepted, MiB [default: 256].
    #[arg(long)]
    max_payload_mib: Option<u64>,
    /// Calls (streams) one connection may have open at once [default: 1024].
    #[arg(long)]
    max_streams: Option<u32>,
    /// A request's header must arrive within this many seconds of its stream opening, each payload byte by then plus the time the bytes before it take at --min-transfer-rate-kib, and a reply be read within this many seconds plus its length at that rate [default: 30].
    #[arg(long)]
    request_timeout_s: Option<u64>,
    /// The slowest transfer a request payload or reply is given time for, KiB/s; an upload that falls behind it is reset (0: the request timeout alone bounds every transfer) [default: 4096].
    #[arg(long)]
    min_transfer_rate_kib: Option<u64>,
    /// A connection silent this many seconds is closed [default: 30].
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// On shutdown, seconds in-flight calls may take to finish [default: 10].
    #[arg(long)]
    grace_s: Option<u64>,
    /// Time compute passes with GPU timestamp queries: auto = on GPUs, off
    /// on CPU adapters like lavapipe (where they cost ~140 us per call) [default: auto].
    #[arg(long, value_enum)]
    gpu_timestamps: Option<Timestamps>,
    /// When the GPU runs out of work, how long its thread spins for the next
    /// call before it sleeps, microseconds: a call that comes meanwhile
    /// starts without waiting for a wake-up, at the price of up to this much
    /// CPU time after each submission (0: sleep at once; at most 10000)
    /// [default: 150; 0 on a host with one CPU].
    #[arg(long)]
    gpu_idle_spin_us: Option<u64>,
    /// Run calls of one kernel and one client that meet in a GPU submission as one dispatch, for kernels declared `flexible_workgroups` (a dispatch costs more than a small call's own work) [default: true].
    #[arg(long)]
    fuse_calls: Option<bool>,
    /// Fuse only calls whose buffers take at most this many KiB: a large call's own work dwarfs a dispatch's cost [default: 64].
    #[arg(long)]
    max_fused_call_kib: Option<u64>,
    /// Log every call (identity, kernel, status, time) at info level [default: true].
    #[arg(long)]
    access_log: Option<bool>,
}

/// The `--config` file: the same settings, plus the access policy.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    #[serde(default)]
    crl: Vec<PathBuf>,
    kernels: Option<PathBuf>,
    adapter: Option<String>,
    queue_depth: Option<usize>,
    max_queued_per_client: Option<usize>,
    max_batch: Option<usize>,
    max_batch_ms: Option<u64>,
    max_inflight_mib: Option<u64>,
    max_inflight_per_client_mib: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_handshakes: Option<usize>,
    handshake_timeout_s: Option<u64>,
    address_validation: Option<Validation>,
    keep_alive_s: Option<u64>,
    max_udp_payload: Option<u16>,
    max_payload_mib: Option<u64>,
    max_streams: Option<u32>,
    request_timeout_s: Option<u64>,
    min_transfer_rate_kib: Option<u64>,
    idle_timeout_s: Option<u64>,
    grace_s: Option<u64>,
    gpu_timestamps: Option<Timestamps>,
    gpu_idle_spin_us: Option<u64>,
    fuse_calls: Option<bool>,
    max_fused_call_kib: Option<u64>,
    access_log: Option<bool>,
    #[serde(default)]
    access: Policy,
}

/// `--gpu-timestamps` values.
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Timestamps {
    /// On GPUs, off on CPU adapters.
    Auto,
    /// Always, where supported.
    On,
    /// Never.
    Off,
}

/// `--address-validation` values.
#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    /// Once half of --max-handshakes are in progress.
    Auto,
    /// For every new connection (one more round trip).
    Always,
    /// Never.
    Never,
}

impl From<Validation> for AddressValidation {
    fn from(v: Validation) -> Self {
        match v {
            Validation::Auto => Self::Auto,
            Validation::Always => Self::Always,
            Validation::Never => Self::Never,
        }
    }
}

impl From<Timestamps> for quasar_server::Timestamping {
    fn from(t: Timestamps) -> Self {
        match t {
            Timestamps::Auto => Self::Auto,
            Timestamps::On => Self::On,
            Timestamps::Off => Self::Off,
        }
    }
}

async fn read(path: &Path) -> Result<Vec<u8>> {
    tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))
}

/// Paths in the config file are relative to the file's directory.
fn relative_to(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

async fn load_file(path: &Path) -> Result<FileConfig> {
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let mut f: FileConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    f.cert = f.cert.map(|p| relative_to(base, p));
    f.key = f.key.map(|p| relative_to(base, p));
    f.client_ca = f.client_ca.map(|p| relative_to(base, p));
    f.kernels = f.kernels.map(|p| relative_to(base, p));
    f.crl = f.crl.into_iter().map(|p| relative_to(base, p)).collect();
    Ok(f)
}

/// The server configuration from the flags over the file over the defaults.
pub async fn config(a: ServeArgs) -> Result<ServerConfig> {
    let f = match &a.config {
        Some(path) => load_file(path).await?,
        None => FileConfig::default(),
    };
    let need = |flag: Option<PathBuf>, file: Option<PathBuf>, name: &str| {
        flag.or(file).with_context(|| {
            format!(
                "--{name} (or `{}` in --config) is required",
                name.replace('-', "_")
            )
        })
    };
    let cert = need(a.cert, f.cert, "cert")?;
    let key = need(a.key, f.key, "key")?;
    let client_ca = need(a.client_ca, f.client_ca, "client-ca")?;
    let mut crls = Vec::new();
    for path in if a.crl.is_empty() { &f.crl } else { &a.crl } {
        crls.push(read(path).await?);
    }
    let tls = TlsPem {
        cert_chain: read(&cert).await?,
        key: read(&key).await?,
        client_ca: read(&client_ca).await?,
        crls,
    };
    let listen = a
        .listen
        .or(f.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 4433)));
    let mut config = ServerConfig::new(listen, tls);
    config.gpu.kernel_dir = a.kernels.or(f.kernels);
    config.gpu.adapter = a.adapter.or(f.adapter);
    // Anything neither the command line nor the file sets keeps the
    // library's default (`ServerConfig::new`), the one place defaults live.
    let mib = |v: u64| v.saturating_mul(1024 * 1024);
    let secs = Duration::from_secs;
    set(&mut config.gpu.queue_depth, a.queue_depth.or(f.queue_depth));
    set(
        &mut config.gpu.max_queued_per_client,
        a.max_queued_per_client.or(f.max_queued_per_client),
    );
    set(&mut config.gpu.max_batch, a.max_batch.or(f.max_batch));
    set(
        &mut config.gpu.max_batch_time,
        a.max_batch_ms.or(f.max_batch_ms).map(Duration::from_millis),
    );
    set(
        &mut config.gpu.timestamps,
        a.gpu_timestamps.or(f.gpu_timestamps).map(Into::into),
    );
    set(&mut config.gpu.fuse_calls, a.fuse_calls.or(f.fuse_calls));
    set(
        &mut config.gpu.max_fused_call_bytes,
        a.max_fused_call_kib
            .or(f.max_fused_call_kib)
            .map(|k| k.saturating_mul(1024)),
    );
    if let Some(us) = a.gpu_idle_spin_us.or(f.gpu_idle_spin_us) {
        let most = quasar_server::MAX_IDLE_SPIN.as_micros();
        anyhow::ensure!(
            u128::from(us) <= most,
            "--gpu-idle-spin-us (or `gpu_idle_spin_us` in --config) {us} is more than {most} us"
        );
        config.gpu.idle_spin = Duration::from_micros(us);
    }
    set(
        &mut config.max_inflight_bytes,
        a.max_inflight_mib.or(f.max_inflight_mib).map(mib),
    );
    set(
        &mut config.max_inflight_bytes_per_client,
        a.max_inflight_per_client_mib
            .or(f.max_inflight_per_client_mib)
            .map(mib),
    );
    let adm = &mut config.admission;
    set(
        &mut adm.max_connections,
        a.max_connections.or(f.max_connections),
    );
    set(
        &mut adm.max_connections_per_address,
        a.max_connections_per_address
            .or(f.max_connections_per_address),
    );
    set(
        &mut adm.max_handshakes,
        a.max_handshakes.or(f.max_handshakes),
    );
    set(
        &mut adm.handshake_timeout,
        a.handshake_timeout_s.or(f.handshake_timeout_s).map(secs),
    );
    set(
        &mut adm.address_validation,
        a.address_validation
            .or(f.address_validation)
            .map(Into::into),
    );
    set(
        &mut config.quic.keep_alive,
        a.keep_alive_s.or(f.keep_alive_s).map(|s| Some(secs(s))),
    );
    if let Some(bytes) = a.max_udp_payload.or(f.max_udp_payload) {
        use quasar_transport::tls::{MAX_UDP_PAYLOAD as MAX, MIN_UDP_PAYLOAD as MIN};
        anyhow::ensure!(
            (MIN..=MAX).contains(&bytes),
            "--max-udp-payload (or `max_udp_payload` in --config) {bytes} is outside {MIN}-{MAX} bytes"
        );
        config.quic.max_udp_payload = bytes;
    }
    set(
        &mut config.limits.max_payload_len,
        a.max_payload_mib.or(f.max_payload_mib).map(mib),
    );
    set(
        &mut config.quic.max_concurrent_streams,
        a.max_streams.or(f.max_streams),
    );
    set(
        &mut config.quic.idle_timeout,
        a.idle_timeout_s.or(f.idle_timeout_s).map(secs),
    );
    set(
        &mut config.request_timeout,
        a.request_timeout_s.or(f.request_timeout_s).map(secs),
    );
    set(
        &mut config.min_transfer_rate,
        a.min_transfer_rate_kib
            .or(f.min_transfer_rate_kib)
            .map(|kib| kib.saturating_mul(1024)),
    );
    set(
        &mut config.shutdown_grace,
        a.grace_s.or(f.grace_s).map(secs),
    );
    set(&mut config.access_log, a.access_log.or(f.access_log));
    f.access
        .validate()
        .map_err(anyhow::Error::msg)
        .context("the [access] policy")?;
    config.policy = f.access;
    Ok(config)
}

/// Replaces `target` with `value` when one was given.
fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *target = v;
    }
}

pub async fn run(a: ServeArgs) -> Result<()> {
    let hup = hangup();
    let config = config(a.clone()).await?;
    let rules = config.policy.rules.len();
    let max_udp_payload = config.quic.max_udp_payload;
    let gpu_idle_spin_us = config.gpu.idle_spin.as_micros();
    let fuse_calls = config.gpu.fuse_calls;
    let server = Server::bind(config).await.context("starting the server")?;
    tracing::info!(adapter = %server.adapter(), gpu_idle_spin_us, fuse_calls, "GPU adapter");
    for k in server.kernels() {
        tracing::info!(kernel = %k.name, interface = %k.signature(), "kernel loaded");
    }
    tracing::info!(rules, "access policy loaded");
    let buffers = server.socket_buffers();
    if buffers.recv < quasar_transport::socket::DEFAULT_BUFFER {
        tracing::warn!(
            granted = buffers.recv,
            wanted = quasar_transport::socket::DEFAULT_BUFFER,
            "small UDP receive buffer: large calls will see packet loss; raise net.core.rmem_max and net.core.wmem_max (see README)"
        );
    }
    tracing::info!(
        addr = %server.local_addr()?,
        max_udp_payload,
        "listening (QUIC, mutual TLS, ALPN quasar/1)"
    );
    let reloads = tokio::spawn(reload_on_sighup(a, server.reloader(), hup));
    server.serve_until(shutdown_signal()).await;
    reloads.abort();
    Ok(())
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = std::convert::Infallible;

/// Listens for SIGHUP from now on: installed before the (slow) start-up, so
/// a SIGHUP then cannot kill the process (its default action).
fn hangup() -> Option<Hangup> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: no reloads");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Reloads the reloadable settings on every SIGHUP until aborted.
async fn reload_on_sighup(args: ServeArgs, reloader: Reloader, hup: Option<Hangup>) {
    #[cfg(unix)]
    if let Some(mut hup) = hup {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading certificates, CA, CRLs, policy and kernels");
            match reload(&args, &reloader).await {
                Ok(kernels) => tracing::info!(kernels = %kernels.join(", "), "reload done"),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "reload rejected; the previous configuration keeps serving"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (args, reloader, hup);
}

async fn reload(args: &ServeArgs, reloader: &Reloader) -> Result<Vec<String>> {
    let config = config(args.clone()).await?;
    reloader
        .reload(ReloadConfig {
            tls: config.tls,
            policy: config.policy,
            kernel_dir: config.gpu.kernel_dir,
        })
        .await
        .context("applying the new configuration")
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
