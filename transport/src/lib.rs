//! Quasar's wire protocol: everything two peers must agree on, and nothing else.
//!
//! A Quasar call is one bidirectional QUIC stream. The client writes a
//! request frame and finishes its send side; the server answers with one
//! response frame and finishes. See `PROTOCOL.md` beside this crate for the
//! byte layout, written so that another client can be built from it.
//!
//! # Layout
//! - [`frame`]: the fixed 20-byte prefix (magic, version, kind, lengths) and
//!   its checks against [`Limits`], done before anything is allocated.
//! - [`wire`]: the rkyv-archived request and response headers, with checked
//!   access only, plus the payload layout (one aligned slot per buffer).
//! - [`status`]: the closed set of status codes a peer may see, and the QUIC
//!   stream and connection error codes.
//! - [`limits`]: the caps every received length is checked against.
//! - [`tls`]: rustls and quinn configuration for mutual TLS 1.3 with ALPN
//!   `quasar/1`, and PEM loading.
//! - [`io`]: reading and writing whole frames on quinn streams.
//! - [`socket`]: UDP sockets with buffers sized for bulk payloads.
//!
//! This crate holds no GPU code and no handlers: it is shared by the server
//! and the client, which never depend on each other.

pub mod frame;
pub mod io;
pub mod limits;
pub mod socket;
pub mod status;
pub mod tls;
pub mod wire;

pub use frame::{FrameError, FrameKind, PREFIX_LEN, Prefix};
pub use io::{FrameReader, ReadFrameError};
pub use limits::Limits;
pub use status::{CloseCode, StatusCode, StreamCode};
pub use wire::{
    BufferDesc, ECHO_KERNEL, ElemType, NamedScalar, PAYLOAD_ALIGN, Payload, PayloadLayout,
    RequestHeader, ResponseHeader, Scalar, Timings, WireError,
};

/// The protocol version this build speaks; it travels in every frame prefix.
pub const PROTOCOL_VERSION: u16 = 1;

/// The ALPN protocol identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"quasar/1";
