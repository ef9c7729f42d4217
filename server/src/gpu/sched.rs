//! The queue between the async handlers and the GPU thread, fair between
//! clients.
//!
//! Each source (a client: all the connections of one certificate identity;
//! in-process callers share one) has its own
//! FIFO, and the GPU thread takes work round-robin across sources: a client
//! with 200 calls queued gets one turn, then a client with one call gets
//! its turn. Both the whole queue and each source's share of it are
//! bounded, and submission never waits: past either bound the call is
//! refused at once (ResourceExhausted), so a flooding client is held back
//! without holding anyone else back.
//!
//! The GPU thread takes what is queued in one go (up to a batch limit), so
//! calls that arrive together share one submission, and a lone call on an
//! idle GPU is taken at once: there is no timer anywhere. Out of work, the
//! thread may spin for a bounded time before it sleeps, so that the next
//! call does not wait for it to wake up.
//!
//! The lock is held only to move jobs in and out of the queues (never
//! across GPU work), so taking it on the async runtime does not block it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why a job was not queued.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The whole queue is full.
    #[error("the GPU queue is full ({0} calls waiting)")]
    Full(usize),
    /// This client already has its share of the queue.
    #[error("this client already has {0} calls waiting for the GPU, its share of the queue")]
    SourceFull(usize),
    /// The executor has stopped.
    #[error("the GPU executor has stopped")]
    Closed,
}

impl SubmitError {
    /// The status code the caller sees.
    pub fn status(&self) -> quasar_transport::StatusCode {
        match self {
            Self::Full(_) | Self::SourceFull(_) => quasar_transport::StatusCode::ResourceExhausted,
            Self::Closed => quasar_transport::StatusCode::Unavailable,
        }
    }
}

/// How [`FairQueue::next_blocking`] waited for what it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Work was already queued.
    No,
    /// Work came while the caller spun.
    Spun,
    /// The caller slept until woken.
    Slept,
}

/// Something queued for the GPU thread: a unit of work with a size.
pub trait Queued {
    /// Bytes the item carries, to bound a batch.
    fn bytes(&self) -> u64;
}

/// What the GPU thread takes next.
#[derive(Debug)]
pub enum Next<J, C> {
    /// A batch of jobs, in fair order.
    Jobs(Vec<J>),
    /// A control message (run before any job queued after it).
    Control(C),
}

#[derive(Debug)]
struct State<J, C> {
    queues: HashMap<u64, VecDeque<J>>,
    /// Sources with queued jobs, in turn order.
    ring: VecDeque<u64>,
    len: usize,
    control: VecDeque<C>,
    closed: bool,
    /// Consumers blocked on the condition variable: pushes wake one only
    /// if there is one, sparing a futex call per job while the GPU thread
    /// works.
    sleepers: usize,
}

/// A bounded, per-source round-robin queue.
#[derive(Debug)]
pub struct FairQueue<J, C> {
    state: Mutex<State<J, C>>,
    wake: Condvar,
    /// Counts every push, control message and close, so a consumer
    /// spinning outside the lock sees new work without taking it.
    pushed: AtomicU64,
    depth: usize,
    per_source: usize,
}

impl<J: Queued, C> FairQueue<J, C> {
    /// A queue holding at most `depth` jobs, at most `per_source` of them
    /// from one source.
    pub fn new(depth: usize, per_source: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queues: HashMap::new(),
                ring: VecDeque::new(),
                len: 0,
                control: VecDeque::new(),
                closed: false,
                sleepers: 0,
            }),
            wake: Condvar::new(),
            pushed: AtomicU64::new(0),
            depth: depth.max(1),
            per_source: per_source.clamp(1, depth.max(1)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<J, C>> {
        // The state is consistent after every statement that changes it, so
        // a panic elsewhere while holding the lock leaves nothing half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job` for `source` without waiting.
    pub fn try_push(&self, source: u64, job: J) -> Result<(), (SubmitError, J)> {
        let mut s = self.lock();
        if s.closed {
            return Err((SubmitError::Closed, job));
        }
        if s.len >= self.depth {
            return Err((SubmitError::Full(self.depth), job));
        }
        let queue = s.queues.entry(source).or_default();
        if queue.len() >= self.per_source {
            return Err((SubmitError::SourceFull(self.per_source), job));
        }
        let was_idle = queue.is_empty();
        queue.push_back(job);
        if was_idle {
            s.ring.push_back(source);
        }
        s.len += 1;
        self.pushed.fetch_add(1, Ordering::Release);
        let sleeping = s.sleepers > 0;
        drop(s);
        if sleeping {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Queues a control message for the GPU thread.
    pub fn push_control(&self, control: C) -> Result<(), C> {
        let mut s = self.lock();
        if s.closed {
            return Err(control);
        }
        s.control.push_back(control);
        self.pushed.fetch_add(1, Ordering::Release);
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops taking new work; what is queued is still handed out.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        self.pushed.fetch_add(1, Ordering::Release);
        drop(s);
        self.wake.notify_all();
    }

    /// Whether [`FairQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks until there is work, then takes the control messages first,
    /// else up to `max_jobs` jobs (and at most `max_bytes` of them, though
    /// always at least one) round-robin across sources, and says how it
    /// waited. `None` once closed and drained.
    ///
    /// With nothing queued, the caller first spins for up to `spin`,
    /// watching for a push without the lock, and only then sleeps: a
    /// thread woken from sleep starts late (tens of microseconds on a host
    /// whose idle CPUs halt), and that was most of a small call's queueing
    /// time on the GPU thread.
    pub fn next_blocking(
        &self,
        max_jobs: usize,
        max_bytes: u64,
        spin: Duration,
    ) -> Option<(Next<J, C>, Waited)> {
        let mut s = self.lock();
        let mut waited = Waited::No;
        loop {
            if let Some(c) = s.control.pop_front() {
                return Some((Next::Control(c), waited));
            }
            if s.len > 0 {
                let jobs = take(&mut s, max_jobs.max(1), max_bytes);
                return Some((Next::Jobs(jobs), waited));
            }
            if s.closed {
                return None;
            }
            if waited == Waited::No && !spin.is_zero() {
                waited = Waited::Spun;
                let seen = self.pushed.load(Ordering::Acquire);
                drop(s);
                let start = Instant::now();
                while self.pushed.load(Ordering::Acquire) == seen && start.elapsed() < spin {
                    std::hint::spin_loop();
                }
                s = self.lock();
                continue;
            }
            waited = Waited::Slept;
            s.sleepers += 1;
            s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
            s.sleepers -= 1;
        }
    }

    /// Every queued job, for failing them all at once.
    pub fn drain(&self) -> Vec<J> {
        let mut s = self.lock();
        let n = s.len;
        take(&mut s, n, u64::MAX)
    }
}

fn take<J: Queued, C>(s: &mut State<J, C>, max_jobs: usize, max_bytes: u64) -> Vec<J> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    while out.len() < max_jobs {
        let Some(source) = s.ring.pop_front() else {
            break;
        };
        let Some(queue) = s.queues.get_mut(&source) else {
            continue;
        };
        let Some(job) = queue.pop_front() else {
            s.queues.remove(&source);
            continue;
        };
        let size = job.bytes();
        if !out.is_empty() && bytes.saturating_add(size) > max_bytes {
            queue.push_front(job);
            s.ring.push_front(source);
            break;
        }
        bytes = bytes.saturating_add(size);
        if queue.is_empty() {
            s.queues.remove(&source);
        } else {
            s.ring.push_back(source);
        }
        s.len -= 1;
        out.push(job);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct J(u64, u32);
    impl Queued for J {
        fn bytes(&self) -> u64 {
            10
        }
    }

    #[test]
    fn sources_take_turns() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        for i in 0..5 {
            q.try_push(1, J(1, i)).map_err(|e| e.0).expect("push");
        }
        q.try_push(2, J(2, 0)).map_err(|e| e.0).expect("push");
        q.try_push(3, J(3, 0)).map_err(|e| e.0).expect("push");
        let Some((Next::Jobs(jobs), Waited::No)) = q.next_blocking(4, u64::MAX, Duration::ZERO)
        else {
            panic!("jobs expected")
        };
        assert_eq!(jobs, vec![J(1, 0), J(2, 0), J(3, 0), J(1, 1)]);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn bounds_are_enforced_per_source_and_in_total() {
        let q: FairQueue<J, ()> = FairQueue::new(3, 2);
        q.try_push(1, J(1, 0)).map_err(|e| e.0).expect("push");
        q.try_push(1, J(1, 1)).map_err(|e| e.0).expect("push");
        assert_eq!(
            q.try_push(1, J(1, 2)).map_err(|e| e.0),
            Err(SubmitError::SourceFull(2))
        );
        q.try_push(2, J(2, 0)).map_err(|e| e.0).expect("push");
        assert_eq!(
            q.try_push(3, J(3, 0)).map_err(|e| e.0),
            Err(SubmitError::Full(3))
        );
    }

    #[test]
    fn batches_stop_at_the_byte_limit_but_take_at_least_one() {
        let q: FairQueue<J, ()> = FairQueue::new(10, 10);
        for i in 0..4 {
            q.try_push(1, J(1, i)).map_err(|e| e.0).expect("push");
        }
        let Some((Next::Jobs(jobs), _)) = q.next_blocking(10, 25, Duration::ZERO) else {
            panic!("jobs expected")
        };
        assert_eq!(jobs.len(), 2);
        let Some((Next::Jobs(jobs), _)) = q.next_blocking(10, 5, Duration::ZERO) else {
            panic!("jobs expected")
        };
        assert_eq!(jobs, vec![J(1, 2)]);
    }

    /// Runs `next_blocking` on another thread; once `ready` holds for the
    /// queue (or after `push_after`), pushes one job; returns how the
    /// consumer waited for it, which must be within `within`.
    fn wait_for_a_push(
        spin: Duration,
        ready: impl Fn(&FairQueue<J, ()>) -> bool,
        push_after: Duration,
        within: Duration,
    ) -> Waited {
        let q = std::sync::Arc::new(FairQueue::<J, ()>::new(10, 10));
        let (tx, rx) = std::sync::mpsc::channel();
        let consumer = std::sync::Arc::clone(&q);
        std::thread::spawn(move || {
            let _ = tx.send(consumer.next_blocking(10, u64::MAX, spin));
        });
        let start = Instant::now();
        while !ready(&q) || start.elapsed() < push_after {
            assert!(start.elapsed() < within, "the consumer never got ready");
            std::thread::sleep(Duration::from_millis(1));
        }
        q.try_push(1, J(1, 7)).map_err(|e| e.0).expect("push");
        match rx.recv_timeout(within) {
            Ok(Some((Next::Jobs(jobs), waited))) => {
                assert_eq!(jobs, vec![J(1, 7)]);
                waited
            }
            other => panic!("the consumer did not take the job in time: {other:?}"),
        }
    }

    fn asleep(q: &FairQueue<J, ()>) -> bool {
        q.lock().sleepers > 0
    }

    #[test]
    fn a_sleeping_consumer_is_woken_by_a_push() {
        let waited = wait_for_a_push(
            Duration::ZERO,
            asleep,
            Duration::ZERO,
            Duration::from_secs(10),
        );
        assert_eq!(waited, Waited::Slept);
    }

    #[test]
    fn a_push_while_spinning_is_taken_without_sleeping() {
        // Taken well before the spin would end: a spinner that missed the
        // push would only return after its 60 s.
        let waited = wait_for_a_push(
            Duration::from_secs(60),
            |_| true,
            Duration::from_millis(50),
            Duration::from_secs(10),
        );
        // `No` only if the consumer started after the push.
        assert_ne!(waited, Waited::Slept);
    }

    #[test]
    fn a_consumer_sleeps_once_its_spin_is_over() {
        let waited = wait_for_a_push(
            Duration::from_millis(5),
            asleep,
            Duration::ZERO,
            Duration::from_secs(10),
        );
        assert_eq!(waited, Waited::Slept);
    }

    #[test]
    fn control_goes_first_and_close_drains() {
        let q: FairQueue<J, &str> = FairQueue::new(10, 10);
        q.try_push(1, J(1, 0)).map_err(|e| e.0).expect("push");
        q.push_control("reload").expect("control");
        assert!(matches!(
            q.next_blocking(10, u64::MAX, Duration::ZERO),
            Some((Next::Control("reload"), _))
        ));
        q.close();
        assert!(q.try_push(1, J(1, 1)).is_err());
        assert!(matches!(
            q.next_blocking(10, u64::MAX, Duration::ZERO),
            Some((Next::Jobs(_), _))
        ));
        assert!(q.next_blocking(10, u64::MAX, Duration::ZERO).is_none());
    }
}
