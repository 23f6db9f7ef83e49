//! Group norm, layer norm and batch norm with batch statistics
//! (`shaders/norm.wgsl`): statistics in two barrier-free passes, then
//! normalise + affine, optionally fused with swish.

use anyhow::{bail, Result};

use super::{f, grid_1d, u32_of};
use crate::engine::tensor::{DType, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `groups` groups over channels (dim 1) and space.
    Group { groups: usize },
    /// Over the last dimension.
    Layer,
    /// Per channel (dim 1) over batch and space.
    Batch,
}

/// The normalised output and the per-statistic (mean, 1/std) pairs, which
/// backward and BatchNorm's running statistics use.
pub struct NormOut {
    pub y: Tensor,
    pub stats: Tensor,
}

pub fn norm(x: &Tensor, kind: NormKind, gamma: &Tensor, beta: &Tensor, eps: f32, swish: bool) -> Result<NormOut> {
    x.expect_dtype("norm input", DType::F32)?;
    x.expect_nonempty("norm input")?;
    let s = x.shape();
    let (mode, c, inner, stats, per_stat, seglen, segstride, group_size) = match kind {
        NormKind::Group { groups } => {
            if s.len() < 2 || s[1] % groups != 0 {
                bail!("group norm: {groups} groups do not divide the channels of {:?}", s);
            }
            let inner: usize = s[2..].iter().product();
            let per = s[1] / groups * inner;
            (0u32, s[1], inner, s[0] * groups, per, per, 0, s[1] / groups)
        }
        NormKind::Layer => {
            let c = *s.last().unwrap();
            (1, c, 1, x.numel() / c, c, c, 0, 1)
        }
        NormKind::Batch => {
            if s.len() < 2 {
                bail!("batch norm: need [B, C, ...], got {:?}", s);
            }
            let inner: usize = s[2..].iter().product();
            (2, s[1], inner, s[1], s[0] * inner, inner, s[1] * inner, 1)
        }
    };
    for (name, t) in [("weight", gamma), ("bias", beta)] {
        if t.numel() != c {
            bail!("norm {name} has shape {:?}, expected [{c}]", t.shape());
        }
    }
    let gpu = &x.gpu;
    let chunk = (gpu.tuning.chunk as usize).min(per_stat).max(1);
    let chunks = per_stat.div_ceil(chunk);
    let params = [
        u32_of("elements", x.numel())?, mode, u32_of("channels", c)?, u32_of("inner", inner)?,
        u32_of("statistics", stats)?, u32_of("segment", seglen)?, 0, u32_of("segment stride", segstride)?,
        u32_of("per statistic", per_stat)?, chunk as u32, chunks as u32, swish as u32,
        f(eps), group_size as u32, 0, 0,
    ];
    let partial = Tensor::empty(gpu, &[stats * chunks, 4], DType::F32)?;
    let pipe = gpu.pipeline("norm", "partial_stats", &[])?;
    gpu.dispatch(&pipe, &params, &[x.binding(), partial.binding()], grid_1d(gpu, stats * chunks)?)?;
    let st = Tensor::empty(gpu, &[stats, 2], DType::F32)?;
    let pipe = gpu.pipeline("norm", "combine", &[])?;
    gpu.dispatch(&pipe, &params, &[partial.binding(), st.binding()], grid_1d(gpu, stats)?)?;
    let y = Tensor::empty(gpu, s, DType::F32)?;
    let pipe = gpu.pipeline("norm", "apply", &[])?;
    gpu.dispatch(&pipe, &params, &[x.binding(), y.binding(), st.binding(), gamma.binding(), beta.binding()],
        grid_1d(gpu, x.numel())?)?;
    Ok(NormOut { y, stats: st })
}

/// `nn.GroupNorm(32, C, eps=1e-6)` as the reference's `Normalize`, optionally followed by swish.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, swish: bool) -> Result<Tensor> {
    Ok(norm(x, NormKind::Group { groups: 32 }, gamma, beta, 1e-6, swish)?.y)
}

pub mod cpu {
    use super::NormKind;

    /// Two-pass f64 reference.
    pub fn norm(x: &[f32], shape: &[usize], kind: NormKind, gamma: &[f32], beta: &[f32], eps: f32, swish: bool) -> Vec<f32> {
        let n = x.len();
        let (c, inner) = match kind {
            NormKind::Layer => (*shape.last().unwrap(), 1),
            _ => (shape[1], shape[2..].iter().product()),
        };
        let stat_of = |i: usize| -> usize {
            match kind {
                NormKind::Group { groups } => i / (c / groups * inner),
                NormKind::Layer => i / c,
                NormKind::Batch => (i / inner) % c,
            }
        };
        let nstats = (0..n).map(stat_of).max().unwrap() + 1;
        let mut sum = vec![0f64; nstats];
        let mut cnt = vec![0f64; nstats];
        for i in 0..n {
            sum[stat_of(i)] += x[i] as f64;
            cnt[stat_of(i)] += 1.0;
        }
        let mean: Vec<f64> = sum.iter().zip(&cnt).map(|(s, c)| s / c).collect();
        let mut var = vec![0f64; nstats];
        for i in 0..n {
            var[stat_of(i)] += (x[i] as f64 - mean[stat_of(i)]).powi(2);
        }
        (0..n)
            .map(|i| {
                let s = stat_of(i);
                let ch = match kind { NormKind::Layer => i % c, _ => (i / inner) % c };
                let v = (x[i] as f64 - mean[s]) / (var[s] / cnt[s] + eps as f64).sqrt() * gamma[ch] as f64 + beta[ch] as f64;
                (if swish { v / (1.0 + (-v).exp()) } else { v }) as f32
            })
            .collect()
    }
}
