//! A reply's share of the in-flight byte budgets is held until the client
//! has acknowledged the reply (quinn keeps its bytes until then, however
//! early the server's write returns), and is given back after: by the
//! connection's periodic check when it is idle, and before a call of the
//! same connection would be refused.

use quasar::embedded::SERVER_NAME;
use quasar_client::Call;
use quasar_transport::{BufferDesc, ECHO_KERNEL, ElemType, RequestHeader, StatusCode};

use crate::malformed::frame;
use crate::support::{client, raw_endpoint, read_reply, server_with};

const MIB: usize = 1024 * 1024;

fn echo(bytes: usize) -> Call {
    Call::new(ECHO_KERNEL).input("x", &vec![7u32; bytes / 4])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_holds_its_budget_until_the_client_acknowledges_it() {
    let server = server_with(|c| {
        c.max_inflight_bytes = 3 * MIB as u64;
        c.max_inflight_bytes_per_connection = 3 * MIB as u64;
    })
    .await;
    let ca = server.ca_pem();
    let id = server.issue_client("silent").expect("issue");
    let addr = server.addr();
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    // A client on a runtime of its own, which it stops running once the
    // server has its whole request: while it is not polled, it receives
    // nothing and acknowledges nothing.
    let silent = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (endpoint, conn, mut recv) = rt.block_on(async {
            let endpoint = raw_endpoint(&ca, &id);
            let conn = endpoint
                .connect(addr, SERVER_NAME)
                .expect("connect")
                .await
                .expect("handshake");
            let (mut send, recv) = conn.open_bi().await.expect("open");
            let header = RequestHeader {
                kernel: ECHO_KERNEL.into(),
                args: Vec::new(),
                buffers: vec![BufferDesc {
                    name: "x".into(),
                    elem: ElemType::U32,
                    len: (2 * MIB / 4) as u64,
                }],
                timeout_us: None,
                workgroups: None,
            };
            send.write_all(&frame(&header)).await.expect("write");
            send.finish().expect("finish");
            // Resolves once the server has acknowledged the whole request.
            send.stopped().await.expect("request acknowledged");
            (endpoint, conn, recv)
        });
        sent_tx.send(()).expect("the test waits");
        go_rx.recv().expect("told to read the reply");
        rt.block_on(async {
            let (code, message) = read_reply(&mut recv).await;
            read_tx.send((code, message)).expect("the test waits");
            // Running, so the reply is acknowledged, until told to close.
            let _ = close_rx.await;
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        });
    });
    sent_rx.await.expect("the silent client sent its request");
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
    let server = server_with(|c| c.max_inflight_bytes_per_connection = 3 * MIB as u64).await;
    let client = client(&server).await;
    // Each call needs 2 of the connection's 3 MiB, so each needs the last
    // one's share back, though no periodic check has run since.
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
