//! The Quasar server: accepts QUIC connections with mutual TLS and runs each
//! call, one per bidirectional stream, as a wgpu compute shader.
//!
//! # Layout
//! - this file: [`ServerConfig`] and [`Server`]: binding the endpoint, the
//!   accept loop (one task per connection, one per stream), shutdown, and
//!   [`Reloader`] for swapping certificates, policy and kernels live.
//! - [`admission`]: caps on connections and handshakes, address validation.
//! - [`budget`]: the in-flight byte budgets calls take their shares of.
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
pub mod admission;
pub mod budget;
pub(crate) mod clients;
pub mod gpu;
pub mod handler;
pub mod kernel;
pub mod local;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use budget::Budget;
use clients::Clients;
use quasar_transport::socket::{self, SocketBuffers};
use quasar_transport::tls::{self, QuicTuning, TlsError};
use quasar_transport::{CloseCode, Limits};
use rustls::server::danger::ClientCertVerifier;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use access::{Identity, Policy};
pub use admission::{AddressValidation, AdmissionLimits, ConnectionStats};
pub use gpu::executor::{
    DEFAULT_IDLE_SPIN, ExecutorControl, ExecutorStats, GpuConfig, MAX_IDLE_SPIN, Registry,
    Timestamping,
};
pub use gpu::{AdapterReport, AdapterSummary, GpuError, LavapipeThreads, list_adapters};
pub use kernel::KernelInterface;

use admission::{Admission, Decision};
use gpu::executor::{BeforePublish, GpuExecutor, JobQueue, Kernels};

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
    /// Caps on connections and handshakes, and address validation.
    pub admission: AdmissionLimits,
    /// Request and response bytes that may be held for in-flight calls, all
    /// connections together; past this, calls get ResourceExhausted.
    pub max_inflight_bytes: u64,
    /// The same, for the calls of one client (all the connections of one
    /// certificate identity together): one client cannot take the whole
    /// budget, however many connections it opens. The default holds the
    /// largest call (a full request and a full response).
    pub max_inflight_bytes_per_client: u64,
    /// A request's header must arrive within this time of its stream
    /// opening, and each byte of its payload by this time plus the time the
    /// bytes before it take at `min_transfer_rate`; a reply must be read
    /// within this time plus its length at that rate. Taken as at most a
    /// year.
    pub request_timeout: Duration,
    /// The slowest transfer a payload or reply is given time for, in bytes
    /// per second (0: the request timeout alone bounds every transfer). An
    /// upload that falls behind it is reset as soon as it does, so a
    /// stalled client pins its share of the budgets for about the request
    /// timeout.
    pub min_transfer_rate: u64,
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
            admission: AdmissionLimits::default(),
            max_inflight_bytes: 1024 * 1024 * 1024,
            max_inflight_bytes_per_client: 512 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            min_transfer_rate: 4 * 1024 * 1024,
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
    /// The access policy has a malformed pattern.
    #[error("access policy: {0}")]
    Policy(String),
    /// A reload found the server stopped.
    #[error("the server has stopped")]
    Stopped,
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
    pub(crate) kernels: Arc<Kernels>,
    pub(crate) limits: Limits,
    pub(crate) queue: JobQueue,
    /// In-flight bytes, in KiB.
    pub(crate) budget: Arc<Budget>,
    pub(crate) budget_kib: u32,
    /// The clients connected now, each with its own budget.
    pub(crate) clients: Clients,
    pub(crate) request_timeout: Duration,
    pub(crate) min_transfer_rate: u64,
    policy: RwLock<Arc<Policy>>,
    pub(crate) access_log: bool,
    /// The TLS configuration in force: each handshake runs under it, and
    /// each connection checks its certificate again when a reload changes
    /// whom it trusts, so a revocation reaches sessions already open.
    pub(crate) tls: watch::Sender<TlsInForce>,
    /// Bounds how many of those checks run at once, on blocking threads.
    pub(crate) recheck_permits: Arc<tokio::sync::Semaphore>,
}

/// The TLS configuration in force.
#[derive(Debug, Clone)]
pub(crate) struct TlsInForce {
    /// What a new connection's handshake runs under. quinn would otherwise
    /// use the configuration of when the connection's first packet
    /// arrived, which may predate a reload.
    pub(crate) server_config: Arc<quinn::ServerConfig>,
    /// Its client certificate verifier.
    pub(crate) client_check: Arc<dyn ClientCertVerifier>,
    /// The client CA and CRLs it was built from: a reload that keeps them
    /// (a new server certificate, say) checks no connection again.
    trust: Arc<Trust>,
}

/// Whom the server trusts, as read: the client CA and the CRLs.
#[derive(Debug, PartialEq, Eq)]
struct Trust {
    client_ca: Vec<u8>,
    crls: Vec<Vec<u8>>,
}

impl TlsInForce {
    fn new(
        server_config: quinn::ServerConfig,
        client_check: Arc<dyn ClientCertVerifier>,
        pem: &TlsPem,
    ) -> Self {
        Self {
            server_config: Arc::new(server_config),
            client_check,
            trust: Arc::new(Trust {
                client_ca: pem.client_ca.clone(),
                crls: pem.crls.clone(),
            }),
        }
    }
}

impl Shared {
    /// The access policy as it is now (a reload replaces it whole).
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A byte count as KiB of a budget.
fn kib_of(bytes: u64) -> u32 {
    u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX)
}

/// A bound, ready server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    executor: GpuExecutor,
    admission: Arc<Admission>,
    /// The endpoint's configuration as bound, the base of every reload.
    base: quinn::ServerConfig,
    stopping: CancellationToken,
    /// Held while changing the endpoint's server configuration, so a reload
    /// cannot turn handshakes back on once shutdown has turned them off.
    config_gate: Arc<Mutex<()>>,
    /// Held for the whole of a reload.
    reloading: Arc<tokio::sync::Mutex<()>>,
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
        config.policy.validate().map_err(ServerError::Policy)?;
        let (crypto, client_check) = server_crypto(&config.tls)?;
        let mut server_config = tls::server_config(crypto, &config.quic)?;
        // Attempts waiting for the accept loop: it decides on each at once,
        // so this only needs to absorb a burst.
        server_config.max_incoming(config.admission.max_handshakes.saturating_mul(4).max(64));
        server_config.incoming_buffer_size(64 * 1024);
        server_config.incoming_buffer_size_total(16 * 1024 * 1024);

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
            config.quic.endpoint_config(),
            Some(server_config.clone()),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let budget_kib = kib_of(config.max_inflight_bytes);
        let shared = Arc::new(Shared {
            kernels: executor.kernels().clone(),
            limits: config.limits.clone(),
            queue: executor.queue(),
            budget: Budget::new(budget_kib),
            budget_kib,
            clients: Clients::new(kib_of(config.max_inflight_bytes_per_client)),
            // Deadlines are this much after an `Instant`: a year is
            // "never" here and cannot overflow one.
            request_timeout: config
                .request_timeout
                .min(Duration::from_secs(365 * 86_400)),
            min_transfer_rate: config.min_transfer_rate,
            policy: RwLock::new(Arc::new(config.policy.clone())),
            access_log: config.access_log,
            tls: watch::Sender::new(TlsInForce::new(
                server_config.clone(),
                client_check,
                &config.tls,
            )),
            recheck_permits: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, usize::from),
            )),
        });
        Ok(Self {
            endpoint,
            shared,
            executor,
            admission: Arc::new(Admission::new(config.admission.clone())),
            base: server_config,
            stopping: CancellationToken::new(),
            config_gate: Arc::new(Mutex::new(())),
            reloading: Arc::new(tokio::sync::Mutex::new(())),
            shutdown_grace: config.shutdown_grace,
            socket_buffers,
        })
    }

    /// A handle that swaps certificates, CA, CRLs, policy and kernels on
    /// the running server.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            endpoint: self.endpoint.clone(),
            shared: self.shared.clone(),
            control: self.executor.control(),
            base: self.base.clone(),
            stopping: self.stopping.clone(),
            config_gate: self.config_gate.clone(),
            reloading: self.reloading.clone(),
        }
    }

    /// The in-flight bytes that calls hold now, all clients together
    /// (requests, responses, and replies not yet acknowledged).
    pub fn in_flight(&self) -> budget::Gauge {
        budget::Gauge::new(self.shared.budget.clone(), self.shared.budget_kib)
    }

    /// Connection attempts and their outcomes.
    pub fn connection_stats(&self) -> Arc<ConnectionStats> {
        self.admission.stats().clone()
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

    /// The kernels loaded now.
    pub fn kernels(&self) -> Vec<KernelInterface> {
        self.shared.kernels.current().kernels().to_vec()
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
        let cancel = self.stopping.clone();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    self.admit(incoming, &tracker, &cancel);
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: no new connections");
        // Refuse new handshakes while in-flight calls finish (a reload
        // checks the token, so it cannot turn them back on).
        {
            let _gate = self
                .config_gate
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            cancel.cancel();
            self.endpoint.set_server_config(None);
        }
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

    /// Decides on a connection attempt at once (the accept loop never
    /// waits on a handshake) and spawns the handshake if it is admitted.
    fn admit(&self, incoming: quinn::Incoming, tracker: &TaskTracker, cancel: &CancellationToken) {
        let remote = incoming.remote_address();
        let decision = self.admission.decide(
            remote.ip(),
            incoming.remote_address_validated(),
            incoming.may_retry(),
        );
        match decision {
            Decision::Accept(slot) => {
                let shared = self.shared.clone();
                let cancel = cancel.clone();
                let admission = self.admission.clone();
                tracker.spawn(async move {
                    handler::connection(incoming, slot, &admission, shared, cancel).await;
                });
            }
            Decision::Retry => {
                if let Err(e) = incoming.retry() {
                    // Only possible for an attempt that was retried already.
                    e.into_incoming().refuse();
                }
            }
            Decision::Refuse(reason) => {
                tracing::info!(%remote, reason, "connection refused");
                incoming.refuse();
            }
        }
    }
}

/// The rustls server configuration for this TLS material, and the client
/// certificate verifier inside it.
fn server_crypto(
    pem: &TlsPem,
) -> Result<(rustls::ServerConfig, Arc<dyn ClientCertVerifier>), ServerError> {
    let chain = tls::certs_from_pem(&pem.cert_chain, "server certificate")?;
    let key = tls::key_from_pem(&pem.key)?;
    let roots = tls::roots_from_pem(&pem.client_ca)?;
    let mut crls = Vec::new();
    for pem in &pem.crls {
        let found = tls::crls_from_pem(pem)?;
        // A CRL file with no CRL in it (the CA given by mistake, say)
        // would silently turn revocation checking off.
        if found.is_empty() {
            return Err(ServerError::Tls(TlsError::NoCrl));
        }
        crls.extend(found);
    }
    let verifier = tls::client_verifier(roots, crls)?;
    Ok((
        tls::server_crypto_with(chain, key, verifier.clone())?,
        verifier,
    ))
}

/// The right to change what the server runs under, held while it does;
/// none once the server is stopping (which takes it to turn new
/// handshakes off for good).
fn gate<'a>(
    config_gate: &'a Mutex<()>,
    stopping: &CancellationToken,
) -> Option<std::sync::MutexGuard<'a, ()>> {
    let guard = config_gate.lock().unwrap_or_else(PoisonError::into_inner);
    (!stopping.is_cancelled()).then_some(guard)
}

/// What a reload replaces: everything else needs a restart.
#[derive(Debug, Clone)]
pub struct ReloadConfig {
    /// Server certificate and key, client CA and CRLs.
    pub tls: TlsPem,
    /// The access policy.
    pub policy: Policy,
    /// The kernel directory (shipped kernels are always loaded).
    pub kernel_dir: Option<PathBuf>,
}

/// Swaps certificates, CA, CRLs, policy and kernels on a running server
/// without dropping connections: established connections keep their
/// session (and the identity they proved) while their certificate passes
/// the new client CA and CRLs, new handshakes see the new certificates
/// and CRLs, every call from then on is checked against the new policy
/// and kernels. When the client CA or CRLs change, a connection whose
/// certificate they refuse (revoked, issued by a CA no longer trusted) is
/// closed with [`CloseCode::CertificateRefused`], as is any connection
/// when its certificate expires.
#[derive(Debug, Clone)]
pub struct Reloader {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    control: ExecutorControl,
    base: quinn::ServerConfig,
    stopping: CancellationToken,
    config_gate: Arc<Mutex<()>>,
    reloading: Arc<tokio::sync::Mutex<()>>,
}

impl Reloader {
    /// Checks everything new first (certificates, key, CRLs, every kernel
    /// parsed and compiled); if any of it is broken, nothing changes and
    /// the error says what. Returns the kernels now loaded. The new policy
    /// goes in force with the new kernels, just before them, so a kernel
    /// this reload adds is never called under the policy before it.
    /// Reloads run one at a time.
    ///
    /// # Errors
    /// [`ServerError`] naming the broken part, or [`ServerError::Stopped`].
    pub async fn reload(&self, config: ReloadConfig) -> Result<Vec<String>, ServerError> {
        if self.stopping.is_cancelled() {
            return Err(ServerError::Stopped);
        }
        config.policy.validate().map_err(ServerError::Policy)?;
        // The running configuration with new TLS: the transport settings,
        // admission buffers and the Retry token key (tokens issued just
        // before stay valid) carry over.
        let mut server_config = self.base.clone();
        let (crypto, client_check) = server_crypto(&config.tls)?;
        server_config.crypto = tls::quic_crypto(crypto)?;
        // One reload at a time: their policies and kernels go in in order.
        let _one_at_a_time = self.reloading.lock().await;
        // The policy goes in force on the GPU thread once the kernels have
        // compiled, just before they are published: a call reads the
        // kernels first, so one that finds a kernel this reload adds is
        // checked against this policy; a reload whose kernels fail leaves
        // the policy as it was.
        let policy = Arc::new(config.policy);
        let (shared, stopping, config_gate) = (
            self.shared.clone(),
            self.stopping.clone(),
            self.config_gate.clone(),
        );
        let before_publish = BeforePublish::new(move || {
            if let Some(_gate) = gate(&config_gate, &stopping) {
                *shared
                    .policy
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = policy;
            }
        });
        // The kernel swap is the last step that can fail, and it is all or
        // nothing inside the executor.
        let kernels = self
            .control
            .reload(config.kernel_dir, before_publish)
            .await?;
        let _gate = gate(&self.config_gate, &self.stopping).ok_or(ServerError::Stopped)?;
        let in_force = TlsInForce::new(server_config.clone(), client_check, &config.tls);
        self.endpoint.set_server_config(Some(server_config));
        self.shared.tls.send_if_modified(|tls| {
            let trust_changed = tls.trust != in_force.trust;
            *tls = in_force;
            trust_changed
        });
        tracing::info!(kernels = kernels.len(), "configuration reloaded");
        Ok(kernels)
    }

    /// Destroys the GPU device as a driver reset would; the executor
    /// recreates it. For fault-injection tests and drills.
    pub async fn lose_device(&self) {
        self.control.lose_device().await;
    }
}
