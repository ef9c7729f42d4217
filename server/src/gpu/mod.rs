//! The GPU side of the server: choosing an adapter, compiling kernels, and
//! the executor thread that runs calls.
//!
//! # Layout
//! - this file: adapter discovery and choice ([`list_adapters`],
//!   [`AdapterSummary`]), shared by `quasar info` and the executor.
//! - [`executor`]: the one thread that owns the device, queue, pipelines and
//!   buffer pool; async handlers reach it over a bounded channel.
//! - [`pool`]: buffer reuse by size class.
//! - [`sched`]: the bounded queue between handlers and the executor, taking
//!   connections in turn.
//!
//! Everything here that blocks (adapter requests, `device.poll`) runs on the
//! executor thread or a caller's blocking thread, never on the async runtime.

pub mod executor;
pub mod pool;
pub mod sched;

use std::fmt;

use thiserror::Error;

use crate::kernel::KernelError;

/// What the server tells about the adapter it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Backend: Vulkan, Metal, Dx12, Gl.
    pub backend: String,
    /// Device type: DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu, Other.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// True for a software rasterizer such as lavapipe.
    pub is_cpu: bool,
    /// On lavapipe, the threads it runs compute shaders on; `None` on
    /// any other adapter.
    pub lavapipe_threads: Option<LavapipeThreads>,
}

/// How many threads lavapipe (Mesa's llvmpipe under Vulkan) runs compute
/// dispatches on: Mesa reads `LP_NUM_THREADS` once, when the adapter is
/// enumerated, and starts that many pool threads.
///
/// The choice is a trade the server cannot make per call: each dispatch
/// on the pool is handed to its threads and waited for (a wake-up and a
/// sleep on each side), which on a 2-vCPU VM costs more than a small
/// kernel's own work, while 0 threads runs every dispatch on lavapipe's
/// queue thread and so a large kernel on one CPU (BENCHMARKS.md,
/// "lavapipe's compute threads"). `quasar serve --lavapipe-threads N`
/// (and `bench`, `demo`, `info`) sets it;
/// a program embedding the server sets `LP_NUM_THREADS` in the
/// environment it starts with (changing a running process's environment
/// races with C code reading it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LavapipeThreads {
    /// `LP_NUM_THREADS` unset: Mesa's default, one per CPU (none on a
    /// single CPU).
    MesaDefault,
    /// `LP_NUM_THREADS` set to this (Mesa caps it at its own maximum).
    Set(u32),
}

impl LavapipeThreads {
    /// What this process's environment asks of lavapipe. Mesa reads the
    /// same variable, so this is what an adapter enumerated now uses.
    pub fn from_env() -> Self {
        match std::env::var("LP_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            Some(n) => Self::Set(n),
            None => Self::MesaDefault,
        }
    }
}

impl fmt::Display for LavapipeThreads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MesaDefault => f.write_str("compute threads: one per CPU (Mesa's default)"),
            Self::Set(0) => {
                f.write_str("compute threads: 0, on the queue thread (LP_NUM_THREADS=0)")
            }
            Self::Set(n) => write!(f, "compute threads: {n} (LP_NUM_THREADS)"),
        }
    }
}

impl AdapterSummary {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        let driver = if info.driver_info.is_empty() {
            info.driver.clone()
        } else {
            format!("{} {}", info.driver, info.driver_info)
        };
        Self {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver,
            is_cpu: info.device_type == wgpu::DeviceType::Cpu,
            lavapipe_threads: (info.driver == "llvmpipe").then(LavapipeThreads::from_env),
        }
    }
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {}",
            self.name, self.backend, self.device_type, self.driver
        )?;
        if let Some(threads) = self.lavapipe_threads {
            write!(f, "; {threads}")?;
        }
        f.write_str(")")
    }
}

/// An adapter and the limits it offers, for `quasar info`.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    /// Who it is.
    pub summary: AdapterSummary,
    /// What it allows.
    pub limits: wgpu::Limits,
}

/// Why the GPU side could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No adapter matched.
    #[error(
        "no GPU adapter found{filter}; install a Vulkan driver (for a CPU-only host: `apt-get install libvulkan1 mesa-vulkan-drivers`) and check WGPU_BACKEND"
    )]
    NoAdapter {
        /// The name filter that was applied, if any, for the message.
        filter: String,
    },
    /// The adapter refused to create a device.
    #[error("creating the device on {adapter}: {source}")]
    RequestDevice {
        /// The adapter.
        adapter: String,
        /// wgpu's error.
        #[source]
        source: wgpu::RequestDeviceError,
    },
    /// A kernel failed to load.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A kernel's pipeline failed to compile on this device.
    #[error("kernel `{kernel}`: pipeline creation failed: {message}")]
    Pipeline {
        /// Kernel name.
        kernel: String,
        /// wgpu's message.
        message: String,
    },
    /// The kernel directory could not be read.
    #[error("kernel directory {path}: {source}")]
    KernelDir {
        /// The directory or file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The executor thread could not be started, died during start-up,
    /// or has stopped.
    #[error("GPU executor thread: {0}")]
    Thread(String),
    /// Loading kernels panicked (inside the driver's shader compiler,
    /// say); the kernels in service before the reload stay in service.
    #[error(
        "the GPU executor panicked loading the kernels ({0}); the previous kernels stay in service"
    )]
    ReloadPanicked(String),
}

fn instance() -> wgpu::Instance {
    // Honour WGPU_BACKEND and friends, so operators can pin a backend.
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Every adapter wgpu sees, best first. Blocks: call from a blocking thread.
pub fn list_adapters() -> Vec<AdapterReport> {
    let mut adapters = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    adapters
        .iter()
        .map(|a| AdapterReport {
            summary: AdapterSummary::from_info(&a.get_info()),
            limits: a.limits(),
        })
        .collect()
}

/// Picks the best adapter: a discrete GPU if there is one, else any, lavapipe
/// included; with `filter`, only adapters whose name contains it
/// (case-insensitive). Blocks: call from a blocking thread.
pub(crate) fn choose_adapter(filter: Option<&str>) -> Result<wgpu::Adapter, GpuError> {
    let instance = instance();
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    if let Some(f) = filter {
        let f = f.to_lowercase();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&f));
    }
    // Only compute-capable backends: GL lacks storage buffers in compute on
    // some drivers, and every platform we target has Vulkan, Metal or DX12.
    adapters.retain(|a| a.get_info().backend != wgpu::Backend::Gl);
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    adapters
        .into_iter()
        .next()
        .ok_or_else(|| GpuError::NoAdapter {
            filter: filter
                .map(|f| format!(" matching `{f}`"))
                .unwrap_or_default(),
        })
}
