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

use super::weights::{ModelFile, ParamVars, Params};
use crate::engine::kernels::conv2d::{self, ConvSpec};
use crate::engine::kernels::norm::{self, NormKind};
use crate::engine::kernels::quantize;
use crate::engine::kernels::reduce::Reduce;
use crate::engine::{Gpu, Tape, Var};

/// The reference class of a VQGAN model file's config.
pub const TARGET: &str = "taming.models.vqgan.VQModel";

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
    /// From the `params` of a `VQModel` config (the model file's metadata).
    pub fn from_params(params: &serde_json::Value) -> Result<Self> {
        use super::config_keys::{check, is_false, is_null, is_true, Key::*};
        check(
            "params",
            params,
            &[
                Used("ddconfig"),
                Used("n_embed"),
                Used("embed_dim"),
                Used("lossconfig"),
                Inert("ckpt_path"),
                Inert("ignore_keys"),
                Inert("image_key"),
                Inert("monitor"),
                Inert("colorize_nlabels"),
                Inert("sane_index_shape"),
                Inert("scheduler_config"),
                OnlyOff("remap", is_null, "remapping codebook indices (remap/unknown_index)"),
                Inert("unknown_index"), // only read with remap
            ],
        )?;
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
        };
        if c.ch_mult.is_empty() || !c.ch.is_multiple_of(32) {
            bail!("config: ch {} must be a multiple of 32 (GroupNorm(32)) and ch_mult non-empty", c.ch);
        }
        Ok(c)
    }

    /// Downsampling factor f = 2^(levels - 1).
    pub fn factor(&self) -> usize {
        1 << (self.ch_mult.len() - 1)
    }
}

pub struct Vqgan {
    pub config: VqganConfig,
    pub params: Params,
}

/// What `forward` computes, with the names of the fixture tensors.
pub struct VqganOutputs {
    pub encoder_out: Var,
    pub quant_conv_out: Var,
    pub indices: Vec<u32>,
    pub z_q: Var,
    pub codebook_loss: Var,
    pub decoder_out: Var,
}

impl Vqgan {
    /// Load and validate every tensor the config implies (prefix "" for a
    /// VQModel file, "first_stage_model." inside a Net2NetTransformer file).
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, config: VqganConfig, prefix: &str) -> Result<Vqgan> {
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(&config) {
            params.load_prefixed(file, gpu, prefix, &name, &shape)?;
        }
        Ok(Vqgan { config, params })
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
        let (indices, z_q, codebook_loss) = quantize(tape, p, &quant_conv_out)?;
        let h = conv(tape, p, "post_quant_conv", &z_q, ConvSpec::same(1, 0))?;
        let decoder_out = decoder(tape, p, c, &h)?;
        Ok(VqganOutputs { encoder_out, quant_conv_out, indices, z_q, codebook_loss, decoder_out })
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
    out.push(("quantize.embedding.weight".into(), vec![c.n_embed, c.embed_dim]));
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
/// tensor is never stored. Otherwise (training) the recorded ops.
pub fn norm_swish_conv(t: &Tape, norm: [&Var; 2], conv: [&Var; 2], x: &Var, residual: Option<&Var>) -> Result<Var> {
    let (kind, eps, spec) = (NormKind::Group { groups: 32 }, 1e-6, ConvSpec::same(1, 1));
    let ([gamma, beta], [weight, bias]) = (norm, conv);
    let mut inputs = vec![x, gamma, beta, weight, bias];
    inputs.extend(residual);
    if !t.records(&inputs) && conv2d::fuses_norm_swish(&x.value, &weight.value, spec) {
        let stats = norm::statistics(&x.value, kind, eps)?;
        let pre = conv2d::NormSwish { stats: &stats, gamma: &gamma.value, beta: &beta.value, groups: 32 };
        let y = match residual {
            Some(r) => {
                conv2d::conv2d_after_norm_swish_add(&x.value, &pre, &weight.value, Some(&bias.value), spec, &r.value)?
            }
            None => conv2d::conv2d_after_norm_swish(&x.value, &pre, &weight.value, Some(&bias.value), spec)?,
        };
        return Ok(t.constant(y));
    }
    let h = t.conv2d(&t.norm_swish(x, kind, gamma, beta, eps)?, weight, Some(bias), spec)?;
    match residual {
        Some(r) => t.add(r, &h),
        None => Ok(h),
    }
}

/// `norm_swish_conv` with the parameters of modules `norm` and `conv`.
fn normalize_swish_conv(
    t: &Tape,
    p: &ParamVars,
    norm: &str,
    conv: &str,
    x: &Var,
    residual: Option<&Var>,
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
/// nin_shortcut where the block changes the channel count).
pub fn resnet_block(t: &Tape, p: &ParamVars, name: &str, x: &Var) -> Result<Var> {
    let h = normalize_swish_conv(t, p, &format!("{name}.norm1"), &format!("{name}.conv1"), x, None)?;
    let shortcut = format!("{name}.nin_shortcut");
    let x = if h.shape()[1] != x.shape()[1] { conv(t, p, &shortcut, x, ConvSpec::same(1, 0))? } else { x.clone() };
    // x + conv2(swish(norm2(h))), the add fused into the convolution where it can be.
    normalize_swish_conv(t, p, &format!("{name}.norm2"), &format!("{name}.conv2"), &h, Some(&x))
}

/// Single-head self-attention over the h*w positions, scale c^-1/2.
fn attn_block(t: &Tape, p: &ParamVars, name: &str, x: &Var) -> Result<Var> {
    let s = x.shape().to_vec();
    let (b, c, n) = (s[0], s[1], s[2] * s[3]);
    let h = normalize(t, p, &format!("{name}.norm"), x)?;
    let flat = |v: Var| t.reshape(&v, &[b, c, n]);
    let q = flat(conv(t, p, &format!("{name}.q"), &h, ConvSpec::same(1, 0))?)?;
    let k = flat(conv(t, p, &format!("{name}.k"), &h, ConvSpec::same(1, 0))?)?;
    let v = flat(conv(t, p, &format!("{name}.v"), &h, ConvSpec::same(1, 0))?)?;
    let w = t.softmax(&t.matmul(&q, &k, true, false, None)?, (c as f32).powf(-0.5))?;
    let h = t.reshape(&t.matmul(&v, &w, false, true, None)?, &s)?;
    t.add(x, &conv(t, p, &format!("{name}.proj_out"), &h, ConvSpec::same(1, 0))?)
}

/// Run a list of modules (the Encoder's or the Decoder's).
fn run_modules(t: &Tape, p: &ParamVars, modules: &[Module], x: &Var) -> Result<Var> {
    let mut h = x.clone();
    for m in modules {
        h = match m {
            Module::ConvIn { name, .. } => conv(t, p, name, &h, ConvSpec::same(1, 1))?,
            Module::Resnet { name, .. } => resnet_block(t, p, name, &h)?,
            Module::Attn { name, .. } => attn_block(t, p, name, &h)?,
            Module::Downsample { name, .. } => conv(t, p, name, &h, ConvSpec::downsample())?,
            Module::Upsample { name, .. } => conv(t, p, name, &t.upsample2x(&h)?, ConvSpec::same(1, 1))?,
            Module::Out { norm, conv, .. } => normalize_swish_conv(t, p, norm, conv, &h, None)?,
        };
    }
    Ok(h)
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
fn quantize(t: &Tape, p: &ParamVars, z: &Var) -> Result<(Vec<u32>, Var, Var)> {
    let s = z.shape().to_vec();
    let (b, d, n) = (s[0], s[1], s[2] * s[3]);
    let codebook = p.get("quantize.embedding.weight")?;
    let (idx, _) = quantize::nearest(&z.value, &codebook.value)?;
    let indices = idx.to_u32_vec()?;
    // z_q from the codebook (differentiable w.r.t. the codebook), back to [B, D, h, w].
    let zq = t.embedding(codebook, &indices)?;
    let zq = t.reshape(&t.transpose(&t.reshape(&zq, &[b, n, d])?)?, &s)?;
    let diff = t.add_scaled(&zq.detach(), z, 1.0, -1.0)?;
    let commit = t.reduce(&t.mul(&diff, &diff)?, Reduce::Mean)?;
    let diff2 = t.add_scaled(&zq, &z.detach(), 1.0, -1.0)?;
    let embed = t.reduce(&t.mul(&diff2, &diff2)?, Reduce::Mean)?;
    let loss = t.add_scaled(&commit, &embed, 1.0, 0.25)?;
    let z_q = t.add(z, &t.add_scaled(&zq, z, 1.0, -1.0)?.detach())?;
    Ok((indices, z_q, loss))
}

impl Vqgan {
    /// Codebook indices [B][h*w] of images x [B, C, H, W] (raster order), and (h, w).
    pub fn encode_indices(&self, t: &Tape, p: &ParamVars, x: &Var) -> Result<(Vec<Vec<u32>>, usize, usize)> {
        let h = encoder(t, p, &self.config, x)?;
        let z = conv(t, p, "quant_conv", &h, ConvSpec::same(1, 0))?;
        let (hh, ww) = (z.shape()[2], z.shape()[3]);
        let (idx, _) = quantize::nearest(&z.value, &p.get("quantize.embedding.weight")?.value)?;
        let flat = idx.to_u32_vec()?;
        Ok((flat.chunks(hh * ww).map(|c| c.to_vec()).collect(), hh, ww))
    }

    /// Images [B, out_ch, H, W] from codebook indices [B][h*w] of an h x w latent grid.
    pub fn decode_indices(&self, t: &Tape, p: &ParamVars, indices: &[Vec<u32>], h: usize, w: usize) -> Result<Var> {
        let b = indices.len();
        let d = self.config.embed_dim;
        if indices.iter().any(|r| r.len() != h * w) {
            bail!("decode: every index row must hold {h}x{w} = {} codes", h * w);
        }
        let flat: Vec<u32> = indices.iter().flatten().copied().collect();
        let zq = t.embedding(p.get("quantize.embedding.weight")?, &flat)?;
        let zq = t.reshape(&t.transpose(&t.reshape(&zq, &[b, h * w, d])?)?, &[b, d, h, w])?;
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
            .filter(|(n, s)| n.ends_with(".weight") && s.len() == 4)
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
        Ok(Vqgan { config, params })
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
