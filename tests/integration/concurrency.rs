//! Many calls at once over one connection: each gets its own result.

use quasar_client::Call;
use quasar_shaders::reference;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::task::JoinSet;

use crate::support::{assert_serving, client, server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fifty_six_concurrent_calls_on_one_connection() {
    // Room for every call in the GPU queue: this test is about matching
    // results to callers, not about back-pressure (malformed.rs tests that).
    let server = server_with(|c| c.gpu.queue_depth = 512).await;
    let client = client(&server).await;
    let mut tasks = JoinSet::new();
    for task in 0..256u64 {
        let client = client.clone();
        tasks.spawn(async move {
            // Every task's input is different, so a result delivered to the
            // wrong caller cannot pass its check.
            let mut rng = StdRng::seed_from_u64(task);
            let n = rng.random_range(1..3000);
            let a = task as f32 + 0.5;
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let r = client
                .execute(Call::new("saxpy").arg("a", a).input("x", &x).input("y", &y))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            let got = r.output::<f32>("y").expect("y");
            let want = reference::saxpy(a, &x, &y);
            assert_eq!(got.len(), want.len(), "task {task}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-6 * (a.abs() * x[i].abs() + y[i].abs()) + 1e-6;
                assert!((g - w).abs() <= tol, "task {task} element {i}: {g} vs {w}");
            }
            task
        });
    }
    let mut done = Vec::new();
    while let Some(r) = tasks.join_next().await {
        done.push(r.expect("task panicked"));
    }
    done.sort_unstable();
    assert_eq!(done, (0..256).collect::<Vec<_>>());
    assert_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_arrive_together_share_submissions_and_keep_their_results() {
    use quasar::samples::call_for;
    use quasar_shaders::Sample;
    use std::sync::atomic::Ordering;

    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    // Every shipped kernel, mixed in the same batches.
    let kernels: Vec<&str> = quasar_shaders::SHIPPED.iter().map(|k| k.name).collect();
    // Every kernel once first, so the batches below are not the first use.
    let mut rng = StdRng::seed_from_u64(1);
    for &k in &kernels {
        let s = Sample::for_kernel(k, 64, &mut rng).expect("sample");
        client.execute(call_for(&s)).await.expect("warm-up");
    }
    let before = (
        server.stats().calls.load(Ordering::Relaxed),
        server.stats().batches.load(Ordering::Relaxed),
    );
    samples_at_once(&server, &kernels, 128, 100).await;
    let calls = server.stats().calls.load(Ordering::Relaxed) - before.0;
    let batches = server.stats().batches.load(Ordering::Relaxed) - before.1;
    assert_eq!(calls, 128);
    assert!(
        batches < calls,
        "{calls} concurrent calls took {batches} submissions: nothing was batched"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_steady_state_allocates_no_gpu_buffers() {
    use std::sync::atomic::Ordering;
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    let x = vec![1.0f32; 1024];
    let call = || {
        Call::new("saxpy")
            .arg("a", 2.0f32)
            .input("x", &x)
            .input("y", &x)
    };
    for _ in 0..5 {
        client.execute(call()).await.expect("warm-up");
    }
    let stats = server.stats();
    let created = stats.buffers_created.load(Ordering::Relaxed);
    let reused = stats.buffers_reused.load(Ordering::Relaxed);
    for _ in 0..100 {
        client.execute(call()).await.expect("call");
    }
    assert_eq!(
        stats.buffers_created.load(Ordering::Relaxed),
        created,
        "calls of a steady size created GPU buffers"
    );
    // Two storage buffers, one uniform block, one readback buffer and the
    // batch's upload buffer each (a lone call is a batch of one).
    assert_eq!(stats.buffers_reused.load(Ordering::Relaxed) - reused, 500);
    server.stop().await;
}

#[tokio::test]
async fn payload_bytes_are_copied_once_each_way_on_the_server() {
    use std::sync::atomic::Ordering;
    let server = server_with(|_| {}).await;
    let client = client(&server).await;
    let stats = server.stats();
    let (mut sent, mut returned) = (0u64, 0u64);
    for n in [1usize, 1000, 65_536, 1 << 20] {
        let x = vec![1.5f32; n];
        let r = client
            .execute(
                Call::new("saxpy")
                    .arg("a", 2.0f32)
                    .input("x", &x)
                    .input("y", &x),
            )
            .await
            .expect("call");
        assert!(r.output::<f32>("y").expect("y").iter().all(|v| *v == 4.5));
        sent += 2 * 4 * n as u64;
        returned += 4 * n as u64;
    }
    assert_eq!(stats.bytes_copied_in.load(Ordering::Relaxed), sent);
    assert_eq!(stats.bytes_copied_out.load(Ordering::Relaxed), returned);
    // The echo copies nothing: the received chunks go back out.
    let data = vec![7u32; 100_000];
    let r = client
        .execute(Call::new(quasar_client::ECHO_KERNEL).input("data", &data))
        .await
        .expect("echo");
    assert_eq!(r.output::<u32>("data").expect("data"), &data[..]);
    assert_eq!(stats.bytes_copied_in.load(Ordering::Relaxed), sent);
    assert_eq!(stats.bytes_copied_out.load(Ordering::Relaxed), returned);
    server.stop().await;
}

/// Sequential calls from one client: with a spin longer than a loopback
/// round trip, the GPU thread finds most calls while it spins and sleeps
/// rarely; with none, it never spins and sleeps between calls. Either way
/// every result is right.
#[tokio::test]
async fn the_gpu_thread_spins_for_the_next_call_as_configured() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    for spin in [Duration::from_millis(10), Duration::ZERO] {
        let server = server_with(|c| c.gpu.idle_spin = spin).await;
        let client = client(&server).await;
        let x: Vec<f32> = (0..1024).map(|i| i as f32).collect();
        let y = vec![1.0f32; 1024];
        let want = reference::saxpy(3.0, &x, &y);
        let call = || {
            Call::new("saxpy")
                .arg("a", 3.0f32)
                .input("x", &x)
                .input("y", &y)
        };
        client.execute(call()).await.expect("warm-up");
        let stats = server.stats();
        let before = (
            stats.waits_spun.load(Ordering::Relaxed),
            stats.waits_slept.load(Ordering::Relaxed),
        );
        for _ in 0..50 {
            let r = client.execute(call()).await.expect("call");
            assert_eq!(r.output::<f32>("y").expect("y"), want);
        }
        let spun = stats.waits_spun.load(Ordering::Relaxed) - before.0;
        let slept = stats.waits_slept.load(Ordering::Relaxed) - before.1;
        if spin.is_zero() {
            assert_eq!(spun, 0, "the GPU thread spun with idle_spin 0");
            // Not one per call: a debug build's GPU thread may still be
            // tidying up after a reply when the next call arrives.
            assert!(
                slept > 0,
                "50 sequential calls and the GPU thread never slept"
            );
        } else {
            // A round trip on a loaded machine may now and then outlast
            // 10 ms; most do not.
            assert!(
                spun > slept,
                "50 sequential calls: {spun} found while spinning, {slept} after sleeping"
            );
        }
        server.stop().await;
    }
}

/// Runs `tasks` calls at once from one client, of `kernels` in turn, with
/// random inputs (seeded from `seed` up); each task checks its own result.
async fn samples_at_once(
    server: &quasar::embedded::EmbeddedServer,
    kernels: &[&'static str],
    tasks: u64,
    seed: u64,
) {
    use quasar::samples::{call_for, host_outputs};
    use quasar_shaders::Sample;

    let client = client(server).await;
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let client = client.clone();
        let kernel = kernels[task as usize % kernels.len()];
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed + task);
            // Lengths past a workgroup's grid stride, so that calls of one
            // batch (and of one fused dispatch) differ in size and in
            // workgroup count.
            let size = if kernel == "matmul" {
                rng.random_range(1..40)
            } else {
                rng.random_range(1..20_000)
            };
            // Each histogram call its own arguments (and output length),
            // so fused calls' argument blocks and parts differ too.
            let s = if kernel == "histogram" {
                let bins = rng.random_range(1..=300);
                let width = rng.random_range(1..=40);
                Sample::histogram(size, bins, width, &mut rng)
            } else {
                Sample::for_kernel(kernel, size, &mut rng).expect("sample")
            };
            let r = client
                .execute(call_for(&s))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            s.check(&host_outputs(&r))
                .unwrap_or_else(|m| panic!("task {task} ({kernel}, {size}): {m}"));
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task panicked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fused_into_one_dispatch_each_get_their_own_result() {
    use std::sync::atomic::Ordering;

    // Calls of every size fuse here, so that large ones (many workgroups,
    // parts past a grid stride) do too.
    let server = server_with(|c| {
        c.gpu.queue_depth = 512;
        c.gpu.max_fused_call_bytes = u64::MAX;
    })
    .await;
    let fusable = ["saxpy", "add", "mul", "histogram", "copy"];
    // Warm-up, so that the pipelines' first use is not in the batches.
    samples_at_once(&server, &fusable, 4, 400).await;
    let stats = server.stats().clone();
    let before = (
        stats.fused_calls.load(Ordering::Relaxed),
        stats.fused_dispatches.load(Ordering::Relaxed),
    );
    samples_at_once(&server, &fusable, 256, 500).await;
    let fused = stats.fused_calls.load(Ordering::Relaxed) - before.0;
    let dispatches = stats.fused_dispatches.load(Ordering::Relaxed) - before.1;
    assert!(fused > 0, "none of 256 concurrent calls ran fused");
    assert!(dispatches > 0 && dispatches * 2 <= fused);
    assert_serving(&server).await;
    server.stop().await;

    // The same calls with fusion off give the same results (checked per
    // call) and fuse nothing.
    let server = server_with(|c| {
        c.gpu.queue_depth = 512;
        c.gpu.fuse_calls = false;
    })
    .await;
    samples_at_once(&server, &fusable, 64, 500).await;
    assert_eq!(server.stats().fused_calls.load(Ordering::Relaxed), 0);
    server.stop().await;
}

/// Serves the kernel `source` (as `name`), runs `tasks` calls of it at once
/// from one client (task `i` is `task(client, i, on_lavapipe)`, which
/// checks its own result), and checks that some of them ran fused.
async fn fused_calls_of<F, Fut>(
    name: &str,
    source: &str,
    configure: impl FnOnce(&mut quasar_server::ServerConfig),
    tasks: u32,
    task: F,
) where
    F: Fn(quasar_client::Client, u32, bool) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(format!("{name}.wgsl")), source).expect("write");
    let path = dir.path().to_owned();
    let server = server_with(|c| {
        c.gpu.kernel_dir = Some(path);
        configure(c);
    })
    .await;
    let client = client(&server).await;
    let lavapipe = server.adapter().name.contains("llvmpipe");
    let before = server.stats().fused_calls.load(Ordering::Relaxed);
    let mut set = JoinSet::new();
    for i in 0..tasks {
        set.spawn(task(client.clone(), i, lavapipe));
    }
    while let Some(r) = set.join_next().await {
        r.expect("task panicked");
    }
    assert!(
        server.stats().fused_calls.load(Ordering::Relaxed) - before > 0,
        "no call of `{name}` ran fused"
    );
    assert_serving(&server).await;
    server.stop().await;
}

/// Reads and writes far outside its buffers: in a fused dispatch each
/// call's accesses stay within its own part of them.
const TRESPASS: &str = r#"
// quasar: output out = len_x
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_x, wg_x), max_wg)
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = arrayLength(&x);
    // Marks this call's stray writes (its first value is its base).
    let mark = x[0] + n + 5u;
    for (var i = gid.x; i < n; i += groups.x * 64u) {
        let before = i32(i) - 100000;
        out[i] = max(x[i + 100000u], x[before]);
        out[i + n + 7u] = mark;
        out[before] = mark;
    }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fused_call_reaches_nothing_outside_its_own_buffers() {
    fused_calls_of(
        "trespass",
        TRESPASS,
        |_| {},
        128,
        |client, task, _| async move {
            // Each call's values are its own: a value from another call's
            // input, or another call's stray write, shows. Its own stray
            // writes may land on its own elements (WGSL allows that).
            let base = (task + 1) * 1_000_000;
            let n = 1 + task * 37 % 3000;
            let x: Vec<u32> = (base..base + n).collect();
            let r = client
                .execute(Call::new("trespass").input("x", &x))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            let out = r.output::<u32>("out").expect("out");
            assert_eq!(out.len(), x.len());
            for (i, &v) in out.iter().enumerate() {
                assert!(
                    v == 0 || v == base + n + 5 || (base..base + n).contains(&v),
                    "task {task} element {i}: {v:#x} is not its own"
                );
            }
        },
    )
    .await;
}

/// Writes, for each element, the built-ins its invocation saw: a fused call
/// must see what it would in its own dispatch (workgroup size with a z of
/// 2, so the fused `global_invocation_id.z` is checked too).
const COORDS: &str = r#"
// quasar: output out = len_x * 4
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_x, wg_x * wg_z), max_wg)
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(16, 1, 2)
fn main(
    @builtin(global_invocation_id) g: vec3<u32>,
    @builtin(workgroup_id) w: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let n = arrayLength(&x);
    for (var i = w.x * 32u + li; i < n; i += nw.x * 32u) {
        out[4u * i] = g.x + 7919u * g.y + x[i];
        out[4u * i + 1u] = g.z;
        out[4u * i + 2u] = w.x + 7919u * (w.y + w.z);
        out[4u * i + 3u] = nw.x + 7919u * (nw.y - 1u + nw.z - 1u);
    }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fused_call_sees_the_built_ins_of_its_own_dispatch() {
    fused_calls_of(
        "coords",
        COORDS,
        |_| {},
        96,
        |client, task, _| async move {
            // Sizes from under one workgroup's 32 invocations to several
            // workgroups, so calls of one dispatch differ in workgroups.
            let n = 1 + (task * 53) % 400;
            let x: Vec<u32> = (0..n).map(|i| i * 3 + task).collect();
            let r = client
                .execute(Call::new("coords").input("x", &x))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            let out = r.output::<u32>("out").expect("out");
            // The call's own dispatch: (groups, 1, 1) of 16 x 1 x 2.
            let groups = n.div_ceil(32);
            for i in 0..n {
                let (wx, li) = ((i % (groups * 32)) / 32, i % 32);
                let (lx, lz) = (li % 16, li / 16);
                let want = [wx * 16 + lx + x[i as usize], lz, wx, groups];
                let got = &out[4 * i as usize..4 * i as usize + 4];
                assert_eq!(got, want, "task {task} (n = {n}) element {i}");
            }
        },
    )
    .await;
}

/// Reads one element past its input's end, which a fused call's sink
/// answers with zero as robust buffer access does for a call alone.
const STENCIL: &str = r#"
// quasar: output out = len_x
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_x, wg_x), max_wg)
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    for (var i = g.x; i < arrayLength(&x); i += nw.x * 64u) {
        out[i] = x[i] + x[i + 1u];
    }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fused_read_past_the_end_sees_zero_and_timestamps_time_the_shared_pass() {
    // GPU timestamps on: the shared pass's time reaches each call.
    fused_calls_of(
        "stencil",
        STENCIL,
        |c| c.gpu.timestamps = quasar_server::Timestamping::On,
        96,
        |client, task, lavapipe| async move {
            let n = 1 + (task * 71) % 700;
            let x: Vec<f32> = (0..n).map(|i| (i + task) as f32).collect();
            let r = client
                .execute(Call::new("stencil").input("x", &x))
                .await
                .unwrap_or_else(|e| panic!("task {task}: {e}"));
            let out = r.output::<f32>("out").expect("out");
            let want: Vec<f32> = (0..x.len())
                .map(|i| x[i] + x.get(i + 1).copied().unwrap_or(0.0))
                .collect();
            assert_eq!(out, &want[..], "task {task} (n = {n})");
            let t = r.timings();
            match t.kernel_us {
                Some(k) => assert!(k <= t.gpu_us, "task {task}: pass {k} us > {} us", t.gpu_us),
                None => assert!(!lavapipe, "task {task}: no pass time on lavapipe"),
            }
        },
    )
    .await;
}
