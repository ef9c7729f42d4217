//! Graceful shutdown and restarts: calls in flight finish, a client whose
//! server went away is told so with the documented close code, and the SDK
//! reconnects to the restarted server and retries on its own.

use std::sync::Arc;
use std::time::Duration;

use quasar::embedded::EmbeddedServer;
use quasar_certs::CertificateAuthority;
use quasar_client::{Call, Client, RetryPolicy, StatusCode};

fn add() -> Call {
    Call::new("add")
        .input("a", &[1.0f32, 2.0])
        .input("b", &[10.0f32, 20.0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_calls_finish_and_clients_reconnect_to_a_restarted_server() {
    let ca = Arc::new(CertificateAuthority::generate("restart CA").expect("ca"));
    let first = EmbeddedServer::start_with_ca(ca.clone(), |_| {})
        .await
        .expect("first server");
    let addr = first.addr();
    let client = Client::connect(first.client_config("retrying").expect("cert"))
        .await
        .expect("connect");
    let mut once = first.client_config("once").expect("cert");
    once.retry = RetryPolicy::never();
    once.connect_timeout = Duration::from_millis(300);
    let once = Client::connect(once).await.expect("connect");

    // A call big enough to still be running when shutdown starts.
    let x = vec![1.0f32; 1 << 22];
    let y = vec![2.0f32; 1 << 22];
    let big = Call::new("saxpy")
        .arg("a", 3.0f32)
        .input("x", &x)
        .input("y", &y);
    let in_flight = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(big).await })
    };
    // Wait until the server has the call (its upload alone takes a while).
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.stop().await;
    let done = in_flight
        .await
        .expect("join")
        .expect("the in-flight call completes");
    assert!(
        done.output::<f32>("y")
            .expect("y")
            .iter()
            .all(|v| *v == 5.0)
    );

    // Stopped: a client that does not retry is told why.
    let e = once.execute(add()).await.expect_err("the server is gone");
    assert_eq!(e.code(), StatusCode::Unavailable, "{e}");
    assert!(e.to_string().contains("server shutting down"), "{e}");

    // Restarted on the same address with the same CA: the SDK reconnects
    // and the retried call succeeds.
    let second = EmbeddedServer::start_with_ca(ca, |c| c.listen = addr)
        .await
        .expect("second server");
    let r = client
        .execute(add())
        .await
        .expect("retried after reconnecting");
    assert_eq!(r.output::<f32>("out").expect("out"), &[11.0, 22.0]);
    client.close().await;
    second.stop().await;
}

#[tokio::test]
async fn retries_give_up_with_the_last_error_and_respect_non_retryable_calls() {
    let server = EmbeddedServer::start(|_| {}).await.expect("server");
    let mut config = server.client_config("c").expect("cert");
    config.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    config.connect_timeout = Duration::from_millis(300);
    let client = Client::connect(config).await.expect("connect");
    server.stop().await;
    // Nobody answers: every attempt fails, the call ends with one error.
    let e = client.execute(add()).await.expect_err("no server");
    assert!(
        e.is_retryable() && e.code() == StatusCode::Unavailable,
        "{e}"
    );
    let e = client
        .execute(add().retryable(false))
        .await
        .expect_err("no server");
    assert_eq!(e.code(), StatusCode::Unavailable, "{e}");
    // Server answers other than UNAVAILABLE are never retried.
    assert!(!quasar_client::CallError::InvalidCall("x".into()).is_retryable());
}

#[tokio::test]
async fn a_closed_client_stays_closed() {
    let server = EmbeddedServer::start(|_| {}).await.expect("server");
    let client = Client::connect(server.client_config("c").expect("cert"))
        .await
        .expect("connect");
    client.execute(add()).await.expect("open");
    client.close().await;
    let e = client.execute(add()).await.expect_err("closed");
    assert!(!e.is_retryable(), "{e}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_a_reconnect_share_its_failure() {
    const CALLS: u32 = 16;
    let server = EmbeddedServer::start(|_| {}).await.expect("server");
    let mut config = server.client_config("c").expect("cert");
    config.retry = RetryPolicy::never();
    config.connect_timeout = Duration::from_millis(400);
    let client = Client::connect(config).await.expect("connect");
    server.stop().await;
    // Nobody answers: one dial times out, and every call that was waiting
    // for it fails with its error instead of dialling in turn (which would
    // take CALLS x 400 ms).
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.execute(add()).await })
        })
        .collect();
    for call in calls {
        let e = call.await.expect("join").expect_err("no server");
        assert_eq!(e.code(), StatusCode::Unavailable, "{e}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(400) * CALLS / 4,
        "{CALLS} waiting calls took {took:?}: they dialled one after another"
    );
}

/// A client (with `retry`) whose first call was answered by a server that
/// then stopped, and the server starting again on the same address 300 ms
/// later: after the client's first Initial went unanswered, so a
/// reconnection's handshake completes on QUIC's retransmission, well after
/// 100 ms.
async fn server_back_after_300ms(
    retry: RetryPolicy,
) -> (Client, tokio::task::JoinHandle<EmbeddedServer>) {
    let ca = Arc::new(CertificateAuthority::generate("restart-later CA").expect("ca"));
    let first = EmbeddedServer::start_with_ca(ca.clone(), |_| {})
        .await
        .expect("first server");
    let addr = first.addr();
    let mut config = first.client_config("c").expect("cert");
    config.retry = retry;
    config.connect_timeout = Duration::from_secs(10);
    let client = Client::connect(config).await.expect("connect");
    client.execute(add()).await.expect("first call");
    first.stop().await;
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        EmbeddedServer::start_with_ca(ca, move |c| c.listen = addr)
            .await
            .expect("second server")
    });
    (client, restart)
}

/// The per-attempt timeout bounds an attempt, not the reconnection before
/// it: a handshake slower than the attempt's budget still completes (cut
/// short each time, no attempt would ever find a connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnection_is_not_cut_short_by_the_per_attempt_timeout() {
    let (client, restart) = server_back_after_300ms(RetryPolicy {
        max_attempts: 2,
        per_try_timeout: Some(Duration::from_millis(100)),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(10),
    })
    .await;
    let r = client
        .execute(add())
        .await
        .expect("the call succeeds once the reconnection completes");
    assert_eq!(r.output::<f32>("out").expect("out"), &[11.0, 22.0]);
    client.close().await;
    restart.await.expect("join").stop().await;
}

/// A reconnection outlives the call that started it: a caller whose
/// deadline passes while the handshake is under way stops waiting, but the
/// dial completes, once, and the next call finds its connection. (Cut short
/// with each caller, a handshake slower than callers' deadlines would never
/// complete.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnection_outlives_the_call_that_started_it() {
    // A second attempt in case the first still found the old connection
    // (its close not yet processed): either way a dial starts in time.
    let (client, restart) = server_back_after_300ms(RetryPolicy {
        max_attempts: 2,
        per_try_timeout: None,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(5),
    })
    .await;
    let e = client
        .execute(add().deadline(Duration::from_millis(100)))
        .await
        .expect_err("the deadline passes during the dial");
    assert_eq!(e.code(), StatusCode::DeadlineExceeded, "{e}");
    let waited = std::time::Instant::now();
    while client.reconnect_attempts() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the dial was abandoned with the call that started it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = client
        .execute(add())
        .await
        .expect("the reconnected connection serves");
    assert_eq!(r.output::<f32>("out").expect("out"), &[11.0, 22.0]);
    assert_eq!(
        client.reconnect_attempts(),
        1,
        "the next call dialled again"
    );
    client.close().await;
    restart.await.expect("join").stop().await;
}

/// Closing a client while it is reconnecting stops the dial: `close` does
/// not wait out the connect timeout, and the call waiting for the dial
/// learns that the client was closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_client_stops_its_reconnection() {
    let server = EmbeddedServer::start(|_| {}).await.expect("server");
    let mut config = server.client_config("c").expect("cert");
    config.retry = RetryPolicy::never();
    config.connect_timeout = Duration::from_secs(20);
    let client = Client::connect(config).await.expect("connect");
    client.execute(add()).await.expect("first call");
    server.stop().await;
    // Nobody answers: the dial would wait out its 20 s.
    let waiting = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(add()).await })
    };
    // Time for the call to find the connection lost and start the dial.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the call waits for the dial");
    let started = std::time::Instant::now();
    client.close().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "close waited {took:?} for a dial to a server that is gone"
    );
    let e = waiting
        .await
        .expect("join")
        .expect_err("the client was closed");
    assert!(
        matches!(
            e,
            quasar_client::CallError::Connection(quinn::ConnectionError::LocallyClosed)
        ),
        "{e:?}"
    );
}
