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
