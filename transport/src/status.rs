//! Status codes a peer sees, and the numeric codes used to reset streams and
//! close connections.
//!
//! Status codes follow gRPC's numbering where the meaning is the same, so
//! operators can read them at a glance.

use std::fmt;

/// The outcome of a call, from a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum StatusCode {
    /// The call ran and its outputs follow.
    Ok = 0,
    /// The call was cancelled before it completed.
    Cancelled = 1,
    /// The request is malformed or does not match the kernel's interface.
    InvalidArgument = 3,
    /// The call's deadline passed before it could complete.
    DeadlineExceeded = 4,
    /// No kernel of that name is loaded.
    NotFound = 5,
    /// The client's identity may not call this kernel.
    PermissionDenied = 7,
    /// A queue, memory budget or limit is full; retry later or send less.
    ResourceExhausted = 8,
    /// The server failed while running the call.
    Internal = 13,
    /// The server cannot take the call now (shutting down, device lost).
    Unavailable = 14,
}

impl StatusCode {
    /// Every code, in numeric order.
    pub const ALL: [StatusCode; 9] = [
        Self::Ok,
        Self::Cancelled,
        Self::InvalidArgument,
        Self::DeadlineExceeded,
        Self::NotFound,
        Self::PermissionDenied,
        Self::ResourceExhausted,
        Self::Internal,
        Self::Unavailable,
    ];

    /// The code's number on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number read off the wire, if it is one we know.
    pub fn from_u16(value: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_u16() == value)
    }

    /// The code's name, as written in `PROTOCOL.md`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Application error codes carried by QUIC `RESET_STREAM` and `STOP_SENDING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum StreamCode {
    /// The server answered with an error reply and reads no more of the
    /// request (sent as `STOP_SENDING`).
    RequestRejected = 0x1,
    /// The client gave up on the call (its future was dropped or timed out).
    Cancelled = 0x2,
    /// The request was not received in full within the server's read timeout.
    RequestTimeout = 0x3,
    /// The server could not write a reply at all.
    Internal = 0x4,
    /// The client did not read the reply within the server's timeout.
    ResponseTimeout = 0x5,
}

impl StreamCode {
    /// The code as a QUIC variable-length integer.
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }
}

/// Application error codes carried by QUIC `CONNECTION_CLOSE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// The client closed its connection normally.
    ClientDone = 0x0,
    /// The server is shutting down.
    ServerShutdown = 0x1,
    /// The client's certificate passed verification but names no identity
    /// the server could read (no parsable SAN or common name).
    Unidentified = 0x2,
    /// The client's certificate was accepted at the handshake but no longer
    /// is: a reload of the server's client CA or CRLs revoked it or left
    /// its issuer out, or it has expired since. The reason says which.
    CertificateRefused = 0x3,
}

impl CloseCode {
    /// Every code, in numeric order.
    pub const ALL: [Self; 4] = [
        Self::ClientDone,
        Self::ServerShutdown,
        Self::Unidentified,
        Self::CertificateRefused,
    ];

    /// The code as a QUIC variable-length integer.
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }

    /// The code a peer closed with, if it is one of these.
    pub fn from_varint(code: quinn::VarInt) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.varint() == code)
    }

    /// True if the server refused this client's certificate: reconnecting
    /// with the same one would be refused again.
    pub fn refuses_client(self) -> bool {
        matches!(self, Self::Unidentified | Self::CertificateRefused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_is_none() {
        for code in StatusCode::ALL {
            assert_eq!(StatusCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(StatusCode::from_u16(2), None);
        assert_eq!(StatusCode::from_u16(u16::MAX), None);
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_varint(code.varint()), Some(code));
        }
        assert_eq!(CloseCode::from_varint(quinn::VarInt::from_u32(4)), None);
    }
}
