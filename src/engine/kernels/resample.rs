//! Nearest x2 upsampling and zero padding (`shaders/resample.wgsl`).
//!
//! Where spans allow, upsampling runs `upsample2x4`: one load and four stores per 16 outputs, since
//! a buffer load with a per-lane address runs lane by lane on lavapipe and a vec4 load costs about
//! what one float does (50 → 6.7 ms per VQGAN upsample on lavapipe, llvmpipe, Mesa 22.3.6, a 2-core
//! VM; see `kernels::norm` for the other vec4 entries).

use anyhow::Result;

use super::{expect_rank, grid_1d, plane_runs, plane_window, u32_of};
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/resample.wgsl`'s `Params`: invocations, input and output
    /// plane sizes, top and left padding.
    ResampleParams in "resample" as "Params" {
        n: u32, h: u32, w: u32, ho: u32,
        wo: u32, pad_t: u32, pad_l: u32, _pad0: u32,
    }
);

fn launch(entry: &str, x: &Tensor, shape: [usize; 4], pad_t: usize, pad_l: usize) -> Result<Tensor> {
    launch_n(entry, x, shape, pad_t, pad_l, shape[2] * shape[3])
}

/// `launch` with `per_plane` invocations (p.n) per plane other than one per output element. Every
/// kernel here maps plane i of the input to plane i of the output, so tensors larger than one
/// storage binding are done in runs of planes.
fn launch_n(
    entry: &str,
    x: &Tensor,
    shape: [usize; 4],
    pad_t: usize,
    pad_l: usize,
    per_plane: usize,
) -> Result<Tensor> {
    expect_rank(entry, x, 4)?;
    x.expect_dtype(entry, DType::F32)?;
    let out = Tensor::empty(&x.gpu, &shape, DType::F32)?;
    let gpu = &x.gpu;
    let pipe = gpu.pipeline("resample", entry, &[])?;
    let params = ResampleParams {
        h: x.dim(2) as u32,
        w: x.dim(3) as u32,
        ho: shape[2] as u32,
        wo: shape[3] as u32,
        pad_t: pad_t as u32,
        pad_l: pad_l as u32,
        ..Default::default()
    };
    let planes = [(x, x.dim(2) * x.dim(3)), (&out, shape[2] * shape[3])];
    by_planes(&pipe, params, shape[0] * shape[1], &planes, per_plane)?;
    Ok(out)
}

/// Dispatch `pipe` over `planes` planes of `tensors` ((tensor, values per plane), bound in
/// order), `per_plane` invocations each (p.n counts the run's), a run of planes at a time where a
/// tensor is larger than one storage binding.
fn by_planes(
    pipe: &wgpu::ComputePipeline,
    params: ResampleParams,
    planes: usize,
    tensors: &[(&Tensor, usize)],
    per_plane: usize,
) -> Result<()> {
    let gpu = &tensors[0].0.gpu;
    let sizes: Vec<usize> = tensors.iter().map(|t| t.1).collect();
    for run in plane_runs(gpu, planes, &sizes, 1)? {
        let params = ResampleParams { n: u32_of("invocations", per_plane * run.1)?, ..params };
        let bindings: Vec<_> = tensors.iter().map(|&(t, plane)| plane_window(t, plane, run)).collect();
        gpu.dispatch(pipe, &params, &bindings, grid_1d(gpu, per_plane * run.1)?)?;
    }
    Ok(())
}

/// [B, C, H, W] -> [B, C, 2H, 2W], nearest neighbour (`F.interpolate(scale_factor=2.0, mode="nearest")`).
pub fn upsample2x(x: &Tensor) -> Result<Tensor> {
    expect_rank("upsample2x", x, 4)?;
    let s = x.shape();
    let shape = [s[0], s[1], 2 * s[2], 2 * s[3]];
    if s[3].is_multiple_of(4) {
        // One input vec4 -> four output vec4s (two rows).
        return launch_n("upsample2x4", x, shape, 0, 0, s[2] * s[3] / 4);
    }
    launch("upsample2x", x, shape, 0, 0)
}

/// Zero padding (top, left, bottom, right) of [B, C, H, W].
pub fn pad(x: &Tensor, p: [usize; 4]) -> Result<Tensor> {
    let s = x.shape();
    launch("pad", x, [s[0], s[1], s[2] + p[0] + p[2], s[3] + p[1] + p[3]], p[0], p[1])
}

/// 2x2 max pooling with stride 2 of [B, C, H, W] (floor on odd sizes).
pub fn maxpool2x2(x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    launch("maxpool2x2", x, [s[0], s[1], s[2] / 2, s[3] / 2], 0, 0)
}

/// Gradient of `maxpool2x2` for the forward input `x`.
pub fn maxpool2x2_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    dy.expect_shape("max-pool gradient", &[s[0], s[1], s[2] / 2, s[3] / 2])?;
    let out = Tensor::empty(&x.gpu, s, DType::F32)?;
    let gpu = &x.gpu;
    let pipe = gpu.pipeline("resample", "maxpool2x2_backward", &[])?;
    let params = ResampleParams {
        h: s[2] as u32,
        w: s[3] as u32,
        ho: (s[2] / 2) as u32,
        wo: (s[3] / 2) as u32,
        ..Default::default()
    };
    let plane = s[2] * s[3];
    by_planes(&pipe, params, s[0] * s[1], &[(dy, (s[2] / 2) * (s[3] / 2)), (&out, plane), (x, plane)], plane)?;
    Ok(out)
}

/// Shrinking kernels (backward): `dy` [B, C, Ho, Wo] -> [B, C, h, w].
fn shrink(entry: &str, dy: &Tensor, h: usize, w: usize, pad_t: usize, pad_l: usize) -> Result<Tensor> {
    expect_rank(entry, dy, 4)?;
    let s = dy.shape();
    let out = Tensor::empty(&dy.gpu, &[s[0], s[1], h, w], DType::F32)?;
    let gpu = &dy.gpu;
    let pipe = gpu.pipeline("resample", entry, &[])?;
    let params = ResampleParams {
        h: h as u32,
        w: w as u32,
        ho: s[2] as u32,
        wo: s[3] as u32,
        pad_t: pad_t as u32,
        pad_l: pad_l as u32,
        ..Default::default()
    };
    by_planes(&pipe, params, s[0] * s[1], &[(dy, s[2] * s[3]), (&out, h * w)], h * w)?;
    Ok(out)
}

/// Gradient of `upsample2x`: sums of 2x2 blocks.
pub fn upsample2x_backward(dy: &Tensor) -> Result<Tensor> {
    let s = dy.shape();
    if s.len() != 4 || !s[2].is_multiple_of(2) || !s[3].is_multiple_of(2) {
        anyhow::bail!("upsample backward: gradient {:?} is not an upsampled shape", s);
    }
    shrink("upsample2x_backward", dy, s[2] / 2, s[3] / 2, 0, 0)
}

/// Gradient of `pad(x, p)` for an input of h x w: the gradient cropped back.
pub fn pad_backward(dy: &Tensor, p: [usize; 4], h: usize, w: usize) -> Result<Tensor> {
    let s = dy.shape();
    if s.len() != 4 || s[2] != h + p[0] + p[2] || s[3] != w + p[1] + p[3] {
        anyhow::bail!("pad backward: gradient {:?} does not match a {h}x{w} input padded by {p:?}", s);
    }
    shrink("crop", dy, h, w, p[0], p[1])
}

pub mod cpu {
    pub fn upsample2x_backward(g: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0f32; planes * h * w];
        for pl in 0..planes {
            for y in 0..2 * h {
                for xx in 0..2 * w {
                    out[(pl * h + y / 2) * w + xx / 2] += g[(pl * 2 * h + y) * 2 * w + xx];
                }
            }
        }
        out
    }
    pub fn pad_backward(g: &[f32], planes: usize, h: usize, w: usize, p: [usize; 4]) -> Vec<f32> {
        let (ho, wo) = (h + p[0] + p[2], w + p[1] + p[3]);
        let mut out = vec![0f32; planes * h * w];
        for pl in 0..planes {
            for y in 0..h {
                for xx in 0..w {
                    out[(pl * h + y) * w + xx] = g[(pl * ho + y + p[0]) * wo + xx + p[1]];
                }
            }
        }
        out
    }
    /// Gradient to the first maximum of each 2x2 window.
    pub fn maxpool2x2_backward(x: &[f32], g: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![0f32; x.len()];
        for pl in 0..planes {
            for y in 0..ho {
                for xx in 0..wo {
                    let idx = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(dy, dx)| (pl * h + 2 * y + dy) * w + 2 * xx + dx);
                    let best = (1..4).fold(0, |b, k| if x[idx[k]] > x[idx[b]] { k } else { b });
                    out[idx[best]] += g[(pl * ho + y) * wo + xx];
                }
            }
        }
        out
    }

    pub fn maxpool2x2(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![0.0; planes * ho * wo];
        for pl in 0..planes {
            for y in 0..ho {
                for xx in 0..wo {
                    let at = |dy: usize, dx: usize| x[(pl * h + 2 * y + dy) * w + 2 * xx + dx];
                    out[(pl * ho + y) * wo + xx] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                }
            }
        }
        out
    }

    pub fn upsample2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0.0; planes * 4 * h * w];
        for pl in 0..planes {
            for y in 0..2 * h {
                for xx in 0..2 * w {
                    out[(pl * 2 * h + y) * 2 * w + xx] = x[(pl * h + y / 2) * w + xx / 2];
                }
            }
        }
        out
    }
    pub fn pad(x: &[f32], planes: usize, h: usize, w: usize, p: [usize; 4]) -> Vec<f32> {
        let (ho, wo) = (h + p[0] + p[2], w + p[1] + p[3]);
        let mut out = vec![0.0; planes * ho * wo];
        for pl in 0..planes {
            for y in 0..h {
                for xx in 0..w {
                    out[(pl * ho + y + p[0]) * wo + xx + p[1]] = x[(pl * h + y) * w + xx];
                }
            }
        }
        out
    }
}
