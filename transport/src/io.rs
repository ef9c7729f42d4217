//! Reading and writing whole frames on quinn streams.
//!
//! A [`FrameReader`] reads a frame in steps (prefix and header, then the
//! payload, then the end of the stream) so that the caller can make
//! decisions between them: the server checks its memory budget after the
//! header and before it takes the payload. Each step uses what earlier
//! reads of the stream brought in before reading again.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream, WriteError};
use thiserror::Error;

use crate::Limits;
use crate::frame::{FrameError, FrameKind, PREFIX_LEN, Prefix};
use crate::wire::Payload;

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
    /// The part fell behind its [`Pace`]: these bytes had not arrived by
    /// the time the next was due.
    #[error("the {part} fell behind: {read} of {expected} bytes had arrived when more were due")]
    Behind {
        /// Which part of the frame was being read.
        part: &'static str,
        /// Bytes read of that part.
        read: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Bytes followed the frame on its stream (a stream carries one frame).
    #[error("{len} bytes after the end of the frame")]
    Trailing {
        /// Bytes seen after the frame (at least this many were sent).
        len: usize,
    },
}

/// Pieces of a payload shorter than this are copied by
/// [`FrameReader::chunked`] (and [`FrameReader::chunked_paced`]) rather
/// than kept as they arrived.
///
/// A kept piece is a slice of the buffer quinn decrypted its datagram in,
/// and keeps that whole buffer alive: the datagram, or with GRO the whole
/// batch of up to 64 datagrams received with it (quinn 0.11 copies a batch
/// into one buffer). A peer sending a payload a byte per packet would
/// otherwise make the receiver hold thousands of times the payload's
/// length, which budgets count by its length. A kept piece of at least this
/// size in a datagram of its own holds at most about
/// [`crate::tls::MAX_UDP_PAYLOAD`] / this, six times its length; a peer
/// that shapes GRO batches can still make one hold its batch, about 64
/// times that. A full packet carries more than this even at QUIC's
/// smallest datagram (1200 bytes), so bulk data is not copied; the short
/// pieces that are copied are tails and stragglers.
pub const GATHER_BELOW: usize = 1024;

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

    /// The chunks, in stream order, taken out of the payload.
    pub fn into_chunks(self) -> Vec<Bytes> {
        self.chunks
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

/// Reads one frame from a stream, taking whatever the QUIC stack has
/// received at each read.
///
/// Every read of a quinn stream locks its connection, which the
/// connection's driver holds while it processes packets. Reading a small
/// frame part by part (prefix, header, payload, end of stream) took four
/// such locks per call where a frame that arrived in one packet needs one;
/// what a read brings in beyond the current part is kept for the next.
#[derive(Debug)]
pub struct FrameReader<'a> {
    recv: &'a mut RecvStream,
    /// Received bytes not yet consumed.
    buffered: Bytes,
}

impl<'a> FrameReader<'a> {
    /// A reader at the start of `recv`.
    pub fn new(recv: &'a mut RecvStream) -> Self {
        Self {
            recv,
            buffered: Bytes::new(),
        }
    }

    /// Makes sure received bytes are buffered, reading the stream if none
    /// are. `read` of the `expected` bytes of `part` are in so far: the
    /// error says so if the stream ends first.
    async fn buffer(
        &mut self,
        part: &'static str,
        read: usize,
        expected: usize,
    ) -> Result<(), ReadFrameError> {
        while self.buffered.is_empty() {
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.buffered = chunk.bytes,
                Ok(None) => {
                    return Err(ReadFrameError::Truncated {
                        part,
                        read,
                        expected,
                    });
                }
                Err(e) => return Err(read_error(part, e)),
            }
        }
        Ok(())
    }

    /// Takes the next `len` bytes of `part` as they arrive, handing each
    /// piece to `take`.
    async fn take(
        &mut self,
        len: usize,
        part: &'static str,
        mut take: impl FnMut(&[u8]),
    ) -> Result<(), ReadFrameError> {
        let mut at = 0;
        while at < len {
            self.buffer(part, at, len).await?;
            let n = (len - at).min(self.buffered.len());
            take(&self.buffered[..n]);
            self.buffered.advance(n);
            at += n;
        }
        Ok(())
    }

    /// Reads and checks the frame's prefix, then its header archive (of the
    /// length the prefix declared, which [`Prefix::decode`] has checked
    /// against `limits`) into an aligned buffer grown as its bytes arrive.
    ///
    /// # Errors
    /// [`ReadFrameError`] on a stream failure, a short stream or a bad
    /// prefix.
    pub async fn head(
        &mut self,
        kind: FrameKind,
        limits: &Limits,
    ) -> Result<(Prefix, Payload), ReadFrameError> {
        let mut bytes = [0u8; PREFIX_LEN];
        let mut at = 0;
        self.take(PREFIX_LEN, "prefix", |piece| {
            bytes[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        })
        .await?;
        let prefix = Prefix::decode(&bytes, kind, limits)?;
        let len = prefix.header_len as usize;
        // Grown as the bytes arrive, from a size that holds any real
        // header: a peer that declares the largest header allowed on every
        // stream and sends little of it gets little memory for it.
        let mut header = Payload::with_capacity(header_start(len));
        self.take(len, "header", |piece| header.extend_from_slice(piece))
            .await?;
        Ok((prefix, header))
    }

    /// Reads exactly `len` bytes into a fresh aligned buffer.
    ///
    /// The caller must have checked `len` against its limits: this
    /// allocates it.
    ///
    /// # Errors
    /// [`ReadFrameError`] on a stream failure or a short stream.
    pub async fn aligned(
        &mut self,
        len: u64,
        part: &'static str,
    ) -> Result<Payload, ReadFrameError> {
        let len = usize::try_from(len).map_err(|_| ReadFrameError::TooLarge { len })?;
        // Filled by appending, not zeroed first: zeroing a 1 MiB reply
        // before copying into it was a percent of the client's time.
        let mut buf = Payload::with_capacity(len);
        self.take(len, part, |piece| buf.extend_from_slice(piece))
            .await?;
        Ok(buf)
    }

    /// Reads exactly `len` bytes as the chunks QUIC delivered, without
    /// copying them, except pieces shorter than [`GATHER_BELOW`] of a
    /// payload that arrives in more than one piece: those are copied, in
    /// order, into buffers of their own.
    ///
    /// The caller must have checked `len` against its limits.
    ///
    /// # Errors
    /// [`ReadFrameError`] on a stream failure or a short stream.
    pub async fn chunked(
        &mut self,
        len: u64,
        part: &'static str,
    ) -> Result<ChunkedPayload, ReadFrameError> {
        let mut out = Gather::new(len)?;
        while out.read < out.len {
            self.buffer(part, out.read, out.len).await?;
            out.take(&mut self.buffered);
        }
        Ok(out.finish())
    }

    /// As [`chunked`](Self::chunked), failing with
    /// [`ReadFrameError::Behind`] as soon as the bytes fall behind `pace`.
    ///
    /// # Errors
    /// As [`chunked`](Self::chunked), and [`ReadFrameError::Behind`].
    pub async fn chunked_paced(
        &mut self,
        len: u64,
        part: &'static str,
        pace: Pace,
    ) -> Result<ChunkedPayload, ReadFrameError> {
        use futures_util::FutureExt;
        let mut out = Gather::new(len)?;
        // No timer while the bytes are there already: the usual case, a
        // payload that arrived with its header.
        while out.read < out.len {
            match self.buffer(part, out.read, out.len).now_or_never() {
                Some(filled) => {
                    filled?;
                    out.take(&mut self.buffered);
                }
                None => break,
            }
        }
        if out.read == out.len {
            return Ok(out.finish());
        }
        // Then one timer for the rest, moved on only when it fires: a part
        // that keeps its pace costs no timer per piece.
        let mut behind = std::pin::pin!(tokio::time::sleep_until(pace.due(out.read)));
        while out.read < out.len {
            loop {
                tokio::select! {
                    biased;
                    filled = self.buffer(part, out.read, out.len) => {
                        filled?;
                        break;
                    }
                    () = &mut behind => {
                        let due = pace.due(out.read);
                        if tokio::time::Instant::now() >= due {
                            return Err(ReadFrameError::Behind {
                                part,
                                read: out.read,
                                expected: out.len,
                            });
                        }
                        behind.as_mut().reset(due);
                    }
                }
            }
            out.take(&mut self.buffered);
        }
        Ok(out.finish())
    }

    /// After the whole frame: reads the end of the stream if it has already
    /// arrived, without waiting for it; true if it had.
    ///
    /// A peer finishes its side right after writing the frame, so the FIN
    /// normally travels in the frame's last packet. Reading it matters: a
    /// receive side dropped before its FIN was read makes QUIC send
    /// `STOP_SENDING`, one more packet per call, which the peer then has to
    /// process.
    ///
    /// # Errors
    /// [`ReadFrameError::Trailing`] if bytes follow the frame; a stream
    /// reset after the frame as any read error.
    pub fn end_if_arrived(&mut self) -> Result<bool, ReadFrameError> {
        use futures_util::FutureExt;
        if !self.buffered.is_empty() {
            return Err(ReadFrameError::Trailing {
                len: self.buffered.len(),
            });
        }
        match self.recv.read_chunk(usize::MAX, true).now_or_never() {
            None => Ok(false),
            Some(Ok(None)) => Ok(true),
            Some(Ok(Some(chunk))) => Err(ReadFrameError::Trailing {
                len: chunk.bytes.len(),
            }),
            Some(Err(e)) => Err(read_error("end of the stream", e)),
        }
    }
}

/// The first allocation for a header of `len` bytes: all of it when it is
/// small, as real headers are (a call of 16 buffers and 32 arguments
/// archives to under 2 KiB); the buffer grows from there as bytes arrive.
fn header_start(len: usize) -> usize {
    const HEADER_START: usize = 4 * 1024;
    len.min(HEADER_START)
}

/// A payload being read as chunks: QUIC's pieces kept as they came, those
/// shorter than [`GATHER_BELOW`] gathered into buffers of their own.
struct Gather {
    chunks: Vec<Bytes>,
    gathered: BytesMut,
    read: usize,
    len: usize,
}

impl Gather {
    fn new(len: u64) -> Result<Self, ReadFrameError> {
        Ok(Self {
            chunks: Vec::new(),
            gathered: BytesMut::new(),
            read: 0,
            len: usize::try_from(len).map_err(|_| ReadFrameError::TooLarge { len })?,
        })
    }

    /// Takes what `buffered` holds of the payload.
    fn take(&mut self, buffered: &mut Bytes) {
        let n = (self.len - self.read).min(buffered.len());
        let piece = buffered.split_to(n);
        self.read += n;
        // A payload in one piece pins one datagram, as its header did.
        if piece.len() >= GATHER_BELOW || n == self.len {
            if !self.gathered.is_empty() {
                self.chunks.push(self.gathered.split().freeze());
            }
            self.chunks.push(piece);
        } else {
            self.gathered.extend_from_slice(&piece);
        }
    }

    fn finish(mut self) -> ChunkedPayload {
        if !self.gathered.is_empty() {
            self.chunks.push(self.gathered.freeze());
        }
        ChunkedPayload {
            chunks: self.chunks,
            len: self.len,
        }
    }
}

/// When the bytes of a part must arrive: the first by `start`, and each
/// later one by `start` plus the time the bytes before it take at `rate`
/// bytes per second. A peer that sends nothing is cut off at `start`, and
/// one that falls behind the rate as soon as it does, where a deadline for
/// the whole part would let it hold the part's memory until the end of its
/// allowance.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// When the first byte is due.
    pub start: tokio::time::Instant,
    /// Bytes per second after that; 0: every byte by `start`.
    pub rate: u64,
}

impl Pace {
    /// When the byte after the first `read` is due.
    pub fn due(&self, read: usize) -> tokio::time::Instant {
        if self.rate == 0 {
            return self.start;
        }
        let nanos = (read as u128) * 1_000_000_000 / u128::from(self.rate);
        let later = std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        // Past what an `Instant` holds is as good as never: a year on.
        self.start
            .checked_add(later)
            .or_else(|| {
                self.start
                    .checked_add(std::time::Duration::from_secs(365 * 86_400))
            })
            .unwrap_or(self.start)
    }
}

/// A lost connection is reported as such (callers tell it from a stream
/// error), any other read error with the part being read.
fn read_error(part: &'static str, e: quinn::ReadError) -> ReadFrameError {
    match e {
        quinn::ReadError::ConnectionLost(source) => ReadFrameError::ConnectionLost { part, source },
        source => ReadFrameError::Read { part, source },
    }
}

/// Writes a whole frame: `head`, its prefix and header archive (from
/// [`crate::wire::encode_request_frame`] or
/// [`crate::wire::encode_response_frame`] for this `payload`), then the
/// payload's chunks, which QUIC takes without copying. One write, so one
/// lock of the connection and one wake of its driver however many pieces
/// the frame has. Does not finish the stream.
///
/// # Errors
/// The stream's [`WriteError`].
pub async fn write_frame_chunks(
    send: &mut SendStream,
    head: Bytes,
    payload: &[Bytes],
) -> Result<(), WriteError> {
    debug_assert_eq!(
        Prefix::declared_payload_len(&head),
        Some(payload.iter().map(|b| b.len() as u64).sum::<u64>()),
        "a frame head built for another payload"
    );
    // Most frames have a payload of one or two pieces: those are handed
    // over from the stack, without a list allocated per call.
    match payload {
        [] => send.write_all_chunks(&mut [head]).await,
        [a] => send.write_all_chunks(&mut [head, a.clone()]).await,
        [a, b] => {
            send.write_all_chunks(&mut [head, a.clone(), b.clone()])
                .await
        }
        _ => {
            let mut parts = Vec::with_capacity(1 + payload.len());
            parts.push(head);
            parts.extend(payload.iter().cloned());
            send.write_all_chunks(&mut parts).await
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_large_declared_header_is_not_allocated_before_it_arrives() {
        assert_eq!(super::header_start(300), 300, "a real header at once");
        assert_eq!(super::header_start(64 * 1024), 4 * 1024);
    }

    #[test]
    fn a_pace_gives_each_byte_its_time_at_the_rate() {
        use std::time::Duration;
        let start = tokio::time::Instant::now();
        let pace = super::Pace { start, rate: 1000 };
        assert_eq!(pace.due(0), start);
        assert_eq!(pace.due(500), start + Duration::from_millis(500));
        let anytime = super::Pace { start, rate: 0 };
        assert_eq!(
            anytime.due(1 << 30),
            start,
            "rate 0: every byte by the start"
        );
        assert_eq!(
            pace.due(1 << 40),
            start + Duration::from_millis(1 << 40),
            "in proportion however far"
        );
        let slow = super::Pace { start, rate: 1 };
        assert!(slow.due(usize::MAX) > start, "never overflowing");
    }

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
