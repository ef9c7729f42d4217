//! A reply's share of the in-flight byte budgets is held until the client
//! has acknowledged the reply (quinn keeps its bytes until then, however
//! early the server's write returns), and is given back after: by the
//! connection's periodic check when it is idle, and before a call of the
//! same client would be refused. A reply never acknowledged is reset in
//! time, so a client cannot pin its share that way.

use quasar::embedded::{EmbeddedServer, SERVER_NAME};
use quasar_client::Call;
use quasar_transport::{BufferDesc, ECHO_KERNEL, ElemType, RequestHeader, StatusCode};

use crate::malformed::frame;
use crate::support::{client, eventually, raw_endpoint, read_reply, server_with};

const MIB: usize = 1024 * 1024;

/// A raw echo request's header, for `bytes` of payload.
pub(crate) fn echo_header(bytes: usize) -> RequestHeader {
    RequestHeader {
        kernel: ECHO_KERNEL.into(),
        args: Vec::new(),
        buffers: vec![BufferDesc {
            name: "x".into(),
            elem: ElemType::U32,
            len: (bytes / 4) as u64,
        }],
        timeout_us: None,
        workgroups: None,
    }
}

/// A raw client on a runtime of its own that sends an echo of `bytes` and,
/// once the server has acknowledged the whole request, stops running: while
/// it is not polled it receives and acknowledges nothing. Sending on the
/// returned channel (or dropping it) runs it again, to run `then` on the
/// reply's stream and close. The receiver says when the request is in.
fn silent_client<F, Fut>(
    server: &EmbeddedServer,
    name: &str,
    bytes: usize,
    then: F,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
)
where
    F: FnOnce(quinn::RecvStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let ca = server.ca_pem();
    let id = server.issue_client(name).expect("issue");
    let addr = server.addr();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (endpoint, conn, recv) = rt.block_on(async {
            let endpoint = raw_endpoint(&ca, &id);
            let conn = endpoint
                .connect(addr, SERVER_NAME)
                .expect("connect")
                .await
                .expect("handshake");
            let (mut send, recv) = conn.open_bi().await.expect("open");
            send.write_all(&frame(&echo_header(bytes)))
                .await
                .expect("write");
            send.finish().expect("finish");
            // Resolves once the server has acknowledged the whole request.
            send.stopped().await.expect("request acknowledged");
            (endpoint, conn, recv)
        });
        sent_tx.send(()).expect("the test waits");
        let _ = go_rx.recv();
        rt.block_on(async {
            then(recv).await;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        });
    });
    (sent_rx, go_tx, thread)
}

fn echo(bytes: usize) -> Call {
    Call::new(ECHO_KERNEL).input("x", &vec![7u32; bytes / 4])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_holds_its_budget_until_the_client_acknowledges_it() {
    let server = server_with(|c| {
        c.max_inflight_bytes = 3 * MIB as u64;
        c.max_inflight_bytes_per_client = 3 * MIB as u64;
    })
    .await;
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let (sent_rx, go_tx, silent) =
        silent_client(&server, "silent", 2 * MIB, |mut recv| async move {
            read_tx
                .send(read_reply(&mut recv).await)
                .expect("the test waits");
            // Running, so the reply is acknowledged, until told to close.
            let _ = close_rx.await;
        });
    sent_rx.await.expect("the silent client sent its request");
    eventually("the silent client's call holds its share", || {
        server.in_flight().held_bytes() >= 2 * MIB as u64
    })
    .await;
    // Time for the server to write its 2 MiB reply, which quinn then holds
    // unacknowledged.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let other = client(&server).await;
    let e = other
        .execute(echo(2 * MIB))
        .await
        .expect_err("the unacknowledged reply holds 2 of the server's 3 MiB");
    assert_eq!(e.code(), StatusCode::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("the server's"), "{e}");

    go_tx.send(()).expect("the silent client waits");
    let (code, message) = read_rx.await.expect("the silent client read its reply");
    assert_eq!(code, StatusCode::Ok, "{message}");
    // Its connection now idle, the acknowledged reply's share comes back by
    // the connection's periodic check.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match other.execute(echo(2 * MIB)).await {
            Ok(r) => {
                let x = r.output::<u32>("x").expect("x");
                assert_eq!(x.len(), 2 * MIB / 4);
                assert!(x.iter().all(|&v| v == 7), "the echo changed its payload");
                break;
            }
            Err(e) if e.code() == StatusCode::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the acknowledged reply's share was not given back in 10 s: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("echo: {e}"),
        }
    }
    let _ = close_tx.send(());
    silent.join().expect("the silent client's thread");
    other.close().await;
    server.stop().await;
}

#[tokio::test]
async fn acknowledged_replies_give_their_share_back_before_a_call_is_refused() {
    let server = server_with(|c| c.max_inflight_bytes_per_client = 3 * MIB as u64).await;
    let client = client(&server).await;
    // Each call needs 2 of the client's 3 MiB, so each needs the last
    // one's share back, though no periodic check has run since. The
    // acknowledgement of a reply rides with the client's next packet
    // (quinn bundles pending acknowledgements with whatever it sends), so
    // the server has it when the next request's header arrives.
    for i in 0..4 {
        let r = client
            .execute(echo(2 * MIB))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        let x = r.output::<u32>("x").expect("x");
        assert_eq!(x.len(), 2 * MIB / 4);
        assert!(x.iter().all(|&v| v == 7), "call {i} changed its payload");
    }
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_never_acknowledged_is_reset_and_its_share_given_back() {
    let server = server_with(|c| {
        // The reply is given 1 s, plus its length at 4 MiB/s, to be read,
        // and as long again to be acknowledged.
        c.request_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    // Never run again until the test ends.
    let (sent_rx, go_tx, mute) = silent_client(&server, "mute", 2 * MIB, |_| async {});
    sent_rx.await.expect("the mute client sent its request");
    eventually("the mute client's call holds its share", || {
        server.in_flight().held_bytes() >= 2 * MIB as u64
    })
    .await;
    // Read by 1.5 s, acknowledged by 3 s: reset, and its share back by the
    // connection's next check.
    let reset = std::time::Instant::now();
    eventually("the unacknowledged reply is reset", || {
        server.in_flight().held_bytes() == 0
    })
    .await;
    assert!(
        reset.elapsed() >= std::time::Duration::from_secs(1),
        "the share came back before the reply could have been acknowledged"
    );
    let _ = go_tx.send(());
    mute.join().expect("the mute client's thread");
    server.stop().await;
}

#[tokio::test]
async fn another_clients_acknowledged_replies_give_the_server_budget_back_before_a_refusal() {
    let server = server_with(|c| {
        c.max_inflight_bytes = 3 * MIB as u64;
        c.max_inflight_bytes_per_client = 3 * MIB as u64;
    })
    .await;
    let first = crate::support::client_named(&server, "first").await;
    let second = crate::support::client_named(&server, "second").await;
    first.execute(echo(2 * MIB)).await.expect("first's echo");
    // first's share is free once first has acknowledged the reply (quinn
    // may delay that by up to 25 ms), but listed until its connection's
    // next check, a second apart; second's call, short of the server's
    // budget, checks every client's. Three tries 50 ms apart, for an
    // acknowledgement slowed by a busy machine.
    let mut tries = 0;
    let r = loop {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tries += 1;
        match second.execute(echo(2 * MIB)).await {
            Ok(r) => break r,
            Err(e) if e.code() == StatusCode::ResourceExhausted && tries < 3 => {}
            Err(e) => panic!("second's echo: first's acknowledged reply gives its share back: {e}"),
        }
    };
    assert_eq!(r.output::<u32>("x").expect("x").len(), 2 * MIB / 4);
    first.close().await;
    second.close().await;
    server.stop().await;
}
