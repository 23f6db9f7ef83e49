//! Reductions (`shaders/reduce.wgsl`): sum, mean, mean |x|, L2 norm of a
//! whole tensor, and sums along one dimension.

use anyhow::{bail, Result};

use super::{grid_1d, plane_runs, plane_window, u32_of};
use crate::engine::device::Res;
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/reduce.wgsl`'s `Params`: `sum_chunks` reads n, chunk, op;
    /// `sum_axis` reduces [outer, r, inner] to [outer, inner].
    ReduceParams in "reduce" as "Params" {
        n: u32, chunk: u32, op: u32, out0: u32,
        outer: u32, r: u32, inner: u32, x0: u32,
    }
);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    MeanAbs,
    /// sqrt(sum x²)
    L2Norm,
    /// sum x²
    SumSquares,
}

/// A one-element tensor holding the reduction of all of `x`.
pub fn reduce(x: &Tensor, what: Reduce) -> Result<Tensor> {
    x.expect_dtype("reduce", DType::F32)?;
    x.expect_nonempty("reduce")?;
    let gpu = &x.gpu;
    let pipe = gpu.pipeline("reduce", "sum_chunks", &[])?;
    let chunk = gpu.tuning.chunk.max(2) as usize;
    let first_op = match what {
        Reduce::Sum | Reduce::Mean => 0,
        Reduce::MeanAbs => 1,
        Reduce::L2Norm | Reduce::SumSquares => 2,
    };
    let mut cur = x.clone();
    let mut op = first_op;
    loop {
        let n = cur.numel();
        let parts = n.div_ceil(chunk);
        let next = Tensor::empty(gpu, &[parts], DType::F32)?;
        // Runs of whole chunks where the tensor is larger than one binding (the same chunks, so
        // the same sums).
        for run @ (first, count) in plane_runs(gpu, parts, &[chunk], 1)? {
            let len = (n - first * chunk).min(count * chunk);
            let params = ReduceParams {
                n: u32_of("elements", len)?,
                chunk: chunk as u32,
                op,
                out0: u32_of("partial", first)?,
                ..Default::default()
            };
            let bindings = [plane_window(&cur, chunk, run), next.binding()];
            gpu.dispatch(&pipe, &params, &bindings, grid_1d(gpu, count)?)?;
        }
        cur = next;
        op = 0;
        if parts == 1 {
            break;
        }
    }
    let n = x.numel() as f32;
    match what {
        Reduce::Sum | Reduce::SumSquares => Ok(cur.reshape(&[1])?),
        Reduce::Mean | Reduce::MeanAbs => super::elementwise::scale(&cur, 1.0 / n),
        Reduce::L2Norm => super::elementwise::unary(&cur, super::elementwise::Unary::Sqrt),
    }
}

/// Sum over dimension `dim`: [.., n, ..] -> [.., ..] (the dimension removed).
pub fn sum_dim(x: &Tensor, dim: usize) -> Result<Tensor> {
    x.expect_dtype("sum_dim", DType::F32)?;
    if dim >= x.rank() {
        bail!("sum_dim: dimension {dim} out of range for {:?}", x.shape());
    }
    let (outer, r, inner) = super::copy::around(x.shape(), dim);
    let mut shape = x.shape().to_vec();
    shape.remove(dim);
    let gpu = &x.gpu;
    // Long reduced axes on devices with subgroups: a workgroup of 64 per output element, each
    // invocation walking r / 64 values, where the device's loop budget allows that walk (else
    // the parts below).
    let by_workgroup = gpu.tuning.reduce_subgroup && r >= 64 && super::loops_fit(gpu, r.div_ceil(64))?;
    // Otherwise, whole vec4s of columns at a time where the rows allow (the same numbers): a
    // linear layer's bias gradient ([2040, 512] in a GPT step: 2 workgroups of scalar loads
    // before; profiled, 0.051 -> 0.030 of the step's main products' time, 2026-12-03).
    let by_vec4 = !by_workgroup && inner.is_multiple_of(4);
    // An axis longer than one invocation's loop budget (lavapipe silently ends longer loops):
    // sums of parts of it (LOOP_ITERATIONS values each) into [parts, outer * inner], then of the
    // parts, in order.
    let parts = if !by_workgroup && r > super::LOOP_ITERATIONS { r.div_ceil(super::LOOP_ITERATIONS) } else { 1 };
    let out = match parts {
        1 => Tensor::empty(gpu, &shape, DType::F32)?,
        _ => Tensor::empty(gpu, &[parts, outer * inner], DType::F32)?,
    };
    // CPU devices: the vec4 sums read x through a flat texture copy of it (texture fetches are
    // gathers there, buffer loads a loop over the lanes), unless x is small (`read_from_buffer`:
    // a bias gradient of the demo's attention, 0.050 ms from the buffer against 0.073 from a copy).
    let through_copy = by_vec4 && gpu.tuning.reads_via_texture && !super::copy::read_from_buffer(gpu, x.numel());
    let flat = if through_copy { super::copy::flat_texture_vec4(x)? } else { None };
    let pipe = match (by_workgroup, by_vec4, &flat) {
        (true, _, _) => gpu.pipeline("reduce_subgroup", "sum_axis_sg", &[])?,
        (false, true, Some(_)) => gpu.pipeline("reduce", "sum_axis4_flat", &[])?,
        (false, true, None) => gpu.pipeline("reduce", "sum_axis4", &[])?,
        (false, false, _) => gpu.pipeline("reduce", "sum_axis", &[])?,
    };
    // Runs of outer rows where x is larger than one binding, x bound from the aligned start at or
    // before the run's (x0: the run's first value there); the output (r times smaller) bound
    // whole and written from the run's start (out0) where it fits, so runs start on any row.
    let out_whole = out.byte_len() <= gpu.max_binding();
    if parts > 1 && !out_whole {
        bail!("sum_dim: the partial sums of {:?} along dimension {dim} exceed one storage binding", x.shape());
    }
    let runs = if out_whole {
        super::plane_runs_any_start(gpu, outer, r * inner)?
    } else {
        plane_runs(gpu, outer, &[r * inner, inner], 1)?
    };
    for run @ (first, count) in runs {
        let (x_window, x_start) = super::aligned_window(x, first * r * inner, count * r * inner);
        for j in 0..parts {
            let (k0, len) = if parts > 1 { (j * super::LOOP_ITERATIONS, super::LOOP_ITERATIONS) } else { (0, 0) };
            let params = ReduceParams {
                n: u32_of("reduced", k0)?,
                chunk: len as u32,
                outer: u32_of("outer", count)?,
                r: u32_of("reduced", r)?,
                inner: u32_of("inner", inner)?,
                out0: if out_whole { u32_of("output offset", (j * outer + first) * inner)? } else { 0 },
                x0: u32_of("element", if flat.is_some() { first * r * inner } else { first * r * inner - x_start })?,
                ..Default::default()
            };
            let out_window = if out_whole { out.binding() } else { plane_window(&out, inner, run) };
            let bindings = match &flat {
                Some(tex) => [Res::Tex(&tex.view), Res::Buf(out_window)],
                None => [Res::Buf(x_window), Res::Buf(out_window)],
            };
            let groups = match (by_workgroup, by_vec4) {
                (true, _) => super::grid_for(gpu, count * inner * 64, 64)?,
                (false, true) => super::grid_for(gpu, count * inner / 4, 8)?,
                (false, false) => grid_1d(gpu, count * inner)?,
            };
            gpu.dispatch_res(&pipe, &params, &bindings, groups)?;
        }
    }
    if parts > 1 {
        return sum_dim(&out, 0)?.reshape(&shape);
    }
    Ok(out)
}

/// The most vec4s one invocation of `channel_sums` adds (see shaders/reduce.wgsl), within
/// `LOOP_ITERATIONS`.
const CHANNEL_CHUNK: usize = 4096;

/// Per-channel sums of x [outer, c, inner] (a bias gradient): [c]. On devices without the
/// subgroup reduction and planes of whole vec4s, sums of chunks of the planes then of each
/// channel's chunks (`channel_chunks4` or, reading x through a flat texture,
/// `channel_chunks_flat`; then `channel_sums_of_chunks`), where the two `sum_dim` passes ran
/// one workgroup each at a few dozen channels (a single thread of a CPU device, 125 dispatches
/// per demo VQGAN step); otherwise, or where x is larger than one binding and not read through a
/// texture, those two passes.
pub fn channel_sums(x: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    x.expect_dtype("channel_sums", DType::F32)?;
    if c == 0 || inner == 0 || !x.numel().is_multiple_of(c * inner) {
        bail!("channel_sums: {:?} is not [outer, {c}, {inner}]", x.shape());
    }
    let outer = x.numel() / (c * inner);
    let gpu = &x.gpu;
    let by4 = !gpu.tuning.reduce_subgroup && inner.is_multiple_of(4);
    // Through a flat texture copy where the device reads textures faster than buffers (x may
    // then be larger than one binding).
    let flat = if by4 && gpu.tuning.reads_via_texture { super::copy::flat_texture_vec4(x)? } else { None };
    if !by4 || (flat.is_none() && x.byte_len() > gpu.max_binding()) {
        let per = sum_dim(&x.reshape(&[outer, c, inner])?, 2)?;
        return sum_dim(&per, 0);
    }
    // Chunks of at most CHANNEL_CHUNK vec4s, at least 256 of them in all where planes allow.
    let r = inner / 4;
    let chunk = r.div_ceil(256usize.div_ceil(outer * c)).clamp(16.min(r), CHANNEL_CHUNK);
    let chunks = r.div_ceil(chunk);
    // The second pass walks every image's chunks of a channel in one invocation.
    super::expect_loops(
        gpu,
        || format!("channel_sums_of_chunks ({outer} images x {chunks} chunks)"),
        outer * (chunks + 1),
    )?;
    let params = ReduceParams {
        n: u32_of("chunks", chunks)?,
        chunk: chunk as u32,
        outer: u32_of("images", outer)?,
        r: u32_of("plane", r)?,
        inner: u32_of("channels", c)?,
        ..Default::default()
    };
    let sums = Tensor::empty(gpu, &[outer * c * chunks], DType::F32)?;
    let grid = super::grid_for(gpu, outer * c * chunks, 64)?;
    if let Some(flat) = flat {
        let pipe = gpu.pipeline("reduce", "channel_chunks_flat", &[])?;
        gpu.dispatch_res(&pipe, &params, &[Res::Tex(&flat.view), Res::Buf(sums.binding())], grid)?;
    } else {
        let pipe = gpu.pipeline("reduce", "channel_chunks4", &[])?;
        gpu.dispatch(&pipe, &params, &[x.binding(), sums.binding()], grid)?;
    }
    let out = Tensor::empty(gpu, &[c], DType::F32)?;
    let pipe = gpu.pipeline("reduce", "channel_sums_of_chunks", &[])?;
    gpu.dispatch(&pipe, &params, &[sums.binding(), out.binding()], super::grid_for(gpu, c, 8)?)?;
    Ok(out)
}

/// How many iterations of two nested loops (`outer` × `inner`) one invocation of this device
/// runs: `outer * inner` where loops are not cut short (`LOOP_ITERATIONS`; `taming check`).
pub fn loop_probe(gpu: &std::sync::Arc<crate::engine::Gpu>, outer: usize, inner: usize) -> Result<usize> {
    let out = Tensor::zeros(gpu, &[1])?;
    let params = ReduceParams { outer: u32_of("loops", outer)?, r: u32_of("loops", inner)?, ..Default::default() };
    let pipe = gpu.pipeline("reduce", "loop_probe", &[])?;
    gpu.dispatch(&pipe, &params, &[out.binding()], [1, 1, 1])?;
    Ok(out.to_vec()?[0] as usize)
}

pub mod cpu {
    use super::Reduce;

    /// Per-channel sums of x [outer, c, inner].
    pub fn channel_sums(x: &[f32], c: usize, inner: usize) -> Vec<f32> {
        let outer = x.len() / (c * inner);
        (0..c)
            .map(|ch| {
                (0..outer)
                    .map(|b| x[(b * c + ch) * inner..][..inner].iter().map(|&v| v as f64).sum::<f64>())
                    .sum::<f64>() as f32
            })
            .collect()
    }

    pub fn reduce(x: &[f32], what: Reduce) -> f32 {
        let n = x.len() as f64;
        (match what {
            Reduce::Sum => x.iter().map(|&v| v as f64).sum::<f64>(),
            Reduce::Mean => x.iter().map(|&v| v as f64).sum::<f64>() / n,
            Reduce::MeanAbs => x.iter().map(|&v| (v as f64).abs()).sum::<f64>() / n,
            Reduce::L2Norm => x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt(),
            Reduce::SumSquares => x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>(),
        }) as f32
    }

    pub fn sum_dim(x: &[f32], shape: &[usize], dim: usize) -> Vec<f32> {
        let (outer, r, inner) = crate::engine::kernels::copy::around(shape, dim);
        let mut out = vec![0f32; outer * inner];
        for o in 0..outer {
            for j in 0..inner {
                out[o * inner + j] = (0..r).map(|k| x[(o * r + k) * inner + j] as f64).sum::<f64>() as f32;
            }
        }
        out
    }
}
