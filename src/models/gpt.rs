//! Stage 2: minGPT as in taming (`modules/transformer/mingpt.py`): token and
//! learned position embeddings, pre-LN blocks of causal multi-head
//! self-attention and a 4x GELU MLP, final LayerNorm, bias-free head.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::weights::{ModelFile, ParamVars, Params};
use crate::engine::kernels::elementwise::Unary;
use crate::engine::kernels::norm::NormKind;
use crate::engine::{Gpu, Tape, Var};

#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
}

impl GptConfig {
    /// From `transformer_config.params`.
    pub fn from_params(p: &serde_json::Value) -> Result<Self> {
        let u = |k: &str| -> Result<usize> {
            p.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| anyhow!("config: transformer_config.params.{k} missing"))
        };
        let c = GptConfig { vocab_size: u("vocab_size")?, block_size: u("block_size")?, n_layer: u("n_layer")?, n_head: u("n_head")?, n_embd: u("n_embd")? };
        if c.n_head == 0 || c.n_embd % c.n_head != 0 {
            bail!("config: n_head {} does not divide n_embd {}", c.n_head, c.n_embd);
        }
        Ok(c)
    }
}

/// Parameter names (without the `transformer.` prefix) and shapes.
pub fn parameter_shapes(c: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let n = c.n_embd;
    let mut out = vec![("tok_emb.weight".to_string(), vec![c.vocab_size, n]), ("pos_emb".to_string(), vec![1, c.block_size, n])];
    for l in 0..c.n_layer {
        let b = format!("blocks.{l}");
        for (name, shape) in [
            ("ln1.weight", vec![n]), ("ln1.bias", vec![n]),
            ("attn.key.weight", vec![n, n]), ("attn.key.bias", vec![n]),
            ("attn.query.weight", vec![n, n]), ("attn.query.bias", vec![n]),
            ("attn.value.weight", vec![n, n]), ("attn.value.bias", vec![n]),
            ("attn.proj.weight", vec![n, n]), ("attn.proj.bias", vec![n]),
            ("ln2.weight", vec![n]), ("ln2.bias", vec![n]),
            ("mlp.0.weight", vec![4 * n, n]), ("mlp.0.bias", vec![4 * n]),
            ("mlp.2.weight", vec![n, 4 * n]), ("mlp.2.bias", vec![n]),
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
}

impl Gpt {
    /// Load `{prefix}{name}` for every parameter (prefix "transformer." in a Net2NetTransformer file).
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, config: GptConfig, prefix: &str) -> Result<Gpt> {
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(&config) {
            let t = file.upload(gpu, &format!("{prefix}{name}"), &shape)?;
            params.order.push(name.clone());
            params.tensors.insert(name, t);
        }
        Ok(Gpt { config, params })
    }

    /// Logits [B, T, vocab] for token ids [B][T] (T <= block_size).
    pub fn forward(&self, t: &Tape, p: &ParamVars, ids: &[Vec<u32>]) -> Result<Var> {
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
        for l in 0..c.n_layer {
            x = self.block(t, p, &format!("blocks.{l}"), &x, b, tl)?;
        }
        let x = t.norm(&x, NormKind::Layer, p.get("ln_f.weight")?, p.get("ln_f.bias")?, 1e-5)?;
        let logits = t.matmul(&x, p.get("head.weight")?, false, true, None)?;
        t.reshape(&logits, &[b, tl, c.vocab_size])
    }

    fn linear(&self, t: &Tape, p: &ParamVars, name: &str, x: &Var) -> Result<Var> {
        t.matmul(x, p.get(&format!("{name}.weight"))?, false, true, Some(p.get(&format!("{name}.bias"))?))
    }

    /// x + attn(ln1(x)), then + mlp(ln2(x)); x is [B*T, C].
    fn block(&self, t: &Tape, p: &ParamVars, name: &str, x: &Var, b: usize, tl: usize) -> Result<Var> {
        let n = self.config.n_embd;
        let ln = |k: &str, v: &Var| t.norm(v, NormKind::Layer, p.get(&format!("{name}.{k}.weight"))?, p.get(&format!("{name}.{k}.bias"))?, 1e-5);
        let h = ln("ln1", x)?;
        let seq = |v: Var| t.reshape(&v, &[b, tl, n]);
        let q = seq(self.linear(t, p, &format!("{name}.attn.query"), &h)?)?;
        let k = seq(self.linear(t, p, &format!("{name}.attn.key"), &h)?)?;
        let v = seq(self.linear(t, p, &format!("{name}.attn.value"), &h)?)?;
        let y = t.reshape(&t.attention(&q, &k, &v, self.config.n_head, true)?, &[b * tl, n])?;
        let x = t.add(x, &self.linear(t, p, &format!("{name}.attn.proj"), &y)?)?;
        let h = ln("ln2", &x)?;
        let h = t.unary(&self.linear(t, p, &format!("{name}.mlp.0"), &h)?, Unary::Gelu)?;
        t.add(&x, &self.linear(t, p, &format!("{name}.mlp.2"), &h)?)
    }
}
