//! The GPU device: adapter choice, limits and features, shader modules and a
//! pipeline cache, a queue of recorded dispatches, the buffer and texture pools, and the
//! per-adapter kernel choices (`Tuning`).
//!
//! The best adapter is used (discrete > integrated > virtual > software); `--adapter`/`--backend`
//! and `TAMING_ADAPTER`/`TAMING_BACKEND` override it. `Tuning::for_adapter` picks, per device, the
//! matmul tile, row-product variants, Winograd, the texture copies and the attention form, each
//! overridable by a `TAMING_*` variable for measurements (see the `engine::kernels` module docs,
//! where each choice is measured). On the GL backend the texture pool gives textures at least two
//! layers (wgpu's GL backend makes a one-layer texture a `GL_TEXTURE_2D`, which the 2-D-array views
//! then read as zeros: wgpu issues 1574, 1614), and Winograd is never taken (`winograd_works`).
//! `TAMING_PROFILE=1` runs every dispatch alone and prints each kernel's total and median time
//! (`TAMING_PROFILE=grid`: per kernel and workgroup grid), and the copy commands' per source line;
//! `TAMING_PROFILE=gpu` times each dispatch by the device's timestamps instead, without waits
//! (`TAMING_PROFILE=gpu-grid`: per kernel and workgroup grid).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};

use super::params::KernelParams;
use super::pool::{BufferPool, TexturePool};
use super::shaders;

/// How the user asked for a device (`--adapter`, `--backend`, or the
/// `TAMING_ADAPTER` / `TAMING_BACKEND` environment variables).
#[derive(Clone, Debug, Default)]
pub struct DeviceRequest {
    /// Adapter index (as listed by `taming info`) or a case-insensitive substring of its name.
    pub adapter: Option<String>,
    /// `vulkan`, `metal`, `dx12`, `gl` or a comma list of them.
    pub backend: Option<String>,
    /// Matmul tile (an entry of `MM_TILES`, or its size such as `16x16`)
    /// instead of the one chosen for the adapter: for tuning and tests.
    pub mm_tile: Option<String>,
}

impl DeviceRequest {
    pub fn from_env() -> Self {
        DeviceRequest {
            adapter: std::env::var("TAMING_ADAPTER").ok().filter(|s| !s.is_empty()),
            backend: std::env::var("TAMING_BACKEND").ok().filter(|s| !s.is_empty()),
            mm_tile: std::env::var("TAMING_MM_TILE").ok().filter(|s| !s.is_empty()),
        }
    }
    /// Flags win over the environment.
    pub fn or_env(self) -> Self {
        let env = Self::from_env();
        DeviceRequest {
            adapter: self.adapter.or(env.adapter),
            backend: self.backend.or(env.backend),
            mm_tile: self.mm_tile.or(env.mm_tile),
        }
    }
}

/// A storage binding: a whole buffer or a byte range of one.
#[derive(Clone, Copy)]
pub struct Binding<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

/// What a kernel binds after its uniform parameters.
#[derive(Clone, Copy)]
pub enum Res<'a> {
    Buf(Binding<'a>),
    Tex(&'a wgpu::TextureView),
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    /// The compute pass consecutive dispatches share (wgpu still orders each dispatch after
    /// the writes it reads); ended by any other command and before the encoder is finished.
    /// A pass per dispatch cost the host a pass's begin, end and tracking merge every time.
    pass: Option<wgpu::ComputePass<'static>>,
    dispatches: usize,
    /// The recorded dispatches' parameters, one uniform buffer for many of them.
    uniforms: Option<UniformArena>,
    /// Bytes written by `write_bytes` since the device last caught up.
    written: u64,
}

impl Pending {
    /// The submission's command encoder, begun on first use. Takes the field rather than
    /// `&mut self` so that the caller may keep borrowing the pass beside it.
    fn encoder<'a>(
        encoder: &'a mut Option<wgpu::CommandEncoder>,
        device: &wgpu::Device,
    ) -> &'a mut wgpu::CommandEncoder {
        encoder.get_or_insert_with(|| device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None }))
    }
}

/// Kernel parameters of recorded dispatches, each at its own aligned offset of one uniform
/// buffer, which is written once before the commands are submitted. (A buffer per dispatch cost
/// the host an allocation, a mapping and a free each time.)
struct UniformArena {
    buffer: wgpu::Buffer,
    data: Vec<u8>,
}

impl UniformArena {
    /// Where the next parameters go: the first offset past those staged, `align`ed.
    fn next_offset(&self, align: usize) -> usize {
        self.data.len().div_ceil(align) * align
    }
}

/// Bytes of one uniform arena: room for a submission's dispatches at 256-byte offsets.
const UNIFORM_ARENA_BYTES: usize = 256 * 256;

/// Uploads wait for the device after this many bytes, so that wgpu's staging copies of a model's
/// weights are freed as they go rather than all held at once (on a software device they are
/// memory of the process: the ImageNet VQGAN's 285 MB would otherwise be held twice).
const MAX_STAGED_BYTES: u64 = 64 << 20;

/// Per-device kernel choices (see `Tuning::for_adapter`).
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Matmul product: shader family (`matmul`, or `matmul_subgroup` where
    /// the device has 8-lane subgroups), entry point, register tile (rows,
    /// cols per invocation) and workgroup shape.
    pub mm_family: &'static str,
    pub mm_entry: &'static str,
    pub mm_tm: u32,
    pub mm_tn: u32,
    pub mm_wg_x: u32,
    pub mm_wg_y: u32,
    /// Elements per invocation in reductions and statistics.
    pub chunk: u32,
    /// Multi-head attention as matmuls + masked softmax instead of the fused kernel.
    pub attention_via_matmul: bool,
    /// The fused attention by workgroups of 64 queries that stage key/value tiles in workgroup
    /// memory (`attention_tiled`; backward: `backward_dq_tiled`, `backward_dkv_tiled`) instead of one
    /// invocation per query reading every key.
    /// `TAMING_ATTENTION_TILED`.
    pub attention_tiled: bool,
    /// Texels per invocation of the one-row products (`gemv_r1_t*`,
    /// `gemv_h_r1_t*` in `shaders/matmul.wgsl`).
    pub gemv_texels: u32,
    /// Row products share their x loads across an 8-lane subgroup
    /// (`gemv_sg_*` in `shaders/matmul_subgroup.wgsl`).
    pub gemv_subgroup: bool,
    /// One-row products split along K across a workgroup of 256 (`gemv_ks_r1`, `gemv_ks_h_r1`):
    /// GPU-shaped, where the one-invocation-per-column entries keep a few dozen invocations
    /// busy (`TAMING_GEMV_SPLIT_K`).
    pub gemv_split_k: bool,
    /// Keys per invocation of decoding's attention (`KEY_CHUNK` of `decode_partial`): CPU
    /// devices want few long invocations, GPUs many short ones (`TAMING_DECODE_KEY_CHUNK`).
    pub decode_key_chunk: u32,
    /// Decode attention reads the KV cache through a texture copy.
    pub kv_cache_texture: bool,
    /// 3x3 stride-1 convolutions by Winograd's F(4x4, 3x3) (`shaders/winograd.wgsl`).
    pub winograd: bool,
    /// Kernels that fill the products' operand textures write a buffer laid out as the texture
    /// and copied into it (Winograd's transforms `input_buf`, `weights_buf`; `channel_pack_buf`,
    /// `weights_by_tap_t_buf`) instead of storing into the texture: on lavapipe Winograd's 36
    /// layered storage-texture stores per invocation cost 4x the rest of its input pass (512²,
    /// `bench vqgan`: 26.0–27.9 → 22.3–22.6 s). `TAMING_TEXTURES_VIA_BUFFER`.
    pub textures_via_buffer: bool,
    /// Kernels that read a tensor value by value read it through a flat texture copy of it
    /// (the norm statistics' `partial_stats_flat`, training's `channel_pack_flat_buf`, the
    /// products' vec4 packs, elementwise ops, softmax, Adam, axis sums, the norms' output and
    /// backward passes): on lavapipe texture fetches are gathers, while a buffer load is a loop
    /// over the lanes with a store-forwarding stall per value (`tools/jit_profile.py`).
    /// `TAMING_READS_TEXTURE`.
    pub reads_via_texture: bool,
    /// With `reads_via_texture`, the most values a kernel that reads a tensor once (a channel pack, an
    /// operand's vec4 pack, dW's slice sums, a softmax row kernel, a vec4 axis sum) reads from its
    /// buffer rather than through a flat texture copy: below it the copy's command (tens of
    /// microseconds on lavapipe, whatever its size) costs more than the texture fetches save. Measured
    /// by GPU timestamps over demo training steps, buffer against copy (2026-12-05): channel packs of
    /// 32k values 0.126/0.169 ms against 0.126/0.160, of 64k 0.232 against 0.215 (of 128k 0.328 against
    /// 0.282, of 256k 0.670 against 0.565: copies from there on); dW's slice sums of 37k values 0.170
    /// against 0.157; softmax rows of 32k values 0.135 against 0.147 (its backward, two copies, 0.113
    /// against 0.097). `taming tune`'s knob (`small_reads_workload`: the demo's 8x8 attention block and
    /// a 3x3 convolution, forward and backward) timed 0 and 65,536 within its noise on lavapipe
    /// (8.1-10.7 ms either way, in eight runs), while 65,536 spares the demo step about 160 commands.
    /// `TAMING_BUFFER_READ_MAX_VALUES`.
    pub buffer_read_max_values: usize,
    /// Elementwise ops (`kernels::elementwise`: unary, their backward, same-shape binary) read
    /// through flat texture copies too, where `reads_via_texture` holds. Off by default: on
    /// lavapipe (2026-12-04, batches of 20 ops as a training step records them) the buffer
    /// reads ran a + b 1.02-1.8x, GELU 1.06-1.4x and its backward 1.05-1.6x faster at every size
    /// from 8K to 4M floats, the texture path's copy being a serial memcpy on the driver's
    /// queue thread. `TAMING_ELEMENTWISE_TEXTURE`.
    pub elementwise_via_texture: bool,
    /// Norm statistics in one dispatch, a workgroup per statistic reducing in workgroup memory
    /// (`stats_wg4`), instead of partial sums then their combination. `TAMING_STATS_WORKGROUP`.
    pub stats_workgroup: bool,
    /// Norm statistics in one dispatch with subgroup sums (`norm_subgroup.wgsl`'s `stats_sg4`,
    /// one barrier), before `stats_workgroup`; needs the subgroup feature. `TAMING_STATS_SG`.
    pub stats_subgroup: bool,
    /// Norm statistics in one dispatch with no barrier, for CPU devices whose subgroups are
    /// exactly 8 lanes: a workgroup of one subgroup per statistic reading x's flat texture copy
    /// (`norm_subgroup.wgsl`'s `stats_lanes_flat`), instead of partial sums then their
    /// combination (two dispatches of a few workgroups each, which left most of lavapipe's threads
    /// idle at the demo's sizes). Where x is read through a flat texture (`reads_via_texture`)
    /// and a statistic has at most `norm::LANES_MAX_PER_STAT` values (beyond, the partial sums'
    /// chunks share the work better). A group norm whose planes are whole texels also writes its
    /// output in that dispatch (`norm_lanes_flat`). `TAMING_STATS_LANES`.
    pub stats_lanes: bool,
    /// A group norm's backward in one dispatch with no barrier, for CPU devices whose subgroups
    /// are exactly 8 lanes: a workgroup of one subgroup per group walking its statistics twice
    /// through x's and dy's flat texture copies (`norm_subgroup.wgsl`'s `backward_lanes_flat`),
    /// instead of the planes' sums, the group means with dgamma and dbeta, then dx (three
    /// dispatches, the first of one or two workgroups at the demo's sizes). For statistics of up
    /// to `norm::LANES_MAX_PER_STAT` values in groups of up to `norm::LANES_MAX_CHANNELS`
    /// channels, where x is read through a flat texture (`reads_via_texture`).
    /// `TAMING_NORM_BACKWARD_LANES`.
    pub norm_backward_lanes: bool,
    /// Row reductions by a workgroup of 64 per row reducing with subgroup operations instead of
    /// an invocation per row: softmax (plain, masked, backward; `shaders/softmax_subgroup.wgsl`)
    /// and sums along an axis of 64 or more (`shaders/reduce_subgroup.wgsl`: bias gradients);
    /// needs the subgroup feature (any size). `TAMING_REDUCE_SG`.
    pub reduce_subgroup: bool,
    /// Compile shaders without wgpu's runtime bounds checks
    /// (`TAMING_TRUSTED_SHADERS=1`; for measurements, never the default).
    pub trusted_shaders: bool,
    /// Fill operand and flat textures by pack kernels even where a
    /// buffer-to-texture copy would do (`TAMING_PACK_KERNEL=1`): the other
    /// path, for comparisons and `taming check`.
    pub pack_kernel: bool,
    /// Bytes of im2col texture one convolution piece may use
    /// (`TAMING_IM2COL_BUDGET`; small values force pieces that split images).
    pub im2col_budget: usize,
    /// A convolution's input gradient as the convolution of the output gradient with the flipped
    /// weights (the forward's fast paths) where it is one (`conv2d::dx_by_convolution`), instead
    /// of gathering patch gradients (col2im). `TAMING_CONV_DX_TRANSPOSED=0|1`.
    pub conv_dx_transposed: bool,
    /// A convolution's weight gradient by one product that reads the input directly
    /// (`conv2d::weight_gradient_direct`, subgroup tile) where it applies, instead of a transposed
    /// im2col copy. `TAMING_CONV_DW_DIRECT=0|1`.
    pub conv_dw_direct: bool,
    /// Training's convolutions (the forward ones of a recording tape, and input gradients) over
    /// the channel-packed input with the output pixels as the product's rows
    /// (`conv2d::conv2d_channel_packed`) where Winograd does not pay, before implicit GEMM: on lavapipe the demo VQGAN
    /// step 0.54-0.55 -> 0.47-0.50 s, while inference at 256² was slower (6.1 against 5.4 s), so
    /// inference keeps its paths. `TAMING_CONV_CHANNEL_PACKED=0|1`.
    pub conv_channel_packed: bool,
    /// That path's product with half the columns per lane (`convt_ms_32x8_narrow`: 32 output
    /// channels per workgroup instead of 64, half the accumulators to spill). On lavapipe, demo
    /// VQGAN profile: 32-channel layers at 16×16 5.4–6.0 → 2.5–2.9 ms (the full tile's upper
    /// lanes only repeated its last columns there), 64-channel ones at 8×8 2.3–2.5 → 2.0–2.1 ms
    /// per 64 channels, all of them 1.67–1.76 → 1.10–1.22 s over 8 steps. `TAMING_CONVT_NARROW=0|1`.
    pub convt_narrow: bool,
    /// Convolutions as one implicit GEMM on workgroup tiles (`conv2d.wgsl`'s `conv_wg`: weights
    /// and gathered patches staged in workgroup memory) before the other non-Winograd paths, and
    /// their weight gradients likewise (`dw_wg`: dY and gathered patches, no im2col texture).
    /// `TAMING_CONV_WORKGROUP`.
    pub conv_workgroup: bool,
    /// Products in f16 arithmetic (`matmul_f16.wgsl`'s `mw_64x64_h`: operands staged as f16,
    /// 16-term sums in f16, added in f32): opt-in only (`TAMING_F16_PRODUCTS=1`), on devices
    /// with shader-f16; results differ from f32 by about 1e-3 of their scale. Never chosen by the
    /// autotuner (it changes the numbers).
    pub f16_products: bool,
    /// Largest storage binding the kernels may use, below the device's own limit
    /// (`TAMING_MAX_BINDING`, bytes): forces the split paths of tensors larger than one binding
    /// onto small tensors, for tests and `taming check`.
    pub max_binding: Option<u64>,
    /// Bytes a storage binding's offset must be a multiple of, above the device's own
    /// requirement (`TAMING_BINDING_ALIGN`): GPUs ask for 16 to 256 where lavapipe asks for 16,
    /// and the split paths' windows of small tensors must fit either (`taming check`'s
    /// small-binding variant runs with 256: an H200's 32 showed a window that did not).
    pub binding_align: Option<usize>,
    /// Largest buffer (one tensor) the engine may allocate, below the device's own limit
    /// (`TAMING_MAX_BUFFER`, bytes): forces the VQGAN's activations held as runs of channels
    /// (`models::channel_runs`) onto small images, for tests.
    pub max_buffer: Option<u64>,
}

impl Tuning {
    /// The row-product entry for `m` rows: (entry, rows, columns per invocation).
    pub fn gemv_entry(&self, m: usize, half: bool) -> (&'static str, usize, usize) {
        if self.gemv_split_k && m < 4 {
            // A workgroup's 8 texel columns per row (8 x 4 or 8 x 8 columns), like the t1 entries'.
            return if half { ("gemv_ks_h_r1", 1, 8) } else { ("gemv_ks_r1", 1, 4) };
        }
        match (m >= 4, half, self.gemv_texels) {
            (true, false, _) => ("gemv_r4_t2", 4, 8),
            (true, true, _) => ("gemv_h_r4_t1", 4, 8),
            (false, false, 1) => ("gemv_r1_t1", 1, 4),
            (false, false, 4) => ("gemv_r1_t4", 1, 16),
            (false, false, _) => ("gemv_r1_t2", 1, 8),
            (false, true, 1) => ("gemv_h_r1_t1", 1, 8),
            (false, true, 2) => ("gemv_h_r1_t2", 1, 16),
            (false, true, _) => ("gemv_h_r1_t4", 1, 32),
        }
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub tuning: Tuning,
    /// The adapter the device was opened on (`variant` opens another device there).
    pub adapter: wgpu::Adapter,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) textures: Arc<TexturePool>,
    /// A small read-only buffer bound where a kernel's optional input is absent.
    pub(crate) dummy: wgpu::Buffer,
    modules: Mutex<HashMap<String, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Each pipeline's name (`shader:entry`), for errors and the profile.
    pipeline_names: Mutex<HashMap<usize, String>>,
    pending: Mutex<Pending>,
    errors: Arc<Mutex<Vec<String>>>,
    /// `TAMING_PROFILE=1`: every dispatch runs alone and is timed, per kernel;
    /// the table is printed when the device is dropped. (Slow; for finding hot spots.)
    profile: Option<Mutex<Profile>>,
    /// How many loop iterations one invocation runs before the driver ends its loops (None: no
    /// such limit), probed on first need (`kernels::expect_loops`).
    pub(crate) loop_limit: std::sync::OnceLock<Option<usize>>,
    /// Dispatches and other commands (copies) recorded so far: on CPU drivers each costs tens of
    /// microseconds besides its work, so their count per step is a figure of its own (`bench train`).
    commands: [std::sync::atomic::AtomicU64; 2],
}

#[derive(Default)]
struct Profile {
    /// Seconds and workgroup count of every dispatch, per kernel.
    times: HashMap<String, Vec<(f64, u32)>>,
    /// `TAMING_PROFILE=grid`: rows per kernel and workgroup grid, to tell a kernel's calls apart.
    by_grid: bool,
    /// `TAMING_PROFILE=gpu`: each dispatch timed by the device's timestamps at its pass's start
    /// and end, without waiting for it alone (a GPU's round trip, ~0.1 ms, is longer than most
    /// of its kernels); copy commands are then not timed.
    stamps: Option<Stamps>,
}

/// Timestamp queries of the dispatches recorded since the last submission.
struct Stamps {
    set: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Kernel name and workgroup count of each timed dispatch, in query order (two queries each).
    pending: Vec<(String, u32)>,
    /// Nanoseconds per timestamp tick.
    period: f64,
}

/// Dispatches timed per submission (two queries each, within wgpu's 4,096 per query set).
const STAMPED_DISPATCHES: usize = 2048;

impl Stamps {
    fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Stamps {
        let queries = 2 * STAMPED_DISPATCHES as u32;
        let bytes = 8 * queries as u64;
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        Stamps {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: queries,
            }),
            resolved: buffer("profile timestamps", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            readback: buffer("profile read-back", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            pending: Vec::new(),
            period: queue.get_timestamp_period() as f64,
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.stamped() {
            self.flush(); // the last dispatches' stamps
        }
        if let Some(p) = &self.profile {
            let p = p.lock().unwrap();
            // (total, count, median) per kernel; the median leaves out the
            // first dispatch of a pipeline, which lavapipe compiles then.
            // The workgroup counts show dispatches too small to keep every
            // core of a CPU driver (or every unit of a GPU) busy.
            let mut rows: Vec<(&String, f64, usize, f64, u32, u32)> = p
                .times
                .iter()
                .map(|(name, t)| {
                    let mut secs: Vec<f64> = t.iter().map(|x| x.0).collect();
                    secs.sort_by(f64::total_cmp);
                    let mut groups: Vec<u32> = t.iter().map(|x| x.1).collect();
                    groups.sort_unstable();
                    let total = secs.iter().sum();
                    (name, total, t.len(), secs[secs.len() / 2], groups[0], groups[groups.len() / 2])
                })
                .collect();
            rows.sort_by(|a, b| b.1.total_cmp(&a.1));
            let total: f64 = rows.iter().map(|r| r.1).sum();
            let commands: usize = rows.iter().map(|r| r.2).sum();
            let shown = if p.by_grid { 80 } else { 40 };
            eprintln!(
                "profile: {total:.3} s in {commands} dispatches and copy commands{} (the {shown} largest rows: total, \
                 share, count, median per dispatch, workgroups min/median)",
                if p.stamps.is_some() { " (GPU timestamps: dispatches only)" } else { "" }
            );
            for (name, t, n, median, g_min, g_median) in rows.iter().take(shown) {
                eprintln!(
                    "{:>9.3} s {:>5.1}% {:>8} x {:>10.3} ms {:>7}/{:<7} {name}",
                    t,
                    100.0 * t / total.max(1e-12),
                    n,
                    median * 1e3,
                    g_min,
                    g_median
                );
            }
        }
    }
}

/// Optional features the engine uses where the adapter has them.
const WANTED_FEATURES: wgpu::Features =
    wgpu::Features::SHADER_F16.union(wgpu::Features::SUBGROUP).union(wgpu::Features::TIMESTAMP_QUERY);

/// Submit after this many recorded dispatches even without a read-back, so
/// a long forward pass keeps the device busy while we keep recording. Each submission costs
/// lavapipe a wake-up of its queue thread: 1,024 (about one demo training step) against 256,
/// demo step medians 0.2116/0.2135/0.2165/0.2158/0.2164 against 0.2179/0.2170/0.2163/0.2215/0.2227 s
/// (alternating; 512 and 4,096 within noise of 1,024), GPT step 10.5 against 10.8 s.
const MAX_PENDING_DISPATCHES: usize = 1024;

fn parse_backends(s: &str) -> Result<wgpu::Backends> {
    let mut b = wgpu::Backends::empty();
    for part in s.split(',').map(|p| p.trim().to_ascii_lowercase()) {
        b |= match part.as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            "all" => wgpu::Backends::all(),
            other => bail!("--backend: unknown backend '{other}' (use vulkan, metal, dx12 or gl)"),
        };
    }
    Ok(b)
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn no_adapter_help() -> String {
    let mut s = String::from("no usable GPU adapter found.");
    if cfg!(target_os = "linux") {
        s.push_str(
            " Install a Vulkan driver; without a GPU, the software one works:\n  \
             sudo apt-get install -y mesa-vulkan-drivers libvulkan1 vulkan-tools\n\
             then check with `vulkaninfo --summary`.",
        );
    } else {
        s.push_str(" Update your GPU driver (Metal on macOS, DX12/Vulkan on Windows).");
    }
    s
}

/// Worker threads per core that training asks of Mesa's CPU drivers (lavapipe, llvmpipe), whose
/// default is one per core. Training's many small dispatches finish sooner with two: measured on
/// 2 cores, the demo VQGAN step 0.52–0.54 → 0.46–0.48 s and 40 demo GPT steps 57–60 → 53–54 s,
/// while inference was unchanged and KV-cache sampling about 5% slower, so only training asks.
pub const TRAINING_CPU_DRIVER_THREADS_PER_CORE: usize = 2;

/// Ask Mesa's CPU drivers for `TRAINING_CPU_DRIVER_THREADS_PER_CORE` worker threads per core
/// (`LP_NUM_THREADS`; shared among the MPI ranks on this machine), unless the user set
/// `LP_NUM_THREADS`. No effect on other drivers. Must run
/// before the first device opens in this process (the driver reads it then) and while no other
/// thread may read the environment: the start of a training command.
pub fn cpu_driver_threads_for_training() {
    if std::env::var_os("LP_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Ranks of one MPI job on this machine share its cores (Open MPI's and MPICH's counts).
    let local_ranks = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let threads = (cores * TRAINING_CPU_DRIVER_THREADS_PER_CORE / local_ranks).max(1);
    std::env::set_var("LP_NUM_THREADS", threads.to_string());
}

/// All adapters of the requested backends, best first (discrete > integrated > software).
pub fn list_adapters(req: &DeviceRequest) -> Result<Vec<wgpu::Adapter>> {
    let backends = match &req.backend {
        Some(b) => parse_backends(b)?,
        None => wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12,
    };
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters.sort_by_key(|a| type_rank(a.get_info().device_type));
    Ok(adapters)
}

impl Gpu {
    /// Open the best adapter, or the one the request names.
    pub fn new(req: &DeviceRequest) -> Result<Arc<Gpu>> {
        let adapters = list_adapters(req)?;
        if adapters.is_empty() {
            bail!(no_adapter_help());
        }
        let adapter = match &req.adapter {
            // Ranks of a multi-process run on one machine share its best adapters in turn.
            None => {
                let best = type_rank(adapters[0].get_info().device_type);
                let peers = adapters.iter().filter(|a| type_rank(a.get_info().device_type) == best).count();
                let k = super::distributed::local_rank().map_or(0, |r| r % peers);
                adapters.into_iter().nth(k).unwrap()
            }
            Some(sel) => {
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                let pick = if let Ok(i) = sel.parse::<usize>() {
                    (i < adapters.len()).then_some(i)
                } else {
                    let s = sel.to_ascii_lowercase();
                    names.iter().position(|n| n.to_ascii_lowercase().contains(&s))
                };
                let i = pick.ok_or_else(|| {
                    anyhow!(
                        "--adapter '{sel}' matches no adapter; available: {}",
                        names.iter().enumerate().map(|(i, n)| format!("[{i}] {n}")).collect::<Vec<_>>().join(", ")
                    )
                })?;
                adapters.into_iter().nth(i).unwrap()
            }
        };
        Self::from_adapter(adapter, req.mm_tile.as_deref())
    }

    pub fn from_adapter(adapter: wgpu::Adapter, mm_tile: Option<&str>) -> Result<Arc<Gpu>> {
        let features = adapter.features() & WANTED_FEATURES;
        let tuning = Tuning::for_adapter(&adapter.get_info(), features, mm_tile)?;
        Self::with_tuning(adapter, tuning)
    }

    /// Another device on this one's adapter with other kernel choices (for
    /// `taming check`, tests and measurements; its pools and caches are its own).
    pub fn variant(&self, tuning: Tuning) -> Result<Arc<Gpu>> {
        Self::with_tuning(self.adapter.clone(), tuning)
    }

    pub fn with_tuning(adapter: wgpu::Adapter, tuning: Tuning) -> Result<Arc<Gpu>> {
        let info = adapter.get_info();
        let backend = info.backend;
        let features = adapter.features() & WANTED_FEATURES;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("taming"),
            required_features: features,
            required_limits: limits.clone(),
            // Small blocks for wgpu's sub-allocator (4–16 MiB): larger buffers and textures get
            // memory of their own, which goes back to the driver when they are released, instead
            // of fragmenting 128–256 MiB blocks that are then never returned.
            memory_hints: wgpu::MemoryHints::Manual { suballocated_device_memory_block_size: (4 << 20)..(16 << 20) },
            ..Default::default()
        }))
        .with_context(|| format!("opening device on adapter '{}'", info.name))?;
        // Errors (out of memory, validation) are collected and turned into
        // `Result`s at the next synchronisation point instead of panicking.
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        if info.device_type == wgpu::DeviceType::Cpu {
            return_freed_memory_to_the_system();
        }
        let pool = Arc::new(BufferPool::new(device.clone()));
        let profile = match std::env::var("TAMING_PROFILE").ok().filter(|v| v != "0" && !v.is_empty()) {
            None => None,
            Some(v) if v == "gpu" || v == "gpu-grid" => {
                if !features.contains(wgpu::Features::TIMESTAMP_QUERY) {
                    bail!(
                        "TAMING_PROFILE=gpu: '{}' has no timestamp queries (TAMING_PROFILE=1 times on the host)",
                        info.name
                    );
                }
                let stamps = Some(Stamps::new(&device, &queue));
                Some(Mutex::new(Profile { stamps, by_grid: v == "gpu-grid", ..Profile::default() }))
            }
            Some(v) if v == "1" || v == "grid" => {
                Some(Mutex::new(Profile { by_grid: v == "grid", ..Profile::default() }))
            }
            Some(v) => bail!("TAMING_PROFILE={v}: expected 1, grid, gpu or gpu-grid (0 or unset: no profile)"),
        };
        Ok(Arc::new(Gpu {
            device: device.clone(),
            queue,
            info,
            limits,
            features,
            tuning,
            adapter,
            pool: pool.clone(),
            textures: Arc::new(TexturePool::new(device.clone(), pool.clone(), backend)),
            dummy: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("absent input"),
                size: 256,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pipeline_names: Mutex::new(HashMap::new()),
            profile,
            pending: Mutex::new(Pending { encoder: None, pass: None, dispatches: 0, uniforms: None, written: 0 }),
            errors,
            loop_limit: std::sync::OnceLock::new(),
            commands: Default::default(),
        }))
    }

    /// (dispatches, other commands such as copies) recorded since the device opened.
    pub fn command_counts(&self) -> (u64, u64) {
        let [d, c] = &self.commands;
        (d.load(std::sync::atomic::Ordering::Relaxed), c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// (bytes held by live tensors, peak since the last reset).
    pub fn memory_usage(&self) -> (u64, u64) {
        self.pool.usage()
    }

    /// Before a large buffer or texture is allocated anew: give the cached large ones back and
    /// wait for the work recorded so far, so their memory is free before more is taken.
    /// Recording runs far ahead of a software device, and memory given back is only freed once
    /// the work using it is done. (Measured at 512², `bench vqgan`, 2026-12-02: with the caches
    /// kept, 3.2 GB resident; released without the wait, 4.4 GB; released and waited for, with small
    /// allocator blocks, 1.76 GB; and with Winograd's pieces below `LARGE`, 1.50 GB in 18.8 s.)
    pub(crate) fn make_room(&self) {
        let released = self.pool.release_large() + self.textures.release_large();
        if released > 0 {
            self.flush();
            let _ = self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        }
    }

    /// An rgba32float texture from the pool.
    pub(crate) fn texture(&self, width: u32, height: u32, layers: u32) -> Result<super::pool::PooledTexture> {
        self.texture_format(width, height, layers, wgpu::TextureFormat::Rgba32Float)
    }

    /// A texture of `format` from the pool.
    pub(crate) fn texture_format(
        &self,
        width: u32,
        height: u32,
        layers: u32,
        format: wgpu::TextureFormat,
    ) -> Result<super::pool::PooledTexture> {
        self.textures.take_format(width, height, layers, format, || self.make_room())
    }

    pub fn reset_peak_memory(&self) {
        self.pool.reset_peak();
    }

    /// Largest byte range one storage binding may cover on this device.
    pub fn max_binding(&self) -> u64 {
        let device = self.limits.max_storage_buffer_binding_size.min(self.max_buffer());
        self.tuning.max_binding.map_or(device, |m| m.clamp(4096, device) / 16 * 16)
    }

    /// Largest buffer (one tensor) on this device: its own limit, or `Tuning::max_buffer` below it.
    pub fn max_buffer(&self) -> u64 {
        let device = self.limits.max_buffer_size;
        self.tuning.max_buffer.map_or(device, |m| m.clamp(4096, device) / 16 * 16)
    }

    /// Bytes a storage binding's offset must be a multiple of (at least 16, whole vec4s).
    pub fn binding_alignment(&self) -> usize {
        (self.limits.min_storage_buffer_offset_alignment as usize).max(16).max(self.tuning.binding_align.unwrap_or(0))
    }

    pub fn describe(&self) -> String {
        format!("{} ({:?}, {:?})", self.info.name, self.info.backend, self.info.device_type)
    }

    /// A compiled pipeline for `entry` of shader `name`, specialised by
    /// replacing `const NAME` declarations (see `shaders::specialize`). Cached.
    pub fn pipeline(&self, name: &str, entry: &str, consts: &[(&str, String)]) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut key = format!("{name}:{entry}");
        for (k, v) in consts {
            key.push_str(&format!(":{k}={v}"));
        }
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let mkey = format!("{name}|{consts:?}");
        let started = std::time::Instant::now();
        let module = {
            let mut mods = self.modules.lock().unwrap();
            if let Some(m) = mods.get(&mkey) {
                m.clone()
            } else {
                let src = shaders::source(name).ok_or_else(|| anyhow!("unknown shader '{name}'"))?;
                let src = shaders::specialize(src, consts)?;
                let desc =
                    wgpu::ShaderModuleDescriptor { label: Some(name), source: wgpu::ShaderSource::Wgsl(src.into()) };
                let m = if self.tuning.trusted_shaders {
                    unsafe { self.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
                } else {
                    self.device.create_shader_module(desc)
                };
                let m = Arc::new(m);
                mods.insert(mkey, m.clone());
                m
            }
        };
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        }));
        self.check_errors().with_context(|| format!("compiling kernel {key}"))?;
        if self.profile.is_some() {
            eprintln!("profile: compiled {key} in {:.3} s", started.elapsed().as_secs_f64());
        }
        self.pipeline_names.lock().unwrap().insert(Arc::as_ptr(&p) as usize, key.clone());
        self.pipelines.lock().unwrap().insert(key, p.clone());
        Ok(p)
    }

    /// Record one dispatch: binding 0 is the uniform block `params` (the
    /// kernel's WGSL parameter struct), bindings 1.. are the storage ranges in order.
    pub fn dispatch<P: KernelParams>(
        &self,
        pipeline: &wgpu::ComputePipeline,
        params: &P,
        storage: &[Binding],
        groups: [u32; 3],
    ) -> Result<()> {
        let res: Vec<Res> =
            storage.iter().map(|b| Res::Buf(Binding { buffer: b.buffer, offset: b.offset, size: b.size })).collect();
        self.dispatch_res(pipeline, params, &res, groups)
    }

    /// `dispatch` with texture bindings among the resources.
    pub fn dispatch_res<P: KernelParams>(
        &self,
        pipeline: &wgpu::ComputePipeline,
        params: &P,
        resources: &[Res],
        groups: [u32; 3],
    ) -> Result<()> {
        let max = self.max_binding();
        let storage: Vec<&Binding> =
            resources.iter().filter_map(|r| if let Res::Buf(b) = r { Some(b) } else { None }).collect();
        for (i, b) in storage.iter().enumerate() {
            if b.size > max {
                bail!(
                    "kernel {}: a tensor of {} bytes (binding {}) exceeds this device's largest storage binding \
                     ({} bytes), and this kernel does not split its work",
                    self.pipeline_name(pipeline),
                    b.size,
                    i + 1,
                    max
                );
            }
        }
        let lim = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > lim) {
            bail!("dispatch of {groups:?} workgroups exceeds the device limit {lim} per dimension");
        }
        if groups.contains(&0) {
            return Ok(());
        }
        // Uniform blocks are whole 16-byte rows.
        let mut bytes = bytemuck::bytes_of(params).to_vec();
        bytes.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
        let (ubuf, offset) = self.stage_uniforms(&bytes);
        let uniform = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &ubuf,
            offset,
            size: std::num::NonZeroU64::new(bytes.len() as u64),
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform }];
        for (i, r) in resources.iter().enumerate() {
            let resource = match r {
                Res::Buf(b) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: std::num::NonZeroU64::new(b.size.max(4)),
                }),
                Res::Tex(v) => wgpu::BindingResource::TextureView(v),
            };
            entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource });
        }
        let layout = pipeline.get_bind_group_layout(0);
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        if self.stamped() {
            return self.dispatch_stamped(pipeline, &bind, groups);
        }
        if self.profile.is_some() {
            self.sync()?; // finish earlier work so the timing below is this dispatch alone
        }
        {
            let mut pending = self.pending.lock().unwrap();
            let pending = &mut *pending;
            let pass = match &mut pending.pass {
                Some(pass) => pass,
                None => {
                    let pass = Pending::encoder(&mut pending.encoder, &self.device)
                        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None })
                        .forget_lifetime();
                    pending.pass.insert(pass)
                }
            };
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        self.commands[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(prof) = &self.profile {
            let start = std::time::Instant::now();
            self.sync()?;
            let secs = start.elapsed().as_secs_f64();
            let mut prof = prof.lock().unwrap();
            let mut name = self.pipeline_name(pipeline);
            if prof.by_grid {
                name = format!("{name} [{}x{}x{}]", groups[0], groups[1], groups[2]);
            }
            let groups = groups[0] * groups[1] * groups[2];
            prof.times.entry(name).or_default().push((secs, groups));
            return Ok(());
        }
        let mut pending = self.pending.lock().unwrap();
        pending.dispatches += 1;
        if pending.dispatches >= MAX_PENDING_DISPATCHES {
            self.submit_locked(&mut pending);
        }
        Ok(())
    }

    /// Whether dispatches are timed by GPU timestamps (`TAMING_PROFILE=gpu`).
    fn stamped(&self) -> bool {
        self.profile.as_ref().is_some_and(|p| p.lock().unwrap().stamps.is_some())
    }

    /// A dispatch in a pass of its own whose start and end the device stamps; the stamps are
    /// resolved and read when the submission goes (`submit_locked`), every `STAMPED_DISPATCHES`.
    fn dispatch_stamped(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bind: &wgpu::BindGroup,
        groups: [u32; 3],
    ) -> Result<()> {
        let mut name = self.pipeline_name(pipeline);
        if self.profile.as_ref().is_some_and(|p| p.lock().unwrap().by_grid) {
            name = format!("{name} [{}x{}x{}]", groups[0], groups[1], groups[2]);
        }
        let mut pending = self.pending.lock().unwrap();
        let full = {
            let pending = &mut *pending;
            pending.pass = None;
            let mut prof = self.profile.as_ref().expect("stamped profile").lock().unwrap();
            let stamps = prof.stamps.as_mut().expect("stamped profile");
            let i = stamps.pending.len() as u32;
            let encoder = Pending::encoder(&mut pending.encoder, &self.device);
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &stamps.set,
                    beginning_of_pass_write_index: Some(2 * i),
                    end_of_pass_write_index: Some(2 * i + 1),
                }),
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bind, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            drop(pass);
            self.commands[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stamps.pending.push((name, groups[0] * groups[1] * groups[2]));
            stamps.pending.len() == STAMPED_DISPATCHES
        };
        pending.dispatches += 1;
        if full || pending.dispatches >= MAX_PENDING_DISPATCHES {
            self.submit_locked(&mut pending);
        }
        Ok(())
    }

    /// With `TAMING_PROFILE=gpu`: resolve the stamps of the dispatches recorded in `encoder` into
    /// the read-back buffer; returns their labels (None where nothing was stamped).
    fn resolve_stamps(&self, encoder: &mut wgpu::CommandEncoder) -> Option<Vec<(String, u32)>> {
        let mut prof = self.profile.as_ref()?.lock().unwrap();
        let stamps = prof.stamps.as_mut()?;
        if stamps.pending.is_empty() {
            return None;
        }
        let queries = 2 * stamps.pending.len() as u32;
        encoder.resolve_query_set(&stamps.set, 0..queries, &stamps.resolved, 0);
        encoder.copy_buffer_to_buffer(&stamps.resolved, 0, &stamps.readback, 0, 8 * queries as u64);
        Some(std::mem::take(&mut stamps.pending))
    }

    /// Read the resolved stamps once the submission is done and add each dispatch's time.
    fn read_stamps(&self, labels: Vec<(String, u32)>) {
        let Some(profile) = &self.profile else { return };
        let mut prof = profile.lock().unwrap();
        let Some(stamps) = prof.stamps.as_ref() else { return };
        let readback = stamps.readback.clone();
        let period = stamps.period;
        let slice = readback.slice(..16 * labels.len() as u64);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        let _ = self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        if !matches!(rx.recv(), Ok(Ok(()))) {
            eprintln!("profile: the timestamps could not be read back");
            return;
        }
        let ticks: Vec<u64> = match slice.get_mapped_range() {
            Ok(range) => bytemuck::pod_collect_to_vec(&range[..]),
            Err(_) => return,
        };
        readback.unmap();
        for ((name, groups), pair) in labels.into_iter().zip(ticks.chunks_exact(2)) {
            let secs = pair[1].saturating_sub(pair[0]) as f64 * period * 1e-9;
            prof.times.entry(name).or_default().push((secs, groups));
        }
    }

    fn pipeline_name(&self, pipeline: &wgpu::ComputePipeline) -> String {
        let names = self.pipeline_names.lock().unwrap();
        names.get(&(pipeline as *const _ as usize)).cloned().unwrap_or_else(|| "?".into())
    }

    /// Place a dispatch's parameters in the uniform arena of the commands being recorded:
    /// (the arena's buffer, the offset). A full arena is written to its buffer now (before the
    /// commands that read it are submitted) and a new one started.
    fn stage_uniforms(&self, bytes: &[u8]) -> (wgpu::Buffer, u64) {
        let align = (self.limits.min_uniform_buffer_offset_alignment as usize).max(16);
        let mut pending = self.pending.lock().unwrap();
        if pending.uniforms.as_ref().is_some_and(|a| a.next_offset(align) + bytes.len() > UNIFORM_ARENA_BYTES) {
            self.write_uniforms(&mut pending);
        }
        let arena = pending.uniforms.get_or_insert_with(|| UniformArena {
            buffer: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kernel parameters"),
                size: UNIFORM_ARENA_BYTES.max(bytes.len()) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            data: Vec::with_capacity(UNIFORM_ARENA_BYTES),
        });
        let at = arena.next_offset(align);
        arena.data.resize(at, 0);
        arena.data.extend_from_slice(bytes);
        (arena.buffer.clone(), at as u64)
    }

    /// Write the uniform arena's parameters into its buffer (ordered before the next submission).
    fn write_uniforms(&self, pending: &mut Pending) {
        if let Some(arena) = pending.uniforms.take() {
            self.queue.write_buffer(&arena.buffer, 0, &arena.data);
        }
    }

    /// Record a non-dispatch command in order with the dispatches.
    #[track_caller]
    pub(crate) fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let at = std::panic::Location::caller();
        // Profiled, a copy runs alone and is timed like a dispatch: on CPU drivers it is a
        // memcpy on the submitting thread while the workers wait, so it belongs in the table.
        // (Not with GPU timestamps, which time dispatches only.)
        let timed = self.profile.is_some() && !self.stamped();
        if timed {
            let _ = self.sync();
        }
        {
            let mut pending = self.pending.lock().unwrap();
            pending.pass = None; // the encoder takes other commands only outside a pass
            f(Pending::encoder(&mut pending.encoder, &self.device));
        }
        self.commands[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(prof) = self.profile.as_ref().filter(|_| timed) {
            let start = std::time::Instant::now();
            let _ = self.sync();
            let secs = start.elapsed().as_secs_f64();
            prof.lock()
                .unwrap()
                .times
                .entry(format!("(copy at {}:{})", at.file(), at.line()))
                .or_default()
                .push((secs, 0));
        }
    }

    /// Record a buffer-to-buffer copy in order with the dispatches.
    #[track_caller]
    pub fn copy(&self, src: &wgpu::Buffer, src_off: u64, dst: &wgpu::Buffer, dst_off: u64, size: u64) {
        self.record(|enc| enc.copy_buffer_to_buffer(src, src_off, dst, dst_off, size));
    }

    /// Submit everything recorded so far.
    pub fn flush(&self) {
        let mut pending = self.pending.lock().unwrap();
        self.submit_locked(&mut pending);
    }

    /// Submitting under the lock keeps submissions in recording order with
    /// respect to `write_bytes` from other threads: a queue write runs
    /// before the next submission, so no submission may still be on its way.
    fn submit_locked(&self, pending: &mut Pending) {
        self.write_uniforms(pending);
        pending.pass = None;
        let stamped = pending.encoder.as_mut().and_then(|enc| self.resolve_stamps(enc));
        if let Some(enc) = pending.encoder.take() {
            pending.dispatches = 0;
            self.queue.submit([enc.finish()]);
        }
        if let Some(labels) = stamped {
            self.read_stamps(labels);
        }
    }

    /// Submit and wait until the device is idle; reports device errors.
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.wait()
    }

    /// Wait for everything submitted; reports device errors.
    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        self.check_errors()
    }

    pub(crate) fn check_errors(&self) -> Result<()> {
        let mut errs = self.errors.lock().unwrap();
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        if msg.to_ascii_lowercase().contains("out of memory") {
            bail!("GPU out of memory: {msg}");
        }
        bail!("GPU error: {msg}")
    }

    /// Read `size` bytes at `offset` of `buf` back to the host.
    pub fn read_bytes(&self, buf: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        let padded = size.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.copy(buf, offset, &staging, 0, padded);
        self.flush();
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| anyhow!("read-back was cancelled"))?
            .map_err(|e| anyhow!("mapping the read-back buffer: {e}"))?;
        let data = slice.get_mapped_range().map_err(|e| anyhow!("read-back: {e:?}"))?[..size as usize].to_vec();
        staging.unmap();
        Ok(data)
    }

    pub fn write_bytes(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        // The write must follow every recorded command that may still read
        // this (pooled) buffer: submit them first, under the same lock.
        let mut pending = self.pending.lock().unwrap();
        self.submit_locked(&mut pending);
        self.queue.write_buffer(buf, offset, data);
        pending.written += data.len() as u64;
        if pending.written >= MAX_STAGED_BYTES {
            pending.written = 0;
            self.queue.submit([]);
            let _ = self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        }
    }
}

impl Tuning {
    /// These choices with the product tile `entry` instead (its family, register tile and
    /// workgroup shape), if the adapter can run it.
    pub fn with_tile(&self, info: &wgpu::AdapterInfo, features: wgpu::Features, entry: &str) -> Result<Tuning> {
        let t = Tuning::for_adapter(info, features, Some(entry))?;
        Ok(Tuning {
            mm_family: t.mm_family,
            mm_entry: t.mm_entry,
            mm_tm: t.mm_tm,
            mm_tn: t.mm_tn,
            mm_wg_x: t.mm_wg_x,
            mm_wg_y: t.mm_wg_y,
            ..self.clone()
        })
    }

    /// Software rasterisers (lavapipe, SwiftShader, WARP) run invocations as
    /// SIMD lanes on CPU threads: no barriers, large register tiles, long
    /// rows of work per invocation. GPUs: smaller tiles, many invocations.
    pub fn for_adapter(info: &wgpu::AdapterInfo, features: wgpu::Features, mm_tile: Option<&str>) -> Result<Tuning> {
        // A set variable that is not a number is an error naming it, never the default.
        let env = |k: &str| -> Result<Option<u32>> {
            match std::env::var(k) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| anyhow!("{k}={v}: expected a whole number (unset it for the default)")),
                _ => Ok(None),
            }
        };
        let cpu = info.device_type == wgpu::DeviceType::Cpu;
        // On lavapipe (matmul 1024^3, conv-shaped 128x4096x1152, same session):
        // the subgroup tile 32x8 ran 12.2-15.4 / 8.4-9.5 GFLOP/s against
        // 10.2-11.2 / 7.4-7.9 for 16x16 (its A fetches are shared by the 8
        // lanes); 16x16 in turn beat 8x8 (19 vs 11) and 4x4 (8): loads cost
        // more than registers there. GPUs: the double-buffered workgroup tile (blocks of A and B
        // shared through workgroup memory, as GPU BLAS libraries do; a guess until the autotuner
        // times every tile there).
        let default = match (cpu, subgroups_of_8(info, features)) {
            (true, true) => "ms_32x8",
            (true, false) => "mm_16x16",
            (false, _) => "mw_64x64_db",
        };
        let name = mm_tile.unwrap_or(default);
        let tile = MM_TILES.iter().find(|t| t.entry == name || t.entry == format!("mm_{name}")).ok_or_else(|| {
            let names: Vec<_> = MM_TILES.iter().map(|t| t.entry).collect();
            anyhow!("unknown matmul tile '{name}' (TAMING_MM_TILE); choose one of {}", names.join(", "))
        })?;
        if tile.family == "matmul_subgroup" && !subgroups_of_8(info, features) {
            bail!(
                "matmul tile '{}' needs subgroups of 8 lanes; '{}' has {}..{}{}",
                tile.entry,
                info.name,
                info.subgroup_min_size,
                info.subgroup_max_size,
                if features.contains(wgpu::Features::SUBGROUP) { "" } else { " and no subgroup feature" }
            );
        }
        Ok(Tuning {
            mm_family: tile.family,
            mm_entry: tile.entry,
            mm_tm: tile.rows,
            mm_tn: tile.cols,
            mm_wg_x: tile.wg.0,
            mm_wg_y: tile.wg.1,
            chunk: env("TAMING_CHUNK")?.unwrap_or(if cpu { 1024 } else { 256 }),
            // Fused attention keeps head-sized arrays per invocation, which
            // lavapipe spills lane by lane; its matmuls are much faster.
            attention_via_matmul: env("TAMING_ATTENTION_MATMUL")?.map_or(cpu, |v| v != 0),
            // GPUs share key/value loads through workgroup memory (a guess there until the
            // autotuner times it; on lavapipe barriers are expensive).
            attention_tiled: env("TAMING_ATTENTION_TILED")?.map_or(!cpu, |v| v != 0),
            // On lavapipe 4 texels (16 columns) per invocation streamed a 2048 x 512
            // weight in 0.9-1.5 ms against 1.3-2.4 for 2; GPUs want more invocations.
            gemv_texels: env("TAMING_GEMV_TEXELS")?.unwrap_or(if cpu { 4 } else { 1 }),
            // CPU devices load storage buffers lane by lane, so the lanes share x
            // (needs 8-lane subgroups; GPUs read x through their caches).
            gemv_subgroup: subgroups_of_8(info, features) && env("TAMING_GEMV_SG")?.map_or(cpu, |v| v != 0),
            // GPUs: many invocations per column, each on a slice of K (the per-column entries
            // streamed weights at 15 GB/s on an H200); CPU devices pay for its barrier.
            gemv_split_k: env("TAMING_GEMV_SPLIT_K")?.map_or(!cpu, |v| v != 0),
            // Buffer loads in loops run lane by lane on CPU devices.
            kv_cache_texture: env("TAMING_KV_TEXTURE")?.map_or(cpu, |v| v != 0),
            // 16 keys an invocation kept 8 heads x 256 tokens at 128 invocations: on the H200
            // decoding's attention was a third of a sampling step's GPU time.
            decode_key_chunk: match env("TAMING_DECODE_KEY_CHUNK")? {
                Some(0) => bail!("TAMING_DECODE_KEY_CHUNK=0: decoding's attention takes at least one key an invocation"),
                v => v.unwrap_or(if cpu { 16 } else { 4 }),
            },
            // 4x fewer multiply-adds for a few more passes over memory: a gain
            // where the products are bound by arithmetic (measured on
            // lavapipe); unmeasured on GPUs, so off there unless asked for.
            winograd: match env("TAMING_WINOGRAD")? {
                Some(v) if v != 0 && !winograd_works(info) => bail!(
                    "TAMING_WINOGRAD=1: Winograd convolutions are not available on the {:?} backend (they computed wrong \
                     results on Mesa's GL; `taming check` shows the rest)", info.backend),
                Some(v) => v != 0,
                None => cpu && winograd_works(info),
            },
            // Measured on lavapipe; GPUs store into textures natively (the autotuner times both).
            textures_via_buffer: env("TAMING_TEXTURES_VIA_BUFFER")?.map_or(cpu, |v| v != 0),
            // Buffer loads run lane by lane on CPU devices; a memcpy and texture fetches do not.
            reads_via_texture: env("TAMING_READS_TEXTURE")?.map_or(cpu, |v| v != 0),
            // Measured on lavapipe: buffer reads win for elementwise ops (see the field).
            elementwise_via_texture: env("TAMING_ELEMENTWISE_TEXTURE")?.is_some_and(|v| v != 0),
            buffer_read_max_values: env("TAMING_BUFFER_READ_MAX_VALUES")?.map_or(1 << 16, |v| v as usize),
            // GPUs reduce in workgroup memory; on lavapipe barriers are expensive (unmeasured on
            // GPUs: the autotuner times both there).
            stats_workgroup: env("TAMING_STATS_WORKGROUP")?.map_or(!cpu, |v| v != 0),
            stats_subgroup: match env("TAMING_STATS_SG")? {
                Some(v) if v != 0 && !features.contains(wgpu::Features::SUBGROUP) => {
                    bail!("TAMING_STATS_SG=1: '{}' has no subgroup feature", info.name)
                }
                v => v.map_or(!cpu && features.contains(wgpu::Features::SUBGROUP), |v| v != 0),
            },
            // Measured on lavapipe (demo step, alternating: 0.221-0.234 -> 0.218-0.224 s).
            stats_lanes: match env("TAMING_STATS_LANES")? {
                Some(v) if v != 0 && !subgroups_of_8(info, features) => {
                    bail!("TAMING_STATS_LANES=1: '{}' has no subgroups of exactly 8 lanes", info.name)
                }
                v => v.map_or(cpu && subgroups_of_8(info, features), |v| v != 0),
            },
            norm_backward_lanes: match env("TAMING_NORM_BACKWARD_LANES")? {
                Some(v) if v != 0 && !subgroups_of_8(info, features) => {
                    bail!("TAMING_NORM_BACKWARD_LANES=1: '{}' has no subgroups of exactly 8 lanes", info.name)
                }
                v => v.map_or(cpu && subgroups_of_8(info, features), |v| v != 0),
            },
            // GPUs: a row per invocation leaves most lanes idle when rows are few (a guess there
            // until the autotuner times it; on lavapipe barriers are expensive).
            reduce_subgroup: match env("TAMING_REDUCE_SG")? {
                Some(v) if v != 0 && !features.contains(wgpu::Features::SUBGROUP) => {
                    bail!("TAMING_REDUCE_SG=1: '{}' has no subgroup feature", info.name)
                }
                v => v.map_or(!cpu && features.contains(wgpu::Features::SUBGROUP), |v| v != 0),
            },
            pack_kernel: env("TAMING_PACK_KERNEL")?.is_some_and(|v| v != 0),
            trusted_shaders: env("TAMING_TRUSTED_SHADERS")? == Some(1),
            im2col_budget: env("TAMING_IM2COL_BUDGET")?.map_or(64 << 20, |v| v as usize),
            conv_dx_transposed: env("TAMING_CONV_DX_TRANSPOSED")?.is_none_or(|v| v != 0),
            conv_dw_direct: env("TAMING_CONV_DW_DIRECT")?.is_none_or(|v| v != 0),
            conv_channel_packed: env("TAMING_CONV_CHANNEL_PACKED")?.is_none_or(|v| v != 0),
            convt_narrow: env("TAMING_CONVT_NARROW")?.is_none_or(|v| v != 0),
            // GPUs: no im2col texture (a guess there until the autotuner times it; on lavapipe
            // barriers are expensive).
            conv_workgroup: env("TAMING_CONV_WORKGROUP")?.map_or(!cpu, |v| v != 0),
            f16_products: match env("TAMING_F16_PRODUCTS")? {
                Some(v) if v != 0 && !features.contains(wgpu::Features::SHADER_F16) => {
                    bail!("TAMING_F16_PRODUCTS=1: '{}' has no shader-f16 feature", info.name)
                }
                v => v.is_some_and(|v| v != 0),
            },
            max_binding: env("TAMING_MAX_BINDING")?.map(u64::from),
            binding_align: match env("TAMING_BINDING_ALIGN")? {
                Some(a) if !(a as usize).is_power_of_two() => {
                    bail!("TAMING_BINDING_ALIGN={a}: a binding alignment is a power of two")
                }
                a => a.map(|a| a as usize),
            },
            max_buffer: env("TAMING_MAX_BUFFER")?.map(u64::from),
        })
    }
}

/// On a software device (lavapipe) GPU memory is the process's heap: glibc's malloc serves
/// blocks below its dynamic mmap threshold (up to 32 MiB) from its arenas and keeps them when they
/// are freed, so device memory given back would still count. A fixed 1 MiB threshold maps every
/// device allocation on its own, and unmaps it when freed (512², `bench vqgan`: 1.39 → 1.15 GB
/// resident, the same time within noise).
fn return_freed_memory_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes a glibc tuning parameter; any value is valid.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Winograd's kernels computed wrong results on llvmpipe through wgpu's GL
/// backend (naga's GLSL; everything else there matches the CPU references),
/// so GL never takes them.
pub fn winograd_works(info: &wgpu::AdapterInfo) -> bool {
    info.backend != wgpu::Backend::Gl
}

/// A register tile of the matmul product (see tools/gen_matmul_wgsl.py).
pub struct MmTile {
    /// Shader family: `matmul`, or `matmul_subgroup` (needs 8-lane subgroups).
    pub family: &'static str,
    pub entry: &'static str,
    /// Rows and columns of C per invocation.
    pub rows: u32,
    pub cols: u32,
    /// Workgroup shape.
    pub wg: (u32, u32),
}

pub use super::tiles::MM_TILES;

/// The subgroup tiles assume exactly 8 lanes (lavapipe with AVX2).
pub(crate) fn subgroups_of_8(info: &wgpu::AdapterInfo, features: wgpu::Features) -> bool {
    features.contains(wgpu::Features::SUBGROUP) && info.subgroup_min_size == 8 && info.subgroup_max_size == 8
}
