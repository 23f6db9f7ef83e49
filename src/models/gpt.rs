//! Stage 2: minGPT as in taming (`modules/transformer/mingpt.py`): token and
//! learned position embeddings, pre-LN blocks of causal multi-head
//! self-attention and a 4x GELU MLP, final LayerNorm, bias-free head.
//!
//! # Token-by-token decoding
//!
//! `KvDecoder` costs 8 dispatches per layer: layer norm
//! (one invocation per row), one product for query, key and value written straight into a
//! per-layer cache of `(q, k, v)` rows (on CPU devices also copied into a texture, which the
//! attention reads: buffer loads in loops run lane by lane there), split-key attention over that
//! cache (2), the projection
//! added onto the residual stream in the product's epilogue, layer norm, the first MLP product with
//! GELU in its epilogue, the second added on. The row products (`gemv_*` in `shaders/matmul.wgsl`)
//! read x in place and the weight from a texture packed once, f16 (8 per texel) when the model file
//! stored it in f16, which changes no value; from 8 sequences on they go through the register-tiled
//! matmul instead. The weight's columns are stored in blocks, one texture layer per workgroup, so
//! each workgroup streams contiguous memory (a third faster than row-major when the weights come
//! from memory).
//!
//! Two costs dominated a decoding step on lavapipe (perf + gdb on the JIT code, 66–77
//! ms per token with f32 weights): every lane loaded the same x texel itself, lane by lane (32
//! masked scalar loads with store-forwarding stalls per texel: ~20% of the step), and each sampled
//! texel fetch looked up its mip level's strides per lane. On devices with 8-lane subgroups the
//! row products now come from `gemv_sg_*` (`shaders/matmul_subgroup.wgsl`, K % 32 == 0): each lane
//! loads one of 8 consecutive x texels and broadcasts hand them round, and the weight is read as a
//! read-only storage texture (no level). 37–43 ms per token, 8.5 s per 255 tokens (0.81×
//! PyTorch); f16 weights gain less (8 weights per fetch, but their unpacking costs), 7.6–8.3 s.
//! Storage-buffer loads inside loops are slower still (~600 cycles per 8-lane vec4 load; a
//! buffer-fed row product took 40 ms instead of 1), hence the texture copy of the KV cache
//! (attention 2.5 → 1.0 s per 255 tokens). Variants are chosen per adapter (`Tuning::gemv_entry`:
//! 16 columns per invocation on CPU devices for f32, 32 for f16; 4 and 8 on GPUs, unmeasured;
//! `Tuning::gemv_subgroup`: CPU devices with 8-lane subgroups; `Tuning::kv_cache_texture`: CPU
//! devices); `TAMING_GEMV_TEXELS=1|2|4`, `TAMING_GEMV_SG=0|1` and `TAMING_KV_TEXTURE=0|1` override.
//!
//! # Measurements
//!
//! On lavapipe (llvmpipe, Mesa 22.3.6, 2 cores); reference figures on the same machine from SPEC.md.
//!
//! - GPT 12×512, 8 heads, vocab 1024: 255 tokens greedy, KV cache, batch 1, f32 weights
//!   (`bench gpt-sample`): 7.5–8.5 s (0.72–0.81× PyTorch), 30–34 tokens/s, in four runs on
//!   2026-11-30; the day before, without the subgroup row products and storage textures:
//!   13.4–14.7 s, 1.3–1.4×. PyTorch CPU with KV cache (f32): 10.5 s (target: faster; met).
//! - Same, weights kept in f16 (what the decoder does for an f16 model file, e.g. from
//!   `export-half`): 7.4–8.3 s (0.71–0.79× PyTorch), 31–34 tokens/s (date not recorded).
//! - Same, batch 16 (f32): 45–70 tokens/s on 2026-11-30.
//! - Row product 1 × 2048 · 2048 × 512 (`bench rows`): f32 0.49–0.78 ms (5.4–8.8 GB/s), f16
//!   0.42–0.53 ms (date not recorded); 3.4 → 5.8–8.6 GB/s from storage textures (`kernels::matmul`).
//! - GPT block forward, 256 tokens × 512, 8 heads: 146–220 ms over the runs recorded, 152 ms on
//!   2026-11-30; Burn: 209 ms.
//! - GPT block training step (fwd + bwd + AdamW): 0.54–0.77 s over the runs recorded, 0.54 s on
//!   2026-11-30; peak 59 MiB.
//! - The same GPT, one training step, batch 8 × 256 tokens, AdamW: 47.5 s with four-column stores
//!   on 2026-11-30 (43 tokens/s); 52.1–52.9 s earlier the same day, 66.9 s the day before; peak
//!   1,265 MiB.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::weights::{ModelFile, ParamVars, Params};
use crate::engine::kernels::elementwise::{self, Binary, Unary};
use crate::engine::kernels::matmul::{gemv, gemv_into, pack_row_weight, pack_row_weight_tiled, Epilogue, RowWeight};
use crate::engine::kernels::norm::{self, NormKind};
use crate::engine::kernels::{attention, copy, embedding};
use crate::engine::{Gpu, Rng, Tape, Tensor, Var};

#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// minGPT's embedding, residual and attention dropout (training only; `forward_training`).
    pub pdrop: [f64; 3],
}

impl GptConfig {
    /// From `transformer_config.params`.
    pub fn from_params(p: &serde_json::Value) -> Result<Self> {
        use super::config_keys::{check, is_zero, Key::*};
        check(
            "transformer_config.params",
            p,
            &[
                Used("vocab_size"),
                Used("block_size"),
                Used("n_layer"),
                Used("n_head"),
                Used("n_embd"),
                Used("embd_pdrop"),
                Used("resid_pdrop"),
                Used("attn_pdrop"),
                OnlyOff("n_unmasked", is_zero, "unmasked leading positions (n_unmasked)"),
            ],
        )?;
        let pdrop = |k: &str| p.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        let u = |k: &str| -> Result<usize> {
            p.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| anyhow!("config: transformer_config.params.{k} missing"))
        };
        let c = GptConfig {
            vocab_size: u("vocab_size")?,
            block_size: u("block_size")?,
            n_layer: u("n_layer")?,
            n_head: u("n_head")?,
            n_embd: u("n_embd")?,
            pdrop: [pdrop("embd_pdrop"), pdrop("resid_pdrop"), pdrop("attn_pdrop")],
        };
        if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
            bail!("config: n_head {} does not divide n_embd {}", c.n_head, c.n_embd);
        }
        Ok(c)
    }
}

/// Parameter names (without the `transformer.` prefix) and shapes.
pub fn parameter_shapes(c: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let n = c.n_embd;
    let mut out =
        vec![("tok_emb.weight".to_string(), vec![c.vocab_size, n]), ("pos_emb".to_string(), vec![1, c.block_size, n])];
    for l in 0..c.n_layer {
        let b = format!("blocks.{l}");
        for (name, shape) in [
            ("ln1.weight", vec![n]),
            ("ln1.bias", vec![n]),
            ("attn.key.weight", vec![n, n]),
            ("attn.key.bias", vec![n]),
            ("attn.query.weight", vec![n, n]),
            ("attn.query.bias", vec![n]),
            ("attn.value.weight", vec![n, n]),
            ("attn.value.bias", vec![n]),
            ("attn.proj.weight", vec![n, n]),
            ("attn.proj.bias", vec![n]),
            ("ln2.weight", vec![n]),
            ("ln2.bias", vec![n]),
            ("mlp.0.weight", vec![4 * n, n]),
            ("mlp.0.bias", vec![4 * n]),
            ("mlp.2.weight", vec![n, 4 * n]),
            ("mlp.2.bias", vec![n]),
        ] {
            out.push((format!("{b}.{name}"), shape));
        }
    }
    out.push(("ln_f.weight".into(), vec![n]));
    out.push(("ln_f.bias".into(), vec![n]));
    out.push(("head.weight".into(), vec![c.vocab_size, n]));
    out
}

pub struct Gpt {
    pub config: GptConfig,
    pub params: Params,
    /// Every Linear weight came from the file in f16, so the decoder can keep
    /// them in f16 without changing a single value.
    pub half_weights: bool,
}

impl Gpt {
    /// Load `{prefix}{name}` for every parameter (prefix "transformer." in a Net2NetTransformer file).
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, config: GptConfig, prefix: &str) -> Result<Gpt> {
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(&config) {
            params.load_prefixed(file, gpu, prefix, &name, &shape)?;
        }
        let half_weights = parameter_shapes(&config)
            .iter()
            .filter(|(n, _)| Gpt::decays(n))
            .all(|(n, _)| file.is_half(&format!("{prefix}{n}")));
        Ok(Gpt { config, params, half_weights })
    }

    /// Logits [B, T, vocab] for token ids [B][T] (T <= block_size), in eval mode.
    pub fn forward(&self, t: &Tape, p: &ParamVars, ids: &[Vec<u32>]) -> Result<Var> {
        self.forward_with(t, p, ids, None)
    }

    /// The forward in training mode: minGPT's dropout after the embeddings (embd_pdrop), on the
    /// attention weights (attn_pdrop) and after each block's projection and MLP (resid_pdrop),
    /// its masks drawn from `rng` (ours, not torch's: the same probabilities, other draws).
    pub fn forward_training(&self, t: &Tape, p: &ParamVars, ids: &[Vec<u32>], rng: &mut Rng) -> Result<Var> {
        self.forward_with(t, p, ids, Some(rng))
    }

    fn forward_with(&self, t: &Tape, p: &ParamVars, ids: &[Vec<u32>], mut rng: Option<&mut Rng>) -> Result<Var> {
        let c = &self.config;
        let b = ids.len();
        let tl = ids.first().map_or(0, |r| r.len());
        if tl == 0 || tl > c.block_size || ids.iter().any(|r| r.len() != tl) {
            bail!("GPT input: {b} sequences of length {tl}; lengths must be equal and 1..={}", c.block_size);
        }
        if let Some(bad) = ids.iter().flatten().find(|&&i| i as usize >= c.vocab_size) {
            bail!("GPT input: token {bad} is outside the vocabulary of {}", c.vocab_size);
        }
        let n = c.n_embd;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tok = t.reshape(&t.embedding(p.get("tok_emb.weight")?, &flat)?, &[b, tl * n])?;
        let pos = t.reshape(&t.slice(&t.reshape(p.get("pos_emb")?, &[c.block_size, n])?, 0, 0, tl)?, &[tl * n])?;
        let mut x = t.reshape(&t.add_channel(&t.reshape(&tok, &[b, tl * n, 1])?, &pos, 1)?, &[b * tl, n])?;
        if let Some(r) = rng.as_deref_mut() {
            x = t.dropout(&x, c.pdrop[0] as f32, r)?;
        }
        for l in 0..c.n_layer {
            x = self.block_with(t, p, &format!("blocks.{l}"), &x, b, tl, rng.as_deref_mut())?;
        }
        let x = t.norm(&x, NormKind::Layer, p.get("ln_f.weight")?, p.get("ln_f.bias")?, 1e-5)?;
        let logits = t.matmul(&x, p.get("head.weight")?, false, true, None)?;
        t.reshape(&logits, &[b, tl, c.vocab_size])
    }

    fn linear(&self, t: &Tape, p: &ParamVars, name: &str, x: &Var) -> Result<Var> {
        t.matmul(x, p.get(&format!("{name}.weight"))?, false, true, Some(p.get(&format!("{name}.bias"))?))
    }

    /// x + attn(ln1(x)), then + mlp(ln2(x)); x is [B*T, C].
    pub fn block(&self, t: &Tape, p: &ParamVars, name: &str, x: &Var, b: usize, tl: usize) -> Result<Var> {
        self.block_with(t, p, name, x, b, tl, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_with(
        &self,
        t: &Tape,
        p: &ParamVars,
        name: &str,
        x: &Var,
        b: usize,
        tl: usize,
        mut rng: Option<&mut Rng>,
    ) -> Result<Var> {
        let n = self.config.n_embd;
        let [_, resid_pdrop, attn_pdrop] = self.config.pdrop.map(|p| p as f32);
        let ln = |k: &str, v: &Var| {
            t.norm(v, NormKind::Layer, p.get(&format!("{name}.{k}.weight"))?, p.get(&format!("{name}.{k}.bias"))?, 1e-5)
        };
        let h = ln("ln1", x)?;
        let seq = |v: Var| t.reshape(&v, &[b, tl, n]);
        let q = seq(self.linear(t, p, &format!("{name}.attn.query"), &h)?)?;
        let k = seq(self.linear(t, p, &format!("{name}.attn.key"), &h)?)?;
        let v = seq(self.linear(t, p, &format!("{name}.attn.value"), &h)?)?;
        let y = match rng.as_deref_mut() {
            Some(r) if attn_pdrop > 0.0 => attention_by_products(t, &q, &k, &v, self.config.n_head, attn_pdrop, r)?,
            _ => t.attention(&q, &k, &v, self.config.n_head, true)?,
        };
        let y = t.reshape(&y, &[b * tl, n])?;
        let mut drop = |v: Var| match rng.as_deref_mut() {
            Some(r) => t.dropout(&v, resid_pdrop, r),
            None => Ok(v),
        };
        let x = t.add(x, &drop(self.linear(t, p, &format!("{name}.attn.proj"), &y)?)?)?;
        let h = ln("ln2", &x)?;
        let h = t.unary(&self.linear(t, p, &format!("{name}.mlp.0"), &h)?, Unary::Gelu)?;
        t.add(&x, &drop(self.linear(t, p, &format!("{name}.mlp.2"), &h)?)?)
    }
}

/// Causal multi-head attention of q, k, v [B, T, C] from products, softmax and dropout on the
/// attention weights (minGPT's `attn_drop`), head by head: the fused kernel never forms the
/// weights, so training with attn_pdrop > 0 takes this path. With p = 0 it equals the kernel.
pub fn attention_by_products(t: &Tape, q: &Var, k: &Var, v: &Var, heads: usize, p: f32, rng: &mut Rng) -> Result<Var> {
    let (b, tl, c) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let d = c / heads;
    // -1e9 above the diagonal: exp underflows to exactly 0 there, as torch's masked_fill(-inf).
    let mask: Vec<f32> = (0..tl * tl).map(|i| if i % tl > i / tl { -1e9 } else { 0.0 }).collect();
    let mask = t.constant(Tensor::from_f32(&q.value.gpu, &mask, &[tl * tl])?);
    let mut outs = Vec::with_capacity(heads);
    for h in 0..heads {
        let (qh, kh, vh) = (t.slice(q, 2, h * d, d)?, t.slice(k, 2, h * d, d)?, t.slice(v, 2, h * d, d)?);
        let att = t.reshape(&t.matmul(&qh, &kh, false, true, None)?, &[b, tl * tl, 1])?;
        let att = t.reshape(&t.add_channel(&att, &mask, 1)?, &[b, tl, tl])?;
        let att = t.dropout(&t.softmax(&att, 1.0 / (d as f32).sqrt())?, p, rng)?;
        outs.push(t.matmul(&att, &vh, false, false, None)?);
    }
    t.concat(&outs.iter().collect::<Vec<_>>(), 2)
}

/// Token-by-token decoding with a key/value cache on the GPU: each step runs
/// the new token only, attending to the cached keys and values of the prefix
/// (the reference's `forward_with_past`). The weights are packed once for
/// row products (f16 when the model file stored them in f16, which is exact).
/// A layer costs 8 dispatches: ln1, the fused q/k/v product written straight
/// into the cache (and, on CPU devices, copied to its texture), attention
/// (2), the projection added onto the residual
/// stream, ln2, the first MLP product with GELU, the second added on.
pub struct KvDecoder<'a> {
    gpt: &'a Gpt,
    layers: Vec<DecoderLayer>,
    head: RowWeight,
    batch: usize,
    /// Tokens consumed so far (the position of the next one).
    pub pos: usize,
}

struct DecoderLayer {
    /// query, key and value weights side by side: one product per step.
    qkv: RowWeight,
    qkv_bias: Tensor,
    proj: RowWeight,
    fc: RowWeight,
    fc_out: RowWeight,
    /// Row t = (q, k, v) of token t.
    cache: attention::KvCache,
}

impl<'a> KvDecoder<'a> {
    pub fn new(gpt: &'a Gpt, batch: usize) -> Result<Self> {
        Self::with_precision(gpt, batch, gpt.half_weights)
    }

    /// `half`: keep the Linear weights in f16 (rounding f32 ones). From 8
    /// sequences on, the products run through the register-tiled matmul,
    /// which takes f32 weights.
    pub fn with_precision(gpt: &'a Gpt, batch: usize, half: bool) -> Result<Self> {
        let c = &gpt.config;
        let p = &gpt.params;
        let gpu = p.get("head.weight")?.gpu.clone();
        let pack_weight =
            |w: &Tensor| if batch >= 8 { pack_row_weight_tiled(w, true) } else { pack_row_weight(w, true, half) };
        let pack = |name: &str| pack_weight(p.get(name)?);
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let a = format!("blocks.{l}.attn");
            let part = |w: &str| p.get(&format!("{a}.{w}"));
            let qkv_weight = copy::concat(&[part("query.weight")?, part("key.weight")?, part("value.weight")?], 0)?;
            layers.push(DecoderLayer {
                qkv: pack_weight(&qkv_weight)?,
                qkv_bias: copy::concat(&[part("query.bias")?, part("key.bias")?, part("value.bias")?], 0)?,
                proj: pack(&format!("{a}.proj.weight"))?,
                fc: pack(&format!("blocks.{l}.mlp.0.weight"))?,
                fc_out: pack(&format!("blocks.{l}.mlp.2.weight"))?,
                cache: attention::KvCache::new(&gpu, batch, c.block_size, c.n_embd)?,
            });
        }
        Ok(KvDecoder { gpt, layers, head: pack("head.weight")?, batch, pos: 0 })
    }

    fn layer_norm(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let p = &self.gpt.params;
        let (w, b) = (p.get(&format!("{name}.weight"))?, p.get(&format!("{name}.bias"))?);
        if self.batch < 8 && x.gpu.info.device_type == wgpu::DeviceType::Cpu {
            // One dispatch; a few rows do not need the parallel statistics on a CPU device. (On
            // the H200 its one invocation per row took 57 µs, a fifth of a sampling step's GPU
            // time, where the parallel statistics and output take two dispatches of ~6 µs.)
            norm::layer_norm_rows(x, w, b, 1e-5)
        } else {
            Ok(norm::norm(x, NormKind::Layer, w, b, 1e-5, false)?.y)
        }
    }

    /// Feed one token per sequence; returns the next-token logits [batch * vocab] on the host.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let c = &self.gpt.config;
        let n = c.n_embd;
        if tokens.len() != self.batch {
            bail!("decoder step: {} tokens for a batch of {}", tokens.len(), self.batch);
        }
        if self.pos >= c.block_size {
            bail!("decoder: the sequence is full ({} tokens); slide the window instead", c.block_size);
        }
        let p = &self.gpt.params;
        let bias = |name: &str| p.get(&format!("{name}.bias"));
        let add = Epilogue { gelu: false, accumulate: true };
        // The residual stream x: token embedding + position embedding.
        let x = embedding::embedding(p.get("tok_emb.weight")?, tokens)?;
        let pos_row = copy::slice(&p.get("pos_emb")?.reshape(&[c.block_size, n])?, 0, self.pos, 1)?;
        let x = elementwise::binary_broadcast(&x, &pos_row, Binary::AddScaled(1.0, 1.0), 1)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let name = format!("blocks.{l}");
            let h = self.layer_norm(&format!("{name}.ln1"), &x)?;
            let row = 3 * n;
            gemv_into(
                &h,
                &layer.qkv,
                Some(&layer.qkv_bias),
                Epilogue::default(),
                &layer.cache.rows,
                self.pos * row,
                c.block_size * row,
            )?;
            layer.cache.commit(self.pos);
            let y = layer.cache.attend(c.n_head, self.pos)?;
            gemv_into(&y, &layer.proj, Some(bias(&format!("{name}.attn.proj"))?), add, &x, 0, n)?;
            let h = self.layer_norm(&format!("{name}.ln2"), &x)?;
            let h = gemv(&h, &layer.fc, Some(bias(&format!("{name}.mlp.0"))?), true)?;
            gemv_into(&h, &layer.fc_out, Some(bias(&format!("{name}.mlp.2"))?), add, &x, 0, n)?;
        }
        let x = self.layer_norm("ln_f", &x)?;
        let logits = gemv(&x, &self.head, None, false)?;
        self.pos += 1;
        logits.to_vec()
    }
}

/// Index of the first maximum (torch.argmax on ties).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().fold(0, |bi, (j, &x)| if x > row[bi] { j } else { bi }) as u32
}

impl Gpt {
    /// A new model initialised as minGPT's `_init_weights`: Linear and
    /// Embedding weights N(0, 0.02), biases 0, LayerNorm 1 and 0, pos_emb 0.
    pub fn random(gpu: &Arc<Gpu>, config: GptConfig, seed: u64) -> Result<Gpt> {
        let mut rng = crate::engine::Rng::new(seed);
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(&config) {
            let n: usize = shape.iter().product();
            let data = if name.contains(".ln") || name.starts_with("ln_f") {
                vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
            } else if name.ends_with(".bias") || name == "pos_emb" {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (0.02 * rng.normal()) as f32).collect()
            };
            params.insert(gpu, &name, &data, &shape)?;
        }
        Ok(Gpt { config, params, half_weights: false })
    }

    /// minGPT's optimizer groups: weight decay on the Linear layers' weights
    /// only (not biases, LayerNorm, embeddings or pos_emb).
    pub fn decays(name: &str) -> bool {
        name.ends_with(".weight") && (name.contains(".attn.") || name.contains(".mlp.") || name == "head.weight")
    }
}
