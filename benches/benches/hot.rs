//! The hot functions of the call path added for batching, fairness and
//! copy-once: the fair queue's push and batch take, copying a payload out
//! of QUIC's chunks (against one contiguous copy of the same bytes), and a
//! call's shares of the in-flight byte budgets (against the tokio
//! semaphores they replaced), and choosing which calls of a batch share a
//! fused dispatch.
//!
//! `cargo bench -p quasar-benches --bench hot`

#![allow(missing_docs, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quasar_server::budget::Budget;
use quasar_server::gpu::sched::{BatchBounds, FairQueue, Next, Queued};
use quasar_server::kernel::fuse::{Candidate, group_calls};
use quasar_server::kernel::plan::DeviceCaps;
use quasar_transport::io::ChunkedPayload;

struct Job(u64);

impl Queued for Job {
    fn bytes(&self) -> u64 {
        self.0
    }
}

fn fair_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("fair_queue");
    g.throughput(Throughput::Elements(64));
    // 64 calls from 8 clients queued, taken as one batch (turns by GPU
    // time), and the batch's time charged to them.
    g.bench_function("push_64_from_8_sources_take_one_batch_charge_it", |b| {
        let q: FairQueue<Job, ()> = FairQueue::new(1024, 256);
        let bounds = BatchBounds {
            jobs: 64,
            bytes: u64::MAX,
            gpu_time: Duration::from_secs(1),
        };
        let mut charges = Vec::with_capacity(64);
        b.iter(|| {
            for i in 0..64u64 {
                let _ = q.try_push(i % 8, Job(4096));
            }
            let taken = match q.next_blocking(bounds, Duration::ZERO) {
                Some((Next::Jobs(jobs), _)) => black_box(jobs.len()),
                _ => unreachable!("64 jobs were queued"),
            };
            charges.clear();
            charges.extend((0..taken as u64).map(|i| (i % 8, None)));
            q.charge(Duration::from_micros(2500), &charges);
        });
    });
    g.finish();
}

fn chunked_copy(c: &mut Criterion) {
    const LEN: usize = 1 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| i as u8).collect();
    // About what QUIC hands out: one chunk per packet's worth of stream data.
    let chunks = ChunkedPayload::from_chunks(
        data.chunks(1200)
            .map(Bytes::copy_from_slice)
            .collect::<Vec<_>>(),
    );
    let mut dst = vec![0u8; LEN];
    let mut g = c.benchmark_group("payload_1MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("copy_out_of_1200B_chunks", |b| {
        b.iter(|| {
            assert!(chunks.copy_range_to(0..LEN, black_box(&mut dst)));
        });
    });
    g.bench_function("copy_contiguous_baseline", |b| {
        b.iter(|| {
            black_box(&mut dst).copy_from_slice(black_box(&data));
        });
    });
    g.finish();
}

fn budgets(c: &mut Criterion) {
    // Every call takes a share of its client's budget and of the
    // server's, and gives both back once its reply is acknowledged.
    let mut g = c.benchmark_group("budget");
    g.bench_function("take_two_shares_and_give_back", |b| {
        let (connection, server) = (Budget::new(512 * 1024), Budget::new(4 << 20));
        b.iter(|| {
            let shares = (
                connection.try_take(black_box(1)),
                server.try_take(black_box(1)),
            );
            black_box(shares.0.is_some() && shares.1.is_some())
        });
    });
    g.bench_function("tokio_semaphore_baseline", |b| {
        let connection = Arc::new(tokio::sync::Semaphore::new(512 * 1024));
        let server = Arc::new(tokio::sync::Semaphore::new(4 << 20));
        b.iter(|| {
            let permits = (
                connection.clone().try_acquire_many_owned(black_box(1)),
                server.clone().try_acquire_many_owned(black_box(1)),
            );
            black_box(permits.0.is_ok() && permits.1.is_ok())
        });
    });
    g.finish();
}

fn fusion(c: &mut Criterion) {
    let mut g = c.benchmark_group("fusion");
    g.throughput(Throughput::Elements(64));
    // A batch of 64 saxpy-like calls (two buffers, one argument block) from
    // 8 clients, grouped into one fused dispatch per client.
    let caps = DeviceCaps {
        max_workgroups_per_dim: 65_535,
        max_storage_binding: 128 << 20,
        max_buffer_size: 256 << 20,
    };
    let lens = [1024u64, 1024];
    g.bench_function("group_64_calls_from_8_clients", |b| {
        b.iter(|| {
            let calls = (0..64u64).map(|i| {
                Some(Candidate {
                    key: (0, 0, i % 8),
                    lens: &lens,
                    params_bytes: 4,
                })
            });
            black_box(group_calls(calls, &caps))
        });
    });
    g.finish();
}

criterion_group!(benches, fair_queue, chunked_copy, budgets, fusion);
criterion_main!(benches);
