//! What a call sends ([`Call`]) and what it gets back ([`Response`]).

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use quasar_transport::wire::{ArchivedResponseHeader, PayloadLayout, RequestHeaderRef};
use quasar_transport::{BufferDesc, ElemType, NamedScalar, RequestHeader, Scalar, Timings};

use crate::error::{CallError, OutputError, ProtocolError};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
    impl Sealed for i32 {}
}

/// An element type a buffer may hold: `f32`, `u32` or `i32`.
pub trait Element: bytemuck::Pod + sealed::Sealed {
    /// The wire type.
    const ELEM: ElemType;
}
impl Element for f32 {
    const ELEM: ElemType = ElemType::F32;
}
impl Element for u32 {
    const ELEM: ElemType = ElemType::U32;
}
impl Element for i32 {
    const ELEM: ElemType = ElemType::I32;
}

/// A request header and the input buffers' bytes, in payload order.
pub type RequestParts = (RequestHeader, Vec<Bytes>);

/// A call to a kernel: its name, scalar arguments and input buffers.
///
/// Built with chained methods and run with [`crate::Client::execute`].
/// Names must match the kernel's WGSL (`var<storage>` names for buffers,
/// uniform struct members for arguments); the server says which is wrong
/// otherwise.
#[derive(Debug, Clone)]
pub struct Call {
    kernel: String,
    args: Vec<NamedScalar>,
    // The input buffers' descriptions and bytes, in payload order: kept
    // apart so that each attempt's request header borrows the descriptions
    // as they are.
    descs: Vec<BufferDesc>,
    // Shared, so retries and clones of a call copy no payload.
    data: Vec<Bytes>,
    pub(crate) deadline: Option<Duration>,
    workgroups: Option<[u32; 3]>,
    pub(crate) retryable: bool,
}

impl Call {
    /// A call to `kernel` with no arguments yet.
    pub fn new(kernel: impl Into<String>) -> Self {
        Self {
            kernel: kernel.into(),
            args: Vec::new(),
            descs: Vec::new(),
            data: Vec::new(),
            deadline: None,
            workgroups: None,
            retryable: true,
        }
    }

    /// Whether the SDK may retry this call after a lost connection, an
    /// UNAVAILABLE answer or an attempt over the retry policy's
    /// `per_try_timeout` (default: yes; kernels are pure). A retried call
    /// may have run on the server already. Turn it off for a kernel whose
    /// effects must not be repeated.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Adds a scalar argument (`f32`, `u32` or `i32`).
    pub fn arg(mut self, name: impl Into<String>, value: impl Into<Scalar>) -> Self {
        self.args.push(NamedScalar {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Adds an input buffer (copied into the request).
    pub fn input<T: Element>(mut self, name: impl Into<String>, data: &[T]) -> Self {
        self.descs.push(BufferDesc {
            name: name.into(),
            elem: T::ELEM,
            len: data.len() as u64,
        });
        self.data
            .push(Bytes::copy_from_slice(bytemuck::cast_slice::<T, u8>(data)));
        self
    }

    /// Adds an input buffer from raw little-endian bytes (a file's contents,
    /// say), without copying them. The length must be a multiple of the
    /// element size; this is checked when the call is run.
    pub fn input_bytes(
        mut self,
        name: impl Into<String>,
        elem: ElemType,
        bytes: impl Into<Bytes>,
    ) -> Self {
        let bytes = bytes.into();
        self.descs.push(BufferDesc {
            name: name.into(),
            elem,
            len: (bytes.len() / elem.size()) as u64,
        });
        self.data.push(bytes);
        self
    }

    /// Gives up after `timeout`, retries included: the server does not start
    /// the call later than that (DEADLINE_EXCEEDED), and the client stops
    /// waiting then too.
    pub fn deadline(mut self, timeout: Duration) -> Self {
        self.deadline = Some(timeout);
        self
    }

    /// Dispatches exactly these workgroup counts instead of the kernel's
    /// rule (single-stage kernels only).
    pub fn workgroups(mut self, counts: [u32; 3]) -> Self {
        self.workgroups = Some(counts);
        self
    }

    /// The kernel's name.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The request header and the input buffers' bytes, in payload order:
    /// what [`crate::Client::execute`] sends. Useful to run the same call
    /// elsewhere (in-process, say) or to inspect it.
    ///
    /// # Errors
    /// [`CallError::InvalidCall`] if a buffer is not a whole number of
    /// elements.
    pub fn into_request(self) -> Result<RequestParts, CallError> {
        self.check()?;
        let timeout_us = self.deadline.map(micros);
        Ok((
            RequestHeader {
                kernel: self.kernel,
                args: self.args,
                buffers: self.descs,
                timeout_us,
                workgroups: self.workgroups,
            },
            self.data,
        ))
    }

    /// Checks that every buffer is a whole number of elements.
    pub(crate) fn check(&self) -> Result<(), CallError> {
        for (desc, data) in self.descs.iter().zip(&self.data) {
            if data.len() % desc.elem.size() != 0 {
                return Err(CallError::InvalidCall(format!(
                    "buffer `{}` has {} bytes, not a whole number of {} elements",
                    desc.name,
                    data.len(),
                    desc.elem
                )));
            }
        }
        Ok(())
    }

    /// The request header of an attempt that has `timeout` left, borrowing
    /// the call's names.
    pub(crate) fn header(&self, timeout: Option<Duration>) -> RequestHeaderRef<'_> {
        RequestHeaderRef {
            kernel: &self.kernel,
            args: &self.args,
            buffers: &self.descs,
            timeout_us: timeout.map(micros),
            workgroups: self.workgroups,
        }
    }

    /// The input buffers' descriptions, in payload order.
    pub(crate) fn descs(&self) -> &[BufferDesc] {
        &self.descs
    }

    /// The input buffers' bytes, in payload order.
    pub(crate) fn data(&self) -> &[Bytes] {
        &self.data
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Client-side timings of a call, each from the moment the call started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientTimings {
    /// Request encoded.
    pub encode: Duration,
    /// Request written and finished.
    pub sent: Duration,
    /// First bytes of the response read.
    pub first_byte: Duration,
    /// Response read in full.
    pub total: Duration,
}

/// One output buffer, untyped.
#[derive(Debug, Clone, Copy)]
pub struct OutputRef<'a> {
    /// Buffer name.
    pub name: &'a str,
    /// Element type.
    pub elem: ElemType,
    /// Little-endian bytes.
    pub bytes: &'a [u8],
}

/// A successful call's outputs and timings.
#[derive(Debug)]
pub struct Response {
    outputs: Vec<(BufferDesc, Range<usize>)>,
    payload: quasar_transport::Payload,
    timings: Timings,
    client: ClientTimings,
}

impl Response {
    pub(crate) fn new(
        outputs: Vec<(BufferDesc, Range<usize>)>,
        payload: quasar_transport::Payload,
        timings: Timings,
        client: ClientTimings,
    ) -> Self {
        Self {
            outputs,
            payload,
            timings,
            client,
        }
    }

    /// The output called `name`, viewed in place as `T`.
    ///
    /// # Errors
    /// [`OutputError`] if there is no such output or it holds another type.
    pub fn output<T: Element>(&self, name: &str) -> Result<&[T], OutputError> {
        let (desc, range) = self
            .outputs
            .iter()
            .find(|(d, _)| d.name == name)
            .ok_or_else(|| OutputError::NotFound(name.to_owned()))?;
        if desc.elem != T::ELEM {
            return Err(OutputError::WrongType {
                name: name.to_owned(),
                actual: desc.elem,
                requested: T::ELEM,
            });
        }
        bytemuck::try_cast_slice(&self.payload[range.clone()])
            .map_err(|_| OutputError::Misaligned(name.to_owned()))
    }

    /// Every output, in the order the server sent them.
    pub fn outputs(&self) -> impl Iterator<Item = OutputRef<'_>> {
        self.outputs.iter().map(|(d, r)| OutputRef {
            name: &d.name,
            elem: d.elem,
            bytes: &self.payload[r.clone()],
        })
    }

    /// Where the server spent its time.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// Where the client spent its time.
    pub fn client_timings(&self) -> ClientTimings {
        self.client
    }

    /// Bytes of output received.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// The outputs a response header describes, checked against the payload
/// length the prefix declared.
pub(crate) fn outputs_of(
    archived: &ArchivedResponseHeader,
    payload_len: u64,
) -> Result<Vec<(BufferDesc, Range<usize>)>, ProtocolError> {
    let slots = PayloadLayout::slots_of(
        archived
            .buffers
            .iter()
            .map(|b| (b.name.as_str(), b.elem.to_native(), b.len.to_native())),
    );
    let mut outputs = Vec::with_capacity(archived.buffers.len());
    let mut total = 0;
    for (b, slot) in archived.buffers.iter().zip(slots) {
        let slot = slot?;
        total = slot.end;
        outputs.push((
            BufferDesc {
                name: b.name.as_str().to_owned(),
                elem: b.elem.to_native(),
                len: b.len.to_native(),
            },
            slot,
        ));
    }
    PayloadLayout::check_total(total, payload_len)?;
    Ok(outputs)
}
