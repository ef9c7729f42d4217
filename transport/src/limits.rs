//! Caps on every length a peer may declare.
//!
//! Both sides check the prefix against these before allocating, so a hostile
//! peer can make us allocate at most `max_header_len + max_payload_len` per
//! stream; the server additionally bounds how many streams and bytes are in
//! flight at once.

/// Caps on declared lengths; see `PROTOCOL.md` for the defaults and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest archived header accepted, in bytes.
    pub max_header_len: u32,
    /// Largest payload accepted, in bytes.
    pub max_payload_len: u64,
    /// Most buffers one call may carry.
    pub max_buffers: usize,
    /// Most scalar arguments one call may carry.
    pub max_args: usize,
}

impl Limits {
    /// 64 KiB of header is far above any real call (a call with 16 buffers and
    /// 32 args archives to well under 2 KiB). Readers allocate at most 4 KiB
    /// of it before its bytes arrive, and grow the buffer as they do.
    pub const DEFAULT_MAX_HEADER_LEN: u32 = 64 * 1024;
    /// 256 MiB holds the largest shipped workloads (a 2^24-element scan is
    /// 64 MiB each way) with room to spare.
    pub const DEFAULT_MAX_PAYLOAD_LEN: u64 = 256 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_len: Self::DEFAULT_MAX_HEADER_LEN,
            max_payload_len: Self::DEFAULT_MAX_PAYLOAD_LEN,
            max_buffers: 16,
            max_args: 32,
        }
    }
}
