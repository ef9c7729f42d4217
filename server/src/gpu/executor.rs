//! The GPU executor: one thread that owns the device, the queue, every
//! compiled kernel and the buffer pool, and runs calls one submission at a
//! time.
//!
//! Async handlers send [`Job`]s over a bounded channel with `try_send`, so a
//! full queue is refused at once (ResourceExhausted) instead of growing;
//! each job carries a oneshot for its reply. Only this thread calls the
//! blocking `device.poll`. A job whose caller has gone away (its oneshot is
//! closed) or whose deadline has passed is dropped before it touches the GPU.
//!
//! Copies of payload bytes on the way: the payload read from QUIC is written
//! into the storage buffer by `queue.write_buffer` (wgpu stages it), and the
//! mapped readback buffer is copied once into the response payload.

use std::borrow::Cow;
use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use quasar_transport::{Payload, StatusCode};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::pool::{BufferPool, PoolKind};
use super::{AdapterSummary, GpuError, choose_adapter};
use crate::kernel::plan::{CallPlan, DeviceCaps};
use crate::kernel::{BufferRole, KernelInterface, ParsedKernel};

/// How the GPU side is set up.
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// Extra kernels: every `*.wgsl` file in this directory. A file named
    /// like a shipped kernel replaces it.
    pub kernel_dir: Option<PathBuf>,
    /// Use only an adapter whose name contains this (case-insensitive).
    pub adapter: Option<String>,
    /// Calls that may wait for the GPU; past this, calls are refused.
    pub queue_depth: usize,
    /// Longest a submission may run before the call fails.
    pub poll_timeout: Duration,
    /// Idle GPU buffers kept for reuse, in bytes.
    pub max_pooled_bytes: u64,
    /// Whether to time each compute pass with GPU timestamp queries.
    pub timestamps: Timestamping,
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

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            kernel_dir: None,
            adapter: None,
            queue_depth: 256,
            poll_timeout: Duration::from_secs(60),
            max_pooled_bytes: 512 * 1024 * 1024,
            timestamps: Timestamping::Auto,
        }
    }
}

/// The loaded kernels, by name.
#[derive(Debug, Default)]
pub struct Registry {
    kernels: Vec<KernelInterface>,
    by_name: HashMap<String, usize>,
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
}

/// A call on its way to the GPU.
#[derive(Debug)]
pub struct Job {
    /// What to run.
    pub plan: CallPlan,
    /// The request payload the plan's ranges point into.
    pub payload: Payload,
    /// When the job was queued.
    pub enqueued: Instant,
    /// Do not start after this.
    pub deadline: Option<Instant>,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<JobOutput, ExecError>>,
    /// The call's share of the server's in-flight byte budget, released
    /// with the last of its bytes (moved into the output on success).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// A finished call.
#[derive(Debug)]
pub struct JobOutput {
    /// The response payload, laid out as the plan's response layout.
    pub payload: Payload,
    /// Time spent queued.
    pub queued: Duration,
    /// Time from submission to completion (executor clock).
    pub gpu: Duration,
    /// The compute pass alone, measured with GPU timestamp queries where
    /// the adapter supports them.
    pub kernel: Option<Duration>,
    /// Time to copy the mapped outputs into the payload.
    pub readback: Duration,
    /// The call's share of the in-flight byte budget, held until the
    /// response has been written.
    pub permit: Option<OwnedSemaphorePermit>,
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
}

impl ExecError {
    /// The status code the caller sees.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::DeadlineExceeded => StatusCode::DeadlineExceeded,
            Self::Gpu(_) => StatusCode::Internal,
        }
    }
}

/// Why a job was not queued.
#[derive(Debug, Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the GPU queue is full ({0} calls waiting)")]
    Full(usize),
    /// The executor has stopped.
    #[error("the GPU executor has stopped")]
    Closed,
}

/// Counters for tests and benchmarks: they show whether the steady state
/// allocates and how many calls were dropped before running.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    /// Calls run on the GPU.
    pub calls: AtomicU64,
    /// Calls dropped because their caller had gone away.
    pub cancelled: AtomicU64,
    /// Calls dropped because their deadline passed while queued.
    pub expired: AtomicU64,
    /// GPU buffers created.
    pub buffers_created: AtomicU64,
    /// GPU buffer acquisitions served by the pool.
    pub buffers_reused: AtomicU64,
}

/// A handle on the executor thread.
#[derive(Debug)]
pub struct GpuExecutor {
    tx: mpsc::Sender<Job>,
    adapter: AdapterSummary,
    caps: DeviceCaps,
    registry: Arc<Registry>,
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
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let stats = Arc::new(ExecutorStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("quasar-gpu".into())
            .spawn(move || match Worker::init(&config, thread_stats) {
                Ok((worker, ready)) => {
                    if ready_tx.send(Ok(ready)).is_ok() {
                        worker.run(rx);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| GpuError::Thread(e.to_string()))?;
        let (adapter, caps, registry) = ready_rx
            .await
            .map_err(|_| GpuError::Thread("exited during start-up".into()))??;
        Ok(Self {
            tx,
            adapter,
            caps,
            registry: Arc::new(registry),
            stats,
            thread: Some(thread),
        })
    }

    /// A handle that queues jobs; cheap to clone.
    pub fn queue(&self) -> JobQueue {
        JobQueue {
            tx: self.tx.clone(),
        }
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    /// The device's limits that requests are checked against.
    pub fn caps(&self) -> DeviceCaps {
        self.caps
    }

    /// The loaded kernels.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The executor's counters.
    pub fn stats(&self) -> &Arc<ExecutorStats> {
        &self.stats
    }

    /// Stops accepting jobs, lets queued ones finish, and joins the thread.
    /// Jobs still held by [`JobQueue`] clones keep the thread alive until
    /// those are dropped.
    pub async fn shutdown(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Queues jobs for the executor.
#[derive(Debug, Clone)]
pub struct JobQueue {
    tx: mpsc::Sender<Job>,
}

impl JobQueue {
    /// Queues a job without waiting.
    ///
    /// # Errors
    /// [`SubmitError::Full`] if the queue is full, [`SubmitError::Closed`] if
    /// the executor has stopped.
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full(self.tx.max_capacity()),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })
    }
}

/// GPU timestamp queries around each compute pass.
struct Timestamps {
    query_set: wgpu::QuerySet,
    /// Where the two timestamps are resolved before being copied out.
    resolve: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f32,
}

/// A kernel compiled for the device.
struct Compiled {
    bind_group_layout: wgpu::BindGroupLayout,
    pipelines: Vec<wgpu::ComputePipeline>,
    uniform: Option<wgpu::Buffer>,
}

/// The state owned by the executor thread.
struct Worker {
    device: wgpu::Device,
    queue: wgpu::Queue,
    kernels: Vec<Compiled>,
    interfaces: Vec<KernelInterface>,
    pool: BufferPool,
    poll_timeout: Duration,
    stats: Arc<ExecutorStats>,
    timestamps: Option<Timestamps>,
}

type Ready = (AdapterSummary, DeviceCaps, Registry);

impl Worker {
    fn init(config: &GpuConfig, stats: Arc<ExecutorStats>) -> Result<(Self, Ready), GpuError> {
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
        // the scopes around each call report that call's errors.
        device.on_uncaptured_error(Arc::new(|e| {
            tracing::error!(error = %e, "uncaptured wgpu error");
        }));

        let parsed = load_kernels(config.kernel_dir.as_deref())?;
        let mut kernels = Vec::with_capacity(parsed.len());
        let mut interfaces = Vec::with_capacity(parsed.len());
        let mut by_name = HashMap::new();
        for p in parsed {
            kernels.push(compile(&device, &p.interface, p.module)?);
            by_name.insert(p.interface.name.clone(), interfaces.len());
            interfaces.push(p.interface);
        }
        let caps = DeviceCaps {
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
        };
        let registry = Registry {
            kernels: interfaces.clone(),
            by_name,
        };
        let timestamps = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| Timestamps {
                query_set: device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("quasar pass timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                }),
                resolve: device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("quasar timestamp resolve"),
                    size: wgpu::QUERY_RESOLVE_BUFFER_ALIGNMENT,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                period_ns: queue.get_timestamp_period(),
            });
        let worker = Self {
            timestamps,
            pool: BufferPool::new(limits.max_buffer_size, config.max_pooled_bytes),
            device,
            queue,
            kernels,
            interfaces,
            poll_timeout: config.poll_timeout,
            stats,
        };
        Ok((worker, (summary, caps, registry)))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            let started = Instant::now();
            if job.reply.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if job.deadline.is_some_and(|d| started >= d) {
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
                let _ = job.reply.send(Err(ExecError::DeadlineExceeded));
                continue;
            }
            let queued = started.saturating_duration_since(job.enqueued);
            let Job {
                plan,
                payload,
                reply,
                permit,
                ..
            } = job;
            // A panic inside wgpu fails this call, not the server: the
            // buffers it held are dropped rather than returned to the pool.
            let executed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.execute(&plan, &payload)
            }))
            .unwrap_or_else(|_| {
                tracing::error!(
                    kernel = plan.kernel,
                    "the GPU executor panicked running a call"
                );
                Err(ExecError::Gpu(
                    "the GPU executor panicked running this call".into(),
                ))
            });
            drop(payload);
            let result = executed.map(|e| JobOutput {
                payload: e.payload,
                queued,
                gpu: e.device,
                kernel: e.kernel,
                readback: e.readback,
                permit,
            });
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            let pool = self.pool.stats();
            self.stats
                .buffers_created
                .store(pool.created, Ordering::Relaxed);
            self.stats
                .buffers_reused
                .store(pool.reused, Ordering::Relaxed);
            let _ = reply.send(result);
        }
        tracing::debug!("GPU executor stopped");
    }

    /// Runs one call: upload, dispatch every stage, read back the outputs.
    fn execute(&mut self, plan: &CallPlan, payload: &Payload) -> Result<Executed, ExecError> {
        let device = &self.device;
        let kernel = &self.kernels[plan.kernel];
        let iface = &self.interfaces[plan.kernel];
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);

        let buffers: Vec<wgpu::Buffer> = plan
            .lens
            .iter()
            .map(|&len| self.pool.acquire(device, PoolKind::Storage, len * 4))
            .collect();
        for (idx, range) in &plan.sent {
            self.queue
                .write_buffer(&buffers[*idx], 0, &payload[range.clone()]);
        }
        if let Some(u) = &kernel.uniform {
            self.queue.write_buffer(u, 0, &plan.params);
        }

        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = iface
            .buffers
            .iter()
            .zip(&buffers)
            .zip(&plan.lens)
            .map(|((b, buf), &len)| wgpu::BindGroupEntry {
                binding: b.binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: buf,
                    offset: 0,
                    size: NonZeroU64::new(len * 4),
                }),
            })
            .collect();
        if let (Some(p), Some(u)) = (&iface.params, &kernel.uniform) {
            entries.push(wgpu::BindGroupEntry {
                binding: p.binding,
                resource: u.as_entire_binding(),
            });
        }
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&iface.name),
            layout: &kernel.bind_group_layout,
            entries: &entries,
        });

        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some(&iface.name),
        });
        // Server-allocated buffers start at zero, whatever a previous call
        // left in the pooled buffer.
        for ((b, buf), &len) in iface.buffers.iter().zip(&buffers).zip(&plan.lens) {
            if !b.role.is_sent() {
                encoder.clear_buffer(buf, 0, Some(len * 4));
            }
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&iface.name),
                timestamp_writes: self.timestamps.as_ref().map(|ts| {
                    wgpu::ComputePassTimestampWrites {
                        query_set: &ts.query_set,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }
                }),
            });
            pass.set_bind_group(0, &bind_group, &[]);
            for (pipeline, wg) in kernel.pipelines.iter().zip(&plan.workgroups) {
                pass.set_pipeline(pipeline);
                pass.dispatch_workgroups(wg[0], wg[1], wg[2]);
            }
        }
        let total = plan.response_layout.total() as u64;
        // The two pass timestamps ride in the readback buffer after the
        // outputs, so reading them costs no extra map.
        let stamps_at = total.div_ceil(8) * 8;
        let map_len = if self.timestamps.is_some() {
            stamps_at + 16
        } else {
            total
        };
        if let Some(ts) = &self.timestamps {
            encoder.resolve_query_set(&ts.query_set, 0..2, &ts.resolve, 0);
        }
        let readback =
            (map_len > 0).then(|| self.pool.acquire(device, PoolKind::Readback, map_len));
        if let (Some(rb), Some(ts)) = (&readback, &self.timestamps) {
            encoder.copy_buffer_to_buffer(&ts.resolve, 0, rb, stamps_at, Some(16));
        }
        if let Some(rb) = &readback {
            for (slot, &i) in plan.response_layout.slots().iter().zip(&plan.returned) {
                encoder.copy_buffer_to_buffer(
                    &buffers[i],
                    0,
                    rb,
                    slot.start as u64,
                    Some(plan.lens[i] * 4),
                );
            }
        }

        let gpu_start = Instant::now();
        let submission = self.queue.submit([encoder.finish()]);
        let (map_tx, map_rx) = std::sync::mpsc::sync_channel(1);
        if let Some(rb) = &readback {
            rb.map_async(wgpu::MapMode::Read, 0..map_len, move |r| {
                let _ = map_tx.send(r);
            });
        }
        let polled = device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: Some(self.poll_timeout),
        });
        let gpu = gpu_start.elapsed();
        let scope_error = scope.pop().now_or_never().flatten();

        let read_start = Instant::now();
        let stamps = self
            .timestamps
            .as_ref()
            .map(|ts| (stamps_at, f64::from(ts.period_ns)));
        let result = finish_call(
            scope_error,
            polled,
            readback.as_ref(),
            &map_rx,
            plan,
            map_len,
            stamps,
        );
        let read = read_start.elapsed();
        // After a failure a buffer may still be in use or mapped (a poll
        // that timed out leaves its map pending): never reuse those.
        let reuse = result.is_ok();
        for (kind, b) in readback
            .map(|rb| (PoolKind::Readback, rb))
            .into_iter()
            .chain(buffers.into_iter().map(|b| (PoolKind::Storage, b)))
        {
            if reuse {
                self.pool.release(kind, b);
            } else {
                b.destroy();
            }
        }
        result.map(|(payload, kernel)| Executed {
            payload,
            device: gpu,
            kernel,
            readback: read,
        })
    }
}

/// What one call's execution produced.
struct Executed {
    payload: Payload,
    /// Submission to completion, executor clock.
    device: Duration,
    /// The compute pass alone, from GPU timestamps, where supported.
    kernel: Option<Duration>,
    /// Copying the outputs out of the mapped buffer.
    readback: Duration,
}

/// Checks how a submission went and copies the outputs out of the mapped
/// readback buffer, which is unmapped again whenever it was mapped.
fn finish_call(
    scope_error: Option<wgpu::Error>,
    polled: Result<wgpu::PollStatus, wgpu::PollError>,
    readback: Option<&wgpu::Buffer>,
    map_rx: &std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
    plan: &CallPlan,
    map_len: u64,
    stamps: Option<(u64, f64)>,
) -> Result<(Payload, Option<Duration>), ExecError> {
    let mapped = match map_rx.try_recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ExecError::Gpu(format!("mapping the outputs: {e}"))),
        Err(_) => Err(ExecError::Gpu("the outputs were never mapped".into())),
    };
    let copy = |rb: &wgpu::Buffer| -> Result<(Payload, Option<Duration>), ExecError> {
        let view = rb
            .get_mapped_range(0..map_len)
            .map_err(|e| ExecError::Gpu(format!("reading the outputs: {e}")))?;
        // Copy slot by slot so padding is zero, never a previous call's bytes.
        let mut out = Payload::with_capacity(plan.response_layout.total());
        for slot in plan.response_layout.slots() {
            out.resize(slot.start, 0);
            out.extend_from_slice(&view[slot.clone()]);
        }
        let kernel = stamps.and_then(|(at, period_ns)| {
            let at = at as usize;
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
    };
    let out = match readback {
        None => Ok((Payload::new(), None)),
        Some(rb) => {
            let out = mapped.clone().and_then(|()| copy(rb));
            if mapped.is_ok() {
                rb.unmap();
            }
            out
        }
    };
    if let Some(e) = scope_error {
        return Err(ExecError::Gpu(e.to_string()));
    }
    polled.map_err(|e| ExecError::Gpu(format!("waiting for the GPU: {e}")))?;
    out
}

/// Parses the shipped kernels, then those in `dir` (replacing shipped ones
/// of the same name).
fn load_kernels(dir: Option<&Path>) -> Result<Vec<ParsedKernel>, GpuError> {
    let mut out: Vec<ParsedKernel> = Vec::new();
    for k in quasar_shaders::SHIPPED {
        out.push(KernelInterface::from_wgsl(k.name, k.source)?);
    }
    let Some(dir) = dir else {
        return Ok(out);
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| GpuError::KernelDir { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
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
        let parsed = KernelInterface::from_wgsl(&name, &source)?;
        if let Some(i) = out.iter().position(|k| k.interface.name == name) {
            tracing::warn!(kernel = %name, path = %path.display(), "replacing the shipped kernel");
            out[i] = parsed;
        } else {
            out.push(parsed);
        }
    }
    Ok(out)
}

fn compile(
    device: &wgpu::Device,
    iface: &KernelInterface,
    module: naga::Module,
) -> Result<Compiled, GpuError> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&iface.name),
        source: wgpu::ShaderSource::Naga(Cow::Owned(module)),
    });
    let mut entries: Vec<wgpu::BindGroupLayoutEntry> = iface
        .buffers
        .iter()
        .map(|b| wgpu::BindGroupLayoutEntry {
            binding: b.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: b.role == BufferRole::Input,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let uniform = iface.params.as_ref().map(|p| {
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: p.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(&p.name),
            size: u64::from(p.size.div_ceil(16) * 16),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    });
    let bind_group_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&iface.name),
        entries: &entries,
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&iface.name),
        bind_group_layouts: &[Some(&bind_group_layout)],
        immediate_size: 0,
    });
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
        uniform,
    })
}
