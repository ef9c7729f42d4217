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

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

use crate::StatusCode;

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
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(header, header_buffer())
        .map_err(WireError::Archive)
}

/// A buffer for archiving a header, sized so that a typical one (a kernel
/// name and a few buffer and argument names) is written without growing it.
fn header_buffer() -> AlignedVec {
    AlignedVec::with_capacity(256)
}

/// Archives a response header.
///
/// # Errors
/// As [`encode_request`].
pub fn encode_response(header: &ResponseHeader) -> Result<AlignedVec, WireError> {
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(header, header_buffer())
        .map_err(WireError::Archive)
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
        let buffers = buffers.into_iter();
        let mut slots = Vec::with_capacity(buffers.size_hint().0);
        let mut end = 0usize;
        for (name, elem, len) in buffers {
            let too_large = || WireError::BufferTooLarge {
                name: name.to_owned(),
                len,
            };
            let bytes = usize::try_from(len)
                .ok()
                .and_then(|n| n.checked_mul(elem.size()))
                .ok_or_else(too_large)?;
            let start = align_up(end).ok_or_else(too_large)?;
            let stop = start.checked_add(bytes).ok_or_else(too_large)?;
            slots.push(start..stop);
            end = stop;
        }
        Ok(Self { slots, total: end })
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
        if payload_len as u128 == self.total as u128 {
            Ok(())
        } else {
            Err(WireError::PayloadLength {
                expected: self.total as u64,
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
