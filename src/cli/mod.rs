//! One module per subcommand.

pub mod bench;
pub mod call;
pub mod certs;
pub mod demo;
pub mod info;
pub mod serve;

use std::time::Duration;

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
