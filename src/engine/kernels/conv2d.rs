//! 2-D convolution (`shaders/conv2d.wgsl`) as a product with the weights as A, by one of several
//! paths (`ConvPath`; each falls back to the next where it does not apply):
//!
//! - Winograd's F(4×4, 3×3) (`kernels::winograd`) for 3×3 stride-1 pad-1 convolutions, on devices
//!   tuned for it (`Tuning::winograd`) and images large enough for it to pay;
//! - implicit GEMM (`conv_ms_32x8`): the product reads the input directly, for stride-1
//!   convolutions with Cin % 4 == 0 and output widths that are multiples of 8, on devices with the
//!   subgroup tile;
//! - otherwise im2col into the matmul's operand texture (the input planes read through a texture
//!   when they fit its limits, else from the buffer), then the texture-fed matmul.
//!
//! In inference a group norm + swish in front of the convolution can be applied as the input is
//! read (`conv2d_after_norm_swish`, Winograd and implicit GEMM only), and a ResnetBlock's residual
//! added as the output is written (`conv2d_after_norm_swish_add`, on the Winograd path). Backward:
//! dX as the convolution of dY with the flipped weights where that is a convolution (stride 1,
//! "same" padding; strided ones as the convolution of the dilated dY on the channel-packed path or
//! on workgroup tiles), else by col2im gathering; dW on workgroup tiles where the device takes them
//! (`weight_gradient_workgroup`, `Tuning::conv_workgroup`: any shape, no im2col), else by one
//! product over the output pixels that reads the input directly (`weight_gradient_direct`:
//! subgroup tile, Wo % 4 == 0), else from a transposed im2col texture.
//!
//! # Training's convolutions over the channel-packed input
//!
//! The implicit GEMM's shifted planes hold four overlapping copies of the input (eight texture
//! stores per invocation), 61 ms of a 0.45 s demo VQGAN training step. `conv2d_channel_packed`
//! packs the input once with four channels per texel (`channel_pack`, as the weight gradient
//! does) and runs one product per piece of images with the output pixels as rows and the output
//! channels as columns (`convt_ms_32x8`): the A texel of a pixel and a K step (one tap, four
//! channels) is one fetch, the weights are B (`weights_by_tap_t`, flipped for input gradients),
//! and C is stored transposed, four pixels of a channel per store. Any kernel, stride and padding
//! with Cin % 4 == 0 and Ho·Wo % 4 == 0. Training takes it where Winograd does not pay
//! (`Tuning::conv_channel_packed`, `ConvPath::ChannelPacked`): demo step 0.49–0.54 → 0.43–0.44 s
//! in alternating runs. Inference keeps implicit GEMM (256² forward: 6.1 s with it, 5.4 without).
//!
//! # The weight gradient without im2col
//!
//! Profiling a demo VQGAN training step (`TAMING_PROFILE=1 taming train-vqgan`, 32² batch 8) put
//! `im2col_t` at 20% of the dispatch time: it wrote kh·kw values per input value, each from a
//! per-lane buffer load after five integer divisions. `weight_gradient_direct` packs the input
//! once, four channels per texel (`channel_pack`, 0.32 ms against im2col_t's 1.4 ms median on the
//! same layers), and `dw_ms_32x8_v4` walks the pixels as K with the output gradient as A, where
//! it lies; K is split into slices (summed by `dw_from_slices`) so a 32-channel layer still makes
//! enough workgroups. Demo step, 24 steps each, same build: 0.80 s → 0.65 s
//! (`TAMING_CONV_DW_DIRECT=0` for the old path).
//!
//! # Design notes
//!
//! Measured on lavapipe (llvmpipe, Mesa 22.3.6, a 2-core VM).
//!
//! - **Paths**: on CPU devices, 3×3 stride-1 convolutions of images with at least 64 4×4
//!   tiles (32×32 and up) go through Winograd (`kernels::winograd`); other stride-1 convolutions
//!   with Cin % 4 == 0 and output widths that are multiples of 8 read the input directly (implicit
//!   GEMM, below); otherwise im2col written straight into the matmul's B texture (the input planes
//!   first go to an r32float texture so the 9× more tap reads are texture fetches), then the same
//!   product. `ConvPath` names the paths; the tests run every one against the CPU reference.
//! - **Flat textures** (`kernels::copy::flat_texture`): im2col's input planes come from a
//!   `copy_buffer_to_texture` copy (replacing a per-element pack kernel, 26–30 ms per VQGAN
//!   downsample input), and the implicit GEMM's weights are read from one while they are reordered
//!   to (tap, channel) in one pass (512×512×3×3: 23–25 → 16–18 ms); see `kernels::copy`.
//! - **Group norm + swish inside the convolution's input pack** (inference): every VQGAN norm feeds a
//!   3×3 convolution, so where that convolution reads its input directly, `shifted_pack` normalises
//!   each value as the norm would (same formula and order, so the same numbers) from the norm's
//!   statistics, and the norm's output pass is skipped (`models::vqgan::norm_swish_conv`; training
//!   keeps the separate ops). `bench vqgan`, paired runs: 26.8/28.3 → 25.3/26.7 s. Tried and
//!   dropped: adding the ResnetBlock's residual in the product's epilogue (beta = 1 after a copy):
//!   no measurable gain, since the epilogue's read of C runs lane by lane.
//! - Tried and dropped in `shifted_pack`: vec4 loads (slower: its eight texture stores dominate) and
//!   staging it through a buffer plus copy (within noise).
//!
//! # Convolutions without im2col
//!
//! Profiling `bench vqgan` showed im2col taking 30% of the time,
//! two thirds of the product's own: it wrote 9× the input through four single-float fetches per
//! texel. On devices with the subgroup tile, stride-1 convolutions with Cin % 4 == 0 and an output
//! width that is a multiple of 8 (all of the VQGAN's 3×3 convolutions but the first) now read the
//! input directly (`conv_ms_32x8`, implicit GEMM): `shifted_pack` writes the zero-padded input as
//! texels holding four horizontal neighbours (`P[c, y, x..x+3]`), so the B texel of four output
//! pixels and one tap is one fetch (texel ox + kx of row oy + ky), and K runs over taps then
//! channels (the weights are reordered to match) so the loop needs no division. A row's texels are
//! stored by x mod 4, so the 16 texels a subgroup fetches together are 256 contiguous bytes rather
//! than 16 bytes of 16 cache lines (7 runs: median 15.1 GFLOP/s against ~14.4 before). Other shapes
//! and devices keep im2col. `bench vqgan`: 47.4–49.7 → 40.3 s, then 22.9–28.3 s with the vec4
//! norms, the fused norm + swish, the copy-packed weights, the x mod 4 texel order, the vec4 weight
//! reorder and vec4 residual adds and upsampling. Profiled on 2026-11-30, the convolution products
//! were 61% at ~22 GFLOP/s, close to what llvmpipe's unfused multiply-adds allow (a pure
//! multiply-add loop compiled by it reaches 22 GFLOP/s on this VM), so the ≤ 4× target (13.2 s)
//! took 4× fewer multiply-adds (Winograd) and cheaper stores: 10.7–11.3 s. What is left, per
//! forward: the Winograd products ~5.6 s, its input pass ~1.8 s (bound by its 36 texture stores per
//! invocation), its output pass ~1.0 s, the 16×16 layers' implicit GEMM ~1.2 s, the norm
//! statistics ~0.6 s, the downsampling im2col ~0.35 s. (The day's `bench vqgan` steps are in the
//! `models::vqgan` module docs.)
//!
//! # Measurements: conv 3×3 128→128 on 1×128×64×64 (`bench kernels`)
//!
//! On lavapipe (llvmpipe, Mesa 22.3.6, 2 cores), target ≥ 15 GFLOP/s; Burn on the same machine:
//! 4.1 GFLOP/s.
//!
//! - 2026-11-30: implicit GEMM 17.3–19.7 GFLOP/s over 4 runs (61–70 ms; 9.1–18.0 before the
//!   four-column stores); Winograd 33.6–40.0 GFLOP/s of the direct convolution over 7 runs
//!   (30.2–36.0 ms; its parts in `kernels::winograd`). Target met by both.

use anyhow::{bail, Result};

use super::elementwise;
use super::matmul::{self, Bias, Gemm, Operand, Out};
use super::{copy, winograd};
use super::{expect_rank, u32_of};
use crate::engine::device::{Binding, Res};
use crate::engine::pool::PooledTexture;
use crate::engine::tensor::{DType, Tensor};

/// Stride and per-side zero padding (top, left, bottom, right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub stride: usize,
    pub pad: [usize; 4],
}

impl ConvSpec {
    pub fn same(stride: usize, pad: usize) -> Self {
        ConvSpec { stride, pad: [pad; 4] }
    }
    /// The reference's Downsample: pad right and bottom by one, 3x3 stride 2.
    pub fn downsample() -> Self {
        ConvSpec { stride: 2, pad: [0, 0, 1, 1] }
    }
    pub fn out_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let hp = h + self.pad[0] + self.pad[2];
        let wp = w + self.pad[1] + self.pad[3];
        if hp < kh || wp < kw || self.stride == 0 {
            return None;
        }
        Some(((hp - kh) / self.stride + 1, (wp - kw) / self.stride + 1))
    }
}

/// What the conv2d.wgsl kernels need to locate a tap.
struct Geometry {
    cin: usize,
    h: usize,
    w: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    spec: ConvSpec,
}

crate::kernel_params!(
    /// `shaders/conv2d.wgsl`'s `Params`.
    ConvParams in "conv2d" as "Params" {
        cin: u32, h: u32, w: u32, wo: u32,
        kh: u32, kw: u32, stride: u32, pad_t: u32,
        pad_l: u32, k: u32, n: u32, n0: u32,
        b0: u32, norm: u32, group_size: u32, image_pixels: u32,
        piece: u32, out_rows: u32, cout: u32, images: u32,
        z0: u32, x_first: u32, out_first: u32, flip: u32,
        has_bias: u32, dilation: u32, c0: u32, channels: u32,
        pack_ld: u32, pack_rows: u32, slice_ld: u32, dbias_col: u32,
    }
);

impl Geometry {
    /// The convolution's shape; pixels up to `n` from pixel `n0` of image `b0`.
    fn params(&self, n: usize, n0: usize, b0: usize) -> Result<ConvParams> {
        let s = &self.spec;
        Ok(ConvParams {
            cin: u32_of("channels", self.cin)?,
            h: u32_of("height", self.h)?,
            w: u32_of("width", self.w)?,
            wo: u32_of("output width", self.wo)?,
            kh: self.kh as u32,
            kw: self.kw as u32,
            stride: s.stride as u32,
            pad_t: s.pad[0] as u32,
            pad_l: s.pad[1] as u32,
            k: u32_of("K", self.cin * self.kh * self.kw)?,
            n: u32_of("pixels", n)?,
            n0: u32_of("pixel offset", n0)?,
            b0: u32_of("image", b0)?,
            ..Default::default()
        })
    }
}

/// Which algorithm a convolution takes (`conv2d_with`): each falls back to
/// the next where it does not apply, and tests compare them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// Winograd F(4x4, 3x3) for 3x3 stride-1 convolutions on devices tuned
    /// for it where it pays (`winograd::pays_off`), else implicit GEMM.
    Best,
    /// Winograd wherever it applies, else implicit GEMM.
    Winograd,
    /// Implicit GEMM (`conv_ms_32x8`) where the device's tile and the shape allow, else im2col.
    Implicit,
    /// Implicit GEMM on workgroup tiles (`conv_wg`, GPU-shaped) where it applies, else as Best.
    Workgroup,
    /// As Best, with the output pixels as the product's rows over the channel-packed input
    /// (`convt_ms_32x8`) before implicit GEMM where it applies (training's choice).
    ChannelPacked,
    /// im2col, the input planes read through a texture when they fit its limits.
    Im2colTexture,
    /// im2col reading the input buffer.
    Im2colBuffer,
}

/// x [B, Cin, H, W] ⊛ weight [Cout, Cin, kh, kw] (+ bias [Cout]) -> [B, Cout, Ho, Wo].
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Result<Tensor> {
    conv2d_with(x, weight, bias, spec, ConvPath::Best)
}

/// `conv2d_with(..) + residual` (the output's shape; a ResnetBlock's x + conv2(h) in training):
/// the residual is added as the output is written where the path takes the convolution
/// (Winograd's output pass, the channel-packed product's store), else by an add afterwards.
/// Where `keep` is given and the channel-packed path packs the input in one piece, its planes are
/// kept there (`SavedPlanes`, for the weight gradient).
pub fn conv2d_add_with(
    x: &Tensor,
    weight: &Tensor,
    bias_t: Option<&Tensor>,
    spec: ConvSpec,
    path: ConvPath,
    residual: &Tensor,
    mut keep: Option<&mut Option<SavedPlanes>>,
) -> Result<Tensor> {
    let out = new_output(x, weight, bias_t, spec)?;
    residual.expect_shape("conv2d residual", out.shape())?;
    let gpu = &x.gpu;
    let one_by_one = weight.dim(2) == 1 && weight.dim(3) == 1 && spec == ConvSpec::same(1, 0);
    if !one_by_one && winograd_takes(x, weight, spec, path) {
        winograd_forward(x, weight, bias_t, Some(residual), spec, &out, keep)?;
        return Ok(out);
    }
    let plain = winograd::Weights { t: weight, flipped: false };
    if !one_by_one
        && path == ConvPath::ChannelPacked
        && !gpu.tuning.conv_workgroup
        && conv2d_channel_packed(x, plain, bias_t, spec, 1, &out, Some(residual), keep.as_deref_mut(), None)?
    {
        return Ok(out);
    }
    drop(out);
    super::elementwise::add(residual, &conv2d_saving(x, weight, bias_t, spec, path, keep)?)
}

/// Winograd's convolution; where `keep` is given (training), keeping the input gradient's
/// transformed weights where the forward makes them in the same pass (a square convolution:
/// `winograd::conv3x3_keeping_flipped`), so the backward transforms none.
fn winograd_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    spec: ConvSpec,
    out: &Tensor,
    keep: Option<&mut Option<SavedPlanes>>,
) -> Result<()> {
    let Some(slot) = keep else { return winograd::conv3x3(x, None, weight, bias, residual, out) };
    let mut kept = None;
    winograd::conv3x3_keeping_flipped(x, weight, bias, residual, out, &mut kept)?;
    if kept.is_some() {
        let shape = x.shape().to_vec();
        *slot = Some(SavedPlanes { planes: None, shape, pad: spec.pad, flipped_weights: None, winograd_flipped: kept });
    }
    Ok(())
}

/// `conv2d` by the given path (or the ones it falls back to).
pub fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    bias_t: Option<&Tensor>,
    spec: ConvSpec,
    path: ConvPath,
) -> Result<Tensor> {
    conv2d_saving(x, weight, bias_t, spec, path, None)
}

/// `conv2d_with`, keeping the input's channel-packed planes in `keep` where the channel-packed
/// path made them in one piece (`SavedPlanes`, for the weight gradient).
pub fn conv2d_saving(
    x: &Tensor,
    weight: &Tensor,
    bias_t: Option<&Tensor>,
    spec: ConvSpec,
    path: ConvPath,
    keep: Option<&mut Option<SavedPlanes>>,
) -> Result<Tensor> {
    let out = new_output(x, weight, bias_t, spec)?;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, _, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let (ho, wo) = (out.dim(2), out.dim(3));
    let gpu = x.gpu.clone();
    let k = cin * kh * kw;
    let n = ho * wo;
    let wop = Operand::rows(weight, 0, k, 0, false);
    let bias = bias_t.map_or(Bias::None, |t| Bias::Row(t, 0));
    // 1x1 stride-1 convolutions are plain products with the input as B.
    if kh == 1 && kw == 1 && spec == ConvSpec::same(1, 0) {
        let g = Gemm { m: cout, n, k, batch: b, alpha: 1.0, beta: 0.0 };
        let xop = Operand::rows(x, 0, n, cin * n, false);
        matmul::gemm(g, wop, xop, Out { t: &out, off: 0, ld: n, bs: cout * n }, bias)?;
        return Ok(out);
    }
    if winograd_takes(x, weight, spec, path) {
        winograd_forward(x, weight, bias_t, None, spec, &out, keep)?;
        return Ok(out);
    }
    let by_workgroups = path == ConvPath::Workgroup
        || (gpu.tuning.conv_workgroup && matches!(path, ConvPath::Best | ConvPath::ChannelPacked));
    if by_workgroups && conv2d_workgroup(x, weight, bias_t, spec, 1, &out)? {
        return Ok(out);
    }
    let plain = winograd::Weights { t: weight, flipped: false };
    if path == ConvPath::ChannelPacked && conv2d_channel_packed(x, plain, bias_t, spec, 1, &out, None, keep, None)? {
        return Ok(out);
    }
    if matches!(
        path,
        ConvPath::Best | ConvPath::Winograd | ConvPath::Implicit | ConvPath::ChannelPacked | ConvPath::Workgroup
    ) && conv2d_implicit(x, None, plain, bias, spec, &out)?
    {
        return Ok(out);
    }
    let planes_texture = path != ConvPath::Im2colBuffer;
    let t = &gpu.tuning;
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    if k.div_ceil(4) * 4 > max_dim {
        bail!("conv2d: {cin} channels x {kh}x{kw} taps exceed the device's texture height {max_dim}");
    }
    let tn = t.mm_tn as usize;
    let kp = k.div_ceil(4) * 4;
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    // Input planes go through a flat r32float texture (a memcpy) when they fit its limits.
    let flat_images = copy::FLAT_LAYER * max_layers / (cin * h * w).max(1);
    let via_texture = planes_texture && flat_images >= 1;
    // Pieces of whole tiles of output pixels, and of images, within the budget and limits.
    let n_piece = (gpu.tuning.im2col_budget / (kp * 4)).min(4 * max_dim).max(tn) / tn * tn;
    let n_piece = n_piece.min(n.div_ceil(tn) * tn);
    let mut b_piece = (gpu.tuning.im2col_budget / (kp * 4 * n_piece)).clamp(1, max_layers).min(b);
    if via_texture {
        b_piece = b_piece.min(flat_images);
    } else {
        // Reading the buffer: a run of images that fits one binding.
        let image_bytes = (cin * h * w * 4) as u64;
        if image_bytes + 256 > gpu.max_binding() {
            bail!(
                "conv2d: one {cin}x{h}x{w} input image is larger than a storage binding ({} bytes) on the im2col path",
                gpu.max_binding()
            );
        }
        // (Less 256 bytes: the window starts on the aligned element at or before its first.)
        b_piece = b_piece.min(((gpu.max_binding() - 256) / image_bytes) as usize).max(1);
    }
    let ((aw, ah), _) = matmul::tex_extents(&gpu, cout, n_piece, k);
    let ta = matmul::pack_operand(&gpu, &wop, 1, cout, k, aw, ah, matmul::Stale::Rows)?;
    let entry = if via_texture { "im2col_tex" } else { "im2col" };
    let pipe = gpu.pipeline("conv2d", entry, &[])?;
    for b0 in (0..b).step_by(b_piece) {
        let nb = b_piece.min(b - b0);
        let mut params = Geometry { cin, h, w, wo, kh, kw, spec }.params(n, 0, b0)?;
        let (x_window, x_first) = super::aligned_window(x, b0 * cin * h * w, nb * cin * h * w);
        params.x_first = u32_of("element", x_first)?;
        let planes = if via_texture { Some(copy::flat_texture(x, b0 * cin * h * w, nb * cin * h * w)?) } else { None };
        for n0 in (0..n).step_by(n_piece) {
            let np = n_piece.min(n - n0);
            let (_, (bw, bh)) = matmul::tex_extents(&gpu, cout, np, k);
            let tb = gpu.texture(bw as u32, bh as u32, nb as u32)?;
            params.n0 = u32_of("pixel offset", n0)?;
            let src = match &planes {
                Some(tex) => Res::Tex(&tex.view),
                None => Res::Buf(x_window),
            };
            gpu.dispatch_res(
                &pipe,
                &params,
                &[src, Res::Tex(&tb.view)],
                [bw.div_ceil(8) as u32, bh.div_ceil(8) as u32, nb as u32],
            )?;
            let g = Gemm { m: cout, n: np, k, batch: nb, alpha: 1.0, beta: 0.0 };
            let c = Out { t: &out, off: b0 * cout * n + n0, ld: n, bs: cout * n };
            matmul::product(&gpu, &g, &ta, true, &tb, false, &c, bias)?;
        }
    }
    Ok(out)
}

/// `conv2d` as one implicit GEMM on workgroup tiles (`conv_wg`): the weights packed as the
/// product's A, the patches gathered from the input inside the kernel. Whole tensors in one
/// binding each (else false: the caller takes another path).
fn conv2d_workgroup(
    x: &Tensor,
    weight: &Tensor,
    bias_t: Option<&Tensor>,
    spec: ConvSpec,
    dilation: usize,
    out: &Tensor,
) -> Result<bool> {
    let gpu = &x.gpu;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, _, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let (ho, wo) = (out.dim(2), out.dim(3));
    let (k, n) = (cin * kh * kw, ho * wo);
    let fits = |t: &Tensor| t.byte_len() <= gpu.max_binding();
    let max_groups = gpu.limits.max_compute_workgroups_per_dimension as usize;
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    if !fits(x) || !fits(out) || n.div_ceil(64) > max_groups || b > max_groups || k.div_ceil(4) > max_dim {
        return Ok(false);
    }
    let wop = Operand::rows(weight, 0, k, 0, false);
    let ((aw, ah), _) = matmul::tex_extents(gpu, cout, n, k);
    if ah > max_dim {
        return Ok(false);
    }
    let ta = matmul::pack_operand(gpu, &wop, 1, cout, k, aw, ah, matmul::Stale::Rows)?;
    let mut params = Geometry { cin, h, w, wo, kh, kw, spec }.params(n, 0, 0)?;
    params.cout = u32_of("output channels", cout)?;
    params.has_bias = bias_t.is_some() as u32;
    params.dilation = dilation as u32;
    let pipe = gpu.pipeline("conv2d", "conv_wg", &[])?;
    let bias = matmul::bias_or_dummy(gpu, bias_t);
    gpu.dispatch_res(
        &pipe,
        &params,
        &[Res::Buf(x.binding()), Res::Tex(&ta.view), Res::Buf(out.binding()), Res::Buf(bias)],
        [n.div_ceil(64) as u32, cout.div_ceil(64) as u32, b as u32],
    )?;
    Ok(true)
}

/// The weight gradient [Cout, Cin, kh, kw] as one implicit GEMM on workgroup tiles (`dw_wg`):
/// dY and the patches gathered from the input inside the kernel, the batch's pixels split so that
/// small layers still make enough workgroups, the splits' partial sums added by `sum_dim`. Whole
/// tensors in one binding each (else None: the caller takes another path).
fn weight_gradient_workgroup(
    x: &Tensor,
    dy: &Tensor,
    spec: ConvSpec,
    (kh, kw): (usize, usize),
) -> Result<Option<Tensor>> {
    let gpu = &x.gpu;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, ho, wo) = (dy.dim(1), dy.dim(2), dy.dim(3));
    let (k, n) = (cin * kh * kw, ho * wo);
    let fits = |bytes: u64| bytes <= gpu.max_binding();
    let max_groups = gpu.limits.max_compute_workgroups_per_dimension as usize;
    let tiles = k.div_ceil(64) * cout.div_ceil(64);
    if !fits(x.byte_len()) || !fits(dy.byte_len()) || k.div_ceil(64) > max_groups || cout.div_ceil(64) > max_groups {
        return Ok(None);
    }
    // Splits of the pixels: about 256 workgroups in all (a guess for GPUs; the check runs it
    // everywhere), each split at least 256 pixels, the partial sums within one binding.
    let total = b * n;
    let per_split_bytes = (cout * k * 4) as u64;
    let splits = 256usize
        .div_ceil(tiles)
        .min(total.div_ceil(256))
        .min((gpu.max_binding() / per_split_bytes.max(1)) as usize)
        .min(max_groups)
        .max(1);
    if !fits(per_split_bytes) {
        return Ok(None);
    }
    let piece = total.div_ceil(splits).div_ceil(16) * 16;
    let splits = total.div_ceil(piece);
    // Each invocation walks its split's pixels 16 at a time (29 loop iterations a step): past the
    // device's loop limit (lavapipe: a 3x3 256-channel layer at 512² with batch 5) the other path.
    if !super::loops_fit(&x.gpu, 29 * piece.div_ceil(16) + 20)? {
        return Ok(None);
    }
    let mut params = Geometry { cin, h, w, wo, kh, kw, spec }.params(n, 0, 0)?;
    params.cout = u32_of("output channels", cout)?;
    params.image_pixels = u32_of("pixels", n)?;
    params.images = u32_of("images", b)?;
    params.piece = u32_of("pixels per split", piece)?;
    let partial = Tensor::empty(gpu, &[splits, cout * k], DType::F32)?;
    let pipe = gpu.pipeline("conv2d", "dw_wg", &[])?;
    gpu.dispatch(
        &pipe,
        &params,
        &[x.binding(), dy.binding(), partial.binding()],
        [k.div_ceil(64) as u32, cout.div_ceil(64) as u32, splits as u32],
    )?;
    let dw = if splits == 1 { partial } else { super::reduce::sum_dim(&partial, 0)? };
    Ok(Some(dw.reshape(&[cout, cin, kh, kw])?))
}

/// The group norm + swish a convolution's input goes through first, given by
/// the norm's statistics (`norm::statistics`): (mean, 1/std) per (image, group).
pub struct NormSwish<'a> {
    pub stats: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub groups: usize,
}

/// `conv2d(swish(group_norm(x)), ..)` with the norm applied while the input is
/// packed, which saves the norm's output pass (inference). Only where
/// `fuses_norm_swish` says so (the Winograd and implicit-GEMM paths); an error elsewhere.
pub fn conv2d_after_norm_swish(
    x: &Tensor,
    pre: &NormSwish,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
) -> Result<Tensor> {
    conv2d_after_norm_swish_with(x, pre, weight, bias, spec, ConvPath::Best)
}

/// Whether `path` sends this convolution to Winograd.
fn winograd_takes(x: &Tensor, weight: &Tensor, spec: ConvSpec, path: ConvPath) -> bool {
    match path {
        ConvPath::Best | ConvPath::ChannelPacked => winograd::applies(x, weight, spec) && winograd::pays_off(x),
        ConvPath::Winograd => winograd::applies(x, weight, spec),
        _ => false,
    }
}

/// `conv2d_after_norm_swish` by the given path (Best, Winograd or Implicit).
pub fn conv2d_after_norm_swish_with(
    x: &Tensor,
    pre: &NormSwish,
    weight: &Tensor,
    bias_t: Option<&Tensor>,
    spec: ConvSpec,
    path: ConvPath,
) -> Result<Tensor> {
    after_norm_swish(x, pre, weight, bias_t, spec, path, None)
}

/// `conv2d_after_norm_swish(..) + residual` (a ResnetBlock's x + h): on the
/// Winograd path the residual is added as the output is written.
pub fn conv2d_after_norm_swish_add(
    x: &Tensor,
    pre: &NormSwish,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    residual: &Tensor,
) -> Result<Tensor> {
    after_norm_swish(x, pre, weight, bias, spec, ConvPath::Best, Some(residual))
}

/// `conv2d_after_norm_swish_add` that writes x + h into the residual's own storage where the
/// Winograd path takes the convolution and nothing else holds the residual (in inference, a
/// ResnetBlock's input, which nothing reads afterwards): one tensor less at the peak (a 512²
/// decode's full-resolution ResnetBlocks held input, hidden and output planes of 128 MiB each).
/// Elsewhere a new output, as `conv2d_after_norm_swish_add`.
pub fn conv2d_after_norm_swish_add_into(
    x: &Tensor,
    pre: &NormSwish,
    weight: &Tensor,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    residual: Tensor,
) -> Result<Tensor> {
    let fits = output_shape(x, weight, bias, spec)?[..] == *residual.shape() && residual.dtype() == DType::F32;
    if fits && residual.is_sole_owner() && winograd_takes(x, weight, spec, ConvPath::Best) {
        check_norm(x, pre)?;
        winograd::conv3x3(x, Some(pre), weight, bias, Some(&residual), &residual)?;
        return Ok(residual);
    }
    conv2d_after_norm_swish_add(x, pre, weight, bias, spec, &residual)
}

/// That the norm's parameters and statistics fit x.
fn check_norm(x: &Tensor, pre: &NormSwish) -> Result<()> {
    let cin = x.dim(1);
    if pre.groups == 0
        || !cin.is_multiple_of(pre.groups)
        || pre.gamma.numel() != cin
        || pre.beta.numel() != cin
        || pre.stats.numel() != 2 * x.dim(0) * pre.groups
    {
        bail!(
            "conv2d: a norm of {} groups (weight {:?}, bias {:?}, statistics {:?}) does not fit the input {:?}",
            pre.groups,
            pre.gamma.shape(),
            pre.beta.shape(),
            pre.stats.shape(),
            x.shape()
        );
    }
    Ok(())
}

fn after_norm_swish(
    x: &Tensor,
    pre: &NormSwish,
    weight: &Tensor,
    bias_t: Option<&Tensor>,
    spec: ConvSpec,
    path: ConvPath,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let out = new_output(x, weight, bias_t, spec)?;
    check_norm(x, pre)?;
    if winograd_takes(x, weight, spec, path) {
        winograd::conv3x3(x, Some(pre), weight, bias_t, residual, &out)?;
        return Ok(out);
    }
    let bias = bias_t.map_or(Bias::None, |t| Bias::Row(t, 0));
    if !matches!(path, ConvPath::Best | ConvPath::Winograd | ConvPath::Implicit)
        || !conv2d_implicit(x, Some(pre), winograd::Weights { t: weight, flipped: false }, bias, spec, &out)?
    {
        bail!(
            "conv2d: a {:?} input and a {:?} weight need im2col, which does not apply a norm",
            x.shape(),
            weight.shape()
        );
    }
    match residual {
        Some(r) => elementwise::add(r, &out),
        None => Ok(out),
    }
}

/// Images per piece of the implicit-GEMM convolution, or None where the
/// device's tile or the shape needs im2col (no subgroup tile, stride 2,
/// Cin % 4 != 0, an output width that is not a multiple of the tile's
/// columns, texture limits).
fn implicit_pieces(x: &Tensor, weight: &Tensor, spec: ConvSpec, wo: usize) -> Option<usize> {
    let gpu = &x.gpu;
    let (_, tn) = matmul::conv_tile(gpu)?;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (hp, wp) = (h + spec.pad[0] + spec.pad[2], w + spec.pad[1] + spec.pad[3]);
    let (k, max_dim) = (cin * weight.dim(2) * weight.dim(3), gpu.limits.max_texture_dimension_2d as usize);
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    // The shifted planes: 4 floats per padded input position, each row's
    // texels in 4 equal slices by x mod 4 (see shaders/conv2d.wgsl).
    let planes_w = 4 * wp.div_ceil(4);
    let image_bytes = cin * hp * planes_w * 16;
    let budget = 4 * gpu.tuning.im2col_budget;
    if spec.stride != 1
        || cin % 4 != 0
        || !wo.is_multiple_of(tn)
        || hp > max_dim
        || planes_w > max_dim
        || k / 4 > max_dim
        || cin > max_layers
        || image_bytes > budget
    {
        return None;
    }
    Some((budget / image_bytes).clamp(1, max_layers / cin).min(b))
}

/// Whether the implicit-GEMM path takes these operands on this device.
pub fn takes_implicit(x: &Tensor, weight: &Tensor, spec: ConvSpec) -> bool {
    x.rank() == 4
        && weight.rank() == 4
        && weight.dim(1) == x.dim(1)
        && spec
            .out_size(x.dim(2), x.dim(3), weight.dim(2), weight.dim(3))
            .is_some_and(|(_, wo)| implicit_pieces(x, weight, spec, wo).is_some())
}

/// Whether `conv2d_after_norm_swish` takes these operands (the Winograd and implicit-GEMM paths do).
pub fn fuses_norm_swish(x: &Tensor, weight: &Tensor, spec: ConvSpec) -> bool {
    x.rank() == 4
        && weight.rank() == 4
        && weight.dim(1) == x.dim(1)
        && (winograd_takes(x, weight, spec, ConvPath::Best) || takes_implicit(x, weight, spec))
}

/// Checks a convolution's operands and allocates its output [B, Cout, Ho, Wo].
fn new_output(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Result<Tensor> {
    Tensor::empty(&x.gpu, &output_shape(x, weight, bias, spec)?, DType::F32)
}

/// The output shape [B, Cout, Ho, Wo] of a convolution, checking its operands.
fn output_shape(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, spec: ConvSpec) -> Result<[usize; 4]> {
    expect_rank("conv2d input", x, 4)?;
    expect_rank("conv2d weight", weight, 4)?;
    x.expect_dtype("conv2d input", DType::F32)?;
    weight.expect_dtype("conv2d weight", DType::F32)?;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, wcin, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    if wcin != cin {
        bail!("conv2d: input has {cin} channels but the weight {:?} expects {wcin}", weight.shape());
    }
    if let Some(bias) = bias {
        if bias.shape() != [cout] {
            bail!("conv2d: bias has shape {:?}, expected [{cout}]", bias.shape());
        }
    }
    let (ho, wo) = spec
        .out_size(h, w, kh, kw)
        .ok_or_else(|| anyhow::anyhow!("conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input with {spec:?}"))?;
    Ok([b, cout, ho, wo])
}

/// A stride-1 convolution as one product that reads the input directly
/// (`conv_ms_32x8`, implicit GEMM): no im2col copy, which on lavapipe took
/// as long as the product. Returns false, doing nothing, where the device's
/// tile or the shape needs the im2col path (Cin % 4 != 0, an output width
/// that is not a multiple of the tile's 8 columns, stride 2, limits).
fn conv2d_implicit(
    x: &Tensor,
    pre: Option<&NormSwish>,
    weights: winograd::Weights,
    bias: Bias,
    spec: ConvSpec,
    out: &Tensor,
) -> Result<bool> {
    let weight = weights.t;
    let gpu = &x.gpu;
    let wo = out.dim(3);
    let Some(b_piece) = implicit_pieces(x, weight, spec, wo) else { return Ok(false) };
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, _, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let (hp, wp) = (h + spec.pad[0] + spec.pad[2], w + spec.pad[1] + spec.pad[3]);
    let (taps, k) = (kh * kw, cin * kh * kw);
    let planes_w = 4 * wp.div_ceil(4);
    let n = out.dim(2) * wo;
    // Weights with K ordered (tap, channel), as the kernel walks it.
    let ((aw, ah), _) = matmul::tex_extents(gpu, cout, n, k);
    let ta = gpu.texture(aw as u32, ah as u32, 1)?;
    let flat_weights = copy::flat_texture(weight, 0, weight.numel())?;
    // conv2d.wgsl's parameters: channels, taps, K, and Cout in place of the pixel count.
    let geometry = Geometry { cin, h, w, wo, kh, kw, spec };
    let by_tap = ConvParams {
        cout: u32_of("output channels", cout)?,
        flip: weights.flipped as u32,
        ..geometry.params(0, 0, 0)?
    };
    let pipe = gpu.pipeline("conv2d", "weights_by_tap", &[])?;
    gpu.dispatch_res(
        &pipe,
        &by_tap,
        &[Res::Tex(&flat_weights.view), Res::Tex(&ta.view)],
        [aw.div_ceil(8) as u32, ah.div_ceil(8) as u32, 1],
    )?;
    let dummy = || Binding { buffer: &gpu.dummy, offset: 0, size: 16 };
    let (stats, gamma, beta) = match pre {
        Some(n) => (n.stats.binding(), n.gamma.binding(), n.beta.binding()),
        None => (dummy(), dummy(), dummy()),
    };
    // shifted_pack applies the norm where its flag is set.
    let (norm, group_size) = pre.map_or((0, 1), |n| (1, (cin / n.groups) as u32));
    for b0 in (0..b).step_by(b_piece) {
        let nb = b_piece.min(b - b0);
        let planes = gpu.texture(planes_w as u32, hp as u32, (nb * cin) as u32)?;
        // Through a buffer copied into the texture where the tuning says so (and it fits one binding).
        let staged = copy::TexelStaging::new(gpu, [planes_w, hp, nb * cin])?;
        let pack = match staged {
            Some(_) => gpu.pipeline("conv2d", "shifted_pack_buf", &[])?,
            None => gpu.pipeline("conv2d", "shifted_pack", &[])?,
        };
        // The input a run of planes at a time where it is larger than one binding.
        for (z0, count) in super::plane_runs(gpu, nb * cin, &[h * w], 1)? {
            let (x_window, x_first) = super::aligned_window(x, (b0 * cin + z0) * h * w, count * h * w);
            let params = ConvParams {
                norm,
                group_size,
                z0: z0 as u32,
                x_first: u32_of("element", x_first)?,
                ..geometry.params(n, 0, b0)?
            };
            let Some(staged) = &staged else {
                let resources =
                    [Res::Buf(x_window), Res::Tex(&planes.view), Res::Buf(stats), Res::Buf(gamma), Res::Buf(beta)];
                let grid = [wp.div_ceil(64) as u32, hp.div_ceil(8) as u32, count as u32];
                gpu.dispatch_res(&pack, &params, &resources, grid)?;
                continue;
            };
            // shifted_pack_buf: one invocation per 8 texels of each row (p.n of them), numbered flat.
            let invocations = wp.div_ceil(8) * hp * count;
            let params = ConvParams {
                n: u32_of("invocations", invocations)?,
                pack_ld: staged.row_texels as u32,
                pack_rows: hp as u32,
                ..params
            };
            let resources =
                [Res::Buf(x_window), Res::Buf(staged.binding()), Res::Buf(stats), Res::Buf(gamma), Res::Buf(beta)];
            gpu.dispatch_res(&pack, &params, &resources, super::grid_for(gpu, invocations, 64)?)?;
        }
        if let Some(s) = &staged {
            s.fill(&planes);
        }
        let g = Gemm { m: cout, n, k, batch: nb, alpha: 1.0, beta: 0.0 };
        let c = Out { t: out, off: b0 * cout * n, ld: n, bs: cout * n };
        let walk = matmul::ConvWalk {
            cin4: u32_of("channels", cin / 4)?,
            kw: kw as u32,
            taps: taps as u32,
            wo: u32_of("output width", wo)?,
            ..Default::default()
        };
        matmul::conv_product(gpu, &g, &ta, &planes, &c, bias, walk)?;
    }
    Ok(true)
}

/// W [Cout, Cin, kh, kw] -> W' [Cin, Cout, kh, kw], each kernel turned by 180°: the weights
/// of the transposed convolution (`dx_by_convolution`).
pub fn flip_transpose_weights(weight: &Tensor) -> Result<Tensor> {
    expect_rank("weight", weight, 4)?;
    let (cout, cin, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let gpu = &weight.gpu;
    let out = Tensor::empty(gpu, &[cin, cout, kh, kw], DType::F32)?;
    let params = ConvParams {
        cin: u32_of("channels", cin)?,
        cout: u32_of("output channels", cout)?,
        kh: kh as u32,
        kw: kw as u32,
        ..Default::default()
    };
    if weight.byte_len() <= gpu.max_binding() {
        let pipe = gpu.pipeline("conv2d", "flip_transpose_weights", &[])?;
        gpu.dispatch(&pipe, &params, &[weight.binding(), out.binding()], super::grid_for(gpu, out.numel(), 64)?)?;
        return Ok(out);
    }
    // W through a flat texture, W' by runs of input channels.
    let flat = copy::flat_texture(weight, 0, weight.numel())?;
    let pipe = gpu.pipeline("conv2d", "flip_transpose_weights_tex", &[])?;
    let per_channel = cout * kh * kw;
    for run @ (c0, channels) in super::plane_runs(gpu, cin, &[per_channel], 1)? {
        let p = ConvParams { c0: c0 as u32, channels: channels as u32, ..params };
        let bindings = [Res::Tex(&flat.view), Res::Buf(super::plane_window(&out, per_channel, run))];
        gpu.dispatch_res(&pipe, &p, &bindings, super::grid_for(gpu, channels * per_channel, 64)?)?;
    }
    Ok(out)
}

/// `conv2d(x, &flip_transpose_weights(weight), None, spec)`, where Winograd or the implicit GEMM
/// takes it without the flipped copy: their weight packs read W flipped and transposed
/// (`flip` in their parameters). Other paths take the copy.
fn conv2d_flipped(x: &Tensor, weight: &Tensor, spec: ConvSpec, saved: Option<&SavedPlanes>) -> Result<Tensor> {
    expect_rank("weight", weight, 4)?;
    let (cout, cin, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    // W's values under the flipped weight's shape, for the shape logic of the paths.
    let as_flipped = weight.reshape(&[cin, cout, kh, kw])?;
    let weights = winograd::Weights { t: &as_flipped, flipped: true };
    let out = new_output(x, &as_flipped, None, spec)?;
    if winograd_takes(x, &as_flipped, spec, ConvPath::Best) {
        match saved.and_then(|s| s.winograd_flipped.as_ref()) {
            Some(u) => winograd::conv3x3_flipped_given(x, weights, &out, u)?,
            None => {
                winograd::conv3x3_weights(x, None, weights, None, None, &out, winograd::piece_tiles(x, &as_flipped))?
            }
        }
        return Ok(out);
    }
    if kh == 1 && kw == 1 && spec == ConvSpec::same(1, 0) {
        dx_1x1_into(x, weight, &out, 0.0)?;
        return Ok(out);
    }
    let packed = saved.and_then(|s| s.flipped_weights.as_ref());
    if x.gpu.tuning.conv_channel_packed && conv2d_channel_packed(x, weights, None, spec, 1, &out, None, None, packed)? {
        return Ok(out);
    }
    if conv2d_implicit(x, None, weights, Bias::None, spec, &out)? {
        return Ok(out);
    }
    conv2d(x, &flip_transpose_weights(weight)?, None, spec)
}

/// dx of a 1x1 stride-1 convolution from dy [B, Cout, H, W] into `out` [B, Cin, H, W], plus
/// `beta` times out's values: a 1x1 convolution's flipped weight is Wᵀ, so the product reads W
/// transposed.
fn dx_1x1_into(dy: &Tensor, weight: &Tensor, out: &Tensor, beta: f32) -> Result<()> {
    let (cout, cin) = (weight.dim(0), weight.dim(1));
    let (b, n) = (dy.dim(0), dy.dim(2) * dy.dim(3));
    let g = Gemm { m: cin, n, k: cout, batch: b, alpha: 1.0, beta };
    let wop = Operand::rows(weight, 0, cin, 0, true);
    let dyop = Operand::rows(dy, 0, n, cout * n, false);
    matmul::gemm(g, wop, dyop, Out { t: out, off: 0, ld: n, bs: cin * n }, Bias::None)
}

/// `conv2d_backward` with dx added to `acc`, x's gradient summed so far (from the other ops that
/// read x: an AttnBlock's q, k and v read one normalised input), returned in its place: a 1x1
/// convolution's dx product adds into acc's storage (beta = 1) where nothing else holds it,
/// elsewhere the backward, then an add.
pub fn conv2d_backward_adding(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    spec: ConvSpec,
    acc: Tensor,
    saved: Option<&SavedPlanes>,
) -> Result<(Tensor, Tensor, Tensor)> {
    acc.expect_shape("conv2d backward: the input's gradient so far", x.shape())?;
    let (kh, kw) = (weight.dim(2), weight.dim(3));
    let by_convolution = x.gpu.tuning.conv_dx_transposed;
    if kh == 1 && kw == 1 && spec == ConvSpec::same(1, 0) && by_convolution && acc.is_sole_owner() {
        dy.expect_shape("conv2d output gradient", &[x.dim(0), weight.dim(0), x.dim(2), x.dim(3)])?;
        let (dw, db) = conv2d_weight_backward(x, weight, dy, spec, saved)?;
        dx_1x1_into(dy, weight, &acc, 1.0)?;
        return Ok((acc, dw, db));
    }
    let (dx, dw, db) = conv2d_backward(x, weight, dy, spec, saved)?;
    Ok((super::elementwise::add(&acc, &dx)?, dw, db))
}

/// Whether dx of this convolution is itself a convolution the forward paths compute: stride 1,
/// odd kernels, "same" padding on every side (the VQGAN's 3x3 and 1x1 convolutions).
pub fn dx_by_convolution(weight: &Tensor, spec: ConvSpec) -> bool {
    let (kh, kw) = (weight.dim(2), weight.dim(3));
    spec.stride == 1
        && kh % 2 == 1
        && kw % 2 == 1
        && spec.pad == [(kh - 1) / 2, (kw - 1) / 2, (kh - 1) / 2, (kw - 1) / 2]
}

/// Gradients of `conv2d`: (dx, dweight, dbias) from the input, weights and the output gradient
/// dy [B, Cout, Ho, Wo], by the paths the tuning takes (`conv2d_backward_with`), reusing the
/// forward's input planes where it `saved` them.
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    spec: ConvSpec,
    saved: Option<&SavedPlanes>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dx, dw, db) = conv2d_backward_with(x, weight, dy, spec, BackwardPaths::tuned(&x.gpu), saved)?;
    let dx = dx.ok_or_else(|| anyhow::anyhow!("conv2d backward: no input gradient where one was asked for"))?;
    Ok((dx, dw, db))
}

/// `conv2d_backward` without dx (an input that needs no gradient, such as the images into a
/// network's first convolution): (dweight, dbias).
pub fn conv2d_weight_backward(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    spec: ConvSpec,
    saved: Option<&SavedPlanes>,
) -> Result<(Tensor, Tensor)> {
    let paths = BackwardPaths { dx: false, ..BackwardPaths::tuned(&x.gpu) };
    let (_, dw, db) = conv2d_backward_with(x, weight, dy, spec, paths, saved)?;
    Ok((dw, db))
}

/// What a convolution's backward computes and how.
#[derive(Clone, Copy, Debug)]
pub struct BackwardPaths {
    /// Compute dx at all.
    pub dx: bool,
    /// dx by a convolution where one computes it (else col2im).
    pub dx_by_convolution: bool,
    /// dW by the product that reads the input directly where it applies (else im2col).
    pub dw_direct: bool,
}

impl BackwardPaths {
    /// dx, by the paths the device's tuning takes.
    pub fn tuned(gpu: &crate::engine::Gpu) -> BackwardPaths {
        BackwardPaths {
            dx: true,
            dx_by_convolution: gpu.tuning.conv_dx_transposed,
            dw_direct: gpu.tuning.conv_dw_direct,
        }
    }
}

/// `conv2d_backward` by `paths`: dx (where asked for) by a convolution where one computes it
/// (`dx_by_convolution`: the flipped weights' for stride 1 and "same" padding, the dilated
/// output gradient's for strided ones on the channel-packed path) or by col2im, dW by the
/// product that reads the input directly (`dw_direct`, where it applies; it reuses the forward's
/// input planes where they were `saved`) or from im2col.
pub fn conv2d_backward_with(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    spec: ConvSpec,
    paths: BackwardPaths,
    saved: Option<&SavedPlanes>,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let BackwardPaths { dx: want_dx, dx_by_convolution: by_convolution, dw_direct } = paths;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, _, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let (ho, wo) =
        spec.out_size(h, w, kh, kw).ok_or_else(|| anyhow::anyhow!("conv2d backward: kernel does not fit"))?;
    dy.expect_shape("conv2d output gradient", &[b, cout, ho, wo])?;
    let gpu = x.gpu.clone();
    let (k, n) = (cin * kh * kw, ho * wo);
    // dW on workgroup tiles where the device takes them (GPUs), else below.
    let dw_tiled = if gpu.tuning.conv_workgroup { weight_gradient_workgroup(x, dy, spec, (kh, kw))? } else { None };
    let dw_wg_done = dw_tiled.is_some();
    let dw = match dw_tiled {
        Some(dw) => dw,
        None => Tensor::empty(&gpu, weight.shape(), DType::F32)?,
    };
    // dx by a convolution: the flipped weights' where it is one (stride 1, "same" padding), else
    // of the dilated dY where the channel-packed or the workgroup path takes it; otherwise col2im.
    let same = want_dx && by_convolution && dx_by_convolution(weight, spec);
    let dilated = if want_dx && by_convolution && !same && (gpu.tuning.conv_channel_packed || gpu.tuning.conv_workgroup)
    {
        dx_by_dilated_convolution(x, weight, dy, spec)?
    } else {
        None
    };
    let dx_done = !want_dx || same || dilated.is_some();
    let dx = match dilated {
        Some(dx) => Some(dx),
        None if same => Some(conv2d_flipped(dy, weight, spec, saved)?),
        None if want_dx => Some(Tensor::zeros(&gpu, x.shape())?),
        None => None,
    };
    let direct = if dw_direct && !dw_wg_done {
        weight_gradient_direct(x, dy, spec, (kh, kw), &dw, saved)?
    } else {
        DirectGradient::NotTaken
    };
    let dw_done = dw_wg_done || !matches!(direct, DirectGradient::NotTaken);
    let dbias = match direct {
        DirectGradient::WeightsAndBias(dbias) => dbias,
        _ => super::reduce::channel_sums(dy, cout, n)?,
    };
    if dw_done && dx_done {
        return Ok((dx, dw, dbias));
    }
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    if k.div_ceil(4) > max_dim {
        bail!("conv2d backward: {k} patch rows exceed the device's texture width");
    }
    let budget = (gpu.tuning.im2col_budget as u64).min(gpu.max_binding()) as usize;
    let n_piece = (budget / (k * 4)).min(max_dim / 4 * 4).max(4) / 4 * 4;
    let im2col_t = gpu.pipeline("conv2d", "im2col_t", &[])?;
    let col2im = gpu.pipeline("conv2d", "col2im", &[])?;
    // The batch's output pixels end to end, as the columns of one matrix
    // dY [Cout, B*n], so each piece is one product whatever the batch size; where dY is larger
    // than one binding (no copy of it), pieces within one image read dY where it lies.
    let total = b * n;
    let end_to_end = b == 1 || dy.byte_len() <= gpu.max_binding();
    let dy_all = if b == 1 || !end_to_end { dy.clone() } else { super::copy::swap_dims(dy, 1, b, cout, n)? };
    let pieces: Vec<(usize, usize)> = if end_to_end {
        (0..total).step_by(n_piece).map(|g0| (g0, n_piece.min(total - g0))).collect()
    } else {
        (0..b).flat_map(|bi| (0..n).step_by(n_piece).map(move |s| (bi * n + s, n_piece.min(n - s)))).collect()
    };
    for (g0, np) in pieces {
        let mut params = ConvParams {
            piece: u32_of("piece", np)?,
            out_rows: u32_of("output rows", ho)?,
            image_pixels: u32_of("pixels", n)?,
            ..Geometry { cin, h, w, wo, kh, kw, spec }.params(g0 + np, g0, 0)?
        };
        let dy_piece = match end_to_end {
            true => Operand { t: &dy_all, off: g0, rs: total, cs: 1, bs: 0 },
            false => Operand { t: dy, off: (g0 / n) * cout * n + g0 % n, rs: n, cs: 1, bs: 0 },
        };
        if !dw_done {
            // dW (+)= dY[:, piece] · col[:, piece]ᵀ
            let ((aw, ah), (bw, bh)) = matmul::tex_extents(&gpu, cout, k, np);
            let ta = matmul::pack_operand(&gpu, &dy_piece, 1, cout, np, aw, ah, matmul::Stale::Rows)?;
            let tb = gpu.texture(bw as u32, bh as u32, 1)?;
            // x bound over the images this piece touches (x may be larger than one binding), or
            // read through a flat texture of them where that window exceeds one binding.
            let (b_first, images) = (g0 / n, (g0 + np - 1) / n - g0 / n + 1);
            let (first, count) = (b_first * cin * h * w, images * cin * h * w);
            let grid = [bw.div_ceil(8) as u32, bh.div_ceil(8) as u32, 1];
            if ((count * 4 + gpu.binding_alignment()) as u64) <= gpu.max_binding() {
                let (x_window, start) = super::aligned_window(x, first, count);
                let p = ConvParams { x_first: u32_of("element", start)?, ..params };
                gpu.dispatch_res(&im2col_t, &p, &[Res::Buf(x_window), Res::Tex(&tb.view)], grid)?;
            } else {
                let flat = super::copy::flat_texture(x, first, count)?;
                let p = ConvParams { x_first: u32_of("element", first)?, ..params };
                let pipe = gpu.pipeline("conv2d", "im2col_t_tex", &[])?;
                gpu.dispatch_res(&pipe, &p, &[Res::Tex(&flat.view), Res::Tex(&tb.view)], grid)?;
            }
            let g = Gemm { m: cout, n: k, k: np, batch: 1, alpha: 1.0, beta: if g0 == 0 { 0.0 } else { 1.0 } };
            matmul::product(&gpu, &g, &ta, true, &tb, true, &Out { t: &dw, off: 0, ld: k, bs: 0 }, Bias::None)?;
        }
        let (false, Some(dx)) = (dx_done, &dx) else { continue };
        // dcol = Wᵀ · dY[:, piece], then gathered per input pixel onto dx of the images the piece touches.
        let dcol = Tensor::empty(&gpu, &[k, np], DType::F32)?;
        let g = Gemm { m: k, n: np, k: cout, batch: 1, alpha: 1.0, beta: 0.0 };
        matmul::gemm(
            g,
            Operand { t: weight, off: 0, rs: 1, cs: k, bs: 0 },
            dy_piece,
            Out { t: &dcol, off: 0, ld: np, bs: 0 },
            Bias::None,
        )?;
        let (b_first, b_last) = (g0 / n, (g0 + np - 1) / n);
        let images = b_last - b_first + 1;
        params.images = u32_of("images", images)?;
        params.b0 = u32_of("image", b_first)?;
        // dx bound over the images this piece touches (dx may be larger than one binding), or
        // by runs of channels of one image where those exceed one binding.
        let (per, plane) = (cin * h * w, h * w);
        let room = gpu.max_binding() as usize - gpu.binding_alignment();
        if images * per * 4 <= room {
            let (dx_window, first) = super::aligned_window(dx, b_first * per, images * per);
            params.x_first = u32_of("element", first)?;
            gpu.dispatch(&col2im, &params, &[dcol.binding(), dx_window], super::grid_for(&gpu, images * per, 64)?)?;
            continue;
        }
        let run = room / (plane * 4);
        if run == 0 {
            bail!("conv2d backward: one {h}x{w} channel of the input gradient exceeds a storage binding");
        }
        for bi in b_first..=b_last {
            for c0 in (0..cin).step_by(run) {
                let channels = run.min(cin - c0);
                let (dx_window, first) = super::aligned_window(dx, bi * per + c0 * plane, channels * plane);
                let p = ConvParams {
                    b0: bi as u32,
                    x_first: u32_of("element", first)?,
                    c0: c0 as u32,
                    channels: channels as u32,
                    ..params
                };
                let grid = super::grid_for(&gpu, channels * plane, 64)?;
                gpu.dispatch(&col2im, &p, &[dcol.binding(), dx_window], grid)?;
            }
        }
    }
    Ok((dx, dw, dbias))
}

/// Images b0 .. b0 + nb of x [B, Cin, H, W], zero-padded as `spec` pads them, four channels per
/// texel (`channel_pack`; zeros past Cin): texel (x, y) of layer image * ⌈Cin/4⌉ + c4.
/// With `dilation` > 1 the input's rows and columns are that far apart, zeros between.
fn channel_planes(
    x: &Tensor,
    spec: ConvSpec,
    dilation: usize,
    b0: usize,
    nb: usize,
) -> Result<crate::engine::pool::PooledTexture> {
    let gpu = &x.gpu;
    let (cin, h, w) = (x.dim(1), x.dim(2), x.dim(3));
    let (hp, wp) = padded_extent(x, spec, dilation);
    let layers = nb * cin.div_ceil(4);
    let planes = gpu.texture(wp as u32, hp as u32, layers as u32)?;
    let (x_window, x_first) = super::aligned_window(x, b0 * cin * h * w, nb * cin * h * w);
    let params = ConvParams {
        cin: u32_of("channels", cin)?,
        h: h as u32,
        w: w as u32,
        pad_t: spec.pad[0] as u32,
        pad_l: spec.pad[1] as u32,
        b0: b0 as u32,
        x_first: u32_of("element", x_first)?,
        stride: dilation as u32,
        ..Default::default()
    };
    if let Some(staged) = copy::TexelStaging::new(gpu, [wp, hp, layers])? {
        let texels = wp * hp * layers;
        let p = ConvParams {
            pack_ld: staged.row_texels as u32,
            pack_rows: hp as u32,
            wo: wp as u32,
            n: u32_of("texels", texels)?,
            ..params
        };
        let consts = channel_pack_consts(cin, dilation, (hp, wp));
        let grid = super::grid_for(gpu, texels, 64)?;
        // The input through a flat texture where the device reads textures faster than buffers
        // (four vectorised fetches a texel instead of four lane-by-lane loads).
        let count = nb * cin * h * w;
        if let Some(flat) = copy::flat_texture_for_reading(x, b0 * cin * h * w, count)? {
            let pack = gpu.pipeline("conv2d", "channel_pack_flat_buf", &consts)?;
            let p = ConvParams { x_first: u32_of("element", b0 * cin * h * w)?, ..p };
            gpu.dispatch_res(&pack, &p, &[Res::Tex(&flat.view), Res::Buf(staged.binding())], grid)?;
        } else {
            let pack = gpu.pipeline("conv2d", "channel_pack_buf", &consts)?;
            gpu.dispatch_res(&pack, &p, &[Res::Buf(x_window), Res::Buf(staged.binding())], grid)?;
        }
        staged.fill(&planes);
        return Ok(planes);
    }
    let pack = gpu.pipeline("conv2d", "channel_pack", &channel_pack_consts(cin, dilation, (hp, wp)))?;
    gpu.dispatch_res(
        &pack,
        &params,
        &[Res::Buf(x_window), Res::Tex(&planes.view)],
        [wp.div_ceil(8) as u32, hp.div_ceil(8) as u32, layers as u32],
    )?;
    Ok(planes)
}

/// `channel_pack`'s pipeline made for this input and plane shape (shaders/conv2d.wgsl: its
/// branches then fold away and its divisions are by constants; a few pipelines a model).
fn channel_pack_consts(cin: usize, dilation: usize, (hp, wp): (usize, usize)) -> [(&'static str, String); 5] {
    [
        ("SPACING", format!("{}u", dilation.max(1))),
        ("WHOLE_TEXELS", cin.is_multiple_of(4).to_string()),
        ("CIN4", format!("{}u", cin.div_ceil(4))),
        ("PLANE_W", format!("{wp}u")),
        ("PLANE_H", format!("{hp}u")),
    ]
}

/// (rows, columns) of x [B, C, H, W] padded as `spec` pads it, its rows and columns `dilation`
/// apart.
fn padded_extent(x: &Tensor, spec: ConvSpec, dilation: usize) -> (usize, usize) {
    let (h, w) = (x.dim(2), x.dim(3));
    ((h - 1) * dilation + 1 + spec.pad[0] + spec.pad[2], (w - 1) * dilation + 1 + spec.pad[1] + spec.pad[3])
}

/// The input gradient of a strided convolution as a stride-1 convolution of dY dilated by the
/// stride (zeros between its rows and columns, `channel_planes`) with the flipped, transposed
/// weights (`conv2d_channel_packed`), padded so that it gives x's size; None where that path
/// does not apply (then col2im gathers it).
fn dx_by_dilated_convolution(x: &Tensor, weight: &Tensor, dy: &Tensor, spec: ConvSpec) -> Result<Option<Tensor>> {
    let (cout, cin, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let (h, w, ho, wo, s) = (x.dim(2), x.dim(3), dy.dim(2), dy.dim(3), spec.stride);
    let [pt, pl, pb, pr] = spec.pad;
    if pt >= kh || pb >= kh || pl >= kw || pr >= kw || ho == 0 || wo == 0 {
        return Ok(None);
    }
    // Input rows (columns) past the last window's reach get a gradient of zero: more padding.
    let (extra_h, extra_w) = (h + pt + pb - kh - (ho - 1) * s, w + pl + pr - kw - (wo - 1) * s);
    let pad = [kh - 1 - pt, kw - 1 - pl, kh - 1 - pb + extra_h, kw - 1 - pr + extra_w];
    let as_flipped = weight.reshape(&[cin, cout, kh, kw])?;
    let dx = Tensor::empty(&x.gpu, x.shape(), DType::F32)?;
    let weights = winograd::Weights { t: &as_flipped, flipped: true };
    let spec1 = ConvSpec { stride: 1, pad };
    // GPUs: the implicit GEMM on workgroup tiles reading the dilated dY in place.
    if x.gpu.tuning.conv_workgroup && conv2d_workgroup(dy, &flip_transpose_weights(weight)?, None, spec1, s, &dx)? {
        return Ok(Some(dx));
    }
    let done =
        x.gpu.tuning.conv_channel_packed && conv2d_channel_packed(dy, weights, None, spec1, s, &dx, None, None, None)?;
    Ok(done.then_some(dx))
}

/// A convolution as one product per piece of images with the output pixels as the rows and the
/// output channels as the columns (`convt_ms_32x8`, see tools/gen_matmul_wgsl.py): the input is
/// packed once, four channels per texel (`channel_planes`), the weights as B (`weights_by_tap_t`,
/// flipped where `weights` says so), and C stored transposed into [B, Cout, Ho, Wo]. Any kernel,
/// stride and padding with Cin % 4 == 0 and Ho·Wo % 4 == 0, on devices with the subgroup tile,
/// for outputs within one binding. Returns false, doing nothing, where it does not apply. Where
/// `keep` is given and the input is packed in one piece (plain weights, dilation 1), its planes
/// are kept there for the weight gradient.
#[allow(clippy::too_many_arguments)]
fn conv2d_channel_packed(
    x: &Tensor,
    weights: winograd::Weights,
    bias: Option<&Tensor>,
    spec: ConvSpec,
    dilation: usize,
    out: &Tensor,
    residual: Option<&Tensor>,
    mut keep: Option<&mut Option<SavedPlanes>>,
    packed_weights: Option<&PackedWeights>,
) -> Result<bool> {
    let gpu = &x.gpu;
    let Some((tm, tile_n)) = matmul::conv_tile(gpu) else { return Ok(false) };
    let weight = weights.t;
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, kh, kw) = (weight.dim(0), weight.dim(2), weight.dim(3));
    // Half the columns per lane (`Tuning::convt_narrow`).
    let narrow = gpu.tuning.convt_narrow;
    let tn = if narrow { tile_n / 2 } else { tile_n };
    let (ho, wo) = (out.dim(2), out.dim(3));
    let (hp, wp) = padded_extent(x, spec, dilation);
    let (cin4, pixels, taps, k) = (cin / 4, ho * wo, kh * kw, cin * kh * kw);
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    let (max_binding, align) = (gpu.max_binding() as usize, gpu.binding_alignment());
    let x_bytes = cin * h * w * 4;
    if cin % 4 != 0
        || pixels % 4 != 0
        || wp > max_dim
        || hp > max_dim
        || k > max_dim
        || cin4 > max_layers
        || out.byte_len() as usize > max_binding
        || x_bytes + align > max_binding
    {
        return Ok(false);
    }
    let budget = 4 * gpu.tuning.im2col_budget;
    let per_piece =
        (budget / (16 * cin4 * hp * wp)).min(max_layers / cin4).min((max_binding - align) / x_bytes).clamp(1, b);
    // B: the weights, K rows ordered (tap, channel), four output channels per texel: packed by the
    // forward where it `keep`s them for the input gradient's convolution, else here.
    let bw = cout.div_ceil(tn) * tn / 4;
    let prepacked = packed_weights.filter(|w| weights.flipped && w.extent == (bw, k)).map(|w| &w.texture);
    let pair = keep.is_some() && !weights.flipped && pairs_weights(weight, spec, dilation, per_piece >= b);
    let mut kept_weights = None;
    let packed_here;
    let tb = match prepacked {
        Some(t) => t,
        None => {
            let (tb, flipped) = pack_weights_by_tap_t(weight, weights.flipped, (bw, k), pair)?;
            kept_weights = flipped.map(|texture| PackedWeights { texture, extent: (bw, k) });
            packed_here = tb;
            &packed_here
        }
    };
    let suffix = if narrow { "_narrow" } else { "" };
    let mut consts = matmul::epilogue_consts(if bias.is_some() { 2 } else { 0 }, false, false);
    consts.push(("RESID", residual.is_some().to_string()));
    let product = gpu.pipeline("matmul_subgroup", &format!("convt_{}{suffix}", gpu.tuning.mm_entry), &consts)?;
    let dummy = Binding { buffer: &gpu.dummy, offset: 0, size: 16 };
    for b0 in (0..b).step_by(per_piece) {
        let nb = per_piece.min(b - b0);
        let planes = channel_planes(x, spec, dilation, b0, nb)?;
        let params = matmul::MatmulParams {
            m: u32_of("pixels", pixels)?,
            n: u32_of("output channels", cout)?,
            k4: u32_of("K", k / 4)?,
            bias_mode: if bias.is_some() { 2 } else { 0 },
            alpha: 1.0,
            c_off: u32_of("output offset", b0 * cout * pixels)?,
            c_bs: u32_of("output image", cout * pixels)?,
            ldc: u32_of("pixels", pixels)?,
            cin4: cin4 as u32,
            kw: kw as u32,
            taps: taps as u32,
            wo: u32_of("output width", wo)?,
            stride: spec.stride as u32,
            ..Default::default()
        };
        let bias_binding = bias.map_or(dummy, |t| t.binding());
        let resid_binding = residual.map_or(dummy, |t| t.binding());
        gpu.dispatch_res(
            &product,
            &params,
            &[
                Res::Tex(&planes.view),
                Res::Tex(&tb.view),
                Res::Buf(out.binding()),
                Res::Buf(bias_binding),
                Res::Buf(resid_binding),
            ],
            [pixels.div_ceil(tm) as u32, cout.div_ceil(tn * 8) as u32, nb as u32],
        )?;
        if let Some(slot) = keep.as_deref_mut().filter(|_| nb == b && dilation == 1 && !weights.flipped) {
            let flipped_weights = kept_weights.take();
            *slot = Some(SavedPlanes {
                planes: Some(planes),
                shape: x.shape().to_vec(),
                pad: spec.pad,
                flipped_weights,
                winograd_flipped: None,
            });
        }
    }
    Ok(true)
}

/// A forward convolution's input planes (`channel_planes` of all its images, no dilation), kept
/// for its weight gradient, which would pack the same planes again (`weight_gradient_direct`;
/// the demo's 16x16 and 8x8 convolutions take the channel-packed path forward).
pub struct SavedPlanes {
    /// (None where the forward took Winograd, which packs no planes.)
    planes: Option<PooledTexture>,
    /// The input's shape and the convolution's padding they were packed for.
    shape: Vec<usize>,
    pad: [usize; 4],
    /// The weights as the input gradient's convolution reads them (flipped and transposed),
    /// packed with the forward's in one dispatch where `pairs_weights` holds.
    flipped_weights: Option<PackedWeights>,
    /// Winograd's transformed weights of the input gradient's convolution (W flipped and
    /// transposed), made with the forward's in one pass (`winograd::conv3x3_keeping_flipped`).
    winograd_flipped: Option<PooledTexture>,
}

/// A convolution's weights as the channel-packed product's B operand (`weights_by_tap_t`), with
/// the (texels, rows) extent they were packed for.
pub struct PackedWeights {
    texture: PooledTexture,
    extent: (usize, usize),
}

/// Whether a training convolution packs its input gradient's weights with its own
/// (`weights_by_tap_t_pair_buf`): Cin = Cout (the same extent), a kernel larger than 1x1, stride
/// 1 and "same" padding (dx is then this path's convolution of dY: `conv2d_flipped`), no
/// dilation, its input in one piece (the planes, and so the weights, are kept), on devices that
/// pack through staging buffers.
fn pairs_weights(weight: &Tensor, spec: ConvSpec, dilation: usize, one_piece: bool) -> bool {
    let gpu = &weight.gpu;
    let (kh, kw) = (weight.dim(2), weight.dim(3));
    weight.dim(0) == weight.dim(1)
        && kh * kw > 1
        && dilation == 1
        && one_piece
        && dx_by_convolution(weight, spec)
        && gpu.tuning.conv_dx_transposed
        && gpu.tuning.textures_via_buffer
}

/// The weights as the channel-packed product's B operand of `extent` (texels, rows), flipped and
/// transposed where asked; with `pair` (unflipped), also the flipped ones from the same dispatch.
fn pack_weights_by_tap_t(
    weight: &Tensor,
    flipped: bool,
    (bw, k): (usize, usize),
    pair: bool,
) -> Result<(PooledTexture, Option<PooledTexture>)> {
    let gpu = &weight.gpu;
    let (cout, cin, kh, kw) = (weight.dim(0), weight.dim(1), weight.dim(2), weight.dim(3));
    let tb = gpu.texture(bw as u32, k as u32, 1)?;
    let flat_weights = copy::flat_texture(weight, 0, weight.numel())?;
    let by_tap = ConvParams {
        cin: u32_of("channels", cin)?,
        cout: u32_of("output channels", cout)?,
        kh: kh as u32,
        kw: kw as u32,
        k: u32_of("K", k)?,
        flip: flipped as u32,
        ..Default::default()
    };
    let layers = if pair { 2 } else { 1 };
    let grid = [bw.div_ceil(8) as u32, k.div_ceil(8) as u32, layers as u32];
    let Some(staged) = copy::TexelStaging::new(gpu, [bw, k, layers])? else {
        let pipe = gpu.pipeline("conv2d", "weights_by_tap_t", &[])?;
        let grid = [grid[0], grid[1], 1];
        gpu.dispatch_res(&pipe, &by_tap, &[Res::Tex(&flat_weights.view), Res::Tex(&tb.view)], grid)?;
        return Ok((tb, None));
    };
    let entry = if pair { "weights_by_tap_t_pair_buf" } else { "weights_by_tap_t_buf" };
    let pipe = gpu.pipeline("conv2d", entry, &[])?;
    let p = ConvParams { wo: bw as u32, pack_rows: k as u32, pack_ld: staged.row_texels as u32, ..by_tap };
    gpu.dispatch_res(&pipe, &p, &[Res::Tex(&flat_weights.view), Res::Buf(staged.binding())], grid)?;
    let (bytes_per_row, layer_bytes) = (staged.row_texels * 16, (k * staged.row_texels * 16) as u64);
    let fill = |tex: &PooledTexture, layer: u64| {
        copy::copy_into(gpu, staged.tensor().buffer(), layer * layer_bytes, bytes_per_row, k, tex, 0, [bw, k, 1]);
    };
    fill(&tb, 0);
    if !pair {
        return Ok((tb, None));
    }
    let flipped_tb = gpu.texture(bw as u32, k as u32, 1)?;
    fill(&flipped_tb, 1);
    Ok((tb, Some(flipped_tb)))
}

impl SavedPlanes {
    /// The planes, where they are x's padded as `spec` pads it, all of its images.
    fn of<'a>(saved: Option<&'a SavedPlanes>, x: &Tensor, spec: ConvSpec) -> Option<&'a PooledTexture> {
        saved.filter(|s| s.shape == x.shape() && s.pad == spec.pad).and_then(|s| s.planes.as_ref())
    }
}

/// dW of a convolution as one product over the output pixels that reads the input directly
/// (`dw_ms_32x8_v4`, see tools/gen_matmul_wgsl.py), for devices with the subgroup tile and
/// output widths that are multiples of 4 (any kernel, stride, padding and Cin: a first layer's
/// three channels pack as one texel with a zero, where im2col, a swapped dY copy and a product
/// of one workgroup took 7.5 + 5.1 + 3.3 ms of a profiled demo step). The input
/// is packed four channels per texel, zero-padded (`channel_pack`: one pass over the input where
/// im2col wrote kh·kw values per input value), the output gradient is the A operand as it lies,
/// and K (the pixels) is split into slices so small layers still give every core work; a last
/// pass adds the slices and puts dW in [Cout, Cin, kh, kw] order. Where the product's last
/// workgroup has lanes to spare, one of them sums dY's rows (`DBIAS`: B read as ones) and the
/// same pass writes the bias gradient, which saves the bias gradient's own two passes and copy
/// of dY. The input's planes are the forward's where it `saved` them (x's, all images) and dW
/// takes one piece. Says what it did (nothing where it does not apply).
pub fn weight_gradient_direct(
    x: &Tensor,
    dy: &Tensor,
    spec: ConvSpec,
    (kh, kw): (usize, usize),
    dw: &Tensor,
    saved: Option<&SavedPlanes>,
) -> Result<DirectGradient> {
    let gpu = &x.gpu;
    let Some((tm, tn)) = matmul::conv_tile(gpu) else { return Ok(DirectGradient::NotTaken) };
    let (b, cin, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, ho, wo) = (dy.dim(1), dy.dim(2), dy.dim(3));
    let (hp, wp) = padded_extent(x, spec, 1);
    // Cin rounded up to whole texels: the padded channels pack as zeros, their columns of the
    // product are dropped when the slices are added.
    let (cin4, pixels, taps) = (cin.div_ceil(4), ho * wo, kh * kw);
    let max_dim = gpu.limits.max_texture_dimension_2d as usize;
    let max_layers = gpu.limits.max_texture_array_layers as usize;
    let a_rows = cout.div_ceil(tm) * tm;
    // Texture bytes per image (both operands) and the input's bytes per image.
    let image_bytes = 16 * (pixels / 4 * a_rows + cin4 * hp * wp);
    let x_bytes = cin * h * w * 4;
    let max_binding = gpu.max_binding() as usize;
    if wo % 4 != 0
        || pixels / 4 > max_dim
        || hp > max_dim
        || wp > max_dim
        || cin4 > max_layers
        || x_bytes + gpu.binding_alignment() > max_binding
    {
        return Ok(DirectGradient::NotTaken);
    }
    let budget = 4 * gpu.tuning.im2col_budget;
    let per_piece = (budget / image_bytes)
        .min(max_layers / cin4)
        .min((max_binding - gpu.binding_alignment()) / x_bytes)
        .clamp(1, b);
    // Slices of K: enough workgroups for the device (CPU devices run a few at a time), each
    // slice at least a few rows of pixels.
    let n = taps * cin4 * 4;
    // The bias gradient's column group (tn columns a lane, 8 lanes a workgroup) after dW's,
    // where the last workgroup has a lane to spare for it, or where a column of workgroups more
    // costs less than the bias gradient's own passes: at most an eighth of the product, or a
    // column of at most `DBIAS_COLUMN_FLOP`.
    let dbias_col = n.div_ceil(tn) * tn;
    let column_groups = n.div_ceil(tn * 8);
    let column_flop = 2 * cout.div_ceil(tm) * tm * tn * 8 * b * ho * wo;
    let spare = dbias_col + tn <= column_groups * tn * 8;
    let dbias = match spare || column_groups >= 8 || column_flop <= DBIAS_COLUMN_FLOP {
        true => Some(Tensor::empty(gpu, &[cout], DType::F32)?),
        false => None,
    };
    let cols = if dbias.is_some() { dbias_col + tn } else { n };
    let tiles = cout.div_ceil(tm) * cols.div_ceil(tn * 8);
    let target: usize = if gpu.info.device_type == wgpu::DeviceType::Cpu { 16 } else { 256 };
    let rows_max = per_piece * ho;
    let min_rows = 64usize.div_ceil(wo / 4).max(1);
    let splits = target.div_ceil(tiles).min(rows_max.div_ceil(min_rows)).max(1);
    // dw_ms walks Wo/8 loop iterations a row of its slice (two groups of four pixels each), one
    // more at a ragged end: counted as ⌈Wo/8⌉ + 1 a row, slices short enough to stay within
    // `LOOP_ITERATIONS` (lavapipe silently ends longer loops).
    let splits = splits.max((rows_max * (wo.div_ceil(8) + 1)).div_ceil(super::LOOP_ITERATIONS));
    let slices = Tensor::empty(gpu, &[cout, splits, cols], DType::F32)?;
    // One split of K over all the images at once, whole texels of channels and the bias
    // gradient's column right after dW's: the product stores dW (and the bias gradient after it)
    // in their own order (`DW_DIRECT`), and the slices' summing pass is skipped (the demo's 8x8,
    // 64-channel layers: 16 passes of ~0.15 ms a step).
    let k = taps * cin;
    let direct = splits == 1
        && per_piece == b
        && cin.is_multiple_of(4)
        && (dbias.is_none() || dbias_col == k)
        && cout * cols * 4 + gpu.binding_alignment() <= max_binding;
    for b0 in (0..b).step_by(per_piece) {
        let nb = per_piece.min(b - b0);
        let fresh;
        let planes = match SavedPlanes::of(saved, x, spec).filter(|_| nb == b) {
            Some(planes) => planes,
            None => {
                fresh = channel_planes(x, spec, 1, b0, nb)?;
                &fresh
            }
        };
        let dy_piece = Operand { t: dy, off: b0 * cout * pixels, rs: pixels, cs: 1, bs: cout * pixels };
        let ta = matmul::pack_operand(gpu, &dy_piece, nb, cout, pixels, pixels / 4, a_rows, matmul::Stale::Rows)?;
        let rows = nb * ho;
        let walk = matmul::ConvWalk {
            cin4: cin4 as u32,
            kw: kw as u32,
            taps: taps as u32,
            wo: u32_of("output width", wo)?,
            stride: spec.stride as u32,
            ho: u32_of("output rows", ho)?,
            rows: u32_of("output rows", rows)?,
            rows_per_split: u32_of("output rows", rows.div_ceil(splits))?,
            dbias: dbias.is_some(),
            direct,
        };
        let g = Gemm { m: cout, n: cols, k: pixels, batch: splits, alpha: 1.0, beta: if b0 == 0 { 0.0 } else { 1.0 } };
        matmul::dw_product(gpu, &g, &ta, planes, &Out { t: &slices, off: 0, ld: splits * cols, bs: cols }, walk)?;
    }
    if direct {
        gpu.copy(slices.buffer(), 0, dw.buffer(), 0, (cout * k * 4) as u64);
        if let Some(db) = &dbias {
            gpu.copy(slices.buffer(), (cout * k * 4) as u64, db.buffer(), 0, (cout * 4) as u64);
        }
        return Ok(match dbias {
            Some(dbias) => DirectGradient::WeightsAndBias(dbias),
            None => DirectGradient::Weights,
        });
    }
    // dW = the sum of the slices, by runs of output channels that fit one binding; on CPU
    // devices large slices are read from a flat texture copy (summed in the same order), small
    // ones (`copy::flat_texture_for_reading`) and a 1x1 kernel's (one value an output: 0.074 ms a
    // sum from the buffer against 0.085 from the copy in the demo's profile) from the buffer.
    let flat = match taps {
        1 => None,
        _ => copy::flat_texture_for_reading(&slices, 0, slices.numel())?,
    };
    let consts = [("SUM_DBIAS", dbias.is_some().to_string()), ("TAPS", format!("{taps}u"))];
    let sum = gpu.pipeline("conv2d", if flat.is_some() { "dw_from_slices_flat" } else { "dw_from_slices" }, &consts)?;
    let dbias_binding = match &dbias {
        Some(t) => t.binding(),
        None => Binding { buffer: &gpu.dummy, offset: 0, size: 16 },
    };
    // (The texture holds all the slices; the buffer is bound a run at a time beside dW's.)
    let per_channel: &[usize] = if flat.is_some() { &[k] } else { &[splits * cols, k] };
    for (co0, count) in super::plane_runs(gpu, cout, per_channel, 1)? {
        let (w_window, w_first) = super::aligned_window(dw, co0 * k, count * k);
        let (slices_res, s_first) = match &flat {
            Some(f) => (Res::Tex(&f.view), 0),
            None => {
                let (window, first) = super::aligned_window(&slices, co0 * splits * cols, count * splits * cols);
                (Res::Buf(window), first)
            }
        };
        let params = ConvParams {
            cin: u32_of("channels", cin)?,
            channels: u32_of("channels", cin4 * 4)?,
            kh: kh as u32,
            kw: kw as u32,
            cout: u32_of("output channels", cout)?,
            images: splits as u32,
            n: u32_of("weight pairs", count * cin)?,
            b0: co0 as u32,
            x_first: u32_of("element", s_first)?,
            out_first: u32_of("element", w_first)?,
            slice_ld: u32_of("slice columns", cols)?,
            dbias_col: u32_of("slice columns", dbias_col)?,
            ..Default::default()
        };
        let sums = count * cin + if dbias.is_some() { count } else { 0 };
        let bindings = [slices_res, Res::Buf(w_window), Res::Buf(dbias_binding)];
        gpu.dispatch_res(&sum, &params, &bindings, super::grid_for(gpu, sums, 64)?)?;
    }
    Ok(match dbias {
        Some(dbias) => DirectGradient::WeightsAndBias(dbias),
        None => DirectGradient::Weights,
    })
}

/// The largest column of dW's product (multiply-adds x 2) that `weight_gradient_direct` adds for
/// the bias gradient alone. Measured on lavapipe in the demo's profile (1x1, 64 -> 64 channels,
/// 8 images of 8x8: 4.2 MFLOP a column): the product with the column 0.40 ms, without it 0.26 ms
/// and the bias gradient's two passes 0.20 ms more, besides their dispatches and copy of dY.
const DBIAS_COLUMN_FLOP: usize = 8 << 20;

/// What `weight_gradient_direct` computed.
pub enum DirectGradient {
    /// Nothing: the path does not apply.
    NotTaken,
    /// dW.
    Weights,
    /// dW and the bias gradient [Cout].
    WeightsAndBias(Tensor),
}

pub mod cpu {
    /// W [cout, cin, kh, kw] -> [cin, cout, kh, kw], each kernel turned by 180°.
    pub fn flip_transpose_weights(w: &[f32], cout: usize, cin: usize, kh: usize, kw: usize) -> Vec<f32> {
        let mut out = vec![0f32; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for ky in 0..kh {
                    for kx in 0..kw {
                        out[((ci * cout + co) * kh + kh - 1 - ky) * kw + kw - 1 - kx] =
                            w[((co * cin + ci) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        out
    }

    /// Gradients (dx, dweight, dbias) of `conv2d` for output gradient g.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_backward(
        x: &[f32],
        b: usize,
        cin: usize,
        h: usize,
        w: usize,
        weight: &[f32],
        cout: usize,
        kh: usize,
        kw: usize,
        g: &[f32],
        spec: ConvSpec,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (ho, wo) = spec.out_size(h, w, kh, kw).unwrap();
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; weight.len()];
        let mut db = vec![0f64; cout];
        for bi in 0..b {
            for co in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let gv = g[((bi * cout + co) * ho + oy) * wo + ox] as f64;
                        db[co] += gv;
                        for ci in 0..cin {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * spec.stride + ky) as isize - spec.pad[0] as isize;
                                    let ix = (ox * spec.stride + kx) as isize - spec.pad[1] as isize;
                                    if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w {
                                        let xi = ((bi * cin + ci) * h + iy as usize) * w + ix as usize;
                                        let wi = ((co * cin + ci) * kh + ky) * kw + kx;
                                        dx[xi] += gv * weight[wi] as f64;
                                        dw[wi] += gv * x[xi] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        (f(dx), f(dw), f(db))
    }

    use super::ConvSpec;

    /// Direct convolution (f64 accumulation).
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        x: &[f32],
        b: usize,
        cin: usize,
        h: usize,
        w: usize,
        weight: &[f32],
        cout: usize,
        kh: usize,
        kw: usize,
        bias: Option<&[f32]>,
        spec: ConvSpec,
    ) -> (Vec<f32>, usize, usize) {
        let (ho, wo) = spec.out_size(h, w, kh, kw).unwrap();
        let mut out = vec![0f32; b * cout * ho * wo];
        for bi in 0..b {
            for co in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = bias.map_or(0.0, |bb| bb[co] as f64);
                        for ci in 0..cin {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * spec.stride + ky) as isize - spec.pad[0] as isize;
                                    let ix = (ox * spec.stride + kx) as isize - spec.pad[1] as isize;
                                    if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w {
                                        s += x[((bi * cin + ci) * h + iy as usize) * w + ix as usize] as f64
                                            * weight[((co * cin + ci) * kh + ky) * kw + kx] as f64;
                                    }
                                }
                            }
                        }
                        out[((bi * cout + co) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        (out, ho, wo)
    }
}
