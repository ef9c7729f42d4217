//! `quasar info`: the adapters wgpu sees.

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub lavapipe: super::LavapipeArgs,
    /// Print every limit, not only those that matter for compute.
    #[arg(long)]
    all_limits: bool,
}

pub async fn run(args: InfoArgs) -> Result<()> {
    let adapters = tokio::task::spawn_blocking(quasar_server::list_adapters).await?;
    if adapters.is_empty() {
        anyhow::bail!(
            "wgpu sees no adapter; install a Vulkan driver (without a GPU: `apt-get install libvulkan1 mesa-vulkan-drivers`) and check WGPU_BACKEND"
        );
    }
    for (i, a) in adapters.iter().enumerate() {
        let s = &a.summary;
        println!("[{i}] {}", s.name);
        println!("    backend:     {}", s.backend);
        println!("    device type: {}", s.device_type);
        println!("    driver:      {}", s.driver);
        if let Some(threads) = s.lavapipe_threads {
            println!("    {threads}");
        }
        let l = &a.limits;
        if args.all_limits {
            println!("    limits:      {l:#?}");
        } else {
            println!(
                "    max buffer size:                 {} bytes",
                l.max_buffer_size
            );
            println!(
                "    max storage buffer binding size: {} bytes",
                l.max_storage_buffer_binding_size
            );
            println!(
                "    max storage buffers per stage:   {}",
                l.max_storage_buffers_per_shader_stage
            );
            println!(
                "    max workgroups per dimension:    {}",
                l.max_compute_workgroups_per_dimension
            );
            println!(
                "    max invocations per workgroup:   {}",
                l.max_compute_invocations_per_workgroup
            );
            println!(
                "    max workgroup storage:           {} bytes",
                l.max_compute_workgroup_storage_size
            );
        }
    }
    if adapters.len() > 1 {
        println!("\nThe server uses [0] unless --adapter NAME picks another.");
    }
    Ok(())
}
