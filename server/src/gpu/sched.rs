//! The queue between the async handlers and the GPU thread, fair between
//! connections.
//!
//! Each source (a connection; in-process callers share one) has its own
//! FIFO, and the GPU thread takes work round-robin across sources: a client
//! with 200 calls queued gets one turn, then a client with one call gets
//! its turn. Both the whole queue and each source's share of it are
//! bounded, and submission never waits: past either bound the call is
//! refused at once (ResourceExhausted), so a flooding client is held back
//! without holding anyone else back.
//!
//! The GPU thread takes what is queued in one go (up to a batch limit), so
//! calls that arrive together share one submission, and a lone call on an
//! idle GPU is taken at once: there is no timer anywhere.
//!
//! The lock is held only to move jobs in and out of the queues (never
//! across GPU work), so taking it on the async runtime does not block it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use thiserror::Error;

/// Why a job was not queued.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The whole queue is full.
    #[error("the GPU queue is full ({0} calls waiting)")]
    Full(usize),
    /// This connection already has its share of the queue.
    #[error("this connection already has {0} calls waiting for the GPU, its share of the queue")]
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
}

/// A bounded, per-source round-robin queue.
#[derive(Debug)]
pub struct FairQueue<J, C> {
    state: Mutex<State<J, C>>,
    wake: Condvar,
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
            }),
            wake: Condvar::new(),
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
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a control message for the GPU thread.
    pub fn push_control(&self, control: C) -> Result<(), C> {
        let mut s = self.lock();
        if s.closed {
            return Err(control);
        }
        s.control.push_back(control);
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops taking new work; what is queued is still handed out.
    pub fn close(&self) {
        self.lock().closed = true;
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
    /// always at least one) round-robin across sources. `None` once closed
    /// and drained.
    pub fn next_blocking(&self, max_jobs: usize, max_bytes: u64) -> Option<Next<J, C>> {
        let mut s = self.lock();
        loop {
            if let Some(c) = s.control.pop_front() {
                return Some(Next::Control(c));
            }
            if s.len > 0 {
                return Some(Next::Jobs(take(&mut s, max_jobs.max(1), max_bytes)));
            }
            if s.closed {
                return None;
            }
            s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
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
        let Some(Next::Jobs(jobs)) = q.next_blocking(4, u64::MAX) else {
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
        let Some(Next::Jobs(jobs)) = q.next_blocking(10, 25) else {
            panic!("jobs expected")
        };
        assert_eq!(jobs.len(), 2);
        let Some(Next::Jobs(jobs)) = q.next_blocking(10, 5) else {
            panic!("jobs expected")
        };
        assert_eq!(jobs, vec![J(1, 2)]);
    }

    #[test]
    fn control_goes_first_and_close_drains() {
        let q: FairQueue<J, &str> = FairQueue::new(10, 10);
        q.try_push(1, J(1, 0)).map_err(|e| e.0).expect("push");
        q.push_control("reload").expect("control");
        assert!(matches!(
            q.next_blocking(10, u64::MAX),
            Some(Next::Control("reload"))
        ));
        q.close();
        assert!(q.try_push(1, J(1, 1)).is_err());
        assert!(matches!(q.next_blocking(10, u64::MAX), Some(Next::Jobs(_))));
        assert!(q.next_blocking(10, u64::MAX).is_none());
    }
}
