//! The SDK's errors: connecting, calling, and reading outputs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quasar_transport::tls::TlsError;
use quasar_transport::{
    CloseCode, ElemType, FrameError, ReadFrameError, StatusCode, Timings, WireError,
};
use thiserror::Error;

/// Why [`crate::Client::connect`] failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// A PEM file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificates or key are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The local UDP socket could not be bound.
    #[error("binding a local UDP socket: {0}")]
    Bind(#[source] std::io::Error),
    /// The connection could not be started (an invalid server name, say).
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed: refused by the server (no or unknown client
    /// certificate) or by this client (server certificate not trusted or not
    /// valid for the server name).
    #[error("handshake failed: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    /// No handshake within the connect timeout.
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    /// A reconnection's task could not start or stopped before it
    /// finished (no tokio runtime, or the runtime shutting down).
    #[error("the reconnection was interrupted: {0}")]
    Interrupted(String),
}

/// The server's response broke the protocol.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The header archive is invalid.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The response's frame prefix failed its checks: not Quasar's magic,
    /// a protocol version this client does not speak, or a header or
    /// payload over this client's limits.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The status code is not one this client knows (a newer server's,
    /// say); the server's message is kept.
    #[error("unknown status code {code}: {message}")]
    UnknownStatus {
        /// The code as sent.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// Bytes followed the response frame on its stream.
    #[error("{0} bytes after the end of the response")]
    Trailing(usize),
}

/// Why a call failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CallError {
    /// The server refused or failed the call.
    #[error("{code}: {message}")]
    Status {
        /// The status code.
        code: StatusCode,
        /// The server's message.
        message: String,
        /// Where the server spent its time.
        timings: Timings,
    },
    /// The call is not valid before anything is sent (too large, say).
    #[error("invalid call: {0}")]
    InvalidCall(String),
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The request could not be sent.
    #[error("sending the request: {0}")]
    Send(#[source] quinn::WriteError),
    /// The response could not be received.
    #[error("receiving the response: {0}")]
    Receive(#[source] ReadFrameError),
    /// The response broke the protocol.
    #[error("invalid response: {0}")]
    Protocol(#[from] ProtocolError),
    /// The call's deadline passed on the client's clock.
    #[error("no response within the deadline of {0:?}")]
    DeadlineExceeded(Duration),
    /// One attempt took longer than the retry policy's per-try timeout.
    #[error("no response within the per-try timeout of {0:?}")]
    AttemptTimeout(Duration),
    /// The connection was lost and could not be re-established.
    #[error("connection lost ({lost}) and reconnecting failed: {source}")]
    Reconnect {
        /// Why the old connection closed (a server shutdown, say).
        lost: quinn::ConnectionError,
        /// Why the new one could not be made (shared by every call that
        /// was waiting for the same attempt).
        #[source]
        source: Arc<ConnectError>,
    },
}

impl CallError {
    /// The status code that best describes the failure: the server's for
    /// [`CallError::Status`], `UNAVAILABLE` for transport failures.
    pub fn code(&self) -> StatusCode {
        match self {
            Self::Status { code, .. } => *code,
            Self::InvalidCall(_) => StatusCode::InvalidArgument,
            Self::DeadlineExceeded(_) | Self::AttemptTimeout(_) => StatusCode::DeadlineExceeded,
            // The reply is larger than this client accepts.
            Self::Protocol(ProtocolError::Frame(
                FrameError::HeaderTooLarge { .. } | FrameError::PayloadTooLarge { .. },
            )) => StatusCode::ResourceExhausted,
            Self::Protocol(_) => StatusCode::Internal,
            Self::Connection(_) | Self::Send(_) | Self::Receive(_) | Self::Reconnect { .. } => {
                StatusCode::Unavailable
            }
        }
    }

    /// True if trying again may succeed: the connection or stream failed,
    /// the server answered UNAVAILABLE (shutting down, say), or an attempt
    /// timed out. Calls are pure, so retrying them is safe unless a call is
    /// marked otherwise.
    pub fn is_retryable(&self) -> bool {
        match self {
            // This client closed the connection itself: nothing to retry.
            Self::Connection(quinn::ConnectionError::LocallyClosed) => false,
            // The server refused this client's certificate (revoked, say):
            // a new connection with it would be refused the same way.
            Self::Connection(lost) => !refuses_client(lost),
            Self::Reconnect { lost, source } => {
                let refused_again =
                    matches!(source.as_ref(), ConnectError::Handshake(e) if refuses_client(e));
                !(refuses_client(lost) || refused_again)
            }
            Self::AttemptTimeout(_) => true,
            Self::Status { code, .. } => *code == StatusCode::Unavailable,
            // A stream that failed on a live connection (a reply over this
            // client's limits, a reset) would fail the same way again.
            _ => false,
        }
    }

    /// True if the connection or stream failed (or could not be
    /// re-established), as opposed to the server answering with a status.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Connection(_) | Self::Send(_) | Self::Receive(_) | Self::Reconnect { .. }
        )
    }
}

/// True if the server closed the connection because it refuses this
/// client's certificate: after the handshake (a reload revoked it, say),
/// or at it, with a TLS alert about the certificate.
fn refuses_client(lost: &quinn::ConnectionError) -> bool {
    match lost {
        quinn::ConnectionError::ApplicationClosed(close) => {
            CloseCode::from_varint(close.error_code).is_some_and(CloseCode::refuses_client)
        }
        // Sent by the server (this client's own refusals of the server's
        // certificate are local transport errors).
        quinn::ConnectionError::ConnectionClosed(close) => {
            certificate_alert(u64::from(close.error_code))
        }
        _ => false,
    }
}

/// QUIC carries a TLS alert as the crypto error `0x100 + alert`. These
/// alerts refuse the peer's certificate: bad (42), unsupported (43),
/// revoked (44), expired (45), unknown (46), unknown CA (48), required
/// but missing (116).
fn certificate_alert(code: u64) -> bool {
    matches!(code.checked_sub(0x100), Some(42..=46 | 48 | 116))
}

/// Why an output could not be read from a [`crate::Response`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputError {
    /// The response has no output of that name.
    #[error("no output named `{0}`")]
    NotFound(String),
    /// The output holds another element type.
    #[error("output `{name}` holds {actual}, not {requested}")]
    WrongType {
        /// Output name.
        name: String,
        /// Its element type.
        actual: ElemType,
        /// The type asked for.
        requested: ElemType,
    },
    /// The output's bytes cannot be viewed as the element type (a length
    /// that is not a whole number of elements).
    #[error("output `{0}` is not a whole number of elements")]
    Misaligned(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_alerts_are_told_from_other_closes() {
        for alert in [42, 43, 44, 45, 46, 48, 116] {
            assert!(certificate_alert(0x100 + alert), "alert {alert}");
        }
        // handshake_failure, decrypt_error, no_application_protocol.
        for alert in [40, 51, 120] {
            assert!(!certificate_alert(0x100 + alert), "alert {alert}");
        }
        // Not crypto errors: PROTOCOL_VIOLATION, and 44 as a bare code.
        assert!(!certificate_alert(0xa));
        assert!(!certificate_alert(44));
    }
}
