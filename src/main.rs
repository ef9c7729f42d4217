//! `quasar`: the command line of the Quasar compute RPC framework.
//!
//! - `quasar demo`: a server and a client on loopback with a fresh PKI; runs
//!   every shipped kernel on random input, checks it against the CPU
//!   reference, and prints the adapter and per-kernel latency.
//! - `quasar certs init|client`: make a CA, server and client certificates.
//! - `quasar serve`: run a server.
//! - `quasar call`: one call from a shell.
//! - `quasar info`: the GPU adapters wgpu sees, with their limits.
//! - `quasar bench`: latency under load, where the time went, and what
//!   going remote costs against a local dispatch and a raw QUIC echo.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};

// A thread-caching allocator: QUIC buffers are allocated on the thread that
// drives a connection and freed on the one that ran the call, and glibc's
// malloc serialises such cross-thread frees on its arena locks (about a
// tenth of all CPU time in a 64-call echo profile; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "quasar",
    version,
    about = "Low-latency compute RPC over QUIC with mutual TLS, run as wgpu compute shaders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every shipped kernel through a loopback server with fresh certificates.
    Demo(cli::demo::DemoArgs),
    /// Make certificates: a CA, a server certificate, client certificates.
    #[command(subcommand)]
    Certs(cli::certs::CertsCommand),
    /// Serve calls over QUIC with mutual TLS.
    Serve(Box<cli::serve::ServeArgs>),
    /// Make one call and print (or write) its outputs.
    Call(cli::call::CallArgs),
    /// List the GPU adapters wgpu sees, with their limits.
    Info(cli::info::InfoArgs),
    /// Measure latency and throughput of a kernel call under load.
    Bench(Box<cli::bench::BenchArgs>),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// What failed and why on one line, outermost first, skipping a cause whose
/// text its parent already shows (many errors print their source too).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Set to the process ID on the command this process runs again as (exec
/// keeps the ID), so it never does so twice; a value left in the
/// environment by another process does not match.
const REEXEC_MARK: &str = "QUASAR_LAVAPIPE_REEXEC";

/// Makes sure Mesa sees `LP_NUM_THREADS=n`: when the environment says
/// otherwise, runs this command again with it set, in place of this
/// process (same PID, signals and standard streams). Changing the
/// environment of a running process is unsafe (C code may read it from
/// another thread meanwhile), which this crate forbids; a process started
/// with the variable is not.
fn with_lavapipe_threads(n: u32) -> Result<()> {
    let wanted = n.to_string();
    if std::env::var_os("LP_NUM_THREADS").is_some_and(|v| v == wanted.as_str()) {
        return Ok(());
    }
    let pid = std::process::id().to_string();
    if std::env::var_os(REEXEC_MARK).is_some_and(|v| v == pid.as_str()) {
        anyhow::bail!("LP_NUM_THREADS is not {wanted} even after starting again with it set");
    }
    exec_with(&[
        ("LP_NUM_THREADS", wanted.as_str()),
        (REEXEC_MARK, pid.as_str()),
    ])
}

#[cfg(unix)]
fn exec_with(vars: &[(&str, &str)]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    // On Linux the running image itself, which stays valid after its file
    // was replaced or removed (an upgrade in place); `current_exe` then
    // names a path that no longer exists.
    let exe = if cfg!(target_os = "linux") {
        std::path::PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe()?
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(&exe);
    if let Some(name) = args.next() {
        // The name it was started as, not `/proc/self/exe`.
        command.arg0(name);
    }
    command.args(args);
    for (k, v) in vars {
        command.env(k, v);
    }
    // Returns only if the new image could not be started.
    let e = command.exec();
    Err(anyhow::anyhow!("starting {} again: {e}", exe.display()))
}

#[cfg(not(unix))]
fn exec_with(_vars: &[(&str, &str)]) -> Result<()> {
    // Without exec, a child would outlive a parent killed by a service
    // manager: the variable is the operator's to set.
    anyhow::bail!(
        "--lavapipe-threads needs a Unix host; set LP_NUM_THREADS in the environment instead"
    )
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let lavapipe = match &cli.command {
        Command::Demo(a) => a.lavapipe,
        Command::Serve(a) => a.lavapipe,
        Command::Info(a) => a.lavapipe,
        Command::Bench(a) => a.lavapipe,
        Command::Certs(_) | Command::Call(_) => cli::LavapipeArgs::default(),
    };
    if let Some(n) = lavapipe.lavapipe_threads {
        with_lavapipe_threads(n)?;
    }
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(a) => cli::demo::run(a).await,
            Command::Certs(c) => cli::certs::run(c).await,
            Command::Serve(a) => cli::serve::run(*a).await,
            Command::Call(a) => cli::call::run(a).await,
            Command::Info(a) => cli::info::run(a).await,
            Command::Bench(a) => cli::bench::run(*a).await,
        }
    })
}
