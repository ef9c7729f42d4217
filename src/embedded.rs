//! A real Quasar server in this process, on loopback, with a throw-away PKI.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use quasar_certs::{CertError, CertificateAuthority, Identity, Validity};
use quasar_client::ClientConfig;
use quasar_server::{
    AdapterSummary, ConnectionStats, ExecutorStats, KernelInterface, Reloader, Server,
    ServerConfig, ServerError, TlsPem,
};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Why an embedded server could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// The PKI could not be generated.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The bound address could not be read.
    #[error("reading the bound address: {0}")]
    Addr(#[source] std::io::Error),
}

/// The server name the embedded server's certificate is issued for.
pub const SERVER_NAME: &str = "localhost";

/// A server running in this process until [`EmbeddedServer::stop`].
#[derive(Debug)]
pub struct EmbeddedServer {
    addr: SocketAddr,
    ca: Arc<CertificateAuthority>,
    adapter: AdapterSummary,
    kernels: Vec<KernelInterface>,
    stats: Arc<ExecutorStats>,
    in_flight: quasar_server::budget::Gauge,
    connections: Arc<ConnectionStats>,
    reloader: Reloader,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedServer {
    /// Starts a server on `127.0.0.1:0` with a fresh CA and server
    /// certificate; `configure` may change the configuration first.
    ///
    /// # Errors
    /// [`EmbeddedError`] if the PKI cannot be made or the server cannot start
    /// (no GPU adapter, say).
    pub async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Result<Self, EmbeddedError> {
        let ca = CertificateAuthority::generate("Quasar embedded CA")?;
        Self::start_with_ca(Arc::new(ca), configure).await
    }

    /// As [`EmbeddedServer::start`], with a given CA: a server restarted with
    /// the same CA is trusted by the clients of the first one.
    ///
    /// # Errors
    /// As [`EmbeddedServer::start`].
    pub async fn start_with_ca(
        ca: Arc<CertificateAuthority>,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Result<Self, EmbeddedError> {
        let server_id = ca.issue_server(
            &[SERVER_NAME.to_owned()],
            &[Ipv4Addr::LOCALHOST.into()],
            Validity::default(),
        )?;
        let mut config = ServerConfig::new(
            (Ipv4Addr::LOCALHOST, 0).into(),
            TlsPem {
                cert_chain: server_id.cert_pem.into_bytes(),
                key: server_id.key_pem.into_bytes(),
                client_ca: ca.cert_pem().as_bytes().to_vec(),
                crls: Vec::new(),
            },
        );
        configure(&mut config);
        let server = Server::bind(config).await?;
        let addr = server.local_addr().map_err(EmbeddedError::Addr)?;
        let adapter = server.adapter().clone();
        let kernels = server.kernels();
        let stats = server.stats();
        let in_flight = server.in_flight();
        let connections = server.connection_stats();
        let reloader = server.reloader();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(server.serve_until(async move { token.cancelled().await }));
        Ok(Self {
            addr,
            ca,
            adapter,
            kernels,
            stats,
            in_flight,
            connections,
            reloader,
            shutdown,
            task,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The adapter the server runs calls on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    /// The kernels the server loaded.
    pub fn kernels(&self) -> &[KernelInterface] {
        &self.kernels
    }

    /// The server's GPU executor counters.
    pub fn stats(&self) -> &Arc<ExecutorStats> {
        &self.stats
    }

    /// The server's connection counters.
    pub fn connection_stats(&self) -> &Arc<ConnectionStats> {
        &self.connections
    }

    /// The in-flight bytes the server's calls hold now.
    pub fn in_flight(&self) -> &quasar_server::budget::Gauge {
        &self.in_flight
    }

    /// Reloads certificates, policy and kernels, and injects GPU faults.
    pub fn reloader(&self) -> &Reloader {
        &self.reloader
    }

    /// The CA, to issue more certificates (expired ones, say).
    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// The CA certificate in PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        self.ca.cert_pem().as_bytes().to_vec()
    }

    /// Issues a client certificate named `name` valid for a year.
    ///
    /// # Errors
    /// [`CertError`] for an invalid name.
    pub fn issue_client(&self, name: &str) -> Result<Identity, CertError> {
        self.ca.issue_client(name, Validity::default())
    }

    /// A client configuration with a fresh certificate named `name`.
    ///
    /// # Errors
    /// [`CertError`] for an invalid name.
    pub fn client_config(&self, name: &str) -> Result<ClientConfig, CertError> {
        let id = self.issue_client(name)?;
        Ok(ClientConfig::new(
            self.addr,
            SERVER_NAME,
            self.ca_pem(),
            id.cert_pem.into_bytes(),
            id.key_pem.into_bytes(),
        ))
    }

    /// Shuts the server down (in-flight calls finish first) and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}
