//! Limits enforced by QUIC itself and by the adapter's caps, over real
//! connections: concurrent streams per connection, the idle timeout, and a
//! dispatch larger than the adapter allows.

use std::sync::atomic::Ordering;
use std::time::Duration;

use quasar_client::StatusCode;

use crate::malformed::{frame, saxpy_header};
use crate::support::{client, raw_connection, read_reply, server_with, spin, spin_server};

#[tokio::test]
async fn calls_past_the_stream_limit_wait_for_a_free_stream() {
    let server = server_with(|c| c.quic.max_concurrent_streams = 2).await;
    let (_endpoint, conn) = raw_connection(&server).await;
    let request = frame(&saxpy_header(4, 4));
    // Two calls open and half sent: the connection's two streams are taken.
    let (mut s1, r1) = conn.open_bi().await.expect("first stream");
    s1.write_all(&request[..8]).await.expect("write");
    let (mut s2, _r2) = conn.open_bi().await.expect("second stream");
    s2.write_all(&request[..8]).await.expect("write");
    // A third waits for QUIC stream credit instead of being refused.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a third stream opened past MAX_STREAMS = 2"
    );
    // Finishing the first call frees its stream.
    s1.write_all(&request[8..]).await.expect("write the rest");
    s1.finish().expect("finish");
    let mut r1 = r1;
    r1.read_to_end(1 << 20)
        .await
        .expect("the first call's reply");
    let (mut s3, mut r3) = tokio::time::timeout(Duration::from_secs(5), conn.open_bi())
        .await
        .expect("a stream is free again")
        .expect("open");
    s3.write_all(&request).await.expect("write");
    s3.finish().expect("finish");
    let reply = r3
        .read_to_end(1 << 20)
        .await
        .expect("the third call's reply");
    assert!(!reply.is_empty());
    drop(s2);
    server.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let server = server_with(|c| c.quic.idle_timeout = Duration::from_millis(400)).await;
    // The raw client sends no keep-alives.
    let (_endpoint, conn) = raw_connection(&server).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed within the idle timeout and some slack");
    assert!(
        matches!(reason, quinn::ConnectionError::TimedOut),
        "{reason}"
    );
    crate::support::eventually("the server to stop counting the idle connection", || {
        server.connection_stats().open.load(Ordering::Relaxed) == 0
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_dispatch_beyond_the_adapters_limits_is_refused_before_submission() {
    let (server, _dir) = spin_server().await;
    let client = client(&server).await;
    // One workgroup per iteration: past max_compute_workgroups_per_dimension.
    let e = client
        .execute(spin(70_000))
        .await
        .expect_err("too many workgroups");
    assert_eq!(e.code(), StatusCode::InvalidArgument, "{e}");
    assert_eq!(
        server.stats().calls.load(Ordering::Relaxed),
        0,
        "it reached the GPU"
    );
    client.execute(spin(1)).await.expect("still serving");
    server.stop().await;
}

/// A large request is given time for its length at the minimum transfer
/// rate on top of the request timeout: an upload slower than the timeout
/// alone allows, but faster than that rate, completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_is_given_time_for_its_length() {
    let server = server_with(|c| {
        c.request_timeout = Duration::from_millis(300);
        // 2 MiB/s: a 2 MiB payload gets one second more.
        c.min_transfer_rate = 2 * 1024 * 1024;
    })
    .await;
    let (_endpoint, conn) = raw_connection(&server).await;
    // 2 MiB of payload (x and y of 256 Ki floats) sent over about 675 ms:
    // past the 300 ms timeout alone, well within its 1.3 s with the
    // allowance.
    let whole = frame(&saxpy_header(1 << 18, 1 << 18));
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let started = std::time::Instant::now();
    for piece in whole.chunks(whole.len() / 8 + 1) {
        send.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(75)).await;
    }
    send.finish().expect("finish");
    assert!(started.elapsed() > Duration::from_millis(400));
    let (code, message) = read_reply(&mut recv).await;
    assert_eq!(code, StatusCode::Ok, "{message}");
    server.stop().await;
}
