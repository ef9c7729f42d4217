//! The queue between the async handlers and the GPU thread, fair between
//! clients.
//!
//! Each source (a client: all the connections of one certificate identity;
//! in-process callers share one) has its own FIFO, and turns go by GPU
//! time: the GPU thread takes next from the source that has been charged
//! the least of it (start-time fair queuing). With calls of equal cost
//! that is round robin: a client with 200 calls queued gets one turn, then
//! a client with one call gets its turn. A client whose calls each take
//! 10 ms gets one turn for every ten of a client whose calls take 1 ms, so
//! heavy kernels cannot buy a larger share of the GPU than light ones.
//! After each submission the executor charges its measured time to the
//! sources of its calls ([`FairQueue::charge`]). A source that joins (or
//! comes back) starts level with the least-charged source queued, so time
//! spent idle is not saved up; time used beyond that, while others
//! waited, is owed until they have had theirs (a client keeps its source
//! number across its connections, so reconnecting settles nothing), and
//! when nobody waits every debt is settled. Both the whole queue and each
//! source's share of it are bounded, and submission never waits: past
//! either bound the call is
//! refused at once (ResourceExhausted), so a flooding client is held back
//! without holding anyone else back.
//!
//! The GPU thread takes what is queued in one go (up to a batch's bounds
//! in calls, bytes and estimated GPU time), so calls that arrive together
//! share one submission, and a lone call on an idle GPU is taken at once:
//! there is no timer anywhere. Out of work, the
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

/// How much one submission may take: it always takes at least one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchBounds {
    /// Most jobs.
    pub jobs: usize,
    /// Most bytes (as [`Queued::bytes`] counts them).
    pub bytes: u64,
    /// Most GPU time, as estimated from each source's recent calls.
    pub gpu_time: Duration,
}

impl BatchBounds {
    /// Bounds on jobs and bytes only.
    pub fn jobs_and_bytes(jobs: usize, bytes: u64) -> Self {
        Self {
            jobs,
            bytes,
            gpu_time: Duration::MAX,
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

/// The GPU time charged to a source.
#[derive(Debug, Default, Clone, Copy)]
struct Account {
    /// Nanoseconds charged, counted from the same origin for every source
    /// (raised to the floor when the source joins).
    vtime: u64,
    /// Its calls' recent GPU time, ns (0: none measured yet).
    per_call: u64,
}

#[derive(Debug)]
struct State<J, C> {
    queues: HashMap<u64, VecDeque<J>>,
    /// Sources with queued jobs, in turn order (ties in charged time go
    /// to the first).
    ring: VecDeque<u64>,
    /// Sources queued, or owing time; others are forgotten.
    accounts: HashMap<u64, Account>,
    /// Where a joining source starts: the least charged time of a source
    /// queued when the GPU thread last took work, or the furthest of all
    /// once nobody waits (every debt settled).
    floor: u64,
    /// Recent GPU time per call, all sources together, ns: the estimate
    /// for a source with none of its own.
    typical: u64,
    /// Accounts held when the next pass forgets those no longer needed.
    prune_at: usize,
    len: usize,
    control: VecDeque<C>,
    closed: bool,
    /// Consumers blocked on the condition variable: pushes wake one only
    /// if there is one, sparing a futex call per job while the GPU thread
    /// works.
    sleepers: usize,
}

/// A bounded queue per source, taken in turns by the GPU time charged to each.
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
                accounts: HashMap::new(),
                floor: 0,
                typical: 0,
                prune_at: MIN_PRUNE_AT,
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
            let floor = s.floor;
            let account = s.accounts.entry(source).or_default();
            account.vtime = account.vtime.max(floor);
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
    /// else jobs within `bounds` (always at least one), the least-charged
    /// source first, and says how it waited. `None` once closed and
    /// drained.
    ///
    /// With nothing queued, the caller first spins for up to `spin`,
    /// watching for a push without the lock, and only then sleeps: a
    /// thread woken from sleep starts late (tens of microseconds on a host
    /// whose idle CPUs halt), and that was most of a small call's queueing
    /// time on the GPU thread.
    pub fn next_blocking(
        &self,
        bounds: BatchBounds,
        spin: Duration,
    ) -> Option<(Next<J, C>, Waited)> {
        let mut s = self.lock();
        let mut waited = Waited::No;
        loop {
            if let Some(c) = s.control.pop_front() {
                return Some((Next::Control(c), waited));
            }
            if s.len > 0 {
                let jobs = take(&mut s, bounds);
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
        take(&mut s, BatchBounds::jobs_and_bytes(n, u64::MAX))
    }

    /// Charges a submission's GPU time to the sources of its calls: each
    /// call its measured time where there is one (GPU timestamps; taken
    /// as at most the submission's), the rest of `batch` split among the
    /// others in proportion to their sources' recent time per call, or,
    /// when every call was measured, equally among them all (the copies
    /// in and out and the submission itself take the thread's time too,
    /// and a call with large buffers and a trivial kernel must pay for
    /// them).
    pub fn charge(&self, batch: Duration, calls: &[(u64, Option<Duration>)]) {
        if calls.is_empty() {
            return;
        }
        let mut s = self.lock();
        // A measured time is taken as at most the submission's.
        let exact = |e: Option<Duration>| e.map(|d| d.min(batch).as_nanos());
        let measured: u128 = calls.iter().filter_map(|c| exact(c.1)).sum();
        let rest = batch.as_nanos().saturating_sub(measured);
        // Each call's weight as things stand before this charge changes
        // them, so that the shares add up to the batch.
        let all_measured = calls.iter().all(|c| c.1.is_some());
        let weights: Vec<u128> = calls
            .iter()
            .map(|&(source, e)| match e {
                Some(_) => u128::from(all_measured),
                None => u128::from(estimate(&s, source)),
            })
            .collect();
        let total: u128 = weights.iter().sum::<u128>().max(1);
        for (&(source, e), weight) in calls.iter().zip(weights) {
            let ns = exact(e).unwrap_or(0) + rest * weight / total;
            let ns = u64::try_from(ns).unwrap_or(u64::MAX);
            s.typical = ewma(s.typical, ns);
            let floor = s.floor;
            let account = s.accounts.entry(source).or_insert(Account {
                vtime: floor,
                per_call: 0,
            });
            account.vtime = account.vtime.saturating_add(ns);
            account.per_call = ewma(account.per_call, ns);
        }
        if s.len == 0 {
            // Nobody waits: time used meanwhile cost nobody a turn, so
            // every debt is settled (the virtual clock moves to the
            // furthest account, as in start-time fair queuing).
            let furthest = s.accounts.values().map(|a| a.vtime).max().unwrap_or(0);
            s.floor = s.floor.max(furthest);
        }
        // Forget sources that are neither queued nor owing, once the
        // accounts have doubled since the last time: amortised, so a
        // stream of short-lived clients never makes every charge scan them.
        if s.accounts.len() >= s.prune_at {
            let State {
                accounts,
                queues,
                floor,
                ..
            } = &mut *s;
            accounts.retain(|source, a| queues.contains_key(source) || a.vtime > *floor);
            s.prune_at = (2 * s.accounts.len()).max(MIN_PRUNE_AT);
        }
    }
}

/// Accounts kept at least before the first pass that forgets some.
const MIN_PRUNE_AT: usize = 64;

/// A running average that gives the newest value a quarter of its weight
/// (the first value whole).
fn ewma(average: u64, value: u64) -> u64 {
    if average == 0 {
        value
    } else {
        average - average / 4 + value / 4
    }
}

/// A call of `source`'s GPU time, as its recent calls' (or, for a source
/// with none, everyone's) suggests; at least 1 ns.
fn estimate<J, C>(s: &State<J, C>, source: u64) -> u64 {
    match s.accounts.get(&source) {
        Some(a) if a.per_call > 0 => a.per_call,
        _ => s.typical.max(1),
    }
}

/// A queued source's turn, while a batch is being taken.
struct Turn {
    source: u64,
    /// Its charged time, with the estimates of the jobs this batch has
    /// taken from it so far.
    charged: u64,
    /// A job of its estimated time.
    estimate: u64,
}

fn take<J: Queued, C>(s: &mut State<J, C>, bounds: BatchBounds) -> Vec<J> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut time = 0u64;
    let max_time = u64::try_from(bounds.gpu_time.as_nanos()).unwrap_or(u64::MAX);
    // The accounts looked up once per batch, not once per job; in ring
    // order, which breaks ties.
    let mut turns: Vec<Turn> = s
        .ring
        .iter()
        .map(|&source| Turn {
            source,
            charged: s.accounts.get(&source).map_or(s.floor, |a| a.vtime),
            estimate: estimate(s, source),
        })
        .collect();
    while out.len() < bounds.jobs.max(1) {
        // The first of the least charged, so equal charges take turns.
        let Some((at, _)) = turns.iter().enumerate().min_by_key(|(_, t)| t.charged) else {
            break;
        };
        let mut turn = turns.remove(at);
        if out.is_empty() {
            s.floor = s.floor.max(turn.charged);
        }
        let Some(queue) = s.queues.get_mut(&turn.source) else {
            continue;
        };
        let Some(job) = queue.pop_front() else {
            s.queues.remove(&turn.source);
            continue;
        };
        let size = job.bytes();
        if !out.is_empty()
            && (bytes.saturating_add(size) > bounds.bytes
                || time.saturating_add(turn.estimate) > max_time)
        {
            queue.push_front(job);
            turns.insert(at, turn);
            break;
        }
        bytes = bytes.saturating_add(size);
        time = time.saturating_add(turn.estimate);
        if queue.is_empty() {
            s.queues.remove(&turn.source);
        } else {
            turn.charged = turn.charged.saturating_add(turn.estimate);
            turns.push(turn);
        }
        s.len -= 1;
        out.push(job);
    }
    s.ring.clear();
    s.ring.extend(turns.into_iter().map(|t| t.source));
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
            push(&q, 1, i);
        }
        push(&q, 2, 0);
        push(&q, 3, 0);
        let Some((Next::Jobs(jobs), Waited::No)) =
            q.next_blocking(BatchBounds::jobs_and_bytes(4, u64::MAX), Duration::ZERO)
        else {
            panic!("jobs expected")
        };
        assert_eq!(jobs, vec![J(1, 0), J(2, 0), J(3, 0), J(1, 1)]);
        assert_eq!(q.len(), 3);
    }

    /// Queues job `i` of `source`.
    fn push<C>(q: &FairQueue<J, C>, source: u64, i: u32) {
        q.try_push(source, J(source, i))
            .map_err(|e| e.0)
            .expect("push");
    }

    /// Takes one batch of at most `n` jobs.
    fn batch(q: &FairQueue<J, ()>, n: usize) -> Vec<J> {
        match q.next_blocking(BatchBounds::jobs_and_bytes(n, u64::MAX), Duration::ZERO) {
            Some((Next::Jobs(jobs), _)) => jobs,
            other => panic!("jobs expected, got {other:?}"),
        }
    }

    #[test]
    fn turns_go_by_gpu_time_not_by_calls() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        for i in 0..20 {
            push(&q, 1, i);
            push(&q, 2, i);
        }
        // Round robin while nothing is known.
        assert_eq!(batch(&q, 2), vec![J(1, 0), J(2, 0)]);
        // Source 1's call took 10 ms, source 2's 1 ms.
        q.charge(
            Duration::from_millis(11),
            &[
                (1, Some(Duration::from_millis(10))),
                (2, Some(Duration::from_millis(1))),
            ],
        );
        // Source 2 now runs until it has used as much: nine more calls,
        // then the two take turns by the time they are charged.
        let mut taken = Vec::new();
        for _ in 0..10 {
            let jobs = batch(&q, 1);
            for j in &jobs {
                let ms = if j.0 == 1 { 10 } else { 1 };
                q.charge(Duration::from_millis(ms), &[(j.0, None)]);
            }
            taken.extend(jobs.into_iter().map(|j| j.0));
        }
        assert_eq!(taken, vec![2, 2, 2, 2, 2, 2, 2, 2, 2, 1]);
    }

    #[test]
    fn a_batch_is_split_by_each_sources_time_per_call() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        for i in 0..4 {
            push(&q, 1, i);
            push(&q, 2, i);
        }
        // Learn: 1's calls take 3 ms, 2's 1 ms (alone in their batches).
        let _ = batch(&q, 1);
        q.charge(Duration::from_millis(3), &[(1, None)]);
        let _ = batch(&q, 1);
        q.charge(Duration::from_millis(1), &[(2, None)]);
        let before = {
            let s = q.lock();
            (s.accounts[&1].vtime, s.accounts[&2].vtime)
        };
        // 8 ms for one call of each: 6 to source 1, 2 to source 2.
        q.charge(Duration::from_millis(8), &[(1, None), (2, None)]);
        let s = q.lock();
        assert_eq!(s.accounts[&1].vtime - before.0, 6_000_000);
        assert_eq!(s.accounts[&2].vtime - before.1, 2_000_000);
    }

    #[test]
    fn charges_add_up_to_the_batch() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        // 64 calls of a source with no history, then 64 more: each batch
        // is charged what it took, however the estimates move meanwhile.
        for round in 1..=2u64 {
            q.charge(Duration::from_millis(10), &[(1, None); 64]);
            let s = q.lock();
            let charged = s.accounts[&1].vtime;
            assert!(
                charged.abs_diff(round * 10_000_000) < 1_000,
                "round {round}: {charged} ns charged"
            );
            assert!(s.accounts[&1].per_call.abs_diff(156_250) < 1_000);
        }
        // Every call measured: what the passes did not take (copies, the
        // submission) is shared equally, so the batch is still charged
        // whole.
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        let ms = Duration::from_millis;
        q.charge(ms(10), &[(1, Some(ms(1))), (2, Some(ms(3)))]);
        let s = q.lock();
        assert_eq!(s.accounts[&1].vtime, 4_000_000);
        assert_eq!(s.accounts[&2].vtime, 6_000_000);
    }

    #[test]
    fn a_source_that_comes_back_starts_level_but_keeps_what_it_owes() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        push(&q, 1, 0);
        push(&q, 2, 0);
        assert_eq!(batch(&q, 1), vec![J(1, 0)]);
        // Source 1 used 50 ms while source 2 waited: it owes them, though
        // its queue was empty meanwhile.
        q.charge(Duration::from_millis(50), &[(1, None)]);
        push(&q, 1, 1);
        {
            let s = q.lock();
            assert_eq!(s.accounts[&1].vtime, s.accounts[&2].vtime + 50_000_000);
        }
        assert_eq!(batch(&q, 1), vec![J(2, 0)], "source 1 waits its turn");
        q.charge(Duration::from_millis(1), &[(2, None)]);
        assert_eq!(batch(&q, 1), vec![J(1, 1)]);
        // Nobody waits now: the debts are settled, and a source that joins
        // starts level with the furthest, saving up no idle time.
        q.charge(Duration::from_millis(1), &[(1, None)]);
        push(&q, 2, 1);
        let s = q.lock();
        assert_eq!(s.floor, 51_000_000);
        assert_eq!(s.accounts[&2].vtime, s.floor);
    }

    #[test]
    fn short_lived_sources_are_forgotten() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        // A long-lived source keeps the queue busy while a thousand
        // others come once each.
        for i in 0..1000u64 {
            push(&q, 1, 0);
            q.try_push(10 + i, J(10 + i, 0))
                .map_err(|e| e.0)
                .expect("push");
            let jobs = batch(&q, 2);
            let charges: Vec<_> = jobs.iter().map(|j| (j.0, None)).collect();
            q.charge(Duration::from_millis(1), &charges);
        }
        let s = q.lock();
        assert!(
            s.accounts.len() <= 2 * MIN_PRUNE_AT,
            "{} accounts",
            s.accounts.len()
        );
    }

    #[test]
    fn batches_stop_at_their_estimated_gpu_time() {
        let q: FairQueue<J, ()> = FairQueue::new(100, 100);
        for i in 0..10 {
            push(&q, 1, i);
        }
        let _ = batch(&q, 1);
        q.charge(Duration::from_millis(4), &[(1, None)]);
        let bounds = BatchBounds {
            jobs: 64,
            bytes: u64::MAX,
            gpu_time: Duration::from_millis(10),
        };
        let Some((Next::Jobs(jobs), _)) = q.next_blocking(bounds, Duration::ZERO) else {
            panic!("jobs expected")
        };
        assert_eq!(jobs.len(), 2, "two 4 ms calls fit in 10 ms, three do not");
        let tight = BatchBounds {
            gpu_time: Duration::from_millis(1),
            ..bounds
        };
        let Some((Next::Jobs(jobs), _)) = q.next_blocking(tight, Duration::ZERO) else {
            panic!("jobs expected")
        };
        assert_eq!(jobs.len(), 1, "at least one, whatever its estimate");
    }

    #[test]
    fn bounds_are_enforced_per_source_and_in_total() {
        let q: FairQueue<J, ()> = FairQueue::new(3, 2);
        push(&q, 1, 0);
        push(&q, 1, 1);
        assert_eq!(
            q.try_push(1, J(1, 2)).map_err(|e| e.0),
            Err(SubmitError::SourceFull(2))
        );
        push(&q, 2, 0);
        assert_eq!(
            q.try_push(3, J(3, 0)).map_err(|e| e.0),
            Err(SubmitError::Full(3))
        );
    }

    #[test]
    fn batches_stop_at_the_byte_limit_but_take_at_least_one() {
        let q: FairQueue<J, ()> = FairQueue::new(10, 10);
        for i in 0..4 {
            push(&q, 1, i);
        }
        let Some((Next::Jobs(jobs), _)) =
            q.next_blocking(BatchBounds::jobs_and_bytes(10, 25), Duration::ZERO)
        else {
            panic!("jobs expected")
        };
        assert_eq!(jobs.len(), 2);
        let Some((Next::Jobs(jobs), _)) =
            q.next_blocking(BatchBounds::jobs_and_bytes(10, 5), Duration::ZERO)
        else {
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
            let _ =
                tx.send(consumer.next_blocking(BatchBounds::jobs_and_bytes(10, u64::MAX), spin));
        });
        let start = Instant::now();
        while !ready(&q) || start.elapsed() < push_after {
            assert!(start.elapsed() < within, "the consumer never got ready");
            std::thread::sleep(Duration::from_millis(1));
        }
        push(&q, 1, 7);
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
        push(&q, 1, 0);
        q.push_control("reload").expect("control");
        assert!(matches!(
            q.next_blocking(BatchBounds::jobs_and_bytes(10, u64::MAX), Duration::ZERO),
            Some((Next::Control("reload"), _))
        ));
        q.close();
        assert!(q.try_push(1, J(1, 1)).is_err());
        assert!(matches!(
            q.next_blocking(BatchBounds::jobs_and_bytes(10, u64::MAX), Duration::ZERO),
            Some((Next::Jobs(_), _))
        ));
        assert!(
            q.next_blocking(BatchBounds::jobs_and_bytes(10, u64::MAX), Duration::ZERO)
                .is_none()
        );
    }
}
