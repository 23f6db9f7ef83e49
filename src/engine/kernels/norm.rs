//! Group norm, layer norm and batch norm with batch statistics
//! (`shaders/norm.wgsl`): statistics in two barrier-free passes (partial sums per chunk, then their
//! combination), then normalise + affine, optionally fused with swish; one-dispatch layer norm of
//! short rows (`layer_norm_rows`, token-by-token decoding).
//!
//! # Design notes
//!
//! Measured on lavapipe (llvmpipe, Mesa 22.3.6, a 2-core VM).
//!
//! - **Statistics without barriers**: norms and reductions fold contiguous chunks per invocation and
//!   combine partial (count, mean, M2) with Chan's formula, so they need no workgroup barriers (very
//!   expensive on lavapipe). The vec4 group/layer-norm statistics take one pass over each chunk
//!   (sums of x − s and of its squares, s = the chunk's first value, so the squares do not
//!   cancel): half the loads, group norm + swish 17.7 → 13.6 ms.
//! - **vec4 where spans allow**: a buffer load with a per-lane address runs lane by lane on
//!   lavapipe, so a vec4 load costs about what one float does; the norms read and write vec4s where
//!   every span is a multiple of 4 (group norm + swish 24 → 13 ms). In inference, group norm and
//!   the swish after it are one kernel (`Tape::norm_swish`). Likewise `binary4` (same-shape and
//!   per-channel arithmetic: residual adds 2.5 → 1.9 ms), `upsample2x4` (one load and four stores
//!   per 16 outputs: 50 → 6.7 ms per VQGAN upsample) and `swap_dims4` (the conv weight reorder).
//!   Tried and dropped: vec4 loads in `shifted_pack` (slower: its eight texture stores dominate) and
//!   staging it through a buffer plus copy (within noise).
//! - **Statistics through a texture** (`Tuning::reads_via_texture`, CPU devices): the vec4
//!   statistics read their input from a flat texture copy (`kernels::copy::flat_texture_vec4`)
//!   rather than by buffer loads (`TAMING_READS_TEXTURE=0|1` overrides).
//! - Where the norm feeds a 3×3 convolution that reads its input directly, the normalisation is
//!   applied by the convolution's input pack instead (`kernels::conv2d`).
//!
//! # Measurements: group norm + swish on 1×128×64×64 (`bench kernels`)
//!
//! On lavapipe (llvmpipe, Mesa 22.3.6, 2 cores); Burn on the same machine: 4.8 ms. Timings vary
//! by day: on 2026-11-30 the unchanged group norm ran 16.8–19.2 ms against 11.8–12.9 the day before.
//!
//! - 2026-11-30: 11.1–12.3 ms over 5 runs, statistics in one pass through a texture copy;
//!   13.5–14.7 ms through buffer loads, 17.7 ms with two passes, the same day.
//! - 2026-11-29: 11.8–12.9 ms with two passes (a faster day).

use anyhow::{bail, Result};

use super::{copy, grid_1d, plane_window, u32_of};
use crate::engine::device::Res;
use crate::engine::pool::PooledTexture;
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/norm.wgsl`'s `Params` (see `Layout` for the statistics'
    /// geometry; act: 0 none, 1 swish).
    NormParams in "norm" as "Params" {
        n: u32, mode: u32, c: u32, inner: u32,
        stats: u32, seglen: u32, block0: u32, segstride: u32,
        per_stat: u32, chunk: u32, chunks: u32, act: u32,
        eps: f32, group_size: u32, i0: u32, s0: u32,
    }
);

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
    /// x's flat vec4 copy where the forward read x through one (`group_norm_by_lanes`): the
    /// backward's by-lanes path reads the same copy (`x_flat` of the backward functions)
    /// instead of copying x again.
    pub x_flat: Option<PooledTexture>,
}

/// Where each element's statistic and channel are (see shaders/norm.wgsl).
struct Layout {
    mode: u32,
    c: usize,
    inner: usize,
    stats: usize,
    per_stat: usize,
    seglen: usize,
    segstride: usize,
    group_size: usize,
}

fn layout(s: &[usize], kind: NormKind) -> Result<Layout> {
    Ok(match kind {
        NormKind::Group { groups } => {
            if s.len() < 2 || groups == 0 || !s[1].is_multiple_of(groups) {
                bail!("group norm: {groups} groups do not divide the channels of {:?}", s);
            }
            let inner: usize = s[2..].iter().product();
            let per = s[1] / groups * inner;
            Layout {
                mode: 0,
                c: s[1],
                inner,
                stats: s[0] * groups,
                per_stat: per,
                seglen: per,
                segstride: 0,
                group_size: s[1] / groups,
            }
        }
        NormKind::Layer => {
            let c = *s.last().unwrap();
            Layout {
                mode: 1,
                c,
                inner: 1,
                stats: s.iter().product::<usize>() / c,
                per_stat: c,
                seglen: c,
                segstride: 0,
                group_size: 1,
            }
        }
        NormKind::Batch => {
            if s.len() < 2 {
                bail!("batch norm: need [B, C, ...], got {:?}", s);
            }
            let inner: usize = s[2..].iter().product();
            Layout {
                mode: 2,
                c: s[1],
                inner,
                stats: s[1],
                per_stat: s[0] * inner,
                seglen: inner,
                segstride: s[1] * inner,
                group_size: 1,
            }
        }
    })
}

impl Layout {
    /// A group norm whose (image, channel) planes are whole texels (`group_norm_backward_by_planes`).
    fn group_planes_of_texels(&self) -> bool {
        self.mode == 0 && self.inner > 0 && self.inner.is_multiple_of(4)
    }

    /// Whether every statistic's segment runs and every 4-element group's
    /// channels allow the vec4 entries (partial_stats4, apply4).
    fn spans_by4(&self) -> bool {
        if self.mode == 1 {
            self.c.is_multiple_of(4)
        } else {
            self.inner.is_multiple_of(4)
        }
    }
}

/// Invocations per image the group norm's partial sums aim for, so that a small batch of small
/// images still gives every thread of a CPU device work: at 32×32 with 32 groups one chunk per
/// statistic was 256 invocations, one workgroup, one thread of four (norm backward sums 1.7 ms).
/// Per image, not per batch, so that an image's numbers do not depend on its batch.
const GROUP_INVOCATIONS_PER_IMAGE: usize = 256;

/// Elements per chunk of `len` for `units` statistics (or planes) per image: the tuned chunk, or
/// less (a multiple of 4, at least `floor`) where that leaves too few invocations per image.
fn chunk_for_parallelism(tuned: usize, len: usize, units: usize, floor: usize) -> usize {
    let wanted = GROUP_INVOCATIONS_PER_IMAGE.div_ceil(units.max(1));
    len.div_ceil(wanted).next_multiple_of(4).max(floor).min(tuned).min(len).max(1)
}

/// (chunks per statistic, uniform parameters) for `n` elements.
fn params(l: &Layout, gpu: &crate::engine::Gpu, n: usize, swish: bool, eps: f32) -> Result<(usize, NormParams)> {
    let tuned = gpu.tuning.chunk as usize;
    let chunk = match l.mode {
        0 => chunk_for_parallelism(tuned, l.per_stat, l.c / l.group_size, 64),
        _ => tuned.min(l.per_stat).max(1),
    };
    let chunks = l.per_stat.div_ceil(chunk);
    Ok((
        chunks,
        NormParams {
            n: u32_of("elements", n)?,
            mode: l.mode,
            c: u32_of("channels", l.c)?,
            inner: u32_of("inner", l.inner)?,
            stats: u32_of("statistics", l.stats)?,
            seglen: u32_of("segment", l.seglen)?,
            segstride: u32_of("segment stride", l.segstride)?,
            per_stat: u32_of("per statistic", l.per_stat)?,
            chunk: chunk as u32,
            chunks: chunks as u32,
            act: swish as u32,
            eps,
            group_size: l.group_size as u32,
            ..Default::default()
        },
    ))
}

/// The norm's statistics alone: (mean, 1/std) per statistic, [stats, 2]
/// (for group norm, per (image, group)), e.g. for a convolution that applies
/// the norm while packing its input (`conv2d::conv2d_after_norm_swish`).
pub fn statistics(x: &Tensor, kind: NormKind, eps: f32) -> Result<Tensor> {
    x.expect_dtype("norm input", DType::F32)?;
    x.expect_nonempty("norm input")?;
    Ok(statistics_of(x, &layout(x.shape(), kind)?, eps)?.1)
}

/// The first two passes: partial sums per chunk, then their combination.
/// Also says whether the vec4 entries apply (every span and the chunk a
/// multiple of 4).
fn statistics_of(x: &Tensor, l: &Layout, eps: f32) -> Result<(bool, Tensor, Option<PooledTexture>)> {
    let gpu = &x.gpu;
    let (chunks, params) = params(l, gpu, x.numel(), false, eps)?;
    let stats = l.stats;
    let partial = Tensor::empty(gpu, &[stats * chunks, 4], DType::F32)?;
    let chunk = params.chunk;
    let by4 = l.spans_by4() && chunk % 4 == 0;
    // On CPU devices the vec4 statistics read x through a texture (a memcpy) where it fits one.
    let copy_fits = copies_whole(x);
    // GPUs: one workgroup per statistic, both passes in one dispatch (where x fits one binding).
    // With subgroups (stats_sg4), one barrier where the workgroup tree (stats_wg4) takes eight.
    if by4 && (gpu.tuning.stats_subgroup || gpu.tuning.stats_workgroup) && x.byte_len() <= gpu.max_binding() {
        let st = Tensor::empty(gpu, &[stats, 2], DType::F32)?;
        let (module, entry) =
            if gpu.tuning.stats_subgroup { ("norm_subgroup", "stats_sg4") } else { ("norm", "stats_wg4") };
        let pipe = gpu.pipeline(module, entry, &[])?;
        gpu.dispatch(&pipe, &params, &[x.binding(), st.binding()], grid_1d(gpu, stats * 256)?)?;
        return Ok((by4, st, None));
    }
    let flat = if by4 && gpu.tuning.reads_via_texture && copy_fits { super::copy::flat_texture_vec4(x)? } else { None };
    if flat.is_none() && by4 && gpu.tuning.reads_via_texture && l.mode != 2 {
        // Too large for one copy: bands of whole statistics (contiguous in group and layer
        // norms), each copied into one pooled texture in turn. 32 groups of 128 x 512 x 512
        // (lavapipe): 118-126 ms by buffer loads (partial_stats4), 25-33 ms by bands.
        if partial_stats_by_bands(x, l, &params, &partial, chunks)? {
            return combine(&partial, &params, stats).map(|st| (by4, st, None));
        }
    }
    // CPU devices with subgroups of 8: one subgroup per statistic, no barrier, one dispatch, for
    // statistics of up to LANES_MAX_PER_STAT values.
    if let (Some(tex), true) = (&flat, statistics_by_lanes(gpu, l)) {
        let st = Tensor::empty(gpu, &[stats, 2], DType::F32)?;
        let pipe = gpu.pipeline("norm_subgroup", "stats_lanes_flat", &[])?;
        gpu.dispatch_res(&pipe, &params, &[Res::Tex(&tex.view), Res::Buf(st.binding())], [stats as u32, 1, 1])?;
        return Ok((by4, st, flat));
    }
    if let Some(tex) = &flat {
        let pipe = gpu.pipeline("norm", "partial_stats_flat", &[])?;
        gpu.dispatch_res(
            &pipe,
            &params,
            &[Res::Tex(&tex.view), Res::Buf(partial.binding())],
            grid_1d(gpu, stats * chunks)?,
        )?;
    } else {
        let pipe = gpu.pipeline("norm", if by4 { "partial_stats4" } else { "partial_stats" }, &[])?;
        // x a run of whole statistics at a time where it is larger than one binding (group and
        // layer norm: each statistic's elements are contiguous), bound from the aligned start at
        // or before the run's first value (i0: that value there); the partial sums bound whole,
        // written from statistic s0. Runs start on any statistic: windows that started on the
        // binding alignment took runs of 2 statistics of 10 KiB on the H200 (32-byte alignment),
        // more than `taming check`'s small binding.
        let runs = super::plane_runs_any_start(gpu, stats, l.per_stat)?;
        if runs.len() > 1 && l.mode == 2 {
            // A batch norm's statistics are not contiguous: from a channel-major copy, where each
            // channel's elements come in the same order (image by image), so the same chunks.
            let (xt, lt) = channel_major(x, l)?;
            return statistics_of(&xt, &lt, eps);
        }
        for (s0, count) in runs {
            let first = s0 * l.per_stat;
            let (xw, start) = super::aligned_window(x, first, count * l.per_stat);
            let p = NormParams {
                stats: u32_of("statistics", count)?,
                s0: u32_of("first statistic", s0)?,
                i0: u32_of("element", first - start)?,
                ..params
            };
            gpu.dispatch(&pipe, &p, &[xw, partial.binding()], grid_1d(gpu, count * chunks)?)?;
        }
    }
    Ok((by4, combine(&partial, &params, stats)?, flat))
}

/// The most values a statistic may have for `Tuning::stats_lanes` (one subgroup of 8 lanes walks
/// it): the demo VQGAN's norms have 128 to 1,024 and win by it (demo step, alternating:
/// 0.221-0.234 -> 0.218-0.224 s); 4 images of 128 channels at 32x32 (4,096 values, 32 groups)
/// took 2.33 ms against 1.36 by partial sums, whose chunks give lavapipe's threads more to share.
pub const LANES_MAX_PER_STAT: usize = 1024;

/// Whether the norms read x (and the backward dy) whole through one flat texture copy: under
/// 64 MiB (a larger copy would be a second megapixel activation) and one binding (so that
/// `taming check`'s small-binding variant takes the bands).
fn copies_whole(x: &Tensor) -> bool {
    x.byte_len() < (64 << 20).min(x.gpu.max_binding())
}

/// Whether `Tuning::stats_lanes` takes these statistics: one workgroup each, of at most
/// `LANES_MAX_PER_STAT` values.
fn statistics_by_lanes(gpu: &crate::engine::Gpu, l: &Layout) -> bool {
    let max_groups = gpu.limits.max_compute_workgroups_per_dimension as usize;
    gpu.tuning.stats_lanes && l.stats <= max_groups && l.per_stat <= LANES_MAX_PER_STAT
}

/// The statistics (mean, 1/std) from the partial sums of every chunk.
fn combine(partial: &Tensor, params: &NormParams, stats: usize) -> Result<Tensor> {
    let gpu = &partial.gpu;
    let st = Tensor::empty(gpu, &[stats, 2], DType::F32)?;
    let pipe = gpu.pipeline("norm", "combine", &[])?;
    // One invocation per statistic over its chunks' partial sums.
    super::expect_loops(gpu, || format!("norm combine ({} chunks)", params.chunks), params.chunks as usize)?;
    gpu.dispatch(&pipe, params, &[partial.binding(), st.binding()], grid_1d(gpu, stats)?)?;
    Ok(st)
}

/// Bytes of x one band of `partial_stats_by_bands` copies at most (or one statistic; half a
/// binding where that is less).
const STATS_BAND_BYTES: usize = 16 << 20;

/// partial_stats_flat over bands of whole statistics of x, each copied into a pooled texture in
/// turn (x too large for one copy: megapixel activations). The chunks are those of the whole
/// tensor, so the numbers are the same. False (nothing dispatched) where a band cannot be copied.
fn partial_stats_by_bands(
    x: &Tensor,
    l: &Layout,
    params: &NormParams,
    partial: &Tensor,
    chunks: usize,
) -> Result<bool> {
    let gpu = &x.gpu;
    let band_bytes = STATS_BAND_BYTES.min(gpu.max_binding() as usize / 2);
    // Bands of a multiple of `step` statistics, so that each band's window of `partial` starts
    // on the binding alignment.
    let align = gpu.binding_alignment();
    let step = align / super::gcd(align, 16 * chunks);
    let per_band = (band_bytes / (4 * l.per_stat).max(1) / step * step).max(step);
    let pipe = gpu.pipeline("norm", "partial_stats_flat", &[])?;
    let mut first = 0;
    while first < l.stats {
        let count = per_band.min(l.stats - first);
        let Some(tex) = super::copy::flat_texture_vec4_range(x, first * l.per_stat, count * l.per_stat)? else {
            // Every band meets the same conditions, so only the first can fail.
            return Ok(false);
        };
        let run_params = NormParams { stats: u32_of("statistics", count)?, ..*params };
        let pw = super::plane_window(partial, 4 * chunks, (first, count));
        gpu.dispatch_res(&pipe, &run_params, &[Res::Tex(&tex.view), Res::Buf(pw)], grid_1d(gpu, count * chunks)?)?;
        first += count;
    }
    Ok(true)
}

/// A batch norm's x [B, C, inner] as [1, C, B * inner] (each channel's elements contiguous, image
/// by image) and its layout as a group norm of C groups: the same statistics, for tensors larger
/// than one storage binding (`copy::swap_dims` moves such tensors by buffer copies).
fn channel_major(x: &Tensor, l: &Layout) -> Result<(Tensor, Layout)> {
    let images = x.numel() / (l.c * l.inner);
    let shape = [1, l.c, images * l.inner];
    let xt = super::copy::swap_dims(x, 1, images, l.c, l.inner)?.reshape(&shape)?;
    Ok((xt, layout(&shape, NormKind::Group { groups: l.c })?))
}

pub fn norm(x: &Tensor, kind: NormKind, gamma: &Tensor, beta: &Tensor, eps: f32, swish: bool) -> Result<NormOut> {
    x.expect_dtype("norm input", DType::F32)?;
    x.expect_nonempty("norm input")?;
    let s = x.shape();
    let l = layout(s, kind)?;
    for (name, t) in [("weight", gamma), ("bias", beta)] {
        if t.numel() != l.c {
            bail!("norm {name} has shape {:?}, expected [{}]", t.shape(), l.c);
        }
    }
    let gpu = &x.gpu;
    if let Some(out) = group_norm_by_lanes(x, &l, gamma, beta, eps, swish)? {
        return Ok(out);
    }
    let (by4, st, x_flat) = statistics_of(x, &l, eps)?;
    let y = Tensor::empty(gpu, s, DType::F32)?;
    // Made for this layout and activation (shaders/norm.wgsl: no branch it does not take).
    // Planes of whole runs of four texels: four texels an invocation (`PER`).
    let per = if by4 && l.mode != 1 && l.inner.is_multiple_of(16) { 4 } else { 1 };
    let consts = [("MODE", format!("{}u", l.mode)), ("ACT", format!("{}u", swish as u32)), ("PER", format!("{per}u"))];
    // CPU devices: x read from the texture its statistics came from (where they came from one).
    // (gamma and beta too: four buffer loads per texel of a layer norm's row otherwise.)
    let affine = match x_flat.is_some() && by4 {
        true => copy::flat_textures_vec4([(gamma, 0, gamma.numel()), (beta, 0, beta.numel())])?,
        false => None,
    };
    if let (Some(x_flat), Some([gamma_flat, beta_flat])) = (x_flat, affine) {
        let pipe = gpu.pipeline("norm", "apply4_flat", &consts)?;
        let (_, p) = params(&l, gpu, x.numel(), swish, eps)?;
        let bindings = [
            Res::Tex(&x_flat.view),
            Res::Buf(y.binding()),
            Res::Buf(st.binding()),
            Res::Tex(&gamma_flat.view),
            Res::Tex(&beta_flat.view),
        ];
        gpu.dispatch_res(&pipe, &p, &bindings, grid_1d(gpu, x.numel() / (4 * per))?)?;
        return Ok(NormOut { y, stats: st, x_flat: None });
    }
    let pipe = gpu.pipeline("norm", if by4 { "apply4" } else { "apply" }, &consts)?;
    // x and y a window at a time where they are larger than one binding.
    for (start, len) in super::plane_runs(gpu, x.numel(), &[1], 4 * per)? {
        let (_, p) = params(&l, gpu, len, swish, eps)?;
        let p = NormParams { i0: u32_of("element", start)?, ..p };
        let (xw, yw) = (super::plane_window(x, 1, (start, len)), super::plane_window(&y, 1, (start, len)));
        let invocations = if by4 { len / (4 * per) } else { len };
        gpu.dispatch(&pipe, &p, &[xw, yw, st.binding(), gamma.binding(), beta.binding()], grid_1d(gpu, invocations)?)?;
    }
    Ok(NormOut { y, stats: st, x_flat: None })
}

/// A group norm (+ swish) whose statistics `statistics_of` would take by lanes
/// (`Tuning::stats_lanes`: at most `LANES_MAX_PER_STAT` values, x whole in one flat texture copy,
/// planes of whole texels), its statistics and output in one dispatch (`norm_subgroup.wgsl`'s
/// `norm_lanes_flat`); None elsewhere.
fn group_norm_by_lanes(
    x: &Tensor,
    l: &Layout,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    swish: bool,
) -> Result<Option<NormOut>> {
    let gpu = &x.gpu;
    let t = &gpu.tuning;
    // (The order of `statistics_of`: the GPU paths first, then the flat copy by lanes.)
    let gpu_paths = t.stats_subgroup || t.stats_workgroup;
    if gpu_paths
        || !t.reads_via_texture
        || !copies_whole(x)
        || !l.group_planes_of_texels()
        || !statistics_by_lanes(gpu, l)
    {
        return Ok(None);
    }
    let Some(flat) = copy::flat_texture_vec4(x)? else { return Ok(None) };
    let (_, p) = params(l, gpu, x.numel(), swish, eps)?;
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let stats = Tensor::empty(gpu, &[l.stats, 2], DType::F32)?;
    let pipe = gpu.pipeline("norm_subgroup", "norm_lanes_flat", &[("ACT", format!("{}u", swish as u32))])?;
    gpu.dispatch_res(
        &pipe,
        &p,
        &[
            Res::Tex(&flat.view),
            Res::Buf(y.binding()),
            Res::Buf(stats.binding()),
            Res::Buf(gamma.binding()),
            Res::Buf(beta.binding()),
        ],
        [l.stats as u32, 1, 1],
    )?;
    Ok(Some(NormOut { y, stats, x_flat: Some(flat) }))
}

/// Layer norm over the last dimension in one dispatch, one invocation per
/// row: for the few short rows of a decoder step (no statistics kept). Rows
/// whose length is not a multiple of 4 go through `norm`.
pub fn layer_norm_rows(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    x.expect_dtype("layer norm input", DType::F32)?;
    x.expect_nonempty("layer norm input")?;
    if x.rank() == 0 || !x.dim(-1).is_multiple_of(4) {
        return Ok(norm(x, NormKind::Layer, gamma, beta, eps, false)?.y);
    }
    let c = x.dim(-1);
    for (name, t) in [("weight", gamma), ("bias", beta)] {
        if t.numel() != c {
            bail!("layer norm {name} has shape {:?}, expected [{c}]", t.shape());
        }
    }
    let gpu = &x.gpu;
    let rows = x.numel() / c;
    let params = NormParams { n: u32_of("elements", x.numel())?, c: u32_of("channels", c)?, eps, ..Default::default() };
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let pipe = gpu.pipeline("norm", "layer_norm_rows", &[])?;
    // Runs of rows where x is larger than one binding.
    for run @ (_, count) in super::plane_runs(gpu, rows, &[c], 1)? {
        let p = NormParams { n: u32_of("elements", count * c)?, ..params };
        let bindings = [plane_window(x, c, run), plane_window(&y, c, run), gamma.binding(), beta.binding()];
        gpu.dispatch(&pipe, &p, &bindings, [u32_of("rows", count.div_ceil(8))?, 1, 1])?;
    }
    Ok(y)
}

/// Gradients of `norm` (without swish): (dx, dgamma, dbeta), from the
/// forward's input and saved statistics (and x's flat copy where the forward kept one,
/// `NormOut::x_flat`).
pub fn norm_backward(
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    kind: NormKind,
    x_flat: Option<&PooledTexture>,
) -> Result<(Tensor, Tensor, Tensor)> {
    dy.expect_shape("norm backward gradient", x.shape())?;
    let l = layout(x.shape(), kind)?;
    let gpu = &x.gpu;
    if l.group_planes_of_texels() {
        return group_norm_backward_by_planes(x, dy, stats, gamma, None, &l, None, x_flat);
    }
    if l.mode == 1 && l.c.is_multiple_of(4) && l.c > 0 {
        return layer_norm_backward_by_rows(x, dy, stats, gamma, &l);
    }
    if l.mode == 2 && x.byte_len() > gpu.max_binding() {
        // A batch norm larger than one binding: its backward is a group norm's (C groups of one
        // channel) over channel-major copies of x and dy, the gradient copied back.
        let ((xt, lt), (dyt, _)) = (channel_major(x, &l)?, channel_major(dy, &l)?);
        if !lt.group_planes_of_texels() {
            bail!(
                "batch norm backward of {:?}: larger than one storage binding ({} bytes) with {} values per \
                 channel, not a multiple of 4",
                x.shape(),
                gpu.max_binding(),
                lt.inner
            );
        }
        let (dxt, dgamma, dbeta) = group_norm_backward_by_planes(&xt, &dyt, stats, gamma, None, &lt, None, None)?;
        let images = x.numel() / (l.c * l.inner);
        return Ok((super::copy::swap_dims(&dxt, 1, l.c, images, l.inner)?.reshape(x.shape())?, dgamma, dbeta));
    }
    // (Batch norms larger than one binding went the channel-major way above: here their
    // statistics' elements, not contiguous, fit one binding.)
    let (chunks, params) = params(&l, gpu, x.numel(), false, 0.0)?;
    let partial = Tensor::empty(gpu, &[l.stats * chunks, 2], DType::F32)?;
    let pipe = gpu.pipeline("norm", "backward_partial", &[])?;
    // x and dy a run of whole statistics at a time where they are larger than one binding (group
    // and layer norms: each statistic's elements contiguous), bound from the run's first element.
    // (Bound from the aligned start at or before the run's first value, which i0 names: runs
    // start on any statistic.)
    let stat_runs =
        if l.mode == 2 { vec![(0, l.stats)] } else { super::plane_runs_any_start(gpu, l.stats, l.per_stat)? };
    for (s0, count) in stat_runs {
        let ((xw, i0), (dyw, _)) = match l.mode {
            2 => ((x.binding(), 0), (dy.binding(), 0)),
            _ => {
                let w = |t| super::aligned_window(t, s0 * l.per_stat, count * l.per_stat);
                (w(x), w(dy))
            }
        };
        let p = NormParams { stats: u32_of("statistics", count)?, s0: s0 as u32, i0: u32_of("element", i0)?, ..params };
        let bindings = [xw, dyw, stats.binding(), gamma.binding(), partial.binding()];
        gpu.dispatch(&pipe, &p, &bindings, grid_1d(gpu, count * chunks)?)?;
    }
    let means = Tensor::empty(gpu, &[l.stats, 2], DType::F32)?;
    let pipe = gpu.pipeline("norm", "backward_combine", &[])?;
    super::expect_loops(gpu, || format!("norm backward_combine ({chunks} chunks)"), chunks)?;
    gpu.dispatch(&pipe, &params, &[partial.binding(), means.binding()], grid_1d(gpu, l.stats)?)?;
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let pipe = gpu.pipeline("norm", "backward_dx", &[])?;
    // Runs of elements where the tensors are larger than one binding.
    for run @ (i0, count) in super::plane_runs(gpu, x.numel(), &[1], 4)? {
        let p = NormParams { n: u32_of("elements", count)?, i0: u32_of("element", i0)?, ..params };
        let w = |t| plane_window(t, 1, run);
        let bindings = [w(x), w(dy), stats.binding(), gamma.binding(), means.binding(), w(&dx)];
        gpu.dispatch(&pipe, &p, &bindings, grid_1d(gpu, count)?)?;
    }
    let dgamma = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let dbeta = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let pipe = gpu.pipeline("norm", "backward_affine", &[])?;
    // Runs of the [outer, C, inner] blocks, each adding to the sums of those before it: runs that
    // fit one binding, and within them runs whose loops (inner + 1 a block, per channel) stay
    // within the loop budget (lavapipe ends longer ones: a PatchGAN's first batch norm at 256²,
    // batch 16, walks 65,552).
    let block = l.c * l.inner;
    super::expect_loops(gpu, || format!("batch norm backward ({} values a channel and image)", l.inner), l.inner + 1)?;
    let per = (super::LOOP_ITERATIONS / (l.inner + 1)).max(1);
    for run @ (o0, count) in super::plane_runs(gpu, x.numel() / block, &[block], 1)? {
        let w = |t| plane_window(t, block, run);
        let bindings = [w(x), w(dy), stats.binding(), dgamma.binding(), dbeta.binding()];
        for b0 in (0..count).step_by(per) {
            let p = NormParams {
                n: u32_of("elements", per.min(count - b0) * block)?,
                i0: u32_of("element", o0 * block)?,
                block0: b0 as u32,
                ..params
            };
            gpu.dispatch(&pipe, &p, &bindings, super::grid_for(gpu, l.c, 64)?)?;
        }
    }
    Ok((dx, dgamma, dbeta))
}

/// Gradients of `norm(.., swish = true)` (dx, dgamma, dbeta) from the forward's input and
/// statistics: the swish's derivative is taken inside the norm's backward passes where the
/// layout allows (group norms of whole-texel planes), recomputing the pre-activation from x;
/// elsewhere the pre-activation is recomputed by a norm pass and the swish undone on its own.
#[allow(clippy::too_many_arguments)]
pub fn norm_swish_backward(
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    kind: NormKind,
    eps: f32,
    x_flat: Option<&PooledTexture>,
) -> Result<(Tensor, Tensor, Tensor)> {
    dy.expect_shape("norm backward gradient", x.shape())?;
    let l = layout(x.shape(), kind)?;
    if l.group_planes_of_texels() {
        return group_norm_backward_by_planes(x, dy, stats, gamma, Some(beta), &l, None, x_flat);
    }
    let a = norm(x, kind, gamma, beta, eps, false)?.y;
    let da = super::elementwise::unary_backward(&a, dy, super::elementwise::Unary::Swish)?;
    norm_backward(x, &da, stats, gamma, kind, x_flat)
}

/// `norm_backward` (or with `swish` = (beta, eps), `norm_swish_backward`) with dx added to
/// `acc`, x's gradient summed so far (from the other ops that read x), returned in its place:
/// by the dx pass itself, into acc's storage, where the group norm's plane passes take the
/// layout and nothing else holds acc (no add pass: acc read where dx is written); elsewhere the
/// backward, then an add.
#[allow(clippy::too_many_arguments)]
pub fn backward_adding(
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    swish: Option<(&Tensor, f32)>,
    kind: NormKind,
    acc: Tensor,
    x_flat: Option<&PooledTexture>,
) -> Result<(Tensor, Tensor, Tensor)> {
    dy.expect_shape("norm backward gradient", x.shape())?;
    acc.expect_shape("norm backward: the input's gradient so far", x.shape())?;
    let l = layout(x.shape(), kind)?;
    if l.group_planes_of_texels() && acc.is_sole_owner() {
        return group_norm_backward_by_planes(x, dy, stats, gamma, swish.map(|(b, _)| b), &l, Some(acc), x_flat);
    }
    let (dx, dgamma, dbeta) = match swish {
        Some((beta, eps)) => norm_swish_backward(x, dy, stats, gamma, beta, kind, eps, x_flat)?,
        None => norm_backward(x, dy, stats, gamma, kind, x_flat)?,
    };
    Ok((super::elementwise::add(&acc, &dx)?, dgamma, dbeta))
}

/// `norm_backward` of a group norm whose planes are whole texels: per-plane sums of dy and
/// dy·xhat in one vec4 pass (gamma folds in per channel afterwards, so the same sums give the
/// group means and dgamma, dbeta), then dx in vec4s: two passes over the tensor where the general
/// path makes three with scalar loads (on lavapipe every buffer load runs lane by lane).
/// With `swish_beta` the norm was followed by swish (its beta given): dy is taken through the
/// swish's derivative in both passes. With `into` (a tensor nothing else holds) dx is added to
/// its values in its storage.
#[allow(clippy::too_many_arguments)]
fn group_norm_backward_by_planes(
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    swish_beta: Option<&Tensor>,
    l: &Layout,
    into: Option<Tensor>,
    x_flat: Option<&PooledTexture>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let gpu = &x.gpu;
    let (inner4, planes) = (l.inner / 4, x.numel() / l.inner);
    let chunk = chunk_for_parallelism(gpu.tuning.chunk as usize / 4, inner4, l.c, 16);
    let chunks = inner4.div_ceil(chunk);
    let params = NormParams {
        n: u32_of("elements", x.numel())?,
        c: u32_of("channels", l.c)?,
        inner: u32_of("inner", l.inner)?,
        stats: u32_of("statistics", l.stats)?,
        per_stat: u32_of("per statistic", l.per_stat)?,
        chunk: chunk as u32,
        chunks: chunks as u32,
        group_size: l.group_size as u32,
        act: swish_beta.is_some() as u32,
        ..Default::default()
    };
    // (Without swish the gamma and beta bindings are not read: gamma stands in for both.)
    let beta = swish_beta.unwrap_or(gamma);
    let into = match backward_by_lanes(x, dy, stats, gamma, beta, l, &params, into, x_flat)? {
        Ok(done) => return Ok(done),
        Err(into) => into,
    };
    let sums = Tensor::empty(gpu, &[planes * chunks, 2], DType::F32)?;
    let means = Tensor::empty(gpu, &[l.stats, 2], DType::F32)?;
    let adds = into.is_some();
    let dx = match into {
        Some(t) => t,
        None => Tensor::empty(gpu, x.shape(), DType::F32)?,
    };
    // Runs of whole statistics (image, group) where x is larger than one binding: x, dy and dx
    // are bound from the aligned start at or before the run's first statistic s0 (i0: the
    // run's first value there), the small per-plane and per-statistic tensors whole (the
    // kernels index them from s0). Runs start on any statistic: windows that had to start on
    // the alignment took runs of 2 statistics of 10 KiB at 256-byte alignment.
    let group_values = l.group_size * l.inner;
    let runs = super::plane_runs_any_start(gpu, l.stats, group_values)?;
    // The passes that branch on the swish made with or without it (shaders/norm.wgsl, `ACT`).
    let act = [("ACT", format!("{}u", params.act))];
    let dgamma = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let dbeta = Tensor::empty(gpu, &[l.c], DType::F32)?;
    // dgamma, dbeta: one invocation per channel over every image's chunk sums.
    let (images, chunks) = ((params.n / (params.c * params.inner).max(1)) as usize, params.chunks as usize);
    super::expect_loops(
        gpu,
        || format!("norm backward_affine_from_sums ({images} images x {chunks} chunks)"),
        images * (chunks + 1),
    )?;
    // With one run, the group means and dgamma, dbeta in one dispatch (both read the plane sums).
    let one_run = runs.len() == 1;
    let means_pipe = match one_run {
        true => gpu.pipeline("norm", "backward_means_and_affine", &[])?,
        false => gpu.pipeline("norm", "backward_group_means", &[])?,
    };
    // Four texels an invocation where planes are whole runs of four (`PER`).
    let per = if l.inner.is_multiple_of(16) { 4 } else { 1 };
    let dx_consts = [act[0].clone(), ("PER", format!("{per}u")), ("ACC", adds.to_string())];
    for (s0, count) in runs {
        let (first, values) = (s0 * group_values, count * group_values);
        let window = |t| super::aligned_window(t, first, values);
        let p = NormParams {
            n: u32_of("elements", values)?,
            stats: u32_of("statistics", count)?,
            s0: u32_of("first statistic", s0)?,
            i0: u32_of("element", first - window(x).1)?,
            ..params
        };
        let sums_grid = grid_1d(gpu, count * l.group_size * chunks)?;
        let dx_grid = grid_1d(gpu, count * group_values / (4 * per))?;
        // x and dy through flat texture copies of the run where the device reads textures
        // faster (both passes read them).
        let flat = |t| match gpu.tuning.reads_via_texture {
            true => super::copy::flat_texture_vec4_range(t, first, values),
            false => Ok(None),
        };
        let textures = match (flat(x)?, flat(dy)?) {
            (Some(fx), Some(fdy)) => Some((fx, fdy)),
            _ => None,
        };
        // x and dy as both passes bind them (textures or buffer windows), and the entries that
        // read them so.
        let x_dy = || match &textures {
            Some((fx, fdy)) => [Res::Tex(&fx.view), Res::Tex(&fdy.view)],
            None => [Res::Buf(window(x).0), Res::Buf(window(dy).0)],
        };
        let (sums_entry, dx_entry) = match textures.is_some() {
            true => ("backward_plane_sums_flat", "backward_dx_flat"),
            false => ("backward_plane_sums4", "backward_dx4"),
        };
        let [rx, rdy] = x_dy();
        let bindings = [
            rx,
            rdy,
            Res::Buf(stats.binding()),
            Res::Buf(sums.binding()),
            Res::Buf(gamma.binding()),
            Res::Buf(beta.binding()),
        ];
        let sums_pipe = gpu.pipeline("norm", sums_entry, &act)?;
        gpu.dispatch_res(&sums_pipe, &p, &bindings, sums_grid)?;
        if one_run {
            let bindings = [sums.binding(), gamma.binding(), means.binding(), dgamma.binding(), dbeta.binding()];
            gpu.dispatch(&means_pipe, &p, &bindings, grid_1d(gpu, count + l.c)?)?;
        } else {
            gpu.dispatch(&means_pipe, &p, &[sums.binding(), gamma.binding(), means.binding()], grid_1d(gpu, count)?)?;
        }
        let [rx, rdy] = x_dy();
        let bindings = [
            rx,
            rdy,
            Res::Buf(stats.binding()),
            Res::Buf(gamma.binding()),
            Res::Buf(means.binding()),
            Res::Buf(window(&dx).0),
            Res::Buf(beta.binding()),
        ];
        let dx_pipe = gpu.pipeline("norm", dx_entry, &dx_consts)?;
        gpu.dispatch_res(&dx_pipe, &p, &bindings, dx_grid)?;
    }
    if !one_run {
        let pipe = gpu.pipeline("norm", "backward_affine_from_sums", &[])?;
        gpu.dispatch(
            &pipe,
            &params,
            &[sums.binding(), dgamma.binding(), dbeta.binding()],
            super::grid_for(gpu, l.c, 64)?,
        )?;
    }
    Ok((dx, dgamma, dbeta))
}

/// The most channels a group may have for `Tuning::norm_backward_lanes` (each lane holds their
/// affine sums): 16, a group norm of 32 groups over 512 channels.
pub const LANES_MAX_CHANNELS: usize = 16;

/// `group_norm_backward_by_planes` in one dispatch (`norm_subgroup.wgsl`'s `backward_lanes_flat`,
/// one subgroup of 8 lanes per group) where `Tuning::norm_backward_lanes` takes it: statistics of
/// at most `LANES_MAX_PER_STAT` values, groups of at most `LANES_MAX_CHANNELS` channels, x and
/// dy whole in one flat texture copy each (x's the forward's where it kept one: `x_flat`).
/// Otherwise hands `into` back.
#[allow(clippy::too_many_arguments)]
fn backward_by_lanes(
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    l: &Layout,
    params: &NormParams,
    into: Option<Tensor>,
    x_flat: Option<&PooledTexture>,
) -> Result<std::result::Result<(Tensor, Tensor, Tensor), Option<Tensor>>> {
    let gpu = &x.gpu;
    let groups = l.c / l.group_size.max(1);
    let taken = gpu.tuning.norm_backward_lanes && gpu.tuning.reads_via_texture && copies_whole(x);
    if !taken
        || l.per_stat > LANES_MAX_PER_STAT
        || l.group_size > LANES_MAX_CHANNELS
        || groups > gpu.limits.max_compute_workgroups_per_dimension as usize
    {
        return Ok(Err(into));
    }
    let copied;
    // (A kept copy is x's where it has the extent `flat_texture_vec4` gives x.)
    let fits = |t: &PooledTexture| {
        let t = t.texture();
        [t.width(), t.height(), t.depth_or_array_layers()] == super::copy::flat_vec4_extent(x.numel())
    };
    let fx = match x_flat.filter(|t| fits(t)) {
        Some(kept) => Some(kept),
        None => {
            copied = super::copy::flat_texture_vec4(x)?;
            copied.as_ref()
        }
    };
    let (Some(fx), Some(fdy)) = (fx, super::copy::flat_texture_vec4(dy)?) else {
        return Ok(Err(into));
    };
    let adds = into.is_some();
    let dx = match into {
        Some(t) => t,
        None => Tensor::empty(gpu, x.shape(), DType::F32)?,
    };
    let dgamma = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let dbeta = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let consts = [("ACT", format!("{}u", params.act)), ("ACC", adds.to_string())];
    let pipe = gpu.pipeline("norm_subgroup", "backward_lanes_flat", &consts)?;
    let p = NormParams { s0: 0, i0: 0, ..*params };
    gpu.dispatch_res(
        &pipe,
        &p,
        &[
            Res::Tex(&fx.view),
            Res::Tex(&fdy.view),
            Res::Buf(stats.binding()),
            Res::Buf(gamma.binding()),
            Res::Buf(dx.binding()),
            Res::Buf(beta.binding()),
            Res::Buf(dgamma.binding()),
            Res::Buf(dbeta.binding()),
        ],
        [groups as u32, 1, 1],
    )?;
    Ok(Ok((dx, dgamma, dbeta)))
}

/// `norm_backward` of a layer norm whose rows are whole texels: one invocation per row for dx
/// (its two means, then the row again from cache), dgamma and dbeta by chunks of rows per
/// channel texel and a sum over the chunks; vec4 loads throughout, where the general path makes
/// three scalar passes and sums each channel in one invocation.
fn layer_norm_backward_by_rows(
    x: &Tensor,
    dy: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    l: &Layout,
) -> Result<(Tensor, Tensor, Tensor)> {
    let gpu = &x.gpu;
    let rows_per_chunk = 64;
    let chunks = l.stats.div_ceil(rows_per_chunk);
    let params = NormParams {
        n: u32_of("elements", x.numel())?,
        mode: 1,
        c: u32_of("channels", l.c)?,
        inner: 1,
        stats: u32_of("rows", l.stats)?,
        per_stat: u32_of("per statistic", l.per_stat)?,
        chunk: rows_per_chunk as u32,
        chunks: u32_of("chunks", chunks)?,
        ..Default::default()
    };
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let partial = Tensor::empty(gpu, &[chunks, 2, l.c], DType::F32)?;
    // CPU devices: x, dy and gamma read through flat texture copies (texture fetches are gathers
    // there, buffer loads a loop over the lanes).
    let flat = match gpu.tuning.reads_via_texture {
        true => copy::flat_textures_vec4([(x, 0, x.numel()), (dy, 0, dy.numel()), (gamma, 0, gamma.numel())])?,
        false => None,
    };
    let suffix = if flat.is_some() { "_flat" } else { "" };
    let rows_pipe = gpu.pipeline("norm", &format!("backward_rows4{suffix}"), &[])?;
    let affine_pipe = gpu.pipeline("norm", &format!("backward_affine_rows4{suffix}"), &[])?;
    // Runs of whole chunks of rows where x is larger than one binding: x, dy and dx bound from the
    // run's first row s0, the statistics and partial sums whole (indexed from s0).
    for run @ (s0, rows) in super::plane_runs(gpu, l.stats, &[l.c], rows_per_chunk)? {
        let p = NormParams {
            stats: u32_of("rows", rows)?,
            chunks: u32_of("chunks", rows.div_ceil(rows_per_chunk))?,
            s0: u32_of("row", s0)?,
            ..params
        };
        let window = |t| Res::Buf(plane_window(t, l.c, run));
        let [x_in, dy_in, gamma_in] = match &flat {
            Some([x, dy, gamma]) => [Res::Tex(&x.view), Res::Tex(&dy.view), Res::Tex(&gamma.view)],
            None => [window(x), window(dy), Res::Buf(gamma.binding())],
        };
        let bindings = [x_in, dy_in, Res::Buf(stats.binding()), gamma_in, window(&dx)];
        gpu.dispatch_res(&rows_pipe, &p, &bindings, super::grid_for(gpu, rows, 64)?)?;
        let bindings = [x_in, dy_in, Res::Buf(stats.binding()), Res::Buf(partial.binding())];
        gpu.dispatch_res(&affine_pipe, &p, &bindings, super::grid_for(gpu, p.chunks as usize * l.c / 4, 64)?)?;
    }
    let dgamma = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let dbeta = Tensor::empty(gpu, &[l.c], DType::F32)?;
    let pipe = gpu.pipeline("norm", "backward_affine_combine4", &[])?;
    gpu.dispatch(
        &pipe,
        &params,
        &[partial.binding(), dgamma.binding(), dbeta.binding()],
        super::grid_for(gpu, l.c / 4, 64)?,
    )?;
    Ok((dx, dgamma, dbeta))
}

/// `nn.GroupNorm(32, C, eps=1e-6)` as the reference's `Normalize`, optionally followed by swish.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, swish: bool) -> Result<Tensor> {
    Ok(norm(x, NormKind::Group { groups: 32 }, gamma, beta, 1e-6, swish)?.y)
}

pub mod cpu {
    use super::NormKind;

    /// (channels, elements per channel and batch item) of a normalised tensor.
    fn channels(shape: &[usize], kind: NormKind) -> (usize, usize) {
        match kind {
            NormKind::Layer => (*shape.last().unwrap(), 1),
            _ => (shape[1], shape[2..].iter().product()),
        }
    }

    /// The statistic element i belongs to.
    fn stat_index(kind: NormKind, c: usize, inner: usize, i: usize) -> usize {
        match kind {
            NormKind::Group { groups } => i / (c / groups * inner),
            NormKind::Layer => i / c,
            NormKind::Batch => (i / inner) % c,
        }
    }

    /// Gradients (dx, dgamma, dbeta) of `norm` (without swish).
    pub fn norm_backward(
        x: &[f32],
        shape: &[usize],
        kind: NormKind,
        gamma: &[f32],
        eps: f32,
        g: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = x.len();
        let (c, inner) = channels(shape, kind);
        let stat_of = |i: usize| stat_index(kind, c, inner, i);
        let ch_of = |i: usize| match kind {
            NormKind::Layer => i % c,
            _ => (i / inner) % c,
        };
        let ns = (0..n).map(stat_of).max().unwrap() + 1;
        let (mut sum, mut cnt) = (vec![0f64; ns], vec![0f64; ns]);
        for i in 0..n {
            sum[stat_of(i)] += x[i] as f64;
            cnt[stat_of(i)] += 1.0;
        }
        let mean: Vec<f64> = sum.iter().zip(&cnt).map(|(s, c)| s / c).collect();
        let mut var = vec![0f64; ns];
        for i in 0..n {
            var[stat_of(i)] += (x[i] as f64 - mean[stat_of(i)]).powi(2);
        }
        let rstd: Vec<f64> = var.iter().zip(&cnt).map(|(v, c)| 1.0 / (v / c + eps as f64).sqrt()).collect();
        let xhat = |i: usize| (x[i] as f64 - mean[stat_of(i)]) * rstd[stat_of(i)];
        let (mut mg, mut mgx) = (vec![0f64; ns], vec![0f64; ns]);
        let (mut dgamma, mut dbeta) = (vec![0f64; c], vec![0f64; c]);
        for i in 0..n {
            let gi = g[i] as f64 * gamma[ch_of(i)] as f64;
            mg[stat_of(i)] += gi / cnt[stat_of(i)];
            mgx[stat_of(i)] += gi * xhat(i) / cnt[stat_of(i)];
            dgamma[ch_of(i)] += g[i] as f64 * xhat(i);
            dbeta[ch_of(i)] += g[i] as f64;
        }
        let dx = (0..n)
            .map(|i| {
                let s = stat_of(i);
                (rstd[s] * (g[i] as f64 * gamma[ch_of(i)] as f64 - mg[s] - xhat(i) * mgx[s])) as f32
            })
            .collect();
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        (dx, f(dgamma), f(dbeta))
    }

    /// Two-pass f64 reference.
    pub fn norm(
        x: &[f32],
        shape: &[usize],
        kind: NormKind,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        swish: bool,
    ) -> Vec<f32> {
        let n = x.len();
        let (c, inner) = channels(shape, kind);
        let stat_of = |i: usize| stat_index(kind, c, inner, i);
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
                let ch = match kind {
                    NormKind::Layer => i % c,
                    _ => (i / inner) % c,
                };
                let v = (x[i] as f64 - mean[s]) / (var[s] / cnt[s] + eps as f64).sqrt() * gamma[ch] as f64
                    + beta[ch] as f64;
                (if swish { v / (1.0 + (-v).exp()) } else { v }) as f32
            })
            .collect()
    }
}
