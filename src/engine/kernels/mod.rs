//! Kernel launchers, one module per `shaders/*.wgsl` family. Each module
//! holds the launchers and, in `cpu`, the plain-Rust reference the tests
//! compare against.
//!
//! # The kernels
//!
//! Each is compared with its CPU reference in `tests/kernels.rs` (and by `taming check`) on ragged
//! shapes: batched matmul with transposes/strides/bias/alpha/beta; conv2d (3×3 s1 p1, 3×3 s2 with
//! the reference's right/bottom pad, 1×1, 4×4 s2 p1, 4×4 s1 p1); group/layer/batch norm (batch
//! statistics) with optional fused swish; row softmax; fused causal/non-causal multi-head attention
//! (online softmax, KV-cache-ready query offset) and the AttnBlock's single-head spatial attention;
//! nearest-codebook argmin + gather (exact on the PyTorch fixture); swish, GELU (erf), leaky ReLU,
//! sigmoid, ReLU, exp, abs, sqrt, affine; add/mul/div/max with broadcasting; nearest ×2 upsample;
//! zero pad; sum/mean/mean |x|/L2 norm and sums along a dimension; embedding gather; cross-entropy
//! with log-softmax (ignore index); concat, slice, transpose; f16 → f32 widening; row products with
//! packed f32/f16 weights and a bias/GELU/residual epilogue, one-dispatch layer norm of short rows,
//! and split-key decode attention over a (q, k, v) cache (token-by-token decoding). Their backward
//! kernels are listed in `engine::tape`.
//!
//! # The device they were tuned on
//!
//! No GPU has been available yet, so every figure in these module docs is from Mesa's software
//! Vulkan device, lavapipe (llvmpipe, Mesa 22.3.6, on a 2-core VM), which runs invocations as
//! 8-lane SIMD on CPU threads. Its costs shaped most kernels (`Tuning::for_adapter` makes the
//! choices per adapter; the GPU choices are unmeasured):
//!
//! - **Loads and stores on storage buffers run lane by lane** (a loop over the 8 SIMD lanes with a
//!   branch each); texture fetches are vectorised. Hence the products' operands in textures and the
//!   four-column stores (`matmul`), the flat texture copies other kernels read through (`copy`),
//!   and vec4 entries wherever spans allow: a vec4 load costs about what one float does (`norm`,
//!   `elementwise`, `resample`). Storage-buffer loads inside loops are slower still (`models::gpt`).
//! - **A sampled texture fetch looks up its mip level's strides lane by lane**; read-only storage
//!   textures have no level and their fetch is inlined (`matmul`).
//! - **Workgroup barriers are very expensive**: the products are barrier-free register tiles, and
//!   norms and reductions fold contiguous chunks per invocation, combined without barriers (`norm`).
//! - **Both sides of every branch run**, under a mask, even where the condition is uniform (a
//!   parameter): code a call does not need still costs it. Options that decide such branches are
//!   constants of the pipeline instead, one pipeline per combination (`Gpu::pipeline`'s consts:
//!   the products' epilogue, Winograd's norm/bias/residual flags, the channel pack's shape, the
//!   elementwise op codes, the norm's layout and activation).
//! - **Integer divisions run lane by lane** (`winograd`); **multiply-adds are not fused** into FMAs,
//!   so a pure multiply-add loop compiled by llvmpipe reaches 22 GFLOP/s on this VM (`conv2d`).
//! - **Tensors larger than one storage binding** (128 MiB on lavapipe; a 1024² VQGAN has 512 MiB
//!   activations): kernels bind windows of them, and only where a tensor exceeds the device's limit
//!   (`Gpu::max_binding`), so smaller work is unchanged. Per-plane kernels (resampling, softmax
//!   rows, quantizer images, reductions' chunks, norm statistics) take runs of planes (`plane_runs`,
//!   `plane_window`, offsets kept on the device's binding alignment); elementwise maps and the norms'
//!   output pass take runs of elements, with the run's start as a parameter where an index needs
//!   the global position; Winograd writes its output by runs of output channels (`Windows`), each
//!   with its own transformed weights; the products write C and pack their operands by runs of
//!   layers, rows or columns (`matmul::strided_windows`), the kernels indexing from a start offset
//!   that wraps in u32 arithmetic to the window's origin. Inputs read through flat textures (filled
//!   by copies, which have no binding limit) need no split. Windows give the same numbers as one
//!   dispatch; `Tuning::max_binding` (`TAMING_MAX_BINDING`) forces small bindings so tests and
//!   `taming check` run every split on small tensors (a path choice, such as Winograd's piece size,
//!   may then change, within the kernels' tolerance). Training's kernels split too: attention's
//!   fused and tiled kernels and their backward by runs of sequences, the KV-cache decode by runs
//!   of sequences or of key chunks of one sequence, embeddings (and their gradient) by runs of ids
//!   and of table rows, cross-entropy by runs of rows, the optimizer by windows of each parameter,
//!   the group norm's backward by runs of statistics and the layer norm's by runs of 64-row
//!   chunks, the convolution backward's im2col by a flat texture and col2im by runs of channels
//!   where one image exceeds a binding; batch norm's statistics and backward from channel-major
//!   copies; the general norm backward (planes or rows that are not whole texels) by runs of
//!   statistics, elements and images. What cannot split (one image, row or plane larger than a
//!   binding where a kernel needs it whole) is refused with an error naming the kernel and sizes.
//!   A tensor still lives in one buffer (lavapipe's largest: 2047 MiB); a VQGAN's activations
//!   larger than that (2 GiB at 2048²) are held as runs of channels, each its own tensor
//!   (`models::channel_runs`; `Tuning::max_buffer`, `TAMING_MAX_BUFFER`, forces it in tests).
//!
//! # Compile time
//!
//! llvmpipe compiles a large unrolled tile in tens of seconds to minutes the
//! first time (the subgroup product ~20 s since the two-step unroll, and the convolution about as
//! much; a cold `mm_16x16` up to ~2.5 minutes); Mesa's shader cache (`~/.cache/mesa_shader_cache`)
//! then makes later runs start at once. `cargo test --release` with an empty cache (a fresh
//! machine, `MESA_SHADER_CACHE_DIR` pointed at an empty folder) took 16 min 39 s on 2026-11-30 after
//! the four-column and Winograd kernels (10 min of it in `tests/kernels.rs`, which compiles every
//! tile family); with the cache warm, 4.5–5 minutes. (On 2026-12-01, with an empty cache,
//! `tests/kernels.rs` took 7.7 minutes and the suite about 12 minutes after the build; see the
//! README's tests section.)
//!
//! # Measuring
//!
//! `taming bench kernels|rows|train|vqgan|vqgan-train|gpt|gpt-sample` gives medians of several runs
//! (one run for the multi-minute figures). The 2-core VM's timings vary by up to ±40% from run to
//! run, and by day, so changes were judged by paired runs, and a range is over the runs of the day
//! given. `TAMING_PROFILE=1` prints each kernel's total and median time per dispatch (the first
//! dispatch of a pipeline includes lavapipe's compile, so totals over few calls overstate). The
//! hot spots named in these docs were found with `perf record` (cpu-clock samples) and the JIT code
//! disassembled in gdb.

pub mod attention;
pub mod conv2d;
pub mod copy;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod norm;
pub mod quantize;
pub mod reduce;
pub mod resample;
pub mod softmax;
pub mod winograd;

use std::sync::Arc;

use anyhow::{bail, Result};

use super::device::{Binding, Gpu};
use super::tensor::Tensor;

/// Workgroups for `n` invocations of a 256-wide 1-D kernel, spread over a
/// 2-D grid when one dimension would exceed the device limit. Kernels
/// flatten it back as `gid.x + gid.y * nwg.x * 256`.
/// The most loop iterations a launcher lets one invocation run: lavapipe (gallivm) ends every
/// loop of an invocation once 65,535 iterations have run in all of them, silently (a bias
/// gradient over 70,000 vec4s a channel summed wrong), so kernels whose loops grow with the
/// input split their work to stay well below that.
pub(crate) const LOOP_ITERATIONS: usize = 16384;

/// Where an invocation of `kernel` (its name made only for the error) would loop `iterations`
/// times in all (loops over a whole row whose length the model sets): an error naming it on a
/// device that ends loops sooner, rather than a silently wrong result. Within `LOOP_ITERATIONS` nothing is asked of the device; past
/// it, the device's limit is probed once (`reduce::loop_probe`, 2^20 iterations).
pub(crate) fn expect_loops(gpu: &Arc<Gpu>, kernel: impl FnOnce() -> String, iterations: usize) -> Result<()> {
    match loop_limit_below(gpu, iterations)? {
        Some(limit) => bail!(
            "{}: one invocation would loop {iterations} times and this device ({}) ends an \
             invocation's loops after about {limit} iterations (lavapipe: 65,535), which would \
             give wrong results; this size is not supported on it",
            kernel(),
            gpu.info.name
        ),
        None => Ok(()),
    }
}

/// Whether one invocation may loop `iterations` times in all on this device (`expect_loops`
/// without the error: for launchers that have another path for longer loops).
pub(crate) fn loops_fit(gpu: &Arc<Gpu>, iterations: usize) -> Result<bool> {
    Ok(loop_limit_below(gpu, iterations)?.is_none())
}

/// The device's loop limit where `iterations` would pass it (probed once, only past
/// `LOOP_ITERATIONS`), else None.
fn loop_limit_below(gpu: &Arc<Gpu>, iterations: usize) -> Result<Option<usize>> {
    if iterations <= LOOP_ITERATIONS {
        return Ok(None);
    }
    let limit = match gpu.loop_limit.get() {
        Some(limit) => *limit,
        None => {
            const PROBE: usize = 1 << 10;
            let ran = reduce::loop_probe(gpu, PROBE, PROBE)?;
            *gpu.loop_limit.get_or_init(|| (ran < PROBE * PROBE).then_some(ran))
        }
    };
    // A margin for the loops' own set-up iterations.
    Ok(limit.filter(|&limit| iterations + 1024 > limit))
}

pub(crate) fn grid_1d(gpu: &Gpu, n: usize) -> Result<[u32; 3]> {
    grid_for(gpu, n, 256)
}

pub(crate) fn grid_for(gpu: &Gpu, n: usize, wg: usize) -> Result<[u32; 3]> {
    let groups = n.div_ceil(wg);
    let lim = gpu.limits.max_compute_workgroups_per_dimension as usize;
    if groups <= lim {
        return Ok([groups as u32, 1, 1]);
    }
    let y = groups.div_ceil(lim);
    if y > lim {
        bail!("{n} invocations are too many for one dispatch");
    }
    Ok([groups.div_ceil(y) as u32, y as u32, 1])
}

/// A size or index as a 32-bit kernel parameter; kernels index with u32.
pub(crate) fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernels' 32-bit indices"))
}

/// Check a tensor's rank and that it is not empty.
pub(crate) fn expect_rank(what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        bail!("{what}: expected a rank-{rank} tensor, got shape {:?}", t.shape());
    }
    t.expect_nonempty(what)
}

/// Deterministic pseudo-random numbers for tests and benchmarks.
pub fn random_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Windows of an NCHW-like tensor (`images` x `channels` x `plane` values) that each fit one
/// storage binding, for kernels that write (or read) a tensor larger than one binding a window at
/// a time: whole images while they fit, else runs of channels of one image. A window starts on the
/// device's binding-offset alignment and its channel runs are multiples of `granule` (a norm's group
/// size, say), except the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Windows {
    /// (first image, images) of each window group.
    pub images: Vec<(usize, usize)>,
    /// (first channel, channels) of each window within an image group; one run of all channels
    /// when whole images fit.
    pub channels: Vec<(usize, usize)>,
    pub channels_total: usize,
    pub plane: usize,
}

impl Windows {
    pub fn split(gpu: &Gpu, images: usize, channels: usize, plane: usize, granule: usize) -> Result<Windows> {
        let max = gpu.max_binding() as usize;
        let image_bytes = channels * plane * 4;
        let whole_images = |images| Windows { images, channels: vec![(0, channels)], channels_total: channels, plane };
        if image_bytes * images <= max {
            return Ok(whole_images(vec![(0, images)]));
        }
        // Runs of whole images, each starting on the binding alignment.
        if let Ok(groups) = plane_runs(gpu, images, &[channels * plane], 1) {
            return Ok(whole_images(groups));
        }
        // Runs of channels of one image: every image must start aligned.
        let align = gpu.binding_alignment();
        if images > 1 && !image_bytes.is_multiple_of(align) {
            bail!(
                "{images} images of {channels} x {plane} values: one is larger than a storage binding ({max} bytes) \
                 and they do not start on its {align}-byte alignment, so they cannot be split"
            );
        }
        let runs = plane_runs(gpu, channels, &[plane], granule)?;
        Ok(Windows { images: (0..images).map(|i| (i, 1)).collect(), channels: runs, channels_total: channels, plane })
    }

    /// The binding of `t` for images (i0, n) and channels (c0, c).
    pub fn binding<'a>(&self, t: &'a Tensor, (i0, n): (usize, usize), (c0, c): (usize, usize)) -> Binding<'a> {
        let planes = if c == self.channels_total { n * c } else { c };
        plane_window(t, self.plane, (i0 * self.channels_total + c0, planes))
    }
}

/// Runs (first, count) of `planes` planes for kernels whose tensors hold one plane each per
/// plane index (of `plane_values` values each: an upsampling's input and output, say): each
/// tensor's run fits one storage binding and starts on the binding-offset alignment, and runs are
/// multiples of `granule` planes except the last, as nearly equal as that allows. One run of all
/// planes where they fit.
pub(crate) fn plane_runs(
    gpu: &Gpu,
    planes: usize,
    plane_values: &[usize],
    granule: usize,
) -> Result<Vec<(usize, usize)>> {
    // Offsets keep the binding alignment (and whole vec4s) in every tensor.
    let align = gpu.binding_alignment();
    let mut step = granule.max(1);
    for &v in plane_values {
        let aligned = align / gcd(align, (v * 4).max(1));
        step = step / gcd(step, aligned) * aligned;
    }
    runs_within_bindings(gpu, planes, plane_values.iter().max().copied().unwrap_or(0), step)
}

/// Runs (first, count) of `planes` planes of `plane_values` values each for kernels that bind
/// a run from the aligned start at or before it (`aligned_window`) and index from the run's
/// first value there: runs start on any plane. One run of all planes where they fit.
pub(crate) fn plane_runs_any_start(gpu: &Gpu, planes: usize, plane_values: usize) -> Result<Vec<(usize, usize)>> {
    runs_within_bindings(gpu, planes, plane_values, 1)
}

/// Runs of `planes` planes of at most `widest` values, multiples of `step` planes except the
/// last, each within one binding less one alignment (callers may bind a run from the aligned
/// start before it), as nearly equal as that allows. One run of all planes where they fit.
fn runs_within_bindings(gpu: &Gpu, planes: usize, widest: usize, step: usize) -> Result<Vec<(usize, usize)>> {
    let max = gpu.max_binding() as usize;
    let bytes = widest * 4;
    if planes * bytes <= max {
        return Ok(vec![(0, planes)]);
    }
    let run = (max - gpu.binding_alignment().min(max)) / bytes / step * step;
    if run == 0 {
        bail!(
            "a tensor of {planes} planes of {widest} values is larger than one storage binding ({max} bytes) and cannot \
             be split into runs of {step} plane(s) that fit one"
        );
    }
    // Runs of about equal length: 128 channels of 1024² in runs of at most 31 were 4 x 31 + 4,
    // and the run of 4 sent Winograd's products to the few-rows kernel (7% of a 1024² decode).
    let per = planes.div_ceil(planes.div_ceil(run)).next_multiple_of(step).min(run);
    Ok((0..planes).step_by(per).map(|c| (c, per.min(planes - c))).collect())
}

/// The binding of planes first .. first + count of `t` (planes of `plane` values).
pub(crate) fn plane_window(t: &Tensor, plane: usize, (first, count): (usize, usize)) -> Binding<'_> {
    let value = (t.byte_len() as usize / t.numel().max(1)).max(1);
    let offset = (first * plane * value) as u64;
    let size = ((count * plane * value) as u64).div_ceil(16) * 16;
    Binding { buffer: t.buffer(), offset, size: size.min(t.buffer().size() - offset).max(4) }
}

/// Elements first .. first + count of `t` bound from the aligned start at or before `first`:
/// (binding, that start in elements), for kernels that subtract the start from their indices.
pub(crate) fn aligned_window(t: &Tensor, first: usize, count: usize) -> (Binding<'_>, usize) {
    let value = (t.byte_len() as usize / t.numel().max(1)).max(1);
    let align = t.gpu.binding_alignment() / value;
    let end = ((first + count) * value).div_ceil(16) * 16;
    let end = (end as u64).min(t.buffer().size());
    // A window wholly past the buffer (padding a kernel never reads, e.g. a row weight's last
    // block of columns) binds the buffer's last aligned values instead.
    let first = first.min((end as usize).saturating_sub(4) / value);
    let start = first / align * align;
    let offset = (start * value) as u64;
    (Binding { buffer: t.buffer(), offset, size: (end - offset).max(4) }, start)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
