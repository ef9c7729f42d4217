//! Request header encode (alone, and as the framed head the SDK sends),
//! checked decode, and validation against a kernel.
//!
//! `cargo bench -p quasar-benches --bench codec`

#![allow(missing_docs, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use quasar_benches::{matmul_request, saxpy_request};
use quasar_server::kernel::KernelInterface;
use quasar_server::kernel::plan::{DeviceCaps, plan};
use quasar_transport::wire::{PayloadLayout, access_request, encode_request, encode_request_frame};
use quasar_transport::{Limits, RequestHeader};

const CAPS: DeviceCaps = DeviceCaps {
    max_workgroups_per_dim: 65535,
    max_storage_binding: 1 << 30,
    max_buffer_size: 1 << 30,
};

fn kernel(name: &str) -> KernelInterface {
    let s = quasar_shaders::SHIPPED
        .iter()
        .find(|k| k.name == name)
        .expect("shipped kernel");
    KernelInterface::from_wgsl(s.name, s.source)
        .expect("reflect")
        .interface
}

fn payload_len(h: &RequestHeader) -> u64 {
    PayloadLayout::new(h.buffers.iter().map(|b| (b.name.as_str(), b.elem, b.len)))
        .expect("layout")
        .total() as u64
}

fn codec(c: &mut Criterion) {
    for (label, header, kernel) in [
        ("saxpy", saxpy_request(1024), kernel("saxpy")),
        ("matmul", matmul_request(64, 64, 64), kernel("matmul")),
    ] {
        let bytes = encode_request(&header).expect("encode");
        let limits = Limits::default();
        let len = payload_len(&header);
        c.bench_function(&format!("encode_request/{label}"), |b| {
            b.iter(|| encode_request(black_box(&header)).expect("encode"))
        });
        // What Client::execute does per attempt: archive the header from the
        // call's borrowed parts behind the frame prefix.
        let payload = [bytes::Bytes::from(vec![0u8; len as usize])];
        c.bench_function(&format!("encode_request_frame/{label}"), |b| {
            b.iter(|| {
                encode_request_frame(black_box(&header.borrowed()), &payload).expect("encode")
            })
        });
        c.bench_function(&format!("access_request_checked/{label}"), |b| {
            b.iter(|| access_request(black_box(&bytes)).expect("valid"))
        });
        c.bench_function(&format!("decode_and_plan/{label}"), |b| {
            b.iter(|| {
                let archived = access_request(black_box(&bytes)).expect("valid");
                plan(0, &kernel, archived, len, &limits, &CAPS).expect("plan")
            })
        });
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
