//! 3x3 stride-1 pad-1 convolutions by Winograd's F(4x4, 3x3)
//! (`shaders/winograd.wgsl`): the weights and the input are transformed into
//! 36 matrices each, multiplied pairwise by the matmul family's batched
//! product (36 products of Cout x Cin by Cin x tiles), and the result is
//! transformed back into pixels. 4x fewer multiply-adds than the direct
//! convolution, for a few more passes over memory: on lavapipe the products
//! are bound by arithmetic, the passes are not.
//!
//! # Design notes
//!
//! Measured on lavapipe (llvmpipe, Mesa 22.3.6, a 2-core VM).
//!
//! - **Winograd F(4×4, 3×3)** (Lavin & Gray): each 4×4 output tile is `Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`
//!   over a 6×6 input patch, so a convolution becomes 36 products (Cout × Cin by Cin × tiles),
//!   batched through the matmul family's kernels: 4× fewer multiply-adds, for three passes
//!   (weights → U, input → V, products → pixels) that mostly store. Transforms work on four lanes
//!   at once (4 channels of a weight, or 4 tiles of a channel: one texel of the products'
//!   operands).
//! - **Reads through textures**: the input and the weights are read through r32float textures
//!   filled by `copy_buffer_to_texture` (a memcpy on lavapipe; `kernels::copy::flat_texture`)
//!   rather than by buffer loads, and the products' output through an rgba32float copy. Where an
//!   image's copy would be larger than a piece (megapixel images), each piece of tiles copies only
//!   the band of rows it reads, one texture layer per channel in one copy
//!   (`copy::flat_band_layers`; a copy per channel where planes are not whole texture rows):
//!   1024², `bench vqgan`, 2026-12-02: 2,389 → 1,892 MiB of live tensors, 3.16 → 2.72 GB resident,
//!   93 s either way.
//! - **Tensors larger than one binding**: the output is written by runs of output channels, each
//!   with its own transformed weights (the input transform is shared); pieces stay below the
//!   pools' `LARGE` so their textures are reused between layers.
//! - **Fusions** (inference): group norm + swish is applied as the input is read, and a
//!   ResnetBlock's residual added as the output is written.
//! - **Where it is taken**: per image, not per batch (an image's result does not depend on its
//!   batch), and not below 64 tiles, where most lanes of a product workgroup would idle (512
//!   channels at 16×16: 79 ms against 73 by implicit GEMM; at 32×32: 85 against 204). Chosen by
//!   `Tuning::winograd` (CPU devices; unmeasured on GPUs, so off there; `TAMING_WINOGRAD=0|1`
//!   overrides). Not on the GL backend: Winograd's convolutions computed wrong results there (cause
//!   not pinned down; everything else matched), so GL never takes them (`TAMING_WINOGRAD=1` with GL
//!   is an error saying so).
//! - **Accuracy**: errors against the direct convolution stay within 1e-5 of the output's scale in
//!   the tests; `taming verify` still passes all 439 checks (indices exact).
//! - **Integer divisions once per tile**: they run lane by lane on llvmpipe; the output pass
//!   computed two per stored row, now two per tile (56 → 39 ms on 128 channels at 256²).
//!
//! # Measurements
//!
//! - conv 3×3 128→128 on 1×128×64×64 (`bench kernels`), 2026-11-30: 33.6–40.0 GFLOP/s of the
//!   direct convolution over 7 runs (30.2–36.0 ms: weights 2–3 ms, input 6–8 ms, products ~20 ms,
//!   output 3 ms); target ≥ 15, met; Burn on the same machine: 4.1 GFLOP/s. Implicit GEMM on the
//!   same shape: 17.3–19.7 (`kernels::conv2d`).
//! - In the VQGAN forward (`bench vqgan`, ImageNet f16 config, 1×256×256, profiled 2026-11-30):
//!   the Winograd products ~5.6 s, its input pass ~1.8 s (bound by its 36 texture stores per
//!   invocation), its output pass ~1.0 s. Winograd + four-column stores took that forward from
//!   24.2–30.1 s to 13.7–14.0 s on 2026-11-30 (`models::vqgan`).

use anyhow::{bail, Result};

use super::conv2d::{ConvSpec, NormSwish};
use super::copy::{
    copy_into, flat_band, flat_band_layers, flat_texture, flat_texture_vec4_range, BandRun, TexelStaging, FLAT_LAYER,
};
use super::matmul::{self, Bias, Gemm, Out};
use super::u32_of;
use crate::engine::device::{Binding, Gpu, Res};
use crate::engine::pool::PooledTexture;
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/winograd.wgsl`'s `Params`: this piece is tiles t0 .. t0 + nt;
    /// flags: 1 norm + swish on the input, 2 bias, 4 residual (with 8: the output itself, added in
    /// place); image0: the first image in the flat input texture.
    WinogradParams in "winograd" as "Params" {
        cin: u32, cout: u32, h: u32, w: u32,
        tiles_x: u32, tiles_y: u32, t0: u32, nt: u32,
        flags: u32, group_size: u32, image0: u32, plane_stride: u32,
        out_channels: u32, out_image0: u32, o0: u32, y0: u32,
        flip: u32, v_ld: u32, v_rows: u32, res_y0: u32,
    }
);

/// Positions of a transformed tile: 6 x 6.
const POINTS: usize = 36;

/// Bytes one piece of tiles may use for its transformed input or its products (whose output is
/// one storage binding): below the pools' `LARGE`, so a piece's textures and buffers stay cached
/// between layers instead of being given back at each large allocation (512², `bench vqgan`: 128
/// MiB pieces 25.6 s, 1.76 GB resident, 1,179 MiB live; 24 MiB pieces 18.8 s, 1.50 GB, 868 MiB).
const PIECE_BYTES: usize = 24 << 20;

/// Bytes one piece of tiles may use.
fn piece_budget(max_binding: u64) -> usize {
    PIECE_BYTES.min(max_binding as usize)
}

/// Whether `conv3x3` takes this convolution: a 3x3 kernel, stride 1, one
/// pixel of padding on every side, on a device tuned for it, within the
/// texture limits.
pub fn applies(x: &Tensor, weight: &Tensor, spec: ConvSpec) -> bool {
    x.rank() == 4 && applies_to(&x.gpu, [x.dim(0), x.dim(1), x.dim(2), x.dim(3)], weight, spec)
}

/// `applies` for an input of this shape (held whole or as runs of channels).
pub fn applies_to(gpu: &Gpu, [_, cin, h, w]: [usize; 4], weight: &Tensor, spec: ConvSpec) -> bool {
    if !gpu.tuning.winograd
        || weight.rank() != 4
        || weight.dim(2) != 3
        || weight.dim(3) != 3
        || spec != ConvSpec::same(1, 1)
        || (gpu.limits.max_texture_array_layers as usize) < POINTS
    {
        return false;
    }
    let tn = gpu.tuning.mm_tn as usize;
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    let ((_, ah), (_, bh)) = matmul::tex_extents(gpu, weight.dim(0), tn, cin);
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    let flat_max = FLAT_LAYER * max_layers;
    ah <= max_dim
        && bh <= max_dim
        && cin * h * w <= flat_max
        && weight.numel() <= flat_max
        && POINTS * 4 * 64 * weight.dim(0).max(bh) <= piece_budget(gpu.max_binding())
}

/// Whether Winograd is faster than implicit GEMM here: the products' columns
/// are the tiles, and with fewer than one workgroup's 64 columns most lanes
/// idle (lavapipe, 512 channels at 16x16: 79 ms against 73 for implicit
/// GEMM; at 32x32: 85 against 204). Decided per image, not per batch, so
/// that an image's result does not depend on the batch it comes in.
pub fn pays_off(x: &Tensor) -> bool {
    pays_off_at(x.dim(2), x.dim(3))
}

/// `pays_off` for h x w images.
pub fn pays_off_at(h: usize, w: usize) -> bool {
    h.div_ceil(4) * w.div_ceil(4) >= 64
}

/// out [B, Cout, H, W] = x [B, Cin, H, W] ⊛ weight [Cout, Cin, 3, 3] (+ bias)
/// (+ residual, out's shape), with x first normalised (group norm + swish)
/// when `pre` is given. Call only where `applies` holds.
pub fn conv3x3(
    x: &Tensor,
    pre: Option<&NormSwish>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    conv3x3_weights(x, pre, Weights { t: weight, flipped: false }, bias, residual, out, piece_tiles(x, weight))
}

/// Tiles per piece of `conv3x3`: within the budget and the texture width.
pub(crate) fn piece_tiles(x: &Tensor, weight: &Tensor) -> usize {
    piece_tiles_of(&x.gpu, [x.dim(0), x.dim(1), x.dim(2), x.dim(3)], weight.dim(0))
}

/// `piece_tiles` for an input of this shape and `cout` output channels.
fn piece_tiles_of(gpu: &Gpu, [b, cin, h, w]: [usize; 4], cout: usize) -> usize {
    let tiles = b * h.div_ceil(4) * w.div_ceil(4);
    let tn = gpu.tuning.mm_tn as usize;
    let ((_, _), (_, bh)) = matmul::tex_extents(gpu, cout, tn, cin);
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    // Multiples of 64 tiles: M's rows are padded to that for the copy into a texture.
    let nt_max = (piece_budget(gpu.max_binding()) / (POINTS * 4 * cout.max(bh))).min(4 * max_dim) / 64 * 64;
    nt_max.min(tiles.div_ceil(tn) * tn).max(tn)
}

/// `conv3x3` with the weights given as `Weights`: with `flipped`, `t` holds W [Cin, Cout, 3, 3]
/// (reshaped to the convolution's [Cout, Cin, 3, 3]) and the convolution uses each kernel of Wᵀ
/// turned by 180° (`conv2d::flip_transpose_weights`), read so by the weight transform: the input
/// gradient of a convolution without a flipped copy.
pub(crate) fn conv3x3_weights(
    x: &Tensor,
    pre: Option<&NormSwish>,
    weight: Weights,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    out: &Tensor,
    nt: usize,
) -> Result<()> {
    in_pieces(x, pre, weight, bias, residual, out, nt, Transformed::Here)
}

/// `conv3x3` (no norm) that also keeps, where it can, the transformed weights of its input
/// gradient's convolution (W flipped and transposed), made in the same pass as its own: a square
/// convolution (Cin = Cout) on a device that stages U through a buffer. Training's forward.
pub(crate) fn conv3x3_keeping_flipped(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    out: &Tensor,
    kept: &mut Option<PooledTexture>,
) -> Result<()> {
    let weights = Weights { t: weight, flipped: false };
    in_pieces(x, None, weights, bias, residual, out, piece_tiles(x, weight), Transformed::KeepingFlipped(kept))
}

/// `conv3x3_weights` of flipped weights with their transform given (`conv3x3_keeping_flipped`'s),
/// where it has the extent this convolution's takes; else transformed here.
pub(crate) fn conv3x3_flipped_given(x: &Tensor, weights: Weights, out: &Tensor, u: &PooledTexture) -> Result<()> {
    let nt = piece_tiles(x, weights.t);
    in_pieces(x, None, weights, None, None, out, nt, Transformed::Given(u))
}

/// Where `in_runs` gets the transformed weights U.
pub(crate) enum Transformed<'a> {
    /// It transforms them.
    Here,
    /// It transforms them and, for a square convolution on a device that stages U through a
    /// buffer, W flipped and transposed in the same pass (`weights_pair_buf`), kept here.
    KeepingFlipped(&'a mut Option<PooledTexture>),
    /// Given (kept by `KeepingFlipped`), where the texture has U's extent.
    Given(&'a PooledTexture),
}

/// A convolution's weights as its kernels read them (`conv3x3_weights`).
#[derive(Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub t: &'a Tensor,
    pub flipped: bool,
}

/// `conv3x3` over pieces of `nt` 4x4 tiles (numbered across the batch).
pub fn conv3x3_in_pieces(
    x: &Tensor,
    pre: Option<&NormSwish>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    out: &Tensor,
    nt: usize,
) -> Result<()> {
    in_pieces(x, pre, Weights { t: weight, flipped: false }, bias, residual, out, nt, Transformed::Here)
}

#[allow(clippy::too_many_arguments)]
fn in_pieces(
    x: &Tensor,
    pre: Option<&NormSwish>,
    weights_of: Weights,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    out: &Tensor,
    nt: usize,
    u: Transformed,
) -> Result<()> {
    if !applies(x, weights_of.t, ConvSpec::same(1, 1)) || weights_of.t.dim(1) != x.dim(1) {
        bail!(
            "conv2d: Winograd does not take a {:?} input with a {:?} weight on this device",
            x.shape(),
            weights_of.t.shape()
        );
    }
    let residuals = residual.map(|r| [r]);
    in_runs(&[x], pre, weights_of, bias, residuals.as_ref().map(|r| &r[..]), &[out], nt, u)
}

/// `conv3x3` of an input, output and residual each held as runs of channels (activations larger
/// than one buffer: `models::channel_runs`): the input's runs are read into one band per piece
/// and each output run written a window at a time, so the products see all input channels and the
/// numbers are those of the convolution of whole tensors. The output's runs must be equal.
pub fn conv3x3_runs(
    xs: &[&Tensor],
    pre: Option<&NormSwish>,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residuals: Option<&[&Tensor]>,
    outs: &[&Tensor],
) -> Result<()> {
    let (x, cin) = (xs[0], xs.iter().map(|t| t.dim(1)).sum::<usize>());
    let gpu = &x.gpu;
    let shape = [x.dim(0), cin, x.dim(2), x.dim(3)];
    if !applies_to(gpu, shape, weight, ConvSpec::same(1, 1)) || weight.dim(1) != cin {
        bail!("conv2d: Winograd does not take a {shape:?} input with a {:?} weight on this device", weight.shape());
    }
    let nt = piece_tiles_of(gpu, shape, weight.dim(0));
    in_runs(xs, pre, Weights { t: weight, flipped: false }, bias, residuals, outs, nt, Transformed::Here)
}

#[allow(clippy::too_many_arguments)]
fn in_runs(
    xs: &[&Tensor],
    pre: Option<&NormSwish>,
    weights_of: Weights,
    bias: Option<&Tensor>,
    residuals: Option<&[&Tensor]>,
    outs: &[&Tensor],
    nt: usize,
    u: Transformed,
) -> Result<()> {
    let weight = weights_of.t;
    let x = xs[0];
    let gpu = &x.gpu;
    let (b, h, w) = (x.dim(0), x.dim(2), x.dim(3));
    let cin: usize = xs.iter().map(|t| t.dim(1)).sum();
    let cout = weight.dim(0);
    // Every output run has `oc` channels.
    let oc = outs[0].dim(1);
    let runs_fit = |ts: &[&Tensor], c: usize| {
        ts.iter().all(|t| t.rank() == 4 && t.dim(0) == b && t.dim(2) == h && t.dim(3) == w)
            && ts.iter().map(|t| t.dim(1)).sum::<usize>() == c
    };
    if !runs_fit(xs, cin)
        || !runs_fit(outs, cout)
        || outs.iter().any(|t| t.dim(1) != oc)
        || bias.is_some_and(|t| t.shape() != [cout])
    {
        bail!(
            "conv2d: outputs {:?} or bias {:?} do not fit inputs {:?} and a {:?} weight",
            outs.iter().map(|t| t.shape()).collect::<Vec<_>>(),
            bias.map(|t| t.shape()),
            xs.iter().map(|t| t.shape()).collect::<Vec<_>>(),
            weight.shape()
        );
    }
    // Residuals that are the outputs themselves are added in place (flags & 8).
    let in_place = residuals.is_some_and(|rs| rs.iter().zip(outs).all(|(r, o)| r.same_buffer(o)));
    if let Some(rs) = residuals {
        if rs.len() != outs.len()
            || rs.iter().zip(outs).any(|(r, o)| r.shape() != o.shape() || (r.same_buffer(o) != in_place))
        {
            bail!(
                "conv2d: residuals {:?} do not fit the outputs {:?}",
                rs.iter().map(|t| t.shape()).collect::<Vec<_>>(),
                outs.iter().map(|t| t.shape()).collect::<Vec<_>>()
            );
        }
    }
    let (tiles_y, tiles_x) = (h.div_ceil(4), w.div_ceil(4));
    let per_image = tiles_y * tiles_x;
    let nt = nt.max(1);
    let plane = h * w;
    // The output (and residual) a window at a time where it is larger than one binding:
    // runs of output channels, each written by its own output pass from the piece's products.
    let windows = super::Windows::split(gpu, b, oc, plane, 1)?;
    // (output run, first channel within it, channels) of each window, over all output runs.
    let out_windows: Vec<(usize, usize, usize)> =
        (0..outs.len()).flat_map(|r| windows.channels.iter().map(move |&(c0, n)| (r, c0, n))).collect();
    let ((aw, ah), (bw, bh)) = matmul::tex_extents(gpu, cout, nt, cin);
    // M's rows are copied into a texture: whole 256-byte rows.
    let ldm = nt.div_ceil(64) * 64;
    let mut params = WinogradParams {
        cin: u32_of("channels", cin)?,
        cout: u32_of("output channels", cout)?,
        h: u32_of("height", h)?,
        w: u32_of("width", w)?,
        tiles_x: u32_of("tiles", tiles_x)?,
        tiles_y: u32_of("tiles", tiles_y)?,
        flags: (pre.is_some() as u32)
            | ((bias.is_some() as u32) << 1)
            | ((residuals.is_some() as u32) << 2)
            | ((in_place as u32) << 3),
        group_size: pre.map_or(1, |n| (cin / n.groups) as u32),
        out_channels: u32_of("output channels", oc)?,
        ..Default::default()
    };
    // The transformed weights of all output channels: every window's products are one product
    // per piece, so M's rows are whole tiles of the product kernel (runs of 26 channels each took
    // a tile of 32 rows at 1024²) and the weights are transformed once.
    let extent = |t: &PooledTexture| {
        let t = t.texture();
        (t.width() as usize, t.height() as usize, t.depth_or_array_layers() as usize)
    };
    let given = match &u {
        Transformed::Given(t) if extent(t) == (aw, ah, POINTS) && weights_of.flipped => Some(*t),
        _ => None,
    };
    let pair = cin == cout && !weights_of.flipped && outs.len() == 1 && oc == cout;
    let kept = match u {
        Transformed::KeepingFlipped(slot) if pair => Some(slot),
        _ => None,
    };
    let owned;
    let ta = match given {
        Some(t) => t,
        None => {
            owned = transform_weights(gpu, weights_of, (aw, ah), &params, kept)?;
            &owned
        }
    };

    let dummy = || Binding { buffer: &gpu.dummy, offset: 0, size: 16 };
    let (stats, gamma, beta) = match pre {
        Some(n) => (n.stats.binding(), n.gamma.binding(), n.beta.binding()),
        None => (dummy(), dummy(), dummy()),
    };
    let bias_binding = bias.map_or(dummy(), |t| t.binding());
    // V through a buffer and one copy into the texture where the tuning says so (one buffer for
    // every piece), else stored into the texture. The buffer holds M's values too where they fit
    // one binding (each piece copies V out of it before its products write M): one piece's buffer
    // less at the peak.
    let m_values = POINTS * cout * ldm;
    let v_staging = TexelStaging::with_room(gpu, [bw, bh, POINTS], m_values)?;
    // Each pipeline made for this call's options only (shaders/winograd.wgsl, `FLAGS`); the
    // one-tile-a-lane input pass only where a piece takes it.
    let flags = [("FLAGS", format!("{}u", params.flags))];
    let input_entry = if v_staging.is_some() { "input_buf" } else { "input" };
    // Four tiles of one tile row per invocation, read as vec4s (`input4`), where every piece is
    // whole groups of four tiles of one row (W % 16 == 0) and the input's copy is rgba32float.
    let strips = w.is_multiple_of(16) && nt.is_multiple_of(4);
    let input4 = if strips {
        Some(gpu.pipeline("winograd", if v_staging.is_some() { "input4_buf" } else { "input4" }, &flags)?)
    } else {
        None
    };
    let output = gpu.pipeline("winograd", if w % 4 == 0 { "output4" } else { "output" }, &flags)?;
    // The residual read through a band of rgba32float layers where reads go through textures
    // (`output4_band`: on lavapipe its lane-by-lane buffer loads cost more than the pass's stores),
    // for outputs of more than one piece (smaller ones would each keep a band texture of their
    // size in the pool, for little time).
    let output_band =
        if residuals.is_some() && gpu.tuning.reads_via_texture && w.is_multiple_of(4) && b * per_image > nt {
            Some(gpu.pipeline("winograd", "output4_band", &flags)?)
        } else {
            None
        };
    let own_m;
    let m = match &v_staging {
        Some(v) if v.tensor().numel() >= m_values => v.tensor(),
        _ => {
            own_m = Tensor::empty(&x.gpu, &[POINTS, cout, ldm], DType::F32)?;
            &own_m
        }
    };
    // Images whose planes fit one flat texture, within one output window's images; or, where one
    // image's copy would be larger than a piece, each piece's band of rows (`flat_band`).
    let by_band = xs.len() > 1 || cin * plane * 4 > piece_budget(gpu.max_binding());
    let flat_group =
        if by_band { 1 } else { (FLAT_LAYER * gpu.limits.max_texture_array_layers as usize / (cin * plane)).max(1) };
    params.plane_stride = u32_of("plane", plane)?;
    // Texture rows of the tallest band a piece of nt tiles reads (tile rows it spans, one pixel
    // row of padding above and below): the input's bands, and the residual's (which lack the
    // padding), so both keep one texture height per convolution.
    let band_rows = (((nt.div_ceil(tiles_x) + 1) * 4 + 2).min(h) * w).div_ceil(64);
    for &(window_image0, window_images) in &windows.images {
        params.out_image0 = u32_of("image", window_image0)?;
        let window_end = window_image0 + window_images;
        for image0 in (window_image0..window_end).step_by(flat_group) {
            let images = flat_group.min(window_end - image0);
            params.image0 = u32_of("image", image0)?;
            let (first_value, values) = (image0 * cin * plane, images * cin * plane);
            let whole = match (by_band, strips) {
                (true, _) => None,
                (false, true) => match flat_texture_vec4_range(x, first_value, values)? {
                    Some(tex) => Some((tex, true)),
                    None => Some((flat_texture(x, first_value, values)?, false)),
                },
                (false, false) => Some((flat_texture(x, first_value, values)?, false)),
            };
            let first = image0 * per_image;
            let end = (image0 + images) * per_image;
            for t0 in (first..end).step_by(nt) {
                let np = nt.min(end - t0);
                params.t0 = u32_of("tile", t0)?;
                params.nt = u32_of("tiles", np)?;
                params.cout = u32_of("output channels", cout)?;
                let band;
                // The input's copy, and whether it is rgba32float (for `input4`).
                let (planes, as_vec4) = match &whole {
                    Some((tex, as_vec4)) => (tex, *as_vec4),
                    None => {
                        // The rows this piece's tiles read (one row of padding above and below).
                        let (ty_a, ty_b) = ((t0 - first) / tiles_x, (t0 + np - 1 - first) / tiles_x);
                        let (y0, y1) = ((4 * ty_a).saturating_sub(1), (4 * ty_b + 5).min(h));
                        params.y0 = u32_of("row", y0)?;
                        let runs: Vec<BandRun> = xs
                            .iter()
                            .map(|&t| BandRun { t, first: (image0 * t.dim(1)) * plane + y0 * w, channels: t.dim(1) })
                            .collect();
                        let rows = ((y1 - y0) * w).div_ceil(64);
                        // One copy into a layer per channel (one texture size per convolution,
                        // so the pool reuses it), else a copy per channel.
                        let height = band_rows.max(rows);
                        band = match flat_band_layers(&runs, plane, rows, height, strips)? {
                            Some(tex) => {
                                params.plane_stride = u32_of("band", FLAT_LAYER)?;
                                (tex, strips)
                            }
                            None => {
                                let stride = rows * 64;
                                params.plane_stride = u32_of("band", stride)?;
                                (flat_band(&runs, plane, (y1 - y0) * w, stride)?, false)
                            }
                        };
                        (&band.0, band.1)
                    }
                };
                let input = match (&input4, as_vec4) {
                    (Some(input4), true) => input4.clone(),
                    _ => gpu.pipeline("winograd", input_entry, &flags)?,
                };
                let tb = gpu.texture(bw as u32, bh as u32, POINTS as u32)?;
                match &v_staging {
                    Some(v) => {
                        let p = WinogradParams { v_ld: v.row_texels as u32, v_rows: bh as u32, ..params };
                        gpu.dispatch_res(
                            &input,
                            &p,
                            &[
                                Res::Tex(&planes.view),
                                Res::Buf(v.binding()),
                                Res::Buf(stats),
                                Res::Buf(gamma),
                                Res::Buf(beta),
                            ],
                            [v.row_texels.div_ceil(8) as u32, bh.div_ceil(8) as u32, 1],
                        )?;
                        v.fill(&tb);
                    }
                    None => gpu.dispatch_res(
                        &input,
                        &params,
                        &[Res::Tex(&planes.view), Res::Tex(&tb.view), Res::Buf(stats), Res::Buf(gamma), Res::Buf(beta)],
                        [bw.div_ceil(8) as u32, bh.div_ceil(8) as u32, 1],
                    )?,
                }
                let g = Gemm { m: cout, n: np, k: cin, batch: POINTS, alpha: 1.0, beta: 0.0 };
                let out_m = Out { t: m, off: 0, ld: ldm, bs: cout * ldm };
                matmul::product(gpu, &g, ta, false, &tb, false, &out_m, Bias::None)?;
                let mt = gpu.texture(ldm as u32 / 4, cout as u32, POINTS as u32)?;
                copy_into(gpu, m.buffer(), 0, ldm * 4, cout, &mt, 0, [ldm / 4, cout, POINTS]);
                // Each output window reads its rows o0 .. o0 + run of M.
                for &(r, c0, run) in &out_windows {
                    let o0 = r * oc + c0;
                    params.cout = u32_of("output channels", run)?;
                    params.o0 = u32_of("output channel", o0)?;
                    let window = (window_image0, window_images);
                    let out_binding = windows.binding(outs[r], window, (c0, run));
                    let residual_band = match (residuals, &output_band) {
                        (Some(rs), Some(_)) => residual_band(rs[r], (t0, np), (c0, run), band_rows)?,
                        _ => None,
                    };
                    let residual_binding = match residuals {
                        Some(rs) if !in_place => windows.binding(rs[r], window, (c0, run)),
                        _ => dummy(),
                    };
                    let (output, residual) = match (&residual_band, &output_band) {
                        (Some((band, y0)), Some(output_band)) => {
                            params.res_y0 = u32_of("row", *y0)?;
                            (output_band, Res::Tex(&band.view))
                        }
                        _ => (&output, Res::Buf(residual_binding)),
                    };
                    gpu.dispatch_res(
                        output,
                        &params,
                        &[Res::Tex(&mt.view), Res::Buf(out_binding), Res::Buf(bias_binding), residual],
                        [np.div_ceil(32) as u32, run.div_ceil(8) as u32, 1],
                    )?;
                }
                drop(tb);
            }
        }
    }
    Ok(())
}

/// U, the transformed weights (`weights`, or `weights_buf` through a buffer where
/// `Tuning::textures_via_buffer` says so) as a texture of `(aw, ah)` texels and 36 layers; with
/// `kept` (a square convolution's, unflipped) also those of W flipped and transposed, from the
/// same pass (`weights_pair_buf`), into `kept`, where U goes through a buffer.
fn transform_weights(
    gpu: &std::sync::Arc<Gpu>,
    weights_of: Weights,
    (aw, ah): (usize, usize),
    params: &WinogradParams,
    kept: Option<&mut Option<PooledTexture>>,
) -> Result<PooledTexture> {
    let ta = gpu.texture(aw as u32, ah as u32, POINTS as u32)?;
    let flat_weights = flat_texture(weights_of.t, 0, weights_of.t.numel())?;
    let weight_params = WinogradParams { flip: weights_of.flipped as u32, ..*params };
    let sets = if kept.is_some() { 2 } else { 1 };
    match TexelStaging::new(gpu, [aw, ah, sets * POINTS])? {
        // U through a buffer and one copy into the texture (`Tuning::textures_via_buffer`).
        Some(u) => {
            let p = WinogradParams { v_ld: u.row_texels as u32, v_rows: ah as u32, ..weight_params };
            gpu.dispatch_res(
                &*gpu.pipeline("winograd", if sets == 2 { "weights_pair_buf" } else { "weights_buf" }, &[])?,
                &p,
                &[Res::Tex(&flat_weights.view), Res::Buf(u.binding())],
                [u.row_texels.div_ceil(8) as u32, ah.div_ceil(8) as u32, 1],
            )?;
            let set_bytes = (POINTS * ah * u.row_texels * 16) as u64;
            let fill = |tex: &PooledTexture, set: u64| {
                copy_into(gpu, u.tensor().buffer(), set * set_bytes, u.row_texels * 16, ah, tex, 0, [aw, ah, POINTS]);
            };
            fill(&ta, 0);
            if let Some(slot) = kept {
                let flipped = gpu.texture(aw as u32, ah as u32, POINTS as u32)?;
                fill(&flipped, 1);
                *slot = Some(flipped);
            }
        }
        None => gpu.dispatch_res(
            &*gpu.pipeline("winograd", "weights", &[])?,
            &weight_params,
            &[Res::Tex(&flat_weights.view), Res::Tex(&ta.view)],
            [aw.div_ceil(8) as u32, ah.div_ceil(8) as u32, 1],
        )?,
    }
    Ok(ta)
}

/// The rows of channels c0 .. c0 + run of `residual` that the piece of tiles `t0 .. t0 + np`
/// writes, as rgba32float layers (`copy::flat_band_layers`), and the band's first row; None where
/// the piece spans two images or the copy does not apply (the output pass then reads the buffer).
fn residual_band(
    residual: &Tensor,
    (t0, np): (usize, usize),
    (c0, run): (usize, usize),
    max_rows: usize,
) -> Result<Option<(PooledTexture, usize)>> {
    let (channels, h, w) = (residual.dim(1), residual.dim(2), residual.dim(3));
    let tiles_x = w.div_ceil(4);
    let per_image = tiles_x * h.div_ceil(4);
    let image = t0 / per_image;
    if (t0 + np - 1) / per_image != image {
        return Ok(None);
    }
    let (ty_a, ty_b) = ((t0 - image * per_image) / tiles_x, (t0 + np - 1 - image * per_image) / tiles_x);
    let (y0, y1) = (4 * ty_a, (4 * ty_b + 4).min(h));
    let rows = ((y1 - y0) * w).div_ceil(64);
    let run_of = BandRun { t: residual, first: (image * channels + c0) * h * w + y0 * w, channels: run };
    Ok(flat_band_layers(&[run_of], h * w, rows, max_rows.max(rows), true)?.map(|band| (band, y0)))
}

/// Plain-Rust reference: the same transforms, in f32, tile by tile.
pub mod cpu {
    /// G (6 x 3), Bᵀ (6 x 6), Aᵀ (4 x 6) for the points 0, 1, -1, 2, -2, ∞.
    const G: [[f32; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    const BT: [[f32; 6]; 6] = [
        [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ];
    const AT: [[f32; 6]; 4] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ];

    /// L d Rᵀ for an (r x k) L, a (k x k) d and an (s x k) R.
    fn sandwich<const R: usize, const K: usize, const S: usize>(
        l: &[[f32; K]; R],
        d: &[[f32; K]; K],
        r: &[[f32; K]; S],
    ) -> [[f32; S]; R] {
        let mut ld = [[0.0f32; K]; R];
        for i in 0..R {
            for j in 0..K {
                ld[i][j] = (0..K).map(|k| l[i][k] * d[k][j]).sum();
            }
        }
        let mut out = [[0.0f32; S]; R];
        for i in 0..R {
            for j in 0..S {
                out[i][j] = (0..K).map(|k| ld[i][k] * r[j][k]).sum();
            }
        }
        out
    }

    /// x [b, cin, h, w] ⊛ weight [cout, cin, 3, 3] (+ bias), padding 1, stride 1.
    #[allow(clippy::too_many_arguments)]
    pub fn conv3x3(
        x: &[f32],
        b: usize,
        cin: usize,
        h: usize,
        w: usize,
        weight: &[f32],
        cout: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let u: Vec<[[f32; 6]; 6]> = (0..cout * cin)
            .map(|oc| {
                let g: [[f32; 3]; 3] = std::array::from_fn(|ky| std::array::from_fn(|kx| weight[oc * 9 + ky * 3 + kx]));
                sandwich(&G, &g, &G)
            })
            .collect();
        let mut out = vec![0.0f32; b * cout * h * w];
        for bi in 0..b {
            for ty in 0..h.div_ceil(4) {
                for tx in 0..w.div_ceil(4) {
                    let v: Vec<[[f32; 6]; 6]> = (0..cin)
                        .map(|c| {
                            let d: [[f32; 6]; 6] = std::array::from_fn(|dy| {
                                std::array::from_fn(|dx| {
                                    let (y, xx) = ((4 * ty + dy) as isize - 1, (4 * tx + dx) as isize - 1);
                                    if y < 0 || xx < 0 || y as usize >= h || xx as usize >= w {
                                        0.0
                                    } else {
                                        x[((bi * cin + c) * h + y as usize) * w + xx as usize]
                                    }
                                })
                            });
                            sandwich(&BT, &d, &BT)
                        })
                        .collect();
                    for o in 0..cout {
                        let mut m = [[0.0f32; 6]; 6];
                        for (c, vc) in v.iter().enumerate() {
                            for i in 0..6 {
                                for j in 0..6 {
                                    m[i][j] += u[o * cin + c][i][j] * vc[i][j];
                                }
                            }
                        }
                        let y = sandwich(&AT, &m, &AT);
                        for (r, row) in y.iter().enumerate() {
                            for (s, &val) in row.iter().enumerate() {
                                let (oy, ox) = (4 * ty + r, 4 * tx + s);
                                if oy < h && ox < w {
                                    out[((bi * cout + o) * h + oy) * w + ox] = val + bias.map_or(0.0, |bb| bb[o]);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::cpu;
    use crate::engine::kernels::conv2d::{self, ConvSpec};
    use crate::engine::kernels::random_vec;

    /// Winograd's CPU reference equals the direct convolution (ragged tiles, odd channels).
    #[test]
    fn winograd_reference_is_the_direct_convolution() {
        for (b, cin, cout, h, w) in [(1usize, 3usize, 2usize, 5usize, 7usize), (2, 5, 4, 8, 8), (1, 1, 1, 1, 2)] {
            let x = random_vec(b * cin * h * w, 1, 1.0);
            let wt = random_vec(cout * cin * 9, 2, 1.0);
            let bias = random_vec(cout, 3, 1.0);
            let got = cpu::conv3x3(&x, b, cin, h, w, &wt, cout, Some(&bias));
            let (want, _, _) =
                conv2d::cpu::conv2d(&x, b, cin, h, w, &wt, cout, 3, 3, Some(&bias), ConvSpec::same(1, 1));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{b}x{cin}x{h}x{w}->{cout}: {worst}");
        }
    }
}
