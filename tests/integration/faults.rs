//! GPU faults: a lost device is recreated with its pipelines; calls caught
//! by the loss get UNAVAILABLE (which the SDK retries) and later calls
//! succeed with correct results.

use std::sync::atomic::Ordering;

use quasar_client::{Client, RetryPolicy, StatusCode};

use crate::support::{calibrate, config, spin, spin_server};

fn saxpy_check(r: &quasar_client::Response, n: usize) {
    let y = r.output::<f32>("y").expect("y");
    assert_eq!(y.len(), n);
    assert!(
        y.iter()
            .enumerate()
            .all(|(i, v)| *v == 2.0 * i as f32 + 1.0)
    );
}

fn saxpy(n: usize) -> quasar_client::Call {
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    quasar_client::Call::new("saxpy")
        .arg("a", 2.0f32)
        .input("x", &x)
        .input("y", &vec![1.0f32; n])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_is_recreated_and_later_calls_succeed() {
    let (server, _dir) = spin_server().await;
    let retrying = Client::connect(config(&server)).await.expect("client");
    let mut once = config(&server);
    once.retry = RetryPolicy::never();
    let once = Client::connect(once).await.expect("client");
    let (iters, _) = calibrate(&retrying).await;

    // A slow call occupies the GPU; calls queued behind it are caught by
    // the loss, which happens right after it.
    let busy = {
        let c = once.clone();
        tokio::spawn(async move { c.execute(spin(iters)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let mut queued = Vec::new();
    for n in [100, 1000, 5000] {
        let (a, b) = (once.clone(), retrying.clone());
        queued.push((n, tokio::spawn(async move { a.execute(saxpy(n)).await })));
        queued.push((n, tokio::spawn(async move { b.execute(saxpy(n)).await })));
    }
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    server.reloader().lose_device().await;

    busy.await
        .expect("join")
        .expect("the call running when the loss was asked for completes");
    let mut unavailable = 0;
    for (n, call) in queued {
        match call.await.expect("join") {
            Ok(r) => saxpy_check(&r, n),
            Err(e) => {
                assert_eq!(e.code(), StatusCode::Unavailable, "{e}");
                assert!(e.to_string().contains("recreated"), "{e}");
                unavailable += 1;
            }
        }
    }
    // Only the client that does not retry can see the loss.
    assert!(unavailable <= 3, "{unavailable} calls failed");
    assert_eq!(server.stats().devices_lost.load(Ordering::Relaxed), 1);

    // The new device runs every kernel, the slow one included.
    for n in [1, 64, 100_000] {
        saxpy_check(&once.execute(saxpy(n)).await.expect("after recovery"), n);
    }
    once.execute(spin(1)).await.expect("spin after recovery");
    crate::support::assert_serving(&server).await;
    server.stop().await;
}
