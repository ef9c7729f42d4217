//! Hot reload: certificates, CRLs, policy and kernels are swapped on a
//! running server under load; existing connections keep working unless
//! the new CRL revokes their certificate, new handshakes see the new
//! certificate and CRL, and a broken file is rejected while the running
//! configuration keeps serving.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use quasar_certs::{PkiDir, Validity};
use quasar_client::{Call, Client, ClientConfig, StatusCode};
use quasar_server::{Policy, ReloadConfig, TlsPem};
use quasar_transport::CloseCode;
use quasar_transport::tls::{self, QuicTuning};
use rustls_pki_types::CertificateDer;

use crate::support::server_with;

const NEGATE: &str = r#"// quasar: output out = len_values
// quasar: stage main = ceil_div(len_values, 64)
@group(0) @binding(0) var<storage, read> values: array<i32>;
@group(0) @binding(1) var<storage, read_write> out: array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x < arrayLength(&out) { out[gid.x] = -values[gid.x]; }
}
"#;

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(p).expect("read")
}

fn add() -> Call {
    Call::new("add").input("a", &[1.0f32]).input("b", &[2.0f32])
}

fn mul() -> Call {
    Call::new("mul").input("a", &[3.0f32]).input("b", &[2.0f32])
}

/// A connection with `name`'s certificate that the server has accepted
/// (the server's verdict on the client's certificate is in).
async fn connect_raw(
    addr: std::net::SocketAddr,
    pki: &PkiDir,
    name: &str,
) -> Result<quinn::Connection, String> {
    let quic = tls::client_config(
        tls::roots_from_pem(&read(pki.ca_cert())).expect("roots"),
        tls::certs_from_pem(&read(pki.client_cert(name)), "cert").expect("cert"),
        tls::key_from_pem(&read(pki.client_key(name))).expect("key"),
        &QuicTuning::default(),
    )
    .expect("config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    endpoint.set_default_client_config(quic);
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 client authentication finishes after the client's handshake
    // does: the server's verdict arrives with the first stream.
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let _ = send.write_all(b"x").await;
    let _ = send.finish();
    let _ = recv.read_to_end(1 << 16).await;
    if let Some(reason) = conn
        .close_reason()
        .filter(|r| !matches!(r, quinn::ConnectionError::LocallyClosed))
    {
        return Err(reason.to_string());
    }
    Ok(conn)
}

/// The certificate a fresh handshake with `name`'s certificate is shown.
async fn server_certificate(
    addr: std::net::SocketAddr,
    pki: &PkiDir,
    name: &str,
) -> Result<CertificateDer<'static>, String> {
    let conn = connect_raw(addr, pki, name).await?;
    let chain = conn
        .peer_identity()
        .expect("peer identity")
        .downcast::<Vec<CertificateDer<'static>>>()
        .expect("certificates");
    conn.close(0u32.into(), b"done");
    Ok(chain[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_policy_crl_and_kernels_reload_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = PkiDir::new(dir.path().join("pki"));
    pki.init(
        &["localhost".into()],
        &[Ipv4Addr::LOCALHOST.into()],
        &["alice".into(), "bob".into(), "carol".into()],
        false,
    )
    .expect("pki");
    let kernels = dir.path().join("kernels");
    std::fs::create_dir(&kernels).expect("mkdir");
    let tls_pem = |cert: Vec<u8>, key: Vec<u8>, crls: Vec<Vec<u8>>| TlsPem {
        cert_chain: cert,
        key,
        client_ca: read(pki.ca_cert()),
        crls,
    };
    let first = tls_pem(read(pki.server_cert()), read(pki.server_key()), Vec::new());
    let kernel_dir = kernels.clone();
    let server = server_with(move |c| {
        c.tls = first;
        c.gpu.kernel_dir = Some(kernel_dir);
    })
    .await;
    let connect = |name: &str| {
        Client::connect(ClientConfig::new(
            server.addr(),
            "localhost",
            read(pki.ca_cert()),
            read(pki.client_cert(name)),
            read(pki.client_key(name)),
        ))
    };
    let alice = connect("alice").await.expect("alice");
    let bob = connect("bob").await.expect("bob");
    let carol = connect("carol").await.expect("carol");
    bob.execute(mul()).await.expect("bob may call mul at first");
    carol
        .execute(add())
        .await
        .expect("carol is served at first");
    let carol_raw = connect_raw(server.addr(), &pki, "carol")
        .await
        .expect("carol's second connection");

    // Load on an existing connection for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (c, stop, done, failed) = (alice.clone(), stop.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match c.execute(add()).await {
                    Ok(r) if r.output::<f32>("out").ok() == Some(&[3.0][..]) => {
                        done.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // Rotate: a new server certificate, carol revoked, bob denied mul, a
    // new kernel.
    let new_server = pki
        .load_ca()
        .expect("ca")
        .issue_server(
            &["localhost".into()],
            &[Ipv4Addr::LOCALHOST.into()],
            Validity::default(),
        )
        .expect("new server certificate");
    pki.revoke("carol").expect("revoke");
    std::fs::write(kernels.join("negate.wgsl"), NEGATE).expect("kernel");
    let policy: Policy = toml::from_str(
        r#"
        [[rule]]
        identity = "bob"
        kernels = ["add"]
        "#,
    )
    .expect("policy");
    let rotated = ReloadConfig {
        tls: tls_pem(
            new_server.cert_pem.clone().into_bytes(),
            new_server.key_pem.clone().into_bytes(),
            vec![read(pki.crl())],
        ),
        policy,
        kernel_dir: Some(kernels.clone()),
    };
    let loaded = server
        .reloader()
        .reload(rotated.clone())
        .await
        .expect("reload");
    assert!(loaded.iter().any(|k| k == "negate"), "{loaded:?}");

    // Existing connections: the new policy and kernels apply at once.
    let e = bob.execute(mul()).await.expect_err("bob lost mul");
    assert_eq!(e.code(), StatusCode::PermissionDenied, "{e}");
    bob.execute(add()).await.expect("bob keeps add");
    let r = alice
        .execute(Call::new("negate").input("values", &[1i32, -2, 3]))
        .await
        .expect("the new kernel on an existing connection");
    assert_eq!(r.output::<i32>("out").expect("out"), &[-1, 2, -3]);
    // carol's sessions predate the CRL, which closes them.
    let closed = tokio::time::timeout(Duration::from_secs(10), carol_raw.closed())
        .await
        .expect("carol's connection is closed after the reload");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                CloseCode::CertificateRefused.varint(),
                "{close}"
            );
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("Revoked"), "{reason}");
        }
        other => panic!("carol's connection ended otherwise: {other}"),
    }
    // The SDK's connection went the same way, and reconnecting is refused.
    let started = std::time::Instant::now();
    let e = loop {
        match carol.execute(add()).await {
            Ok(_) if started.elapsed() < Duration::from_secs(10) => {}
            Ok(_) => panic!("carol is still served 10 s after her revocation"),
            Err(e) => break e,
        }
    };
    assert!(e.is_transport(), "{e}");
    assert!(
        !e.is_retryable(),
        "a refused certificate is not retried: {e}"
    );
    assert!(
        e.to_string().contains("Revoked") || e.to_string().contains("no longer accepted"),
        "{e}"
    );
    // Each of the four connections open at the reload (alice's, bob's and
    // carol's two) was checked once; carol's two were closed.
    let stats = server.connection_stats();
    let started = std::time::Instant::now();
    while stats.certificates_rechecked.load(Ordering::Relaxed) < 4
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.certificates_rechecked.load(Ordering::Relaxed), 4);
    assert_eq!(stats.certificates_refused.load(Ordering::Relaxed), 2);
    // A reload that keeps the client CA and CRLs checks nobody again.
    server
        .reloader()
        .reload(rotated.clone())
        .await
        .expect("the same configuration again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.certificates_rechecked.load(Ordering::Relaxed), 4);

    // New handshakes see the new certificate and the CRL.
    let new_der = tls::certs_from_pem(new_server.cert_pem.as_bytes(), "new")
        .expect("der")
        .remove(0);
    let seen = server_certificate(server.addr(), &pki, "alice")
        .await
        .expect("alice handshakes");
    assert_eq!(
        seen, new_der,
        "a new handshake sees the rotated certificate"
    );
    let refused = server_certificate(server.addr(), &pki, "carol")
        .await
        .expect_err("carol is revoked");
    assert!(refused.contains("Revoked"), "{refused}");

    // Broken files are rejected and change nothing.
    let mut broken_key = rotated.clone();
    broken_key.tls.key =
        b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n".to_vec();
    server
        .reloader()
        .reload(broken_key)
        .await
        .expect_err("a broken key is rejected");
    std::fs::write(kernels.join("broken.wgsl"), "fn nope( {").expect("write");
    // With a policy that would give bob mul back: the policy is in force
    // before the kernels are swapped, and goes back when they fail.
    let mut with_broken_kernel = rotated.clone();
    with_broken_kernel.policy = toml::from_str(
        r#"
        [[rule]]
        identity = "bob"
        kernels = ["add", "mul"]
        "#,
    )
    .expect("policy");
    let e = server
        .reloader()
        .reload(with_broken_kernel)
        .await
        .expect_err("a broken kernel is rejected");
    assert!(e.to_string().contains("broken"), "{e}");
    let seen = server_certificate(server.addr(), &pki, "alice")
        .await
        .expect("still serving");
    assert_eq!(seen, new_der, "the last good certificate still serves");
    let e = bob.execute(mul()).await.expect_err("the last good policy");
    assert_eq!(e.code(), StatusCode::PermissionDenied, "{e}");
    alice
        .execute(Call::new("negate").input("values", &[5i32]))
        .await
        .expect("the last good kernels");

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed under reload"
    );
    assert!(done.load(Ordering::Relaxed) > 0);
    assert_eq!(server.stats().reloads.load(Ordering::Relaxed), 2);
    server.stop().await;
}
