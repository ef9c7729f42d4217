//! One call end to end, in-process: a real server on 127.0.0.1 with mutual
//! TLS, a real client, saxpy on the local adapter; beside it the same call
//! dispatched locally without the network. The difference is what the
//! network path costs per call.
//!
//! `cargo bench -p quasar-benches --bench loopback`

#![allow(missing_docs, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
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
    rt.block_on(async {
        client.close().await;
        server.stop().await;
        local.shutdown().await;
    });
}

criterion_group!(benches, loopback);
criterion_main!(benches);
