//! The built-in echo: buffers come back unchanged without GPU work, for
//! every authenticated client whatever the policy, and with the same
//! request checking as any call.

use quasar_client::{Call, ECHO_KERNEL, StatusCode};

use crate::support::{client, server_with};

#[tokio::test]
async fn the_echo_returns_every_buffer_unchanged_even_under_a_deny_all_policy() {
    let server = server_with(|c| {
        c.policy = toml::from_str("default = \"deny\"").expect("policy");
    })
    .await;
    let client = client(&server).await;
    let ints: Vec<i32> = (-500..501).collect();
    let floats: Vec<f32> = (0..7).map(|i| i as f32 * 0.5).collect();
    let r = client
        .execute(
            Call::new(ECHO_KERNEL)
                .input("ints", &ints)
                .input("floats", &floats)
                .input("one", &[42u32]),
        )
        .await
        .expect("echo");
    assert_eq!(r.output::<i32>("ints").expect("ints"), &ints[..]);
    assert_eq!(r.output::<f32>("floats").expect("floats"), &floats[..]);
    assert_eq!(r.output::<u32>("one").expect("one"), &[42]);
    assert_eq!(r.timings().gpu_us, 0, "no GPU work");
    client.ping().await.expect("ping");
    // The policy still applies to kernels.
    let e = client
        .execute(Call::new("add").input("a", &[1.0f32]).input("b", &[1.0f32]))
        .await
        .expect_err("denied");
    assert_eq!(e.code(), StatusCode::PermissionDenied, "{e}");
    assert_eq!(
        server
            .stats()
            .calls
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    server.stop().await;
}

#[tokio::test]
async fn the_echo_checks_its_request() {
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    let e = client
        .execute(Call::new(ECHO_KERNEL).arg("a", 1.0f32))
        .await
        .expect_err("arguments");
    assert_eq!(e.code(), StatusCode::InvalidArgument, "{e}");
    assert!(e.to_string().contains("no arguments"), "{e}");
    crate::support::assert_serving(&server).await;
    server.stop().await;
}

/// Each side reads the end of the other's stream along with the frame, so
/// a call costs one packet each way: a receive side dropped before its FIN
/// was read made QUIC send STOP_SENDING, a second packet each way per call.
#[tokio::test]
async fn a_small_call_is_one_packet_each_way_with_no_stop_sending() {
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    client.ping().await.expect("warm-up");
    let before = client.connection_stats();
    const CALLS: u64 = 200;
    for i in 0..CALLS {
        let data = [i as u32; 16];
        let r = client
            .execute(Call::new(ECHO_KERNEL).input("data", &data))
            .await
            .expect("echo");
        assert_eq!(r.output::<u32>("data").expect("data"), &data);
    }
    let after = client.connection_stats();
    assert_eq!(
        after.frame_tx.stop_sending - before.frame_tx.stop_sending,
        0,
        "the client stopped streams"
    );
    assert_eq!(
        after.frame_rx.stop_sending - before.frame_rx.stop_sending,
        0,
        "the server stopped streams"
    );
    let sent = after.udp_tx.datagrams - before.udp_tx.datagrams;
    let received = after.udp_rx.datagrams - before.udp_rx.datagrams;
    // A few acknowledgement-only packets may come on top.
    assert!(
        sent <= CALLS * 5 / 4,
        "{sent} datagrams sent for {CALLS} calls"
    );
    assert!(
        received <= CALLS * 5 / 4,
        "{received} datagrams received for {CALLS} calls"
    );
    client.close().await;
    server.stop().await;
}

/// Loopback carries 64 KiB datagrams, so MTU discovery should settle near
/// Quasar's 6500-byte ceiling and a 1 MiB payload travel in about 165 datagrams
/// rather than the 750 it took with quinn's default 1452 bytes. A ceiling that made
/// quinn's GSO batches exceed what Linux sends would show here as a black
/// hole and a fall back to 1200-byte packets.
#[tokio::test]
async fn a_large_payload_travels_in_large_datagrams_over_loopback() {
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    let data: Vec<u32> = (0..256 * 1024).collect();
    client.ping().await.expect("warm-up");
    crate::support::eventually("MTU discovery passes 6000 bytes", || {
        client.connection_stats().path.current_mtu >= 6000
    })
    .await;
    let before = client.connection_stats();
    const CALLS: u64 = 8;
    for _ in 0..CALLS {
        let r = client
            .execute(Call::new(ECHO_KERNEL).input("data", &data))
            .await
            .expect("echo");
        assert!(r.output::<u32>("data").expect("data") == &data[..]);
    }
    let after = client.connection_stats();
    assert_eq!(after.path.black_holes_detected, 0, "{:?}", after.path);
    let sent = (after.udp_tx.datagrams - before.udp_tx.datagrams) / CALLS;
    let received = (after.udp_rx.datagrams - before.udp_rx.datagrams) / CALLS;
    assert!(
        sent <= 250,
        "{sent} datagrams sent per MiB; {:?}",
        after.path
    );
    assert!(
        received <= 250,
        "{received} datagrams received per MiB; {:?}",
        after.path
    );
    client.close().await;
    server.stop().await;
}

/// A call run by reference is sent whole every time, deadline included;
/// the SDK refuses a call over its own limits before sending it (the error
/// says so: it is not a server's answer), and the connection goes on.
#[tokio::test]
async fn a_call_runs_by_reference_and_the_sdk_checks_its_own_limits() {
    let server = server_with(|_| {}).await;
    let mut config = crate::support::config(&server);
    config.limits.max_header_len = 256;
    config.limits.max_payload_len = 1024;
    let client = quasar_client::Client::connect(config)
        .await
        .expect("connect");
    let data: Vec<u32> = (0..100).collect();
    let call = Call::new(ECHO_KERNEL)
        .input("v", &data)
        .deadline(std::time::Duration::from_secs(5));
    for _ in 0..3 {
        let r = client.execute(&call).await.expect("echo");
        assert_eq!(r.output::<u32>("v").expect("v"), &data[..]);
    }
    let long_name = "n".repeat(300);
    let e = client
        .execute(Call::new(ECHO_KERNEL).input(long_name.as_str(), &[1u32]))
        .await
        .expect_err("header over the limit");
    assert!(
        matches!(e, quasar_client::CallError::InvalidCall(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("limit of 256 bytes"), "{e}");
    let e = client
        .execute(Call::new(ECHO_KERNEL).input("v", &[0u32; 300]))
        .await
        .expect_err("payload over the limit");
    assert!(
        e.to_string()
            .contains("payload of 1200 bytes exceeds the limit of 1024 bytes"),
        "{e}"
    );
    client.execute(&call).await.expect("still serving");
    server.stop().await;
}
