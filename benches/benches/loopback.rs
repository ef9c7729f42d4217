//! One call end to end, in-process: a real server on 127.0.0.1 with mutual
//! TLS, a real client, saxpy on the local adapter; beside it the same call
//! dispatched locally without the network. The difference is what the
//! network path costs per call.
//!
//! Then 64 of those calls at once, remote and local: they reach the GPU
//! executor together, so this times its batched path (one pooled upload
//! buffer for the batch's inputs, one submission, the read-back) per call.
//!
//! `cargo bench -p quasar-benches --bench loopback`

#![allow(missing_docs, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use quasar::embedded::EmbeddedServer;
use quasar_client::{Call, Client};
use quasar_server::GpuConfig;
use quasar_server::local::LocalDispatcher;

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (server, client, local) = rt.block_on(async {
        let server = EmbeddedServer::start(|_| {}).await.expect("server");
        let client = Client::connect(server.client_config("bench").expect("cert"))
            .await
            .expect("connect");
        let local = LocalDispatcher::start(GpuConfig::default())
            .await
            .expect("local");
        (server, client, local)
    });
    let x = vec![1.0f32; 1024];
    let y = vec![2.0f32; 1024];
    let call = Call::new("saxpy")
        .arg("a", 3.0f32)
        .input("x", &x)
        .input("y", &y);
    let (header, buffers) = call.clone().into_request().expect("request");
    let payload = quasar_transport::wire::lay_out(&buffers);

    let mut group = c.benchmark_group("saxpy_1024");
    group.bench_function("remote_loopback_call", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(client.execute(&call).await.expect("call")) })
    });
    group.bench_function("local_dispatch", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                local
                    .dispatch(&header, payload.clone())
                    .await
                    .expect("dispatch"),
            )
        })
    });
    group.finish();

    const BATCH: usize = 64;
    let mut group = c.benchmark_group("saxpy_1024_64_at_once");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("remote_loopback_calls", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..BATCH).map(|_| client.execute(&call));
            for r in join_all(calls).await {
                black_box(r.expect("call"));
            }
        })
    });
    group.bench_function("local_dispatches", |b| {
        b.to_async(&rt).iter(|| async {
            let calls = (0..BATCH).map(|_| local.dispatch(&header, payload.clone()));
            for r in join_all(calls).await {
                black_box(r.expect("dispatch"));
            }
        })
    });
    group.finish();
    rt.block_on(async {
        client.close().await;
        server.stop().await;
        local.shutdown().await;
    });
}

criterion_group!(benches, loopback);
criterion_main!(benches);
