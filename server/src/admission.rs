//! Who gets a connection: caps on connections (in total and per client
//! address), on handshakes in progress, and QUIC address validation.
//!
//! Every connection attempt is decided here before any cryptography runs:
//! - past `max_connections` open (or opening) connections, or
//!   `max_connections_per_address` from one IP address, it is refused
//!   (QUIC CONNECTION_REFUSED);
//! - an attempt from an address not yet validated is answered with a QUIC
//!   Retry (a stateless token the client must echo from the same address)
//!   always, never, or (by default) once half of `max_handshakes` are in
//!   progress: a flood of Initial packets from spoofed or silent addresses
//!   then costs one small packet each and holds no state;
//! - past `max_handshakes` handshakes in progress it is refused, and a
//!   handshake that does not finish within `handshake_timeout` is dropped.
//!
//! A `Slot` holds an admitted connection's place in the counts and gives
//! it back when dropped, whatever way the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// When to ask a client to prove its address with a QUIC Retry before the
/// handshake (one extra round trip for it, no state on the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressValidation {
    /// Once half of the allowed handshakes are in progress.
    #[default]
    Auto,
    /// For every new connection.
    Always,
    /// Never (a flood then holds handshake slots until they time out).
    Never,
}

/// Caps on connections and handshakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Open connections (handshakes in progress included), all clients.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_connections_per_address: usize,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// A handshake not finished within this time is dropped.
    pub handshake_timeout: Duration,
    /// When to validate client addresses with a Retry.
    pub address_validation: AddressValidation,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_address: 64,
            max_handshakes: 128,
            handshake_timeout: Duration::from_secs(5),
            address_validation: AddressValidation::Auto,
        }
    }
}

/// Counters of connection attempts and their outcomes.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections open now (handshakes in progress included).
    pub open: AtomicU64,
    /// Handshakes in progress now.
    pub handshaking: AtomicU64,
    /// Handshakes completed.
    pub established: AtomicU64,
    /// Attempts answered with a Retry.
    pub retries: AtomicU64,
    /// Attempts refused because `max_connections` were open.
    pub refused_capacity: AtomicU64,
    /// Attempts refused because their address had its share.
    pub refused_per_address: AtomicU64,
    /// Attempts refused because `max_handshakes` were in progress.
    pub refused_handshakes: AtomicU64,
    /// Handshakes that failed (bad certificate, wrong protocol...).
    pub handshakes_failed: AtomicU64,
    /// Handshakes dropped after `handshake_timeout`.
    pub handshakes_timed_out: AtomicU64,
    /// Established connections' certificates checked again because a
    /// reload changed the client CA or CRLs.
    pub certificates_rechecked: AtomicU64,
    /// Connections closed because their certificate was refused after
    /// the handshake (by a reload's client CA or CRLs, or on expiry).
    pub certificates_refused: AtomicU64,
}

/// What to do with a connection attempt.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Go ahead with the handshake.
    Accept(Slot),
    /// Answer with a Retry.
    Retry,
    /// Refuse, for this reason (logged).
    Refuse(&'static str),
}

/// The counts behind the decisions.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) limits: AdmissionLimits,
    by_address: Mutex<HashMap<IpAddr, usize>>,
    stats: Arc<ConnectionStats>,
}

impl Admission {
    pub(crate) fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            by_address: Mutex::new(HashMap::new()),
            stats: Arc::new(ConnectionStats::default()),
        }
    }

    pub(crate) fn stats(&self) -> &Arc<ConnectionStats> {
        &self.stats
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.limits.handshake_timeout
    }

    /// Decides on an attempt from `ip`, whose address is `validated` (it
    /// echoed a Retry token) or not, and `may_retry` (it has not been
    /// sent one already).
    pub(crate) fn decide(
        self: &Arc<Self>,
        ip: IpAddr,
        validated: bool,
        may_retry: bool,
    ) -> Decision {
        let stats = &self.stats;
        let handshaking = stats.handshaking.load(Ordering::Relaxed) as usize;
        let busy = handshaking.saturating_mul(2) >= self.limits.max_handshakes;
        let wants_retry = match self.limits.address_validation {
            AddressValidation::Always => true,
            AddressValidation::Auto => busy,
            AddressValidation::Never => false,
        };
        if wants_retry && !validated && may_retry {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            return Decision::Retry;
        }
        let mut by_address = self
            .by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if stats.open.load(Ordering::Relaxed) as usize >= self.limits.max_connections {
            stats.refused_capacity.fetch_add(1, Ordering::Relaxed);
            return Decision::Refuse("the server has its maximum of connections");
        }
        // Looked up, not inserted: a refused address must leave no entry.
        if by_address.get(&ip).copied().unwrap_or(0) >= self.limits.max_connections_per_address {
            stats.refused_per_address.fetch_add(1, Ordering::Relaxed);
            return Decision::Refuse("this address has its maximum of connections");
        }
        if handshaking >= self.limits.max_handshakes {
            stats.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            return Decision::Refuse("too many handshakes in progress");
        }
        *by_address.entry(ip).or_default() += 1;
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.handshaking.fetch_add(1, Ordering::Relaxed);
        Decision::Accept(Slot {
            admission: self.clone(),
            ip,
            handshaking: true,
        })
    }
}

/// An admitted connection's place in the counts, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
    handshaking: bool,
}

impl Slot {
    /// The handshake finished: the slot now counts an open connection only.
    pub(crate) fn established(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let stats = &self.admission.stats;
            stats.handshaking.fetch_sub(1, Ordering::Relaxed);
            stats.established.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let stats = &self.admission.stats;
        if self.handshaking {
            stats.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
        stats.open.fetch_sub(1, Ordering::Relaxed);
        let mut by_address = self
            .admission
            .by_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = by_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission::new(limits))
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn caps_per_address_and_in_total_and_frees_on_drop() {
        let a = admission(AdmissionLimits {
            max_connections: 3,
            max_connections_per_address: 2,
            address_validation: AddressValidation::Never,
            ..AdmissionLimits::default()
        });
        let s1 = a.decide(A, false, true);
        let s2 = a.decide(A, false, true);
        assert!(matches!(s1, Decision::Accept(_)) && matches!(s2, Decision::Accept(_)));
        assert!(matches!(a.decide(A, false, true), Decision::Refuse(_)));
        let s3 = a.decide(B, false, true);
        assert!(matches!(s3, Decision::Accept(_)));
        assert!(matches!(a.decide(B, false, true), Decision::Refuse(_)));
        assert_eq!(a.stats().refused_per_address.load(Ordering::Relaxed), 1);
        assert_eq!(a.stats().refused_capacity.load(Ordering::Relaxed), 1);
        drop(s1);
        let s4 = a.decide(A, false, true);
        assert!(matches!(s4, Decision::Accept(_)));
        assert_eq!(a.stats().open.load(Ordering::Relaxed), 3);
        drop((s2, s3, s4));
        assert_eq!(a.stats().open.load(Ordering::Relaxed), 0);
        assert!(
            a.by_address.lock().expect("lock").is_empty(),
            "entries left"
        );
        assert_eq!(a.stats().handshaking.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn retries_unvalidated_addresses_once_busy() {
        let a = admission(AdmissionLimits {
            max_handshakes: 4,
            ..AdmissionLimits::default()
        });
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(a.decide(A, false, true));
        }
        assert!(held.iter().all(|d| matches!(d, Decision::Accept(_))));
        // Half the handshakes in progress: unvalidated attempts get a Retry,
        // validated ones (and those already retried) go ahead.
        assert!(matches!(a.decide(B, false, true), Decision::Retry));
        held.push(a.decide(B, true, false));
        held.push(a.decide(B, false, false));
        assert!(matches!(held[2], Decision::Accept(_)));
        // All four in progress: refused.
        assert!(matches!(a.decide(B, true, false), Decision::Refuse(_)));
        // Finished handshakes stop counting as handshakes.
        for d in &mut held {
            if let Decision::Accept(slot) = d {
                slot.established();
            }
        }
        assert!(matches!(a.decide(B, false, true), Decision::Accept(_)));
    }
}
