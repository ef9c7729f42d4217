//! Fairness between connections: a client that floods the server is held to
//! its share of the GPU queue, and a polite client's calls keep completing
//! without waiting behind the flood.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use quasar_client::{Client, StatusCode};

use crate::support::{calibrate, config, spin, spin_server_with};

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_starve_a_polite_one() {
    // Small batches, so the GPU (not the batch size) is the bottleneck and
    // the order in which queued calls are taken shows.
    let (server, _dir) = spin_server_with(|c| {
        c.gpu.max_queued_per_connection = 16;
        c.gpu.max_batch = 2;
    })
    .await;
    let flooder = Client::connect(config(&server)).await.expect("flooder");
    let polite = Client::connect(config(&server)).await.expect("polite");
    let (iters, _) = calibrate(&polite).await;
    // A call of about a sixteenth of the calibrated 250 ms.
    let iters = (iters / 16).max(1);

    let stop = Arc::new(AtomicBool::new(false));
    let exhausted = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for _ in 0..48 {
        let (c, stop, exhausted) = (flooder.clone(), stop.clone(), exhausted.clone());
        flood.push(tokio::spawn(async move {
            let mut queued = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.execute(spin(iters)).await {
                    Ok(r) => queued.push(r.timings().queued_us),
                    Err(e) if e.code() == StatusCode::ResourceExhausted => {
                        exhausted.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("flooder: unexpected {e}"),
                }
            }
            queued
        }));
    }
    // Let the flood fill its share of the queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut polite_queued = Vec::new();
    for _ in 0..12 {
        let r = polite
            .execute(spin(iters))
            .await
            .expect("the polite client is served during the flood");
        polite_queued.push(r.timings().queued_us);
    }
    stop.store(true, Ordering::Relaxed);
    let mut flood_queued = Vec::new();
    for t in flood {
        flood_queued.extend(t.await.expect("flooder task"));
    }

    let (polite_p50, flood_p50) = (median(polite_queued), median(flood_queued));
    assert!(
        exhausted.load(Ordering::Relaxed) > 0,
        "the flooder was never held to its share of the queue"
    );
    // The flooder waits behind its own 16 queued calls; the polite client
    // only for the turn in progress.
    assert!(
        polite_p50 * 3 < flood_p50,
        "polite calls waited {polite_p50} us in the queue (median), the flood's {flood_p50} us"
    );
    flooder.close().await;
    polite.close().await;
    server.stop().await;
}

#[tokio::test]
async fn one_connection_cannot_take_the_whole_byte_budget() {
    let server = crate::support::server_with(|c| {
        c.max_inflight_bytes_per_connection = 64 * 1024;
    })
    .await;
    let client = Client::connect(config(&server)).await.expect("client");
    // 2 x 64 KiB in, 64 KiB out: past this connection's budget.
    let x = vec![1.0f32; 16 * 1024];
    let e = client
        .execute(
            quasar_client::Call::new("saxpy")
                .arg("a", 1.0f32)
                .input("x", &x)
                .input("y", &x),
        )
        .await
        .expect_err("past the connection's budget");
    assert_eq!(e.code(), StatusCode::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("this connection's"), "{e}");
    crate::support::assert_serving(&server).await;
    client.close().await;
    server.stop().await;
}
