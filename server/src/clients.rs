//! What all of one client's connections share: its in-flight byte budget
//! and its place in the GPU queue's turns.
//!
//! A client is an identity, the names its certificate gives it
//! ([`Identity`]), so a client that opens more connections gets no more of
//! either: the budget and the queue's per-client bound hold for all its
//! connections together. Two certificates with exactly the same names, in
//! any order (a certificate and its renewal, or one certificate deployed
//! to many machines), are one client. A client is forgotten once it has no
//! connection open and nothing of its calls is held any more (each call's
//! reservation keeps it), so closing connections and opening new ones does
//! not get it a fresh budget either.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use crate::access::Identity;
use crate::budget::Budget;
use crate::handler::Lingering;

/// A client's key: its identity's names, sorted, without repeats.
type Key = Vec<String>;

fn key(identity: &Identity) -> Key {
    let mut names = identity.names().to_vec();
    names.sort_unstable();
    names.dedup();
    names
}

/// The clients with at least one connection open.
#[derive(Debug)]
pub(crate) struct Clients {
    /// Each client's budget, in KiB.
    budget_kib: u32,
    live: Arc<Mutex<Live>>,
    /// When every client's replies were last checked.
    swept_all: Mutex<Option<Instant>>,
    /// KiB that lingering replies hold, all connections together: a check
    /// of every list is skipped when they could not cover a shortfall.
    lingering_kib: Arc<AtomicI64>,
}

/// The least time between two checks of every client's replies.
const SWEEP_ALL_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Live {
    by_identity: HashMap<Key, Weak<Client>>,
    /// Numbers identities: a hash of the names with keys of this server's
    /// own, so an identity keeps its number (and the GPU time it owes)
    /// across its connections, and nobody can pick names that collide
    /// with another's.
    ids: RandomState,
}

/// One client: shared by its connections and its calls' reservations.
pub(crate) struct Client {
    /// Numbers the client for the GPU queue's turns and bounds: the same
    /// number whenever the identity comes back, for the server's life.
    pub(crate) id: u64,
    /// The client's in-flight byte budget, in KiB.
    pub(crate) budget: Arc<Budget>,
    /// Its connections' lists of replies awaiting acknowledgement, checked
    /// together when a budget is short.
    lingering: Mutex<Vec<Weak<Lingering>>>,
    key: Key,
    live: Arc<Mutex<Live>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("names", &self.key)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Adds a connection's list of lingering replies to the client's.
    pub(crate) fn watch(&self, lingering: &Arc<Lingering>) {
        let mut lists = lock(&self.lingering);
        // Closed connections' lists go as new ones come: the vector holds
        // about as many entries as the client has connections.
        lists.retain(|l| l.strong_count() > 0);
        lists.push(Arc::downgrade(lingering));
    }

    /// Checks the lingering replies of every connection of the client's;
    /// returns the KiB released.
    pub(crate) fn sweep(&self) -> u64 {
        let lists: Vec<Arc<Lingering>> = lock(&self.lingering)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        lists.iter().map(|l| l.sweep()).sum()
    }
}

impl Clients {
    /// No clients yet; each will have `budget_kib` KiB.
    pub(crate) fn new(budget_kib: u32) -> Self {
        Self {
            budget_kib,
            live: Arc::default(),
            swept_all: Mutex::default(),
            lingering_kib: Arc::default(),
        }
    }

    /// Each client's budget, in KiB.
    pub(crate) fn budget_kib(&self) -> u32 {
        self.budget_kib
    }

    /// The count of KiB held by lingering replies that each connection's
    /// list keeps up to date.
    pub(crate) fn lingering_kib(&self) -> Arc<AtomicI64> {
        self.lingering_kib.clone()
    }

    /// Checks the lingering replies of every client, if they hold at least
    /// `short` KiB; returns the KiB released. One caller at a time, and at
    /// most once per [`SWEEP_ALL_EVERY`]: a flood of refused calls does not
    /// walk every list per call.
    pub(crate) fn sweep_all(&self, short: u32) -> u64 {
        if self.lingering_kib.load(Ordering::Relaxed) < i64::from(short) {
            return 0;
        }
        let mut last = match self.swept_all.try_lock() {
            Ok(last) => last,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return 0,
        };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < SWEEP_ALL_EVERY) {
            return 0;
        }
        *last = Some(now);
        // Collected first: a client dropped here locks the map.
        let clients: Vec<Arc<Client>> = lock(&self.live)
            .by_identity
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        clients.iter().map(|c| c.sweep()).sum()
    }

    /// The client `identity` names: the one its other open connections
    /// share, or a new one.
    pub(crate) fn join(&self, identity: &Identity) -> Arc<Client> {
        let key = key(identity);
        let mut live = lock(&self.live);
        if let Some(client) = live.by_identity.get(&key).and_then(Weak::upgrade) {
            return client;
        }
        // In-process callers are source 0 of the GPU queue. Two identities
        // sharing an id (a collision of a 64-bit keyed hash, about one in
        // 2^64 per pair) would share queue turns and per-client queue
        // bounds, and their calls could share a fused dispatch: each call
        // still reaches only its own part of the buffers there.
        let id = live.ids.hash_one(&key).max(1);
        let client = Arc::new(Client {
            id,
            budget: Budget::new(self.budget_kib),
            lingering: Mutex::default(),
            key: key.clone(),
            live: self.live.clone(),
        });
        // Replaces a dead entry whose client is still being dropped: its
        // drop then finds a live client under the name and leaves it.
        live.by_identity.insert(key, Arc::downgrade(&client));
        client
    }

    /// Clients with a connection open.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.live).by_identity.len()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut live = lock(&self.live);
        if live
            .by_identity
            .get(&self.key)
            .is_some_and(|c| c.strong_count() == 0)
        {
            live.by_identity.remove(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Identity {
        Identity::from_names(vec![name.to_owned()])
    }

    #[test]
    fn the_same_names_in_another_order_are_the_same_client() {
        let clients = Clients::new(100);
        let ab = clients.join(&Identity::from_names(vec!["a".into(), "b".into()]));
        let ba = clients.join(&Identity::from_names(vec![
            "b".into(),
            "a".into(),
            "a".into(),
        ]));
        let a = clients.join(&named("a"));
        assert!(Arc::ptr_eq(&ab, &ba));
        assert!(!Arc::ptr_eq(&ab, &a), "fewer names: another client");
    }

    #[test]
    fn connections_of_one_identity_share_one_client_until_the_last_closes() {
        let clients = Clients::new(100);
        let a1 = clients.join(&named("a"));
        let a2 = clients.join(&named("a"));
        let b = clients.join(&named("b"));
        assert!(Arc::ptr_eq(&a1, &a2), "one client per identity");
        assert_ne!(a1.id, b.id);
        assert_ne!(a1.id, 0, "source 0 is the in-process callers'");
        let share = a1.budget.try_take(100).expect("the whole budget");
        assert!(a2.budget.try_take(1).is_none(), "a's budget is shared");
        assert!(b.budget.try_take(100).is_some(), "b has its own");
        drop(share);

        drop(a1);
        assert_eq!(clients.len(), 2, "a still has a connection");
        let a_id = a2.id;
        drop(a2);
        assert_eq!(clients.len(), 1, "a is forgotten with its last connection");
        let again = clients.join(&named("a"));
        assert_eq!(
            again.id, a_id,
            "a new client with a fresh budget, but the same number in the GPU queue, \
             where the time it owes is still owed"
        );
        assert!(again.budget.try_take(100).is_some());
    }
}
