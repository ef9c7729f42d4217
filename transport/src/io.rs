//! Reading and writing whole frames on quinn streams.
//!
//! Reading is split in steps (prefix, header, payload) so that the caller can
//! make decisions between them: the server checks its memory budget after
//! the prefix and before it allocates the payload.

use std::ops::Range;

use bytes::Bytes;
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

/// A payload as the QUIC stack delivered it: the decrypted chunks of the
/// stream, kept without copying them into one buffer. A receiver that only
/// forwards the bytes (into GPU staging memory, or back out as an echo)
/// copies each byte once, from here to its destination.
#[derive(Debug, Clone, Default)]
pub struct ChunkedPayload {
    chunks: Vec<Bytes>,
    len: usize,
}

impl ChunkedPayload {
    /// A payload of one buffer (for in-process callers).
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            len: bytes.len(),
            chunks: if bytes.is_empty() {
                Vec::new()
            } else {
                vec![bytes]
            },
        }
    }

    /// A payload of these chunks, in order.
    pub fn from_chunks(chunks: Vec<Bytes>) -> Self {
        Self {
            len: chunks.iter().map(Bytes::len).sum(),
            chunks,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunks, in stream order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Calls `f(offset, bytes)` for each piece of `range`, in order, where
    /// `offset` is the piece's position within the range; false (and no
    /// call) if the range is out of bounds.
    pub fn for_each_piece(&self, range: Range<usize>, mut f: impl FnMut(usize, &[u8])) -> bool {
        if range.end > self.len || range.start > range.end {
            return false;
        }
        let mut at = 0usize;
        for c in &self.chunks {
            let (start, end) = (at, at + c.len());
            at = end;
            if end <= range.start {
                continue;
            }
            if start >= range.end {
                break;
            }
            let from = range.start.max(start) - start;
            let to = range.end.min(end) - start;
            f(start + from - range.start, &c[from..to]);
        }
        true
    }

    /// Copies the bytes in `range` into `dst` (of the range's length);
    /// false if the range is out of bounds or `dst` has another length.
    pub fn copy_range_to(&self, range: Range<usize>, dst: &mut [u8]) -> bool {
        if dst.len() != range.len() {
            return false;
        }
        self.for_each_piece(range, |at, piece| {
            dst[at..at + piece.len()].copy_from_slice(piece);
        })
    }
}

/// Reads exactly `len` payload bytes as the chunks QUIC delivers, without
/// copying them.
///
/// The caller must have checked `len` against its limits.
///
/// # Errors
/// [`ReadFrameError`] on a stream failure or a short stream.
pub async fn read_chunked(
    recv: &mut RecvStream,
    len: u64,
    part: &'static str,
) -> Result<ChunkedPayload, ReadFrameError> {
    let len = usize::try_from(len).map_err(|_| ReadFrameError::TooLarge { len })?;
    let mut chunks = Vec::new();
    let mut read = 0usize;
    while read < len {
        let chunk = recv
            .read_chunk(len - read, true)
            .await
            .map_err(|e| read_error(part, e))?;
        let Some(chunk) = chunk else {
            return Err(ReadFrameError::Truncated {
                part,
                read,
                expected: len,
            });
        };
        read += chunk.bytes.len();
        chunks.push(chunk.bytes);
    }
    Ok(ChunkedPayload { chunks, len })
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
        ReadExactError::ReadError(e) => read_error(part, e),
    })
}

/// A lost connection is reported as such (callers tell it from a stream
/// error), any other read error with the part being read.
fn read_error(part: &'static str, e: quinn::ReadError) -> ReadFrameError {
    match e {
        quinn::ReadError::ConnectionLost(source) => ReadFrameError::ConnectionLost { part, source },
        source => ReadFrameError::Read { part, source },
    }
}

/// Writes a whole frame whose payload is already laid out, handing the
/// payload's chunks to QUIC without copying them (the prefix and header go
/// first, in one small buffer). Does not finish the stream.
///
/// # Errors
/// The stream's [`WriteError`].
pub async fn write_frame_chunks(
    send: &mut SendStream,
    kind: FrameKind,
    header: &[u8],
    payload: &[Bytes],
) -> Result<(), WriteError> {
    let payload_len: usize = payload.iter().map(Bytes::len).sum();
    let prefix = Prefix {
        kind,
        header_len: u32::try_from(header.len()).unwrap_or(u32::MAX),
        payload_len: payload_len as u64,
    };
    let mut head = Vec::with_capacity(PREFIX_LEN + header.len());
    head.extend_from_slice(&prefix.encode());
    head.extend_from_slice(header);
    let mut parts = Vec::with_capacity(1 + payload.len());
    parts.push(Bytes::from(head));
    parts.extend(payload.iter().filter(|b| !b.is_empty()).cloned());
    send.write_all_chunks(&mut parts).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_copied_across_chunk_boundaries() {
        let data: Vec<u8> = (0..=255).collect();
        let chunks = ChunkedPayload {
            chunks: vec![
                Bytes::copy_from_slice(&data[..10]),
                Bytes::copy_from_slice(&data[10..11]),
                Bytes::copy_from_slice(&data[11..200]),
                Bytes::copy_from_slice(&data[200..]),
            ],
            len: data.len(),
        };
        for (start, end) in [
            (0, 256),
            (0, 10),
            (5, 15),
            (10, 11),
            (9, 201),
            (255, 256),
            (7, 7),
        ] {
            let mut dst = vec![0u8; end - start];
            assert!(chunks.copy_range_to(start..end, &mut dst), "{start}..{end}");
            assert_eq!(dst, &data[start..end], "{start}..{end}");
        }
        let mut dst = vec![0u8; 2];
        assert!(!chunks.copy_range_to(255..257, &mut dst), "out of bounds");
        assert!(!chunks.copy_range_to(0..3, &mut dst), "wrong length");
    }
}
