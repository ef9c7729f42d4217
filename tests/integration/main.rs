//! Integration tests over real loopback QUIC with real mutual TLS, running
//! real shaders on whatever adapter the machine has (lavapipe in CI). One
//! test binary, one module per area.
//!
//! There is no skip path: a machine without a GPU adapter fails these tests
//! with the server's own message saying what to install.

#![allow(clippy::expect_used, clippy::unwrap_used)] // Tests fail loudly by design.

mod access;
mod bench;
mod cli;
mod concurrency;
mod connections;
mod deadlines;
mod echo;
mod fairness;
mod faults;
mod hostile_server;
mod kernels;
mod limits;
mod malformed;
mod pieces;
mod reload;
mod replies;
mod restart;
mod soak;
mod support;
mod tls;
