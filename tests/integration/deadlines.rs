//! Deadlines and cancellation: a call whose deadline passes while queued is
//! never run, the client gives up on its own clock, and dropping a call's
//! future resets its stream so the server skips it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quasar_client::StatusCode;

use crate::support::{calibrate, client, spin, spin_server};

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
