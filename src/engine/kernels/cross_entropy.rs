//! Cross-entropy with log-softmax (`shaders/cross_entropy.wgsl`).

use anyhow::{bail, Result};

use super::{grid_for, plane_runs, plane_window, u32_of};
use crate::engine::tensor::{DType, Tensor};

/// Target value that contributes no loss.
pub const IGNORE: u32 = u32::MAX;

pub struct CrossEntropyOut {
    /// Per-row loss [R].
    pub loss: Tensor,
    /// Per-row logsumexp [R] (for backward).
    pub lse: Tensor,
}

crate::kernel_params!(
    /// `shaders/cross_entropy.wgsl`'s `Params`.
    CrossEntropyParams in "cross_entropy" as "Params" { rows: u32, cols: u32, r0: u32, _pad1: u32 }
);

/// logits [.., V] (rows R = numel / V), targets U32 [R].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<CrossEntropyOut> {
    logits.expect_dtype("cross-entropy logits", DType::F32)?;
    targets.expect_dtype("cross-entropy targets", DType::U32)?;
    logits.expect_nonempty("cross-entropy logits")?;
    let v = logits.dim(-1);
    let rows = logits.numel() / v;
    if targets.numel() != rows {
        bail!("cross-entropy: {} targets for {rows} rows of logits {:?}", targets.numel(), logits.shape());
    }
    let gpu = &logits.gpu;
    let loss = Tensor::empty(gpu, &[rows], DType::F32)?;
    let lse = Tensor::empty(gpu, &[rows], DType::F32)?;
    // Two passes over each row of logits per invocation.
    super::expect_loops(gpu, || format!("cross-entropy over {v} classes"), 2 * v)?;
    let pipe = gpu.pipeline("cross_entropy", "cross_entropy", &[])?;
    // Runs of rows where the logits are larger than one binding.
    for run @ (r0, count) in plane_runs(gpu, rows, &[v], 1)? {
        let params = run_params(r0, count, v)?;
        let bindings = [plane_window(logits, v, run), targets.binding(), loss.binding(), lse.binding()];
        gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, count, 64)?)?;
    }
    Ok(CrossEntropyOut { loss, lse })
}

/// The parameters of rows r0 .. r0 + count of `v` classes (forward and backward alike).
fn run_params(r0: usize, count: usize, v: usize) -> Result<CrossEntropyParams> {
    Ok(CrossEntropyParams {
        rows: u32_of("rows", count)?,
        cols: u32_of("classes", v)?,
        r0: u32_of("row", r0)?,
        ..Default::default()
    })
}

/// d logits, given each row's loss gradient `dloss` [R] and the forward's logsumexp.
pub fn cross_entropy_backward(logits: &Tensor, targets: &Tensor, lse: &Tensor, dloss: &Tensor) -> Result<Tensor> {
    let v = logits.dim(-1);
    let rows = logits.numel() / v;
    if dloss.numel() != rows || lse.numel() != rows || targets.numel() != rows {
        bail!(
            "cross-entropy backward: {rows} rows but gradients {:?}, lse {:?}, targets {:?}",
            dloss.shape(),
            lse.shape(),
            targets.shape()
        );
    }
    let gpu = &logits.gpu;
    let d = Tensor::empty(gpu, logits.shape(), DType::F32)?;
    super::expect_loops(gpu, || format!("cross-entropy backward over {v} classes"), v)?;
    let pipe = gpu.pipeline("cross_entropy", "cross_entropy_backward", &[])?;
    for run @ (r0, count) in plane_runs(gpu, rows, &[v], 1)? {
        let params = run_params(r0, count, v)?;
        let bindings =
            [plane_window(logits, v, run), targets.binding(), dloss.binding(), lse.binding(), plane_window(&d, v, run)];
        gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, count, 64)?)?;
    }
    Ok(d)
}

pub mod cpu {
    /// Gradient of the per-row losses with respect to the logits, for row gradients `dloss`.
    pub fn cross_entropy_backward(logits: &[f32], v: usize, targets: &[u32], dloss: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(logits.len());
        for ((row, &t), &g) in logits.chunks(v).zip(targets).zip(dloss) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
            for (j, &x) in row.iter().enumerate() {
                let p = (x as f64 - m).exp() / z;
                let d = if t as usize >= v { 0.0 } else { g as f64 * (p - if j == t as usize { 1.0 } else { 0.0 }) };
                out.push(d as f32);
            }
        }
        out
    }

    pub fn cross_entropy(logits: &[f32], v: usize, targets: &[u32]) -> Vec<f32> {
        logits
            .chunks(v)
            .zip(targets)
            .map(|(row, &t)| {
                if t as usize >= v {
                    return 0.0;
                }
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                (lse - row[t as usize] as f64) as f32
            })
            .collect()
    }
}
