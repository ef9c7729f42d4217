//! The `quasar` command line's library half: an in-process server with a
//! fresh PKI on loopback, used by `quasar demo`, the examples and the
//! integration tests. Everything in it is the real server and client; only
//! the certificates are made on the spot.
//!
//! # Layout
//! - [`bench`](mod@bench): the engine of `quasar bench` (load, statistics, reports, plots).
//! - [`embedded`]: [`embedded::EmbeddedServer`], a server on `127.0.0.1:0`
//!   with a throw-away CA, and client configurations signed by it.
//! - [`samples`]: shipped-kernel samples as SDK calls, and responses back as
//!   host buffers for checking against the CPU reference.

pub mod bench;
pub mod embedded;
pub mod samples;
