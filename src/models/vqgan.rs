//! Stage 1: the VQGAN autoencoder (taming `VQModel`): Encoder, vector
//! quantizer, Decoder, with the reference's module structure and parameter
//! names (`taming/modules/diffusionmodules/model.py`, `vqvae/quantize.py`).
//!
//! In inference every norm + swish that opens a block is applied as the following 3×3 convolution
//! reads its input, and a ResnetBlock's residual added as it writes (`norm_swish_conv`; training
//! records the separate ops). Where the time of a forward goes, and how each kernel got there: the
//! module docs of `engine::kernels::conv2d` and `engine::kernels::winograd`.
//!
//! # Measurements
//!
//! On lavapipe (llvmpipe, Mesa 22.3.6, 2 cores); reference figures on the same machine from SPEC.md.
//!
//! - ImageNet f16 config, encode + quantize + decode, 1×256×256 (`bench vqgan`): on 2026-11-30,
//!   final code, 10.71–11.28 s over 4 runs = 3.2–3.4× PyTorch (PyTorch CPU: 3.3 s; target ≤ 4×:
//!   met), peak 551 MiB. The day's steps, each in runs of 3 forwards: implicit GEMM 24.2–30.1 s
//!   (8.0×) → Winograd + four-column stores 13.7–14.0 → one-pass norm statistics + fused residuals
//!   12.15–13.97 (median 12.68) → cheaper output pass 11.90–13.46 → quantizer scores by product
//!   11.19–11.25 → statistics through a texture 10.77–11.28. Before that day: 47.4–49.7 → 40.3 s
//!   (implicit GEMM), then 22.9–28.3 s (vec4 norms, fused norm + swish, ...; `kernels::conv2d`).
//! - ResnetBlock 128 ch, 1×128×32×32, training step (`bench train`): 0.21–0.33 s over the runs
//!   recorded, 0.27 s on 2026-11-30; peak 19 MiB.
//! - Demo VQGAN training step (32×32, batch 8, generator + discriminator; `bench vqgan-train`):
//!   4.4 s on 2026-11-30 with Winograd forwards and four-column stores (1.8 images/s; 5.4–6.5 s
//!   before), peak 75 MiB; 3.4 s before `disc_start` (measured before those changes).
//! - ImageNet f16 VQGAN training step, 256×256, batch 1, with LPIPS (random weights): 313 s on
//!   2026-11-30 (361 s before that day's changes), peak 3,224 MiB.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::channel_runs::{self, Runs};
use super::weights::{ModelFile, ParamVars, Params};
use crate::engine::kernels::conv2d::{self, ConvSpec};
use crate::engine::kernels::elementwise::Unary;
use crate::engine::kernels::norm::{self, NormKind};
use crate::engine::kernels::quantize;
use crate::engine::kernels::reduce::Reduce;
use crate::engine::{Gpu, Tape, Tensor, Var};

/// The reference class of a VQGAN model file's config.
pub const TARGET: &str = "taming.models.vqgan.VQModel";
pub const GUMBEL_TARGET: &str = "taming.models.vqgan.GumbelVQ";
pub const SEGMENTATION_TARGET: &str = "taming.models.vqgan.VQSegmentationModel";
/// latent-diffusion's first stages: the same Encoder, VectorQuantizer2 and Decoder.
pub const LDM_TARGETS: [&str; 2] = ["ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.VQModelInterface"];

/// Every autoencoder target the engine loads.
pub fn is_target(target: &str) -> bool {
    [TARGET, GUMBEL_TARGET, SEGMENTATION_TARGET].contains(&target) || LDM_TARGETS.contains(&target)
}

/// How z becomes codes.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantizer {
    /// VectorQuantizer2: the nearest row of `quantize.embedding.weight`.
    Nearest,
    /// GumbelQuantize: logits `quantize.proj(z)` over the codes; the code is
    /// their argmax (the reference samples Gumbel noise even in eval, so its
    /// codes vary from run to run; ours are the noise-free choice), z_q its
    /// row of `quantize.embed.weight`.
    Gumbel { kl_weight: f64 },
}

/// `ddconfig` + the quantizer's sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct VqganConfig {
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub in_channels: usize,
    pub out_ch: usize,
    pub z_channels: usize,
    pub double_z: bool,
    pub resolution: usize,
    pub embed_dim: usize,
    pub n_embed: usize,
    /// The ResnetBlocks' dropout: no effect in inference; training refuses it (not implemented).
    pub dropout: f64,
    pub quantizer: Quantizer,
    /// VQSegmentationModel: inputs are one-hot label maps of this many labels, outputs their logits.
    pub n_labels: Option<usize>,
    /// `remap`: codes are positions in the `quantize.used` list of codebook rows (the file holds
    /// it); a code outside the list becomes a random one, as the reference does.
    pub remap: bool,
    /// Our codebook options (not in the reference; off by default, so reference files load as
    /// they are): `codebook_l2_norm`, `codebook_embed_dim`.
    pub codebook: Codebook,
}

/// How VectorQuantizer2's lookup is changed, as later work does to keep codebooks in use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Codebook {
    /// `codebook_l2_norm`: z and the codebook rows are l2-normalised before the lookup (cosine
    /// distance), and z_q is the normalised row (LlamaGen, ViT-VQGAN).
    pub l2_norm: bool,
    /// `codebook_embed_dim`: the lookup runs in this many dimensions; `quantize.proj_in` (a
    /// Linear, embed_dim -> this) maps z there and `quantize.proj_out` back (ViT-VQGAN's
    /// factorised codes).
    pub lookup_dim: Option<usize>,
}

impl Codebook {
    /// The reference's lookup (no option on).
    pub fn is_reference(&self) -> bool {
        !self.l2_norm && self.lookup_dim.is_none()
    }
}

fn field<'a>(v: &'a serde_json::Value, path: &str, key: &str) -> Result<&'a serde_json::Value> {
    v.get(key).ok_or_else(|| anyhow!("config: missing '{path}{key}'"))
}
fn usize_of(v: &serde_json::Value, path: &str, key: &str) -> Result<usize> {
    field(v, path, key)?.as_u64().map(|x| x as usize).ok_or_else(|| anyhow!("config: '{path}{key}' is not an integer"))
}
fn list_of(v: &serde_json::Value, path: &str, key: &str) -> Result<Vec<usize>> {
    field(v, path, key)?
        .as_array()
        .ok_or_else(|| anyhow!("config: '{path}{key}' is not a list"))?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize).ok_or_else(|| anyhow!("config: '{path}{key}' holds a non-integer")))
        .collect()
}

impl VqganConfig {
    /// From a `VQModel` config block (`target` and `params`): taming's VQModel, GumbelVQ or
    /// VQSegmentationModel, or latent-diffusion's VQModel.
    pub fn from_config(block: &serde_json::Value) -> Result<Self> {
        let target = block.get("target").and_then(|t| t.as_str()).unwrap_or("");
        let params = block.get("params").ok_or_else(|| anyhow!("config: '{target}' has no params"))?;
        Self::of_target(target, params)
    }

    /// From the `params` of a taming `VQModel` config.
    pub fn from_params(params: &serde_json::Value) -> Result<Self> {
        Self::of_target(TARGET, params)
    }

    fn of_target(target: &str, params: &serde_json::Value) -> Result<Self> {
        use super::config_keys::{check, is_false, is_null, is_true, Key::*};
        if !is_target(target) {
            bail!(
                "config: target '{target}' is not an autoencoder this engine implements ({TARGET}, {GUMBEL_TARGET}, \
                 {SEGMENTATION_TARGET}, {})",
                LDM_TARGETS.join(", ")
            );
        }
        let mut keys = vec![
            Used("ddconfig"),
            Used("n_embed"),
            Used("embed_dim"),
            Used("lossconfig"),
            Inert("ckpt_path"),
            Inert("ignore_keys"),
            Inert("image_key"),
            Inert("monitor"),
            Inert("colorize_nlabels"),
            Inert("scheduler_config"),
            Used("remap"),
            Used("codebook_l2_norm"),
            Used("codebook_embed_dim"),
        ];
        match target {
            GUMBEL_TARGET => keys.extend([Inert("temperature_scheduler_config"), Used("kl_weight")]),
            SEGMENTATION_TARGET => keys.extend([Used("n_labels"), Inert("sane_index_shape")]),
            t if LDM_TARGETS.contains(&t) => keys.extend([
                Inert("sane_index_shape"),
                Inert("lr_g_factor"),
                OnlyOff("batch_resize_range", is_null, "training on randomly resized batches (batch_resize_range)"),
                OnlyOff("use_ema", is_false, "EMA weights (use_ema)"),
            ]),
            _ => keys.push(Inert("sane_index_shape")),
        }
        check("params", params, &keys)?;
        let dd = field(params, "params.", "ddconfig")?;
        check(
            "params.ddconfig",
            dd,
            &[
                Used("ch"),
                Used("out_ch"),
                Used("ch_mult"),
                Used("num_res_blocks"),
                Used("attn_resolutions"),
                Used("in_channels"),
                Used("resolution"),
                Used("z_channels"),
                Used("double_z"),
                Used("dropout"),
                OnlyOff("resamp_with_conv", is_true, "resampling without convolutions"),
                OnlyOff("give_pre_end", is_false, "a decoder that stops before its output layers"),
                OnlyOff("tanh_out", is_false, "a tanh on the decoder's output"),
                OnlyOff("attn_type", |v| v.is_null() || v == "vanilla", "attention other than 'vanilla'"),
                OnlyOff("use_linear_attn", is_false, "linear attention"),
            ],
        )?;
        let p = "params.ddconfig.";
        let c = VqganConfig {
            ch: usize_of(dd, p, "ch")?,
            ch_mult: list_of(dd, p, "ch_mult")?,
            num_res_blocks: usize_of(dd, p, "num_res_blocks")?,
            attn_resolutions: list_of(dd, p, "attn_resolutions")?,
            in_channels: usize_of(dd, p, "in_channels")?,
            out_ch: usize_of(dd, p, "out_ch")?,
            z_channels: usize_of(dd, p, "z_channels")?,
            double_z: dd.get("double_z").and_then(|v| v.as_bool()).unwrap_or(false),
            resolution: usize_of(dd, p, "resolution")?,
            embed_dim: usize_of(params, "params.", "embed_dim")?,
            n_embed: usize_of(params, "params.", "n_embed")?,
            dropout: dd.get("dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
            quantizer: match target {
                GUMBEL_TARGET => {
                    Quantizer::Gumbel { kl_weight: params.get("kl_weight").and_then(|v| v.as_f64()).unwrap_or(1e-8) }
                }
                _ => Quantizer::Nearest,
            },
            n_labels: match target {
                SEGMENTATION_TARGET => Some(usize_of(params, "params.", "n_labels")?),
                _ => None,
            },
            remap: !params.get("remap").is_none_or(|v| v.is_null()),
            codebook: Codebook {
                l2_norm: match params.get("codebook_l2_norm") {
                    None | Some(serde_json::Value::Null) => false,
                    Some(v) => {
                        v.as_bool().ok_or_else(|| anyhow!("config: 'params.codebook_l2_norm' is not true or false"))?
                    }
                },
                lookup_dim: match params.get("codebook_embed_dim") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(_) => Some(usize_of(params, "params.", "codebook_embed_dim")?),
                },
            },
        };
        if !c.codebook.is_reference() && c.quantizer != Quantizer::Nearest {
            bail!("config: codebook_l2_norm and codebook_embed_dim apply to VectorQuantizer2 (VQModel), not GumbelVQ");
        }
        if c.codebook.lookup_dim == Some(0) {
            bail!("config: 'params.codebook_embed_dim' must be at least 1");
        }
        if let Some(n) = c.n_labels {
            if c.in_channels != n || c.out_ch != n {
                bail!(
                    "config: a VQSegmentationModel of {n} labels reads and writes {n} channels, not in_channels {} \
                     and out_ch {}",
                    c.in_channels,
                    c.out_ch
                );
            }
        }
        if matches!(c.quantizer, Quantizer::Gumbel { .. }) && c.embed_dim != c.z_channels {
            bail!(
                "config: GumbelVQ's quantizer reads quant_conv's {} channels as z_channels {}: embed_dim must equal \
                 z_channels",
                c.embed_dim,
                c.z_channels
            );
        }
        if c.ch_mult.is_empty() || !c.ch.is_multiple_of(32) {
            bail!("config: ch {} must be a multiple of 32 (GroupNorm(32)) and ch_mult non-empty", c.ch);
        }
        Ok(c)
    }

    /// Downsampling factor f = 2^(levels - 1).
    pub fn factor(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }

    /// The width of the codebook's rows: `codebook_embed_dim`, else embed_dim.
    pub fn lookup_dim(&self) -> usize {
        self.codebook.lookup_dim.unwrap_or(self.embed_dim)
    }
}

pub struct Vqgan {
    pub config: VqganConfig,
    pub params: Params,
    /// `remap`: the codebook rows the codes stand for (the file's `quantize.used`).
    pub used: Option<Vec<u32>>,
    /// VQSegmentationModel's `colorize` buffer [3, n_labels]: the random projection the
    /// reference draws label maps with.
    pub colorize: Option<Vec<f32>>,
}

/// The codes of a forward pass: the codebook rows picked, on the device (read back only when
/// asked: a read waits for the device, so a training step reads them once it is recorded), and
/// the `remap` list they become codes through.
pub struct Codes {
    rows: Tensor,
    used: Option<Vec<u32>>,
}

impl Codes {
    /// The codes (after `remap`, if any).
    pub fn read(&self) -> Result<Vec<u32>> {
        Ok(remap_rows(self.used.as_deref(), self.rows.to_u32_vec()?))
    }
}

/// Codebook rows -> codes (`remap`): a row's position in `used`; a row not in it becomes a
/// random code (the reference's default `unknown_index="random"`; our generator, not torch's).
fn remap_rows(used: Option<&[u32]>, rows: Vec<u32>) -> Vec<u32> {
    let Some(used) = used else { return rows };
    // The first position of each row, as the reference's argmax over matches.
    let mut position = std::collections::HashMap::with_capacity(used.len());
    for (i, &u) in used.iter().enumerate() {
        position.entry(u).or_insert(i as u32);
    }
    let mut rng = crate::engine::Rng::new(0);
    rows.into_iter().map(|r| position.get(&r).copied().unwrap_or_else(|| rng.below(used.len()) as u32)).collect()
}

/// What `forward` computes, with the names of the fixture tensors.
pub struct VqganOutputs {
    pub encoder_out: Var,
    pub quant_conv_out: Var,
    /// GumbelQuantize's logits over the codes [B, n_embed, h, w].
    pub quant_logits: Option<Var>,
    /// The codes (after `remap`, if any), on the device until read.
    pub indices: Codes,
    pub z_q: Var,
    pub codebook_loss: Var,
    pub decoder_out: Var,
    /// With codebook options: the vectors the lookup compared with the codebook [B*h*w, k]
    /// (projected, normalised) and the codebook as compared [n_embed, k]; dead-code restarts
    /// draw new rows from the first, the entropy loss reads both.
    pub lookup: Option<(Var, Var)>,
}

impl Vqgan {
    /// Load and validate every tensor the config implies (prefix "" for a
    /// VQModel file, "first_stage_model." inside a Net2NetTransformer file).
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, config: VqganConfig, prefix: &str) -> Result<Vqgan> {
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(&config) {
            params.load_prefixed(file, gpu, prefix, &name, &shape)?;
        }
        let used = if config.remap {
            let name = format!("{prefix}quantize.used");
            if !file.has(&name) {
                bail!("{}: the config remaps codes (remap) but the file has no '{name}'", file.path.display());
            }
            let (used, _) = file.indices(&name)?;
            if let Some(bad) = used.iter().find(|&&u| u as usize >= config.n_embed) {
                bail!("{}: '{name}' names codebook row {bad} of {}", file.path.display(), config.n_embed);
            }
            Some(used)
        } else {
            None
        };
        let colorize = match config.n_labels {
            Some(n) if file.has(&format!("{prefix}colorize")) => {
                Some(file.host(&format!("{prefix}colorize"), Some(&[3, n, 1, 1]))?.0)
            }
            Some(n) => Some(random_colorize(n)),
            None => None,
        };
        Ok(Vqgan { config, params, used, colorize })
    }

    pub fn forward(&self, tape: &Tape, p: &ParamVars, x: &Var) -> Result<VqganOutputs> {
        let c = &self.config;
        if x.shape().len() != 4 || x.shape()[1] != c.in_channels {
            bail!("input {:?}: expected [B, {}, H, W]", x.shape(), c.in_channels);
        }
        let f = c.factor();
        if x.shape()[2] < f || x.shape()[3] < f || !x.shape()[2].is_multiple_of(f) || !x.shape()[3].is_multiple_of(f) {
            bail!("input {}x{} must be a multiple of the downsampling factor {f}", x.shape()[2], x.shape()[3]);
        }
        let encoder_out = encoder(tape, p, c, x)?;
        let quant_conv_out = conv(tape, p, "quant_conv", &encoder_out, ConvSpec::same(1, 0))?;
        let mut lookup = None;
        let (indices, z_q, codebook_loss, quant_logits) = match c.quantizer {
            Quantizer::Nearest if c.codebook.is_reference() => {
                let (i, z_q, loss) = quantize(tape, p, &quant_conv_out)?;
                (i, z_q, loss, None)
            }
            Quantizer::Nearest => {
                let q = quantize_with_options(tape, p, c, &quant_conv_out)?;
                lookup = Some(q.lookup);
                (q.indices, q.z_q, q.loss, None)
            }
            Quantizer::Gumbel { kl_weight } => {
                let (i, z_q, loss, logits) = gumbel_quantize(tape, p, &quant_conv_out, kl_weight)?;
                (i, z_q, loss, Some(logits))
            }
        };
        let indices = Codes { rows: indices, used: self.used.clone() };
        let h = conv(tape, p, "post_quant_conv", &z_q, ConvSpec::same(1, 0))?;
        let decoder_out = decoder(tape, p, c, &h)?;
        Ok(VqganOutputs { encoder_out, quant_conv_out, quant_logits, indices, z_q, codebook_loss, decoder_out, lookup })
    }

    /// Codebook rows -> codes (`remap`; see `remap_rows`).
    fn remap_to_used(&self, rows: Vec<u32>) -> Vec<u32> {
        remap_rows(self.used.as_deref(), rows)
    }

    /// Codes -> codebook rows (`remap`), checking each code is in range.
    fn unmap_to_all(&self, codes: &[u32]) -> Result<Vec<u32>> {
        let (n, used) = match &self.used {
            Some(u) => (u.len(), Some(u)),
            None => (self.config.n_embed, None),
        };
        if let Some(bad) = codes.iter().find(|&&c| c as usize >= n) {
            bail!("code {bad} is outside the model's {n} codes");
        }
        Ok(match used {
            Some(u) => codes.iter().map(|&c| u[c as usize]).collect(),
            None => codes.to_vec(),
        })
    }

    /// Parameters and buffers (`colorize`, `quantize.used`) for a model file, names under `prefix`.
    pub fn to_host(&self, prefix: &str) -> Result<Vec<super::weights::HostTensor>> {
        use super::weights::{HostData, HostTensor};
        let mut out = self.params.to_host(prefix)?;
        if let (Some(c), Some(n)) = (&self.colorize, self.config.n_labels) {
            let name = format!("{prefix}colorize");
            out.push(HostTensor { name, shape: vec![3, n, 1, 1], data: HostData::F32(c.clone()) });
        }
        if let Some(u) = &self.used {
            let data = HostData::I64(u.iter().map(|&v| v as i64).collect());
            out.push(HostTensor { name: format!("{prefix}quantize.used"), shape: vec![u.len()], data });
        }
        Ok(out)
    }

    /// How many codes the model writes and reads (the codebook, or the `remap` list).
    pub fn codes(&self) -> usize {
        self.used.as_ref().map_or(self.config.n_embed, |u| u.len())
    }

    /// The codebook rows z_q is made of.
    fn codebook_name(&self) -> &'static str {
        match self.config.quantizer {
            Quantizer::Nearest => "quantize.embedding.weight",
            Quantizer::Gumbel { .. } => "quantize.embed.weight",
        }
    }
}

/// Every parameter of Encoder, Decoder, quantizer and the 1x1 convs, with its shape.
/// One module of the Encoder or Decoder, in the order the reference's
/// `forward` runs them. `parameter_shapes` and the forward both walk this
/// list, so they cannot disagree about which modules exist.
enum Module {
    /// `conv_in`: a 3x3 convolution.
    ConvIn { name: String, cin: usize, cout: usize },
    /// ResnetBlock (norm1, conv1, norm2, conv2, and nin_shortcut when cin != cout).
    Resnet { name: String, cin: usize, cout: usize },
    /// AttnBlock (norm, q, k, v, proj_out).
    Attn { name: String, ch: usize },
    /// Downsample: pad right and bottom by one, 3x3 stride-2 convolution.
    Downsample { name: String, ch: usize },
    /// Upsample: nearest x2, 3x3 convolution.
    Upsample { name: String, ch: usize },
    /// `conv_out(swish(norm_out(h)))`.
    Out { norm: String, conv: String, cin: usize, cout: usize },
}

/// The Encoder of `taming/modules/diffusionmodules/model.py`.
fn encoder_modules(c: &VqganConfig) -> Vec<Module> {
    let levels = c.ch_mult.len();
    let mut m = vec![Module::ConvIn { name: "encoder.conv_in".into(), cin: c.in_channels, cout: c.ch }];
    let (mut res, mut block_in) = (c.resolution, c.ch);
    for i in 0..levels {
        let block_out = c.ch * c.ch_mult[i];
        for j in 0..c.num_res_blocks {
            m.push(Module::Resnet { name: format!("encoder.down.{i}.block.{j}"), cin: block_in, cout: block_out });
            block_in = block_out;
            if c.attn_resolutions.contains(&res) {
                m.push(Module::Attn { name: format!("encoder.down.{i}.attn.{j}"), ch: block_in });
            }
        }
        if i != levels - 1 {
            m.push(Module::Downsample { name: format!("encoder.down.{i}.downsample.conv"), ch: block_in });
            res /= 2;
        }
    }
    m.push(Module::Resnet { name: "encoder.mid.block_1".into(), cin: block_in, cout: block_in });
    m.push(Module::Attn { name: "encoder.mid.attn_1".into(), ch: block_in });
    m.push(Module::Resnet { name: "encoder.mid.block_2".into(), cin: block_in, cout: block_in });
    let z = if c.double_z { 2 * c.z_channels } else { c.z_channels };
    m.push(Module::Out { norm: "encoder.norm_out".into(), conv: "encoder.conv_out".into(), cin: block_in, cout: z });
    m
}

/// The Decoder of `taming/modules/diffusionmodules/model.py`.
fn decoder_modules(c: &VqganConfig) -> Vec<Module> {
    let levels = c.ch_mult.len();
    let mut block_in = c.ch * c.ch_mult[levels - 1];
    let mut res = c.resolution / c.factor();
    let mut m = vec![
        Module::ConvIn { name: "decoder.conv_in".into(), cin: c.z_channels, cout: block_in },
        Module::Resnet { name: "decoder.mid.block_1".into(), cin: block_in, cout: block_in },
        Module::Attn { name: "decoder.mid.attn_1".into(), ch: block_in },
        Module::Resnet { name: "decoder.mid.block_2".into(), cin: block_in, cout: block_in },
    ];
    for i in (0..levels).rev() {
        let block_out = c.ch * c.ch_mult[i];
        for j in 0..=c.num_res_blocks {
            m.push(Module::Resnet { name: format!("decoder.up.{i}.block.{j}"), cin: block_in, cout: block_out });
            block_in = block_out;
            if c.attn_resolutions.contains(&res) {
                m.push(Module::Attn { name: format!("decoder.up.{i}.attn.{j}"), ch: block_in });
            }
        }
        if i != 0 {
            m.push(Module::Upsample { name: format!("decoder.up.{i}.upsample.conv"), ch: block_in });
            res *= 2;
        }
    }
    m.push(Module::Out {
        norm: "decoder.norm_out".into(),
        conv: "decoder.conv_out".into(),
        cin: block_in,
        cout: c.out_ch,
    });
    m
}

/// Every parameter the config implies, in the order the models use: the
/// convolutions (encoder, quant_conv, post_quant_conv, decoder), the
/// codebook, then the norms.
pub fn parameter_shapes(c: &VqganConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut norms: Vec<(String, usize)> = Vec::new();
    let conv = |out: &mut Vec<(String, Vec<usize>)>, name: &str, cout: usize, cin: usize, k: usize| {
        out.push((format!("{name}.weight"), vec![cout, cin, k, k]));
        out.push((format!("{name}.bias"), vec![cout]));
    };
    let modules = |out: &mut Vec<(String, Vec<usize>)>, norms: &mut Vec<(String, usize)>, list: Vec<Module>| {
        for m in list {
            match m {
                Module::ConvIn { name, cin, cout } => conv(out, &name, cout, cin, 3),
                Module::Resnet { name, cin, cout } => {
                    norms.push((format!("{name}.norm1"), cin));
                    conv(out, &format!("{name}.conv1"), cout, cin, 3);
                    norms.push((format!("{name}.norm2"), cout));
                    conv(out, &format!("{name}.conv2"), cout, cout, 3);
                    if cin != cout {
                        conv(out, &format!("{name}.nin_shortcut"), cout, cin, 1);
                    }
                }
                Module::Attn { name, ch } => {
                    norms.push((format!("{name}.norm"), ch));
                    for q in ["q", "k", "v", "proj_out"] {
                        conv(out, &format!("{name}.{q}"), ch, ch, 1);
                    }
                }
                Module::Downsample { name, ch } | Module::Upsample { name, ch } => conv(out, &name, ch, ch, 3),
                Module::Out { norm, conv: name, cin, cout } => {
                    norms.push((norm, cin));
                    conv(out, &name, cout, cin, 3);
                }
            }
        }
    };
    modules(&mut out, &mut norms, encoder_modules(c));
    conv(&mut out, "quant_conv", c.embed_dim, c.z_channels, 1);
    conv(&mut out, "post_quant_conv", c.z_channels, c.embed_dim, 1);
    modules(&mut out, &mut norms, decoder_modules(c));
    match c.quantizer {
        Quantizer::Nearest => {
            let k = c.lookup_dim();
            out.push(("quantize.embedding.weight".into(), vec![c.n_embed, k]));
            if c.codebook.lookup_dim.is_some() {
                out.push(("quantize.proj_in.weight".into(), vec![k, c.embed_dim]));
                out.push(("quantize.proj_in.bias".into(), vec![k]));
                out.push(("quantize.proj_out.weight".into(), vec![c.embed_dim, k]));
                out.push(("quantize.proj_out.bias".into(), vec![c.embed_dim]));
            }
        }
        Quantizer::Gumbel { .. } => {
            conv(&mut out, "quantize.proj", c.n_embed, c.z_channels, 1);
            out.push(("quantize.embed.weight".into(), vec![c.n_embed, c.embed_dim]));
        }
    }
    for (n, ch) in norms {
        out.push((format!("{n}.weight"), vec![ch]));
        out.push((format!("{n}.bias"), vec![ch]));
    }
    out
}

fn conv(t: &Tape, p: &ParamVars, name: &str, x: &Var, spec: ConvSpec) -> Result<Var> {
    t.conv2d(x, p.get(&format!("{name}.weight"))?, Some(p.get(&format!("{name}.bias"))?), spec)
}

/// `Normalize`: GroupNorm(32, eps 1e-6).
fn normalize(t: &Tape, p: &ParamVars, name: &str, x: &Var) -> Result<Var> {
    t.norm(x, NormKind::Group { groups: 32 }, p.get(&format!("{name}.weight"))?, p.get(&format!("{name}.bias"))?, 1e-6)
}

/// `conv(nonlinearity(Normalize(x)))` (+ `residual`), the sequence every
/// block opens with and a ResnetBlock ends with. In inference (nothing
/// recorded) and where the device's convolution reads its input directly
/// (Winograd, implicit GEMM), the norm + swish are applied as the
/// convolution reads x and the residual added as it writes: the normalised
/// tensor is never stored, and a residual nothing else holds becomes the
/// output in place. Otherwise (training) the recorded ops.
pub fn norm_swish_conv(t: &Tape, norm: [&Var; 2], conv: [&Var; 2], x: &Var, residual: Option<Var>) -> Result<Var> {
    let (kind, eps, spec) = (NormKind::Group { groups: 32 }, 1e-6, ConvSpec::same(1, 1));
    let ([gamma, beta], [weight, bias]) = (norm, conv);
    let mut inputs = vec![x, gamma, beta, weight, bias];
    inputs.extend(residual.as_ref());
    if !t.records(&inputs) && conv2d::fuses_norm_swish(&x.value, &weight.value, spec) {
        let stats = norm::statistics(&x.value, kind, eps)?;
        let pre = conv2d::NormSwish { stats: &stats, gamma: &gamma.value, beta: &beta.value, groups: 32 };
        let y = match residual {
            Some(r) => conv2d::conv2d_after_norm_swish_add_into(
                &x.value,
                &pre,
                &weight.value,
                Some(&bias.value),
                spec,
                r.value,
            )?,
            None => conv2d::conv2d_after_norm_swish(&x.value, &pre, &weight.value, Some(&bias.value), spec)?,
        };
        return Ok(t.constant(y));
    }
    let h = t.norm_swish(x, kind, gamma, beta, eps)?;
    match residual {
        Some(r) => t.conv2d_add(&h, weight, Some(bias), spec, &r),
        None => t.conv2d(&h, weight, Some(bias), spec),
    }
}

/// `norm_swish_conv` with the parameters of modules `norm` and `conv`.
fn normalize_swish_conv(
    t: &Tape,
    p: &ParamVars,
    norm: &str,
    conv: &str,
    x: &Var,
    residual: Option<Var>,
) -> Result<Var> {
    let param = |module: &str, name: &str| p.get(&format!("{module}.{name}"));
    norm_swish_conv(
        t,
        [param(norm, "weight")?, param(norm, "bias")?],
        [param(conv, "weight")?, param(conv, "bias")?],
        x,
        residual,
    )
}

/// The ResnetBlock under `name` (norm1, conv1, norm2, conv2, and
/// nin_shortcut where the block changes the channel count). Taking x by value lets inference
/// write the output into x's storage where nothing else holds it.
pub fn resnet_block(t: &Tape, p: &ParamVars, name: &str, x: Var) -> Result<Var> {
    let h = normalize_swish_conv(t, p, &format!("{name}.norm1"), &format!("{name}.conv1"), &x, None)?;
    let shortcut = format!("{name}.nin_shortcut");
    let x = if h.shape()[1] != x.shape()[1] { conv(t, p, &shortcut, &x, ConvSpec::same(1, 0))? } else { x };
    // x + conv2(swish(norm2(h))), the add fused into the convolution where it can be.
    normalize_swish_conv(t, p, &format!("{name}.norm2"), &format!("{name}.conv2"), &h, Some(x))
}

/// Single-head self-attention over the h*w positions, scale c^-1/2. The q, k and v 1x1
/// convolutions run as one of 3c output channels (their weights side by side), so training
/// takes one product, not three, for each of the forward, dX and dW.
fn attn_block(t: &Tape, p: &ParamVars, name: &str, x: &Var) -> Result<Var> {
    let s = x.shape().to_vec();
    let (b, c, n) = (s[0], s[1], s[2] * s[3]);
    let h = normalize(t, p, &format!("{name}.norm"), x)?;
    let stacked = |param: &str| -> Result<Var> {
        let [q, k, v] = ["q", "k", "v"].map(|m| p.get(&format!("{name}.{m}.{param}")));
        t.concat(&[q?, k?, v?], 0)
    };
    let qkv = t.conv2d(&h, &stacked("weight")?, Some(&stacked("bias")?), ConvSpec::same(1, 0))?;
    let h = t.spatial_attention(&t.reshape(&qkv, &[b, 3 * c, n])?, c)?;
    let h = t.reshape(&h, &s)?;
    t.add(x, &conv(t, p, &format!("{name}.proj_out"), &h, ConvSpec::same(1, 0))?)
}

impl Module {
    fn name(&self) -> &str {
        match self {
            Module::ConvIn { name, .. }
            | Module::Resnet { name, .. }
            | Module::Attn { name, .. }
            | Module::Downsample { name, .. }
            | Module::Upsample { name, .. } => name,
            Module::Out { conv, .. } => conv,
        }
    }

    /// The output's shape for an input of shape [b, c, h, w].
    fn output_shape(&self, [b, c, h, w]: [usize; 4]) -> [usize; 4] {
        match self {
            Module::ConvIn { cout, .. } | Module::Resnet { cout, .. } | Module::Out { cout, .. } => [b, *cout, h, w],
            Module::Attn { .. } => [b, c, h, w],
            Module::Downsample { ch, .. } => {
                let (ho, wo) = ConvSpec::downsample().out_size(h, w, 3, 3).unwrap_or((0, 0));
                [b, *ch, ho, wo]
            }
            Module::Upsample { ch, .. } => [b, *ch, 2 * h, 2 * w],
        }
    }
}

/// One module on a whole activation (given up, so a ResnetBlock may write into it).
fn run_module(t: &Tape, p: &ParamVars, m: &Module, h: Var) -> Result<Var> {
    match m {
        Module::ConvIn { name, .. } => conv(t, p, name, &h, ConvSpec::same(1, 1)),
        Module::Resnet { name, .. } => resnet_block(t, p, name, h),
        Module::Attn { name, .. } => attn_block(t, p, name, &h),
        Module::Downsample { name, .. } => conv(t, p, name, &h, ConvSpec::downsample()),
        Module::Upsample { name, .. } => conv(t, p, name, &t.upsample2x(&h)?, ConvSpec::same(1, 1)),
        Module::Out { norm, conv, .. } => normalize_swish_conv(t, p, norm, conv, &h, None),
    }
}

/// One module on an activation held as runs of channels (inference on images whose activations
/// exceed one device buffer; see `channel_runs`).
fn run_module_in_runs(t: &Tape, p: &ParamVars, m: &Module, x: Runs) -> Result<Runs> {
    let weight = |module: &str| p.get(&format!("{module}.weight")).map(|v| &v.value);
    let bias = |module: &str| p.get(&format!("{module}.bias")).map(|v| &v.value);
    let norm = |module: &str| -> Result<channel_runs::Norm> {
        Ok(channel_runs::Norm { gamma: weight(module)?, beta: bias(module)? })
    };
    let same = ConvSpec::same(1, 1);
    match m {
        Module::ConvIn { name, .. } => channel_runs::conv(&x, None, weight(name)?, bias(name)?, same, None),
        Module::Resnet { name, cin, cout } => {
            let (conv1, conv2) = (format!("{name}.conv1"), format!("{name}.conv2"));
            let h = channel_runs::conv(
                &x,
                Some(norm(&format!("{name}.norm1"))?),
                weight(&conv1)?,
                bias(&conv1)?,
                same,
                None,
            )?;
            let shortcut = if cin != cout {
                let nin = format!("{name}.nin_shortcut");
                channel_runs::conv(&x, None, weight(&nin)?, bias(&nin)?, ConvSpec::same(1, 0), None)?
            } else {
                x
            };
            let norm2 = norm(&format!("{name}.norm2"))?;
            channel_runs::conv(&h, Some(norm2), weight(&conv2)?, bias(&conv2)?, same, Some(&shortcut))
        }
        Module::Attn { name, .. } => {
            let shape = x.shape();
            match x.into_whole() {
                Some(h) => Ok(Runs::whole(attn_block(t, p, name, &t.constant(h))?.value)),
                None => bail!(
                    "{name}: an attention block over a {shape:?} activation, larger than this device's largest buffer, \
                     is not supported"
                ),
            }
        }
        Module::Downsample { name, .. } => {
            channel_runs::conv(&x, None, weight(name)?, bias(name)?, ConvSpec::downsample(), None)
        }
        Module::Upsample { name, .. } => {
            channel_runs::conv(&channel_runs::upsample2x(&x)?, None, weight(name)?, bias(name)?, same, None)
        }
        Module::Out { norm: n, conv: c, .. } => {
            channel_runs::conv(&x, Some(norm(n)?), weight(c)?, bias(c)?, same, None)
        }
    }
}

/// An Encoder's or Decoder's activation between modules.
enum Activation {
    Whole(Var),
    /// Larger than one device buffer: runs of channels (inference only).
    Runs(Runs),
}

/// Run a list of modules (the Encoder's or the Decoder's). In inference, where a module's output
/// would not fit one device buffer (a 2048² image's full-resolution planes), the activation is
/// held as runs of channels until it fits again (`channel_runs`); training at such sizes is
/// refused with the module's name.
fn run_modules(t: &Tape, p: &ParamVars, modules: &[Module], x: &Var) -> Result<Var> {
    let gpu = x.value.gpu.clone();
    let mut h = Activation::Whole(x.clone());
    for m in modules {
        h = match h {
            Activation::Whole(v) => {
                let shape = v.value.shape();
                let shape = [shape[0], shape[1], shape[2], shape[3]];
                let out = m.output_shape(shape);
                if channel_runs::fits(&gpu, out) {
                    Activation::Whole(run_module(t, p, m, v)?)
                } else if t.is_recording() {
                    bail!(
                        "{}: its output {out:?} ({} bytes) exceeds this device's largest buffer ({} bytes); training at \
                         this size is not supported",
                        m.name(),
                        out.iter().product::<usize>() * 4,
                        gpu.max_buffer()
                    );
                } else {
                    Activation::Runs(run_module_in_runs(t, p, m, Runs::whole(v.value))?)
                }
            }
            Activation::Runs(r) => {
                let out = run_module_in_runs(t, p, m, r)?;
                if out.runs.len() == 1 {
                    Activation::Whole(t.constant(out.into_whole().expect("one run")))
                } else {
                    Activation::Runs(out)
                }
            }
        };
    }
    match h {
        Activation::Whole(v) => Ok(v),
        Activation::Runs(r) => bail!("the last module's output {:?} does not fit one device buffer", r.shape()),
    }
}

fn encoder(t: &Tape, p: &ParamVars, c: &VqganConfig, x: &Var) -> Result<Var> {
    run_modules(t, p, &encoder_modules(c), x)
}

fn decoder(t: &Tape, p: &ParamVars, c: &VqganConfig, z: &Var) -> Result<Var> {
    run_modules(t, p, &decoder_modules(c), z)
}

/// VectorQuantizer2 (legacy, beta 0.25): nearest codes, the codebook loss
/// mean((sg(z_q) - z)^2) + 0.25 mean((z_q - sg(z))^2), and the
/// straight-through z + sg(z_q - z).
fn quantize(t: &Tape, p: &ParamVars, z: &Var) -> Result<(Tensor, Var, Var)> {
    let s = z.shape().to_vec();
    let (b, d, n) = (s[0], s[1], s[2] * s[3]);
    let codebook = p.get("quantize.embedding.weight")?;
    let (idx, _) = quantize::nearest(&z.value, &codebook.value)?;
    let indices = idx.reshape(&[b * n])?;
    // z_q from the codebook (differentiable w.r.t. the codebook), back to [B, D, h, w].
    let zq = t.embedding_of(codebook, &indices)?;
    let zq = t.reshape(&t.transpose(&t.reshape(&zq, &[b, n, d])?)?, &s)?;
    let loss = t.codebook_loss(z, &zq, 0.25)?;
    let z_q = t.add(z, &t.add_scaled(&zq, z, 1.0, -1.0)?.detach())?;
    Ok((indices, z_q, loss))
}

/// [B, C, h, w] -> rows [B*h*w, C] (one row per position, in the codes' order).
pub fn rows_of(t: &Tape, x: &Var) -> Result<Var> {
    let s = x.shape().to_vec();
    let hw = s[2] * s[3];
    t.reshape(&t.transpose(&t.reshape(x, &[s[0], s[1], hw])?)?, &[s[0] * hw, s[1]])
}

/// Rows [B*h*w, C] -> [B, C, h, w].
fn planes_of(t: &Tape, rows: &Var, b: usize, h: usize, w: usize) -> Result<Var> {
    let c = rows.shape()[1];
    t.reshape(&t.transpose(&t.reshape(rows, &[b, h * w, c])?)?, &[b, c, h, w])
}

/// Each row over its l2 norm, as torch's F.normalize (the norm kept above 1e-12; here as
/// sqrt(|x|^2 + 1e-24), which differs only for rows of norm below ~1e-12): one kernel each way.
pub fn l2_normalize_rows(t: &Tape, x: &Var) -> Result<Var> {
    t.l2_normalize_rows(x)
}

/// Rows through `quantize.{which}` (a Linear).
fn linear(t: &Tape, p: &ParamVars, which: &str, rows: &Var) -> Result<Var> {
    t.matmul(
        rows,
        p.get(&format!("quantize.{which}.weight"))?,
        false,
        true,
        Some(p.get(&format!("quantize.{which}.bias"))?),
    )
}

/// The codebook as the lookup sees it: rows normalised with `codebook_l2_norm`.
fn lookup_codebook(t: &Tape, p: &ParamVars, c: &VqganConfig) -> Result<Var> {
    let e = p.get("quantize.embedding.weight")?;
    if c.codebook.l2_norm {
        l2_normalize_rows(t, e)
    } else {
        Ok(e.clone())
    }
}

/// What the lookup with codebook options gives.
struct Quantized {
    indices: Tensor,
    z_q: Var,
    loss: Var,
    lookup: (Var, Var),
}

/// The nearest codes of lookup vectors zl [N, k] (rows) in the codebook [n_embed, k].
fn nearest_rows(zl: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    let (n, k) = (zl.dim(0), zl.dim(1));
    let planes = crate::engine::kernels::copy::transpose(zl)?.reshape(&[1, k, n, 1])?;
    quantize::nearest(&planes, codebook)?.0.reshape(&[n])
}

/// VectorQuantizer2 with our codebook options: z as rows, through `quantize.proj_in` (with
/// `codebook_embed_dim`), normalised (with `codebook_l2_norm`), the nearest (normalised)
/// codebook row, the same codebook loss as the reference's (legacy, beta 0.25) in the lookup
/// space, the straight-through estimate, and back through `quantize.proj_out`.
fn quantize_with_options(t: &Tape, p: &ParamVars, c: &VqganConfig, z: &Var) -> Result<Quantized> {
    let s = z.shape().to_vec();
    let (b, h, w) = (s[0], s[2], s[3]);
    let mut zl = rows_of(t, z)?;
    if c.codebook.lookup_dim.is_some() {
        zl = linear(t, p, "proj_in", &zl)?;
    }
    if c.codebook.l2_norm {
        zl = l2_normalize_rows(t, &zl)?;
    }
    let codebook = lookup_codebook(t, p, c)?;
    let indices = nearest_rows(&zl.value, &codebook.value)?;
    let zq = t.embedding_of(&codebook, &indices)?;
    let loss = t.codebook_loss(&zl, &zq, 0.25)?;
    let mut rows = t.add(&zl, &t.add_scaled(&zq, &zl, 1.0, -1.0)?.detach())?;
    if c.codebook.lookup_dim.is_some() {
        rows = linear(t, p, "proj_out", &rows)?;
    }
    Ok(Quantized { indices, z_q: planes_of(t, &rows, b, h, w)?, loss, lookup: (zl, codebook) })
}

/// The entropy loss of LlamaGen / MaskGIT's codebook training: each lookup vector's soft
/// assignment p = softmax(-|z - e|^2 / temperature) over the codes; the mean entropy of the p
/// (low: confident assignments) minus the entropy of their mean (high: every code used).
/// zl [N, k], codebook [n, k].
pub fn codebook_entropy_loss(t: &Tape, zl: &Var, codebook: &Var, temperature: f32) -> Result<Var> {
    let n_rows = zl.shape()[0];
    // -|z - e|^2 up to the row constant |z|^2, which the softmax ignores: 2 z.e - |e|^2.
    let dots = t.matmul(zl, codebook, false, true, None)?;
    let e2 = t.sum_dim(&t.mul(codebook, codebook)?, 1)?;
    let affinity = t.add_channel(&t.scale(&dots, 2.0)?, &t.scale(&e2, -1.0)?, 1)?;
    let p = t.softmax(&affinity, 1.0 / temperature)?;
    let log = |x: &Var| t.unary(&t.unary(x, Unary::Affine(1.0, 1e-5))?, Unary::Log);
    let sample_entropy = t.scale(&t.reduce(&t.mul(&p, &log(&p)?)?, Reduce::Sum)?, -1.0 / n_rows as f32)?;
    let mean_p = t.scale(&t.sum_dim(&p, 0)?, 1.0 / n_rows as f32)?;
    let mean_entropy = t.scale(&t.reduce(&t.mul(&mean_p, &log(&mean_p)?)?, Reduce::Sum)?, -1.0)?;
    t.add_scaled(&sample_entropy, &mean_entropy, 1.0, -1.0)
}

/// GumbelQuantize in eval, without the noise: logits = proj(z), the code their argmax, z_q its
/// row of `quantize.embed.weight`; the loss is the reference's KL term to the uniform prior,
/// kl_weight * mean over positions of sum_n q log(q n_embed + 1e-10), q = softmax(logits)
/// (computed on the host: it only informs, Gumbel training is not implemented).
fn gumbel_quantize(t: &Tape, p: &ParamVars, z: &Var, kl_weight: f64) -> Result<(Tensor, Var, Var, Var)> {
    let logits = conv(t, p, "quantize.proj", z, ConvSpec::same(1, 0))?;
    let s = logits.shape().to_vec();
    let (b, n, hw) = (s[0], s[1], s[2] * s[3]);
    let indices = quantize::argmax_channels(&logits.value)?.reshape(&[b * hw])?;
    let d = z.shape()[1];
    let zq = t.embedding_of(p.get("quantize.embed.weight")?, &indices)?;
    let z_q = t.reshape(&t.transpose(&t.reshape(&zq, &[b, hw, d])?)?, &[b, d, s[2], s[3]])?;
    let host = logits.value.to_vec()?;
    let mut kl = 0.0f64;
    for bi in 0..b {
        for pos in 0..hw {
            let at = |e: usize| host[(bi * n + e) * hw + pos] as f64;
            let max = (0..n).map(at).fold(f64::MIN, f64::max);
            let sum: f64 = (0..n).map(|e| (at(e) - max).exp()).sum();
            kl += (0..n)
                .map(|e| {
                    let q = (at(e) - max).exp() / sum;
                    q * (q * n as f64 + 1e-10).ln()
                })
                .sum::<f64>();
        }
    }
    let loss = crate::engine::Tensor::from_f32(&z.value.gpu, &[(kl_weight * kl / (b * hw) as f64) as f32], &[1])?;
    Ok((indices, z_q, t.constant(loss), logits))
}

/// A `colorize` buffer for a segmentation model whose file has none: torch.randn-like values
/// (Box-Muller over our generator), as the reference draws its own at construction.
pub fn random_colorize(n_labels: usize) -> Vec<f32> {
    let mut rng = crate::engine::Rng::new(0x5eed);
    (0..3 * n_labels)
        .map(|_| {
            let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

impl Vqgan {
    /// Codes [B][h*w] of inputs x [B, C, H, W] (raster order), and (h, w).
    pub fn encode_indices(&self, t: &Tape, p: &ParamVars, x: &Var) -> Result<(Vec<Vec<u32>>, usize, usize)> {
        let h = encoder(t, p, &self.config, x)?;
        let z = conv(t, p, "quant_conv", &h, ConvSpec::same(1, 0))?;
        let (hh, ww) = (z.shape()[2], z.shape()[3]);
        let idx = match self.config.quantizer {
            Quantizer::Nearest if self.config.codebook.is_reference() => {
                quantize::nearest(&z.value, &p.get("quantize.embedding.weight")?.value)?.0
            }
            Quantizer::Nearest => quantize_with_options(t, p, &self.config, &z)?.indices,
            Quantizer::Gumbel { .. } => {
                quantize::argmax_channels(&conv(t, p, "quantize.proj", &z, ConvSpec::same(1, 0))?.value)?
            }
        };
        let flat = self.remap_to_used(idx.to_u32_vec()?);
        Ok((flat.chunks(hh * ww).map(|c| c.to_vec()).collect(), hh, ww))
    }

    /// Images [B, out_ch, H, W] from codebook indices [B][h*w] of an h x w latent grid.
    pub fn decode_indices(&self, t: &Tape, p: &ParamVars, indices: &[Vec<u32>], h: usize, w: usize) -> Result<Var> {
        let b = indices.len();
        if indices.iter().any(|r| r.len() != h * w) {
            bail!("decode: every index row must hold {h}x{w} = {} codes", h * w);
        }
        let flat: Vec<u32> = indices.iter().flatten().copied().collect();
        let rows = if self.config.codebook.is_reference() {
            t.embedding(p.get(self.codebook_name())?, &self.unmap_to_all(&flat)?)?
        } else {
            let rows = t.embedding(&lookup_codebook(t, p, &self.config)?, &self.unmap_to_all(&flat)?)?;
            match self.config.codebook.lookup_dim {
                Some(_) => linear(t, p, "proj_out", &rows)?,
                None => rows,
            }
        };
        let zq = planes_of(t, &rows, b, h, w)?;
        let z = conv(t, p, "post_quant_conv", &zq, ConvSpec::same(1, 0))?;
        decoder(t, p, &self.config, &z)
    }
}

impl Vqgan {
    /// A new model initialised as torch does: conv weights and biases
    /// U(±1/sqrt(fan_in)) (kaiming_uniform with a=√5), GroupNorm 1 and 0, the
    /// codebook U(±1/n_embed) as VectorQuantizer2.
    pub fn random(gpu: &Arc<Gpu>, config: VqganConfig, seed: u64) -> Result<Vqgan> {
        let mut rng = crate::engine::Rng::new(seed);
        let mut params = Params::default();
        let shapes = parameter_shapes(&config);
        let fan_in: std::collections::HashMap<String, usize> = shapes
            .iter()
            .filter(|(n, s)| n.ends_with(".weight") && (s.len() == 4 || n.starts_with("quantize.proj_")))
            .map(|(n, s)| (n.trim_end_matches(".weight").to_string(), s[1..].iter().product()))
            .collect();
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
            let mut uniform =
                |bound: f64| -> Vec<f32> { (0..n).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect() };
            let data = if name == "quantize.embedding.weight" {
                uniform(1.0 / config.n_embed as f64)
            } else if let Some(&fi) = fan_in.get(module) {
                uniform(1.0 / (fi as f64).sqrt())
            } else if name.ends_with(".weight") {
                vec![1.0; n]
            } else {
                vec![0.0; n]
            };
            params.insert(gpu, &name, &data, &shape)?;
        }
        if config.remap {
            bail!("a new model cannot remap codes: remap lists the codes a trained model uses");
        }
        let colorize = config.n_labels.map(random_colorize);
        Ok(Vqgan { config, params, used: None, colorize })
    }

    /// The ImageNet f16 config of the paper (ch 128, ch_mult 1,1,2,2,4, 2 res blocks,
    /// attention at 16, z 256, 1024 codes).
    pub fn imagenet_f16_config() -> VqganConfig {
        VqganConfig {
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![16],
            in_channels: 3,
            out_ch: 3,
            z_channels: 256,
            double_z: false,
            resolution: 256,
            embed_dim: 256,
            n_embed: 1024,
            dropout: 0.0,
            quantizer: Quantizer::Nearest,
            codebook: Codebook::default(),
            n_labels: None,
            remap: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module list puts attention exactly at `attn_resolutions` (and in
    /// the middle), a shortcut exactly where a block changes its channels,
    /// and the quantizer between encoder and decoder.
    #[test]
    fn parameters_follow_the_config() {
        let mut c = Vqgan::imagenet_f16_config();
        c.ch_mult = vec![1, 2];
        c.resolution = 32;
        c.attn_resolutions = vec![16];
        c.num_res_blocks = 1;
        let names: Vec<String> = parameter_shapes(&c).into_iter().map(|(n, _)| n).collect();
        let has = |n: &str| names.iter().any(|x| x == n);
        assert!(has("encoder.down.1.attn.0.q.weight") && !has("encoder.down.0.attn.0.q.weight"));
        assert!(has("decoder.up.1.attn.1.proj_out.bias") && !has("decoder.up.0.attn.0.norm.weight"));
        assert!(has("encoder.mid.attn_1.k.weight") && has("decoder.mid.attn_1.v.weight"));
        assert!(
            has("encoder.down.1.block.0.nin_shortcut.weight") && !has("encoder.down.0.block.0.nin_shortcut.weight")
        );
        assert!(has("decoder.up.0.block.0.nin_shortcut.weight") && !has("decoder.up.0.block.1.nin_shortcut.weight"));
        assert!(has("encoder.down.0.downsample.conv.weight") && !has("encoder.down.1.downsample.conv.weight"));
        assert!(has("decoder.up.1.upsample.conv.weight") && !has("decoder.up.0.upsample.conv.weight"));
        let shapes: std::collections::HashMap<String, Vec<usize>> = parameter_shapes(&c).into_iter().collect();
        assert_eq!(shapes["quant_conv.weight"], vec![c.embed_dim, c.z_channels, 1, 1]);
        assert_eq!(shapes["encoder.conv_out.weight"], vec![c.z_channels, 2 * c.ch, 3, 3]);
        assert_eq!(shapes["quantize.embedding.weight"], vec![c.n_embed, c.embed_dim]);
        assert_eq!(names.len(), shapes.len(), "a parameter is listed twice");
        c.double_z = true;
        assert_eq!(
            parameter_shapes(&c).into_iter().find(|(n, _)| n == "encoder.conv_out.bias").unwrap().1,
            vec![2 * c.z_channels]
        );
    }
}
