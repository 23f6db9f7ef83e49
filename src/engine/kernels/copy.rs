//! Data movement (`shaders/copy.wgsl`): padded repack, concat and slice
//! along a dimension, batched transpose, swapping two dimensions, f16 widening,
//! and the flat textures other kernels read large tensors through.
//!
//! # Design notes
//!
//! Measured on lavapipe (llvmpipe, Mesa 22.3.6, a 2-core VM).
//!
//! - **Reading through flat textures** (CPU devices, `flat_texture`): wherever a
//!   kernel would read a large tensor with per-lane buffer loads, it is first copied
//!   (`copy_buffer_to_texture`, a memcpy) into a texture holding its values in rows of 64, 4096
//!   rows per layer, and fetched from there:
//!   Winograd's input and weights, im2col's input planes (replacing a per-element pack kernel,
//!   26–30 ms per VQGAN downsample input), the implicit GEMM's weights reordered to (tap,
//!   channel) in one pass (512×512×3×3: 23–25 → 16–18 ms) and the norms' statistics (an
//!   rgba32float view of the same layout, `flat_texture_vec4`; `Tuning::reads_via_texture`).
//!   `TAMING_PACK_KERNEL=1` forces the kernel or buffer paths, which the tests use to check both.
//! - **vec4 entries**: a buffer load with a per-lane address runs lane by lane on lavapipe, so a vec4
//!   load costs about what one float does; `swap_dims4` swaps two dimensions four values at a time
//!   (the convolution weight reorder), as the norms, `binary4` and `upsample2x4` do (see
//!   `kernels::norm`).

use anyhow::{bail, Result};

use super::{grid_1d, u32_of};
use crate::engine::device::{Binding, Gpu, Res};
use crate::engine::pool::PooledTexture;
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/copy.wgsl`'s `Params`: each entry reads the fields it names.
    CopyParams in "copy" as "Params" {
        n: u32, rows: u32, cols: u32, inner: u32,
        src_rows: u32, src_cols: u32, src_off: u32, src_bs: u32,
        src_ld: u32, src_dim: u32, dst_dim: u32, len: u32,
        src_start: u32, dst_start: u32, _pad0: u32, _pad1: u32,
    }
);

/// `n` invocations of `entry` from `src` into `dst`.
fn launch(entry: &str, src: &Tensor, dst: &Tensor, n: usize, p: CopyParams) -> Result<()> {
    let gpu = &dst.gpu;
    let pipe = gpu.pipeline("copy", entry, &[])?;
    let params = CopyParams { n: u32_of("elements", n)?, ..p };
    gpu.dispatch(&pipe, &params, &[src.binding(), dst.binding()], grid_1d(gpu, n)?)
}

/// A size as a kernel parameter, named in the error when it does not fit.
fn u(what: &str, v: usize) -> Result<u32> {
    u32_of(what, v)
}

/// Fresh contiguous [batch, rows_p, cols_p] from `batch` matrices of
/// [rows, cols] at `off + b*bs + r*ld + c`; padding is zero.
#[allow(clippy::too_many_arguments)]
pub fn pad2d(
    src: &Tensor,
    off: usize,
    bs: usize,
    ld: usize,
    batch: usize,
    rows: usize,
    cols: usize,
    rows_p: usize,
    cols_p: usize,
) -> Result<Tensor> {
    src.expect_dtype("pad2d", DType::F32)?;
    let dst = Tensor::empty(&src.gpu, &[batch, rows_p, cols_p], DType::F32)?;
    let p = CopyParams {
        rows: u("rows", rows_p)?,
        cols: u("columns", cols_p)?,
        src_rows: u("rows", rows)?,
        src_cols: u("columns", cols)?,
        src_off: u("offset", off)?,
        src_bs: u("batch stride", bs)?,
        src_ld: u("row stride", ld)?,
        ..Default::default()
    };
    launch("pad2d", src, &dst, dst.numel(), p)?;
    Ok(dst)
}

/// Split a shape around dimension `dim` into (outer, size, inner).
pub fn around(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (shape[..dim].iter().product(), shape[dim], shape[dim + 1..].iter().product())
}

/// Most contiguous blocks (outer indices) `slice` and `concat` copy with buffer copies rather
/// than a `block_copy` dispatch: a copy command costs a few microseconds where a dispatch costs
/// tens on lavapipe (`bench kernels`), and buffer copies have no binding limit.
const BLOCK_COPIES_MAX: usize = 4;

/// `src[..., start..start+len, ...]` along `dim`.
pub fn slice(src: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    src.expect_dtype("slice", DType::F32)?;
    if dim >= src.rank() || start + len > src.dim(dim as isize) {
        bail!("slice: range {start}..{} of dimension {dim} is outside shape {:?}", start + len, src.shape());
    }
    let (outer, size, inner) = around(src.shape(), dim);
    let mut shape = src.shape().to_vec();
    shape[dim] = len;
    let dst = Tensor::empty(&src.gpu, &shape, DType::F32)?;
    if outer <= BLOCK_COPIES_MAX {
        // Contiguous blocks (a slice of the first dimension is one): buffer copies, no dispatch.
        let bytes = (len * inner * 4) as u64;
        for o in (0..outer).filter(|_| bytes > 0) {
            let at = |size: usize, start: usize| (((o * size + start) * inner) * 4) as u64;
            src.gpu.copy(src.buffer(), at(size, start), dst.buffer(), at(len, 0), bytes);
        }
        return Ok(dst);
    }
    let p = CopyParams {
        src_dim: u("slice dimension", size)?,
        dst_dim: u("slice length", len)?,
        inner: u("inner size", inner)?,
        len: u("slice length", len)?,
        src_start: u("slice start", start)?,
        ..Default::default()
    };
    launch("block_copy", src, &dst, dst.numel(), p)?;
    Ok(dst)
}

/// Concatenate along `dim`; all other dimensions must agree.
pub fn concat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| anyhow::anyhow!("concat: no tensors"))?;
    let mut shape = first.shape().to_vec();
    if dim >= shape.len() {
        bail!("concat: dimension {dim} out of range for {:?}", shape);
    }
    shape[dim] = 0;
    for p in parts {
        p.expect_dtype("concat", DType::F32)?;
        let ok = p.rank() == first.rank()
            && p.shape().iter().zip(first.shape()).enumerate().all(|(i, (a, b))| i == dim || a == b);
        if !ok {
            bail!("concat: shape {:?} does not match {:?} outside dimension {dim}", p.shape(), first.shape());
        }
        shape[dim] += p.dim(dim as isize);
    }
    let dst = Tensor::empty(&first.gpu, &shape, DType::F32)?;
    let total = shape[dim];
    let (outer, _, inner) = around(&shape, dim);
    if outer <= BLOCK_COPIES_MAX {
        // Each part's blocks are contiguous in both: buffer copies, no dispatch (the AttnBlock's
        // q, k, v weights side by side).
        let mut at = 0;
        for p in parts {
            let size = p.dim(dim as isize);
            let bytes = (size * inner * 4) as u64;
            for o in (0..outer).filter(|_| bytes > 0) {
                let to = (((o * total + at) * inner) * 4) as u64;
                first.gpu.copy(p.buffer(), o as u64 * bytes, dst.buffer(), to, bytes);
            }
            at += size;
        }
        return Ok(dst);
    }
    let mut at = 0;
    for p in parts {
        let (_, size, inner) = around(p.shape(), dim);
        if p.numel() > 0 {
            let params = CopyParams {
                src_dim: u("part size", size)?,
                dst_dim: u("concatenated size", total)?,
                inner: u("inner size", inner)?,
                len: u("part size", size)?,
                dst_start: u("part offset", at)?,
                ..Default::default()
            };
            launch("block_copy", p, &dst, p.numel(), params)?;
        }
        at += size;
    }
    Ok(dst)
}

/// Swap the last two dimensions: [..., R, C] -> [..., C, R].
pub fn transpose(src: &Tensor) -> Result<Tensor> {
    src.expect_dtype("transpose", DType::F32)?;
    if src.rank() < 2 {
        bail!("transpose: need rank >= 2, got {:?}", src.shape());
    }
    let (r, c) = (src.dim(-2), src.dim(-1));
    let mut shape = src.shape().to_vec();
    let n = shape.len();
    shape.swap(n - 1, n - 2);
    let dst = Tensor::empty(&src.gpu, &shape, DType::F32)?;
    launch(
        "transpose",
        src,
        &dst,
        dst.numel(),
        CopyParams { rows: u("rows", r)?, cols: u("columns", c)?, ..Default::default() },
    )?;
    Ok(dst)
}

/// Most buffer copies `swap_dims` records for a tensor larger than one storage binding.
const MAX_COPIED_RUNS: usize = 1 << 16;

/// [batch, a, b, c] -> [batch, b, a, c] (e.g. [B, C, HW] -> [C, B, HW]), as a fresh tensor of that shape.
pub fn swap_dims(src: &Tensor, batch: usize, a: usize, b: usize, c: usize) -> Result<Tensor> {
    src.expect_dtype("swap_dims", DType::F32)?;
    if batch * a * b * c != src.numel() {
        bail!("swap_dims: [{batch}, {a}, {b}, {c}] does not cover a tensor of shape {:?}", src.shape());
    }
    let dst = Tensor::empty(&src.gpu, &[batch, b, a, c], DType::F32)?;
    let gpu = &src.gpu;
    if src.byte_len() > gpu.max_binding() {
        // Larger than one binding: each run of c values moved by a buffer copy (no binding limit),
        // where the runs are few enough (a batch norm's planes, say) for one copy each.
        let runs = batch * a * b;
        if runs > MAX_COPIED_RUNS {
            bail!(
                "swap_dims: [{batch}, {a}, {b}, {c}] is larger than one storage binding ({} bytes) and its {runs} \
                 runs of {c} values are too many to copy one by one",
                gpu.max_binding()
            );
        }
        let run = (c * 4) as u64;
        for bt in 0..batch {
            for i in 0..a {
                for j in 0..b {
                    let (from, to) = (((bt * a + i) * b + j) as u64 * run, ((bt * b + j) * a + i) as u64 * run);
                    gpu.copy(src.buffer(), from, dst.buffer(), to, run);
                }
            }
        }
        return Ok(dst);
    }
    let p =
        CopyParams { rows: u("rows", a)?, cols: u("columns", b)?, inner: u("inner size", c)?, ..Default::default() };
    if c == 1 && a.is_multiple_of(4) {
        launch("swap_dims4", src, &dst, dst.numel() / 4, p)?;
    } else {
        launch("swap_dims", src, &dst, dst.numel(), p)?;
    }
    Ok(dst)
}

/// f16 storage -> f32 tensor (f32 input is returned as is).
pub fn to_f32(src: &Tensor) -> Result<Tensor> {
    match src.dtype() {
        DType::F32 => Ok(src.clone()),
        DType::U32 => bail!("to_f32: index tensor {:?} is not a float tensor", src.shape()),
        DType::F16 => {
            let dst = Tensor::empty(&src.gpu, src.shape(), DType::F32)?;
            launch("widen_f16", src, &dst, dst.numel(), CopyParams::default())?;
            Ok(dst)
        }
    }
}

/// Flat textures: a tensor's values in rows of 64, 4096 rows per layer, as an
/// r32float texture array (or rgba32float, 16 texels a row), filled by
/// buffer-to-texture copies (a memcpy on CPU devices). Kernels on CPU devices
/// read large tensors through them (value f at (f % 64, (f / 64) % 4096,
/// f / 2^18)), because there a storage-buffer load runs lane by lane and a
/// texture fetch does not: Winograd's input and weights, im2col's input, the
/// implicit GEMM's weights, the norms' statistics.
///
/// Values per layer.
pub(crate) const FLAT_LAYER: usize = 64 * 4096;

/// Layers of a pooled flat texture that needs `layers`: powers of two (up to the device's
/// `max_layers`), so the pool reuses one texture for tensors of many sizes (each distinct size
/// would otherwise stay cached: megapixel images have many).
fn pooled_layers(layers: usize, max_layers: usize) -> usize {
    if layers > 1 {
        layers.next_power_of_two().min(max_layers)
    } else {
        layers
    }
}

/// The most values one `flat_texture` holds on this device.
pub(crate) fn flat_texture_capacity(gpu: &Gpu) -> usize {
    gpu.limits.max_texture_array_layers as usize * FLAT_LAYER
}

/// Whether a kernel reading `values` of a tensor once should read its buffer rather than a flat
/// texture copy (`Tuning::buffer_read_max_values`).
pub(crate) fn read_from_buffer(gpu: &Gpu, values: usize) -> bool {
    values <= gpu.tuning.buffer_read_max_values
}

/// `flat_texture` where the tuning reads through texture copies (`Tuning::reads_via_texture`: on
/// CPU devices a texture fetch is a gather, a storage-buffer load a loop over the lanes), the
/// values are not few enough to read from the buffer (`read_from_buffer`) and they fit the
/// texture's limits; None where the kernel should read the buffer.
pub(crate) fn flat_texture_for_reading(t: &Tensor, first: usize, count: usize) -> Result<Option<PooledTexture>> {
    let gpu = &t.gpu;
    if !gpu.tuning.reads_via_texture || read_from_buffer(gpu, count) || count > flat_texture_capacity(gpu) {
        return Ok(None);
    }
    flat_texture(t, first, count).map(Some)
}

/// Values first .. first + count of `t` as a flat r32float texture: by
/// buffer-to-texture copies (a last partial row copied alone), else by a kernel
/// (`TAMING_PACK_KERNEL=1` forces it, as for the matmul's packs).
pub(crate) fn flat_texture(t: &Tensor, first: usize, count: usize) -> Result<PooledTexture> {
    let gpu = &t.gpu;
    let rows = count.div_ceil(64);
    let layers = count.div_ceil(FLAT_LAYER);
    let height = rows.min(4096);
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    if layers > max_layers {
        bail!("flat texture: {count} values exceed a texture of {max_layers} x {FLAT_LAYER}");
    }
    let tex =
        gpu.texture_format(64, height as u32, pooled_layers(layers, max_layers) as u32, wgpu::TextureFormat::R32Float)?;
    if ((first + count) * 4) as u64 <= t.buffer().size() && !gpu.tuning.pack_kernel {
        copy_flat(t, first, count, &tex, 64);
    } else {
        let pack = gpu.pipeline("copy", "pack_flat", &[])?;
        // Only the values copied are bound (from an aligned start): t may exceed one binding.
        // Pieces of whole rows (64 values) where they exceed one binding, each bound from the
        // aligned start at or before its first value.
        let end = (first + count).min(t.buffer().size() as usize / 4);
        let max_rows = ((gpu.max_binding() as usize).saturating_sub(gpu.binding_alignment()) / 256).max(1);
        let whole = (end - first) * 4 + gpu.binding_alignment() <= gpu.max_binding() as usize;
        let pieces: Vec<(usize, usize)> = if whole {
            vec![(0, rows)]
        } else {
            (0..rows).step_by(max_rows).map(|r0| (r0, max_rows.min(rows - r0))).collect()
        };
        for (r0, piece_rows) in pieces {
            let v0 = first + 64 * r0;
            let v1 = (first + 64 * (r0 + piece_rows)).min(end);
            let (binding, start) = super::aligned_window(t, v0, v1.saturating_sub(v0).max(1));
            let params = CopyParams {
                n: u32_of("values", count)?,
                src_off: u32_of("offset", v0 - start)?,
                dst_start: u32_of("row", r0)?,
                len: u32_of("rows", if whole { height } else { piece_rows })?,
                ..Default::default()
            };
            let grid = if whole {
                [8, height.div_ceil(8) as u32, layers as u32]
            } else {
                [8, piece_rows.div_ceil(8) as u32, 1]
            };
            gpu.dispatch_res(&pack, &params, &[Res::Buf(binding), Res::Tex(&tex.view)], grid)?;
        }
    }
    Ok(tex)
}

/// One run of channels of a band (`flat_band`, `flat_band_layers`): a tensor, the first value of
/// its first channel's span, and its channels. A tensor held whole is one run; an activation held
/// as runs of channels (`models::channel_runs`) gives one per tensor, in channel order.
#[derive(Clone, Copy)]
pub(crate) struct BandRun<'a> {
    pub t: &'a Tensor,
    pub first: usize,
    pub channels: usize,
}

/// Spans of `count` values of every channel of `runs` (each run's first at its `first`, each
/// `step` values after the last), as a flat r32float texture with span c at value c * `stride`
/// (`stride` a multiple of 64): a band of rows of every channel of an image, for kernels that must
/// not copy all of a large input. By buffer-to-texture copies (whole texture rows, then the last
/// row's remainder, so no copy reads past the tensor).
pub(crate) fn flat_band(runs: &[BandRun], step: usize, count: usize, stride: usize) -> Result<PooledTexture> {
    let gpu = &runs[0].t.gpu;
    let channels: usize = runs.iter().map(|r| r.channels).sum();
    for &BandRun { t, first, channels } in runs {
        if !stride.is_multiple_of(64) || stride < count || first + (channels - 1) * step + count > t.numel() {
            bail!("flat band: {channels} spans of {count} values every {step} from {first} do not fit {:?}", t.shape());
        }
    }
    let rows = (channels * stride).div_ceil(64);
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    let layers = rows.div_ceil(4096);
    if layers > max_layers {
        bail!("flat band: {} values exceed a texture of {max_layers} x {FLAT_LAYER}", channels * stride);
    }
    let tex = gpu.texture_format(
        64,
        rows.min(4096) as u32,
        pooled_layers(layers, max_layers) as u32,
        wgpu::TextureFormat::R32Float,
    )?;
    let mut c = 0;
    for run in runs {
        for i in 0..run.channels {
            let src = ((run.first + i * step) * 4) as u64;
            let (full, rest) = (count / 64, count % 64);
            let row0 = c * stride / 64;
            // Whole rows, split where they cross into the next layer.
            let mut done = 0;
            while done < full {
                let row = row0 + done;
                let n = (full - done).min(4096 - row % 4096);
                copy_rows(gpu, run.t.buffer(), src + (done * 256) as u64, &tex, row, [64, n]);
                done += n;
            }
            if rest > 0 {
                copy_rows(gpu, run.t.buffer(), src + (full * 256) as u64, &tex, row0 + full, [rest, 1]);
            }
            c += 1;
        }
    }
    Ok(tex)
}

/// The band of `rows` texture rows (64 values each) at each run's `first` of each of its planes of
/// `plane` values, as a flat r32float texture (rgba32float with `vec4`, 16 texels a row) with
/// channel c in layer c (so span c starts at value c * FLAT_LAYER): one buffer-to-texture copy per
/// run, where the planes are whole texture rows apart and the copies stay inside the buffers; None
/// where it does not apply (then `flat_band`).
pub(crate) fn flat_band_layers(
    runs: &[BandRun],
    plane: usize,
    rows: usize,
    height: usize,
    vec4: bool,
) -> Result<Option<PooledTexture>> {
    let gpu = &runs[0].t.gpu;
    let channels: usize = runs.iter().map(|r| r.channels).sum();
    let inside = |r: &BandRun| (((r.first + (r.channels - 1) * plane) * 4 + rows * 256) as u64) <= r.t.buffer().size();
    let fits = plane.is_multiple_of(64)
        && rows <= height
        && height <= 4096
        && channels <= gpu.limits.max_texture_array_layers as usize
        && runs.iter().all(inside)
        && (!vec4 || runs.iter().all(|r| r.first.is_multiple_of(4)))
        && !gpu.tuning.pack_kernel;
    if !fits {
        return Ok(None);
    }
    let layers = pooled_layers(channels, gpu.limits.max_texture_array_layers as usize);
    let (texels, format) =
        if vec4 { (16, wgpu::TextureFormat::Rgba32Float) } else { (64, wgpu::TextureFormat::R32Float) };
    let tex = gpu.texture_format(texels as u32, height as u32, layers as u32, format)?;
    let mut layer0 = 0;
    for r in runs {
        copy_into(gpu, r.t.buffer(), (r.first * 4) as u64, 256, plane / 64, &tex, layer0, [texels, rows, r.channels]);
        layer0 += r.channels;
    }
    Ok(Some(tex))
}

/// Copy `extent` = [values per row, rows] from `buffer` at `offset` (rows 256 bytes apart) into
/// the flat texture from global row `row` (row % 4096 of layer row / 4096) on.
fn copy_rows(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    offset: u64,
    tex: &PooledTexture,
    row: usize,
    [values, rows]: [usize; 2],
) {
    let origin = wgpu::Origin3d { x: 0, y: (row % 4096) as u32, z: (row / 4096) as u32 };
    copy_at(gpu, buffer, offset, 256, rows, tex, origin, [values, rows, 1]);
}

/// All of `t` as a flat rgba32float texture (the same layout, 16 texels a
/// row) by buffer-to-texture copies, or None where the copies do not apply
/// (the buffer lacks room for whole rows, more values than the texture
/// limits, or `Tuning::pack_kernel` asks for the other path).
pub(crate) fn flat_texture_vec4(t: &Tensor) -> Result<Option<PooledTexture>> {
    flat_texture_vec4_range(t, 0, t.numel())
}

/// Values `first .. first + count` of `t` (`first` a multiple of 4) as `flat_texture_vec4` lays
/// them out, for kernels that read a large tensor a band at a time.
pub(crate) fn flat_texture_vec4_range(t: &Tensor, first: usize, count: usize) -> Result<Option<PooledTexture>> {
    let gpu = &t.gpu;
    let [width, height, layers] = flat_vec4_extent(count);
    if !first.is_multiple_of(4)
        || ((first + count.next_multiple_of(4)) * 4) as u64 > t.buffer().size()
        || layers as usize > gpu.limits.max_texture_array_layers as usize
        || gpu.tuning.pack_kernel
    {
        return Ok(None);
    }
    let tex = gpu.texture(width, height, layers)?;
    copy_flat(t, first, count, &tex, 16);
    Ok(Some(tex))
}

/// The extent [texels a row, rows, layers] of `count` values' `flat_texture_vec4_range` copy.
pub(crate) fn flat_vec4_extent(count: usize) -> [u32; 3] {
    [16, count.div_ceil(64).min(4096) as u32, count.div_ceil(FLAT_LAYER) as u32]
}

/// `flat_texture_vec4_range` of each (tensor, first, count), for a kernel that reads them all
/// through textures; None where any of them does not apply (the kernel then reads the buffers).
pub(crate) fn flat_textures_vec4<const N: usize>(
    parts: [(&Tensor, usize, usize); N],
) -> Result<Option<[PooledTexture; N]>> {
    let mut out = Vec::with_capacity(N);
    for (t, first, count) in parts {
        match flat_texture_vec4_range(t, first, count)? {
            Some(tex) => out.push(tex),
            None => return Ok(None),
        }
    }
    Ok(out.try_into().ok())
}

/// A buffer laid out as an rgba32float texture of `extent` = [width, height, layers] (texel
/// (x, y) of layer z at (z * height + y) * row_texels + x, rows of whole 256-byte multiples: the
/// copy's pitch), for kernels that fill a products' operand texture through buffer stores, which
/// `fill` then copies in: on lavapipe storage-texture stores are slow (`Tuning::textures_via_buffer`).
pub(crate) struct TexelStaging {
    buffer: Tensor,
    pub row_texels: usize,
    extent: [usize; 3],
}

impl TexelStaging {
    /// None where the tuning stores into textures or the buffer would exceed one storage binding.
    pub fn new(gpu: &std::sync::Arc<Gpu>, extent: [usize; 3]) -> Result<Option<TexelStaging>> {
        Self::with_room(gpu, extent, 0)
    }

    /// `new` with room for at least `values` f32s where that fits one binding, for a caller that
    /// reuses the buffer (`tensor`) once its texels are copied out.
    pub fn with_room(
        gpu: &std::sync::Arc<Gpu>,
        extent @ [width, height, layers]: [usize; 3],
        values: usize,
    ) -> Result<Option<TexelStaging>> {
        let row_texels = (width * 16).div_ceil(256) * 256 / 16;
        let bytes = (layers * height * row_texels * 16) as u64;
        if !gpu.tuning.textures_via_buffer || bytes > gpu.max_binding() {
            return Ok(None);
        }
        let room = if (values * 4) as u64 <= gpu.max_binding() { values } else { 0 };
        let buffer = Tensor::empty(gpu, &[(layers * height * row_texels * 4).max(room)], DType::F32)?;
        Ok(Some(TexelStaging { buffer, row_texels, extent }))
    }

    /// The buffer, as a flat tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.buffer
    }

    pub fn binding(&self) -> Binding<'_> {
        self.buffer.binding()
    }

    /// Copy the staged texels into `tex` (of the extent given).
    pub fn fill(&self, tex: &PooledTexture) {
        let [_, height, _] = self.extent;
        copy_into(&self.buffer.gpu, self.buffer.buffer(), 0, self.row_texels * 16, height, tex, 0, self.extent);
    }
}

/// Copy values first .. first + count of `t` into a flat texture of
/// `texels` per 64-value row (64 r32float or 16 rgba32float): the whole
/// layers in one copy, then the rows of the last.
fn copy_flat(t: &Tensor, first: usize, count: usize, tex: &PooledTexture, texels: usize) {
    let full = count / FLAT_LAYER;
    let offset = |value: usize| ((first + value) * 4) as u64;
    if full > 0 {
        copy_into(&t.gpu, t.buffer(), offset(0), 256, 4096, tex, 0, [texels, 4096, full]);
    }
    // The last layer's whole rows, then its last row's values (a copy of whole rows would read
    // past the values asked for, and past the buffer where they end it).
    let (rows, rest) = ((count % FLAT_LAYER) / 64, count % 64);
    if rows > 0 {
        copy_into(&t.gpu, t.buffer(), offset(full * FLAT_LAYER), 256, rows, tex, full, [texels, rows, 1]);
    }
    if rest > 0 {
        let row = full * 4096 + rows;
        copy_rows(&t.gpu, t.buffer(), offset(count - rest), tex, row, [rest.div_ceil(64 / texels), 1]);
    }
}

/// Copy rows of `bytes_per_row` from a buffer into a texture from layer
/// `layer0` on (a memcpy on CPU devices; bytes_per_row a multiple of 256).
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub(crate) fn copy_into(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    offset: u64,
    bytes_per_row: usize,
    rows_per_image: usize,
    tex: &PooledTexture,
    layer0: usize,
    extent: [usize; 3],
) {
    let origin = wgpu::Origin3d { x: 0, y: 0, z: layer0 as u32 };
    copy_at(gpu, buffer, offset, bytes_per_row, rows_per_image, tex, origin, extent);
}

/// `copy_into` to any origin of the texture.
#[allow(clippy::too_many_arguments)]
#[track_caller]
fn copy_at(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    offset: u64,
    bytes_per_row: usize,
    rows_per_image: usize,
    tex: &PooledTexture,
    origin: wgpu::Origin3d,
    extent: [usize; 3],
) {
    gpu.record(|enc| {
        enc.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer,
                layout: wgpu::TexelCopyBufferLayout {
                    offset,
                    bytes_per_row: Some(bytes_per_row as u32),
                    rows_per_image: Some(rows_per_image as u32),
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture: tex.texture(),
                mip_level: 0,
                origin,
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width: extent[0] as u32,
                height: extent[1] as u32,
                depth_or_array_layers: extent[2] as u32,
            },
        )
    });
}

pub mod cpu {
    pub fn slice(x: &[f32], shape: &[usize], dim: usize, start: usize, len: usize) -> Vec<f32> {
        let (outer, size, inner) = super::around(shape, dim);
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            out.extend_from_slice(&x[(o * size + start) * inner..(o * size + start + len) * inner]);
        }
        out
    }
    pub fn concat(parts: &[(&[f32], &[usize])], dim: usize) -> Vec<f32> {
        let (outer, _, _) = super::around(parts[0].1, dim);
        let mut out = Vec::new();
        for o in 0..outer {
            for (x, shape) in parts {
                let (_, size, inner) = super::around(shape, dim);
                out.extend_from_slice(&x[o * size * inner..(o + 1) * size * inner]);
            }
        }
        out
    }
    pub fn swap_dims(x: &[f32], batch: usize, a: usize, b: usize, c: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for bt in 0..batch {
            for j in 0..b {
                for i in 0..a {
                    let at = ((bt * a + i) * b + j) * c;
                    out.extend_from_slice(&x[at..at + c]);
                }
            }
        }
        out
    }
    pub fn transpose(x: &[f32], batch: usize, r: usize, c: usize) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        for b in 0..batch {
            for i in 0..r {
                for j in 0..c {
                    out[b * r * c + j * r + i] = x[b * r * c + i * c + j];
                }
            }
        }
        out
    }
}
