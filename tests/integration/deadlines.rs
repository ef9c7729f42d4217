//! Deadlines and cancellation: a call whose deadline passes while queued is
//! never run, the client gives up on its own clock, and dropping a call's
//! future resets its stream so the server skips it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quasar_client::{Call, StatusCode};

use crate::support::{client, server_with};

/// A kernel slow on purpose: one invocation spinning `iters` times.
// Slow by the number of workgroups: lavapipe stops any loop of one
// invocation after 65,535 iterations, so the work is spread over
// `iters` workgroups of a fixed, loop-carried chain the compiler cannot fold.
const SPIN: &str = r#"// quasar: output out = iters * 64
// quasar: stage main = iters
struct Params { iters: u32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> seed: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    var x = seed[0] + f32(gid.x);
    for (var i = 0u; i < 60000u; i++) { x = fract(x * 1.0001 + 0.1); }
    out[gid.x] = x;
}
"#;

fn spin(iters: u32) -> Call {
    Call::new("spin")
        .arg("iters", iters)
        .input("seed", &[0.5f32])
}

async fn spin_server() -> (quasar::embedded::EmbeddedServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("spin.wgsl"), SPIN).expect("write");
    let path = dir.path().to_owned();
    (server_with(|c| c.gpu.kernel_dir = Some(path)).await, dir)
}

/// Finds an iteration count whose call takes at least 100 ms here (bounded),
/// and returns it with that call's duration.
async fn calibrate(client: &quasar_client::Client) -> (u32, Duration) {
    // The first call of a kernel is slow for reasons of its own (the driver
    // compiles on first use); keep it out of the measurement.
    client.execute(spin(1)).await.expect("warm-up");
    let mut iters = 1u32;
    loop {
        let started = Instant::now();
        client.execute(spin(iters)).await.expect("spin");
        let took = started.elapsed();
        if took >= Duration::from_millis(250) || iters >= 16384 {
            return (iters, took);
        }
        iters = iters.saturating_mul(2);
    }
}

/// Waits (bounded) until the executor has taken `n` jobs off its queue.
async fn executor_settles(stats: &quasar_server::ExecutorStats, n: u64) {
    let until = Instant::now() + Duration::from_secs(30);
    while stats.calls.load(Ordering::Relaxed)
        + stats.cancelled.load(Ordering::Relaxed)
        + stats.expired.load(Ordering::Relaxed)
        < n
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_in_the_queue_is_not_run() {
    let (server, _dir) = spin_server().await;
    let client = client(&server).await;
    let (iters, one) = calibrate(&client).await;
    let before = server.stats().calls.load(Ordering::Relaxed);
    let busy = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(spin(iters)).await })
    };
    // Queued behind the slow call with a deadline far shorter than it.
    tokio::time::sleep(one / 10).await;
    let deadline = (one / 4).max(Duration::from_millis(1));
    let e = client
        .execute(spin(1).deadline(deadline))
        .await
        .expect_err("the deadline must pass");
    assert_eq!(e.code(), StatusCode::DeadlineExceeded, "{e}");
    busy.await
        .expect("join")
        .expect("the slow call still completes");
    let stats = server.stats();
    executor_settles(stats, before + 2).await;
    assert_eq!(
        stats.calls.load(Ordering::Relaxed),
        before + 1,
        "the expired call ran"
    );
    assert_eq!(
        stats.expired.load(Ordering::Relaxed) + stats.cancelled.load(Ordering::Relaxed),
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_call_cancels_it_on_the_server() {
    let (server, _dir) = spin_server().await;
    let client = client(&server).await;
    let (iters, one) = calibrate(&client).await;
    let before = server.stats().calls.load(Ordering::Relaxed);
    let busy = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(spin(iters)).await })
    };
    tokio::time::sleep(one / 10).await;
    let doomed = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(spin(1)).await })
    };
    // Let it reach the server's queue, then drop it.
    tokio::time::sleep(one / 5).await;
    doomed.abort();
    assert!(doomed.await.expect_err("aborted").is_cancelled());
    busy.await
        .expect("join")
        .expect("the slow call still completes");
    let stats = server.stats();
    executor_settles(stats, before + 2).await;
    assert_eq!(
        stats.cancelled.load(Ordering::Relaxed),
        1,
        "the dropped call was not skipped"
    );
    assert_eq!(stats.calls.load(Ordering::Relaxed), before + 1);
    // The connection is unaffected.
    client.execute(spin(1)).await.expect("still serving");
    server.stop().await;
}
