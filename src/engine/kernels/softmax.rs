//! Row softmax (`shaders/softmax.wgsl`).

use anyhow::Result;

use super::{f, grid_for, u32_of};
use crate::engine::tensor::{DType, Tensor};

/// softmax(scale * x) over the last dimension.
pub fn softmax(x: &Tensor, scale: f32) -> Result<Tensor> {
    x.expect_dtype("softmax", DType::F32)?;
    x.expect_nonempty("softmax")?;
    let cols = x.dim(-1);
    let rows = x.numel() / cols;
    let y = Tensor::empty(&x.gpu, x.shape(), DType::F32)?;
    let gpu = &x.gpu;
    let pipe = gpu.pipeline("softmax", "softmax", &[])?;
    let params = [u32_of("rows", rows)?, u32_of("columns", cols)?, f(scale), 0];
    gpu.dispatch(&pipe, &params, &[x.binding(), y.binding()], grid_for(gpu, rows, 64)?)?;
    Ok(y)
}

/// Gradient of `softmax(x, scale)` given its output `y` and the output gradient.
pub fn softmax_backward(y: &Tensor, dy: &Tensor, scale: f32) -> Result<Tensor> {
    dy.expect_shape("softmax gradient", y.shape())?;
    let cols = y.dim(-1);
    let rows = y.numel() / cols;
    let dx = Tensor::empty(&y.gpu, y.shape(), DType::F32)?;
    let gpu = &y.gpu;
    let pipe = gpu.pipeline("softmax", "softmax_backward", &[])?;
    let params = [u32_of("rows", rows)?, u32_of("columns", cols)?, f(scale), 0];
    gpu.dispatch(&pipe, &params, &[y.binding(), dx.binding(), dy.binding()], grid_for(gpu, rows, 64)?)?;
    Ok(dx)
}

pub mod cpu {
    pub fn softmax(x: &[f32], cols: usize, scale: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(cols) {
            let m = row.iter().map(|&v| (scale * v) as f64).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|&v| ((scale * v) as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            out.extend(e.iter().map(|v| (v / s) as f32));
        }
        out
    }
}
