//! The SDK in a few lines: start a real server in this process (loopback,
//! fresh certificates), connect, and call kernels from several tasks at once.
//!
//! `cargo run --example sdk`

use anyhow::{Context, Result, ensure};
use quasar::embedded::EmbeddedServer;
use quasar_client::{Call, Client};

#[tokio::main]
async fn main() -> Result<()> {
    let server = EmbeddedServer::start(|_| {}).await?;
    println!("server on {} using {}", server.addr(), server.adapter());

    // One connection; clones share it.
    let client = Client::connect(server.client_config("example")?).await?;

    let x: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    let y = vec![1.0f32; 1024];
    let response = client
        .execute(
            Call::new("saxpy")
                .arg("a", 2.0f32)
                .input("x", &x)
                .input("y", &y),
        )
        .await
        .context("saxpy")?;
    let out = response.output::<f32>("y")?;
    ensure!(out[3] == 7.0, "saxpy gave {}", out[3]);
    let t = response.timings();
    println!(
        "saxpy: y[3] = {}; server {} us (queued {} us, GPU {} us)",
        out[3], t.total_us, t.queued_us, t.gpu_us
    );

    // Calls from many tasks run concurrently, each on its own QUIC stream.
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8u32 {
        let client = client.clone();
        tasks.spawn(async move {
            let values: Vec<u32> = (0..1000).map(|i| (i * (task + 1)) % 97).collect();
            let r = client
                .execute(
                    Call::new("histogram")
                        .arg("num_bins", 10u32)
                        .arg("bin_width", 10u32)
                        .input("values", &values),
                )
                .await?;
            let total: u32 = r.output::<u32>("bins")?.iter().sum();
            anyhow::Ok(total)
        });
    }
    while let Some(done) = tasks.join_next().await {
        ensure!(done?? == 1000, "a histogram lost values");
    }
    println!("8 concurrent histograms: every value counted");

    // Errors are typed: the server's status code and message.
    let err = client
        .execute(Call::new("saxpy").arg("a", 2.0f32).input("x", &x))
        .await
        .err()
        .context("a call missing `y` must fail")?;
    println!("missing buffer -> {} ({})", err.code(), err);

    client.close().await;
    server.stop().await;
    Ok(())
}
