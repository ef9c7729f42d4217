//! Glue between the shipped kernels' samples ([`quasar_shaders::Sample`]) and
//! the SDK: turn a sample into a [`Call`], and a [`Response`] back into host
//! buffers the sample can check.

use quasar_client::{Call, ElemType, Response};
use quasar_shaders::{HostBuffer, Sample};

/// The call that runs `sample`.
pub fn call_for(sample: &Sample) -> Call {
    let mut call = Call::new(sample.kernel);
    for (name, value) in &sample.args {
        call = call.arg(name.clone(), *value);
    }
    for (name, buf) in &sample.inputs {
        call = match buf {
            HostBuffer::F32(v) => call.input(name.clone(), v),
            HostBuffer::U32(v) => call.input(name.clone(), v),
            HostBuffer::I32(v) => call.input(name.clone(), v),
        };
    }
    call
}

/// Every output of `response`, copied into host buffers.
pub fn host_outputs(response: &Response) -> Vec<(String, HostBuffer)> {
    response
        .outputs()
        .map(|o| {
            let words = o.bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
            let buf = match o.elem {
                ElemType::F32 => HostBuffer::F32(words.map(f32::from_le_bytes).collect()),
                ElemType::U32 => HostBuffer::U32(words.map(u32::from_le_bytes).collect()),
                ElemType::I32 => HostBuffer::I32(words.map(i32::from_le_bytes).collect()),
            };
            (o.name.to_owned(), buf)
        })
        .collect()
}
