//! Reading and writing whole frames on quinn streams.
//!
//! Reading is split in steps (prefix, header, payload) so that the caller can
//! make decisions between them: the server checks its memory budget after
//! the prefix and before it allocates the payload.

use quinn::{ReadExactError, RecvStream, SendStream, WriteError};
use thiserror::Error;

use crate::Limits;
use crate::frame::{FrameError, FrameKind, PREFIX_LEN, Prefix};
use crate::wire::{PAYLOAD_ALIGN, Payload, align_up};

/// Why a frame could not be read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReadFrameError {
    /// The prefix failed its checks.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended before the frame did.
    #[error("stream ended after {read} of {expected} bytes of the {part}")]
    Truncated {
        /// Which part of the frame was being read.
        part: &'static str,
        /// Bytes read of that part.
        read: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The connection was lost (closed by the peer, a refused handshake,
    /// an idle timeout), with the connection's own reason.
    #[error("connection lost while reading the {part}: {source}")]
    ConnectionLost {
        /// Which part of the frame was being read.
        part: &'static str,
        /// Why the connection closed.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The stream failed (reset or stopped by the peer).
    #[error("reading the {part}: {source}")]
    Read {
        /// Which part of the frame was being read.
        part: &'static str,
        /// The stream error.
        #[source]
        source: quinn::ReadError,
    },
    /// A declared length does not fit in this machine's address space.
    #[error("declared length {len} does not fit in memory")]
    TooLarge {
        /// The declared length.
        len: u64,
    },
}

/// Reads and checks a frame prefix.
///
/// # Errors
/// [`ReadFrameError`] on a stream failure, a short stream or a bad prefix.
pub async fn read_prefix(
    recv: &mut RecvStream,
    kind: FrameKind,
    limits: &Limits,
) -> Result<Prefix, ReadFrameError> {
    let mut bytes = [0u8; PREFIX_LEN];
    read_exact(recv, &mut bytes, "prefix").await?;
    Ok(Prefix::decode(&bytes, kind, limits)?)
}

/// Reads exactly `len` bytes into a fresh aligned buffer.
///
/// The caller must have checked `len` against its limits: this allocates it.
///
/// # Errors
/// [`ReadFrameError`] on a stream failure or a short stream.
pub async fn read_aligned(
    recv: &mut RecvStream,
    len: u64,
    part: &'static str,
) -> Result<Payload, ReadFrameError> {
    let len = usize::try_from(len).map_err(|_| ReadFrameError::TooLarge { len })?;
    let mut buf = Payload::with_capacity(len);
    buf.resize(len, 0);
    read_exact(recv, &mut buf, part).await?;
    Ok(buf)
}

/// Reads a prefix and the header archive that follows it.
///
/// # Errors
/// As [`read_prefix`] and [`read_aligned`].
pub async fn read_frame(
    recv: &mut RecvStream,
    kind: FrameKind,
    limits: &Limits,
) -> Result<(Prefix, Payload), ReadFrameError> {
    let prefix = read_prefix(recv, kind, limits).await?;
    let header = read_aligned(recv, u64::from(prefix.header_len), "header").await?;
    Ok((prefix, header))
}

async fn read_exact(
    recv: &mut RecvStream,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), ReadFrameError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(read) => ReadFrameError::Truncated {
            part,
            read,
            expected: buf.len(),
        },
        ReadExactError::ReadError(quinn::ReadError::ConnectionLost(source)) => {
            ReadFrameError::ConnectionLost { part, source }
        }
        ReadExactError::ReadError(source) => ReadFrameError::Read { part, source },
    })
}

/// The payload length of `buffers` laid out with [`PAYLOAD_ALIGN`] padding.
pub fn padded_len<B: AsRef<[u8]>>(buffers: &[B]) -> u64 {
    let mut end = 0usize;
    for b in buffers {
        end = align_up(end)
            .unwrap_or(usize::MAX)
            .saturating_add(b.as_ref().len());
    }
    end as u64
}

/// Writes a whole frame: prefix, header archive, then each buffer at the next
/// multiple of [`PAYLOAD_ALIGN`]. Does not finish the stream.
///
/// # Errors
/// The stream's [`WriteError`].
pub async fn write_frame<B: AsRef<[u8]>>(
    send: &mut SendStream,
    kind: FrameKind,
    header: &[u8],
    buffers: &[B],
) -> Result<(), WriteError> {
    let header_len = u32::try_from(header.len()).unwrap_or(u32::MAX);
    let prefix = Prefix {
        kind,
        header_len,
        payload_len: padded_len(buffers),
    };
    // One write for the small parts so they leave in one packet.
    let mut head = Vec::with_capacity(PREFIX_LEN + header.len());
    head.extend_from_slice(&prefix.encode());
    head.extend_from_slice(header);
    send.write_all(&head).await?;
    const ZEROS: [u8; PAYLOAD_ALIGN] = [0; PAYLOAD_ALIGN];
    let mut offset = 0usize;
    for b in buffers {
        let b = b.as_ref();
        let pad = align_up(offset).unwrap_or(offset) - offset;
        if pad > 0 {
            send.write_all(&ZEROS[..pad]).await?;
        }
        send.write_all(b).await?;
        offset += pad + b.len();
    }
    Ok(())
}
