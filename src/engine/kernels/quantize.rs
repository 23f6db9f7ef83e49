//! Nearest-codebook lookup of the vector quantizer (`shaders/quantize.wgsl`).

use anyhow::{bail, Result};

use super::{expect_rank, grid_for, u32_of};
use crate::engine::tensor::{DType, Tensor};

/// z [B, D, h, w], codebook [n_embed, D] -> (indices U32 [B, h, w], z_q [B, D, h, w]).
pub fn nearest(z: &Tensor, codebook: &Tensor) -> Result<(Tensor, Tensor)> {
    expect_rank("quantizer input", z, 4)?;
    expect_rank("codebook", codebook, 2)?;
    z.expect_dtype("quantizer input", DType::F32)?;
    codebook.expect_dtype("codebook", DType::F32)?;
    let (b, d, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    if codebook.dim(1) != d {
        bail!("quantizer: z has {d} channels but the codebook {:?} has vectors of {}", codebook.shape(), codebook.dim(1));
    }
    let gpu = &z.gpu;
    let indices = Tensor::empty(gpu, &[b, h, w], DType::U32)?;
    let zq = Tensor::empty(gpu, z.shape(), DType::F32)?;
    let pipe = gpu.pipeline("quantize", "nearest", &[])?;
    let params = [b as u32, d as u32, u32_of("positions", h * w)?, u32_of("codes", codebook.dim(0))?];
    gpu.dispatch(&pipe, &params, &[z.binding(), codebook.binding(), indices.binding(), zq.binding()],
        grid_for(gpu, b * h * w, 64)?)?;
    Ok((indices, zq))
}

pub mod cpu {
    /// Same formula and order of operations as the kernel, in f32.
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
