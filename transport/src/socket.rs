//! UDP sockets for QUIC endpoints, with buffers sized for bulk payloads.
//!
//! Linux's default socket buffers (208 KiB here) overflow as soon as a call
//! carries a few hundred KiB: the kernel drops datagrams, QUIC recovers them
//! after a loss-detection delay, and the call's latency jumps by tens of
//! milliseconds (seen as 30-100 ms p99 spikes on 256 KiB-1 MiB calls before
//! this existed). We ask for [`DEFAULT_BUFFER`]; the kernel grants at most
//! `net.core.rmem_max` / `wmem_max`, and [`SocketBuffers`] says what we got
//! so the server can log it.

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size requested: 4 MiB, a common `rmem_max`, which holds a
/// full 32 MiB-window burst's worth of in-flight datagrams between reads.
pub const DEFAULT_BUFFER: usize = 4 * 1024 * 1024;

/// The buffer sizes the kernel actually granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// Receive buffer, bytes.
    pub recv: usize,
    /// Send buffer, bytes.
    pub send: usize,
}

/// Binds a UDP socket to `addr` and asks for `buffer` bytes of send and
/// receive buffer. A smaller grant is not an error: QUIC still works, with
/// more loss under load.
///
/// # Errors
/// The socket's I/O error if it cannot be created or bound.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<(UdpSocket, SocketBuffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4 too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    let granted = SocketBuffers {
        recv: socket.recv_buffer_size().unwrap_or(0),
        send: socket.send_buffer_size().unwrap_or(0),
    };
    Ok((socket.into(), granted))
}
