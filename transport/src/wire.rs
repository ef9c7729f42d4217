//! The archived headers and the payload layout.
//!
//! Headers are rkyv archives (little-endian, aligned, 32-bit relative
//! pointers: fixed by the crate features in the workspace manifest, so both
//! peers agree whatever their platform). Received headers are only ever read
//! through [`access_request`] / [`access_response`], which validate the
//! archive with bytecheck; nothing received is read unchecked.
//!
//! The payload is the concatenation of the call's buffers in header order,
//! each starting at a multiple of [`PAYLOAD_ALIGN`] bytes from the start of the
//! payload, zero-padded in between. [`PayloadLayout`] computes the slots with
//! checked arithmetic.

use std::ops::Range;

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

use crate::StatusCode;
use crate::frame::{FrameKind, PREFIX_LEN, Prefix};

/// Every buffer in a payload starts at a multiple of this many bytes, so the
/// receiver can view it in place as a slice of its element type (and of
/// 16-byte vectors).
pub const PAYLOAD_ALIGN: usize = 16;

/// The built-in echo "kernel": the server answers with the request's
/// buffers unchanged, under the same names, without touching the GPU. It
/// measures what the framework itself costs (a ping at size 0); every
/// authenticated client may call it, whatever the access policy says.
pub const ECHO_KERNEL: &str = "quasar.echo";

/// An owned, [`PAYLOAD_ALIGN`]-aligned byte buffer: received headers and
/// payloads are read into these so they can be viewed in place.
pub type Payload = AlignedVec<PAYLOAD_ALIGN>;

/// Element type of a buffer.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum ElemType {
    /// 32-bit IEEE float.
    F32,
    /// 32-bit unsigned integer.
    U32,
    /// 32-bit signed integer.
    I32,
}

impl ElemType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        4
    }

    /// The WGSL spelling of the type.
    pub const fn wgsl_name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::U32 => "u32",
            Self::I32 => "i32",
        }
    }
}

impl ArchivedElemType {
    /// The native value of an archived element type.
    pub fn to_native(&self) -> ElemType {
        match self {
            Self::F32 => ElemType::F32,
            Self::U32 => ElemType::U32,
            Self::I32 => ElemType::I32,
        }
    }
}

impl std::fmt::Display for ElemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.wgsl_name())
    }
}

/// A scalar argument's value.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[rkyv(derive(Debug))]
pub enum Scalar {
    /// A 32-bit float.
    F32(f32),
    /// A 32-bit unsigned integer.
    U32(u32),
    /// A 32-bit signed integer.
    I32(i32),
}

impl Scalar {
    /// The scalar's element type.
    pub fn elem(&self) -> ElemType {
        match self {
            Self::F32(_) => ElemType::F32,
            Self::U32(_) => ElemType::U32,
            Self::I32(_) => ElemType::I32,
        }
    }

    /// The value's four little-endian bytes.
    pub fn to_le_bytes(&self) -> [u8; 4] {
        match self {
            Self::F32(v) => v.to_le_bytes(),
            Self::U32(v) => v.to_le_bytes(),
            Self::I32(v) => v.to_le_bytes(),
        }
    }
}

impl ArchivedScalar {
    /// The native value of an archived scalar.
    pub fn to_native(&self) -> Scalar {
        match self {
            Self::F32(v) => Scalar::F32(v.to_native()),
            Self::U32(v) => Scalar::U32(v.to_native()),
            Self::I32(v) => Scalar::I32(v.to_native()),
        }
    }
}

impl From<f32> for Scalar {
    fn from(v: f32) -> Self {
        Self::F32(v)
    }
}
impl From<u32> for Scalar {
    fn from(v: u32) -> Self {
        Self::U32(v)
    }
}
impl From<i32> for Scalar {
    fn from(v: i32) -> Self {
        Self::I32(v)
    }
}

/// A named scalar argument (a member of the kernel's uniform block).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct NamedScalar {
    /// Name of the uniform block member.
    pub name: String,
    /// Its value.
    pub value: Scalar,
}

/// Describes one buffer in a payload.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct BufferDesc {
    /// Name of the storage buffer binding in the kernel.
    pub name: String,
    /// Element type.
    pub elem: ElemType,
    /// Number of elements.
    pub len: u64,
}

/// The request header: what to run and on what.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct RequestHeader {
    /// Kernel name.
    pub kernel: String,
    /// Scalar arguments, by uniform member name.
    pub args: Vec<NamedScalar>,
    /// Input buffers, in payload order.
    pub buffers: Vec<BufferDesc>,
    /// Time budget for the call in microseconds, counted from when the server
    /// has read the header. Relative, so the peers' clocks need not agree.
    pub timeout_us: Option<u64>,
    /// Explicit workgroup count, overriding the kernel's dispatch rule.
    pub workgroups: Option<[u32; 3]>,
}

/// A request header of borrowed parts, archived exactly as a
/// [`RequestHeader`]: the bytes are the same, so a receiver cannot tell
/// them apart. A client running one call many times encodes it from the
/// call's own names, without first copying them into an owned header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestHeaderRef<'a> {
    /// Kernel name.
    pub kernel: &'a str,
    /// Scalar arguments, by uniform member name.
    pub args: &'a [NamedScalar],
    /// Input buffers, in payload order.
    pub buffers: &'a [BufferDesc],
    /// As [`RequestHeader::timeout_us`].
    pub timeout_us: Option<u64>,
    /// As [`RequestHeader::workgroups`].
    pub workgroups: Option<[u32; 3]>,
}

/// Where [`RequestHeaderRef`]'s out-of-line parts were written.
pub struct RequestHeaderRefResolver {
    kernel: rkyv::string::StringResolver,
    args: rkyv::vec::VecResolver,
    buffers: rkyv::vec::VecResolver,
    timeout_us: rkyv::Resolver<Option<u64>>,
    workgroups: rkyv::Resolver<Option<[u32; 3]>>,
}

// By hand rather than derived with `#[rkyv(as = ...)]`: the derive's bounds
// on borrowed fields do not resolve to the owned header's archived types.
impl Archive for RequestHeaderRef<'_> {
    type Archived = ArchivedRequestHeader;
    type Resolver = RequestHeaderRefResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        rkyv::munge::munge!(let ArchivedRequestHeader { kernel, args, buffers, timeout_us, workgroups } = out);
        rkyv::string::ArchivedString::resolve_from_str(self.kernel, resolver.kernel, kernel);
        rkyv::vec::ArchivedVec::resolve_from_slice(self.args, resolver.args, args);
        rkyv::vec::ArchivedVec::resolve_from_slice(self.buffers, resolver.buffers, buffers);
        self.timeout_us.resolve(resolver.timeout_us, timeout_us);
        self.workgroups.resolve(resolver.workgroups, workgroups);
    }
}

impl<S> Serialize<S> for RequestHeaderRef<'_>
where
    S: rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized,
    S::Error: rancor::Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        Ok(RequestHeaderRefResolver {
            kernel: rkyv::string::ArchivedString::serialize_from_str(self.kernel, serializer)?,
            args: rkyv::vec::ArchivedVec::serialize_from_slice(self.args, serializer)?,
            buffers: rkyv::vec::ArchivedVec::serialize_from_slice(self.buffers, serializer)?,
            timeout_us: self.timeout_us.serialize(serializer)?,
            workgroups: self.workgroups.serialize(serializer)?,
        })
    }
}

impl RequestHeader {
    /// The header as borrowed parts.
    pub fn borrowed(&self) -> RequestHeaderRef<'_> {
        RequestHeaderRef {
            kernel: &self.kernel,
            args: &self.args,
            buffers: &self.buffers,
            timeout_us: self.timeout_us,
            workgroups: self.workgroups,
        }
    }
}

/// Server-side timings of a call, in microseconds.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Timings {
    /// From the request being queued for the GPU to the executor taking it.
    pub queued_us: u64,
    /// The executor's time for the submission the call was part of (calls
    /// that arrive together share one): staging the uploads, encoding,
    /// every dispatch, the copy of the outputs into the mappable readback
    /// buffer, to completion (executor clock).
    pub gpu_us: u64,
    /// The compute pass alone (every dispatch), from GPU timestamp queries;
    /// `None` where the adapter does not support them.
    pub kernel_us: Option<u64>,
    /// Reading the mapped outputs into the response payload.
    pub readback_us: u64,
    /// From the header being read to the reply being ready to send.
    pub total_us: u64,
}

impl ArchivedTimings {
    /// The native value of archived timings.
    pub fn to_native(&self) -> Timings {
        Timings {
            queued_us: self.queued_us.to_native(),
            gpu_us: self.gpu_us.to_native(),
            kernel_us: self.kernel_us.as_ref().map(|v| v.to_native()),
            readback_us: self.readback_us.to_native(),
            total_us: self.total_us.to_native(),
        }
    }
}

/// The response header: the outcome, and the output buffers in payload order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[rkyv(derive(Debug))]
pub struct ResponseHeader {
    /// A [`StatusCode`] number.
    pub status: u16,
    /// Human-readable detail; empty on success.
    pub message: String,
    /// Output buffers (empty unless the status is OK).
    pub buffers: Vec<BufferDesc>,
    /// Where the server spent its time.
    pub timings: Timings,
}

impl ResponseHeader {
    /// An error reply with no outputs.
    pub fn error(status: StatusCode, message: impl Into<String>, timings: Timings) -> Self {
        Self {
            status: status.as_u16(),
            message: message.into(),
            buffers: Vec::new(),
            timings,
        }
    }
}

/// Why a header or payload could not be encoded or read.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WireError {
    /// The archive failed validation (bytecheck), or could not be written.
    #[error("invalid header archive: {0}")]
    Archive(#[source] rancor::Error),
    /// A buffer's byte length overflows.
    #[error("buffer `{name}` of {len} elements is too large to address")]
    BufferTooLarge {
        /// Buffer name.
        name: String,
        /// Declared element count.
        len: u64,
    },
    /// The payload length does not match what the header's buffers need.
    #[error("payload is {actual} bytes but the buffers described need {expected}")]
    PayloadLength {
        /// What the buffers need.
        expected: u64,
        /// What the prefix declared.
        actual: u64,
    },
}

/// Validates and accesses a received request header in place.
///
/// # Errors
/// [`WireError::Archive`] if the bytes are not a valid archive.
pub fn access_request(bytes: &[u8]) -> Result<&ArchivedRequestHeader, WireError> {
    rkyv::access::<ArchivedRequestHeader, rancor::Error>(bytes).map_err(WireError::Archive)
}

/// Validates and accesses a received response header in place.
///
/// # Errors
/// [`WireError::Archive`] if the bytes are not a valid archive.
pub fn access_response(bytes: &[u8]) -> Result<&ArchivedResponseHeader, WireError> {
    rkyv::access::<ArchivedResponseHeader, rancor::Error>(bytes).map_err(WireError::Archive)
}

/// Archives a request header.
///
/// # Errors
/// [`WireError::Archive`] if serialization fails (it does not for well-formed
/// values; the error is kept rather than unwrapped).
pub fn encode_request(header: &RequestHeader) -> Result<AlignedVec, WireError> {
    // Sized so that a typical header (a kernel name and a few buffer and
    // argument names) is written without growing the buffer.
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(header, AlignedVec::with_capacity(256))
        .map_err(WireError::Archive)
}

/// A request frame's prefix and header archive in one buffer, for a
/// payload of `payload` (see [`crate::io::write_frame_chunks`]).
///
/// The header is archived straight after the prefix: written once, with no
/// second buffer to copy it into behind the prefix.
///
/// # Errors
/// As [`encode_request`].
pub fn encode_request_frame(
    header: &RequestHeaderRef<'_>,
    payload: &[Bytes],
) -> Result<Bytes, WireError> {
    encode_frame(FrameKind::Request, header, payload)
}

/// A response frame's prefix and header archive in one buffer, as
/// [`encode_request_frame`].
///
/// # Errors
/// As [`encode_request`].
pub fn encode_response_frame(
    header: &ResponseHeader,
    payload: &[Bytes],
) -> Result<Bytes, WireError> {
    encode_frame(FrameKind::Response, header, payload)
}

fn encode_frame<T>(kind: FrameKind, header: &T, payload: &[Bytes]) -> Result<Bytes, WireError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AfterPrefix,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    thread_local! {
        // Archiving needs room to grow; the frame handed to QUIC wants its
        // exact length (a `Bytes` made from a vector with spare capacity
        // allocates a second time for its shared header). So headers are
        // archived here, on each thread's reused buffer, and copied out.
        static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    // A thread being torn down has no scratch buffer left: a fresh one.
    let mut scratch = SCRATCH.try_with(std::cell::Cell::take).unwrap_or_default();
    scratch.clear();
    scratch.resize(PREFIX_LEN, 0);
    let archived = rkyv::api::high::to_bytes_in::<_, rancor::Error>(header, AfterPrefix(scratch));
    let AfterPrefix(mut scratch) = archived.map_err(WireError::Archive)?;
    let prefix = Prefix {
        kind,
        header_len: u32::try_from(scratch.len() - PREFIX_LEN).unwrap_or(u32::MAX),
        payload_len: payload.iter().map(|b| b.len() as u64).sum(),
    };
    scratch[..PREFIX_LEN].copy_from_slice(&prefix.encode());
    let frame = Bytes::copy_from_slice(&scratch);
    // A rare huge header does not pin its memory to the thread.
    if scratch.capacity() <= MAX_SCRATCH {
        let _ = SCRATCH.try_with(|s| s.set(scratch));
    }
    Ok(frame)
}

/// The largest archiving buffer a thread keeps between frames.
const MAX_SCRATCH: usize = 16 * 1024;

/// A writer that archives after a frame prefix. Positions count from the
/// prefix's end, so the archive is laid out and aligned exactly as if it
/// were alone, which is how the receiver reads it (copied into an aligned
/// buffer of its own).
struct AfterPrefix(Vec<u8>);

impl rkyv::ser::Positional for AfterPrefix {
    fn pos(&self) -> usize {
        self.0.len().saturating_sub(PREFIX_LEN)
    }
}

impl<E> rkyv::ser::Writer<E> for AfterPrefix {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Where each buffer sits in a payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PayloadLayout {
    slots: Vec<Range<usize>>,
    total: usize,
}

impl PayloadLayout {
    /// Lays out buffers of the given `(name, element type, element count)` in
    /// order, each at the next multiple of [`PAYLOAD_ALIGN`].
    ///
    /// # Errors
    /// [`WireError::BufferTooLarge`] if a size overflows `usize`.
    pub fn new<'a>(
        buffers: impl IntoIterator<Item = (&'a str, ElemType, u64)>,
    ) -> Result<Self, WireError> {
        let slots = Self::slots_of(buffers).collect::<Result<Vec<_>, _>>()?;
        let total = slots.last().map_or(0, |s| s.end);
        Ok(Self { slots, total })
    }

    /// The slots [`PayloadLayout::new`] would give `buffers`, one by one,
    /// without keeping them: for a caller that walks them once (and
    /// allocates nothing per call for it). Stops after the first error.
    pub fn slots_of<'a>(
        buffers: impl IntoIterator<Item = (&'a str, ElemType, u64)>,
    ) -> impl Iterator<Item = Result<Range<usize>, WireError>> {
        let mut end = Some(0usize);
        buffers.into_iter().map_while(move |(name, elem, len)| {
            let at = end.take()?;
            let slot = usize::try_from(len)
                .ok()
                .and_then(|n| n.checked_mul(elem.size()))
                .and_then(|bytes| {
                    let start = align_up(at)?;
                    Some(start..start.checked_add(bytes)?)
                })
                .ok_or_else(|| WireError::BufferTooLarge {
                    name: name.to_owned(),
                    len,
                });
            end = slot.as_ref().ok().map(|s| s.end);
            Some(slot)
        })
    }

    /// The total length of the payload [`PayloadLayout::new`] would lay
    /// out for `buffers`, without keeping the slots.
    ///
    /// # Errors
    /// As [`PayloadLayout::new`].
    pub fn total_of<'a>(
        buffers: impl IntoIterator<Item = (&'a str, ElemType, u64)>,
    ) -> Result<usize, WireError> {
        // Every slot is walked (an error stops the walk); the last one ends
        // the payload.
        Self::slots_of(buffers)
            .last()
            .map_or(Ok(0), |slot| slot.map(|s| s.end))
    }

    /// Total payload length in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The byte range of each buffer, in order.
    pub fn slots(&self) -> &[Range<usize>] {
        &self.slots
    }

    /// Checks that a declared payload length matches this layout exactly.
    ///
    /// # Errors
    /// [`WireError::PayloadLength`] on any difference.
    pub fn check_len(&self, payload_len: u64) -> Result<(), WireError> {
        Self::check_total(self.total, payload_len)
    }

    /// Checks that a declared payload length is exactly `total`, a layout's
    /// length (from [`PayloadLayout::total_of`], say).
    ///
    /// # Errors
    /// [`WireError::PayloadLength`] on any difference.
    pub fn check_total(total: usize, payload_len: u64) -> Result<(), WireError> {
        if payload_len as u128 == total as u128 {
            Ok(())
        } else {
            Err(WireError::PayloadLength {
                expected: total as u64,
                actual: payload_len,
            })
        }
    }
}

/// Lays `buffers` out as one payload, each at the next multiple of
/// [`PAYLOAD_ALIGN`] with zero padding: the bytes a request carries, in one
/// buffer (for running a call in-process).
pub fn lay_out<B: AsRef<[u8]>>(buffers: &[B]) -> Payload {
    let mut payload = Payload::new();
    for b in buffers {
        let start = align_up(payload.len()).unwrap_or(payload.len());
        payload.resize(start, 0);
        payload.extend_from_slice(b.as_ref());
    }
    payload
}

/// Rounds `n` up to a multiple of [`PAYLOAD_ALIGN`], or `None` on overflow.
pub fn align_up(n: usize) -> Option<usize> {
    n.checked_add(PAYLOAD_ALIGN - 1)
        .map(|v| v & !(PAYLOAD_ALIGN - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RequestHeader {
        RequestHeader {
            kernel: "saxpy".into(),
            args: vec![NamedScalar {
                name: "a".into(),
                value: Scalar::F32(2.0),
            }],
            buffers: vec![
                BufferDesc {
                    name: "x".into(),
                    elem: ElemType::F32,
                    len: 3,
                },
                BufferDesc {
                    name: "y".into(),
                    elem: ElemType::F32,
                    len: 3,
                },
            ],
            timeout_us: Some(1_000),
            workgroups: None,
        }
    }

    #[test]
    fn request_round_trips_through_checked_access() {
        let bytes = encode_request(&sample()).expect("encode");
        let archived = access_request(&bytes).expect("access");
        assert_eq!(archived.kernel.as_str(), "saxpy");
        assert_eq!(archived.buffers.len(), 2);
        assert_eq!(archived.args[0].value.to_native(), Scalar::F32(2.0));
        let back: RequestHeader =
            rkyv::deserialize::<RequestHeader, rancor::Error>(archived).expect("deserialize");
        assert_eq!(back, sample());
    }

    fn header_strategy() -> impl proptest::strategy::Strategy<Value = RequestHeader> {
        use proptest::prelude::*;
        // Names both inline (up to 8 bytes) and out of line in the archive.
        let name = "[a-z_]{0,20}";
        let scalar = prop_oneof![
            any::<f32>().prop_map(Scalar::F32),
            any::<u32>().prop_map(Scalar::U32),
            any::<i32>().prop_map(Scalar::I32),
        ];
        let elem = prop_oneof![
            Just(ElemType::F32),
            Just(ElemType::U32),
            Just(ElemType::I32)
        ];
        (
            name,
            prop::collection::vec(
                (name, scalar).prop_map(|(name, value)| NamedScalar { name, value }),
                0..4,
            ),
            prop::collection::vec(
                (name, elem, any::<u64>()).prop_map(|(name, elem, len)| BufferDesc {
                    name,
                    elem,
                    len,
                }),
                0..4,
            ),
            any::<Option<u64>>(),
            any::<Option<[u32; 3]>>(),
        )
            .prop_map(
                |(kernel, args, buffers, timeout_us, workgroups)| RequestHeader {
                    kernel,
                    args,
                    buffers,
                    timeout_us,
                    workgroups,
                },
            )
    }

    proptest::proptest! {
        /// A header of borrowed parts is the owned header on the wire, byte
        /// for byte, and so is the header in a frame after its prefix.
        #[test]
        fn borrowed_and_framed_headers_archive_as_the_owned_one(
            header in header_strategy(),
            payload_len in 0usize..100,
        ) {
            let owned = encode_request(&header).expect("encode");
            let borrowed =
                rkyv::api::high::to_bytes::<rancor::Error>(&header.borrowed()).expect("encode");
            proptest::prop_assert_eq!(&owned[..], &borrowed[..]);

            let payload = [Bytes::from(vec![7u8; payload_len])];
            let frame = encode_request_frame(&header.borrowed(), &payload).expect("frame");
            let prefix: [u8; PREFIX_LEN] = frame[..PREFIX_LEN].try_into().expect("prefix");
            let prefix = Prefix::decode(&prefix, FrameKind::Request, &crate::Limits::default())
                .expect("prefix decodes");
            proptest::prop_assert_eq!(prefix.header_len as usize, frame.len() - PREFIX_LEN);
            proptest::prop_assert_eq!(prefix.payload_len, payload_len as u64);
            proptest::prop_assert_eq!(&frame[PREFIX_LEN..], &owned[..]);
        }
    }

    #[test]
    fn a_response_frame_carries_the_response_header() {
        let header =
            ResponseHeader::error(StatusCode::NotFound, "no kernel `x`", Timings::default());
        let frame = encode_response_frame(&header, &[]).expect("frame");
        let prefix: [u8; PREFIX_LEN] = frame[..PREFIX_LEN].try_into().expect("prefix");
        let prefix = Prefix::decode(&prefix, FrameKind::Response, &crate::Limits::default())
            .expect("prefix decodes");
        assert_eq!(prefix.payload_len, 0);
        let mut aligned = Payload::new();
        aligned.extend_from_slice(&frame[PREFIX_LEN..]);
        let archived = access_response(&aligned).expect("access");
        assert_eq!(archived.message.as_str(), "no kernel `x`");
        let alone = rkyv::api::high::to_bytes::<rancor::Error>(&header).expect("encode");
        assert_eq!(&frame[PREFIX_LEN..], &alone[..]);
    }

    #[test]
    fn garbage_and_truncation_are_rejected() {
        let bytes = encode_request(&sample()).expect("encode");
        for cut in 0..bytes.len() {
            let mut v = Payload::new();
            v.extend_from_slice(&bytes[..cut]);
            assert!(access_request(&v).is_err(), "truncated at {cut} accepted");
        }
        let mut v = Payload::new();
        v.extend_from_slice(&[0xff; 64]);
        assert!(access_request(&v).is_err());
    }

    #[test]
    fn layout_aligns_each_slot() {
        let l = PayloadLayout::new([
            ("a", ElemType::F32, 3),
            ("b", ElemType::U32, 1),
            ("c", ElemType::I32, 4),
        ])
        .expect("layout");
        assert_eq!(l.slots(), &[0..12, 16..20, 32..48]);
        assert_eq!(l.total(), 48);
        assert!(l.check_len(48).is_ok());
        assert!(l.check_len(47).is_err());
    }

    #[test]
    fn lay_out_matches_the_layout() {
        let a = [1u8; 12];
        let b = [2u8; 4];
        let p = lay_out(&[&a[..], &b[..]]);
        let l =
            PayloadLayout::new([("a", ElemType::U32, 3), ("b", ElemType::U32, 1)]).expect("layout");
        assert_eq!(p.len(), l.total());
        assert_eq!(&p[l.slots()[1].clone()], &b);
        assert_eq!(&p[12..16], &[0; 4]);
    }

    #[test]
    fn slots_of_and_total_of_agree_with_the_layout() {
        let buffers = [
            ("a", ElemType::F32, 3),
            ("b", ElemType::U32, 0),
            ("c", ElemType::I32, 4),
        ];
        let l = PayloadLayout::new(buffers).expect("layout");
        let slots: Vec<_> = PayloadLayout::slots_of(buffers)
            .collect::<Result<_, _>>()
            .expect("slots");
        assert_eq!(slots, l.slots());
        assert_eq!(PayloadLayout::total_of(buffers).expect("total"), l.total());
        assert_eq!(PayloadLayout::total_of([]).expect("empty"), 0);
        // The first error ends the walk, and names its buffer.
        let bad = [
            ("a", ElemType::F32, 1),
            ("huge", ElemType::F32, u64::MAX),
            ("c", ElemType::F32, 1),
        ];
        let walked: Vec<_> = PayloadLayout::slots_of(bad).collect();
        assert_eq!(walked.len(), 2);
        assert!(
            matches!(&walked[1], Err(WireError::BufferTooLarge { name, .. }) if name == "huge")
        );
        assert!(PayloadLayout::total_of(bad).is_err());
    }

    #[test]
    fn layout_overflow_is_an_error() {
        assert!(PayloadLayout::new([("a", ElemType::F32, u64::MAX)]).is_err());
        assert!(
            PayloadLayout::new([
                ("a", ElemType::F32, u64::MAX / 5),
                ("b", ElemType::F32, u64::MAX / 5)
            ])
            .is_err()
        );
    }
}
