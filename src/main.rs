//! The `taming` command: parses arguments and calls the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use taming::engine::{DeviceRequest, Gpu};
use taming::workflows;

#[derive(Parser)]
#[command(name = "taming", version, about = "Taming Transformers (VQGAN + GPT) on any GPU, through wgpu")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct DeviceArgs {
    /// Adapter to use: its index in `taming info` or part of its name [env: TAMING_ADAPTER]
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Graphics API: vulkan, metal, dx12 or gl (comma list allowed) [env: TAMING_BACKEND]
    #[arg(long, global = true)]
    backend: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the adapters, and the chosen one's limits and features
    Info,
    /// Check parity with the PyTorch reference: recompute DIR/reference.safetensors from DIR/model.safetensors
    Verify {
        /// Fixture directories (model.safetensors + reference.safetensors)
        #[arg(required = true)]
        dirs: Vec<std::path::PathBuf>,
    },
    /// Measure throughput (modes: kernels, train)
    Bench {
        /// What to measure
        #[arg(default_value = "kernels")]
        what: String,
        /// Timed runs per figure (the median is reported)
        #[arg(long, default_value_t = 9)]
        runs: usize,
        /// One JSON object per line: name, value, unit, device
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let req = DeviceRequest { adapter: cli.device.adapter, backend: cli.device.backend }.or_env();
    match cli.command {
        Command::Info => workflows::info::run(&req),
        Command::Verify { dirs } => {
            let gpu = Gpu::new(&req)?;
            if !workflows::verify::run(&gpu, &dirs)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Bench { what, runs, json } => {
            let gpu = Gpu::new(&req)?;
            workflows::bench::run(&gpu, &what, runs, json)
        }
    }
}
