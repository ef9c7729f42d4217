//! The GPU executor: one thread that owns the device, the queue and the
//! buffer pool, and runs calls in batches.
//!
//! Async handlers queue [`Job`]s in a fair queue (one FIFO per client,
//! taken in turns by the GPU time each client has used) without
//! waiting (a full queue is refused at once, ResourceExhausted); each job
//! carries a oneshot for its reply. The thread takes everything queued at
//! once (up to [`GpuConfig::max_batch`] calls, `max_batch_bytes` and
//! `max_batch_time`), charges the submission's time back to the clients
//! of its calls, and encodes the calls into one
//! command buffer, submits once and waits once: calls that arrive together
//! share the cost of a submission, and a lone call is run at once. Small
//! 1-D calls (at most [`GpuConfig::max_fused_call_bytes`]) of one kernel and
//! one client in a batch run as one dispatch where the kernel can be fused
//! ([`crate::kernel::fuse`]), since a dispatch costs more than a small
//! call's own work (on lavapipe most of all). Only this thread calls the
//! blocking `device.poll`. A job whose caller has gone away
//! or whose deadline has passed is dropped before it touches the GPU.
//!
//! The kernels live in a [`Registry`] published through [`Kernels`]: a job
//! carries the registry it was checked against, so a reload of the kernel
//! directory never runs a call with another kernel's pipeline. A lost device
//! is recreated with its pipelines (a new registry generation); calls caught
//! in flight get Unavailable, which clients retry.
//!
//! A wgpu validation error in a batch fails nothing at once: each call of
//! the batch is run again alone, so only the call at fault fails.
//!
//! Copies of payload bytes on the way (counted in [`ExecutorStats`]): the
//! request payload arrives as the chunks quinn decrypted (short pieces of
//! a payload sent in several, gathered first: see
//! `quasar_transport::io::GATHER_BELOW`), which are copied once, straight
//! into the batch's upload buffer (pooled, and kept mapped
//! between uses); the GPU copies upload to storage buffer and storage to
//! readback buffer; the mapped readback buffer is copied once into the
//! response payload, which quinn holds by reference until it builds
//! packets. One user-space copy each way is ours; quinn makes one more
//! each way inside its packet protection (a received datagram is copied
//! out of the socket buffer and decrypted in place, sent data is copied
//! into a packet and encrypted there), which BENCHMARKS.md ("Copies")
//! traces through its sources.

use std::borrow::Cow;
use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use quasar_transport::io::ChunkedPayload;
use quasar_transport::{Payload, StatusCode};
use thiserror::Error;
use tokio::sync::oneshot;

use super::pool::{BufferPool, PoolKind};
pub use super::sched::SubmitError;
use super::sched::{BatchBounds, FairQueue, Next, Queued, Waited};
use super::{AdapterSummary, GpuError, choose_adapter};
use crate::budget::Share;
use crate::clients::Client;
use crate::kernel::fuse::{Candidate, FusedKernel, fuse, group_calls, table_row};
use crate::kernel::plan::{CallPlan, DeviceCaps};
use crate::kernel::{BufferRole, KernelInterface};

/// How the GPU side is set up.
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// Extra kernels: every `*.wgsl` file in this directory. A file named
    /// like a shipped kernel replaces it.
    pub kernel_dir: Option<PathBuf>,
    /// Use only an adapter whose name contains this (case-insensitive).
    pub adapter: Option<String>,
    /// Calls that may wait for the GPU, all connections together; past
    /// this, calls are refused.
    pub queue_depth: usize,
    /// Calls one client (all the connections of one certificate identity)
    /// may have waiting for the GPU.
    pub max_queued_per_client: usize,
    /// Most calls encoded into one GPU submission (at most [`MAX_BATCH`]).
    pub max_batch: usize,
    /// Most payload bytes in one submission (a batch always takes at least
    /// one call): large calls gain nothing from sharing a submission and
    /// would make the small ones beside them wait.
    pub max_batch_bytes: u64,
    /// Most GPU time in one submission, as estimated from each client's
    /// recent calls (a batch always takes at least one call): for the
    /// same reason, about long-running calls.
    pub max_batch_time: Duration,
    /// Longest a submission may run before its calls fail.
    pub poll_timeout: Duration,
    /// Idle GPU buffers kept for reuse, in bytes.
    pub max_pooled_bytes: u64,
    /// Whether to time each compute pass with GPU timestamp queries.
    pub timestamps: Timestamping,
    /// Whether calls of one kernel from one client in the same batch run
    /// as one dispatch, for kernels that can (see
    /// [`crate::kernel::fuse`]): a dispatch costs more than a small
    /// call's own work, on lavapipe most of all.
    pub fuse_calls: bool,
    /// Only calls whose buffers take at most this many bytes are fused:
    /// fusing saves a dispatch's fixed cost, which a large call's own work
    /// dwarfs, while the rewritten kernel's bounds arithmetic costs a
    /// little on every access (on lavapipe, a fused 1 MiB saxpy ran at
    /// about two thirds of the speed of separate dispatches).
    pub max_fused_call_bytes: u64,
    /// How long the GPU thread spins, watching the queue, before it
    /// sleeps when it runs out of work. A call that arrives meanwhile
    /// starts at once instead of waiting for the thread (and, on hosts
    /// whose idle CPUs halt, its CPU) to wake up; the price is up to this
    /// much CPU time after each submission when no call follows. Zero
    /// sleeps at once; more than [`MAX_IDLE_SPIN`] counts as that.
    pub idle_spin: Duration,
}

/// When to time compute passes with GPU timestamp queries (where the
/// adapter supports them at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Timestamping {
    /// On GPUs, off on CPU adapters such as lavapipe, where each query
    /// costs about 140 us of executor time per call (BENCHMARKS.md).
    #[default]
    Auto,
    /// Always, where supported.
    On,
    /// Never: GPU time is the executor's clock around submission.
    Off,
}

/// The GPU thread's default [`GpuConfig::idle_spin`] on a host with more
/// than one CPU: long enough to catch the next call of a client calling in
/// a loop over loopback or a LAN, short enough that a lone call costs
/// little (BENCHMARKS.md, "GPU thread idle spin"). With one CPU (as
/// [`std::thread::available_parallelism`] counts them: CPU affinity and
/// cgroup quotas included) the spin would hold the CPU the next call
/// needs, so the default there is zero.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(150);

/// The longest [`GpuConfig::idle_spin`] honoured: past a few milliseconds,
/// sleeping costs less than the CPU time spun.
pub const MAX_IDLE_SPIN: Duration = Duration::from_millis(10);

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            kernel_dir: None,
            adapter: None,
            queue_depth: 1024,
            max_queued_per_client: 256,
            max_batch: 64,
            max_batch_bytes: 16 * 1024 * 1024,
            max_batch_time: Duration::from_millis(10),
            poll_timeout: Duration::from_secs(60),
            max_pooled_bytes: 512 * 1024 * 1024,
            timestamps: Timestamping::Auto,
            fuse_calls: true,
            max_fused_call_bytes: 64 * 1024,
            idle_spin: if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
                DEFAULT_IDLE_SPIN
            } else {
                Duration::ZERO
            },
        }
    }
}

/// The loaded kernels, by name, as compiled for one device. The pipelines
/// themselves stay on the executor thread, found by `version`: what is
/// shared with the async side is plain data.
pub struct Registry {
    kernels: Vec<KernelInterface>,
    by_name: HashMap<String, usize>,
    caps: DeviceCaps,
    /// Which device the pipelines were compiled for.
    device: u64,
    /// Reloads of the kernel set since start-up.
    version: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kernels", &self.by_name.keys().collect::<Vec<_>>())
            .field("device", &self.device)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// The kernel called `name`, with its index.
    pub fn get(&self, name: &str) -> Option<(usize, &KernelInterface)> {
        let i = *self.by_name.get(name)?;
        Some((i, &self.kernels[i]))
    }

    /// Every kernel, in load order.
    pub fn kernels(&self) -> &[KernelInterface] {
        &self.kernels
    }

    /// The device's limits that requests are checked against.
    pub fn caps(&self) -> DeviceCaps {
        self.caps
    }

    /// How many times the kernel set was reloaded since start-up.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// The current registry, replaced whole by a reload or a device rebuild.
#[derive(Debug)]
pub struct Kernels(RwLock<Arc<Registry>>);

impl Kernels {
    /// The registry new calls are checked against.
    pub fn current(&self) -> Arc<Registry> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn publish(&self, registry: Arc<Registry>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = registry;
    }
}

/// A call on its way to the GPU.
#[derive(Debug)]
pub struct Job {
    /// What to run.
    pub plan: CallPlan,
    /// The kernels the plan was made against (its `kernel` indexes these).
    pub kernels: Arc<Registry>,
    /// Who queued it (a client: all the connections of one identity), for fair turns.
    pub source: u64,
    /// The request payload the plan's ranges point into, as received.
    pub payload: ChunkedPayload,
    /// When the job was queued.
    pub enqueued: Instant,
    /// Do not start after this.
    pub deadline: Option<Instant>,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<JobOutput, ExecError>>,
    /// The call's share of the server's in-flight byte budgets, released
    /// with the last of its bytes (moved into the output on success).
    pub reservation: Reservation,
}

/// A call's share of the in-flight byte budgets (its client's and the
/// server's), given back when dropped. In-process calls hold none.
#[derive(Debug, Default)]
pub struct Reservation {
    client: Option<Share>,
    server: Option<Share>,
    /// Keeps the client known while its calls hold anything, so that it
    /// cannot close its connections and open new ones for a fresh budget
    /// (and queue share) while the old are still in use.
    _owner: Option<Arc<Client>>,
}

impl Reservation {
    /// Holds both shares until dropped.
    pub(crate) fn new(owner: Arc<Client>, client: Share, server: Share) -> Self {
        Self {
            client: Some(client),
            server: Some(server),
            _owner: Some(owner),
        }
    }

    /// Gives back all but what `bytes` need, of both budgets.
    pub(crate) fn shrink_to(&mut self, bytes: u64) {
        let kib = crate::budget::kib_for(bytes);
        for share in [&mut self.client, &mut self.server].into_iter().flatten() {
            share.shrink_to(kib);
        }
    }

    /// The KiB held (of each budget: the two shares are the same size).
    pub(crate) fn kib(&self) -> u32 {
        self.client.as_ref().map_or(0, Share::kib)
    }
}

impl Queued for Job {
    /// What the call occupies on the device: every buffer (scratch
    /// included) and its readback copy.
    fn bytes(&self) -> u64 {
        self.plan.buffer_bytes() + self.plan.response_layout.total() as u64
    }
}

/// A finished call.
#[derive(Debug)]
pub struct JobOutput {
    /// The response payload, laid out as the plan's response layout.
    pub payload: Payload,
    /// Time spent queued.
    pub queued: Duration,
    /// Time from submission to completion of the call's batch (executor
    /// clock).
    pub gpu: Duration,
    /// The compute pass alone, measured with GPU timestamp queries where
    /// the adapter supports them: for a call fused with others, the pass
    /// they shared.
    pub kernel: Option<Duration>,
    /// Time to copy the mapped outputs into the payload.
    pub readback: Duration,
    /// The call's share of the in-flight byte budgets, held until the
    /// response has been written.
    pub reservation: Reservation,
}

/// Why a job failed on the GPU side.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExecError {
    /// The deadline passed while the job was queued.
    #[error("deadline exceeded before the call reached the GPU")]
    DeadlineExceeded,
    /// wgpu reported an error for this call (validation, mapping, timeout).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The device was lost while the call was queued or running; it is
    /// being recreated and a retry will run on the new one.
    #[error("{0}")]
    Unavailable(String),
}

impl ExecError {
    /// The status code the caller sees.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::DeadlineExceeded => StatusCode::DeadlineExceeded,
            Self::Gpu(_) => StatusCode::Internal,
            Self::Unavailable(_) => StatusCode::Unavailable,
        }
    }
}

/// Counters for tests and benchmarks: they show whether the steady state
/// allocates, how calls are batched and how many were dropped before running.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    /// Calls run on the GPU.
    pub calls: AtomicU64,
    /// GPU submissions (a batch of calls is one).
    pub batches: AtomicU64,
    /// Calls dropped because their caller had gone away.
    pub cancelled: AtomicU64,
    /// Calls dropped because their deadline passed while queued.
    pub expired: AtomicU64,
    /// GPU buffers created.
    pub buffers_created: AtomicU64,
    /// GPU buffer acquisitions served by the pool.
    pub buffers_reused: AtomicU64,
    /// Devices lost (and recreated).
    pub devices_lost: AtomicU64,
    /// Successful reloads of the kernel set.
    pub reloads: AtomicU64,
    /// Request payload bytes copied in user space (into GPU staging
    /// memory): equal to the input bytes of the calls run when each is
    /// copied once.
    pub bytes_copied_in: AtomicU64,
    /// Response payload bytes copied in user space (out of mapped readback
    /// buffers).
    pub bytes_copied_out: AtomicU64,
    /// Calls that ran in a fused dispatch, sharing it with other calls of
    /// the same kernel and client.
    pub fused_calls: AtomicU64,
    /// Fused dispatches (each ran two calls or more).
    pub fused_dispatches: AtomicU64,
    /// Times work (a batch of calls, or a reload) reached the GPU thread
    /// while it spun (see [`GpuConfig::idle_spin`]): started without a
    /// wake-up.
    pub waits_spun: AtomicU64,
    /// Times the GPU thread slept for work and had to be woken.
    pub waits_slept: AtomicU64,
}

/// Work for the executor thread other than calls.
#[derive(Debug)]
enum Control {
    /// Compile and publish these kernels (shipped ones and those in the
    /// directory, read and parsed off this thread), running `before_publish`
    /// once they have compiled, just before they are published.
    Reload {
        kernel_dir: Option<PathBuf>,
        sources: Vec<KernelSource>,
        before_publish: BeforePublish,
        reply: oneshot::Sender<Result<Vec<String>, GpuError>>,
    },
    /// Destroy the device, as a driver reset would: fault injection for
    /// tests and drills.
    LoseDevice { reply: oneshot::Sender<()> },
}

type Queue = FairQueue<Job, Control>;

/// What a reload does just before its kernels are published, on the GPU
/// thread: a server puts the policy that comes with them in force.
pub struct BeforePublish(Box<dyn FnOnce() + Send>);

impl BeforePublish {
    /// Runs `f` just before the kernels are published.
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    fn run(self) {
        (self.0)();
    }
}

impl std::fmt::Debug for BeforePublish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforePublish")
    }
}

/// The most calls in one submission, whatever the configuration asks: two
/// timestamp queries per call must fit wgpu's query set limit (4096).
pub const MAX_BATCH: usize = 1024;

/// What a caught panic said, for the error that reports it.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// Closes the queue and answers every job still in it when the executor
/// thread ends, normally (nothing is left then) or by a panic.
struct AnswerOnExit(Arc<Queue>);

impl Drop for AnswerOnExit {
    fn drop(&mut self) {
        self.0.close();
        for job in self.0.drain() {
            let _ = job.reply.send(Err(ExecError::Unavailable(
                "the GPU executor stopped; retry the call".into(),
            )));
        }
    }
}

/// A handle on the executor thread.
#[derive(Debug)]
pub struct GpuExecutor {
    queue: Arc<Queue>,
    adapter: AdapterSummary,
    kernels: Arc<Kernels>,
    stats: Arc<ExecutorStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GpuExecutor {
    /// Starts the executor thread: chooses the adapter, creates the device,
    /// loads and compiles every kernel, and waits until all of that is done.
    ///
    /// # Errors
    /// [`GpuError`] if there is no adapter, a kernel does not load, or a
    /// pipeline does not compile.
    pub async fn start(config: GpuConfig) -> Result<Self, GpuError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let queue = Arc::new(Queue::new(config.queue_depth, config.max_queued_per_client));
        let stats = Arc::new(ExecutorStats::default());
        let thread_stats = stats.clone();
        let thread_queue = queue.clone();
        let thread = std::thread::Builder::new()
            .name("quasar-gpu".into())
            .spawn(
                move || match Worker::init(config, thread_stats, thread_queue.clone()) {
                    Ok((worker, ready)) => {
                        // However the thread ends (a panic included), no
                        // queued call is left without an answer.
                        let _answer_the_rest = AnswerOnExit(thread_queue);
                        if ready_tx.send(Ok(ready)).is_ok() {
                            worker.run();
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(|e| GpuError::Thread(e.to_string()))?;
        let (adapter, kernels) = ready_rx
            .await
            .map_err(|_| GpuError::Thread("exited during start-up".into()))??;
        Ok(Self {
            queue,
            adapter,
            kernels,
            stats,
            thread: Some(thread),
        })
    }

    /// A handle that queues jobs; cheap to clone.
    pub fn queue(&self) -> JobQueue {
        JobQueue {
            queue: self.queue.clone(),
        }
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    /// The loaded kernels, as they are now.
    pub fn registry(&self) -> Arc<Registry> {
        self.kernels.current()
    }

    /// Where the current kernels are published.
    pub fn kernels(&self) -> &Arc<Kernels> {
        &self.kernels
    }

    /// The executor's counters.
    pub fn stats(&self) -> &Arc<ExecutorStats> {
        &self.stats
    }

    /// A handle for reloading kernels and injecting faults; cheap to clone.
    pub fn control(&self) -> ExecutorControl {
        ExecutorControl {
            queue: self.queue.clone(),
        }
    }

    /// Stops accepting jobs, lets queued ones finish, and joins the thread.
    pub async fn shutdown(mut self) {
        self.queue.close();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for GpuExecutor {
    fn drop(&mut self) {
        // Without this the thread would wait for jobs forever.
        self.queue.close();
    }
}

/// Queues jobs for the executor.
#[derive(Debug, Clone)]
pub struct JobQueue {
    queue: Arc<Queue>,
}

impl JobQueue {
    /// Queues a job without waiting.
    ///
    /// # Errors
    /// [`SubmitError::Full`] if the queue is full,
    /// [`SubmitError::SourceFull`] if the job's source has its share of it,
    /// [`SubmitError::Closed`] if the executor has stopped.
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        self.queue.try_push(job.source, job).map_err(|(e, _)| e)
    }
}

/// Reloads kernels and injects faults on a running executor.
#[derive(Debug, Clone)]
pub struct ExecutorControl {
    queue: Arc<Queue>,
}

impl ExecutorControl {
    /// Loads the shipped kernels and those in `kernel_dir` again and
    /// compiles them; on success runs `before_publish` and then new calls
    /// use them (calls already checked run with the kernels they were
    /// checked against). On failure nothing changes and `before_publish`
    /// is not run.
    ///
    /// # Errors
    /// [`GpuError`] for a kernel that does not parse or compile, an
    /// unreadable directory, or a stopped executor.
    pub async fn reload(
        &self,
        kernel_dir: Option<PathBuf>,
        before_publish: BeforePublish,
    ) -> Result<Vec<String>, GpuError> {
        // Reading and checking the files happens here, on a blocking
        // thread: the GPU thread keeps running calls meanwhile and only
        // compiles (which needs the device).
        let dir = kernel_dir.clone();
        let sources = tokio::task::spawn_blocking(move || load_sources(dir.as_deref()))
            .await
            .map_err(|e| GpuError::Thread(format!("reading the kernels: {e}")))??;
        let (reply, rx) = oneshot::channel();
        self.queue
            .push_control(Control::Reload {
                kernel_dir,
                sources,
                before_publish,
                reply,
            })
            .map_err(|_| GpuError::Thread("the GPU executor has stopped".into()))?;
        rx.await
            .map_err(|_| GpuError::Thread("the GPU executor has stopped".into()))?
    }

    /// Destroys the device as a driver reset would. Calls in flight fail
    /// with Unavailable; the executor recreates the device and its
    /// pipelines before running anything else. For fault-injection tests.
    pub async fn lose_device(&self) {
        let (reply, rx) = oneshot::channel();
        if self
            .queue
            .push_control(Control::LoseDevice { reply })
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

/// GPU timestamp queries around each compute pass of a batch.
struct Timestamps {
    query_set: wgpu::QuerySet,
    /// Where the timestamps are resolved before being copied out.
    resolve: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f32,
}

/// A kernel compiled for the device.
#[derive(Debug)]
struct Compiled {
    bind_group_layout: wgpu::BindGroupLayout,
    pipelines: Vec<wgpu::ComputePipeline>,
    /// The kernel rewritten to run many calls in one dispatch, where it
    /// can be.
    fused: Option<FusedPipeline>,
}

/// The pipeline of a fused kernel ([`crate::kernel::fuse`]).
#[derive(Debug)]
struct FusedPipeline {
    bind_group_layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
    table_binding: u32,
    params_stride: Option<u32>,
}

/// A kernel's name and WGSL source, kept so a new device can compile the
/// same kernels even if the files have changed since.
#[derive(Debug, Clone, PartialEq)]
struct KernelSource {
    name: String,
    source: Cow<'static, str>,
}

/// One device and what lives on it.
struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pool: BufferPool,
    timestamps: Option<Timestamps>,
    caps: DeviceCaps,
    /// Set by wgpu when the device is lost.
    lost: Arc<AtomicBool>,
    /// Counts devices since start-up; registries remember theirs.
    generation: u64,
}

/// The pipelines of one registry version, kept while any job (or the
/// current registry) holds that version.
struct CompiledSet {
    version: u64,
    registry: std::sync::Weak<Registry>,
    kernels: Vec<Compiled>,
}

/// The state owned by the executor thread.
struct Worker {
    config: GpuConfig,
    sources: Vec<KernelSource>,
    gpu: Gpu,
    /// Pipelines of the registries still in use, on the current device.
    compiled: Vec<CompiledSet>,
    kernels: Arc<Kernels>,
    stats: Arc<ExecutorStats>,
    queue: Arc<Queue>,
}

type Ready = (AdapterSummary, Arc<Kernels>);

/// Per call of a batch: the GPU resources it holds until it is read back.
struct Prepared {
    place: Place,
    readback: Option<wgpu::Buffer>,
    map_len: u64,
    stamps_at: u64,
    /// The compute pass the call runs in: its timestamps' query pair.
    pass: u32,
}

/// Where a call of a batch runs.
enum Place {
    /// Its own buffers, bind group and dispatch.
    Own {
        bind_group: wgpu::BindGroup,
        buffers: Vec<wgpu::Buffer>,
        uniform: Option<wgpu::Buffer>,
    },
    /// A part of a fused dispatch: the group (by index) and the call's
    /// position in it.
    Fused { group: usize, pos: usize },
}

/// Calls of one kernel and one client that run as one dispatch
/// ([`crate::kernel::fuse`]).
struct Group {
    /// The calls, by index in the batch.
    calls: Vec<usize>,
    /// One buffer per storage binding, holding the calls' parts end to
    /// end, in call order.
    buffers: Vec<wgpu::Buffer>,
    /// Each call's element offset in each buffer: call `pos`'s in buffer
    /// `b` at `pos * buffers.len() + b`.
    offsets: Vec<u64>,
    /// The calls' argument blocks, one after another.
    params: Option<(wgpu::Buffer, u64)>,
    /// The table of calls the kernel reads its offsets and lengths from.
    table: wgpu::Buffer,
    /// The table's bytes, uploaded with the inputs.
    table_bytes: Vec<u8>,
    bind_group: wgpu::BindGroup,
    /// Workgroups along x: the most any of the calls asked for (each
    /// runs in its own count of them).
    x: u32,
    pass: u32,
    pipeline: wgpu::ComputePipeline,
}

impl Group {
    /// Where call `pos`'s part of buffer `b` starts, in bytes.
    fn byte_offset(&self, pos: usize, b: usize) -> u64 {
        self.offsets[pos * self.buffers.len() + b] * 4
    }
}

/// What a call of a batch produced.
struct CallOut {
    payload: Payload,
    /// Its compute pass, timed on the GPU.
    kernel: Option<Duration>,
    readback: Duration,
    /// How many calls the pass ran (more than one when fused).
    shared_by: u32,
}

/// How a batch as a whole went wrong.
enum BatchError {
    /// wgpu validation: some call in the batch is at fault.
    Validation(String),
    /// Anything else (timeout, lost device): every call of it fails so.
    All(ExecError),
}

impl Gpu {
    fn new(config: &GpuConfig, generation: u64) -> Result<(Self, AdapterSummary), GpuError> {
        let adapter = choose_adapter(config.adapter.as_deref())?;
        let summary = AdapterSummary::from_info(&adapter.get_info());
        let limits = adapter.limits();
        let wants_timestamps = match config.timestamps {
            Timestamping::On => true,
            Timestamping::Off => false,
            Timestamping::Auto => !summary.is_cpu,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("quasar"),
            // Timestamps give the GPU time of the dispatches alone; without
            // them the executor's clock around the submission is used.
            required_features: if wants_timestamps {
                adapter.features() & wgpu::Features::TIMESTAMP_QUERY
            } else {
                wgpu::Features::empty()
            },
            // Everything the adapter offers: large buffers matter more than
            // portability of limits for a server.
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|source| GpuError::RequestDevice {
            adapter: summary.to_string(),
            source,
        })?;
        // The default handler panics; errors outside a scope are logged and
        // the scopes around each batch report that batch's errors.
        device.on_uncaptured_error(Arc::new(|e| {
            tracing::error!(error = %e, "uncaptured wgpu error");
        }));
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            tracing::error!(?reason, %message, "GPU device lost");
            flag.store(true, Ordering::SeqCst);
        });
        let max_batch = config.max_batch.clamp(1, MAX_BATCH) as u32;
        let timestamps = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| Timestamps {
                query_set: device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("quasar pass timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2 * max_batch,
                }),
                resolve: device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("quasar timestamp resolve"),
                    size: (16 * u64::from(max_batch))
                        .div_ceil(wgpu::QUERY_RESOLVE_BUFFER_ALIGNMENT)
                        * wgpu::QUERY_RESOLVE_BUFFER_ALIGNMENT,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                period_ns: queue.get_timestamp_period(),
            });
        let caps = DeviceCaps {
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
        };
        let gpu = Self {
            pool: BufferPool::new(limits.max_buffer_size, config.max_pooled_bytes),
            device,
            queue,
            timestamps,
            caps,
            lost,
            generation,
        };
        Ok((gpu, summary))
    }

    /// Parses and compiles `sources` on this device.
    fn registry(
        &self,
        sources: &[KernelSource],
        version: u64,
        fuse_calls: bool,
    ) -> Result<(Registry, Vec<Compiled>), GpuError> {
        let mut kernels = Vec::with_capacity(sources.len());
        let mut compiled = Vec::with_capacity(sources.len());
        let mut by_name = HashMap::new();
        for s in sources {
            let parsed = KernelInterface::from_wgsl(&s.name, &s.source)?;
            compiled.push(compile(
                &self.device,
                &parsed.interface,
                parsed.module,
                fuse_calls,
            )?);
            by_name.insert(parsed.interface.name.clone(), kernels.len());
            kernels.push(parsed.interface);
        }
        let registry = Registry {
            kernels,
            by_name,
            caps: self.caps,
            device: self.generation,
            version,
        };
        Ok((registry, compiled))
    }
}

impl Worker {
    fn init(
        config: GpuConfig,
        stats: Arc<ExecutorStats>,
        queue: Arc<Queue>,
    ) -> Result<(Self, Ready), GpuError> {
        let (gpu, summary) = Gpu::new(&config, 0)?;
        let sources = load_sources(config.kernel_dir.as_deref())?;
        let (registry, compiled) = gpu.registry(&sources, 0, config.fuse_calls)?;
        let registry = Arc::new(registry);
        let kernels = Arc::new(Kernels(RwLock::new(registry.clone())));
        let worker = Self {
            config,
            sources,
            gpu,
            compiled: vec![CompiledSet {
                version: 0,
                registry: Arc::downgrade(&registry),
                kernels: compiled,
            }],
            kernels: kernels.clone(),
            stats,
            queue,
        };
        Ok((worker, (summary, kernels)))
    }

    /// Makes `registry` the one new calls use, keeping the pipelines of
    /// older versions only while a queued job still holds them.
    fn publish(&mut self, registry: Registry, compiled: Vec<Compiled>) {
        let registry = Arc::new(registry);
        self.compiled.push(CompiledSet {
            version: registry.version,
            registry: Arc::downgrade(&registry),
            kernels: compiled,
        });
        self.kernels.publish(registry);
        // After the swap, so the replaced version goes as soon as no queued
        // job holds it.
        self.compiled.retain(|c| c.registry.strong_count() > 0);
    }

    fn run(mut self) {
        loop {
            if self.gpu.lost.load(Ordering::SeqCst) && !self.recreate() {
                break;
            }
            let bounds = BatchBounds {
                jobs: self.config.max_batch.clamp(1, MAX_BATCH),
                bytes: self.config.max_batch_bytes,
                gpu_time: self.config.max_batch_time,
            };
            let Some((next, waited)) = self
                .queue
                .next_blocking(bounds, self.config.idle_spin.min(MAX_IDLE_SPIN))
            else {
                break;
            };
            let waits = match waited {
                Waited::No => None,
                Waited::Spun => Some(&self.stats.waits_spun),
                Waited::Slept => Some(&self.stats.waits_slept),
            };
            if let Some(counter) = waits {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            match next {
                Next::Control(c) => {
                    // A panic while loading kernels (operator-supplied WGSL)
                    // fails that reload, not the executor.
                    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.control(c);
                    }));
                    if done.is_err() {
                        tracing::error!(
                            "the GPU executor panicked handling a reload or fault injection"
                        );
                    }
                }
                Next::Jobs(jobs) => {
                    self.run_batch(jobs);
                }
            }
        }
        tracing::debug!("GPU executor stopped");
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Reload {
                kernel_dir,
                sources,
                before_publish,
                reply,
            } => {
                // A panic compiling operator-supplied WGSL fails this
                // reload with an answer, rather than leaving the caller to
                // read a dropped reply as a stopped executor.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.reload(kernel_dir, sources, before_publish)
                }))
                .unwrap_or_else(|panic| {
                    Err(GpuError::ReloadPanicked(
                        panic_message(panic.as_ref()).to_owned(),
                    ))
                });
                if result.is_ok() {
                    self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                }
                let _ = reply.send(result);
            }
            Control::LoseDevice { reply } => {
                tracing::warn!("destroying the GPU device on request (fault injection)");
                self.gpu.device.destroy();
                // wgpu reports the loss on its next poll; do not wait for it.
                self.gpu.lost.store(true, Ordering::SeqCst);
                let _ = reply.send(());
            }
        }
    }

    /// Compiles and publishes `sources` (read and checked off this thread;
    /// each is parsed again here for its module); the names of the kernels
    /// now served.
    fn reload(
        &mut self,
        kernel_dir: Option<PathBuf>,
        sources: Vec<KernelSource>,
        before_publish: BeforePublish,
    ) -> Result<Vec<String>, GpuError> {
        if sources == self.sources {
            // Nothing changed (a certificate rotation, say): no
            // recompiling, which would hold up every call.
            before_publish.run();
            self.config.kernel_dir = kernel_dir;
            return Ok(self.sources.iter().map(|k| k.name.clone()).collect());
        }
        let version = self.kernels.current().version + 1;
        let (registry, compiled) = self
            .gpu
            .registry(&sources, version, self.config.fuse_calls)?;
        let names = registry.kernels.iter().map(|k| k.name.clone()).collect();
        before_publish.run();
        self.publish(registry, compiled);
        self.sources = sources;
        self.config.kernel_dir = kernel_dir;
        Ok(names)
    }

    /// Replaces a lost device and its pipelines. While no device can be
    /// had, queued calls fail with Unavailable and the executor tries again
    /// every second. False if the executor was stopped meanwhile.
    fn recreate(&mut self) -> bool {
        self.stats.devices_lost.fetch_add(1, Ordering::Relaxed);
        let generation = self.gpu.generation + 1;
        loop {
            let version = self.kernels.current().version;
            let rebuilt = Gpu::new(&self.config, generation).and_then(|(gpu, summary)| {
                let (registry, compiled) =
                    gpu.registry(&self.sources, version, self.config.fuse_calls)?;
                Ok((gpu, summary, registry, compiled))
            });
            match rebuilt {
                Ok((gpu, summary, registry, compiled)) => {
                    tracing::info!(adapter = %summary, generation, "GPU device recreated");
                    self.gpu = gpu;
                    // Pipelines of the lost device are useless.
                    self.compiled.clear();
                    self.publish(registry, compiled);
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "recreating the GPU device; retrying in 1 s");
                    for job in self.queue.drain() {
                        let _ = job.reply.send(Err(unavailable()));
                    }
                    if self.queue.is_closed() {
                        return false;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Runs a batch and answers its calls; how many failed validation.
    fn run_batch(&mut self, jobs: Vec<Job>) -> usize {
        let now = Instant::now();
        let mut live = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.reply.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            } else if job.deadline.is_some_and(|d| now >= d) {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                let _ = job.reply.send(Err(ExecError::DeadlineExceeded));
            } else if job.kernels.device != self.gpu.generation {
                // Checked against a device that has been lost since.
                let _ = job.reply.send(Err(unavailable()));
            } else {
                live.push(job);
            }
        }
        if live.is_empty() {
            return 0;
        }
        let gpu_start = Instant::now();
        // A panic inside wgpu fails these calls, not the server: the
        // buffers they held are dropped rather than returned to the pool.
        let executed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(&live)))
                .unwrap_or_else(|_| {
                    tracing::error!(
                        calls = live.len(),
                        "the GPU executor panicked running a batch"
                    );
                    Err(BatchError::Validation(
                        "the GPU executor panicked running this call".into(),
                    ))
                });
        let gpu = gpu_start.elapsed();
        // Turns go by GPU time: the submission's is charged to the clients
        // of its calls (each call's own pass where timestamps measured it),
        // once the replies are on their way. A batch that failed
        // validation is not: its calls run again one by one and are
        // charged then. One that failed whole (a timeout, a lost device)
        // held the GPU all the same, and is.
        let charges: Option<Vec<(u64, Option<Duration>)>> = match &executed {
            Ok(outputs) => Some(
                live.iter()
                    .zip(outputs)
                    .map(|(job, out)| {
                        // A fused pass's time, shared equally by its calls
                        // (all of one client).
                        let exact = out
                            .as_ref()
                            .ok()
                            .and_then(|o| o.kernel.map(|k| k / o.shared_by.max(1)));
                        (job.source, exact)
                    })
                    .collect(),
            ),
            Err(BatchError::All(_)) => Some(live.iter().map(|job| (job.source, None)).collect()),
            Err(BatchError::Validation(_)) => None,
        };
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        let pool = self.gpu.pool.stats();
        self.stats
            .buffers_created
            .store(pool.created, Ordering::Relaxed);
        self.stats
            .buffers_reused
            .store(pool.reused, Ordering::Relaxed);
        let batch = live.len();
        let failed = match executed {
            Ok(outputs) => {
                self.stats.calls.fetch_add(batch as u64, Ordering::Relaxed);
                for (job, out) in live.into_iter().zip(outputs) {
                    let Job {
                        payload,
                        reply,
                        reservation,
                        enqueued,
                        ..
                    } = job;
                    drop(payload);
                    let result = out.map(|o| JobOutput {
                        payload: o.payload,
                        queued: gpu_start.saturating_duration_since(enqueued),
                        gpu,
                        kernel: o.kernel,
                        readback: o.readback,
                        reservation,
                    });
                    let _ = reply.send(result);
                }
                0
            }
            Err(BatchError::Validation(_)) if batch > 1 => {
                // Find the call at fault: each runs again on its own (and
                // so unfused).
                tracing::debug!(
                    calls = batch,
                    "a batch failed validation; running its calls one by one"
                );
                // The kernels it fused (found again: this path is rare).
                let fused: Vec<(u64, usize)> = match sets_of(&self.compiled, &live) {
                    Some(sets) if self.config.fuse_calls => fused_groups(
                        &live,
                        &sets,
                        self.gpu.caps,
                        self.config.max_fused_call_bytes,
                    )
                    .iter()
                    .filter_map(|calls| calls.first().and_then(|&i| live.get(i)))
                    .map(|job| (job.kernels.version, job.plan.kernel))
                    .collect(),
                    _ => Vec::new(),
                };
                let mut failed = 0;
                for job in live {
                    failed += self.run_batch(vec![job]);
                }
                if failed == 0 {
                    // Every call passed alone: the fused form was at fault,
                    // and would be again on every batch.
                    for (version, kernel) in fused {
                        self.unfuse(version, kernel);
                    }
                }
                failed
            }
            Err(BatchError::Validation(message)) => {
                self.stats.calls.fetch_add(batch as u64, Ordering::Relaxed);
                for job in live {
                    let _ = job.reply.send(Err(ExecError::Gpu(message.clone())));
                }
                batch
            }
            Err(BatchError::All(e)) => {
                for job in live {
                    let _ = job.reply.send(Err(e.clone()));
                }
                0
            }
        };
        if let Some(charges) = charges {
            self.queue.charge(gpu, &charges);
        }
        failed
    }

    /// Stops fusing calls of a kernel (of one kernel set), for good.
    fn unfuse(&mut self, version: u64, kernel: usize) {
        let Some(set) = self.compiled.iter_mut().find(|c| c.version == version) else {
            return;
        };
        if let Some(k) = set.kernels.get_mut(kernel)
            && k.fused.take().is_some()
        {
            let name = set
                .registry
                .upgrade()
                .and_then(|r| r.kernels.get(kernel).map(|k| k.name.clone()))
                .unwrap_or_default();
            tracing::warn!(
                kernel = %name,
                "calls of this kernel failed validation fused and passed alone; they are no longer fused"
            );
        }
    }

    /// Runs a batch: every call's uploads, dispatches and readback copies in
    /// one command buffer, one submission, one wait. Calls of one kernel
    /// and one client run as one dispatch where the kernel can be fused.
    /// The outputs of each call, or why the batch as a whole failed.
    fn execute(&mut self, jobs: &[Job]) -> Result<Vec<Result<CallOut, ExecError>>, BatchError> {
        let sets = sets_of(&self.compiled, jobs).ok_or_else(|| BatchError::All(unavailable()))?;
        let gpu = &mut self.gpu;
        let mut fused = if self.config.fuse_calls {
            fused_groups(jobs, &sets, gpu.caps, self.config.max_fused_call_bytes)
        } else {
            Vec::new()
        };
        let mut in_group = vec![None; jobs.len()];
        for (g, calls) in fused.iter().enumerate() {
            for (pos, &i) in calls.iter().enumerate() {
                in_group[i] = Some((g, pos));
            }
        }

        let device = gpu.device.clone();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("quasar batch"),
        });
        // Each call alone, or each group, is one pass (timed as one), in
        // batch order. Groups come in the order of their first calls, so a
        // group is set up at its first call, before the others need it.
        let mut passes = 0u32;
        let mut groups: Vec<Group> = Vec::with_capacity(fused.len());
        let mut prepared = Vec::with_capacity(jobs.len());
        for (i, (job, compiled)) in jobs.iter().zip(&sets).enumerate() {
            let p = match in_group[i] {
                Some((group, pos)) => {
                    if pos == 0 {
                        debug_assert_eq!(groups.len(), group, "groups in first-call order");
                        let calls = std::mem::take(&mut fused[group]);
                        groups.push(prepare_group(
                            gpu,
                            &mut encoder,
                            jobs,
                            &sets,
                            calls,
                            passes,
                        )?);
                        passes += 1;
                    }
                    let (readback, map_len, stamps_at) = readback_for(gpu, &job.plan);
                    Prepared {
                        place: Place::Fused { group, pos },
                        readback,
                        map_len,
                        stamps_at,
                        pass: groups[group].pass,
                    }
                }
                None => {
                    passes += 1;
                    prepare_call(gpu, &mut encoder, job, compiled, passes - 1)
                }
            };
            prepared.push(p);
        }
        let staging = match upload(gpu, &mut encoder, jobs, &prepared, &groups, &self.stats) {
            Ok(staging) => staging,
            // An upload buffer that cannot be mapped is an invalid one: on
            // a device lost meanwhile (a retry will run on the new one),
            // or one wgpu refused, whose reason is in the error scope.
            Err(e) if gpu.lost.load(Ordering::SeqCst) => {
                tracing::debug!(error = %e, "upload buffer on a lost device");
                return Err(BatchError::All(unavailable()));
            }
            Err(e) => {
                let cause = scope.pop().now_or_never().flatten();
                return Err(BatchError::Validation(match cause {
                    Some(c) => format!("{e}: {c}"),
                    None => e,
                }));
            }
        };
        // With timestamps each pass is its own (the queries time a pass);
        // without, everything shares one, which saves lavapipe a pass
        // set-up per call.
        let units = || {
            jobs.iter()
                .zip(&sets)
                .zip(&prepared)
                .filter(|(_, p)| !matches!(p.place, Place::Fused { pos: 1.., .. }))
        };
        match &gpu.timestamps {
            Some(ts) => {
                for ((job, compiled), p) in units() {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("quasar call"),
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: &ts.query_set,
                            beginning_of_pass_write_index: Some(2 * p.pass),
                            end_of_pass_write_index: Some(2 * p.pass + 1),
                        }),
                    });
                    dispatch(&mut pass, job, compiled, p, &groups);
                }
            }
            None => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("quasar batch"),
                    timestamp_writes: None,
                });
                for ((job, compiled), p) in units() {
                    dispatch(&mut pass, job, compiled, p, &groups);
                }
            }
        }
        for (job, p) in jobs.iter().zip(&prepared) {
            copy_to_readback(&mut encoder, job, p, &groups);
        }
        if let Some(ts) = &gpu.timestamps {
            encoder.resolve_query_set(&ts.query_set, 0..2 * passes, &ts.resolve, 0);
            for p in &prepared {
                if let Some(rb) = &p.readback {
                    encoder.copy_buffer_to_buffer(
                        &ts.resolve,
                        16 * u64::from(p.pass),
                        rb,
                        p.stamps_at,
                        Some(16),
                    );
                }
            }
        }

        let submission = gpu.queue.submit([encoder.finish()]);
        let (map_tx, map_rx) = std::sync::mpsc::channel();
        for (i, p) in prepared.iter().enumerate() {
            if let Some(rb) = &p.readback {
                let tx = map_tx.clone();
                rb.map_async(wgpu::MapMode::Read, 0..p.map_len, move |r| {
                    let _ = tx.send((i, r));
                });
            }
        }
        drop(map_tx);
        // Mapped again as soon as the GPU has copied out of them, so they go
        // back to the pool ready for the next batch: the wait below
        // completes these maps too.
        let (restage_tx, restaged) = std::sync::mpsc::channel();
        for (i, b) in staging.iter().enumerate() {
            let tx = restage_tx.clone();
            b.map_async(wgpu::MapMode::Write, .., move |r| {
                let _ = tx.send((i, r));
            });
        }
        drop(restage_tx);
        let polled = device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: Some(self.config.poll_timeout),
        });
        let scope_error = scope.pop().now_or_never().flatten();
        let mut mapped: Vec<Option<Result<(), wgpu::BufferAsyncError>>> =
            (0..jobs.len()).map(|_| None).collect();
        for (i, r) in map_rx.try_iter() {
            mapped[i] = Some(r);
        }

        let lost = gpu.lost.load(Ordering::SeqCst);
        let failure = if lost {
            Some(BatchError::All(unavailable()))
        } else if let Some(e) = scope_error {
            Some(BatchError::Validation(e.to_string()))
        } else {
            polled
                .err()
                .map(|e| BatchError::All(ExecError::Gpu(format!("waiting for the GPU: {e}"))))
        };
        let mut remapped = vec![false; staging.len()];
        for (i, r) in restaged.try_iter() {
            remapped[i] = r.is_ok();
        }
        for (b, remapped) in staging.into_iter().zip(remapped) {
            // Only a mapped buffer may go back (the pool hands them out
            // mapped), and none after a failure, as below.
            if remapped && failure.is_none() {
                gpu.pool.release(PoolKind::Upload, b);
            } else {
                b.destroy();
            }
        }
        let stamps = gpu.timestamps.as_ref().map(|ts| f64::from(ts.period_ns));
        let mut outputs = Vec::with_capacity(jobs.len());
        for ((job, p), mapped) in jobs.iter().zip(prepared).zip(mapped) {
            let read_start = Instant::now();
            let was_mapped = matches!(mapped, Some(Ok(())));
            let out = match (&failure, &p.readback) {
                (Some(_), _) => Err(ExecError::Gpu(String::new())),
                (None, None) => Ok((Payload::new(), None)),
                (None, Some(rb)) => match mapped {
                    Some(Ok(())) => copy_out(rb, &job.plan, &p, stamps, &self.stats),
                    Some(Err(e)) => Err(ExecError::Gpu(format!("mapping the outputs: {e}"))),
                    None => Err(ExecError::Gpu("the outputs were never mapped".into())),
                },
            };
            if let Some(rb) = p.readback.as_ref().filter(|_| was_mapped) {
                rb.unmap();
            }
            // After a failure a buffer may still be in use or mapped (a poll
            // that timed out leaves its map pending): never reuse those.
            let reuse = failure.is_none() && out.is_ok();
            let Prepared {
                place, readback, ..
            } = p;
            let (shared_by, buffers, uniform) = match place {
                Place::Own {
                    bind_group,
                    buffers,
                    uniform,
                } => {
                    drop(bind_group);
                    (1, buffers, uniform)
                }
                Place::Fused { group, .. } => (groups[group].calls.len() as u32, Vec::new(), None),
            };
            let held = readback
                .map(|b| (PoolKind::Readback, b))
                .into_iter()
                .chain(uniform.map(|b| (PoolKind::Uniform, b)))
                .chain(buffers.into_iter().map(|b| (PoolKind::Storage, b)));
            for (kind, b) in held {
                if reuse {
                    gpu.pool.release(kind, b);
                } else {
                    b.destroy();
                }
            }
            outputs.push(out.map(|(payload, kernel)| CallOut {
                payload,
                kernel,
                readback: read_start.elapsed(),
                shared_by,
            }));
        }
        if let (Some(BatchError::Validation(why)), false) = (&failure, groups.is_empty()) {
            // The calls run again one by one, unfused: said aloud, since a
            // fault of the fused form would repeat on every batch.
            tracing::warn!(
                %why,
                fused_dispatches = groups.len(),
                "a batch with fused dispatches failed validation; its calls run again one by one, unfused"
            );
        }
        if failure.is_none() {
            let calls: usize = groups.iter().map(|g| g.calls.len()).sum();
            self.stats
                .fused_calls
                .fetch_add(calls as u64, Ordering::Relaxed);
            self.stats
                .fused_dispatches
                .fetch_add(groups.len() as u64, Ordering::Relaxed);
        }
        for g in groups {
            let Group {
                buffers,
                params,
                table,
                bind_group,
                ..
            } = g;
            drop(bind_group);
            // The submission finished: nothing uses them any more, unless
            // it failed (a timed-out poll, say).
            let held = buffers
                .into_iter()
                .chain(params.map(|(b, _)| b))
                .chain(std::iter::once(table));
            for b in held {
                if failure.is_none() {
                    gpu.pool.release(PoolKind::Storage, b);
                } else {
                    b.destroy();
                }
            }
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(outputs),
        }
    }
}

/// The compiled kernels each job was checked against, or `None` if a job's
/// kernel set is gone (its device was lost).
fn sets_of<'a>(compiled: &'a [CompiledSet], jobs: &[Job]) -> Option<Vec<&'a [Compiled]>> {
    jobs.iter()
        .map(|job| {
            compiled
                .iter()
                .find(|c| c.version == job.kernels.version)
                .map(|c| &c.kernels[..])
        })
        .collect()
}

fn unavailable() -> ExecError {
    ExecError::Unavailable("the GPU device was lost and is being recreated; retry the call".into())
}

/// Sets one call up in the batch: buffers from the pool, its bind group,
/// outputs cleared, a readback buffer. Its inputs and arguments are
/// written by [`upload`].
fn prepare_call(
    gpu: &mut Gpu,
    encoder: &mut wgpu::CommandEncoder,
    job: &Job,
    compiled: &[Compiled],
    pass: u32,
) -> Prepared {
    let plan = &job.plan;
    let kernel = &compiled[plan.kernel];
    let iface = &job.kernels.kernels[plan.kernel];
    let device = &gpu.device;
    let buffers: Vec<wgpu::Buffer> = plan
        .lens
        .iter()
        .map(|&len| gpu.pool.acquire(device, PoolKind::Storage, len * 4))
        .collect();
    // Each call has its own uniform block: calls of one kernel in one batch
    // carry different arguments.
    let uniform = iface.params.as_ref().map(|p| {
        let size = u64::from(p.size.div_ceil(16) * 16);
        let buf = gpu.pool.acquire(device, PoolKind::Uniform, size);
        (p.binding, buf, size)
    });

    let mut entries: Vec<wgpu::BindGroupEntry<'_>> = iface
        .buffers
        .iter()
        .zip(&buffers)
        .zip(&plan.lens)
        .map(|((b, buf), &len)| buffer_entry(b.binding, buf, len * 4))
        .collect();
    if let Some((binding, buf, size)) = &uniform {
        entries.push(buffer_entry(*binding, buf, *size));
    }
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(&iface.name),
        layout: &kernel.bind_group_layout,
        entries: &entries,
    });
    // Server-allocated buffers start at zero, whatever a previous call left
    // in the pooled buffer.
    for ((b, buf), &len) in iface.buffers.iter().zip(&buffers).zip(&plan.lens) {
        if !b.role.is_sent() {
            encoder.clear_buffer(buf, 0, Some(len * 4));
        }
    }
    let (readback, map_len, stamps_at) = readback_for(gpu, plan);
    Prepared {
        place: Place::Own {
            bind_group,
            buffers,
            uniform: uniform.map(|(_, b, _)| b),
        },
        readback,
        map_len,
        stamps_at,
        pass,
    }
}

fn buffer_entry(binding: u32, buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset: 0,
            size: NonZeroU64::new(bytes),
        }),
    }
}

/// A call's readback buffer (none if it returns nothing and no pass
/// timestamps ride with it), the bytes to map and where the timestamps go.
fn readback_for(gpu: &mut Gpu, plan: &CallPlan) -> (Option<wgpu::Buffer>, u64, u64) {
    let total = plan.response_layout.total() as u64;
    // The two pass timestamps ride in the readback buffer after the
    // outputs, so reading them costs no extra map.
    let stamps_at = total.div_ceil(8) * 8;
    let map_len = if gpu.timestamps.is_some() {
        stamps_at + 16
    } else {
        total
    };
    let readback =
        (map_len > 0).then(|| gpu.pool.acquire(&gpu.device, PoolKind::Readback, map_len));
    (readback, map_len, stamps_at)
}

/// Which calls of a batch run fused ([`group_calls`]): calls of a kernel
/// with a fused pipeline, each a 1-D dispatch with no empty buffer and at
/// most `max_bytes` of buffers.
fn fused_groups(
    jobs: &[Job],
    sets: &[&[Compiled]],
    caps: DeviceCaps,
    max_bytes: u64,
) -> Vec<Vec<usize>> {
    let candidates = jobs.iter().zip(sets).map(|(job, set)| {
        let plan = &job.plan;
        let fused = set.get(plan.kernel)?.fused.as_ref()?;
        let one_d = matches!(plan.workgroups[..], [[_, 1, 1]]);
        let small = plan.buffer_bytes() <= max_bytes;
        (one_d && small && !plan.lens.contains(&0)).then(|| Candidate {
            key: (job.kernels.version, plan.kernel, job.source),
            lens: &plan.lens,
            params_bytes: fused.params_stride.map_or(0, u64::from),
        })
    });
    group_calls(candidates, &caps)
}

/// Sets a fused group up: one buffer per binding from the pool, sized for
/// all its calls; its argument blocks and table of calls; outputs
/// cleared. Inputs, arguments and the table are written by [`upload`].
fn prepare_group(
    gpu: &mut Gpu,
    encoder: &mut wgpu::CommandEncoder,
    jobs: &[Job],
    sets: &[&[Compiled]],
    calls: Vec<usize>,
    pass: u32,
) -> Result<Group, BatchError> {
    let first = calls
        .first()
        .and_then(|&i| jobs.get(i))
        .ok_or_else(|| BatchError::Validation("an empty fused group".into()))?;
    let kernel = first.plan.kernel;
    let iface = &first.kernels.kernels[kernel];
    let fused = sets[calls[0]][kernel]
        .fused
        .as_ref()
        .ok_or_else(|| BatchError::Validation("a fused group of an unfused kernel".into()))?;
    let mut elems = vec![0u64; iface.buffers.len()];
    let mut offsets = Vec::with_capacity(calls.len() * elems.len());
    let mut table_bytes = Vec::with_capacity(calls.len() * (4 + elems.len() * 8));
    let mut x = 1;
    for &i in &calls {
        let plan = &jobs[i].plan;
        let own_x = plan.workgroups.first().map_or(1, |w| w[0]);
        table_row(
            &mut table_bytes,
            own_x,
            elems.iter().copied().zip(plan.lens.iter().copied()),
        )
        .ok_or_else(|| {
            BatchError::Validation("a fused group's offsets do not fit the table's u32s".into())
        })?;
        offsets.extend_from_slice(&elems);
        // Each part ends with its sink element.
        for (e, &len) in elems.iter_mut().zip(&plan.lens) {
            *e += len + 1;
        }
        x = x.max(own_x);
    }
    let device = &gpu.device;
    let buffers: Vec<wgpu::Buffer> = elems
        .iter()
        .map(|&e| gpu.pool.acquire(device, PoolKind::Storage, e * 4))
        .collect();
    let params = fused.params_stride.map(|stride| {
        let stride = u64::from(stride);
        let bytes = stride * calls.len() as u64;
        (gpu.pool.acquire(device, PoolKind::Storage, bytes), stride)
    });
    let table_len = table_bytes.len() as u64;
    let table = gpu.pool.acquire(device, PoolKind::Storage, table_len);
    let mut entries: Vec<wgpu::BindGroupEntry<'_>> = iface
        .buffers
        .iter()
        .zip(&buffers)
        .zip(&elems)
        .map(|((b, buf), &e)| buffer_entry(b.binding, buf, e * 4))
        .collect();
    if let (Some(block), Some((buf, stride))) = (&iface.params, &params) {
        entries.push(buffer_entry(
            block.binding,
            buf,
            stride * calls.len() as u64,
        ));
    }
    entries.push(buffer_entry(fused.table_binding, &table, table_len));
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(&iface.name),
        layout: &fused.bind_group_layout,
        entries: &entries,
    });
    for ((b, buf), &e) in iface.buffers.iter().zip(&buffers).zip(&elems) {
        if !b.role.is_sent() {
            encoder.clear_buffer(buf, 0, Some(e * 4));
        }
    }
    Ok(Group {
        calls,
        buffers,
        offsets,
        params,
        table,
        table_bytes,
        bind_group,
        x,
        pass,
        pipeline: fused.pipeline.clone(),
    })
}

/// Where one piece of a batch's input waits in the batch's staging memory.
struct Upload {
    /// The call, by its index in the batch.
    call: usize,
    to: UploadTo,
    /// Which staging buffer, and where in it.
    staging: usize,
    at: u64,
    /// Bytes to copy, a multiple of [`wgpu::COPY_BUFFER_ALIGNMENT`].
    len: u64,
}

/// Lays a batch's input pieces out one after another in staging buffers of
/// at most `cap` bytes each, every piece at a copy-aligned offset.
struct StagingLayout {
    cap: u64,
    /// The bytes used of each staging buffer so far.
    sizes: Vec<u64>,
}

impl StagingLayout {
    fn new(cap: u64) -> Self {
        Self {
            cap,
            sizes: Vec::new(),
        }
    }

    /// Where a piece of `len` bytes goes: the staging buffer, the offset in
    /// it, and the length rounded up to [`wgpu::COPY_BUFFER_ALIGNMENT`]
    /// (a copy's size must be a multiple of it). A piece longer than `cap`
    /// gets a buffer of its own, which wgpu then refuses.
    fn place(&mut self, len: u64) -> (usize, u64, u64) {
        let align = wgpu::COPY_BUFFER_ALIGNMENT;
        let len = len.div_ceil(align) * align;
        let last = self.sizes.len().wrapping_sub(1);
        match self.sizes.last_mut() {
            Some(used) if used.saturating_add(len) <= self.cap => {
                let at = *used;
                *used += len;
                (last, at, len)
            }
            _ => {
                self.sizes.push(len);
                (self.sizes.len() - 1, 0, len)
            }
        }
    }
}

/// What an [`Upload`] fills.
enum UploadTo {
    /// A storage buffer of the call (by index), from this range of its
    /// payload.
    Buffer(usize, std::ops::Range<usize>),
    /// The call's uniform block, from its packed arguments.
    Params,
    /// A fused group's table of calls (by group index).
    Table(usize),
}

/// Writes the inputs and arguments of every call of a batch into staging
/// memory shared by the batch, and encodes the copies from there into the
/// calls' buffers.
///
/// `Queue::write_buffer` would allocate a staging buffer per write: three
/// for a saxpy call, each a search of the device allocator's free list
/// that grew with the number of live buffers (about a fifth of the GPU
/// thread's time at concurrency 64; BENCHMARKS.md, "Upload buffers").
/// Here a batch takes one from the pool, mapped (more only if it needs
/// more than the device's largest buffer). The payload chunks are still
/// copied once, straight into mapped memory.
fn upload(
    gpu: &mut Gpu,
    encoder: &mut wgpu::CommandEncoder,
    jobs: &[Job],
    prepared: &[Prepared],
    groups: &[Group],
    stats: &ExecutorStats,
) -> Result<Vec<wgpu::Buffer>, String> {
    // Each piece fits in one buffer of the device (its destination does).
    let mut layout = StagingLayout::new(gpu.caps.max_buffer_size);
    let mut uploads = Vec::new();
    let mut place = |call: usize, to: UploadTo, len: u64| {
        let (staging, at, len) = layout.place(len);
        uploads.push(Upload {
            call,
            to,
            staging,
            at,
            len,
        });
    };
    for (call, (job, p)) in jobs.iter().zip(prepared).enumerate() {
        // A fused call's part ends with its sink element, which the piece
        // covers too: it is zeroed with the piece's tail below.
        let sink = match p.place {
            Place::Fused { .. } => 4,
            Place::Own { .. } => 0,
        };
        for (idx, range) in &job.plan.sent {
            if !range.is_empty() {
                place(
                    call,
                    UploadTo::Buffer(*idx, range.clone()),
                    range.len() as u64 + sink,
                );
            }
        }
        let has_params = match &p.place {
            Place::Own { uniform, .. } => uniform.is_some(),
            Place::Fused { group, .. } => groups[*group].params.is_some(),
        };
        if has_params && !job.plan.params.is_empty() {
            place(call, UploadTo::Params, job.plan.params.len() as u64);
        }
    }
    for (g, group) in groups.iter().enumerate() {
        place(
            group.calls[0],
            UploadTo::Table(g),
            group.table_bytes.len() as u64,
        );
    }
    let sizes = layout.sizes;
    let staging: Vec<wgpu::Buffer> = sizes
        .iter()
        .map(|&size| gpu.pool.acquire(&gpu.device, PoolKind::Upload, size))
        .collect();
    let mut views = staging
        .iter()
        .zip(&sizes)
        .map(|(b, &size)| b.get_mapped_range_mut(..size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("mapping the batch's upload buffer: {e}"))?;
    let mut copied = 0u64;
    for u in &uploads {
        let view = &mut views[u.staging];
        let at = u.at as usize;
        let written = match &u.to {
            UploadTo::Buffer(_, range) => {
                let job = &jobs[u.call];
                let whole = job.payload.for_each_piece(range.clone(), |off, piece| {
                    view.slice(at + off..at + off + piece.len())
                        .copy_from_slice(piece);
                    copied += piece.len() as u64;
                });
                if whole {
                    range.len()
                } else {
                    // `plan` checked the ranges against the payload; should
                    // that ever fail, the call's buffer gets zeros below.
                    tracing::error!(
                        kernel = %job.kernels.kernels[job.plan.kernel].name,
                        "an input range lies outside its payload; the buffer is zeroed"
                    );
                    0
                }
            }
            UploadTo::Params => {
                let params = &jobs[u.call].plan.params;
                view.slice(at..at + params.len()).copy_from_slice(params);
                params.len()
            }
            UploadTo::Table(g) => {
                let table = &groups[*g].table_bytes;
                view.slice(at..at + table.len()).copy_from_slice(table);
                table.len()
            }
        };
        // A reused upload buffer holds an earlier batch's bytes: whatever
        // of the piece's aligned length was not written is zeroed, so the
        // copy cannot carry them into this call. (Every element type and
        // uniform block is whole 4-byte words, so that is only a fused
        // call's sink.)
        let end = at + u.len as usize;
        if at + written < end {
            view.slice(at + written..end).fill(0);
        }
    }
    drop(views);
    for b in &staging {
        b.unmap();
    }
    stats.bytes_copied_in.fetch_add(copied, Ordering::Relaxed);
    for u in &uploads {
        let p = &prepared[u.call];
        let (to, at) = match (&u.to, &p.place) {
            (UploadTo::Table(g), _) => (&groups[*g].table, 0),
            (UploadTo::Buffer(idx, _), Place::Own { buffers, .. }) => (&buffers[*idx], 0),
            (UploadTo::Buffer(idx, _), Place::Fused { group, pos }) => {
                let g = &groups[*group];
                (&g.buffers[*idx], g.byte_offset(*pos, *idx))
            }
            (UploadTo::Params, Place::Own { uniform, .. }) => match uniform {
                Some(uniform) => (uniform, 0),
                // Not placed: arguments go only to a uniform block.
                None => continue,
            },
            (UploadTo::Params, Place::Fused { group, pos }) => match &groups[*group].params {
                Some((buf, stride)) => (buf, *pos as u64 * stride),
                None => continue,
            },
        };
        encoder.copy_buffer_to_buffer(&staging[u.staging], u.at, to, at, Some(u.len));
    }
    Ok(staging)
}

/// Dispatches a call on its own, or the fused group it is the first of;
/// nothing for the group's other calls.
fn dispatch(
    pass: &mut wgpu::ComputePass<'_>,
    job: &Job,
    compiled: &[Compiled],
    p: &Prepared,
    groups: &[Group],
) {
    match &p.place {
        Place::Own { bind_group, .. } => {
            let kernel = &compiled[job.plan.kernel];
            pass.set_bind_group(0, bind_group, &[]);
            for (pipeline, wg) in kernel.pipelines.iter().zip(&job.plan.workgroups) {
                pass.set_pipeline(pipeline);
                pass.dispatch_workgroups(wg[0], wg[1], wg[2]);
            }
        }
        Place::Fused { group, pos: 0 } => {
            let g = &groups[*group];
            pass.set_bind_group(0, &g.bind_group, &[]);
            pass.set_pipeline(&g.pipeline);
            pass.dispatch_workgroups(g.x, 1, g.calls.len() as u32);
        }
        Place::Fused { .. } => {}
    }
}

/// Copies one call's outputs into its readback buffer, laid out as its
/// response payload.
fn copy_to_readback(encoder: &mut wgpu::CommandEncoder, job: &Job, p: &Prepared, groups: &[Group]) {
    let plan = &job.plan;
    let Some(rb) = &p.readback else { return };
    for (slot, &i) in plan.response_layout.slots().iter().zip(&plan.returned) {
        let (from, at) = match &p.place {
            Place::Own { buffers, .. } => (&buffers[i], 0),
            Place::Fused { group, pos } => {
                let g = &groups[*group];
                (&g.buffers[i], g.byte_offset(*pos, i))
            }
        };
        encoder.copy_buffer_to_buffer(from, at, rb, slot.start as u64, Some(plan.lens[i] * 4));
    }
}

/// Copies a call's outputs (and its pass timestamps) out of its mapped
/// readback buffer.
fn copy_out(
    rb: &wgpu::Buffer,
    plan: &CallPlan,
    p: &Prepared,
    period_ns: Option<f64>,
    stats: &ExecutorStats,
) -> Result<(Payload, Option<Duration>), ExecError> {
    let view = rb
        .get_mapped_range(0..p.map_len)
        .map_err(|e| ExecError::Gpu(format!("reading the outputs: {e}")))?;
    // Copy slot by slot so padding is zero, never a previous call's bytes.
    let mut out = Payload::with_capacity(plan.response_layout.total());
    for slot in plan.response_layout.slots() {
        out.resize(slot.start, 0);
        out.extend_from_slice(&view[slot.clone()]);
        stats
            .bytes_copied_out
            .fetch_add(slot.len() as u64, Ordering::Relaxed);
    }
    let kernel = period_ns.and_then(|period_ns| {
        let at = p.stamps_at as usize;
        let tick = |i: usize| {
            view.get(at + 8 * i..at + 8 * i + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let (start, end) = (tick(0)?, tick(1)?);
        // A counter that went backwards (a reset) gives no reading.
        let ns = end.checked_sub(start)? as f64 * period_ns;
        Some(Duration::from_nanos(ns as u64))
    });
    Ok((out, kernel))
}

/// The shipped kernels' sources, then those in `dir` (replacing shipped
/// ones of the same name). Each is parsed here, so a broken file is
/// reported with its path.
fn load_sources(dir: Option<&Path>) -> Result<Vec<KernelSource>, GpuError> {
    let mut out: Vec<KernelSource> = quasar_shaders::SHIPPED
        .iter()
        .map(|k| KernelSource {
            name: k.name.to_owned(),
            source: Cow::Borrowed(k.source),
        })
        .collect();
    let Some(dir) = dir else {
        return Ok(out);
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| GpuError::KernelDir { path, source }
    };
    // An entry that cannot be read fails the load: a kernel must not vanish
    // from a reload without a word.
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            files.push(path);
        }
    }
    files.sort();
    for path in files {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .ok_or_else(|| GpuError::KernelDir {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "kernel file names must be letters, digits, '_' and '-'",
                ),
            })?
            .to_owned();
        let source = std::fs::read_to_string(&path).map_err(io(&path))?;
        KernelInterface::from_wgsl(&name, &source)?;
        let source = KernelSource {
            name,
            source: Cow::Owned(source),
        };
        if let Some(i) = out.iter().position(|k| k.name == source.name) {
            tracing::warn!(kernel = %source.name, path = %path.display(), "replacing the shipped kernel");
            out[i] = source;
        } else {
            out.push(source);
        }
    }
    Ok(out)
}

fn compile(
    device: &wgpu::Device,
    iface: &KernelInterface,
    module: naga::Module,
    fuse_calls: bool,
) -> Result<Compiled, GpuError> {
    // A kernel that cannot be fused (or whose fused form the driver
    // refuses) runs one dispatch per call: worth a line, not a failure.
    let fused = if fuse_calls && iface.flexible_workgroups {
        match fuse(iface, &module) {
            Ok(f) => compile_fused(device, iface, f)
                .inspect_err(|why| {
                    tracing::warn!(kernel = %iface.name, %why, "the fused kernel did not compile; calls run one dispatch each");
                })
                .ok(),
            Err(why) => {
                tracing::info!(kernel = %iface.name, %why, "not fused: calls run one dispatch each");
                None
            }
        }
    } else {
        None
    };
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&iface.name),
        source: wgpu::ShaderSource::Naga(Cow::Owned(module)),
    });
    let params = iface
        .params
        .iter()
        .map(|p| layout_entry(p.binding, wgpu::BufferBindingType::Uniform));
    let (bind_group_layout, layout) = layouts(device, &iface.name, iface, params);
    let pipelines = iface
        .stages
        .iter()
        .map(|s| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("{}::{}", iface.name, s.entry_point)),
                layout: Some(&layout),
                module: &shader,
                entry_point: Some(&s.entry_point),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            })
        })
        .collect();
    if let Some(e) = scope.pop().now_or_never().flatten() {
        return Err(GpuError::Pipeline {
            kernel: iface.name.clone(),
            message: e.to_string(),
        });
    }
    Ok(Compiled {
        bind_group_layout,
        pipelines,
        fused,
    })
}

/// The bind-group layout of a kernel's buffers and `extra` entries (its
/// arguments, a fused form's table), and the pipeline layout over it.
fn layouts(
    device: &wgpu::Device,
    label: &str,
    iface: &KernelInterface,
    extra: impl Iterator<Item = wgpu::BindGroupLayoutEntry>,
) -> (wgpu::BindGroupLayout, wgpu::PipelineLayout) {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = iface
        .buffers
        .iter()
        .map(|b| storage_entry(b.binding, b.role == BufferRole::Input))
        .chain(extra)
        .collect();
    let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(&bind_group_layout)],
        immediate_size: 0,
    });
    (bind_group_layout, layout)
}

fn layout_entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    layout_entry(binding, wgpu::BufferBindingType::Storage { read_only })
}

/// Compiles a kernel's fused form: the same buffers, the arguments as a
/// read-only storage array, and the table of calls.
fn compile_fused(
    device: &wgpu::Device,
    iface: &KernelInterface,
    fused: FusedKernel,
) -> Result<FusedPipeline, String> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let label = format!("{} (fused)", iface.name);
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&label),
        source: wgpu::ShaderSource::Naga(Cow::Owned(fused.module)),
    });
    let extra = iface
        .params
        .iter()
        .map(|p| p.binding)
        .chain([fused.table_binding])
        .map(|binding| storage_entry(binding, true));
    let (bind_group_layout, layout) = layouts(device, &label, iface, extra);
    let entry_point = iface.stages.first().map(|s| s.entry_point.as_str());
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&label),
        layout: Some(&layout),
        module: &shader,
        entry_point,
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    });
    if let Some(e) = scope.pop().now_or_never().flatten() {
        return Err(e.to_string());
    }
    Ok(FusedPipeline {
        bind_group_layout,
        pipeline,
        table_binding: fused.table_binding,
        params_stride: fused.params_stride,
    })
}

#[cfg(test)]
mod tests {
    use super::StagingLayout;

    #[test]
    fn staging_pieces_are_aligned_and_split_at_the_cap() {
        let mut layout = StagingLayout::new(64);
        // Lengths round up to the copy alignment, offsets follow on.
        assert_eq!(layout.place(8), (0, 0, 8));
        assert_eq!(layout.place(5), (0, 8, 8));
        assert_eq!(layout.place(48), (0, 16, 48));
        // Full: the next piece starts another buffer.
        assert_eq!(layout.place(4), (1, 0, 4));
        assert_eq!(layout.place(60), (1, 4, 60));
        // A piece of the cap's size fits alone; one past it gets its own
        // buffer too (and wgpu refuses to create it).
        assert_eq!(layout.place(64), (2, 0, 64));
        assert_eq!(layout.place(100), (3, 0, 100));
        assert_eq!(layout.place(1), (4, 0, 4));
        assert_eq!(layout.sizes, vec![64, 64, 64, 100, 4]);
    }
}
