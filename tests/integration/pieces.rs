//! A payload sent in tiny pieces: the server's reader gathers pieces
//! shorter than `GATHER_BELOW` into buffers of its own, so a peer cannot
//! make it hold a received datagram per byte of a payload.

use std::time::Duration;

use quasar_certs::{CertificateAuthority, Validity};
use quasar_transport::io::{FrameReader, GATHER_BELOW};

use crate::hostile_server::tls_server;
use crate::support::raw_endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_sent_a_byte_per_packet_is_gathered_not_kept_per_packet() {
    const PIECES: usize = 200;
    let ca = CertificateAuthority::generate("pieces CA").expect("ca");
    let server = tls_server(&ca);
    let addr = server.local_addr().expect("addr");
    let reader = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        let (_send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut reader = FrameReader::new(&mut recv);
        let payload = reader
            .chunked(PIECES as u64, "payload")
            .await
            .expect("payload");
        let bytes: Vec<u8> = payload
            .chunks()
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        (payload.chunks().len(), bytes)
    });

    let id = ca
        .issue_client("trickle", Validity::default())
        .expect("client certificate");
    let endpoint = raw_endpoint(ca.cert_pem().as_bytes(), &id);
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    let sent: Vec<u8> = (0..PIECES).map(|i| i as u8).collect();
    for byte in &sent {
        send.write_all(std::slice::from_ref(byte))
            .await
            .expect("write");
        // Long enough for quinn to send the byte in a packet of its own.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    send.finish().expect("finish");

    let (chunks, received) = reader.await.expect("join");
    assert_eq!(received, sent, "the payload arrives whole and in order");
    // Kept as they came there would be about one chunk per byte.
    assert!(
        chunks <= PIECES.div_ceil(GATHER_BELOW) + 1,
        "{chunks} chunks for {PIECES} bytes sent a byte at a time"
    );
    conn.close(0u32.into(), b"done");
}
