//! Many calls at once over one connection: each gets its own result.

use quasar_client::Call;
use quasar_shaders::reference;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::task::JoinSet;

use crate::support::{assert_serving, client, server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_six_concurrent_calls_on_one_connection() {
    // Room for every call in the GPU queue: this test is about matching
    // results to callers, not about back-pressure (malformed.rs tests that).
    let server = server_with(|c| c.gpu.queue_depth = 512).await;
    let client = client(&server).await;
    let mut tasks = JoinSet::new();
    for task in 0..256u64 {
        let client = client.clone();
        tasks.spawn(async move {
            // Every task's input is different, so a result delivered to the
            // wrong caller cannot pass its check.
            let mut rng = StdRng::seed_from_u64(task);
            let n = rng.random_range(1..3000);
            let a = task as f32 + 0.5;
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let r = client
                .execute(Call::new("saxpy").arg("a", a).input("x", &x).input("y", &y))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            let got = r.output::<f32>("y").expect("y");
            let want = reference::saxpy(a, &x, &y);
            assert_eq!(got.len(), want.len(), "task {task}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-6 * (a.abs() * x[i].abs() + y[i].abs()) + 1e-6;
                assert!((g - w).abs() <= tol, "task {task} element {i}: {g} vs {w}");
            }
            task
        });
    }
    let mut done = Vec::new();
    while let Some(r) = tasks.join_next().await {
        done.push(r.expect("task panicked"));
    }
    done.sort_unstable();
    assert_eq!(done, (0..256).collect::<Vec<_>>());
    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_arrive_together_share_submissions_and_keep_their_results() {
    use quasar::samples::{call_for, host_outputs};
    use quasar_shaders::Sample;
    use std::sync::atomic::Ordering;

    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    // Every shipped kernel, mixed in the same batches.
    let kernels: Vec<&str> = quasar_shaders::SHIPPED.iter().map(|k| k.name).collect();
    // Every kernel once first, so the batches below are not the first use.
    let mut rng = StdRng::seed_from_u64(1);
    for &k in &kernels {
        let s = Sample::for_kernel(k, 64, &mut rng).expect("sample");
        client.execute(call_for(&s)).await.expect("warm-up");
    }
    let before = (
        server.stats().calls.load(Ordering::Relaxed),
        server.stats().batches.load(Ordering::Relaxed),
    );
    let mut tasks = JoinSet::new();
    for task in 0..128u64 {
        let client = client.clone();
        let kernel = kernels[task as usize % kernels.len()];
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + task);
            let size = if kernel == "matmul" {
                rng.random_range(1..40)
            } else {
                rng.random_range(1..20_000)
            };
            let s = Sample::for_kernel(kernel, size, &mut rng).expect("sample");
            let r = client
                .execute(call_for(&s))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            s.check(&host_outputs(&r))
                .unwrap_or_else(|m| panic!("task {task} ({kernel}, {size}): {m}"));
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task panicked");
    }
    let calls = server.stats().calls.load(Ordering::Relaxed) - before.0;
    let batches = server.stats().batches.load(Ordering::Relaxed) - before.1;
    assert_eq!(calls, 128);
    assert!(
        batches < calls,
        "{calls} concurrent calls took {batches} submissions: nothing was batched"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_steady_state_allocates_no_gpu_buffers() {
    use std::sync::atomic::Ordering;
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    let x = vec![1.0f32; 1024];
    let call = || {
        Call::new("saxpy")
            .arg("a", 2.0f32)
            .input("x", &x)
            .input("y", &x)
    };
    for _ in 0..5 {
        client.execute(call()).await.expect("warm-up");
    }
    let stats = server.stats();
    let created = stats.buffers_created.load(Ordering::Relaxed);
    let reused = stats.buffers_reused.load(Ordering::Relaxed);
    for _ in 0..100 {
        client.execute(call()).await.expect("call");
    }
    assert_eq!(
        stats.buffers_created.load(Ordering::Relaxed),
        created,
        "calls of a steady size created GPU buffers"
    );
    // Two storage buffers, one uniform block, one readback buffer and the
    // batch's upload buffer each (a lone call is a batch of one).
    assert_eq!(stats.buffers_reused.load(Ordering::Relaxed) - reused, 500);
    server.stop().await;
}

#[tokio::test]
async fn payload_bytes_are_copied_once_each_way_on_the_server() {
    use std::sync::atomic::Ordering;
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    let stats = server.stats();
    let (mut sent, mut returned) = (0u64, 0u64);
    for n in [1usize, 1000, 65_536, 1 << 20] {
        let x = vec![1.5f32; n];
        let r = client
            .execute(
                Call::new("saxpy")
                    .arg("a", 2.0f32)
                    .input("x", &x)
                    .input("y", &x),
            )
            .await
            .expect("call");
        assert!(r.output::<f32>("y").expect("y").iter().all(|v| *v == 4.5));
        sent += 2 * 4 * n as u64;
        returned += 4 * n as u64;
    }
    assert_eq!(stats.bytes_copied_in.load(Ordering::Relaxed), sent);
    assert_eq!(stats.bytes_copied_out.load(Ordering::Relaxed), returned);
    // The echo copies nothing: the received chunks go back out.
    let data = vec![7u32; 100_000];
    let r = client
        .execute(Call::new(quasar_client::ECHO_KERNEL).input("data", &data))
        .await
        .expect("echo");
    assert_eq!(r.output::<u32>("data").expect("data"), &data[..]);
    assert_eq!(stats.bytes_copied_in.load(Ordering::Relaxed), sent);
    assert_eq!(stats.bytes_copied_out.load(Ordering::Relaxed), returned);
    server.stop().await;
}

/// Sequential calls from one client: with a spin longer than a loopback
/// round trip, the GPU thread finds most calls while it spins and sleeps
/// rarely; with none, it never spins and sleeps between calls. Either way
/// every result is right.
#[tokio::test]
async fn the_gpu_thread_spins_for_the_next_call_as_configured() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    for spin in [Duration::from_millis(10), Duration::ZERO] {
        let server = server_with(|c| c.gpu.idle_spin = spin).await;
        let client = client(&server).await;
        let x: Vec<f32> = (0..1024).map(|i| i as f32).collect();
        let y = vec![1.0f32; 1024];
        let want = reference::saxpy(3.0, &x, &y);
        let call = || {
            Call::new("saxpy")
                .arg("a", 3.0f32)
                .input("x", &x)
                .input("y", &y)
        };
        client.execute(call()).await.expect("warm-up");
        let stats = server.stats();
        let before = (
            stats.waits_spun.load(Ordering::Relaxed),
            stats.waits_slept.load(Ordering::Relaxed),
        );
        for _ in 0..50 {
            let r = client.execute(call()).await.expect("call");
            assert_eq!(r.output::<f32>("y").expect("y"), want);
        }
        let spun = stats.waits_spun.load(Ordering::Relaxed) - before.0;
        let slept = stats.waits_slept.load(Ordering::Relaxed) - before.1;
        if spin.is_zero() {
            assert_eq!(spun, 0, "the GPU thread spun with idle_spin 0");
            // Not one per call: a debug build's GPU thread may still be
            // tidying up after a reply when the next call arrives.
            assert!(
                slept > 0,
                "50 sequential calls and the GPU thread never slept"
            );
        } else {
            // A round trip on a loaded machine may now and then outlast
            // 10 ms; most do not.
            assert!(
                spun > slept,
                "50 sequential calls: {spun} found while spinning, {slept} after sleeping"
            );
        }
        server.stop().await;
    }
}
