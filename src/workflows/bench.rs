//! `taming bench`: throughput of kernels (and, as the models land, of whole
//! models). Each figure is the median of several timed runs after a warm-up.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::engine::kernels::{self, random_vec};
use crate::engine::{Gpu, Tensor};

pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// Median milliseconds per run, for the table.
    pub ms: f64,
}

/// Median wall time in ms of `f` (which must end with the GPU idle).
pub fn median_ms(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(times[times.len() / 2])
}

fn rand_tensor(gpu: &Arc<Gpu>, shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_f32(gpu, &random_vec(n, seed, 1.0), shape)
}

fn gflops(name: &str, flop: f64, ms: f64) -> Figure {
    Figure { name: name.into(), value: flop / ms / 1e6, unit: "GFLOP/s", ms }
}

pub fn kernel_figures(gpu: &Arc<Gpu>, runs: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    use kernels::matmul::matmul;
    // Dispatch round trip: one tiny kernel, submitted and waited for.
    {
        let x = rand_tensor(gpu, &[4, 4], 1)?;
        let ms = median_ms(3, runs.max(20), || {
            let y = kernels::copy::transpose(&x)?;
            drop(y);
            gpu.sync()
        })?;
        report(&Figure { name: "dispatch round trip".into(), value: ms, unit: "ms", ms });
    }
    {
        let n = 1024;
        let a = rand_tensor(gpu, &[n, n], 2)?;
        let b = rand_tensor(gpu, &[n, n], 3)?;
        let ms = median_ms(1, runs, || {
            let c = matmul(&a, &b, false, false, None)?;
            drop(c);
            gpu.sync()
        })?;
        report(&gflops("matmul 1024x1024x1024", 2.0 * (n * n * n) as f64, ms));
        let ms = median_ms(1, runs, || {
            let c = matmul(&a, &b, false, true, None)?;
            drop(c);
            gpu.sync()
        })?;
        report(&gflops("matmul 1024x1024x1024 (B transposed)", 2.0 * (n * n * n) as f64, ms));
    }
    Ok(())
}

pub fn run(gpu: &Arc<Gpu>, what: &str, runs: usize, json: bool) -> Result<()> {
    let device = gpu.info.name.clone();
    if !json {
        println!("device: {}", gpu.describe());
    }
    let report = |f: &Figure| {
        if json {
            println!("{}", serde_json::json!({"name": f.name, "value": f.value, "unit": f.unit, "device": device}));
        } else if f.unit == "ms" {
            println!("{:<44} {:>10.3} ms", f.name, f.value);
        } else {
            println!("{:<44} {:>10.2} {:<8} ({:.2} ms)", f.name, f.value, f.unit, f.ms);
        }
    };
    match what {
        "kernels" => kernel_figures(gpu, runs, report),
        other => bail!("bench: unknown mode '{other}' (available: kernels)"),
    }
}
