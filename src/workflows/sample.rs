//! `taming sample`: images from a Net2NetTransformer model file, token by
//! token with the KV cache, then decoded by its first stage into a grid PNG.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::images;
use crate::engine::{Gpu, Tape};
use crate::models::gpt::{Gpt, GptConfig, KvDecoder};
use crate::models::vqgan::{Vqgan, VqganConfig};
use crate::models::weights::ModelFile;

#[derive(Clone, Copy)]
pub struct SampleOptions {
    pub n: usize,
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
    pub seed: u64,
    /// Class token for class-conditional models.
    pub class: Option<u32>,
    pub batch: usize,
}

pub use crate::engine::rng::Rng;

/// Pick a token from logits with temperature, top-k and top-p (nucleus) filtering.
pub fn pick(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, rng: &mut Rng) -> u32 {
    if top_k == 1 || temperature <= 0.0 {
        return crate::models::gpt::argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let m = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - m) / temperature as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| { acc += p; acc >= top_p as f64 }).map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.next_f64() * total;
    for (p, &i) in probs.iter().zip(&order) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    *order.last().unwrap() as u32
}

pub fn sample(gpu: &Arc<Gpu>, model: &Path, out: &Path, o: &SampleOptions) -> Result<()> {
    let file = ModelFile::open(model)?;
    let target = file.config.get("target").and_then(|t| t.as_str()).unwrap_or("");
    if target != "taming.models.cond_transformer.Net2NetTransformer" {
        bail!("{}: '{target}' is not a Net2NetTransformer; sampling needs a transformer model file", model.display());
    }
    let params = file.config.get("params").cloned().unwrap_or_default();
    let gcfg = GptConfig::from_params(params.pointer("/transformer_config/params").ok_or_else(|| anyhow!("config: no transformer_config"))?)?;
    let vcfg = VqganConfig::from_params(params.pointer("/first_stage_config/params").ok_or_else(|| anyhow!("config: no first_stage_config"))?)?;
    let cond = params.get("cond_stage_config");
    let unconditional = cond.and_then(|v| v.as_str()) == Some("__is_unconditional__");
    let start = match (unconditional, o.class) {
        (true, None) => params.get("sos_token").and_then(|v| v.as_u64()).unwrap_or(0) as u32,
        (true, Some(_)) => bail!("--class: this model is unconditional"),
        (false, Some(k)) if cond.and_then(|c| c.get("target")).and_then(|t| t.as_str()).is_some_and(|t| t.ends_with("Labelator")) => k,
        (false, Some(_)) => bail!("--class: this model is conditioned on images, not classes (spatial conditioning is not implemented yet)"),
        (false, None) => bail!("this model is conditional: pass --class K"),
    };
    if start as usize >= gcfg.vocab_size {
        bail!("--class {start} is outside the transformer's vocabulary of {}", gcfg.vocab_size);
    }
    let gpt = Gpt::load(&file, gpu, gcfg.clone(), "transformer.")?;
    let vq = Vqgan::load(&file, gpu, vcfg.clone(), "first_stage_model.")?;
    let side = vcfg.resolution / vcfg.factor();
    let tokens = side * side;
    if tokens > gcfg.block_size {
        bail!("a {side}x{side} grid needs {tokens} tokens but the transformer's window is {}; sliding-window sampling is not implemented yet", gcfg.block_size);
    }
    let mut rng = Rng::new(o.seed);
    let mut all: Vec<Vec<u32>> = Vec::new();
    let batch = o.batch.max(1);
    while all.len() < o.n {
        let b = batch.min(o.n - all.len());
        let mut dec = KvDecoder::new(&gpt, b)?;
        let mut seqs: Vec<Vec<u32>> = vec![Vec::with_capacity(tokens); b];
        let mut next = vec![start; b];
        for step in 0..tokens {
            let lg = dec.step(&next)?;
            next = (0..b).map(|i| pick(&lg[i * gcfg.vocab_size..(i + 1) * gcfg.vocab_size], o.temperature, o.top_k, o.top_p, &mut rng)).collect();
            for (s, &t) in seqs.iter_mut().zip(&next) {
                s.push(t);
            }
            if (step + 1) % (tokens / 10).max(1) == 0 || step + 1 == tokens {
                eprint!("\rsampling images {}-{} of {}: token {}/{tokens}", all.len() + 1, all.len() + b, o.n, step + 1);
            }
        }
        all.extend(seqs);
    }
    eprintln!();
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let px = side * vcfg.factor();
    let mut tiles = Vec::new();
    for chunk in all.chunks(4) {
        let img = vq.decode_indices(&tape, &p, chunk, side, side)?.value.to_vec()?;
        let per = 3 * px * px;
        for k in 0..chunk.len() {
            tiles.push(images::from_chw(&img[k * per..(k + 1) * per], px as u32, px as u32));
        }
    }
    let cols = (o.n as f64).sqrt().ceil() as usize;
    images::save_png(&images::grid(&tiles, cols), out)?;
    println!("wrote {} ({} samples, {px}x{px})", out.display(), o.n);
    Ok(())
}
