//! Every shipped kernel against its CPU reference, at sizes that hit the
//! edges: 1, odd lengths, around the workgroup size, and large.

use quasar::samples::{call_for, host_outputs};
use quasar_client::{Call, Client};
use quasar_shaders::{Sample, sample::seeded};

use crate::support::{client, server, server_with};

async fn check(client: &Client, sample: &Sample, what: &str) {
    let response = client
        .execute(call_for(sample))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if let Err(m) = sample.check(&host_outputs(&response)) {
        panic!("{what}: {m}");
    }
}

#[tokio::test]
async fn elementwise_kernels_match_reference() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(1);
    for n in [1, 3, 255, 256, 257, 4099, 100_003, 1 << 20] {
        check(
            &client,
            &Sample::saxpy(n, &mut rng),
            &format!("saxpy n={n}"),
        )
        .await;
        check(&client, &Sample::add(n, &mut rng), &format!("add n={n}")).await;
        check(&client, &Sample::mul(n, &mut rng), &format!("mul n={n}")).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn reduce_sum_matches_reference() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(2);
    for n in [1, 2, 255, 256, 257, 65_537, 1_000_003, (1 << 22) + 3] {
        check(
            &client,
            &Sample::reduce_sum(n, &mut rng),
            &format!("reduce_sum n={n}"),
        )
        .await;
    }
    server.stop().await;
}

#[tokio::test]
async fn matmul_matches_reference() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(3);
    for (m, n, k) in [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (16, 16, 16),
        (64, 64, 64),
        (100, 37, 129),
        (256, 256, 256),
        (513, 300, 77),
    ] {
        check(
            &client,
            &Sample::matmul(m, n, k, &mut rng),
            &format!("matmul {m}x{k} by {k}x{n}"),
        )
        .await;
    }
    server.stop().await;
}

#[tokio::test]
async fn prefix_sum_matches_reference_up_to_2_pow_24() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(4);
    for n in [1, 2, 1023, 1024, 1025, 1_000_003, 1 << 24] {
        check(
            &client,
            &Sample::prefix_sum(n, &mut rng),
            &format!("prefix_sum n={n}"),
        )
        .await;
    }
    server.stop().await;
}

#[tokio::test]
async fn histogram_matches_reference() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(5);
    for (n, bins, width) in [
        (1, 1, 1),
        (1000, 7, 3),
        (100_003, 64, 16),
        (1 << 20, 4096, 1),
    ] {
        check(
            &client,
            &Sample::histogram(n, bins, width, &mut rng),
            &format!("histogram n={n} bins={bins}"),
        )
        .await;
    }
    server.stop().await;
}

#[tokio::test]
async fn explicit_workgroup_count_is_used_and_still_correct() {
    let server = server().await;
    let client = client(&server).await;
    let mut rng = seeded(6);
    let sample = Sample::saxpy(10_000, &mut rng);
    for wg in [[1, 1, 1], [3, 1, 1], [40, 1, 1]] {
        let r = client
            .execute(call_for(&sample).workgroups(wg))
            .await
            .expect("call");
        sample
            .check(&host_outputs(&r))
            .expect("correct with any workgroup count");
    }
    server.stop().await;
}

#[tokio::test]
async fn kernels_from_a_directory_are_reflected_and_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("scale_i32.wgsl"),
        r#"// quasar: output out = len_values
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_values, wg_x), max_wg)
struct Params { factor: i32, offset: i32 }
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> values: array<i32>;
@group(0) @binding(2) var<storage, read_write> out: array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    for (var i = gid.x; i < arrayLength(&out); i += groups.x * 64u) {
        out[i] = values[i] * params.factor + params.offset;
    }
}
"#,
    )
    .expect("write kernel");
    let path = dir.path().to_owned();
    let server = server_with(|c| c.gpu.kernel_dir = Some(path)).await;
    assert!(server.kernels().iter().any(|k| k.name == "scale_i32"));
    let client = client(&server).await;
    let values: Vec<i32> = (-500..500).collect();
    let r = client
        .execute(
            Call::new("scale_i32")
                .arg("factor", -3i32)
                .arg("offset", 7i32)
                .input("values", &values),
        )
        .await
        .expect("call");
    let expected: Vec<i32> = values.iter().map(|v| v * -3 + 7).collect();
    assert_eq!(r.output::<i32>("out").expect("out"), &expected[..]);
    server.stop().await;
}

#[tokio::test]
async fn gpu_timestamps_time_the_compute_pass_when_on() {
    let server = server_with(|c| c.gpu.timestamps = quasar_server::Timestamping::On).await;
    let client = client(&server).await;
    let mut rng = seeded(7);
    let sample = Sample::matmul(64, 64, 64, &mut rng);
    for _ in 0..5 {
        let r = client.execute(call_for(&sample)).await.expect("call");
        sample
            .check(&host_outputs(&r))
            .expect("correct with timestamps on");
        let t = r.timings();
        match t.kernel_us {
            Some(k) => assert!(k <= t.gpu_us, "kernel {k} us > device {} us", t.gpu_us),
            // lavapipe supports timestamp queries; other adapters may not.
            None => assert!(
                !server.adapter().name.contains("llvmpipe"),
                "no timestamps on lavapipe"
            ),
        }
    }
    server.stop().await;
}
