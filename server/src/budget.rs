//! In-flight byte budgets: how much memory calls may hold at once, on the
//! whole server and for each client.
//!
//! A call takes its share before anything is allocated for it and gives it
//! back when the last of its bytes is released. A share is taken without
//! waiting: a call that does not fit is refused with RESOURCE_EXHAUSTED
//! (the client retries later), never parked. So a budget is a counter, not
//! a semaphore: a semaphore keeps a list of waiters, which nothing here
//! would use, and locks it on every release, twice per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The KiB of a budget that `bytes` take: rounded up, at least one (a call
/// with no payload still holds its stream).
pub fn kib_for(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

/// A number of KiB that calls may hold at once.
#[derive(Debug)]
pub struct Budget {
    free: AtomicU32,
}

impl Budget {
    /// A budget of `kib` KiB, all of it free.
    pub fn new(kib: u32) -> Arc<Self> {
        Arc::new(Self {
            free: AtomicU32::new(kib),
        })
    }

    /// Takes `kib` KiB if that much is free now.
    pub fn try_take(self: &Arc<Self>, kib: u32) -> Option<Share> {
        let mut free = self.free.load(Ordering::Relaxed);
        loop {
            let left = free.checked_sub(kib)?;
            match self
                .free
                .compare_exchange_weak(free, left, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Share {
                        budget: self.clone(),
                        kib,
                    });
                }
                Err(now) => free = now,
            }
        }
    }

    /// KiB free now.
    pub fn free(&self) -> u32 {
        self.free.load(Ordering::Acquire)
    }
}

/// How much of a budget calls hold now: a gauge for metrics and tests.
#[derive(Debug, Clone)]
pub struct Gauge {
    budget: Arc<Budget>,
    total_kib: u32,
}

impl Gauge {
    /// A gauge of `budget`, whose whole is `total_kib` KiB.
    pub fn new(budget: Arc<Budget>, total_kib: u32) -> Self {
        Self { budget, total_kib }
    }

    /// The bytes held now, in whole KiB.
    pub fn held_bytes(&self) -> u64 {
        u64::from(self.total_kib.saturating_sub(self.budget.free())) * 1024
    }
}

/// Part of a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<Budget>,
    kib: u32,
}

impl Share {
    /// The KiB this share holds.
    pub fn kib(&self) -> u32 {
        self.kib
    }

    /// Gives back all but `kib` KiB (nothing if it holds no more).
    pub fn shrink_to(&mut self, kib: u32) {
        if kib < self.kib {
            self.budget
                .free
                .fetch_add(self.kib - kib, Ordering::Release);
            self.kib = kib;
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.free.fetch_add(self.kib, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_past_the_budget_and_given_back_when_dropped() {
        let budget = Budget::new(100);
        let a = budget.try_take(60).expect("60 of 100");
        assert!(budget.try_take(41).is_none(), "only 40 left");
        let b = budget.try_take(40).expect("the last 40");
        assert_eq!(budget.free(), 0);
        assert!(budget.try_take(1).is_none());
        drop(a);
        assert_eq!(budget.free(), 60);
        drop(b);
        assert_eq!(budget.free(), 100);
        let mut c = budget.try_take(60).expect("60 again");
        c.shrink_to(10);
        assert_eq!(budget.free(), 90, "shrinking gives back the rest");
        c.shrink_to(20);
        assert_eq!(c.kib(), 10, "a share never grows");
        drop(c);
        assert_eq!(budget.free(), 100);
        assert!(budget.try_take(101).is_none(), "more than the whole budget");
    }

    #[test]
    fn concurrent_takers_never_overdraw() {
        let budget = Budget::new(1000);
        let taken = std::sync::atomic::AtomicU32::new(0);
        let peak = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(share) = budget.try_take(7) {
                            let now = taken.fetch_add(7, Ordering::SeqCst) + 7;
                            peak.fetch_max(now, Ordering::SeqCst);
                            taken.fetch_sub(7, Ordering::SeqCst);
                            drop(share);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 1000);
        assert_eq!(budget.free(), 1000);
    }
}
