//! Fairness between clients: a client that floods the server is held to
//! its share of the GPU queue, and a polite client's calls keep completing
//! without waiting behind the flood; clients share GPU time, whatever
//! their calls cost. A client is a certificate identity:
//! more connections get it no bigger share of the queue or of the
//! in-flight byte budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use quasar::embedded::SERVER_NAME;
use quasar_client::{Call, Client, ECHO_KERNEL, StatusCode};

use crate::malformed::frame;
use crate::replies::echo_header;
use crate::support::{
    calibrate, client_named, config, eventually, raw_endpoint, spin, spin_server, spin_server_with,
};

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_starve_a_polite_one() {
    // Small batches, so the GPU (not the batch size) is the bottleneck and
    // the order in which queued calls are taken shows.
    let (server, _dir) = spin_server_with(|c| {
        c.gpu.max_queued_per_client = 16;
        c.gpu.max_batch = 2;
    })
    .await;
    let flooder = client_named(&server, "flooder").await;
    let polite = client_named(&server, "polite").await;
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

/// Turns go by GPU time, not by calls: a client whose calls each take
/// eight times as long gets about an eighth as many turns, so both get
/// about the same GPU time. Taken call by call, both would get as many
/// calls done, and the heavy client eight times the GPU time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_share_gpu_time_not_calls() {
    let (server, _dir) = spin_server().await;
    let heavy = client_named(&server, "heavy").await;
    let light = client_named(&server, "light").await;
    let (iters, _) = calibrate(&light).await;
    let light_iters = (iters / 64).max(1);
    let heavy_iters = 8 * light_iters;
    // "Heavy" is more workgroups of the same work: eight times the GPU
    // time on lavapipe, but a wide GPU may run both in one wave.
    let solo = |iters: u32| {
        let c = light.clone();
        async move {
            let mut took = Vec::new();
            for _ in 0..3 {
                let started = std::time::Instant::now();
                c.execute(spin(iters)).await.expect("spin");
                took.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            median(took)
        }
    };
    let (heavy_us, light_us) = (solo(heavy_iters).await, solo(light_iters).await);
    if heavy_us < 4 * light_us {
        eprintln!(
            "skipped: on {} a heavy call takes {heavy_us} us and a light one {light_us} us, \
             too close for turns by time to show",
            server.adapter()
        );
        return;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut tasks = Vec::new();
    // The light client keeps more calls in flight, so that its queue is
    // seldom empty when the GPU thread takes work.
    for (c, iters, done, calls) in [
        (&heavy, heavy_iters, &done[0], 4),
        (&light, light_iters, &done[1], 8),
    ] {
        for _ in 0..calls {
            let (c, stop, done) = (c.clone(), stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    c.execute(spin(iters)).await.expect("served");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("caller task");
    }
    let (h, l) = (
        done[0].load(Ordering::Relaxed),
        done[1].load(Ordering::Relaxed),
    );
    assert!(h > 0, "the heavy client was never served ({l} light calls)");
    assert!(
        l >= 3 * h,
        "{l} light calls of {light_iters} iterations against {h} heavy calls of {heavy_iters}: \
         turns went by calls, not by GPU time"
    );
    heavy.close().await;
    light.close().await;
    server.stop().await;
}

#[tokio::test]
async fn one_client_cannot_take_the_whole_byte_budget() {
    let server = crate::support::server_with(|c| {
        c.max_inflight_bytes_per_client = 64 * 1024;
    })
    .await;
    let client = Client::connect(config(&server)).await.expect("client");
    // 2 x 64 KiB in, 64 KiB out: past this client's budget.
    let x = vec![1.0f32; 16 * 1024];
    let e = client
        .execute(
            quasar_client::Call::new("saxpy")
                .arg("a", 1.0f32)
                .input("x", &x)
                .input("y", &x),
        )
        .await
        .expect_err("past the client's budget");
    assert_eq!(e.code(), StatusCode::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("this client's"), "{e}");
    crate::support::assert_serving(&server).await;
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_get_a_client_no_more_of_the_byte_budget() {
    const MIB: u64 = 1024 * 1024;
    let server = crate::support::server_with(|c| {
        c.max_inflight_bytes = 16 * MIB;
        c.max_inflight_bytes_per_client = 3 * MIB;
    })
    .await;
    // A connection of client `a` declares a 2 MiB echo and sends only its
    // header: the call holds 2 of a's 3 MiB until its upload times out.
    let endpoint = raw_endpoint(
        &server.ca_pem(),
        &server.issue_client("a").expect("issue a"),
    );
    let stalled = endpoint
        .connect(server.addr(), SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, _recv) = stalled.open_bi().await.expect("open");
    let request = frame(&echo_header(2 * MIB as usize));
    let head = request.len() - 2 * MIB as usize;
    send.write_all(&request[..head]).await.expect("header");

    let echo = || Call::new(ECHO_KERNEL).input("x", &vec![1u32; (2 * MIB / 4) as usize]);
    eventually("the stalled call holds its share", || {
        server.in_flight().held_bytes() >= 2 * MIB
    })
    .await;
    // Another connection of a's is refused: a's budget has 1 MiB left.
    let a = client_named(&server, "a").await;
    let e = a
        .execute(echo())
        .await
        .expect_err("a's second connection has no budget of its own");
    assert_eq!(e.code(), StatusCode::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("this client's"), "{e}");
    // Another client has its own budget.
    let b = client_named(&server, "b").await;
    let r = b.execute(echo()).await.expect("b's echo");
    assert_eq!(
        r.output::<u32>("x").expect("x").len(),
        (2 * MIB / 4) as usize
    );
    // Closing the stalled connection gives a's share back.
    stalled.close(0u32.into(), b"done");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = a.execute(echo()).await {
        assert_eq!(e.code(), StatusCode::ResourceExhausted, "{e}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "a's share was not given back when its stalled connection closed: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.close().await;
    b.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_get_a_client_no_more_of_the_gpu_queue() {
    let (server, _dir) = spin_server_with(|c| {
        c.gpu.max_queued_per_client = 2;
        c.gpu.max_batch = 1;
    })
    .await;
    let first = client_named(&server, "q").await;
    let second = client_named(&server, "q").await;
    let other = client_named(&server, "r").await;
    let (iters, _) = calibrate(&other).await;
    // Calls of about a quarter of the calibrated 250 ms.
    let iters = (iters / 4).max(1);

    // Keeps q's share of the queue (2 calls) full from its first
    // connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..4 {
        let (c, stop) = (first.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match c.execute(spin(iters)).await {
                    Ok(_) => {}
                    Err(e) if e.code() == StatusCode::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => panic!("q's first connection: unexpected {e}"),
                }
            }
        }));
    }
    // q's second connection finds the share taken: with a share of its
    // own it would be queued every time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        match second.execute(spin(iters)).await {
            Ok(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "q's second connection had a queue share of its own for 10 s"
            ),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), StatusCode::ResourceExhausted, "{e}");
    assert!(
        e.to_string().contains("this client already has 2 calls"),
        "{e}"
    );
    // Another client has a share of its own, and its turn.
    other.execute(spin(iters)).await.expect("r's call");

    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.expect("flood task");
    }
    first.close().await;
    second.close().await;
    other.close().await;
    server.stop().await;
}
