//! `taming train-transformer`: stage 2 of the paper. The dataset is
//! tokenized once by the (frozen) VQGAN and the codes cached in the run
//! folder; the GPT then learns p(z | c) with AdamW (minGPT's decay groups,
//! β = (0.9, 0.95)) and a constant or warm-up + cosine learning rate.
//!
//! The run folder is laid out as for `train-vqgan`: `model.safetensors` is a
//! Net2NetTransformer model file (transformer + first stage) that `taming
//! sample` reads, `train_state.safetensors` is what `--resume` reads, plus
//! `codes.safetensors` (the token cache), `log.jsonl` and `samples_<step>.png`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::autoencode::load_vqgan;
use super::conditions::CondStage;
use super::data::{self, Augment, Order};
use super::images;
use super::maps::Picture;
use super::run::{
    finite, first_non_finite, log_line, metadata_u64, moment_tensors, open_rank_log, progress_bar, read_config_file,
    RunDir,
};
use super::sample::{decode_grid, generate, no_progress, Pick};
use crate::engine::distributed::{Shard, World};
use crate::engine::optim::{clip_grad_norm, Adam, AdamConfig};
use crate::engine::{Gpu, Rng, Tape, Tensor};
use crate::models::cond_transformer::{
    corrupt, drop_conditions, image_logits, image_loss, Conditioning, Net2NetConfig, GPT_TARGET, TARGET,
};
use crate::models::gpt::{Gpt, GptConfig};
use crate::models::vqgan::Vqgan;
use crate::models::weights::{write_safetensors, HostData, HostTensor, ModelFile};

#[derive(Default, Clone)]
pub struct TransformerOptions {
    /// The first stage: a VQModel file (or a Net2NetTransformer's first stage).
    pub vqgan: Option<PathBuf>,
    pub data: PathBuf,
    /// CSV with a `file` column (relative to --data) and a label column.
    pub labels: Option<PathBuf>,
    pub label_column: Option<String>,
    /// Spatial conditioning: condition images (same relative paths and stems as --data) ...
    pub cond_data: Option<PathBuf>,
    /// ... and the VQGAN that tokenizes them.
    pub cond_vqgan: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub steps: Option<u64>,
    pub batch: Option<usize>,
    pub base_lr: Option<f64>,
    pub save_every: Option<u64>,
    pub seed: Option<u64>,
    pub quiet: bool,
}

/// The `train:` block of a transformer run's config (ours; the `model:`
/// block is the reference's). Every key is optional; a key not listed here is an error.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainBlock {
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub base_learning_rate: Option<f64>,
    pub weight_decay: Option<f32>,
    pub lr_schedule: Option<String>,
    pub warmup_steps: Option<u64>,
    pub min_lr_ratio: Option<f64>,
    pub grad_clip: Option<f32>,
    pub save_every: Option<u64>,
    pub log_every: Option<u64>,
    pub val_images: Option<usize>,
    pub flip: Option<bool>,
    pub seed: Option<u64>,
    pub label_column: Option<String>,
}

/// Everything a run needs; saved in `config.json` and the resume state.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The Net2NetTransformer block, first stage included.
    pub model: Net2NetConfig,
    pub steps: u64,
    pub batch_size: usize,
    pub base_learning_rate: f64,
    pub weight_decay: f32,
    /// "constant" or "cosine" (after `warmup_steps` of linear warm-up, down to min_lr_ratio × lr).
    pub lr_schedule: String,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip (0: off, as the reference).
    pub grad_clip: f32,
    pub save_every: u64,
    pub log_every: u64,
    pub val_images: usize,
    pub flip: bool,
    pub seed: u64,
    pub label_column: String,
}

impl RunConfig {
    /// `file`: the config file's JSON (a `model:` block with `transformer_config`
    /// and optionally `cond_stage_config` and `pkeep`; an optional `train:` block).
    /// The first stage comes from the VQGAN file; vocab_size and block_size
    /// default to what the codes and the conditioning need.
    fn new(
        file: &Value,
        path: &Path,
        first_stage: Value,
        cond_stage: Option<Value>,
        n_classes: Option<usize>,
        o: &TransformerOptions,
    ) -> Result<RunConfig> {
        let model = file.get("model").ok_or_else(|| anyhow!("{}: no 'model:' block", path.display()))?;
        let mut m = model.clone();
        m["target"] = json!(TARGET);
        let params = m.get_mut("params").ok_or_else(|| anyhow!("{}: no 'model.params'", path.display()))?;
        params["first_stage_config"] = first_stage.clone();
        if let Some(cs) = &cond_stage {
            params["cond_stage_config"] = cs.clone();
        }
        match (params.get("cond_stage_config").is_some(), n_classes) {
            (false, Some(n)) => {
                params["cond_stage_config"] =
                    json!({"target": crate::models::cond_transformer::LABELATOR_TARGET, "params": {"n_classes": n}})
            }
            (false, None) => params["cond_stage_config"] = json!("__is_unconditional__"),
            (true, _) => {}
        }
        let tc = params
            .pointer_mut("/transformer_config")
            .ok_or_else(|| anyhow!("{}: no model.params.transformer_config", path.display()))?;
        tc["target"] = json!(GPT_TARGET);
        let tp = tc.get_mut("params").ok_or_else(|| anyhow!("{}: no transformer_config.params", path.display()))?;
        // vocab_size and block_size default to what the stages need (`Net2NetConfig::gpt_needs`);
        // 1 stands in for them while the config is read for that.
        let given = (tp.get("block_size").is_some(), tp.get("vocab_size").is_some());
        for (key, is_given) in [("block_size", given.0), ("vocab_size", given.1)] {
            if !is_given {
                tp[key] = json!(1);
            }
        }
        let (block, vocab) =
            Net2NetConfig::parse(&m).and_then(|c| c.gpt_needs()).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let tp = &mut m["params"]["transformer_config"]["params"];
        for (key, is_given, needed) in [("block_size", given.0, block), ("vocab_size", given.1, vocab)] {
            if !is_given {
                tp[key] = json!(needed);
            }
        }
        let net = Net2NetConfig::from_config(&m).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if let (Conditioning::Class { n_classes: want }, Some(have)) = (&net.cond, n_classes) {
            if *want != have {
                bail!("{}: the config has {want} classes but the labels have {have}", path.display());
            }
        }
        if matches!(net.cond, Conditioning::Class { .. }) && n_classes.is_none() {
            bail!("{}: the model is class-conditional: give --labels CSV", path.display());
        }
        if matches!(net.cond, Conditioning::Spatial { .. }) != cond_stage.is_some() {
            bail!(
                "{}: spatial conditioning needs both the config's cond_stage_config and --cond-data/--cond-vqgan",
                path.display()
            );
        }
        let t: TrainBlock = super::train_vqgan::train_block(file, path)?;
        // Defaults, in one place: the command line, then the `train:` block,
        // then the reference config's own values, then ours.
        let batch_default = file.pointer("/data/params/batch_size").and_then(|x| x.as_u64()).unwrap_or(16) as usize;
        let c = RunConfig {
            steps: o.steps.or(t.steps).unwrap_or(10000),
            batch_size: o.batch.or(t.batch_size).unwrap_or(batch_default),
            base_learning_rate: o
                .base_lr
                .or(t.base_learning_rate)
                .unwrap_or(model.get("base_learning_rate").and_then(|x| x.as_f64()).unwrap_or(4.5e-6)),
            weight_decay: t.weight_decay.unwrap_or(0.01),
            lr_schedule: t.lr_schedule.unwrap_or_else(|| "constant".into()),
            warmup_steps: t.warmup_steps.unwrap_or(0),
            min_lr_ratio: t.min_lr_ratio.unwrap_or(0.1),
            grad_clip: t.grad_clip.unwrap_or(0.0),
            save_every: o.save_every.or(t.save_every).unwrap_or(500),
            log_every: t.log_every.unwrap_or(10),
            val_images: t.val_images.unwrap_or(64),
            flip: t.flip.unwrap_or(true),
            seed: o.seed.or(t.seed).unwrap_or(0),
            label_column: o.label_column.clone().or(t.label_column).unwrap_or_else(|| "category".into()),
            model: net,
        };
        if c.lr_schedule != "constant" && c.lr_schedule != "cosine" {
            bail!("{}: lr_schedule '{}' is not constant or cosine", path.display(), c.lr_schedule);
        }
        if c.batch_size == 0 || c.steps == 0 || c.save_every == 0 || c.log_every == 0 || c.val_images == 0 {
            bail!("{}: batch_size, steps, save_every, log_every and val_images must be positive", path.display());
        }
        Ok(c)
    }

    fn to_json(&self) -> Value {
        json!({
            "model": self.model.to_config(),
            "train": {
                "steps": self.steps, "batch_size": self.batch_size, "base_learning_rate": self.base_learning_rate,
                "weight_decay": self.weight_decay, "lr_schedule": self.lr_schedule, "warmup_steps": self.warmup_steps,
                "min_lr_ratio": self.min_lr_ratio, "grad_clip": self.grad_clip, "save_every": self.save_every,
                "log_every": self.log_every, "val_images": self.val_images, "flip": self.flip, "seed": self.seed,
                "label_column": self.label_column,
            }
        })
    }

    /// The peak learning rate: base × batch, as the reference's main.py.
    pub fn learning_rate(&self) -> f64 {
        self.base_learning_rate * self.batch_size as f64
    }

    /// The rate at `step`: linear warm-up, then constant or cosine decay.
    pub fn lr_at(&self, step: u64) -> f32 {
        let peak = self.learning_rate();
        if step < self.warmup_steps {
            return (peak * (step + 1) as f64 / self.warmup_steps as f64) as f32;
        }
        if self.lr_schedule == "constant" {
            return peak as f32;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = peak * self.min_lr_ratio;
        (min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * t).cos())) as f32
    }
}

/// One training example: an image and its class.
#[derive(Clone, Debug)]
pub struct Example {
    pub path: PathBuf,
    pub class: Option<u32>,
    /// The condition image (spatial conditioning).
    pub cond: Option<PathBuf>,
}

/// Examples from a labels CSV (a header row with `file` and the label
/// column; files relative to `data`): class ids are the sorted label names.
pub fn read_labels(csv: &Path, data: &Path, column: &str) -> Result<(Vec<Example>, Vec<String>)> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("reading labels {}", csv.display()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = split_csv(lines.next().ok_or_else(|| anyhow!("{}: empty", csv.display()))?);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow!("{}: no '{name}' column (columns: {})", csv.display(), header.join(", ")))
    };
    let (fc, lc) = (col("file")?, col(column)?);
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let f = split_csv(line);
        let (Some(file), Some(label)) = (f.get(fc), f.get(lc)) else {
            bail!("{}: line {} has {} fields, fewer than the header", csv.display(), i + 2, f.len());
        };
        let path = data.join(file);
        if !path.exists() {
            bail!(
                "{}: line {}: {} does not exist (files are relative to --data {})",
                csv.display(),
                i + 2,
                path.display(),
                data.display()
            );
        }
        rows.push((path, label.clone()));
    }
    let mut names: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    names.sort();
    names.dedup();
    let id: HashMap<&String, u32> = names.iter().enumerate().map(|(i, n)| (n, i as u32)).collect();
    let examples = rows.iter().map(|(p, l)| Example { path: p.clone(), class: Some(id[l]), cond: None }).collect();
    Ok((examples, names))
}

/// One CSV line: commas, with double-quoted fields that may hold commas and "" escapes.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

/// FNV-1a, for the token cache's key.
fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// Codes of every example ([variant][codes] per example; variant 1 is the
/// mirrored picture when flips are on), from the `cache` file when its key
/// matches (same stage file, inputs and settings), else computed by `encode`
/// (a chunk of paths -> their variants' codes) and saved. Over several ranks each encodes its
/// consecutive share of the examples and the shares are gathered (rank 0 writes the cache).
#[allow(clippy::too_many_arguments)]
fn tokenize_cached(
    stage_path: &Path,
    paths: &[&Path],
    flip: bool,
    len: usize,
    cache: &Path,
    message: &'static str,
    quiet: bool,
    world: &World,
    mut encode: impl FnMut(&[&Path]) -> Result<Vec<Vec<Vec<u32>>>>,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let stage_bytes = std::fs::read(stage_path).with_context(|| format!("reading {}", stage_path.display()))?;
    let mut key = fnv(&stage_bytes, 0xcbf29ce484222325);
    for p in paths {
        key = fnv(p.to_string_lossy().as_bytes(), key);
        let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        key = fnv(&size.to_le_bytes(), key);
    }
    key = fnv(&[flip as u8], key);
    let key = format!("{key:016x}");
    let variants = if flip { 2 } else { 1 };
    if let Ok(f) = ModelFile::open_tensors(cache) {
        if f.metadata("key").as_deref() == Some(key.as_str()) {
            let (codes, shape) = f.indices("codes")?;
            if shape == [paths.len(), variants, len] {
                return Ok(codes.chunks(variants * len).map(|e| e.chunks(len).map(|c| c.to_vec()).collect()).collect());
            }
        }
    }
    let share = |rank: usize| Shard { index: rank, count: world.size() }.range(paths.len());
    let mine = &paths[share(world.rank())];
    let bar = progress_bar(mine.len() as u64, 0, quiet);
    bar.set_message(message);
    let mut out = Vec::with_capacity(paths.len());
    for chunk in mine.chunks(16) {
        out.extend(encode(chunk)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if world.size() > 1 {
        // Shares differ by one example at most: each is padded to the largest for the gather.
        let unit = variants * len;
        let most = paths.len().div_ceil(world.size());
        let mut flat: Vec<u32> = out.iter().flatten().flatten().copied().collect();
        flat.resize(most * unit, 0);
        let all = world.all_gather(&flat);
        out = (0..world.size())
            .flat_map(|r| all[r * most * unit..][..share(r).len() * unit].chunks(unit))
            .map(|e| e.chunks(len).map(|c| c.to_vec()).collect())
            .collect();
    }
    if world.is_root() {
        let flat: Vec<i64> = out.iter().flatten().flatten().map(|&c| c as i64).collect();
        let t = HostTensor { name: "codes".into(), shape: vec![paths.len(), variants, len], data: HostData::I64(flat) };
        write_safetensors(cache, &[t], HashMap::from([("key".to_string(), key)]), false)?;
    }
    Ok(out)
}

/// The first stage's codes of every image (and its mirror image with flips).
#[allow(clippy::too_many_arguments)]
fn tokenize(
    gpu: &Arc<Gpu>,
    vq: &Vqgan,
    vq_path: &Path,
    paths: &[&Path],
    flip: bool,
    cache: &Path,
    quiet: bool,
    world: &World,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let res = vq.config.resolution;
    let side = res / vq.config.factor();
    let variants = if flip { 2 } else { 1 };
    let aug = Augment { resize: res as u32, crop: res as u32, random_crop: false, flip: false, nearest: false };
    let tape = Tape::inference();
    let p = vq.params.constants(&tape);
    let message = "tokenizing the images with the VQGAN (once; cached)";
    tokenize_cached(vq_path, paths, flip, side * side, cache, message, quiet, world, |chunk| {
        let mut x = Vec::new();
        for path in chunk {
            let img = data::load_sample(path, &aug, &mut Rng::new(0))?;
            images::to_chw(&img, &mut x);
            if flip {
                images::to_chw(&image::imageops::flip_horizontal(&img), &mut x);
            }
        }
        let n = chunk.len() * variants;
        let (codes, _, _) =
            vq.encode_indices(&tape, &p, &tape.constant(Tensor::from_f32(gpu, &x, &[n, 3, res, res])?))?;
        Ok(codes.chunks(variants).map(|e| e.to_vec()).collect())
    })
}

/// The cond stage's codes of every example's condition (and of its mirror image with flips),
/// at the first stage's resolution; coordinates need no files.
#[allow(clippy::too_many_arguments)]
fn tokenize_conditions(
    gpu: &Arc<Gpu>,
    stage: &CondStage,
    stage_path: Option<&Path>,
    net: &Net2NetConfig,
    paths: &[&Path],
    n: usize,
    flip: bool,
    cache: &Path,
    quiet: bool,
    world: &World,
) -> Result<Vec<Vec<Vec<u32>>>> {
    let res = net.vqgan()?.resolution;
    let variants = if flip { 2 } else { 1 };
    let (Some(kind), Some(stage_path)) = (stage.kind(), stage_path) else {
        let codes = stage.encode(gpu, &[], 1, (res, res), net.downsample_cond)?.remove(0);
        return Ok(vec![vec![codes; variants]; n]);
    };
    let message = "tokenizing the conditions with the cond stage (once; cached)";
    tokenize_cached(stage_path, paths, flip, net.cond_len()?, cache, message, quiet, world, |chunk| {
        let mut pics = Vec::new();
        for path in chunk {
            // Variant 0 the condition, variant 1 its mirror image.
            let pic = super::conditions::fit(super::maps::load(kind, path)?, res, res)?;
            let mirrored = flip.then(|| pic.flip_horizontal());
            pics.push(pic);
            pics.extend(mirrored);
        }
        let refs: Vec<&Picture> = pics.iter().collect();
        let codes = stage.encode(gpu, &refs, 0, (res, res), net.downsample_cond)?;
        Ok(codes.chunks(variants).map(|e| e.to_vec()).collect())
    })
}

/// A model file's VQGAN config for a stage of the transformer: a VQModel's
/// own, or a Net2NetTransformer's first (or, `cond`, condition) stage; with a
/// DummyLoss, as the reference's transformer configs give frozen stages.
fn stage_config(path: &Path, cond: bool) -> Result<Value> {
    let file = ModelFile::open(path)?;
    let mut c = if file.config.get("target").and_then(|t| t.as_str()) == Some(TARGET) {
        file.config["params"][if cond { "cond_stage_config" } else { "first_stage_config" }].clone()
    } else {
        file.config.clone()
    };
    if c.get("params").is_none() {
        bail!("{}: no VQGAN config for the {} stage", path.display(), if cond { "condition" } else { "first" });
    }
    c["params"]["lossconfig"] = json!({"target": "taming.modules.losses.DummyLoss"});
    Ok(c)
}

/// The condition's autoencoder: an autoencoder file, or a spatially conditioned transformer's
/// `cond_stage_model`.
fn load_cond_vqgan(gpu: &Arc<Gpu>, path: &Path) -> Result<CondStage> {
    let file = ModelFile::open(path)?;
    let vq = if file.config.get("target").and_then(|t| t.as_str()) == Some(TARGET) {
        let cfg = crate::models::vqgan::VqganConfig::from_config(&stage_config(path, true)?)?;
        Vqgan::load(&file, gpu, cfg, "cond_stage_model.")?
    } else {
        load_vqgan(gpu, path)?
    };
    let kind = super::maps::Kind::of(&vq.config)?;
    Ok(CondStage::Vq { vq: Box::new(vq), kind })
}

/// The condition image of `image` (under `data`): the file under `cond_dir`
/// with the same relative folder and stem (any image extension).
fn find_condition(data: &Path, cond_dir: &Path, image: &Path) -> Result<PathBuf> {
    let rel = image.strip_prefix(data).unwrap_or(image);
    let stem = rel.with_extension("");
    for ext in ["png", "jpg", "jpeg", "PNG", "JPG", "JPEG"] {
        let p = cond_dir.join(stem.with_extension(ext));
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{}: no condition image {}.png/.jpg under --cond-data {}",
        image.display(),
        stem.display(),
        cond_dir.display()
    )
}

/// What a finished run reports.
#[derive(Debug)]
pub struct Summary {
    pub steps_done: u64,
    pub val_bits_per_token: Option<f64>,
    pub seconds_per_step: f64,
}

/// The GPT (resumed from the run's state, or new) and AdamW over it (decay on
/// Linear weights only, β = (0.9, 0.95); its moments when resuming), and the
/// step to start from.
fn build_model(gpu: &Arc<Gpu>, cfg: &RunConfig, state_file: Option<ModelFile>) -> Result<(Gpt, Adam, u64)> {
    let gcfg: GptConfig = cfg.model.gpt.clone();
    if let Some(p) = gcfg.pdrop.iter().find(|&&p| !(0.0..1.0).contains(&p)) {
        bail!("config: transformer_config.params: a dropout probability of {p} (0 <= p < 1)");
    }
    let (gpt, start_step, adam_step) = match &state_file {
        Some(state) => {
            let meta = |k: &str| metadata_u64(state, k);
            (Gpt::load(state, gpu, gcfg.clone(), "gpt.")?, meta("step")?, meta("adam_step")? as u32)
        }
        None => (Gpt::random(gpu, gcfg.clone(), cfg.seed)?, 0, 0),
    };
    let groups: Vec<(Tensor, f32)> = gpt
        .params
        .order
        .iter()
        .map(|n| (gpt.params.tensors[n].clone(), if Gpt::decays(n) { cfg.weight_decay } else { 0.0 }))
        .collect();
    let mut adam = Adam::new(AdamConfig::adamw(cfg.lr_at(0), 0.9, 0.95), &groups)?;
    if let Some(state) = &state_file {
        let moments = gpt
            .params
            .order
            .iter()
            .map(|n| Ok((state.host(&format!("adam.m.{n}"), None)?.0, state.host(&format!("adam.v.{n}"), None)?.0)))
            .collect::<Result<Vec<_>>>()?;
        adam.load_state(adam_step, &moments)?;
    }
    Ok((gpt, adam, start_step))
}

/// The training examples (images, their classes from `--labels`, their
/// condition images under `--cond-data`), the class names, and the condition
/// VQGAN's path; every file's header is checked here, so a bad file stops the
/// run at once, by name.
fn gather_examples(
    o: &TransformerOptions,
    run: &RunDir,
    resuming: bool,
) -> Result<(Vec<Example>, Vec<String>, Option<PathBuf>)> {
    let label_column = o.label_column.clone().unwrap_or_else(|| "category".into());
    let (examples, class_names) = match &o.labels {
        Some(csv) => read_labels(csv, &o.data, &label_column)?,
        None => (
            data::list_images(&o.data)?.into_iter().map(|path| Example { path, class: None, cond: None }).collect(),
            Vec::new(),
        ),
    };
    let mut examples = examples;
    // Spatial conditioning: each image's condition image, and the VQGAN for those.
    let cond_vq_path = match (&o.cond_vqgan, &o.cond_data, resuming) {
        (Some(p), Some(_), _) => Some(p.clone()),
        (None, Some(_), true) => Some(run.model()),
        (None, None, _) => None,
        _ => bail!("spatial conditioning needs both --cond-data DIR and --cond-vqgan MODEL"),
    };
    if let Some(dir) = &o.cond_data {
        if o.labels.is_some() {
            bail!("--labels and --cond-data: a model is conditioned on classes or on images, not both");
        }
        for e in examples.iter_mut() {
            e.cond = Some(find_condition(&o.data, dir, &e.path)?);
        }
    }
    let mut all_paths: Vec<PathBuf> = examples.iter().map(|e| e.path.clone()).collect();
    all_paths.extend(examples.iter().filter_map(|e| e.cond.clone()));
    data::check_headers(&all_paths)?;
    Ok((examples, class_names, cond_vq_path))
}

/// The run's config: the saved one when resuming (checked against the VQGAN
/// given now; the command line may lengthen the run, nothing else), else the
/// config file completed by the stages and the number of classes.
fn run_config(
    run: &RunDir,
    state_file: Option<&ModelFile>,
    vq_path: &Path,
    first_stage: &Value,
    cond_stage: &Option<Value>,
    n_classes: Option<usize>,
    o: &TransformerOptions,
) -> Result<RunConfig> {
    if let Some(state) = state_file {
        let saved: Value = serde_json::from_str(
            &state.metadata("config").ok_or_else(|| anyhow!("{}: no config", run.state().display()))?,
        )?;
        let mut saved_model = saved["model"].clone();
        let params =
            saved_model.get_mut("params").ok_or_else(|| anyhow!("{}: config without params", run.state().display()))?;
        let saved_fs = params["first_stage_config"].clone();
        if saved_fs["params"]["ddconfig"] != first_stage["params"]["ddconfig"] {
            bail!("{}: its VQGAN differs from the run's in {}", vq_path.display(), run.dir.display());
        }
        let opts = TransformerOptions {
            steps: o.steps,
            save_every: o.save_every,
            label_column: Some(saved["train"]["label_column"].as_str().unwrap_or("category").into()),
            ..Default::default()
        };
        let saved_cs = match &params["cond_stage_config"] {
            c if crate::models::vqgan::is_target(c.get("target").and_then(|t| t.as_str()).unwrap_or("")) => {
                Some(c.clone())
            }
            _ => None,
        };
        let mut c = RunConfig::new(
            &json!({"model": saved_model, "train": saved["train"]}),
            &run.state(),
            saved_fs,
            saved_cs,
            n_classes,
            &opts,
        )?;
        for (flag, differs) in [
            ("--batch", o.batch.is_some_and(|b| b != c.batch_size)),
            ("--lr", o.base_lr.is_some_and(|l| l != c.base_learning_rate)),
            ("--seed", o.seed.is_some_and(|s| s != c.seed)),
        ] {
            if differs {
                bail!("{flag} differs from the run being resumed in {}", run.dir.display());
            }
        }
        c.steps = o.steps.unwrap_or(c.steps);
        Ok(c)
    } else {
        let path = o.config.as_ref().ok_or_else(|| anyhow!("--config is required for a new run"))?;
        RunConfig::new(&read_config_file(path)?, path, first_stage.clone(), cond_stage.clone(), n_classes, o)
    }
}

pub fn train(gpu: &Arc<Gpu>, o: &TransformerOptions) -> Result<Summary> {
    let world = World::init()?;
    let result = train_ranks(gpu, o, &world);
    world.finish(result)
}

/// `train` as one of `world`'s ranks (data parallel: each takes its shard of every batch, the
/// gradients are averaged; rank 0 writes the run's files).
fn train_ranks(gpu: &Arc<Gpu>, o: &TransformerOptions, world: &World) -> Result<Summary> {
    let o = &TransformerOptions { quiet: o.quiet || !world.is_root(), ..o.clone() };
    // Every rank reads the run folder; only rank 0 writes into it (after the ranks tokenized
    // their shares of the images together).
    let (run, resuming) = RunDir::open(&o.out, o.resume)?;
    let state_file = if resuming { Some(ModelFile::open_tensors(&run.state())?) } else { None };
    // The first stage: --vqgan, or (resuming) the run's own model file.
    let vq_path = match (&o.vqgan, resuming) {
        (Some(p), _) => p.clone(),
        (None, true) => run.model(),
        (None, false) => bail!("--vqgan is required for a new run"),
    };
    let vq = load_vqgan(gpu, &vq_path)?;
    let first_stage = stage_config(&vq_path, false)?;

    let (examples, class_names, cond_vq_path) = gather_examples(o, &run, resuming)?;
    let cond_vq = match &cond_vq_path {
        Some(p) => Some(load_cond_vqgan(gpu, p)?),
        None => None,
    };
    let cond_stage = match &cond_vq_path {
        Some(p) => Some(stage_config(p, true)?),
        None => None,
    };
    let n_classes = o.labels.as_ref().map(|_| class_names.len());

    let cfg = run_config(&run, state_file.as_ref(), &vq_path, &first_stage, &cond_stage, n_classes, o)?;
    let (train_ex, val_ex) = {
        let idx: Vec<PathBuf> = (0..examples.len()).map(|i| PathBuf::from(i.to_string())).collect();
        let (t, v) = data::split_validation(idx, cfg.val_images)?;
        let pick = |s: Vec<PathBuf>| -> Vec<usize> { s.iter().map(|p| p.to_string_lossy().parse().unwrap()).collect() };
        (pick(t), pick(v))
    };
    let image_paths: Vec<&Path> = examples.iter().map(|e| e.path.as_path()).collect();
    let codes = tokenize(gpu, &vq, &vq_path, &image_paths, cfg.flip, &run.path("codes.safetensors"), o.quiet, world)?;
    // The cond stage: the condition autoencoder given, or the config's coordinates.
    let cond_vq = match (cond_vq, &cfg.model.cond) {
        (None, Conditioning::Coord { n_embed, down_factor }) => {
            Some(CondStage::Coord { n_embed: *n_embed, down_factor: *down_factor })
        }
        (stage, _) => stage,
    };
    let cond_codes = match &cond_vq {
        Some(stage) => {
            let cond_paths: Vec<&Path> = examples.iter().filter_map(|e| e.cond.as_deref()).collect();
            let cache = run.path("cond_codes.safetensors");
            let n = examples.len();
            let p = cond_vq_path.as_deref();
            Some(tokenize_conditions(gpu, stage, p, &cfg.model, &cond_paths, n, cfg.flip, &cache, o.quiet, world)?)
        }
        None => None,
    };
    let variants = if cfg.flip { 2 } else { 1 };

    let (gpt, mut adam, start_step) = build_model(gpu, &cfg, state_file)?;
    let gcfg = &gpt.config;
    let b = cfg.batch_size;
    let shard = world.shard(b)?;
    // The log (rank 0's): on resume, lines past the checkpoint are dropped (they will be redone).
    let mut log = open_rank_log(world, &run.path("log.jsonl"), resuming.then_some(start_step))?;
    let mut log_line = |v: &Value| log.as_mut().map_or(Ok(()), |f| log_line(f, v));
    let config_json = cfg.to_json();
    if world.is_root() {
        run.write_config(&config_json)?;
    }
    let side = cfg.model.latent_side()?;
    let v = gcfg.vocab_size;
    // How the first stage uses its codebook over the whole dataset (its codes as tokenized).
    let usage = CodebookUsage::of(codes.iter().map(|c| &c[0]), vq.codes());
    if start_step == 0 {
        log_line(&usage.to_json())?;
    }
    if !o.quiet {
        eprintln!("{}", usage.describe());
    }
    if !o.quiet {
        let ranks = if world.size() > 1 { format!(" over {} ranks", world.size()) } else { String::new() };
        eprintln!("train-transformer: {} training + {} validation images, {side}x{side} codes, {}, GPT {}x{} ({} heads), batch {b}{ranks}, lr {:.3e} {}, steps {start_step}..{}",
                  train_ex.len(), val_ex.len(),
                  match cfg.model.cond { Conditioning::Class { n_classes } => format!("{n_classes} classes"),
                      Conditioning::Spatial { .. } => "conditioned on images".into(),
                      Conditioning::Coord { .. } => "conditioned on coordinates".into(), _ => "unconditional".into() },
                  gcfg.n_layer, gcfg.n_embd, gcfg.n_head, cfg.learning_rate(), cfg.lr_schedule, cfg.steps);
    }
    let ctx = Context_ {
        cfg: &cfg,
        gpt: &gpt,
        vq: &vq,
        codes: &codes,
        examples: &examples,
        class_names: &class_names,
        run: &run,
        cond_vq: cond_vq.as_ref(),
        cond_codes: cond_codes.as_deref(),
        val: &val_ex,
    };
    let mut order = Order::new(cfg.seed, train_ex.len());
    let bar = progress_bar(cfg.steps, start_step, o.quiet);
    let started = Instant::now();
    let mut window = (Instant::now(), 0usize);
    let mut last_saved = start_step;
    let mut last_val = None;
    let null_token = cfg.model.null_token()?;
    for step in start_step..cfg.steps {
        let mut rng = Rng::keyed(cfg.seed, 7, step);
        let mut c = Vec::with_capacity(b);
        let mut z = Vec::with_capacity(b);
        let mut a = Vec::with_capacity(b);
        // Every rank draws the whole global batch (the same draws as one process), then keeps
        // its shard.
        for i in 0..b {
            let e = train_ex[order.at(step * b as u64 + i as u64)];
            let variant = rng.below(variants);
            // The image codes in the order the transformer reads them.
            let zi = cfg.model.permuter.apply(&codes[e][variant])?;
            c.push(match &cond_codes {
                Some(cc) => cc[e][variant].clone(),
                None => cfg.model.cond.tokens(examples[e].class)?,
            });
            a.push(corrupt(&zi, cfg.model.pkeep, v, &mut rng));
            z.push(zi);
        }
        drop_conditions(&mut c, cfg.model.cond_dropout, null_token, &mut rng);
        let (c, a, z) = (&c[shard.clone()], &a[shard.clone()], &z[shard.clone()]);
        adam.config.lr = cfg.lr_at(step);
        let tape = Tape::new();
        let p = gpt.params.vars(&tape);
        // Dropout masks: one process's, or each rank its own.
        let dropout_seed = cfg.seed ^ (world.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let loss = image_loss(&tape, &gpt, &p, (c, a, z), Some(&mut Rng::keyed(dropout_seed, 11, step)))?;
        let value = match finite("the loss", world.mean(loss.value.to_scalar()?), step) {
            Ok(x) => x,
            Err(e) => {
                bar.abandon();
                bail!(
                    "{e}: training stopped. The last good checkpoint (step {last_saved}) in {} is intact; \
                       resume from it with a lower learning rate",
                    run.dir.display()
                );
            }
        };
        let mut grads = p.gradients(&gpt.params.order, &tape.backward(&loss)?)?;
        world.average_gradients(&mut grads)?;
        let grad_norm = if cfg.grad_clip > 0.0 { Some(clip_grad_norm(&mut grads, cfg.grad_clip)?) } else { None };
        adam.update(&grads.iter().collect::<Vec<_>>())?;
        let done = step + 1;
        window.1 += b * z[0].len();
        bar.set_position(done);
        if done % cfg.log_every == 0 || done == cfg.steps {
            let tps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
            log_line(&json!({"step": done, "loss": value, "bits_per_token": value as f64 / std::f64::consts::LN_2,
                "lr": adam.config.lr, "tokens_per_s": tps, "grad_norm": grad_norm,
                "epoch": (done * b as u64) as f64 / train_ex.len() as f64}))?;
            bar.set_message(format!(
                "loss {value:.4} ({:.3} bits/token) | {tps:.0} tokens/s",
                value as f64 / std::f64::consts::LN_2
            ));
            window = (Instant::now(), 0);
        }
        if (done % cfg.save_every == 0 || done == cfg.steps) && world.is_root() {
            let v = ctx.validate(&val_ex)?;
            let bits = v.bits;
            let mut line = json!({"step": done, "val_bits_per_token": bits});
            if let (Some(u), Some((s, g))) = (v.null_bits, v.guided_bits) {
                line["val_bits_null_condition"] = json!(u);
                line["val_bits_guided"] = json!(g);
                line["cfg_scale"] = json!(s);
            }
            log_line(&line)?;
            last_val = Some(bits);
            ctx.sample_grid(done)?;
            ctx.save(&adam, &config_json, done)?;
            last_saved = done;
            bar.println(format!("step {done}: checkpoint saved, validation {bits:.3} bits/token"));
        }
    }
    bar.finish();
    let steps_done = cfg.steps.saturating_sub(start_step);
    let secs = started.elapsed().as_secs_f64();
    if !o.quiet {
        eprintln!("done: {steps_done} steps in {secs:.0} s; model in {}", run.model().display());
    }
    Ok(Summary { steps_done, val_bits_per_token: last_val, seconds_per_step: secs / steps_done.max(1) as f64 })
}

/// Codebook usage over a dataset's codes: distinct codes, and the perplexity exp(entropy) of
/// their frequencies (how many codes are in effective use).
pub struct CodebookUsage {
    pub used: usize,
    pub codes: usize,
    pub perplexity: f64,
    pub positions: usize,
}

impl CodebookUsage {
    pub fn of<'a>(rows: impl Iterator<Item = &'a Vec<u32>>, codes: usize) -> CodebookUsage {
        let mut counts = vec![0u64; codes];
        let mut positions = 0;
        for row in rows {
            for &c in row {
                if let Some(n) = counts.get_mut(c as usize) {
                    *n += 1;
                }
                positions += 1;
            }
        }
        let total = positions.max(1) as f64;
        let entropy: f64 = counts.iter().filter(|&&n| n > 0).map(|&n| n as f64 / total).map(|p| -p * p.ln()).sum();
        CodebookUsage { used: counts.iter().filter(|&&n| n > 0).count(), codes, perplexity: entropy.exp(), positions }
    }

    pub fn describe(&self) -> String {
        format!(
            "the first stage uses {} of its {} codes ({:.1}%, perplexity {:.1}) over the dataset's {} codes",
            self.used,
            self.codes,
            100.0 * self.used as f64 / self.codes.max(1) as f64,
            self.perplexity,
            self.positions
        )
    }

    fn to_json(&self) -> Value {
        json!({"step": 0, "codebook_used": self.used, "codebook_size": self.codes,
               "codebook_perplexity": self.perplexity, "dataset_codes": self.positions})
    }
}

/// Validation bits per code (see `Context_::validate`).
struct Validation {
    bits: f64,
    null_bits: Option<f64>,
    guided_bits: Option<(f32, f64)>,
}

/// What validation, sampling and checkpoints need.
struct Context_<'a> {
    cfg: &'a RunConfig,
    gpt: &'a Gpt,
    vq: &'a Vqgan,
    codes: &'a [Vec<Vec<u32>>],
    examples: &'a [Example],
    class_names: &'a [String],
    run: &'a RunDir,
    cond_vq: Option<&'a CondStage>,
    cond_codes: Option<&'a [Vec<Vec<u32>>]>,
    val: &'a [usize],
}

impl Context_<'_> {
    /// Mean cross-entropy of the held-out images (unflipped, no corruption), in bits per token.
    /// Validation bits per code: with the true condition; for models trained with condition
    /// dropout also with the null condition and under guidance at the default scale (the
    /// distribution softmax(u + S (c - u)) that `sample` draws from).
    fn validate(&self, val: &[usize]) -> Result<Validation> {
        let tape = Tape::inference();
        let p = self.gpt.params.constants(&tape);
        let (mut total, mut n) = (0.0, 0usize);
        let null = self.cfg.model.null_token()?;
        let (mut null_total, mut guided_total) = (0.0, 0.0);
        let scale = super::sample::DEFAULT_CFG_SCALE;
        for chunk in val.chunks(self.cfg.batch_size) {
            let z: Vec<Vec<u32>> =
                chunk.iter().map(|&e| self.cfg.model.permuter.apply(&self.codes[e][0])).collect::<Result<_>>()?;
            let c = chunk
                .iter()
                .map(|&e| match self.cond_codes {
                    Some(cc) => Ok(cc[e][0].clone()),
                    None => self.cfg.model.cond.tokens(self.examples[e].class),
                })
                .collect::<Result<Vec<_>>>()?;
            let z_len = z[0].len();
            let logits = image_logits(&tape, self.gpt, &p, &c, &z, z_len, None)?;
            let targets = z.concat();
            let loss = tape.cross_entropy(&logits, &targets)?.value.to_scalar()? as f64;
            total += loss * chunk.len() as f64;
            n += chunk.len();
            if let Some(t) = null {
                let u = vec![vec![t; c[0].len()]; c.len()];
                let lu = image_logits(&tape, self.gpt, &p, &u, &z, z_len, None)?;
                null_total += tape.cross_entropy(&lu, &targets)?.value.to_scalar()? as f64 * chunk.len() as f64;
                let guided = tape.add_scaled(&logits, &lu, scale, 1.0 - scale)?;
                guided_total += tape.cross_entropy(&guided, &targets)?.value.to_scalar()? as f64 * chunk.len() as f64;
            }
        }
        let bits = |x: f64| x / n.max(1) as f64 / std::f64::consts::LN_2;
        Ok(Validation {
            bits: bits(total),
            null_bits: null.map(|_| bits(null_total)),
            guided_bits: null.map(|_| (scale, bits(guided_total))),
        })
    }

    /// `samples_<step>.png`: a row of 6 samples per class (up to 16 classes),
    /// 16 unconditional samples, or for up to 4 validation images their
    /// condition (decoded) then 5 samples; fixed seed, temperature 1, top-k 100, and
    /// guidance at the default scale where the model learns with condition dropout.
    fn sample_grid(&self, step: u64) -> Result<()> {
        let side = self.cfg.model.latent_side()?;
        let opts = Pick { temperature: 1.0, top_k: 100, top_p: 1.0, codes: self.vq.codes() };
        let null = self.cfg.model.null_token()?;
        let null_row = |len: usize| null.map(|t| vec![t; len]);
        fn guide(row: &Option<Vec<u32>>) -> Option<super::sample::Guidance<'_>> {
            row.as_ref().map(|n| super::sample::Guidance { scale: super::sample::DEFAULT_CFG_SCALE, null: n })
        }
        let grid = self.cfg.model.cond_is_grid()?;
        if let (Some(CondStage::Vq { vq: cvq, kind }), Some(cc)) = (self.cond_vq, self.cond_codes) {
            let mut rng = Rng::new(self.cfg.seed ^ 0x5A);
            let mut tiles = Vec::new();
            let res = self.cfg.model.vqgan()?.resolution;
            for &e in self.val.iter().take(4) {
                // The condition as given (resized and cropped as the model read it).
                let path = self.examples[e].cond.as_deref().expect("paired");
                let pic = super::conditions::fit(super::maps::load(*kind, path)?, res, res)?;
                tiles.push(pic.to_rgb(cvq.colorize.as_deref()));
                let null = null_row(cc[e][0].len());
                let codes = generate(
                    self.gpt,
                    &vec![cc[e][0].clone(); 5],
                    grid,
                    side,
                    side,
                    side,
                    &[],
                    opts,
                    guide(&null),
                    &mut rng,
                    &mut no_progress,
                )?;
                let codes: Vec<Vec<u32>> =
                    codes.iter().map(|r| self.cfg.model.permuter.undo(r)).collect::<Result<_>>()?;
                tiles.extend(decode_grid(self.vq, &codes, side, side)?);
            }
            return images::save_png(&images::grid(&tiles, 6), &self.run.path(&format!("samples_{step:06}.png")));
        }
        let (cond, cols) = match self.cfg.model.cond {
            Conditioning::Spatial { .. } => unreachable!("handled above"),
            Conditioning::Coord { .. } => (vec![self.cond_codes.expect("coordinates")[0][0].clone(); 16], 4),
            Conditioning::Class { n_classes } => {
                let mut c = Vec::new();
                for k in 0..n_classes.min(16) {
                    c.extend(std::iter::repeat_n(vec![k as u32], 6));
                }
                (c, 6)
            }
            Conditioning::Unconditional { sos_token } => (vec![vec![sos_token]; 16], 4),
        };
        let mut rng = Rng::new(self.cfg.seed ^ 0x5A);
        let null = null_row(cond[0].len());
        let codes =
            generate(self.gpt, &cond, grid, side, side, side, &[], opts, guide(&null), &mut rng, &mut no_progress)?;
        let codes: Vec<Vec<u32>> = codes.iter().map(|r| self.cfg.model.permuter.undo(r)).collect::<Result<_>>()?;
        let tiles = decode_grid(self.vq, &codes, side, side)?;
        images::save_png(&images::grid(&tiles, cols), &self.run.path(&format!("samples_{step:06}.png")))
    }

    /// The model file (transformer + first stage, class names in the
    /// metadata), then the resume state; each written atomically.
    fn save(&self, adam: &Adam, config_json: &Value, step: u64) -> Result<()> {
        let mut model = self.gpt.params.to_host("transformer.")?;
        if let Some(bad) = first_non_finite(&model) {
            bail!(
                "step {step}: parameter '{bad}' holds NaN or inf; not saved. The previous checkpoint in {} is intact",
                self.run.dir.display()
            );
        }
        model.extend(self.vq.params.to_host("first_stage_model.")?);
        if let Some(CondStage::Vq { vq: cvq, .. }) = self.cond_vq {
            model.extend(cvq.to_host("cond_stage_model.")?);
        }
        let mut meta = HashMap::from([
            ("format".to_string(), "taming".to_string()),
            ("config".to_string(), self.cfg.model.to_config().to_string()),
        ]);
        if !self.class_names.is_empty() {
            meta.insert("class_names".into(), serde_json::to_string(self.class_names)?);
        }
        write_safetensors(&self.run.model(), &model, meta, false)?;
        let mut state = self.gpt.params.to_host("gpt.")?;
        let shapes: Vec<Vec<usize>> =
            self.gpt.params.order.iter().map(|n| self.gpt.params.tensors[n].shape().to_vec()).collect();
        state.extend(moment_tensors("adam", &self.gpt.params.order, &shapes, adam.state()?.1));
        let metadata = HashMap::from([
            ("format".to_string(), "taming-train-state".to_string()),
            ("step".to_string(), step.to_string()),
            ("adam_step".to_string(), adam.step.to_string()),
            ("config".to_string(), config_json.to_string()),
        ]);
        write_safetensors(&self.run.state(), &state, metadata, false)
    }
}

/// Write a model file again with f16 weights (integer buffers stay I64): half the size.
pub fn export_half(src: &Path, dst: &Path) -> Result<()> {
    let file = ModelFile::open(src)?;
    let mut tensors = Vec::new();
    let mut names = file.names();
    names.sort();
    for n in names {
        let t = match file.indices(&n) {
            Ok((ids, shape)) => {
                HostTensor { name: n, shape, data: HostData::I64(ids.iter().map(|&i| i as i64).collect()) }
            }
            Err(_) => {
                let (data, shape) = file.host(&n, None)?;
                HostTensor { name: n, shape, data: HostData::F32(data) }
            }
        };
        tensors.push(t);
    }
    let mut meta =
        HashMap::from([("format".to_string(), "taming".to_string()), ("config".to_string(), file.config.to_string())]);
    if let Some(c) = file.metadata("class_names") {
        meta.insert("class_names".into(), c);
    }
    write_safetensors(dst, &tensors, meta, true)
}

#[cfg(test)]
mod usage_tests {
    use super::CodebookUsage;

    #[test]
    fn codebook_usage_counts_codes_and_their_perplexity() {
        let rows = [vec![0u32, 1], vec![1, 1]];
        let u = CodebookUsage::of(rows.iter(), 4);
        assert_eq!((u.used, u.codes, u.positions), (2, 4, 4));
        let h: f64 = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!((u.perplexity - h.exp()).abs() < 1e-12);
        assert!(u.describe().contains("2 of its 4 codes (50.0%"), "{}", u.describe());
    }
}
