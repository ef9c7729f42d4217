//! The Quasar server: accepts QUIC connections with mutual TLS and runs each
//! call, one per bidirectional stream, as a wgpu compute shader.
//!
//! # Layout
//! - this file: [`ServerConfig`] and [`Server`]: binding the endpoint, the
//!   accept loop (one task per connection, one per stream), shutdown.
//! - [`access`]: client identities from their certificates, and the policy
//!   of which identities may call which kernels.
//! - [`handler`]: one call on one stream: read and check the request, queue
//!   it for the GPU, write the reply. Bad input gets a status reply; the
//!   connection and the server carry on.
//! - [`kernel`]: kernels discovered by reflection from WGSL, and the plain
//!   function that checks a request against a kernel.
//! - [`gpu`]: adapter choice, the executor thread that owns the device, and
//!   the buffer pool.
//! - [`local`]: the same path in-process, without the network: the baseline
//!   for "what does going remote cost".
//!
//! Spawned tasks are tracked (`TaskTracker`), so shutdown can wait for
//! in-flight calls; the GPU thread is joined last.

pub mod access;
pub mod gpu;
pub mod handler;
pub mod kernel;
pub mod local;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quasar_transport::socket::{self, SocketBuffers};
use quasar_transport::tls::{self, QuicTuning, TlsError};
use quasar_transport::{CloseCode, Limits};
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use access::{Identity, Policy};
pub use gpu::executor::{ExecutorStats, GpuConfig, Registry, Timestamping};
pub use gpu::{AdapterReport, AdapterSummary, GpuError, list_adapters};
pub use kernel::KernelInterface;

use gpu::executor::{GpuExecutor, JobQueue};
use kernel::plan::DeviceCaps;

/// The server's certificate, key and client CA, as PEM.
#[derive(Clone)]
pub struct TlsPem {
    /// Server certificate chain.
    pub cert_chain: Vec<u8>,
    /// Server private key.
    pub key: Vec<u8>,
    /// CA that client certificates must chain to.
    pub client_ca: Vec<u8>,
    /// Certificate revocation lists (PEM), checked on every handshake.
    pub crls: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem").finish_non_exhaustive()
    }
}

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// TLS material.
    pub tls: TlsPem,
    /// GPU set-up.
    pub gpu: GpuConfig,
    /// Caps on declared lengths.
    pub limits: Limits,
    /// QUIC transport parameters.
    pub quic: QuicTuning,
    /// Request and response bytes that may be held for in-flight calls, all
    /// connections together; past this, calls get ResourceExhausted.
    pub max_inflight_bytes: u64,
    /// A request must arrive in full within this time of its stream opening.
    pub request_timeout: Duration,
    /// On shutdown, how long in-flight calls may take to finish.
    pub shutdown_grace: Duration,
    /// Which identities may call which kernels.
    pub policy: Policy,
    /// Log every call (identity, kernel, status, time) at info level.
    pub access_log: bool,
}

impl ServerConfig {
    /// A configuration with every default, listening on `listen`.
    pub fn new(listen: SocketAddr, tls: TlsPem) -> Self {
        Self {
            listen,
            tls,
            gpu: GpuConfig::default(),
            limits: Limits::default(),
            quic: QuicTuning::default(),
            max_inflight_bytes: 1024 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            policy: Policy::allow_all(),
            access_log: true,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The GPU side could not start.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// State shared by every connection and stream task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) registry: Arc<Registry>,
    pub(crate) caps: DeviceCaps,
    pub(crate) limits: Limits,
    pub(crate) queue: JobQueue,
    /// In-flight bytes, in KiB permits.
    pub(crate) budget: Arc<Semaphore>,
    pub(crate) budget_kib: u32,
    pub(crate) request_timeout: Duration,
    pub(crate) policy: Policy,
    pub(crate) access_log: bool,
}

/// A bound, ready server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    executor: GpuExecutor,
    shutdown_grace: Duration,
    socket_buffers: SocketBuffers,
}

impl Server {
    /// Starts the GPU executor (adapter, device, kernels) and binds the QUIC
    /// endpoint. The server accepts nothing until [`Server::serve_until`].
    ///
    /// # Errors
    /// [`ServerError`] for unusable TLS material, no GPU adapter, a kernel
    /// that does not load, or an address that cannot be bound.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let chain = tls::certs_from_pem(&config.tls.cert_chain, "server certificate")?;
        let key = tls::key_from_pem(&config.tls.key)?;
        let roots = tls::roots_from_pem(&config.tls.client_ca)?;
        let mut crls = Vec::new();
        for pem in &config.tls.crls {
            let found = tls::crls_from_pem(pem)?;
            // A CRL file with no CRL in it (the CA given by mistake, say)
            // would silently turn revocation checking off.
            if found.is_empty() {
                return Err(ServerError::Tls(TlsError::NoCrl));
            }
            crls.extend(found);
        }
        let crypto = tls::server_crypto(chain, key, roots, crls)?;
        let server_config = tls::server_config(crypto, &config.quic)?;

        let executor = GpuExecutor::start(config.gpu.clone()).await?;
        let bind_error = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let (socket, socket_buffers) =
            socket::bind_udp(config.listen, socket::DEFAULT_BUFFER).map_err(bind_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_error(std::io::Error::other("not inside a tokio runtime")))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let budget_kib =
            u32::try_from((config.max_inflight_bytes / 1024).max(1)).unwrap_or(u32::MAX >> 3);
        let budget_kib = budget_kib.min(Semaphore::MAX_PERMITS as u32);
        let shared = Arc::new(Shared {
            registry: executor.registry().clone(),
            caps: executor.caps(),
            limits: config.limits.clone(),
            queue: executor.queue(),
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            request_timeout: config.request_timeout,
            policy: config.policy.clone(),
            access_log: config.access_log,
        });
        Ok(Self {
            endpoint,
            shared,
            executor,
            shutdown_grace: config.shutdown_grace,
            socket_buffers,
        })
    }

    /// The address the endpoint is bound to (useful after binding port 0).
    ///
    /// # Errors
    /// The socket's error, if it has none.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The UDP buffer sizes the kernel granted (it caps them at
    /// `net.core.rmem_max` / `wmem_max`).
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.socket_buffers
    }

    /// The adapter calls run on.
    pub fn adapter(&self) -> &AdapterSummary {
        self.executor.adapter()
    }

    /// The loaded kernels.
    pub fn kernels(&self) -> &[KernelInterface] {
        self.shared.registry.kernels()
    }

    /// The executor's counters.
    pub fn stats(&self) -> Arc<ExecutorStats> {
        self.executor.stats().clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting connections,
    /// lets in-flight calls finish within the grace period, closes every
    /// connection with [`CloseCode::ServerShutdown`], and stops the GPU
    /// thread.
    pub async fn serve_until(self, shutdown: impl Future<Output = ()>) {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let shared = self.shared.clone();
                    let cancel = cancel.clone();
                    tracker.spawn(async move {
                        handler::connection(incoming, shared, cancel).await;
                    });
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: no new connections");
        // Refuse new handshakes while in-flight calls finish.
        self.endpoint.set_server_config(None);
        cancel.cancel();
        tracker.close();
        if tokio::time::timeout(self.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.shutdown_grace,
                "in-flight calls did not finish within the grace period"
            );
        }
        self.endpoint
            .close(CloseCode::ServerShutdown.varint(), b"server shutting down");
        self.endpoint.wait_idle().await;
        let Self {
            shared, executor, ..
        } = self;
        drop(shared);
        executor.shutdown().await;
        tracing::info!("server stopped");
    }
}
