//! Reuse of GPU buffers between calls.
//!
//! Buffers are kept by size class (the next power of two, at least 256
//! bytes), so a steady stream of similar calls allocates nothing after the
//! first few. A buffer is bound with the call's exact byte size, so WGSL's
//! `arrayLength` is exact whatever the class. The pool keeps at most
//! `max_cached_bytes` of idle buffers and frees the rest.
//!
//! Reused buffers hold a previous call's data: the executor overwrites every
//! byte it binds (inputs are written, outputs and scratch are cleared) and
//! zeroes response padding, so nothing leaks from one call to another.
//!
//! [`PoolKind::Upload`] buffers, where a batch's inputs wait for the GPU to
//! copy them, are created mapped and are only released mapped again (the
//! executor maps them as soon as their batch is submitted, and the wait for
//! the batch completes the map), so an acquired one can be written at once.

use std::collections::HashMap;

/// What a pooled buffer is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// Storage buffers bound to kernels.
    Storage,
    /// Mappable buffers outputs are copied into for reading back.
    Readback,
    /// A call's uniform block (its scalar arguments).
    Uniform,
    /// Staging memory a batch's inputs are written into, mapped for
    /// writing whenever it is in the pool.
    Upload,
}

impl PoolKind {
    fn usage(self) -> wgpu::BufferUsages {
        match self {
            Self::Storage => {
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC
            }
            Self::Readback => wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            Self::Uniform => wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            Self::Upload => wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Storage => "quasar storage",
            Self::Readback => "quasar readback",
            Self::Uniform => "quasar uniform",
            Self::Upload => "quasar upload",
        }
    }
}

/// Counters that show whether the steady state allocates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers created since start-up.
    pub created: u64,
    /// Acquisitions served from the pool.
    pub reused: u64,
    /// Idle bytes currently held.
    pub cached_bytes: u64,
}

/// A size-classed pool of buffers, owned by the GPU thread.
#[derive(Debug)]
pub struct BufferPool {
    free: HashMap<(PoolKind, u64), Vec<wgpu::Buffer>>,
    max_buffer_size: u64,
    max_cached_bytes: u64,
    stats: PoolStats,
}

impl BufferPool {
    /// A pool that keeps at most `max_cached_bytes` of idle buffers.
    pub fn new(max_buffer_size: u64, max_cached_bytes: u64) -> Self {
        Self {
            free: HashMap::new(),
            max_buffer_size,
            max_cached_bytes,
            stats: PoolStats::default(),
        }
    }

    fn class(&self, bytes: u64) -> u64 {
        let pow2 = bytes.max(256).checked_next_power_of_two().unwrap_or(bytes);
        // Near the device limit, round to the exact size instead.
        if pow2 > self.max_buffer_size {
            bytes.div_ceil(4) * 4
        } else {
            pow2
        }
    }

    /// A buffer of at least `bytes` bytes ([`PoolKind::Upload`] ones
    /// mapped for writing).
    pub fn acquire(&mut self, device: &wgpu::Device, kind: PoolKind, bytes: u64) -> wgpu::Buffer {
        let class = self.class(bytes);
        if let Some(buf) = self.free.get_mut(&(kind, class)).and_then(Vec::pop) {
            self.stats.reused += 1;
            self.stats.cached_bytes -= class;
            return buf;
        }
        self.stats.created += 1;
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(kind.label()),
            size: class,
            usage: kind.usage(),
            mapped_at_creation: kind == PoolKind::Upload,
        })
    }

    /// Returns a buffer to the pool, or frees it if the pool is full. An
    /// [`PoolKind::Upload`] buffer must be mapped for writing.
    pub fn release(&mut self, kind: PoolKind, buf: wgpu::Buffer) {
        let class = buf.size();
        if self.stats.cached_bytes + class > self.max_cached_bytes {
            buf.destroy();
            return;
        }
        self.stats.cached_bytes += class;
        self.free.entry((kind, class)).or_default().push(buf);
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }
}
