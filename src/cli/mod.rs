//! One module per subcommand.

pub mod bench;
pub mod call;
pub mod certs;
pub mod demo;
pub mod info;
pub mod serve;

use std::time::Duration;

/// The flag of the commands that run kernels on the local adapter.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct LavapipeArgs {
    /// Threads lavapipe (Mesa's software Vulkan) runs compute shaders on;
    /// 0 runs every dispatch on its queue thread. Sets Mesa's
    /// `LP_NUM_THREADS` for this process (without it: the environment's
    /// value, else one thread per CPU). Handing each dispatch to the
    /// threads costs more than a small kernel's work on a 2-vCPU host,
    /// so 0 suits many small calls and the default large kernels
    /// (BENCHMARKS.md, "lavapipe's compute threads"). No effect on GPUs.
    #[arg(long, value_name = "N")]
    pub lavapipe_threads: Option<u32>,
}

/// Formats a duration in microseconds with a unit that reads well.
pub fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

/// Microseconds in a duration, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
