//! Soak with faults, bounded (about half a minute): several clients call
//! random kernels at random sizes, some calls with short deadlines, some
//! dropped mid-flight, some clients killed with calls in flight, and the
//! server restarted twice on the same address. Afterwards every call has
//! exactly one outcome (a correct result or a typed error, none hung), no
//! task is left behind, and the server's memory is back near its baseline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quasar::embedded::EmbeddedServer;
use quasar::samples::{call_for, host_outputs};
use quasar_certs::CertificateAuthority;
use quasar_client::{CallError, Client, StatusCode};
use quasar_server::ServerConfig;
use quasar_shaders::sample::seeded;
use quasar_shaders::{SHIPPED, Sample};
use rand::RngExt;

/// How every call ended.
#[derive(Default)]
struct Tally {
    issued: AtomicU64,
    correct: AtomicU64,
    /// Dropped by the caller before an answer (the SDK's cancellation).
    dropped: AtomicU64,
    /// No outcome within a minute: must stay zero.
    hung: AtomicU64,
    wrong: Mutex<Vec<String>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, e: &CallError) {
        let key = format!("{:?}", e.code());
        *self.errors.lock().unwrap().entry(key).or_default() += 1;
        // Faults must surface as these codes; anything else is a bug.
        assert!(
            matches!(
                e.code(),
                StatusCode::Unavailable
                    | StatusCode::DeadlineExceeded
                    | StatusCode::Cancelled
                    | StatusCode::ResourceExhausted
            ),
            "unexpected error under faults: {e}"
        );
    }

    fn answered(&self) -> u64 {
        self.correct.load(Ordering::Relaxed)
            + self.dropped.load(Ordering::Relaxed)
            + self.hung.load(Ordering::Relaxed)
            + self.wrong.lock().unwrap().len() as u64
            + self.errors.lock().unwrap().values().sum::<u64>()
    }
}

fn sample(rng: &mut rand::rngs::StdRng) -> Sample {
    let kernel = SHIPPED[rng.random_range(0..SHIPPED.len())].name;
    let size = match kernel {
        "matmul" => rng.random_range(1..48),
        _ => rng.random_range(1..150_000),
    };
    Sample::for_kernel(kernel, size, rng).expect("shipped kernel")
}

/// One call with its fate drawn at random: plain, with a short deadline,
/// or dropped after a few milliseconds.
async fn one_call(client: &Client, tally: &Tally, rng: &mut rand::rngs::StdRng) {
    let s = sample(rng);
    let fate = rng.random_range(0..10);
    let mut call = call_for(&s);
    if fate == 0 {
        call = call.deadline(Duration::from_millis(rng.random_range(1..30)));
    }
    tally.issued.fetch_add(1, Ordering::Relaxed);
    let run = client.execute(call);
    let outcome = if fate == 1 {
        match tokio::time::timeout(Duration::from_millis(rng.random_range(0..5)), run).await {
            Ok(r) => Some(r),
            Err(_) => {
                tally.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    } else {
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .ok()
    };
    match outcome {
        None => {
            tally.hung.fetch_add(1, Ordering::Relaxed);
        }
        Some(Ok(r)) => match s.check(&host_outputs(&r)) {
            Ok(()) => {
                tally.correct.fetch_add(1, Ordering::Relaxed);
            }
            Err(m) => tally
                .wrong
                .lock()
                .unwrap()
                .push(format!("{}: {m}", s.kernel)),
        },
        Some(Err(e)) => tally.error(&e),
    }
}

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss");
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn configure(c: &mut ServerConfig) {
    // Idle buffers kept for reuse count in the RSS of a software adapter.
    c.gpu.max_pooled_bytes = 32 * 1024 * 1024;
    c.shutdown_grace = Duration::from_secs(5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_faults_and_restarts_accounts_for_every_call() {
    const PHASE: Duration = Duration::from_secs(7);
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let ca = Arc::new(CertificateAuthority::generate("soak CA").expect("ca"));
    let mut server = EmbeddedServer::start_with_ca(ca.clone(), configure)
        .await
        .expect("server");
    let addr = server.addr();

    // Baseline: the server warm, every kernel compiled and run once.
    let warm = Client::connect(server.client_config("warm").expect("cert"))
        .await
        .expect("connect");
    let mut rng = seeded(99);
    for k in SHIPPED.iter().map(|k| k.name) {
        let s = Sample::for_kernel(k, 1000, &mut rng).expect("sample");
        let r = warm.execute(call_for(&s)).await.expect("warm-up");
        s.check(&host_outputs(&r)).expect("warm-up result");
    }
    warm.close().await;
    // A client's endpoint (and its task) lives as long as the client.
    drop(warm);
    let baseline = rss_mib();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..3u64 {
        let client = Client::connect(server.client_config("worker").expect("cert"))
            .await
            .expect("connect");
        let (tally, stop) = (tally.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = seeded(1000 + w);
            while !stop.load(Ordering::Relaxed) {
                one_call(&client, &tally, &mut rng).await;
            }
            client.close().await;
        }));
    }
    // Clients killed with calls in flight: each makes a few concurrent
    // calls and is closed (its connection torn down) while they run.
    let killer = {
        let (tally, stop, ca) = (tally.clone(), stop.clone(), ca.clone());
        tokio::spawn(async move {
            let mut rng = seeded(7);
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let id = ca
                    .issue_client("doomed", quasar_certs::Validity::default())
                    .expect("issue");
                let config = quasar_client::ClientConfig::new(
                    addr,
                    quasar::embedded::SERVER_NAME,
                    ca.cert_pem().as_bytes().to_vec(),
                    id.cert_pem.into_bytes(),
                    id.key_pem.into_bytes(),
                );
                let Ok(client) = Client::connect(config).await else {
                    // The server is restarting.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut calls = Vec::new();
                for i in 0..4 {
                    let (c, tally) = (client.clone(), tally.clone());
                    calls.push(tokio::spawn(async move {
                        let mut rng = seeded(round * 10 + i);
                        one_call(&c, &tally, &mut rng).await;
                    }));
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..40))).await;
                client.close().await;
                for c in calls {
                    c.await.expect("killed client's call task");
                }
            }
        })
    };

    // Two restarts on the same address, with the same CA.
    for _ in 0..2 {
        tokio::time::sleep(PHASE).await;
        server.stop().await;
        server = EmbeddedServer::start_with_ca(ca.clone(), |c| {
            configure(c);
            c.listen = addr;
        })
        .await
        .expect("restarted server");
    }
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    killer.await.expect("killer");

    let errors = tally.errors.lock().unwrap().clone();
    let issued = tally.issued.load(Ordering::Relaxed);
    let correct = tally.correct.load(Ordering::Relaxed);
    eprintln!(
        "soak: {issued} calls: {correct} correct, {} dropped by the caller, errors {errors:?}",
        tally.dropped.load(Ordering::Relaxed)
    );
    assert_eq!(tally.answered(), issued, "a call without an outcome");
    assert_eq!(tally.hung.load(Ordering::Relaxed), 0, "calls hung");
    assert!(
        tally.wrong.lock().unwrap().is_empty(),
        "wrong results: {:?}",
        tally.wrong.lock().unwrap()
    );
    assert!(
        correct * 2 > issued,
        "most calls should succeed: {correct} of {issued}"
    );

    // The last server instance, idle again: back near the first one's
    // baseline (each restart made a new device; none may leak).
    crate::support::assert_serving(&server).await;
    let after = rss_mib();
    eprintln!("soak: RSS {baseline:.0} MiB warm at start, {after:.0} MiB after");
    assert!(
        after < baseline + 96.0,
        "RSS grew from {baseline:.0} MiB to {after:.0} MiB"
    );
    server.stop().await;

    // Nothing left running: every connection, call and client task ended.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if alive <= tasks_before {
            break;
        }
        assert!(
            Instant::now() < until,
            "{alive} tasks alive after the soak (before: {tasks_before})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
