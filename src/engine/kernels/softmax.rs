//! Row softmax (`shaders/softmax.wgsl`: an invocation per row), or on devices with subgroups
//! where `Tuning::reduce_subgroup` says so, a workgroup per row reducing with subgroup operations
//! (`shaders/softmax_subgroup.wgsl`, the same results up to summation order).

use std::sync::Arc;

use anyhow::{bail, Result};

use super::{grid_for, plane_runs, plane_window, u32_of};
use crate::engine::device::{Gpu, Res};
use crate::engine::pool::PooledTexture;
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/softmax.wgsl`'s `Params`: row r of each block of `tq` rows
    /// sees columns up to `q_start + r % tq` when `causal`; the masked softmax and the backward
    /// read a row's first `valid` columns and zero the rest (a padded row's).
    SoftmaxParams in "softmax" as "Params" {
        rows: u32, cols: u32, scale: f32, causal: u32,
        tq: u32, q_start: u32, r0: u32, valid: u32,
    }
);

fn plain(rows: usize, cols: usize, scale: f32) -> Result<SoftmaxParams> {
    Ok(SoftmaxParams {
        rows: u32_of("rows", rows)?,
        cols: u32_of("columns", cols)?,
        scale,
        tq: 1,
        valid: u32_of("columns", cols)?,
        ..Default::default()
    })
}

/// The pipeline of `entry` (an invocation per row) or its subgroup twin (`<entry>_sg`, a
/// workgroup of 64 per row), and the invocations a run of `rows` rows needs. `vec4_rows`: the
/// masked softmax and the backward have twins for rows of whole vec4s (`<entry>4`, the same
/// numbers with a vector load per four values).
/// Rows of `cols` values: each kernel makes three passes over its row at most (a workgroup's
/// lane 1/64 of it, a vec4 invocation a quarter), within the device's loop limit.
fn row_kernel(
    gpu: &Arc<crate::engine::Gpu>,
    entry: &str,
    vec4_rows: bool,
    cols: usize,
) -> Result<(Arc<wgpu::ComputePipeline>, usize)> {
    let per_pass = match (gpu.tuning.reduce_subgroup, vec4_rows) {
        (true, _) => cols.div_ceil(64),
        (false, true) => cols / 4,
        (false, false) => cols,
    };
    super::expect_loops(gpu, || format!("softmax ({entry}) over rows of {cols}"), 3 * per_pass)?;
    if gpu.tuning.reduce_subgroup {
        Ok((gpu.pipeline("softmax_subgroup", &format!("{entry}_sg"), &[])?, 64))
    } else if vec4_rows {
        Ok((gpu.pipeline("softmax", &format!("{entry}4"), &[])?, 1))
    } else {
        Ok((gpu.pipeline("softmax", entry, &[])?, 1))
    }
}

/// Flat texture copies of `inputs` for the `_flat` twins of the vec4 row kernels (an invocation
/// per row, `per_row` = 1: not the subgroup kernels), where the tuning reads through textures
/// (CPU devices: texture fetches are gathers there, buffer loads a loop over the lanes), the
/// copies apply and the inputs are not small enough to read from their buffers
/// (`copy::read_from_buffer`); else None.
fn flat_rows<const N: usize>(gpu: &Gpu, inputs: [&Tensor; N], per_row: usize) -> Result<Option<[PooledTexture; N]>> {
    if !gpu.tuning.reads_via_texture
        || per_row != 1
        || !inputs[0].dim(-1).is_multiple_of(4)
        || super::copy::read_from_buffer(gpu, inputs[0].numel())
    {
        return Ok(None);
    }
    super::copy::flat_textures_vec4(inputs.map(|t| (t, 0, t.numel())))
}

/// softmax(scale * x) over the last dimension.
pub fn softmax(x: &Tensor, scale: f32) -> Result<Tensor> {
    x.expect_dtype("softmax", DType::F32)?;
    x.expect_nonempty("softmax")?;
    let cols = x.dim(-1);
    let gpu = &x.gpu;
    let rows = x.numel() / cols;
    // Rows of whole vec4s (the VQGAN attention's h * w keys): the masked softmax's vec4 kernel
    // with nothing masked, the same numbers with a vector load per four values. (Not where its
    // log-sum-exp output's alignment keeps its rows from splitting across tiny bindings.)
    if cols.is_multiple_of(4) && !gpu.tuning.reduce_subgroup && plane_runs(gpu, rows, &[cols, 1], 1).is_ok() {
        return Ok(softmax_masked(x, scale, false, 1, 0, cols)?.0);
    }
    let y = Tensor::empty(&x.gpu, x.shape(), DType::F32)?;
    let (pipe, per_row) = row_kernel(gpu, "softmax", false, cols)?;
    // Runs of rows where the tensor is larger than one binding.
    for run in plane_runs(gpu, rows, &[cols], 1)? {
        let params = plain(run.1, cols, scale)?;
        let bindings = [plane_window(x, cols, run), plane_window(&y, cols, run)];
        gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, run.1 * per_row, 64)?)?;
    }
    Ok(y)
}

/// Each row of x (its last dimension) over its l2 norm, sqrt(sum x^2 + 1e-24): the codebook
/// lookup's F.normalize in one pass, where square, sum, root, reciprocal and product were six.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    l2_rows(x, None)
}

/// The gradient of `l2_normalize_rows` at x for the output gradient dy.
pub fn l2_normalize_rows_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    dy.expect_shape("l2 normalisation gradient", x.shape())?;
    l2_rows(x, Some(dy))
}

fn l2_rows(x: &Tensor, dy: Option<&Tensor>) -> Result<Tensor> {
    x.expect_dtype("l2 normalisation", DType::F32)?;
    x.expect_nonempty("l2 normalisation")?;
    let gpu = &x.gpu;
    let cols = x.dim(-1);
    let rows = x.numel() / cols;
    let entry = if dy.is_some() { "l2_normalize_backward" } else { "l2_normalize" };
    super::expect_loops(gpu, || format!("l2 normalisation ({entry}) of rows of {cols}"), 2 * cols)?;
    let pipe = gpu.pipeline("softmax", entry, &[])?;
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    for run in plane_runs(gpu, rows, &[cols], 1)? {
        let window = |t| plane_window(t, cols, run);
        // Bindings 1 x, 2 y (dx), 3 dy where given.
        let bindings: Vec<_> = [x, &y].into_iter().chain(dy).map(window).collect();
        gpu.dispatch(&pipe, &plain(run.1, cols, 1.0)?, &bindings, grid_for(gpu, run.1, 64)?)?;
    }
    Ok(y)
}

/// Gradient of `softmax(x, scale)` given its output `y` and the output gradient.
pub fn softmax_backward(y: &Tensor, dy: &Tensor, scale: f32) -> Result<Tensor> {
    softmax_backward_padded(y, dy, scale, y.dim(-1))
}

/// `softmax_backward` of rows whose first `valid` columns are the softmax's; the rest (padding)
/// of dx is zero, and neither y's nor dy's padding is read.
pub fn softmax_backward_padded(y: &Tensor, dy: &Tensor, scale: f32, valid: usize) -> Result<Tensor> {
    dy.expect_shape("softmax gradient", y.shape())?;
    let cols = y.dim(-1);
    if valid > cols {
        bail!("softmax backward: {valid} valid columns of rows of {cols}");
    }
    let rows = y.numel() / cols;
    let dx = Tensor::empty(&y.gpu, y.shape(), DType::F32)?;
    let gpu = &y.gpu;
    let (pipe, per_row) = row_kernel(gpu, "softmax_backward", cols.is_multiple_of(4), cols)?;
    if let Some([y_flat, dy_flat]) = flat_rows(gpu, [y, dy], per_row)? {
        let pipe = gpu.pipeline("softmax", "softmax_backward4_flat", &[])?;
        for run in plane_runs(gpu, rows, &[cols], 1)? {
            let params = SoftmaxParams {
                valid: u32_of("columns", valid)?,
                r0: u32_of("row", run.0)?,
                ..plain(run.1, cols, scale)?
            };
            let bindings = [Res::Tex(&y_flat.view), Res::Buf(plane_window(&dx, cols, run)), Res::Tex(&dy_flat.view)];
            gpu.dispatch_res(&pipe, &params, &bindings, grid_for(gpu, run.1, 64)?)?;
        }
        return Ok(dx);
    }
    for run in plane_runs(gpu, rows, &[cols], 1)? {
        let params = SoftmaxParams { valid: u32_of("columns", valid)?, ..plain(run.1, cols, scale)? };
        let bindings = [plane_window(y, cols, run), plane_window(&dx, cols, run), plane_window(dy, cols, run)];
        gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, run.1 * per_row, 64)?)?;
    }
    Ok(dx)
}

/// Attention probabilities: softmax(scale * scores) over the first `valid` columns of the last
/// dimension (the rest, padding, set to zero and never read) with an optional causal mask (row r
/// of each block of `tq` rows sees columns up to `q_start + r % tq`), and each row's log-sum-exp.
pub fn softmax_masked(
    x: &Tensor,
    scale: f32,
    causal: bool,
    tq: usize,
    q_start: usize,
    valid: usize,
) -> Result<(Tensor, Tensor)> {
    x.expect_dtype("softmax", DType::F32)?;
    x.expect_nonempty("softmax")?;
    let cols = x.dim(-1);
    if valid == 0 || valid > cols {
        bail!("softmax: {valid} valid columns of rows of {cols}");
    }
    let rows = x.numel() / cols;
    let y = Tensor::empty(&x.gpu, x.shape(), DType::F32)?;
    let lse = Tensor::empty(&x.gpu, &[rows], DType::F32)?;
    let gpu = &x.gpu;
    let (pipe, per_row) = row_kernel(gpu, "softmax_masked", cols.is_multiple_of(4), cols)?;
    // Runs of rows where the scores are larger than one binding; the log-sum-exps bound whole and
    // written from the run's first row (r0): a window of them would start on the binding
    // alignment only every align / 4 rows (64 rows of scores at 256 bytes, more than a small
    // binding holds).
    if lse.byte_len() > gpu.max_binding() {
        bail!("softmax: the log-sum-exps of {rows} rows exceed one storage binding ({} bytes)", gpu.max_binding());
    }
    let x_flat = flat_rows(gpu, [x], per_row)?;
    let pipe = match x_flat {
        Some(_) => gpu.pipeline("softmax", "softmax_masked4_flat", &[])?,
        None => pipe,
    };
    for run in plane_runs(gpu, rows, &[cols], 1)? {
        let params = SoftmaxParams {
            causal: causal as u32,
            tq: u32_of("queries", tq.max(1))?,
            q_start: u32_of("query start", q_start)?,
            r0: u32_of("row", run.0)?,
            valid: u32_of("columns", valid)?,
            ..plain(run.1, cols, scale)?
        };
        match &x_flat {
            Some([x_flat]) => {
                let bindings = [Res::Tex(&x_flat.view), Res::Buf(plane_window(&y, cols, run)), Res::Buf(lse.binding())];
                gpu.dispatch_res(&pipe, &params, &bindings, grid_for(gpu, run.1, 64)?)?;
            }
            None => {
                let bindings = [plane_window(x, cols, run), plane_window(&y, cols, run), lse.binding()];
                gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, run.1 * per_row, 64)?)?;
            }
        }
    }
    Ok((y, lse))
}

pub mod cpu {
    /// Rows of `cols` over their l2 norm, sqrt(sum x^2 + 1e-24).
    pub fn l2_normalize_rows(x: &[f32], cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(cols) {
            let inv = 1.0 / (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() + 1e-24).sqrt();
            out.extend(row.iter().map(|&v| (v as f64 * inv) as f32));
        }
        out
    }

    /// Gradient of softmax(scale * x) over rows of `cols`, from the output gradient g.
    pub fn softmax_backward(x: &[f32], cols: usize, scale: f32, g: &[f32]) -> Vec<f32> {
        let y = softmax(x, cols, scale);
        let mut out = Vec::with_capacity(x.len());
        for (yr, gr) in y.chunks(cols).zip(g.chunks(cols)) {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| *a as f64 * *b as f64).sum();
            out.extend(yr.iter().zip(gr).map(|(yv, gv)| (scale as f64 * *yv as f64 * (*gv as f64 - dot)) as f32));
        }
        out
    }

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
