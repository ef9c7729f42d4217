//! `quasar serve`: run a server until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use quasar_server::{Server, ServerConfig, TlsPem};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    #[arg(long = "client-ca")]
    client_ca: PathBuf,
    /// Directory of extra kernels (*.wgsl); a file named like a shipped kernel replaces it.
    #[arg(long)]
    kernels: Option<PathBuf>,
    /// Use only an adapter whose name contains this.
    #[arg(long, env = "QUASAR_ADAPTER")]
    adapter: Option<String>,
    /// Calls that may wait for the GPU before new ones are refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 256)]
    queue_depth: usize,
    /// Request and response bytes held for in-flight calls, all connections together (MiB).
    #[arg(long, default_value_t = 1024)]
    max_inflight_mib: u64,
    /// Largest request payload accepted (MiB).
    #[arg(long, default_value_t = 256)]
    max_payload_mib: u64,
    /// Calls (streams) one connection may have open at once.
    #[arg(long, default_value_t = 1024)]
    max_streams: u32,
    /// A request must arrive in full within this many seconds.
    #[arg(long, default_value_t = 30)]
    request_timeout_s: u64,
    /// On shutdown, seconds in-flight calls may take to finish.
    #[arg(long, default_value_t = 10)]
    grace_s: u64,
    /// Time compute passes with GPU timestamp queries: auto = on GPUs, off
    /// on CPU adapters like lavapipe (where they cost ~140 us per call).
    #[arg(long, value_enum, default_value_t = Timestamps::Auto)]
    gpu_timestamps: Timestamps,
}

/// `--gpu-timestamps` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamps {
    /// On GPUs, off on CPU adapters.
    Auto,
    /// Always, where supported.
    On,
    /// Never.
    Off,
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

pub async fn run(a: ServeArgs) -> Result<()> {
    let tls = TlsPem {
        cert_chain: read(&a.cert).await?,
        key: read(&a.key).await?,
        client_ca: read(&a.client_ca).await?,
    };
    let mut config = ServerConfig::new(a.listen, tls);
    config.gpu.kernel_dir = a.kernels;
    config.gpu.adapter = a.adapter;
    config.gpu.queue_depth = a.queue_depth;
    config.gpu.timestamps = a.gpu_timestamps.into();
    config.max_inflight_bytes = a.max_inflight_mib.saturating_mul(1024 * 1024);
    config.limits.max_payload_len = a.max_payload_mib.saturating_mul(1024 * 1024);
    config.quic.max_concurrent_streams = a.max_streams;
    config.request_timeout = Duration::from_secs(a.request_timeout_s);
    config.shutdown_grace = Duration::from_secs(a.grace_s);

    let server = Server::bind(config).await.context("starting the server")?;
    tracing::info!(adapter = %server.adapter(), "GPU adapter");
    for k in server.kernels() {
        tracing::info!(kernel = %k.name, interface = %k.signature(), "kernel loaded");
    }
    let buffers = server.socket_buffers();
    if buffers.recv < quasar_transport::socket::DEFAULT_BUFFER {
        tracing::warn!(
            granted = buffers.recv,
            wanted = quasar_transport::socket::DEFAULT_BUFFER,
            "small UDP receive buffer: large calls will see packet loss; raise net.core.rmem_max and net.core.wmem_max (see README)"
        );
    }
    tracing::info!(addr = %server.local_addr()?, "listening (QUIC, mutual TLS, ALPN quasar/1)");
    server.serve_until(shutdown_signal()).await;
    Ok(())
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
