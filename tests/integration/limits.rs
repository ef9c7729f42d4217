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

/// The payload must keep pace with the minimum transfer rate all along: a
/// client that declares a large payload and then stalls is cut off at the
/// request timeout plus what it sent at that rate, not at the end of its
/// whole length's allowance, and its share of the budgets comes back then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_stalls_is_reset_when_it_falls_behind_not_at_its_length() {
    let server = server_with(|c| {
        c.request_timeout = Duration::from_millis(500);
        // 1 MiB/s: the whole 16 MiB would be given 16.5 s.
        c.min_transfer_rate = 1024 * 1024;
    })
    .await;
    let (_endpoint, conn) = raw_connection(&server).await;
    let whole = frame(&saxpy_header(1 << 21, 1 << 21));
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let started = std::time::Instant::now();
    // The header and 64 KiB of payload (due by 0.5 s + 62.5 ms), then
    // nothing.
    let head = whole.len() - 16 * 1024 * 1024;
    send.write_all(&whole[..head + 64 * 1024])
        .await
        .expect("write");
    crate::support::eventually("the call holds its share", || {
        server.in_flight().held_bytes() >= 16 * 1024 * 1024
    })
    .await;
    crate::support::expect_reset(&mut recv, quasar_transport::StreamCode::RequestTimeout).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "reset after {took:?}: due at about 0.56 s, the whole allowance 16.5 s"
    );
    crate::support::eventually("the call's share comes back", || {
        server.in_flight().held_bytes() == 0
    })
    .await;
    server.stop().await;
}
