//! Admission: connections are capped in total and per client address, and
//! a flood of handshakes that never finish gets QUIC Retries, holds a
//! bounded number of slots, expires fast, and does not keep real clients
//! out.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quasar_client::{Call, Client};
use quasar_server::AddressValidation;

use crate::support::{assert_serving, config, eventually, server_with};

fn add() -> Call {
    Call::new("add").input("a", &[1.0f32]).input("b", &[2.0f32])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_address_and_in_total() {
    let server = server_with(|c| {
        c.admission.max_connections = 3;
        c.admission.max_connections_per_address = 2;
    })
    .await;
    let stats = server.connection_stats().clone();
    let a = Client::connect(config(&server)).await.expect("first");
    let b = Client::connect(config(&server)).await.expect("second");
    // Loopback: every client has the address 127.0.0.1.
    let e = Client::connect(config(&server))
        .await
        .expect_err("a third connection from one address");
    assert!(e.to_string().contains("refused"), "{e}");
    assert_eq!(stats.refused_per_address.load(Ordering::Relaxed), 1);

    // A closed connection gives its place back.
    a.close().await;
    eventually("the slot is freed", || {
        stats.open.load(Ordering::Relaxed) == 1
    })
    .await;
    let c = Client::connect(config(&server))
        .await
        .expect("a slot is free again");
    b.execute(add()).await.expect("b is served");
    c.execute(add()).await.expect("c is served");
    b.close().await;
    c.close().await;
    server.stop().await;

    let server = server_with(|c| {
        c.admission.max_connections = 2;
        c.admission.max_connections_per_address = 100;
    })
    .await;
    let stats = server.connection_stats().clone();
    let _a = Client::connect(config(&server)).await.expect("first");
    let _b = Client::connect(config(&server)).await.expect("second");
    Client::connect(config(&server))
        .await
        .expect_err("past max_connections");
    assert_eq!(stats.refused_capacity.load(Ordering::Relaxed), 1);
    server.stop().await;
}

/// Real QUIC Initial packets, each opening a different connection (its own
/// destination connection ID), from a client that will never answer: they
/// are captured by a socket that plays the server and never replies.
fn captured_initials(n: usize) -> Vec<Vec<u8>> {
    let sink = UdpSocket::bind("127.0.0.1:0").expect("sink");
    sink.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let sink_addr = sink.local_addr().expect("addr");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ca = quasar_certs::CertificateAuthority::generate("ghost CA").expect("ca");
    let id = ca
        .issue_client("ghost", quasar_certs::Validity::default())
        .expect("issue");
    let endpoint = runtime.block_on(async {
        let endpoint = crate::support::raw_endpoint(ca.cert_pem().as_bytes(), &id);
        for _ in 0..n {
            let connecting = endpoint.connect(sink_addr, "localhost").expect("connect");
            // Keep the attempt alive until its Initial has gone out.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), connecting).await;
            });
        }
        endpoint
    });
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while out.len() < n {
        let (len, _) = sink.recv_from(&mut buf).expect("an Initial packet");
        let packet = &buf[..len];
        // Long header: flags, version (4), DCID length, DCID.
        let dcid_len = usize::from(packet[5]);
        let dcid = packet[6..6 + dcid_len].to_vec();
        if seen.insert(dcid) {
            out.push(packet.to_vec());
        }
    }
    drop(endpoint);
    runtime.shutdown_background();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_retried_bounded_and_expires_while_clients_get_in() {
    const GHOSTS: usize = 60;
    let initials = tokio::task::spawn_blocking(|| captured_initials(GHOSTS))
        .await
        .expect("join");
    assert_eq!(initials.len(), GHOSTS);
    let server = server_with(|c| {
        c.admission.max_handshakes = 8;
        c.admission.max_connections_per_address = 1000;
        c.admission.handshake_timeout = Duration::from_millis(800);
        c.admission.address_validation = AddressValidation::Auto;
    })
    .await;
    let stats = server.connection_stats().clone();
    let ghost = UdpSocket::bind("127.0.0.1:0").expect("ghost socket");
    for packet in &initials {
        ghost.send_to(packet, server.addr()).expect("send");
    }
    eventually("every ghost attempt is decided", || {
        let s = &stats;
        s.established.load(Ordering::Relaxed)
            + s.retries.load(Ordering::Relaxed)
            + s.handshaking.load(Ordering::Relaxed)
            + s.handshakes_timed_out.load(Ordering::Relaxed)
            + s.refused_handshakes.load(Ordering::Relaxed)
            >= GHOSTS as u64
    })
    .await;
    // Half of max_handshakes in progress: the rest were asked for a Retry
    // (which ghosts never answer) and hold nothing.
    let half_open = stats.handshaking.load(Ordering::Relaxed);
    let retries = stats.retries.load(Ordering::Relaxed);
    assert!(half_open <= 8, "{half_open} half-open handshakes");
    assert!(
        retries >= (GHOSTS - 8) as u64,
        "only {retries} retries for {GHOSTS} ghosts"
    );

    // A real client still gets in (it answers the Retry) and is served.
    assert_serving(&server).await;

    // The half-open handshakes expire on their own.
    eventually("half-open handshakes time out", || {
        stats.handshaking.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(stats.handshakes_timed_out.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.open.load(Ordering::Relaxed), 0);
    server.stop().await;
}

#[tokio::test]
async fn always_validating_addresses_still_lets_clients_in() {
    let server = server_with(|c| c.admission.address_validation = AddressValidation::Always).await;
    assert_serving(&server).await;
    assert!(server.connection_stats().retries.load(Ordering::Relaxed) >= 1);
    server.stop().await;
}
