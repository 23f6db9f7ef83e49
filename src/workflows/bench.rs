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
        let ms = median_ms(2, runs, || {
            let c = matmul(&a, &b, false, false, None)?;
            drop(c);
            gpu.sync()
        })?;
        report(&gflops("matmul 1024x1024x1024", 2.0 * (n * n * n) as f64, ms));
        let ms = median_ms(2, runs, || {
            let c = matmul(&a, &b, false, true, None)?;
            drop(c);
            gpu.sync()
        })?;
        report(&gflops("matmul 1024x1024x1024 (B transposed)", 2.0 * (n * n * n) as f64, ms));
    }
    {
        // The product inside the conv below: weights [128, 1152] x patches [1152, 4096].
        let a = rand_tensor(gpu, &[128, 1152], 11)?;
        let b = rand_tensor(gpu, &[1152, 4096], 12)?;
        let ms = median_ms(2, runs, || {
            drop(matmul(&a, &b, false, false, None)?);
            gpu.sync()
        })?;
        report(&gflops("matmul 128x4096x1152 (conv-shaped)", 2.0 * (128 * 4096 * 1152) as f64, ms));
    }
    {
        use kernels::conv2d::{conv2d, ConvSpec};
        let x = rand_tensor(gpu, &[1, 128, 64, 64], 4)?;
        let w = rand_tensor(gpu, &[128, 128, 3, 3], 5)?;
        let b = rand_tensor(gpu, &[128], 6)?;
        let ms = median_ms(2, runs, || {
            drop(conv2d(&x, &w, Some(&b), ConvSpec::same(1, 1))?);
            gpu.sync()
        })?;
        report(&gflops("conv 3x3 128->128 on 1x128x64x64", 2.0 * (128 * 128 * 9 * 64 * 64) as f64, ms));
        let g = rand_tensor(gpu, &[128], 7)?;
        let ms = median_ms(2, runs, || {
            drop(kernels::norm::group_norm(&x, &g, &b, true)?);
            gpu.sync()
        })?;
        // Bytes: read twice for the statistics, once to normalise, written once.
        let bytes = 4.0 * 4.0 * (128 * 64 * 64) as f64;
        report(&Figure { name: "group norm + swish on 1x128x64x64".into(), value: bytes / ms / 1e6, unit: "GB/s", ms });
    }
    {
        let (t, c, heads) = (256, 512, 8);
        let q = rand_tensor(gpu, &[1, t, c], 8)?;
        let k = rand_tensor(gpu, &[1, t, c], 9)?;
        let v = rand_tensor(gpu, &[1, t, c], 10)?;
        let ms = median_ms(2, runs, || {
            drop(kernels::attention::multi_head(&q, &k, &v, heads, true)?);
            gpu.sync()
        })?;
        // QKᵀ and PV over the causal half: 2 * 2 * T²/2 * C.
        report(&gflops("causal attention 8 heads x 256 tokens x 64", 2.0 * (t * t * c) as f64, ms));
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
