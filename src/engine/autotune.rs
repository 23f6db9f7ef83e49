//! Autotuning: each kernel choice of `Tuning` (the product tile, Winograd, how norms read their
//! input, attention by matmuls or fused, the row products, the KV cache's texture, training's
//! convolution paths) is timed on the adapter at hand, candidate by candidate, on a workload of
//! the kernels it changes, and the fastest is kept. A candidate enters only after the quick check
//! of those kernel families passes on it. The winners are cached per adapter, driver and engine
//! (kernel sources included) in `$XDG_CACHE_HOME/taming-wgpu/tuning.json`; later runs apply them
//! on top of the built-in choices. GPUs are tuned at first use (the built-in choices there are
//! guesses); software devices keep the choices measured on lavapipe unless `taming tune` is run.
//! `TAMING_AUTOTUNE=0` turns it off; an environment variable that sets a choice
//! (`TAMING_WINOGRAD=1`, ...) wins over the cache and is not tuned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use super::check::{self, Checker};
use super::device::{Gpu, Tuning, MM_TILES};
use super::kernels::{self, attention, conv2d::ConvSpec, matmul, norm};
use super::{Tape, Tensor};

const FORMAT: &str = "taming-wgpu tuning 1";
/// A candidate must beat the current choice by this much to replace it (timing noise).
const MARGIN: f64 = 0.05;

/// A workload, set up once on a device: each call records its kernels (the timer submits and
/// waits, after as many calls as make a run long enough to time: see `median_ms`).
type Work = Box<dyn FnMut() -> Result<()>>;

/// What a knob sets.
#[derive(Clone, Copy)]
enum Choice {
    /// An on/off field (its accessor), offered only where `offered` holds for the adapter.
    Flag(fn(&mut Tuning) -> &mut bool, fn(&Gpu) -> bool),
    /// The product tile (`MM_TILES` entries the adapter can run).
    Tile,
    /// Texels per invocation of the row products: 1, 2 or 4.
    GemvTexels,
    /// Keys per invocation of decoding's attention: 4 or 16.
    DecodeKeyChunk,
    /// The most values a single-read kernel reads from a buffer rather than a texture copy: 0
    /// (always the copy) or 65,536; offered where the device reads through copies at all.
    BufferReadMax,
}

/// `Choice::BufferReadMax`'s values.
const BUFFER_READ_MAX_VALUES: [usize; 2] = [0, 1 << 16];

/// One tunable choice: what it sets, the environment variable that pins it, the check families
/// its kernels belong to, and the workload that times it.
struct Knob {
    name: &'static str,
    env: &'static str,
    choice: Choice,
    families: &'static [&'static str],
    workload: fn(&Arc<Gpu>) -> Result<Work>,
}

impl Knob {
    fn values(&self, gpu: &Gpu) -> Vec<String> {
        match self.choice {
            Choice::Flag(_, offered) if offered(gpu) => vec!["false".into(), "true".into()],
            Choice::Flag(..) => vec![self.value(&gpu.tuning)],
            Choice::Tile => MM_TILES
                .iter()
                .filter(|t| gpu.tuning.with_tile(&gpu.info, gpu.features, t.entry).is_ok())
                .map(|t| t.entry.to_string())
                .collect(),
            Choice::GemvTexels => vec!["1".into(), "2".into(), "4".into()],
            Choice::DecodeKeyChunk => vec!["4".into(), "16".into()],
            Choice::BufferReadMax if gpu.tuning.reads_via_texture => {
                BUFFER_READ_MAX_VALUES.iter().map(|v| v.to_string()).collect()
            }
            Choice::BufferReadMax => vec![self.value(&gpu.tuning)],
        }
    }

    fn value(&self, t: &Tuning) -> String {
        match self.choice {
            Choice::Flag(field, _) => (*field(&mut t.clone())).to_string(),
            Choice::Tile => t.mm_entry.to_string(),
            Choice::GemvTexels => t.gemv_texels.to_string(),
            Choice::DecodeKeyChunk => t.decode_key_chunk.to_string(),
            Choice::BufferReadMax => t.buffer_read_max_values.to_string(),
        }
    }

    /// `base` with this knob at `value` (None: not a value it takes here).
    fn set(&self, gpu: &Gpu, base: &Tuning, value: &str) -> Option<Tuning> {
        let mut t = base.clone();
        match self.choice {
            Choice::Flag(field, _) => *field(&mut t) = value.parse().ok()?,
            Choice::Tile => t = base.with_tile(&gpu.info, gpu.features, value).ok()?,
            Choice::GemvTexels => t.gemv_texels = value.parse().ok().filter(|n| [1, 2, 4].contains(n))?,
            Choice::DecodeKeyChunk => t.decode_key_chunk = value.parse().ok().filter(|n| [4, 16].contains(n))?,
            Choice::BufferReadMax => {
                t.buffer_read_max_values = value.parse().ok().filter(|n| BUFFER_READ_MAX_VALUES.contains(n))?
            }
        }
        Some(t)
    }
}

fn everywhere(_: &Gpu) -> bool {
    true
}

fn rand(gpu: &Arc<Gpu>, shape: &[usize], seed: u64) -> Result<Tensor> {
    Tensor::from_f32(gpu, &kernels::random_vec(shape.iter().product(), seed, 1.0), shape)
}

/// Products as the models run them: square, tall-skinny (a convolution's), and ragged; on GPUs
/// also a GPT's (8 x 256 tokens through the 512 -> 1536 attention projection), a size where the
/// tiles differ by their arithmetic rather than by their launch costs (H200: the GPT training
/// step 60 ms with mw_64x64_db, 86 ms with mm_4x4, which timings of the small ones alone chose).
fn product_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let mut pairs = vec![([512, 512], [512, 512]), ([2048, 288], [288, 64]), ([300, 500], [500, 400])];
    if gpu.info.device_type != wgpu::DeviceType::Cpu {
        pairs.push(([2048, 512], [512, 1536]));
    }
    let ops: Vec<(Tensor, Tensor)> = pairs
        .iter()
        .enumerate()
        .map(|(i, (a, b))| Ok((rand(gpu, a, i as u64)?, rand(gpu, b, 10 + i as u64)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(move || {
        for (a, b) in &ops {
            matmul::matmul(a, b, false, false, None)?;
        }
        Ok(())
    }))
}

/// 3x3 convolutions of the VQGAN's shapes (inference); on GPUs also one of its 128-channel
/// layers at 64x64 (`bench kernels`' convolution).
fn conv_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let mut cases = vec![([2, 64, 32, 32], 64), ([2, 128, 16, 16], 128)];
    if gpu.info.device_type != wgpu::DeviceType::Cpu {
        cases.push(([1, 128, 64, 64], 128));
    }
    let ops: Vec<(Tensor, Tensor)> = cases
        .iter()
        .enumerate()
        .map(|(i, (x, cout))| Ok((rand(gpu, x, i as u64)?, rand(gpu, &[*cout, x[1], 3, 3], 20 + i as u64)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(move || {
        for (x, w) in &ops {
            kernels::conv2d::conv2d(x, w, None, ConvSpec::same(1, 1))?;
        }
        Ok(())
    }))
}

/// What `Tuning::elementwise_via_texture` changes: a + b, GELU and its backward on 1M floats
/// (an activation of the demo VQGAN's batch, a GPT block's hidden state), recorded back to back
/// as a training step records them.
fn elementwise_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    use kernels::elementwise::{self, Unary};
    let (a, b) = (rand(gpu, &[1 << 20], 1)?, rand(gpu, &[1 << 20], 2)?);
    Ok(Box::new(move || {
        elementwise::add(&a, &b)?;
        elementwise::unary(&a, Unary::Gelu)?;
        elementwise::unary_backward(&a, &b, Unary::Gelu)?;
        Ok(())
    }))
}

fn norm_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let x = rand(gpu, &[4, 128, 32, 32], 1)?;
    let (g, b) = (rand(gpu, &[128], 2)?, rand(gpu, &[128], 3)?);
    Ok(Box::new(move || {
        norm::group_norm(&x, &g, &b, true)?;
        Ok(())
    }))
}

/// The group norms of a small VQGAN's training step: the demo's 8 images of 32 channels at 32x32
/// and 16x16, and of 64 at 8x8, where a statistic has at most `norm::LANES_MAX_PER_STAT` values.
const SMALL_NORM_SHAPES: [[usize; 4]; 3] = [[8, 32, 32, 32], [8, 32, 16, 16], [8, 64, 8, 8]];

/// What `Tuning::stats_lanes` changes: the group norms (+ swish) of `SMALL_NORM_SHAPES`.
fn small_norms_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let xs: Vec<(Tensor, Tensor, Tensor)> = SMALL_NORM_SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((rand(gpu, s, 1 + i as u64)?, rand(gpu, &[s[1]], 7)?, rand(gpu, &[s[1]], 8)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(move || {
        for (x, g, b) in &xs {
            norm::group_norm(x, g, b, true)?;
        }
        Ok(())
    }))
}

/// What `Tuning::norm_backward_lanes` changes: the backward of the group norms of
/// `SMALL_NORM_SHAPES` (with the swish after them, as in a ResnetBlock).
fn small_norms_backward_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let kind = norm::NormKind::Group { groups: 32 };
    let cases = SMALL_NORM_SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (x, g, b) = (rand(gpu, s, 11 + i as u64)?, rand(gpu, &[s[1]], 17)?, rand(gpu, &[s[1]], 18)?);
            let stats = norm::statistics(&x, kind, 1e-6)?;
            Ok((x, rand(gpu, s, 21 + i as u64)?, stats, g, b))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Box::new(move || {
        for (x, dy, stats, g, b) in &cases {
            norm::norm_swish_backward(x, dy, stats, g, b, kind, 1e-6, None)?;
        }
        Ok(())
    }))
}

/// What `Tuning::reads_via_texture` changes besides the group norm: a transformer block's slice of
/// a training step (a layer norm, a product with its operand packs and bias, GELU, a residual
/// add, the masked softmax of its attention, all forward and backward: the norm backward, bias
/// sums and the elementwise backward) and an Adam update of its weights. On a GPU that has the
/// choice the packs and updates differ more than the norm (the H200's tuner chose by the norm
/// alone while the knob also moved the GPT step's packs, elementwise ops and optimizer).
fn texture_reads_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let mut group_norm = norm_workload(gpu)?;
    let x = rand(gpu, &[4, 128, 256], 1)?;
    let (w, bias) = (rand(gpu, &[256, 256], 2)?, rand(gpu, &[256], 3)?);
    let (gamma, beta) = (rand(gpu, &[256], 4)?, rand(gpu, &[256], 5)?);
    let scores = rand(gpu, &[4, 128, 128], 6)?;
    let config = crate::engine::optim::AdamConfig::adamw(1e-4, 0.9, 0.95);
    let mut adam = crate::engine::optim::Adam::new(config, &[(w.clone(), 0.01), (bias.clone(), 0.0)])?;
    Ok(Box::new(move || {
        group_norm()?;
        let t = Tape::new();
        let (xv, wv, bv) = (t.leaf(x.clone()), t.leaf(w.clone()), t.leaf(bias.clone()));
        let (gv, be) = (t.leaf(gamma.clone()), t.leaf(beta.clone()));
        let h = t.norm(&xv, norm::NormKind::Layer, &gv, &be, 1e-5)?;
        let h = t.unary(&t.matmul(&h, &wv, false, false, Some(&bv))?, kernels::elementwise::Unary::Gelu)?;
        let y = t.add(&xv, &h)?;
        let p = t.softmax(&t.leaf(scores.clone()), 0.125)?;
        let loss = t.add(&t.reduce(&y, kernels::reduce::Reduce::Sum)?, &t.reduce(&p, kernels::reduce::Reduce::Sum)?)?;
        let grads = t.backward(&loss)?;
        let missing = || anyhow!("internal: no gradient for the workload's weights");
        adam.update(&[grads.get(&wv).ok_or_else(missing)?, grads.get(&bv).ok_or_else(missing)?])
    }))
}

/// What `Tuning::buffer_read_max_values` changes: a training step's reads of small tensors, as
/// the demo VQGAN's 8x8 blocks make them (batch 8, 64 channels): an AttnBlock (1x1 convolutions,
/// the scores' transposed operand, the softmax, their backward with dW's slice sums and bias
/// sums) and a 3x3 convolution's backward (the channel packs of dY and x).
fn small_reads_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let (b, c, side) = (8, 64, 8);
    let x = rand(gpu, &[b, c, side, side], 1)?;
    let weights = (0..4).map(|i| rand(gpu, &[c, c, 1, 1], 2 + i)).collect::<Result<Vec<_>>>()?;
    let conv3 = rand(gpu, &[c, c, 3, 3], 7)?;
    let bias = rand(gpu, &[c], 8)?;
    Ok(Box::new(move || {
        let t = Tape::new();
        let xv = t.leaf(x.clone());
        let wv: Vec<_> = weights.iter().map(|w| t.leaf(w.clone())).collect();
        let bv = t.leaf(bias.clone());
        let one = ConvSpec::same(1, 0);
        let [q, k, v] = [0, 1, 2].map(|i| t.conv2d(&xv, &wv[i], Some(&bv), one));
        let flat = |v: Result<crate::engine::Var>| t.reshape(&v?, &[b, c, side * side]);
        let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
        let w = t.softmax(&t.matmul(&q, &k, true, false, None)?, 0.125)?;
        let h = t.reshape(&t.matmul(&v, &w, false, true, None)?, &[b, c, side, side])?;
        let h = t.conv2d(&h, &wv[3], Some(&bv), one)?;
        let y = t.conv2d(&h, &t.leaf(conv3.clone()), Some(&bv), ConvSpec::same(1, 1))?;
        let loss = t.reduce(&y, kernels::reduce::Reduce::Sum)?;
        drop(t.backward(&loss)?);
        Ok(())
    }))
}

/// Row reductions: softmax as the VQGAN's attention runs it at 16x16 (256 rows of 256, batch 4),
/// forward and backward, the GPT's logits (16 rows of 1024), and a bias gradient's sums (batch 8
/// of 128 channels x 32x32).
fn reduction_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let (scores, logits) = (rand(gpu, &[4, 256, 256], 1)?, rand(gpu, &[16, 1024], 2)?);
    let dy = rand(gpu, &[8, 128, 1024], 3)?;
    Ok(Box::new(move || {
        let y = kernels::softmax::softmax(&scores, 0.125)?;
        kernels::softmax::softmax_backward(&y, &scores, 0.125)?;
        kernels::softmax::softmax(&logits, 1.0)?;
        kernels::reduce::sum_dim(&dy, 2)?;
        Ok(())
    }))
}

/// Causal attention of 8 heads over [batch, tokens, channels], forward and backward.
fn attention_of(gpu: &Arc<Gpu>, shape: [usize; 3]) -> Result<Work> {
    let [q, k, v] = [1, 2, 3].map(|s| rand(gpu, &shape, s));
    let (q, k, v) = (q?, k?, v?);
    Ok(Box::new(move || {
        let t = Tape::new();
        let (qv, kv, vv) = (t.leaf(q.clone()), t.leaf(k.clone()), t.leaf(v.clone()));
        let y = t.attention(&qv, &kv, &vv, 8, true)?;
        t.backward(&t.reduce(&y, kernels::reduce::Reduce::Sum)?)?;
        Ok(())
    }))
}

/// Training's attention: 128 tokens, 8 heads of 64.
fn attention_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    attention_of(gpu, [2, 128, 512])
}

/// Short attention (64 tokens: below the matmul path's threshold, so the fused or tiled kernel
/// runs), 8 heads of 32, batch 8 (the demo GPT's shapes).
fn short_attention_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    attention_of(gpu, [8, 64, 256])
}

/// One-row products (decoding): a 512-wide token through a 2048 x 512 Linear.
fn row_product_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let x = rand(gpu, &[1, 512], 1)?;
    let w = matmul::pack_row_weight(&rand(gpu, &[2048, 512], 2)?, true, false)?;
    Ok(Box::new(move || {
        for _ in 0..8 {
            matmul::gemv(&x, &w, None, false)?;
        }
        Ok(())
    }))
}

/// Decoding attention over a KV cache of 256 rows, 512 wide.
fn kv_cache_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let rows = rand(gpu, &[1, 256, 3 * 512], 1)?;
    let cache = attention::KvCache::from_rows(rows, gpu.tuning.kv_cache_texture)?;
    Ok(Box::new(move || {
        for pos in (0..256).step_by(8) {
            cache.commit(pos);
            cache.attend(8, pos)?;
        }
        Ok(())
    }))
}

/// A training step's convolutions: 3x3 and a strided downsample, forward and backward.
fn training_conv_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let x = rand(gpu, &[4, 32, 32, 32], 1)?;
    let (w1, w2) = (rand(gpu, &[64, 32, 3, 3], 2)?, rand(gpu, &[64, 64, 3, 3], 3)?);
    Ok(Box::new(move || {
        let t = Tape::new();
        let (xv, a, b) = (t.leaf(x.clone()), t.leaf(w1.clone()), t.leaf(w2.clone()));
        let h = t.conv2d(&xv, &a, None, ConvSpec::same(1, 1))?;
        let y = t.conv2d(&t.pad(&h, [0, 1, 0, 1])?, &b, None, ConvSpec::same(2, 0))?;
        t.backward(&t.reduce(&y, kernels::reduce::Reduce::Sum)?)?;
        Ok(())
    }))
}

/// Inference's and training's convolutions (the workgroup tiles serve the forward and dW).
fn conv_all_workload(gpu: &Arc<Gpu>) -> Result<Work> {
    let (mut inference, mut training) = (conv_workload(gpu)?, training_conv_workload(gpu)?);
    Ok(Box::new(move || {
        inference()?;
        training()
    }))
}

/// Every knob, in the order they are tuned (products first: the others run on them).
fn knobs() -> Vec<Knob> {
    use Choice::*;
    let knob = |name, env, choice, families, workload| Knob { name, env, choice, families, workload };
    let flag = |field, offered| Flag(field, offered);
    vec![
        knob("mm_tile", "TAMING_MM_TILE", Tile, &["matmul", "conv2d"], product_workload),
        knob(
            "pack_kernel",
            "TAMING_PACK_KERNEL",
            flag(|t| &mut t.pack_kernel, everywhere),
            &["matmul"],
            product_workload,
        ),
        knob(
            "winograd",
            "TAMING_WINOGRAD",
            flag(|t| &mut t.winograd, |g| super::device::winograd_works(&g.info)),
            &["conv2d", "winograd"],
            conv_workload,
        ),
        knob(
            "textures_via_buffer",
            "TAMING_TEXTURES_VIA_BUFFER",
            flag(|t| &mut t.textures_via_buffer, everywhere),
            &["conv2d", "winograd", "conv2d_backward"],
            conv_workload,
        ),
        knob(
            "reads_via_texture",
            "TAMING_READS_TEXTURE",
            flag(|t| &mut t.reads_via_texture, everywhere),
            &[
                "norm",
                "conv2d",
                "winograd",
                "conv2d_backward",
                "data_movement",
                "elementwise",
                "matmul",
                "optimizer",
                "softmax",
                "backward",
            ],
            texture_reads_workload,
        ),
        knob(
            "elementwise_via_texture",
            "TAMING_ELEMENTWISE_TEXTURE",
            flag(|t| &mut t.elementwise_via_texture, |g| g.tuning.reads_via_texture),
            &["elementwise"],
            elementwise_workload,
        ),
        knob(
            "stats_workgroup",
            "TAMING_STATS_WORKGROUP",
            flag(|t| &mut t.stats_workgroup, everywhere),
            &["norm"],
            norm_workload,
        ),
        knob(
            "stats_subgroup",
            "TAMING_STATS_SG",
            flag(|t| &mut t.stats_subgroup, |g| g.features.contains(wgpu::Features::SUBGROUP)),
            &["norm"],
            norm_workload,
        ),
        knob(
            "stats_lanes",
            "TAMING_STATS_LANES",
            flag(|t| &mut t.stats_lanes, |g| super::device::subgroups_of_8(&g.info, g.features)),
            &["norm"],
            small_norms_workload,
        ),
        knob(
            "norm_backward_lanes",
            "TAMING_NORM_BACKWARD_LANES",
            flag(|t| &mut t.norm_backward_lanes, |g| super::device::subgroups_of_8(&g.info, g.features)),
            &["backward"],
            small_norms_backward_workload,
        ),
        knob(
            "reduce_subgroup",
            "TAMING_REDUCE_SG",
            flag(|t| &mut t.reduce_subgroup, |g| g.features.contains(wgpu::Features::SUBGROUP)),
            &["softmax", "attention", "backward", "data_movement", "conv2d_backward"],
            reduction_workload,
        ),
        knob(
            "attention_via_matmul",
            "TAMING_ATTENTION_MATMUL",
            flag(|t| &mut t.attention_via_matmul, everywhere),
            &["attention", "backward"],
            attention_workload,
        ),
        knob(
            "attention_tiled",
            "TAMING_ATTENTION_TILED",
            flag(|t| &mut t.attention_tiled, everywhere),
            &["attention", "backward"],
            short_attention_workload,
        ),
        knob(
            "gemv_subgroup",
            "TAMING_GEMV_SG",
            flag(
                |t| &mut t.gemv_subgroup,
                |g| g.features.contains(wgpu::Features::SUBGROUP) && g.info.subgroup_min_size == 8,
            ),
            &["row_products"],
            row_product_workload,
        ),
        knob(
            "gemv_split_k",
            "TAMING_GEMV_SPLIT_K",
            flag(|t| &mut t.gemv_split_k, everywhere),
            &["row_products"],
            row_product_workload,
        ),
        knob("gemv_texels", "TAMING_GEMV_TEXELS", GemvTexels, &["row_products"], row_product_workload),
        knob("decode_key_chunk", "TAMING_DECODE_KEY_CHUNK", DecodeKeyChunk, &["attention"], kv_cache_workload),
        knob(
            "buffer_read_max_values",
            "TAMING_BUFFER_READ_MAX_VALUES",
            BufferReadMax,
            &["matmul", "conv2d", "conv2d_backward", "backward", "softmax", "attention", "data_movement"],
            small_reads_workload,
        ),
        knob(
            "kv_cache_texture",
            "TAMING_KV_TEXTURE",
            flag(|t| &mut t.kv_cache_texture, everywhere),
            &["attention"],
            kv_cache_workload,
        ),
        knob(
            "conv_workgroup",
            "TAMING_CONV_WORKGROUP",
            flag(|t| &mut t.conv_workgroup, everywhere),
            &["conv2d", "conv2d_backward"],
            conv_all_workload,
        ),
        knob(
            "conv_channel_packed",
            "TAMING_CONV_CHANNEL_PACKED",
            flag(|t| &mut t.conv_channel_packed, everywhere),
            &["conv2d", "conv2d_backward", "backward"],
            training_conv_workload,
        ),
        knob(
            "convt_narrow",
            "TAMING_CONVT_NARROW",
            flag(|t| &mut t.convt_narrow, everywhere),
            &["conv2d_backward", "backward"],
            training_conv_workload,
        ),
        knob(
            "conv_dw_direct",
            "TAMING_CONV_DW_DIRECT",
            flag(|t| &mut t.conv_dw_direct, everywhere),
            &["conv2d_backward", "backward"],
            training_conv_workload,
        ),
        knob(
            "conv_dx_transposed",
            "TAMING_CONV_DX_TRANSPOSED",
            flag(|t| &mut t.conv_dx_transposed, everywhere),
            &["conv2d_backward", "backward"],
            training_conv_workload,
        ),
    ]
}

/// What tuning found for one knob: each candidate's median time (None: it failed its check)
/// and the value kept.
#[derive(Clone, Debug)]
pub struct KnobResult {
    pub name: String,
    pub times: Vec<(String, Option<f64>)>,
    pub chosen: String,
    /// The built-in value before tuning.
    pub built_in: String,
}

/// The winners: knob -> value.
pub type Choices = BTreeMap<String, String>;

/// The cache's key: adapter, driver, engine version and a hash of every kernel's source.
pub fn key(gpu: &Gpu) -> String {
    format!("{} | kernels {:016x}", check::verdict::adapter_identity(gpu), super::shaders::sources_hash())
}

/// The cache file beside the self-check verdicts.
pub fn cache_file() -> Option<PathBuf> {
    check::verdict::cache_file().map(|p| p.with_file_name("tuning.json"))
}

fn read_all(path: &Path) -> Option<serde_json::Map<String, Value>> {
    check::verdict::read_cache(path, FORMAT, "adapters")
}

/// The cached winners for `key`.
pub fn lookup(path: &Path, key: &str) -> Option<Choices> {
    let all = read_all(path)?;
    let c = all.get(key)?.get("choices")?.as_object()?;
    c.iter().map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()
}

/// Store `results` under `key` (temp file + rename; other adapters' entries kept).
pub fn store(path: &Path, key: &str, results: &[KnobResult]) -> Result<()> {
    let mut all = read_all(path).unwrap_or_default();
    let choices: serde_json::Map<String, Value> = results.iter().map(|r| (r.name.clone(), json!(r.chosen))).collect();
    let ms: serde_json::Map<String, Value> = results
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                json!(r.times.iter().map(|(v, t)| (v.clone(), json!(t))).collect::<serde_json::Map<_, _>>()),
            )
        })
        .collect();
    all.insert(key.to_string(), json!({"choices": choices, "ms": ms}));
    check::verdict::write_cache(path, FORMAT, "adapters", all)
}

/// `base` with `choices` applied, except the knobs an environment variable pins; unknown knobs
/// or values (a cache from another version) are skipped.
pub fn apply(gpu: &Gpu, base: &Tuning, choices: &Choices) -> Tuning {
    let mut t = base.clone();
    for k in knobs() {
        if std::env::var_os(k.env).is_some() {
            continue;
        }
        if let Some(v) = choices.get(k.name) {
            if let Some(next) = k.set(gpu, &t, v) {
                t = next;
            }
        }
    }
    t
}

/// Whether `TAMING_AUTOTUNE=0` turns tuning off.
pub fn disabled_by_env() -> bool {
    std::env::var("TAMING_AUTOTUNE").is_ok_and(|v| v == "0")
}

/// The names of the knobs, in tuning order.
pub fn knob_names() -> Vec<&'static str> {
    knobs().iter().map(|k| k.name).collect()
}

/// Time every candidate of every knob (those `only` names, when not empty) not pinned by the
/// environment on `gpu`'s adapter, in order, each knob starting from the winners so far; `runs`
/// timed runs per candidate (the median). `progress` sees (knob, value) before each candidate.
pub fn tune(
    gpu: &Arc<Gpu>,
    runs: usize,
    only: &[String],
    mut progress: impl FnMut(&str, &str),
) -> Result<Vec<KnobResult>> {
    if let Some(bad) = only.iter().find(|o| !knob_names().contains(&o.as_str())) {
        anyhow::bail!("no kernel choice '{bad}' to tune (choices: {})", knob_names().join(", "));
    }
    let mut current = gpu.tuning.clone();
    let mut out = Vec::new();
    for k in knobs().into_iter().filter(|k| only.is_empty() || only.iter().any(|o| o == k.name)) {
        let built_in = k.value(&current);
        if std::env::var_os(k.env).is_some() {
            out.push(KnobResult { name: k.name.into(), times: vec![], chosen: built_in.clone(), built_in });
            continue;
        }
        let mut times = Vec::new();
        for v in k.values(gpu) {
            progress(k.name, &v);
            let Some(tuning) = k.set(gpu, &current, &v) else { continue };
            let device = gpu.variant(tuning)?;
            let mut c = Checker::new(device.clone(), &format!("{}={v}", k.name), true);
            for f in k.families {
                c.run(check::family(f).ok_or_else(|| anyhow!("internal: no check family {f}"))?);
            }
            if !c.failures().is_empty() {
                times.push((v, None));
                continue;
            }
            times.push((v, Some(median_ms(&k, &device, runs)?)));
        }
        let time_of = |v: &str| times.iter().find(|(x, _)| x == v).and_then(|(_, t)| *t);
        let best = times.iter().filter_map(|(v, t)| t.map(|t| (v.clone(), t))).min_by(|a, b| a.1.total_cmp(&b.1));
        // Keep the built-in value unless another is clearly faster (or it failed its check).
        let chosen = match (best, time_of(&built_in)) {
            (Some((v, t)), Some(cur)) if t < cur * (1.0 - MARGIN) => v,
            (_, Some(_)) => built_in.clone(),
            (Some((v, _)), None) => v,
            (None, None) => built_in.clone(),
        };
        current = k.set(gpu, &current, &chosen).unwrap_or(current);
        out.push(KnobResult { name: k.name.into(), times, chosen, built_in });
    }
    Ok(out)
}

/// A timed run repeats the workload until it takes about this long: on a GPU one pass of a
/// workload is ~0.1-0.5 ms, about one submission's round trip, and single passes ranked the
/// candidates by noise (two tunings of an H200 minutes apart chose different tiles and
/// Winograd settings).
const RUN_MS: f64 = 20.0;
/// At most this many workload passes a timed run.
const MAX_PASSES: usize = 64;

/// The median time of one pass of knob `k`'s workload on `device` over `runs` timed runs, each
/// of as many passes (recorded back to back, then one wait) as take about `RUN_MS` (one timed
/// pass after a warm-up sets that number).
fn median_ms(k: &Knob, device: &Arc<Gpu>, runs: usize) -> Result<f64> {
    let mut work = (k.workload)(device)?;
    let mut run = |passes: usize| -> Result<f64> {
        let t = Instant::now();
        for _ in 0..passes {
            work()?;
        }
        device.sync()?;
        Ok(t.elapsed().as_secs_f64() * 1e3 / passes as f64)
    };
    run(1)?; // warm-up: pipelines, pools
    let once = run(1)?;
    let passes = ((RUN_MS / once.max(1e-3)).ceil() as usize).clamp(1, MAX_PASSES);
    let mut ms = (0..runs.max(1)).map(|_| run(passes)).collect::<Result<Vec<f64>>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Every value of every on/off and texel knob this adapter offers, timed on the knob's workload
/// from `gpu`'s own tuning (no checks: `bench kernels` shows the variants side by side; the
/// product tiles it times on its own products). `report` sees (knob, value, whether it is the
/// current value, median ms).
pub fn side_by_side(gpu: &Arc<Gpu>, runs: usize, mut report: impl FnMut(&str, &str, bool, f64)) -> Result<()> {
    for k in knobs().into_iter().filter(|k| !matches!(k.choice, Choice::Tile)) {
        let current = k.value(&gpu.tuning);
        for v in k.values(gpu) {
            let Some(tuning) = k.set(gpu, &gpu.tuning, &v) else { continue };
            let device = if v == current { gpu.clone() } else { gpu.variant(tuning)? };
            report(k.name, &v, v == current, median_ms(&k, &device, runs)?);
        }
    }
    Ok(())
}

/// The device with its cached winners applied: tuned now (and cached) on a GPU seen for the
/// first time; software devices keep the built-in choices until `taming tune` caches some.
pub fn tuned(gpu: Arc<Gpu>) -> Result<Arc<Gpu>> {
    if disabled_by_env() {
        return Ok(gpu);
    }
    let Some(path) = cache_file() else { return Ok(gpu) };
    let key = key(&gpu);
    let choices = match lookup(&path, &key) {
        Some(c) => c,
        None if gpu.info.device_type == wgpu::DeviceType::Cpu => return Ok(gpu),
        None => {
            eprintln!("tuning the kernels on {} once (first use; TAMING_AUTOTUNE=0 skips it) ...", gpu.describe());
            let started = Instant::now();
            let results = tune(&gpu, 3, &[], |_, _| {})?;
            eprintln!("  {:.1} s: {}", started.elapsed().as_secs_f64(), summary(&results));
            if let Err(e) = store(&path, &key, &results) {
                eprintln!("warning: could not cache the tuning ({e:#}); it will run again next time");
            }
            results.into_iter().map(|r| (r.name, r.chosen)).collect()
        }
    };
    let tuning = apply(&gpu, &gpu.tuning, &choices);
    if format!("{tuning:?}") == format!("{:?}", gpu.tuning) {
        return Ok(gpu);
    }
    gpu.variant(tuning)
}

/// "knob value, ..." for the choices that differ from the built-in ones.
pub fn summary(results: &[KnobResult]) -> String {
    let changed: Vec<String> =
        results.iter().filter(|r| r.chosen != r.built_in).map(|r| format!("{} {}", r.name, r.chosen)).collect();
    if changed.is_empty() {
        "the built-in choices are the fastest".into()
    } else {
        format!("changed {}", changed.join(", "))
    }
}

/// A line for `taming info`.
pub fn describe(gpu: &Gpu) -> String {
    if disabled_by_env() {
        return "off (TAMING_AUTOTUNE=0): built-in choices".into();
    }
    match cache_file().and_then(|p| lookup(&p, &key(gpu)).map(|c| (p, c))) {
        Some((p, c)) => format!(
            "cached in {}: {}",
            p.display(),
            c.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        ),
        None if gpu.info.device_type == wgpu::DeviceType::Cpu => {
            "built-in choices (measured on lavapipe; `taming tune` times the alternatives here)".into()
        }
        None => "not tuned yet (the first computation tunes; `taming tune` runs it now)".into(),
    }
}
