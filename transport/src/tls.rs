//! Mutual TLS 1.3 over QUIC: the rustls and quinn configuration both peers use.
//!
//! The server verifies client certificates with rustls's WebPKI verifier over
//! the configured client CA; the client verifies the server's certificate
//! against its CA and the server name. Nothing here accepts an unverified
//! certificate. The `ring` provider is used throughout because it builds with
//! only a C compiler.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use thiserror::Error;

use crate::ALPN;

/// Why a TLS or QUIC configuration could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be parsed.
    #[error("invalid PEM in {what}: {source}")]
    Pem {
        /// What was being read ("certificate", "private key", "CA").
        what: &'static str,
        /// The parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file held no certificate.
    #[error("no certificate found in {what}")]
    NoCertificates {
        /// What was being read.
        what: &'static str,
    },
    /// A CRL file holds no certificate revocation list.
    #[error("a --crl file holds no X509 CRL")]
    NoCrl,
    /// rustls refused the configuration (a key that does not match, say).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (an empty CA, say).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// QUIC's smallest allowed UDP payload (RFC 9000, section 14): the least
/// [`QuicTuning::max_udp_payload`].
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// QUIC transport parameters shared by both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicTuning {
    /// Most bidirectional streams (calls) the peer may have open at once.
    pub max_concurrent_streams: u32,
    /// Flow-control window of one stream, in bytes.
    pub stream_receive_window: u32,
    /// Flow-control window of the whole connection, in bytes (never unlimited).
    pub receive_window: u32,
    /// Most unacknowledged bytes we send on a connection.
    pub send_window: u64,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// Send keep-alives this often (the client does, so idle connections live).
    pub keep_alive: Option<Duration>,
    /// Largest UDP payload, in bytes, that we accept and that MTU discovery
    /// probes the path for; values are clamped to
    /// [`MIN_UDP_PAYLOAD`]..=[`MAX_UDP_PAYLOAD`].
    ///
    /// Each side discovers its own direction and never exceeds what the
    /// peer said it accepts, so the smaller of the two sides' values bounds
    /// both directions, and a path with a 1500-byte MTU settles near 1452-1472
    /// bytes whatever this says (after a few more lost probes than with
    /// quinn's 1452 ceiling, once per discovery run, every 10 minutes).
    ///
    /// Memory: quinn sizes each endpoint's receive buffer as this times its
    /// batch of 32 datagrams times up to 64 GRO segments, about 13 MiB at
    /// 6500 bytes (3 MiB at 1472), of which only the pages datagrams land
    /// in are touched: a server's peak and idle RSS measured the same at
    /// both sizes (BENCHMARKS.md, target 7). Each [`quinn::Endpoint`] (one
    /// per SDK client) has one.
    pub max_udp_payload: u16,
}

/// The default and largest [`QuicTuning::max_udp_payload`]: 6500 bytes.
///
/// Why raise quinn's defaults (accept 1472, probe up to 1452): on loopback
/// (MTU 64 KiB) and jumbo-frame links, fewer and larger packets cut QUIC's
/// per-packet work (headers, header protection, acknowledgements,
/// syscalls), which dominates bulk transfers: it about doubles a 1 MiB
/// echo's throughput on loopback (BENCHMARKS.md, target 5).
///
/// Why no higher (checked against quinn 0.11.12 and quinn-udp 0.5.16):
/// quinn sends up to 10 packets as one GSO batch, Linux refuses a UDP send
/// over 65,507 bytes, and quinn-udp drops such a batch silently (it takes
/// the error for a failed MTU probe). Loss detection then judges the path
/// a black hole and falls back to 1200-byte packets, and again each time a
/// later discovery run climbs back. 10 x 6500 stays under 65,507 bytes; the
/// test `a_large_payload_travels_in_large_datagrams_over_loopback` catches
/// a quinn that batches more.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

// quinn's GSO batches of up to 10 full packets must stay sendable.
const _: () = assert!(10 * (MAX_UDP_PAYLOAD as u32) <= 65_507);

impl Default for QuicTuning {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1024,
            stream_receive_window: 8 * 1024 * 1024,
            receive_window: 32 * 1024 * 1024,
            send_window: 32 * 1024 * 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            max_udp_payload: MAX_UDP_PAYLOAD,
        }
    }
}

impl QuicTuning {
    fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_concurrent_streams));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window));
        t.receive_window(quinn::VarInt::from_u32(self.receive_window));
        t.send_window(self.send_window);
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.keep_alive_interval(self.keep_alive);
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(self.udp_payload());
        t.mtu_discovery_config(Some(mtud));
        t
    }

    fn udp_payload(&self) -> u16 {
        self.max_udp_payload.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
    }

    /// The quinn endpoint configuration for this tuning: it tells peers the
    /// largest datagram we accept (quinn's default, 1472, would cap their
    /// MTU discovery below what a loopback or jumbo-frame path carries).
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut e = quinn::EndpointConfig::default();
        // In range by construction, so quinn's bounds check cannot refuse it.
        let _ = e.max_udp_payload_size(self.udp_payload());
        e
    }
}

/// ring's provider with AES-128-GCM preferred over rustls's first choice,
/// AES-256-GCM. The SDK offers the suites in this order, and the server
/// picks by it too (see [`server_crypto`]), so any client that offers
/// AES-128-GCM gets it.
///
/// Every payload byte is sealed once and opened once per direction, and on
/// bulk transfers that is the largest single cost: 30% of a 1 MiB echo's
/// CPU samples with AES-256. AES-128 does 10 rounds per block instead of
/// 14 with the same GHASH, which took 4.5% off the CPU per call of a 1 MiB
/// echo (BENCHMARKS.md, "Cipher suite"). It is TLS 1.3's mandatory suite
/// and the one QUIC's own Initial packets use; the other two stay accepted
/// from clients that offer only them.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Parses every certificate in a PEM document.
///
/// # Errors
/// [`TlsError::Pem`] or [`TlsError::NoCertificates`].
pub fn certs_from_pem(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { what });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM document.
///
/// # Errors
/// [`TlsError::Pem`].
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| TlsError::Pem {
        what: "private key",
        source,
    })
}

/// Builds a root store from every certificate in a PEM document.
///
/// # Errors
/// As [`certs_from_pem`], or [`TlsError::Rustls`] for an unusable CA.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, "CA")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Parses every certificate revocation list in a PEM document.
///
/// # Errors
/// [`TlsError::Pem`].
pub fn crls_from_pem(pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: "CRL",
            source,
        })
}

/// The server's rustls configuration: TLS 1.3 only, ALPN `quasar/1`, client
/// certificates required and verified against `client_ca`, and refused if
/// revoked by one of `crls`. The cipher suite is chosen by the server's
/// order, not the client's: the server pays for every client's bytes, and
/// a client built on rustls's defaults would otherwise ask for AES-256.
///
/// # Errors
/// [`TlsError`] if the key does not match the certificate or the CA is empty.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<rustls::ServerConfig, TlsError> {
    server_crypto_with(chain, key, client_verifier(client_ca, crls)?)
}

/// Client certificates accepted if issued by `client_ca` and not revoked
/// by one of `crls`: the verifier [`server_crypto`] builds, for a server
/// that also checks its established connections again with it
/// ([`verify_peer`]). Its refusals say why without the server's clock.
///
/// # Errors
/// [`TlsError`] if the CA is empty or a CRL is malformed.
pub fn client_verifier(
    client_ca: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_ca), provider())
        .with_crls(crls)
        .build()?;
    Ok(Arc::new(Discreet(verifier)))
}

/// [`server_crypto`] with a verifier from [`client_verifier`].
///
/// # Errors
/// [`TlsError`] if the key does not match the certificate.
pub fn server_crypto_with(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.ignore_client_order = true;
    Ok(cfg)
}

/// The WebPKI client verifier, with its refusals stripped of context: a
/// refused client is told why (expired, not yet valid, unknown issuer,
/// revoked) but not the server's clock, which rustls puts in the error text
/// that quinn sends back in the connection close.
#[derive(Debug)]
struct Discreet(Arc<dyn ClientCertVerifier>);

fn discreet(e: rustls::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => rustls::Error::InvalidCertificate(match c {
            C::ExpiredContext { .. } => C::Expired,
            C::NotValidYetContext { .. } => C::NotValidYet,
            C::ExpiredRevocationListContext { .. } => C::ExpiredRevocationList,
            C::NotValidForNameContext { .. } => C::NotValidForName,
            other => other,
        }),
        other => other,
    }
}

impl ClientCertVerifier for Discreet {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(discreet)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Checks a connected peer's certificate chain (its own first, as quinn's
/// `peer_identity` gives it) with `verifier`, as of now: a server whose
/// client CA or CRLs changed after the handshake asks this of each
/// connection it keeps.
///
/// # Errors
/// rustls's reason (revoked, expired, unknown issuer, no certificate).
pub fn verify_peer(
    verifier: &dyn ClientCertVerifier,
    chain: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err(rustls::Error::NoCertificatesPresented);
    };
    verifier
        .verify_client_cert(end_entity, intermediates, UnixTime::now())
        .map(|_| ())
}

/// Wraps a server rustls configuration for quinn with the given tuning.
///
/// # Errors
/// [`TlsError::Quic`] if the configuration has no QUIC-capable cipher suite.
pub fn server_config(
    crypto: rustls::ServerConfig,
    tuning: &QuicTuning,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut cfg = quinn::ServerConfig::with_crypto(quic_crypto(crypto)?);
    cfg.transport_config(Arc::new(tuning.transport_config()));
    Ok(cfg)
}

/// A server rustls configuration as quinn's crypto, for swapping into a
/// running [`quinn::ServerConfig`] (a certificate reload keeps the rest,
/// the Retry token key included).
///
/// # Errors
/// [`TlsError::Quic`] if the configuration has no QUIC-capable cipher suite.
pub fn quic_crypto(
    crypto: rustls::ServerConfig,
) -> Result<Arc<dyn quinn::crypto::ServerConfig>, TlsError> {
    Ok(Arc::new(QuicServerConfig::try_from(crypto)?))
}

/// The client's quinn configuration: TLS 1.3 only, ALPN `quasar/1`, the server
/// verified against `ca`, and the client's own certificate presented.
///
/// # Errors
/// [`TlsError`] if the key does not match the certificate.
pub fn client_config(
    ca: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    tuning: &QuicTuning,
) -> Result<quinn::ClientConfig, TlsError> {
    let quic = QuicClientConfig::try_from(client_crypto(ca, chain, key)?)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = tuning.transport_config();
    // Calls are the client's streams; a server may open none. Streams it
    // opened anyway would never be read, and their data would hold the
    // connection's receive window that replies need.
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

fn client_crypto(
    ca: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    client_crypto_with(provider(), ca, chain, key)
}

/// [`client_crypto`] on another provider (tests: clients with other cipher
/// suite orders).
fn client_crypto_with(
    provider: Arc<CryptoProvider>,
    ca: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(ca)
        .with_client_auth_cert(chain, key)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    Ok(crypto)
}

#[cfg(test)]
mod tests {
    use quasar_certs::{CertificateAuthority, Validity};
    use rustls::CipherSuite;

    use super::*;

    /// What a client presents.
    struct ClientId {
        roots: RootCertStore,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    }

    /// A server configuration as Quasar's server builds it, and a client
    /// identity from the same fresh CA.
    fn peers() -> (rustls::ServerConfig, ClientId) {
        let ca = CertificateAuthority::generate("cipher test CA").expect("CA");
        let server = ca
            .issue_server(&["localhost".into()], &[], Validity::default())
            .expect("server certificate");
        let client = ca
            .issue_client("cipher-test", Validity::default())
            .expect("client certificate");
        let roots = || roots_from_pem(ca.cert_pem().as_bytes()).expect("CA root");
        let server = server_crypto(
            certs_from_pem(server.cert_pem.as_bytes(), "server").expect("chain"),
            key_from_pem(server.key_pem.as_bytes()).expect("key"),
            roots(),
            Vec::new(),
        )
        .expect("server config");
        let id = ClientId {
            roots: roots(),
            chain: certs_from_pem(client.cert_pem.as_bytes(), "client").expect("chain"),
            key: key_from_pem(client.key_pem.as_bytes()).expect("key"),
        };
        (server, id)
    }

    /// Sends what `from` has to send to `to`, which takes it in.
    fn flight(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).expect("writes");
        }
        // read_tls takes at most what its buffer has room for per call.
        let mut unread = wire.as_slice();
        while !unread.is_empty() {
            to.read_tls(&mut unread).expect("reads");
            to.process_new_packets().expect("accepts");
        }
    }

    /// Runs a whole mutual-TLS handshake in memory and returns the suite
    /// each side settled on.
    fn negotiate(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> (Option<CipherSuite>, Option<CipherSuite>) {
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let mut c = rustls::Connection::Client(
            rustls::ClientConnection::new(Arc::new(client), name).expect("client"),
        );
        let mut s = rustls::Connection::Server(
            rustls::ServerConnection::new(Arc::new(server)).expect("server"),
        );
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            flight(&mut c, &mut s);
            flight(&mut s, &mut c);
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake stalled"
        );
        (
            c.negotiated_cipher_suite().map(|x| x.suite()),
            s.negotiated_cipher_suite().map(|x| x.suite()),
        )
    }

    #[test]
    fn quasar_peers_settle_on_aes_128_gcm() {
        let (server, id) = peers();
        let client = client_crypto(id.roots, id.chain, id.key).expect("client config");
        let want = Some(CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(negotiate(server, client), (want, want));
    }

    /// A client like Quasar's but on rustls's ring provider offering
    /// `suites`, in that order, with the identity `id`.
    fn other_client(
        id: ClientId,
        suites: Vec<rustls::SupportedCipherSuite>,
    ) -> rustls::ClientConfig {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = suites;
        client_crypto_with(Arc::new(provider), id.roots, id.chain, id.key).expect("client config")
    }

    #[test]
    fn the_server_picks_aes_128_gcm_from_a_client_that_prefers_aes_256() {
        let (server, id) = peers();
        let defaults = rustls::crypto::ring::default_provider().cipher_suites;
        assert_eq!(
            defaults.first().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_256_GCM_SHA384),
            "rustls's own order, which this test relies on"
        );
        let client = other_client(id, defaults);
        let want = Some(CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(negotiate(server, client), (want, want));
    }

    #[test]
    fn clients_offering_only_another_suite_still_get_in() {
        use rustls::crypto::ring::cipher_suite::{
            TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
        };
        for only in [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
            let (server, id) = peers();
            let client = other_client(id, vec![only]);
            let want = Some(only.suite());
            assert_eq!(negotiate(server, client), (want, want));
        }
    }

    #[test]
    fn the_udp_payload_is_kept_within_what_quic_and_gso_allow() {
        for (asked, got) in [
            (0, MIN_UDP_PAYLOAD),
            (1472, 1472),
            (MAX_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
            (9000, MAX_UDP_PAYLOAD),
            (u16::MAX, MAX_UDP_PAYLOAD),
        ] {
            let tuning = QuicTuning {
                max_udp_payload: asked,
                ..QuicTuning::default()
            };
            assert_eq!(
                tuning.endpoint_config().get_max_udp_payload_size(),
                u64::from(got),
                "asked for {asked}"
            );
        }
    }
}
