//! The `quasar` binary end to end: certificates on disk, a server process,
//! a call from the shell, and a clean stop on Ctrl-C (SIGINT).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quasar");

fn quasar(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run quasar")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Kills the server process if the test fails before stopping it, so a
/// failing run leaves nothing behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

type Drain = std::thread::JoinHandle<Vec<String>>;

/// Starts `quasar serve ARGS` and waits (no sleeping) for the log line that
/// says where it listens; returns the process, the address, the log so far,
/// and a thread that keeps draining the log so the server never blocks.
fn spawn_serve(args: &[&str]) -> (KillOnDrop, String, String, Drain) {
    let child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn server");
    let mut server = KillOnDrop(child);
    let stderr = server.0.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut addr = None;
    let mut log = String::new();
    let started = Instant::now();
    while addr.is_none() && started.elapsed() < Duration::from_secs(60) {
        let Some(Ok(line)) = lines.next() else { break };
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening") {
            addr = line
                .split("addr=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .map(str::to_owned);
        }
    }
    let Some(addr) = addr else {
        panic!("the server never said where it listens:\n{log}");
    };
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    (server, addr, log, drain)
}

/// `quasar serve` on 127.0.0.1 with the server certificate, key and client
/// CA that `quasar certs init` wrote to PKI, and ARGS.
fn serve_with_pki(pki: &Path, args: &[&str]) -> (KillOnDrop, String, String, Drain) {
    let [cert, key, ca] = ["server.pem", "server.key", "ca.pem"]
        .map(|f| pki.join(f).to_str().expect("utf-8 path").to_owned());
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--cert",
        &cert,
        "--key",
        &key,
        "--client-ca",
        &ca,
    ];
    all.extend_from_slice(args);
    spawn_serve(&all)
}

/// `quasar certs init` into PKI: a server certificate for 127.0.0.1 and
/// these clients.
fn certs_init(pki: &Path, clients: &[&str]) {
    let mut args = vec![
        "certs",
        "init",
        "--out",
        pki.to_str().expect("utf-8 path"),
        "--server-ip",
        "127.0.0.1",
    ];
    for c in clients {
        args.extend(["--client", c]);
    }
    let out = quasar(&args);
    assert!(out.status.success(), "{}", text(&out));
}

fn f32_file(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn certs_serve_call_and_stop_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki_s = pki.to_str().expect("utf-8 path");

    let out = quasar(&[
        "certs",
        "init",
        "--out",
        pki_s,
        "--server-name",
        "localhost",
        "--server-ip",
        "127.0.0.1",
        "--client",
        "alice",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "server.key", "alice.key"] {
            let mode = std::fs::metadata(pki.join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
    let again = quasar(&["certs", "init", "--out", pki_s, "--client", "alice"]);
    assert!(!again.status.success());
    assert!(text(&again).contains("--force"), "{}", text(&again));
    let bob = quasar(&["certs", "client", "--pki", pki_s, "--name", "bob"]);
    assert!(bob.status.success(), "{}", text(&bob));

    let (mut server, addr, log, drain) = serve_with_pki(&pki, &[]);
    assert!(log.contains("kernel loaded"), "{log}");

    let y = dir.path().join("y.f32");
    let out_file = dir.path().join("out.f32");
    f32_file(&y, &[10.0, 20.0, 30.0]);
    let call = quasar(&[
        "call",
        "--server",
        &addr,
        "--ca",
        pki.join("ca.pem").to_str().expect("path"),
        "--cert",
        pki.join("bob.pem").to_str().expect("path"),
        "--key",
        pki.join("bob.key").to_str().expect("path"),
        "--kernel",
        "saxpy",
        "--arg",
        "a=2.0",
        "--input",
        "x=1.5,2,3",
        "--input",
        &format!("y=@{}", y.display()),
        "--out",
        &format!("y=@{}", out_file.display()),
    ]);
    assert!(call.status.success(), "{}", text(&call));
    assert!(text(&call).contains("timings:"), "{}", text(&call));
    let bytes = std::fs::read(&out_file).expect("output file");
    let got: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got, vec![13.0, 24.0, 36.0]);

    let bad = quasar(&[
        "call",
        "--server",
        &addr,
        "--ca",
        pki.join("ca.pem").to_str().expect("path"),
        "--cert",
        pki.join("bob.pem").to_str().expect("path"),
        "--key",
        pki.join("bob.key").to_str().expect("path"),
        "--kernel",
        "saxpy",
        "--arg",
        "a=2",
        "--input",
        "x=1,2,3",
        "--input",
        "y=1,2,3",
    ]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("INVALID_ARGUMENT"), "{}", text(&bad));

    let status = Command::new("kill")
        .args(["-INT", &server.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = server.0.wait().expect("wait");
    let rest = drain.join().expect("drain").join("\n");
    assert!(exit.success(), "server exit {exit:?}\n{rest}");
    assert!(rest.contains("server stopped"), "{rest}");
}

#[test]
fn info_lists_an_adapter() {
    let out = quasar(&["info"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("backend:"), "{}", text(&out));
}

/// `--lavapipe-threads` reaches Mesa, which reads `LP_NUM_THREADS` once,
/// when wgpu enumerates adapters: the server names the setting, and on
/// lavapipe it starts as many threads of its own per context (named
/// `llvmpipe-N`; its compute pool takes the same count) as asked.
#[test]
fn lavapipe_threads_reach_mesa() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    certs_init(&pki, &[]);
    for (threads, said) in [
        ("0", "compute threads: 0, on the queue thread"),
        ("2", "compute threads: 2 (LP_NUM_THREADS)"),
    ] {
        let (server, _addr, log, _drain) = serve_with_pki(&pki, &["--lavapipe-threads", threads]);
        if !log.contains("driver llvmpipe") {
            // A GPU: the flag changes nothing and the server says nothing of it.
            assert!(!log.contains("compute threads"), "{log}");
            return;
        }
        assert!(log.contains(said), "{log}");
        #[cfg(target_os = "linux")]
        {
            let tasks = format!("/proc/{}/task", server.0.id());
            let named = std::fs::read_dir(&tasks)
                .expect("the server's threads")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.starts_with("llvmpipe-"))
                .count();
            // One set per llvmpipe context: wgpu may make more than one.
            let asked: usize = threads.parse().expect("a count");
            if asked == 0 {
                assert_eq!(named, 0, "{log}");
            } else {
                assert!(named > 0 && named % asked == 0, "{named} threads\n{log}");
            }
        }
        drop(server);
    }
}

#[test]
fn demo_checks_every_kernel() {
    let out = quasar(&["demo", "--calls", "3", "--warmup", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    for k in quasar_shaders::SHIPPED {
        assert!(t.contains(k.name), "{} missing from:\n{t}", k.name);
    }
    assert!(t.contains("Every result matched"), "{t}");
}

#[test]
fn serve_reads_a_config_file_with_an_access_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    certs_init(&pki, &["alice", "bob"]);
    let config = dir.path().join("quasar.toml");
    // Paths relative to the file; a flag would win over any key.
    std::fs::write(
        &config,
        r#"listen = "127.0.0.1:0"
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
queue_depth = 64
max_udp_payload = 6000
gpu_idle_spin_us = 40
fuse_calls = false

[access]
default = "deny"
[[access.rule]]
identity = "alice"
kernels = ["add"]
"#,
    )
    .expect("config");
    // A datagram size past what quinn's GSO batches allow, and a GPU spin
    // longer than sleeping would cost, are refused, not clamped: the flag
    // wins over the file's valid value.
    for (flag, value, says) in [
        ("--max-udp-payload", "9000", "outside 1200-6500"),
        ("--gpu-idle-spin-us", "20000", "more than 10000 us"),
    ] {
        let mut refused = Command::new(BIN)
            .args(["serve", "--config", config.to_str().expect("path")])
            .args([flag, value])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let until = Instant::now() + Duration::from_secs(20);
        while refused.try_wait().expect("wait").is_none() {
            if Instant::now() > until {
                let _ = refused.kill();
                panic!("serve started with {flag} {value}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = refused.wait_with_output().expect("output");
        assert!(!out.status.success());
        assert!(text(&out).contains(says), "{}", text(&out));
    }
    let (server, addr, log, drain) = spawn_serve(&["--config", config.to_str().expect("path")]);
    assert!(log.contains("rules=1"), "{log}");
    assert!(log.contains("max_udp_payload=6000"), "{log}");
    assert!(log.contains("gpu_idle_spin_us=40"), "{log}");
    assert!(log.contains("fuse_calls=false"), "{log}");
    let call = |who: &str| {
        quasar(&[
            "call",
            "--server",
            &addr,
            "--ca",
            pki.join("ca.pem").to_str().expect("path"),
            "--cert",
            pki.join(format!("{who}.pem")).to_str().expect("path"),
            "--key",
            pki.join(format!("{who}.key")).to_str().expect("path"),
            "--kernel",
            "add",
            "--input",
            "a=1.0,2",
            "--input",
            "b=3.0,4",
        ])
    };
    let alice = call("alice");
    assert!(alice.status.success(), "{}", text(&alice));
    assert!(
        text(&alice).contains("out: f32[2] = [4, 6]"),
        "{}",
        text(&alice)
    );
    let bob = call("bob");
    assert!(!bob.status.success());
    assert!(text(&bob).contains("PERMISSION_DENIED"), "{}", text(&bob));

    // SIGHUP reloads the policy: bob is granted `add` without a restart.
    let hup = || {
        let pid = server.0.id().to_string();
        let out = Command::new("kill").args(["-HUP", &pid]).output();
        assert!(out.expect("kill").status.success());
    };
    let granted = std::fs::read_to_string(&config)
        .expect("read")
        .replace("identity = \"alice\"", "identity = \"*\"");
    std::fs::write(&config, granted).expect("rewrite");
    hup();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let bob = call("bob");
        if bob.status.success() {
            break;
        }
        assert!(
            Instant::now() < until,
            "bob still refused after the reload: {}",
            text(&bob)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file is rejected; the running configuration keeps serving.
    std::fs::write(&config, "[access]\ndefault = \"maybe\"\n").expect("break");
    hup();
    std::thread::sleep(Duration::from_millis(500));
    let alice = call("alice");
    assert!(alice.status.success(), "{}", text(&alice));
    drop(server);
    let log = drain.join().expect("drain").join("\n");
    assert!(
        log.contains("identity=alice") && log.contains("identity=bob"),
        "access log:\n{log}"
    );
    assert!(log.contains("reload done"), "{log}");
    assert!(log.contains("reload rejected"), "{log}");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "listen = 5\nnot_a_setting = true\n").expect("write");
    let bad = quasar(&["serve", "--config", broken.to_str().expect("path")]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("parsing"), "{}", text(&bad));
}
