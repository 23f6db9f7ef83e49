//! Nearest-codebook lookup of the vector quantizer (`shaders/quantize.wgsl`).
//!
//! # Design notes
//!
//! The z·e terms of all distances are one batched product (`kernels::matmul`; its multiply-adds run
//! over the channels in the same order as the direct kernel's loop, so the indices are the same;
//! the CPU reference and the fixture stay exact), |e|² a small kernel (`code_norms`), and the search
//! reads the scores (`nearest_scored`): 190 → ~6 ms for a 16×16 grid of 1,024 codes on lavapipe
//! (llvmpipe, Mesa 22.3.6, a 2-core VM). The direct kernel (`nearest_direct`) took score tensors
//! larger than a quarter of a storage binding until 2026-12-04; its n_e·(D + 1) loop iterations an
//! invocation pass lavapipe's limit from ~1,000 codes of 64 values, so the search now takes such
//! scores by runs of positions and the direct kernel is `taming check`'s second path only. In the
//! VQGAN forward (`bench vqgan`, 2026-11-30) the scores by product took 11.90–13.46 s to
//! 11.19–11.25 s (`models::vqgan`).

use anyhow::{bail, Result};

use super::matmul::{self, Bias, Gemm, Operand, Out};
use super::{expect_rank, grid_for, plane_runs, plane_window, u32_of};
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/quantize.wgsl`'s `Params`: images, code width, positions per image, codes;
    /// `nearest_scored`: the positions p0 .. p0 + np of images i0 .. i0 + b of the bound windows,
    /// which its scores hold.
    QuantizeParams in "quantize" as "Params" { b: u32, d: u32, hw: u32, n_e: u32, p0: u32, np: u32, i0: u32 }
);

/// z [B, D, h, w], codebook [n_embed, D] -> (indices U32 [B, h, w], z_q [B, D, h, w]).
///
/// The scores z·e of every position and code come from one batched product, a run of images at
/// a time, or a run of one image's positions where its scores would pass a quarter of a storage
/// binding (a 2048² image's 16,384 codes of the f16 model against 1,024 codebook rows): the
/// search then reads n_e scores a position. (It used to compute those distances itself there,
/// looping n_e·(D + 1) times an invocation, past lavapipe's 65,535 loop iterations: wrong
/// indices, silently.)
pub fn nearest(z: &Tensor, codebook: &Tensor) -> Result<(Tensor, Tensor)> {
    check(z, codebook)?;
    let gpu = &z.gpu;
    let (b, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    let (n_e, hw) = (codebook.dim(0), h * w);
    // The search loops over every code a position (n_e + its |z|² and z_q loops over D).
    super::expect_loops(gpu, || format!("nearest code among {n_e} of {d} values"), n_e + 2 * d)?;
    let (indices, zq, params) = outputs(z, codebook)?;
    let norms = Tensor::empty(gpu, &[n_e], DType::F32)?;
    let pipe = gpu.pipeline("quantize", "code_norms", &[])?;
    gpu.dispatch(&pipe, &params, &[codebook.binding(), norms.binding()], grid_for(gpu, n_e, 64)?)?;
    // Positions per product: all of an image's where its scores fit the budget.
    let budget = gpu.max_binding() as usize / 4;
    let np = if n_e * hw * 4 <= budget { hw } else { (budget / (n_e * 4)).max(1) };
    let pipe = gpu.pipeline("quantize", "nearest_scored", &[])?;
    // Runs of whole images where their scores fit, else one image of a run at a time by runs of
    // positions.
    let planes: &[usize] = if np == hw { &[d * hw, hw, n_e * hw] } else { &[d * hw, hw] };
    for run @ (b0, nb) in plane_runs(gpu, b, planes, 1)? {
        let (zw, iw, qw) =
            (plane_window(z, d * hw, run), plane_window(&indices, hw, run), plane_window(&zq, d * hw, run));
        let images: Vec<(usize, usize)> = if np == hw { vec![(0, nb)] } else { (0..nb).map(|i| (i, 1)).collect() };
        for (i0, ni) in images {
            for p0 in (0..hw).step_by(np) {
                let count = np.min(hw - p0);
                let scores = Tensor::empty(gpu, &[ni, n_e, count], DType::F32)?;
                matmul::gemm(
                    Gemm { m: n_e, n: count, k: d, batch: ni, alpha: 1.0, beta: 0.0 },
                    Operand::rows(codebook, 0, d, 0, false),
                    Operand::rows(z, (b0 + i0) * d * hw + p0, hw, d * hw, false),
                    Out { t: &scores, off: 0, ld: count, bs: n_e * count },
                    Bias::None,
                )?;
                let params = QuantizeParams { b: ni as u32, p0: p0 as u32, np: count as u32, i0: i0 as u32, ..params };
                gpu.dispatch(
                    &pipe,
                    &params,
                    &[zw, codebook.binding(), iw, qw, scores.binding(), norms.binding()],
                    grid_for(gpu, ni * count, 64)?,
                )?;
            }
        }
    }
    Ok((indices, zq))
}

/// `nearest` computing every distance in one kernel (no scores tensor): the check's second
/// path. An error where its loops (n_e·(D + 1) an invocation) would pass the device's limit.
pub fn nearest_direct(z: &Tensor, codebook: &Tensor) -> Result<(Tensor, Tensor)> {
    check(z, codebook)?;
    let gpu = &z.gpu;
    let (b, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    let (n_e, hw) = (codebook.dim(0), h * w);
    super::expect_loops(gpu, || format!("direct nearest code among {n_e} of {d} values"), n_e * (d + 1) + 2 * d)?;
    let (indices, zq, params) = outputs(z, codebook)?;
    let pipe = gpu.pipeline("quantize", "nearest", &[])?;
    for run @ (_, nb) in plane_runs(gpu, b, &[d * hw, hw], 1)? {
        let params = QuantizeParams { b: nb as u32, ..params };
        let (zw, iw, qw) =
            (plane_window(z, d * hw, run), plane_window(&indices, hw, run), plane_window(&zq, d * hw, run));
        gpu.dispatch(&pipe, &params, &[zw, codebook.binding(), iw, qw], grid_for(gpu, nb * hw, 64)?)?;
    }
    Ok((indices, zq))
}

/// The search's outputs (indices [B, h, w], z_q of z's shape) and its parameters for every image
/// and position.
fn outputs(z: &Tensor, codebook: &Tensor) -> Result<(Tensor, Tensor, QuantizeParams)> {
    let (b, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    let params = QuantizeParams {
        b: b as u32,
        d: d as u32,
        hw: u32_of("positions", h * w)?,
        n_e: u32_of("codes", codebook.dim(0))?,
        p0: 0,
        np: u32_of("positions", h * w)?,
        i0: 0,
    };
    Ok((Tensor::empty(&z.gpu, &[b, h, w], DType::U32)?, Tensor::empty(&z.gpu, z.shape(), DType::F32)?, params))
}

/// logits [B, n, h, w] -> U32 [B, h, w]: the index of each position's largest channel (first on ties).
pub fn argmax_channels(logits: &Tensor) -> Result<Tensor> {
    expect_rank("logits", logits, 4)?;
    logits.expect_dtype("logits", DType::F32)?;
    let gpu = &logits.gpu;
    let (b, n, h, w) = (logits.dim(0), logits.dim(1), logits.dim(2), logits.dim(3));
    let params = QuantizeParams {
        b: b as u32,
        d: 0,
        hw: u32_of("positions", h * w)?,
        n_e: u32_of("channels", n)?,
        ..Default::default()
    };
    let out = Tensor::empty(gpu, &[b, h, w], DType::U32)?;
    let pipe = gpu.pipeline("quantize", "argmax", &[])?;
    gpu.dispatch(&pipe, &params, &[logits.binding(), out.binding()], grid_for(gpu, b * h * w, 64)?)?;
    Ok(out)
}

/// Label ids (host, [B][h*w]) -> one-hot F32 [B, n, h, w]. An id >= n is an error naming it.
pub fn one_hot(
    labels: &[u32],
    b: usize,
    h: usize,
    w: usize,
    n: usize,
    gpu: &std::sync::Arc<crate::engine::Gpu>,
) -> Result<Tensor> {
    if labels.len() != b * h * w {
        bail!("one-hot: {} labels for {b}x{h}x{w} positions", labels.len());
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= n) {
        bail!("one-hot: label {bad} is outside the {n} labels");
    }
    let ids = Tensor::from_u32(gpu, labels, &[b, h, w])?;
    let out = Tensor::empty(gpu, &[b, n, h, w], DType::F32)?;
    let params = QuantizeParams {
        b: b as u32,
        d: 0,
        hw: u32_of("positions", h * w)?,
        n_e: u32_of("labels", n)?,
        ..Default::default()
    };
    let pipe = gpu.pipeline("quantize", "one_hot", &[])?;
    gpu.dispatch(&pipe, &params, &[ids.binding(), out.binding()], grid_for(gpu, b * n * h * w, 64)?)?;
    Ok(out)
}

fn check(z: &Tensor, codebook: &Tensor) -> Result<()> {
    expect_rank("quantizer input", z, 4)?;
    expect_rank("codebook", codebook, 2)?;
    z.expect_dtype("quantizer input", DType::F32)?;
    codebook.expect_dtype("codebook", DType::F32)?;
    if codebook.dim(1) != z.dim(1) {
        bail!(
            "quantizer: z has {} channels but the codebook {:?} has vectors of {}",
            z.dim(1),
            codebook.shape(),
            codebook.dim(1)
        );
    }
    Ok(())
}

pub mod cpu {
    /// Index of the largest channel of each position of [B, n, hw] (first on ties).
    pub fn argmax_channels(x: &[f32], b: usize, n: usize, hw: usize) -> Vec<u32> {
        let mut out = vec![0u32; b * hw];
        for bi in 0..b {
            for p in 0..hw {
                let at = |e: usize| x[(bi * n + e) * hw + p];
                out[bi * hw + p] = (1..n).fold(0, |best, e| if at(e) > at(best) { e } else { best }) as u32;
            }
        }
        out
    }

    /// [B][hw] ids -> [B, n, hw] one-hot.
    pub fn one_hot(labels: &[u32], b: usize, n: usize, hw: usize) -> Vec<f32> {
        let mut out = vec![0f32; b * n * hw];
        for bi in 0..b {
            for p in 0..hw {
                out[(bi * n + labels[bi * hw + p] as usize) * hw + p] = 1.0;
            }
        }
        out
    }

    /// Same formula and order of operations as the kernels, in f32.
    pub fn nearest(z: &[f32], b: usize, d: usize, hw: usize, codebook: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let n_e = codebook.len() / d;
        let mut idx = vec![0u32; b * hw];
        let mut zq = vec![0f32; z.len()];
        for bi in 0..b {
            for p in 0..hw {
                let zv: Vec<f32> = (0..d).map(|c| z[(bi * d + c) * hw + p]).collect();
                let zz: f32 = zv.iter().map(|v| v * v).sum();
                let mut best = (f32::MAX, 0usize);
                for e in 0..n_e {
                    let row = &codebook[e * d..(e + 1) * d];
                    let ee: f32 = row.iter().map(|v| v * v).sum();
                    let ze: f32 = row.iter().zip(&zv).map(|(a, b)| a * b).sum();
                    let dist = zz + ee - 2.0 * ze;
                    if dist < best.0 {
                        best = (dist, e);
                    }
                }
                idx[bi * hw + p] = best.1 as u32;
                for c in 0..d {
                    zq[(bi * d + c) * hw + p] = codebook[best.1 * d + c];
                }
            }
        }
        (idx, zq)
    }
}
