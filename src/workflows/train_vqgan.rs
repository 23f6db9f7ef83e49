//! `taming train-vqgan`: stage 1 of the paper on your images. Each step is
//! the reference's pair of optimizer steps: the autoencoder on
//! L1 + LPIPS + λ·GAN + codebook (optimizer 0), then the PatchGAN on the
//! hinge (or vanilla) loss against a fresh reconstruction (optimizer 1).
//!
//! A run folder holds `config.json` (everything the run needs), `model.safetensors`
//! (the last checkpoint in the SPEC model-file format: `reconstruct`, `verify`
//! and `--init` read it), `train_state.safetensors` (parameters, Adam moments,
//! step: what `--resume` reads), `log.jsonl` and `recon_<step>.png` grids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::data::{self, Augment, Loader};
use super::images;
use super::maps::{self, Kind, Picture};
pub use super::run::read_config_file;
use super::run::{
    finite, first_non_finite, log_line, metadata_u64, moment_tensors, open_rank_log, progress_bar, NonFinite, RunDir,
};
use crate::engine::distributed::World;
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{Gpu, Rng, Tape, Tensor};
use crate::models::discriminator::Discriminator;
use crate::models::lpips::Lpips;
use crate::models::vqgan::{Vqgan, VqganConfig};
use crate::models::vqloss::{bce_with_quant, discriminator_loss, generator_loss, LossConfig, BCE_TARGET};
use crate::models::weights::{write_model_file, write_safetensors, HostTensor, ModelFile};

pub use crate::models::vqgan::TARGET as VQMODEL_TARGET;

/// What the command line gives; `None` leaves the config file's value (or the default).
#[derive(Default, Clone)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub config: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub init: Option<PathBuf>,
    pub lpips: Option<PathBuf>,
    pub steps: Option<u64>,
    pub batch: Option<usize>,
    pub size: Option<u32>,
    pub base_lr: Option<f64>,
    pub save_every: Option<u64>,
    pub seed: Option<u64>,
    pub quiet: bool,
}

/// The `train:` block of a VQGAN run's config (ours; the `model:` block is
/// the reference's). Every key is optional; a key not listed here is an error.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainBlock {
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub size: Option<u32>,
    pub resize: Option<u32>,
    pub base_learning_rate: Option<f64>,
    pub save_every: Option<u64>,
    pub log_every: Option<u64>,
    pub val_images: Option<usize>,
    pub flip: Option<bool>,
    pub seed: Option<u64>,
    pub workers: Option<usize>,
    pub lpips_dropout: Option<bool>,
    pub dead_code_steps: Option<u64>,
    pub entropy_loss_weight: Option<f64>,
    pub entropy_temperature: Option<f64>,
}

/// The config file's `train:` block as `T` (empty when absent), or an error
/// naming the file and the key that is unknown or of the wrong type.
pub(crate) fn train_block<T: serde::de::DeserializeOwned + Default>(file: &Value, path: &Path) -> Result<T> {
    match file.get("train") {
        None | Some(Value::Null) => Ok(T::default()),
        Some(t) => serde_json::from_value(t.clone()).map_err(|e| anyhow!("{}: train: {e}", path.display())),
    }
}

/// Everything a run needs; saved as `RUN/config.json`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The reference YAML's `model:` block (target, params, base_learning_rate).
    pub model: Value,
    pub steps: u64,
    pub batch_size: usize,
    /// Crop size (the training resolution).
    pub size: u32,
    /// Short side after resizing, before the crop.
    pub resize: u32,
    pub base_learning_rate: f64,
    pub save_every: u64,
    pub log_every: u64,
    pub val_images: usize,
    pub flip: bool,
    pub seed: u64,
    pub workers: usize,
    /// Dropout (p 0.5) in front of LPIPS's lin layers, as the reference in train mode.
    pub lpips_dropout: bool,
    /// Dead-code restarts: a code no batch used for this many steps gets a recent encoder
    /// output as its codebook row (0: off, the reference's behaviour).
    pub dead_code_steps: u64,
    /// The codebook entropy loss's weight (0: off, the reference's objective) and temperature.
    pub entropy_loss_weight: f64,
    pub entropy_temperature: f64,
}

impl RunConfig {
    /// From a config file (`model:` block, optional `train:` block, the
    /// reference's `data.params.batch_size`) and the command line.
    pub fn from_file(v: &Value, path: &Path, o: &TrainOptions) -> Result<RunConfig> {
        let mut model = v.get("model").cloned().ok_or_else(|| anyhow!("{}: no 'model:' block", path.display()))?;
        if model.get("target").is_none() {
            model["target"] = json!(VQMODEL_TARGET);
        }
        if model.get("params").is_none() {
            bail!("{}: no 'model.params'", path.display());
        }
        let vq = VqganConfig::from_config(&model).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        objective(&model, &vq).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let t: TrainBlock = train_block(v, path)?;
        // Defaults, in one place: the command line, then the `train:` block,
        // then the reference config's own values, then ours.
        let batch_default = v.pointer("/data/params/batch_size").and_then(|x| x.as_u64()).unwrap_or(8) as usize;
        let size = o.size.or(t.size).unwrap_or(vq.resolution as u32);
        let c = RunConfig {
            steps: o.steps.or(t.steps).unwrap_or(10000),
            batch_size: o.batch.or(t.batch_size).unwrap_or(batch_default),
            size,
            resize: t.resize.unwrap_or(size),
            base_learning_rate: o
                .base_lr
                .or(t.base_learning_rate)
                .unwrap_or(model.get("base_learning_rate").and_then(|x| x.as_f64()).unwrap_or(4.5e-6)),
            save_every: o.save_every.or(t.save_every).unwrap_or(500),
            log_every: t.log_every.unwrap_or(10),
            val_images: t.val_images.unwrap_or(16),
            flip: t.flip.unwrap_or(true),
            seed: o.seed.or(t.seed).unwrap_or(0),
            workers: t.workers.unwrap_or(2),
            lpips_dropout: t.lpips_dropout.unwrap_or(false),
            dead_code_steps: t.dead_code_steps.unwrap_or(0),
            entropy_loss_weight: t.entropy_loss_weight.unwrap_or(0.0),
            entropy_temperature: t.entropy_temperature.unwrap_or(0.01),
            model,
        };
        c.check(&vq)?;
        Ok(c)
    }

    fn check(&self, vq: &VqganConfig) -> Result<()> {
        let f = vq.factor() as u32;
        if self.size == 0 || !self.size.is_multiple_of(f) {
            bail!("train size {} is not a multiple of the downsampling factor {f}", self.size);
        }
        if self.resize < self.size {
            bail!("train resize {} is smaller than the crop size {}", self.resize, self.size);
        }
        if self.batch_size == 0 || self.steps == 0 || self.save_every == 0 || self.log_every == 0 {
            bail!("batch_size, steps, save_every and log_every must be positive");
        }
        if self.entropy_loss_weight < 0.0 || self.entropy_temperature <= 0.0 {
            bail!("train.entropy_loss_weight must be >= 0 and train.entropy_temperature > 0");
        }
        if self.val_images == 0 {
            bail!("val_images must be at least 1 (validation PSNR and the reconstruction grid use them)");
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "model": self.model,
            "train": {
                "steps": self.steps, "batch_size": self.batch_size, "size": self.size, "resize": self.resize,
                "base_learning_rate": self.base_learning_rate, "save_every": self.save_every, "log_every": self.log_every,
                "val_images": self.val_images, "flip": self.flip, "seed": self.seed, "workers": self.workers,
                "lpips_dropout": self.lpips_dropout, "dead_code_steps": self.dead_code_steps,
                "entropy_loss_weight": self.entropy_loss_weight, "entropy_temperature": self.entropy_temperature,
            }
        })
    }

    pub fn vqgan(&self) -> Result<VqganConfig> {
        VqganConfig::from_config(&self.model)
    }

    pub fn loss(&self) -> Result<LossConfig> {
        LossConfig::from_params(self.model.pointer("/params/lossconfig/params").unwrap_or(&json!({})))
    }

    /// lr = base_lr × batch, as the reference's main.py (one GPU, no accumulation).
    pub fn learning_rate(&self) -> f32 {
        (self.base_learning_rate * self.batch_size as f64) as f32
    }
}

/// What an autoencoder is trained with (the config's `lossconfig`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// `VQLPIPSWithDiscriminator`: L1 + LPIPS + codebook + the adversarial terms.
    Gan,
    /// `BCELossWithQuant` (VQSegmentationModel): BCE of the label logits + codebook, one optimizer.
    Bce,
}

const GAN_TARGETS: [&str; 2] =
    ["taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "taming.modules.losses.VQLPIPSWithDiscriminator"];

/// The objective the config's model trains with; what the engine does not train is an error.
pub fn objective(model: &Value, vq: &VqganConfig) -> Result<Objective> {
    if matches!(vq.quantizer, crate::models::vqgan::Quantizer::Gumbel { .. }) {
        bail!(
            "training a GumbelVQ (the Gumbel-softmax relaxation, its temperature schedule and KL term) is not \
             implemented; encode, decode, reconstruct and verify run it"
        );
    }
    if vq.remap {
        bail!("training a model that remaps its codes (remap) is not implemented");
    }
    let target = model.pointer("/params/lossconfig/target").and_then(|t| t.as_str());
    match (vq.n_labels, target) {
        (Some(_), Some(BCE_TARGET)) => Ok(Objective::Bce),
        (Some(_), other) => bail!("a VQSegmentationModel trains with {BCE_TARGET}, not {}", other.unwrap_or("none")),
        (None, Some(BCE_TARGET)) => bail!("{BCE_TARGET} trains segmentation models (VQSegmentationModel) only"),
        (None, None) => Ok(Objective::Gan),
        (None, Some(t)) if GAN_TARGETS.contains(&t) => Ok(Objective::Gan),
        (None, Some(t)) => bail!("lossconfig target '{t}' is not implemented for training ({})", GAN_TARGETS[0]),
    }
}

/// The models, the Adam optimizers and the loss of one run.
pub struct Trainer {
    pub gpu: Arc<Gpu>,
    pub vq: Vqgan,
    /// The discriminator and its optimizer (none for segmentation models).
    pub disc: Option<Discriminator>,
    pub lpips: Option<Lpips>,
    pub loss: LossConfig,
    pub adam_ae: Adam,
    pub adam_d: Option<Adam>,
    pub lpips_dropout: bool,
    pub seed: u64,
    /// Dead-code restarts, when the run asks for them.
    pub dead_codes: Option<DeadCodes>,
    /// The codebook entropy loss (weight, temperature), when the run asks for it.
    pub entropy: Option<(f32, f32)>,
    /// The ranks of a data-parallel run: gradients are averaged across them before each update
    /// (one process: nothing to do).
    pub world: Rc<World>,
}

/// Dead-code restarts: the step each code was last chosen; a code unused for `after` steps
/// gets a lookup vector of the current batch (drawn at random) as its codebook row, so it
/// lies where the encoder's outputs are and competes again.
pub struct DeadCodes {
    after: u64,
    last_used: Vec<u64>,
    rng: Rng,
}

impl DeadCodes {
    pub fn new(codes: usize, after: u64, start_step: u64, seed: u64) -> DeadCodes {
        DeadCodes { after, last_used: vec![start_step; codes], rng: Rng::keyed(seed, 0xDEAD, start_step) }
    }

    /// Marks the codes of this step's batch used and restarts the codes unused for `after`
    /// steps, writing their new rows into `codebook` [n, k] from `rows()` (the batch's lookup
    /// vectors, [N, k] on the host; read only when a code is due). Returns how many were
    /// restarted.
    pub fn update(
        &mut self,
        codebook: &Tensor,
        indices: &[u32],
        rows: impl FnOnce() -> Result<Vec<f32>>,
        step: u64,
    ) -> Result<usize> {
        for &i in indices {
            self.last_used[i as usize] = step;
        }
        let dead: Vec<usize> = (0..self.last_used.len()).filter(|&c| step >= self.last_used[c] + self.after).collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let k = codebook.dim(1);
        let rows = rows()?;
        if rows.len() != indices.len() * k || indices.is_empty() {
            bail!("dead-code restarts: {} lookup values for {} codes of {k} dims", rows.len(), indices.len());
        }
        for &c in &dead {
            let r = self.rng.below(indices.len());
            codebook.gpu.write_bytes(
                codebook.buffer(),
                (c * k * 4) as u64,
                bytemuck::cast_slice(&rows[r * k..(r + 1) * k]),
            );
            self.last_used[c] = step;
        }
        Ok(dead.len())
    }
}

/// The lookup vectors of a forward as host rows [N, k]: the quantizer's (with codebook
/// options), else quant_conv's output [B, D, h, w] laid out as rows.
fn lookup_rows(out: &crate::models::vqgan::VqganOutputs) -> Result<Vec<f32>> {
    if let Some((z, _)) = &out.lookup {
        return z.value.to_vec();
    }
    let t = Tape::inference();
    crate::models::vqgan::rows_of(&t, &t.constant(out.quant_conv_out.value.clone()))?.value.to_vec()
}

/// Runs the dead-code restarts of one step (if the run has them); the count restarted. Over
/// several ranks, the codes and lookup vectors of the whole global batch (gathered in rank order,
/// so in the batch's order): every rank restarts the same codes with the same rows.
fn restart_dead_codes(
    dead: &mut Option<DeadCodes>,
    vq: &Vqgan,
    out: &crate::models::vqgan::VqganOutputs,
    codes: &[u32],
    step: u64,
    world: &World,
) -> Result<usize> {
    let Some(dead) = dead else { return Ok(0) };
    let indices = world.all_gather(codes);
    let rows = || Ok(world.all_gather(&lookup_rows(out)?));
    dead.update(vq.params.get("quantize.embedding.weight")?, &indices, rows, step)
}

/// Scalars of one step, for the log and the progress bar.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    pub ae_loss: f32,
    pub rec_loss: f32,
    pub p_loss: f32,
    pub nll_loss: f32,
    pub codebook_loss: f32,
    pub g_loss: f32,
    pub d_weight: f32,
    pub disc_factor: f32,
    pub d_loss: f32,
    pub logits_real: f32,
    pub logits_fake: f32,
    pub indices: Vec<u32>,
    /// Codes restarted after this step.
    pub restarted: usize,
    /// The codebook entropy loss (unweighted), when the run has it.
    pub entropy_loss: f32,
}

/// `loss` + weight × the codebook entropy loss of this forward (when the run has one), and
/// that loss (read later: `scalar_of`).
fn with_entropy(
    tape: &Tape,
    ap: &crate::models::weights::ParamVars,
    out: &crate::models::vqgan::VqganOutputs,
    entropy: Option<(f32, f32)>,
    loss: &crate::engine::Var,
) -> Result<(crate::engine::Var, Option<crate::engine::Var>)> {
    use crate::models::vqgan::{codebook_entropy_loss, rows_of};
    let Some((weight, temperature)) = entropy else { return Ok((loss.clone(), None)) };
    let e = match &out.lookup {
        Some((zl, codebook)) => codebook_entropy_loss(tape, zl, codebook, temperature)?,
        None => codebook_entropy_loss(
            tape,
            &rows_of(tape, &out.quant_conv_out)?,
            ap.get("quantize.embedding.weight")?,
            temperature,
        )?,
    };
    Ok((tape.add_scaled(loss, &e, 1.0, weight)?, Some(e)))
}

/// A scalar's value, 0 where there is none.
fn scalar_of(v: Option<&crate::engine::Var>) -> Result<f32> {
    v.map_or(Ok(0.0), |v| v.value.to_scalar())
}

fn mean(t: &Tensor) -> Result<f32> {
    let v = t.to_vec()?;
    Ok(v.iter().map(|&x| x as f64).sum::<f64>() as f32 / v.len().max(1) as f32)
}

impl Trainer {
    /// New optimizers over the models: Adam β = (0.5, 0.9), lr = base_lr × batch, no weight decay.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Arc<Gpu>,
        vq: Vqgan,
        mut disc: Option<Discriminator>,
        lpips: Option<Lpips>,
        loss: LossConfig,
        lr: f32,
        lpips_dropout: bool,
        seed: u64,
    ) -> Result<Trainer> {
        let ae_params: Vec<(Tensor, f32)> =
            vq.params.order.iter().map(|n| (vq.params.tensors[n].clone(), 0.0)).collect();
        let adam_ae = Adam::new(AdamConfig::adam(lr, 0.5, 0.9), &ae_params)?;
        let adam_d = match &mut disc {
            Some(disc) => {
                let d_params: Vec<(Tensor, f32)> =
                    disc.params.order.iter().map(|n| (disc.params.tensors[n].clone(), 0.0)).collect();
                disc.track_running_stats = true;
                Some(Adam::new(AdamConfig::adam(lr, 0.5, 0.9), &d_params)?)
            }
            None => None,
        };
        Ok(Trainer {
            gpu: gpu.clone(),
            vq,
            disc,
            lpips,
            loss,
            adam_ae,
            adam_d,
            lpips_dropout,
            seed,
            dead_codes: None,
            entropy: None,
            world: Rc::new(World::single()),
        })
    }

    /// One step of a segmentation model: BCE + codebook loss, one optimizer.
    fn bce_step(&mut self, x: &Tensor, step: u64) -> Result<StepStats> {
        let tape = Tape::new();
        let ap = self.vq.params.vars(&tape);
        let xv = tape.constant(x.clone());
        let out = self.vq.forward(&tape, &ap, &xv)?;
        let (loss, bce) = bce_with_quant(&tape, &xv, &out.decoder_out, &out.codebook_loss, self.loss.codebook_weight)?;
        let (loss, entropy_loss) = with_entropy(&tape, &ap, &out, self.entropy, &loss)?;
        let mut grads = ap.gradients(&self.vq.params.order, &tape.backward(&loss)?)?;
        self.world.average_gradients(&mut grads)?;
        self.adam_ae.update(&grads.iter().collect::<Vec<_>>())?;
        // The losses are read once the step is recorded (a read waits for the device; between
        // the forward and the backward it would leave the device idle while the backward is
        // recorded). A non-finite loss stops the run before any checkpoint of these weights.
        let bce = bce.value.to_scalar()?;
        let s = StepStats {
            entropy_loss: scalar_of(entropy_loss.as_ref())?,
            ae_loss: finite("the autoencoder loss", self.world.mean(loss.value.to_scalar()?), step)?,
            rec_loss: bce,
            nll_loss: bce,
            codebook_loss: out.codebook_loss.value.to_scalar()?,
            ..Default::default()
        };
        let indices = out.indices.read()?;
        let restarted = restart_dead_codes(&mut self.dead_codes, &self.vq, &out, &indices, step, &self.world)?;
        Ok(StepStats { indices, restarted, ..s })
    }

    /// One training step on inputs x [B, C, S, S] at global step `step`.
    pub fn step(&mut self, x: &Tensor, step: u64) -> Result<StepStats> {
        let (Some(disc), Some(adam_d)) = (&self.disc, &mut self.adam_d) else { return self.bce_step(x, step) };
        let mut s = StepStats { disc_factor: self.loss.disc_factor_at(step as usize), ..Default::default() };
        // Optimizer 0: the autoencoder. The discriminator is a constant here.
        if let Some(l) = &self.lpips {
            l.dropout.set(self.lpips_dropout.then(|| (0.5, Rng::keyed(self.seed, 0xD209, step).next_u64())));
        }
        {
            let tape = Tape::new();
            let ap = self.vq.params.vars(&tape);
            let xv = tape.constant(x.clone());
            let out = self.vq.forward(&tape, &ap, &xv)?;
            let dp = disc.params.constants(&tape);
            let last = ap.get("decoder.conv_out.weight")?;
            let g = generator_loss(
                &tape,
                &self.loss,
                &xv,
                &out.decoder_out,
                &out.codebook_loss,
                self.lpips.as_ref(),
                disc,
                &dp,
                last,
                step as usize,
            )?;
            let (loss, entropy_loss) = with_entropy(&tape, &ap, &out, self.entropy, &g.loss)?;
            let mut grads = ap.gradients(&self.vq.params.order, &tape.backward(&loss)?)?;
            self.world.average_gradients(&mut grads)?;
            self.adam_ae.update(&grads.iter().collect::<Vec<_>>())?;
            // Read once the step is recorded (see `bce_step`).
            s.entropy_loss = scalar_of(entropy_loss.as_ref())?;
            s.ae_loss = finite("the autoencoder loss", self.world.mean(loss.value.to_scalar()?), step)?;
            s.nll_loss = g.nll_loss.value.to_scalar()?;
            s.codebook_loss = out.codebook_loss.value.to_scalar()?;
            s.p_loss = match &g.lpips {
                Some(p) => mean(&p.value)?,
                None => 0.0,
            };
            s.rec_loss = s.nll_loss - self.loss.perceptual_weight * s.p_loss * g.lpips.is_some() as u32 as f32;
            if let (Some(gl), Some(lf)) = (&g.g_loss, &g.logits_fake) {
                s.g_loss = gl.value.to_scalar()?;
                s.logits_fake = mean(&lf.value)?;
            }
            s.d_weight = finite("the adaptive weight λ", g.d_weight, step)?;
            s.indices = out.indices.read()?;
            s.restarted = restart_dead_codes(&mut self.dead_codes, &self.vq, &out, &s.indices, step, &self.world)?;
        }
        // Optimizer 1: the discriminator, on a reconstruction by the updated
        // autoencoder (the reference runs the model again for this step).
        if s.disc_factor > 0.0 {
            let xrec = {
                let t = Tape::inference();
                let p = self.vq.params.constants(&t);
                self.vq.forward(&t, &p, &t.constant(x.clone()))?.decoder_out.value
            };
            let tape = Tape::new();
            let dp = disc.params.vars(&tape);
            let d = discriminator_loss(
                &tape,
                &self.loss,
                disc,
                &dp,
                &tape.constant(x.clone()),
                &tape.constant(xrec),
                step as usize,
            )?;
            s.d_loss = finite("the discriminator loss", self.world.mean(d.loss.value.to_scalar()?), step)?;
            s.logits_real = mean(&d.logits_real.value)?;
            let mut grads = dp.gradients(&disc.params.order, &tape.backward(&d.loss)?)?;
            self.world.average_gradients(&mut grads)?;
            adam_d.update(&grads.iter().collect::<Vec<_>>())?;
        } else {
            // Before disc_start the reference steps Adam with zero gradients:
            // the moments stay 0 and the weights do not move, but the step count
            // (and so the bias correction later) advances.
            adam_d.step += 1;
        }
        Ok(s)
    }

    /// The model's output for inputs x [B, C, S, S] (no tape), and the codes.
    pub fn reconstruct(&self, x: &Tensor) -> Result<(Tensor, Vec<u32>)> {
        let t = Tape::inference();
        let p = self.vq.params.constants(&t);
        let out = self.vq.forward(&t, &p, &t.constant(x.clone()))?;
        Ok((out.decoder_out.value, out.indices.read()?))
    }

    /// The model file's tensors: autoencoder (with its buffers), `loss.discriminator.*` (with
    /// BatchNorm buffers) and `loss.perceptual_loss.*`, as the reference's state_dict.
    pub fn model_tensors(&self) -> Result<Vec<HostTensor>> {
        let mut out = self.vq.to_host("")?;
        if let Some(d) = &self.disc {
            out.extend(d.to_host("loss.discriminator.")?);
        }
        if let Some(l) = &self.lpips {
            out.extend(l.params.to_host("loss.perceptual_loss.")?);
        }
        Ok(out)
    }

    /// The optimizers with the parameters they update, by file prefix.
    fn optimizers(&self) -> Vec<(&'static str, &Adam, &crate::models::weights::Params)> {
        let mut out = vec![("adam_ae", &self.adam_ae, &self.vq.params)];
        if let (Some(d), Some(a)) = (&self.disc, &self.adam_d) {
            out.push(("adam_d", a, &d.params));
        }
        out
    }

    /// Parameters and Adam moments, for `--resume`.
    fn state_tensors(&self) -> Result<Vec<HostTensor>> {
        let mut out = self.vq.to_host("ae.")?;
        if let Some(d) = &self.disc {
            out.extend(d.to_host("disc.")?);
        }
        for (prefix, adam, params) in self.optimizers() {
            let shapes: Vec<Vec<usize>> = params.order.iter().map(|n| params.tensors[n].shape().to_vec()).collect();
            out.extend(moment_tensors(prefix, &params.order, &shapes, adam.state()?.1));
        }
        Ok(out)
    }

    fn load_moments(&mut self, file: &ModelFile, adam_ae_step: u32, adam_d_step: u32) -> Result<()> {
        let read = |prefix: &str, names: &[String]| {
            names
                .iter()
                .map(|n| {
                    Ok((file.host(&format!("{prefix}.m.{n}"), None)?.0, file.host(&format!("{prefix}.v.{n}"), None)?.0))
                })
                .collect::<Result<Vec<_>>>()
        };
        let moments = read("adam_ae", &self.vq.params.order)?;
        self.adam_ae.load_state(adam_ae_step, &moments)?;
        if let (Some(d), Some(a)) = (&self.disc, &mut self.adam_d) {
            a.load_state(adam_d_step, &read("adam_d", &d.params.order)?)?;
        }
        Ok(())
    }
}

/// LPIPS weights from a model file: under `loss.perceptual_loss.` (a VQModel
/// checkpoint) or under LPIPS's own names (a converted VGG16 + lin pair).
pub fn load_lpips(gpu: &Arc<Gpu>, path: &Path) -> Result<Option<Lpips>> {
    let file = ModelFile::open_tensors(path)?;
    for prefix in ["loss.perceptual_loss.", ""] {
        if Lpips::present(&file, prefix) {
            return Ok(Some(Lpips::load(&file, gpu, prefix)?));
        }
    }
    Ok(None)
}

/// What a finished run reports.
#[derive(Debug)]
pub struct Summary {
    pub steps_done: u64,
    pub val_psnr: Option<f64>,
    /// Segmentation models: the share of validation pixels given their label, in %.
    pub val_label_accuracy: Option<f64>,
    pub seconds_per_step: f64,
}

pub fn train(gpu: &Arc<Gpu>, o: &TrainOptions) -> Result<Summary> {
    let world = Rc::new(World::init()?);
    let result = train_ranks(gpu, o, &world);
    world.finish(result)
}

/// `train` as one of `world`'s ranks: each loads the global batch, trains on its shard, and the
/// gradients are averaged (the discriminator's BatchNorm uses each rank's own batch statistics,
/// as the reference under DDP without SyncBatchNorm; rank 0's running statistics are saved, as
/// DDP broadcasts rank 0's buffers). Rank 0 writes the run's files.
fn train_ranks(gpu: &Arc<Gpu>, o: &TrainOptions, world: &Rc<World>) -> Result<Summary> {
    let o = &TrainOptions { quiet: o.quiet || !world.is_root(), ..o.clone() };
    if !world.is_root() {
        world.barrier();
    }
    let (run, resuming) = RunDir::open(&o.out, o.resume)?;

    let (cfg, state_file) = run_config(&run, resuming, o)?;
    let vq_cfg = cfg.vqgan()?;
    if vq_cfg.dropout != 0.0 {
        bail!("config: params.ddconfig.dropout = {}: dropout in training is not implemented by this engine (set it to 0.0)",
              vq_cfg.dropout);
    }
    let kind = Kind::of(&vq_cfg)?;
    if vq_cfg.in_channels != vq_cfg.out_ch {
        bail!(
            "config: in_channels {} and out_ch {} differ: train-vqgan reconstructs its input",
            vq_cfg.in_channels,
            vq_cfg.out_ch
        );
    }
    let gan = objective(&cfg.model, &vq_cfg)? == Objective::Gan;
    if gan && cfg.loss()?.disc_in_channels != vq_cfg.in_channels {
        bail!(
            "config: lossconfig.params.disc_in_channels is {} but the model reads {} channels",
            cfg.loss()?.disc_in_channels,
            vq_cfg.in_channels
        );
    }

    // Data: the model's kind of input (photos, one-channel maps, label maps).
    let paths = data::list_images(&o.data)?;
    data::check_headers(&paths)?;
    let (train_paths, val_paths) = data::split_validation(paths, cfg.val_images)?;
    let nearest = matches!(kind, Kind::Labels(_));
    let aug = Augment { resize: cfg.resize, crop: cfg.size, random_crop: true, flip: cfg.flip, nearest };
    let val = data::load_validation(&val_paths, kind, &aug)?;

    let (mut trainer, start_step) = build_trainer(gpu, o, &run, &cfg, state_file)?;
    if world.is_root() {
        world.barrier();
    }
    trainer.world = world.clone();
    let b = cfg.batch_size;
    let shard = world.shard(b)?;

    // The log (rank 0's): on resume, lines past the checkpoint are dropped (they will be redone).
    let mut log = open_rank_log(world, &run.path("log.jsonl"), resuming.then_some(start_step))?;
    let mut log_line = |v: &Value| log.as_mut().map_or(Ok(()), |f| log_line(f, v));
    let config_json = cfg.to_json();
    if world.is_root() {
        run.write_config(&config_json)?;
    }

    let s = cfg.size as usize;
    let say = |m: &str| {
        if !o.quiet {
            eprintln!("{m}")
        }
    };
    let ranks = if world.size() > 1 { format!(" over {} ranks", world.size()) } else { String::new() };
    say(&format!(
        "train-vqgan: {} training + {} validation {} at {s}x{s}, batch {b}{ranks}, lr {:.3e}, steps {start_step}..{}{}",
        train_paths.len(),
        val_paths.len(),
        kind.describe(),
        cfg.learning_rate(),
        cfg.steps,
        if resuming { format!(" (resumed from {})", run.state().display()) } else { String::new() }
    ));
    if let Some(line) = codebook_line(&vq_cfg, &cfg) {
        say(&line);
    }
    let mut last_score = None;
    if start_step == 0 && world.is_root() {
        let score = validate(&trainer, kind, &val, b, &run, 0)?;
        log_line(&score.log(0))?;
        last_score = Some(score);
    }
    let loader = Loader::start(Arc::new(train_paths.clone()), kind, b, aug, cfg.seed, start_step, cfg.workers);
    let bar = progress_bar(cfg.steps, start_step, o.quiet);
    let mut window = LogWindow::new();
    let started = Instant::now();
    let mut last_saved = start_step;
    for step in start_step..cfg.steps {
        // Every rank loads the global batch (the same draws as one process) and keeps its shard.
        let batch = loader.next()?;
        let x = maps::batch_tensor(gpu, kind, &batch.pictures[shard.clone()].iter().collect::<Vec<_>>())?;
        let stats = match trainer.step(&x, step) {
            Ok(st) => st,
            Err(e) if e.downcast_ref::<NonFinite>().is_some() => {
                bar.abandon();
                bail!(
                    "{e}: training stopped. The last good checkpoint (step {last_saved}) in {} is intact; \
                       resume from it with a lower learning rate, or check the data",
                    run.dir.display()
                );
            }
            Err(e) => return Err(e),
        };
        window.add(&stats.indices, b);
        window.restarted += stats.restarted;
        let done = step + 1;
        bar.set_position(done);
        bar.set_message(format!(
            "loss {:.4} rec {:.4} cb {:.4} d {:.3}",
            stats.ae_loss, stats.rec_loss, stats.codebook_loss, stats.d_loss
        ));
        if done % cfg.log_every == 0 || done == cfg.steps {
            let line = json!({
                "step": done, "epoch": (done * b as u64) as f64 / train_paths.len() as f64, "lr": cfg.learning_rate(),
                "ae_loss": stats.ae_loss, "rec_loss": stats.rec_loss, "p_loss": stats.p_loss, "nll_loss": stats.nll_loss,
                "codebook_loss": stats.codebook_loss, "g_loss": stats.g_loss, "d_weight": stats.d_weight, "disc_factor": stats.disc_factor,
                "d_loss": stats.d_loss, "logits_real": stats.logits_real, "logits_fake": stats.logits_fake,
                "codes_used": window.codes.len(), "perplexity": window.perplexity(), "images_per_s": window.images_per_s(),
                "codes_restarted": window.restarted, "entropy_loss": stats.entropy_loss,
            });
            log_line(&line)?;
            bar.set_message(format!(
                "loss {:.4} rec {:.4} cb {:.4} d {:.3} | {} codes | {:.1} img/s",
                stats.ae_loss,
                stats.rec_loss,
                stats.codebook_loss,
                stats.d_loss,
                window.codes.len(),
                window.images_per_s()
            ));
            window = LogWindow::new();
        }
        if (done % cfg.save_every == 0 || done == cfg.steps) && world.is_root() {
            let score = validate(&trainer, kind, &val, b, &run, done)?;
            log_line(&score.log(done))?;
            save_checkpoint(&trainer, &run, &cfg, &config_json, done)?;
            last_saved = done;
            bar.println(format!("step {done}: checkpoint saved, validation {}", score.describe()));
            last_score = Some(score);
        }
    }
    bar.finish();
    let steps_done = cfg.steps.saturating_sub(start_step);
    let secs = started.elapsed().as_secs_f64();
    say(&format!(
        "done: {} steps in {:.0} s ({:.2} s/step); model in {}",
        steps_done,
        secs,
        secs / steps_done.max(1) as f64,
        run.model().display()
    ));
    let (val_psnr, val_label_accuracy) = match last_score {
        Some(Score::Psnr(p)) => (Some(p), None),
        Some(Score::LabelAccuracy(a)) => (None, Some(a)),
        None => (None, None),
    };
    Ok(Summary { steps_done, val_psnr, val_label_accuracy, seconds_per_step: secs / steps_done.max(1) as f64 })
}

/// Model file first, then the resume state: each is atomic, and a run killed
/// between the two resumes from the older state, which is still consistent.
/// The run's config: the saved one when resuming (the command line may
/// lengthen the run or change how often it saves, nothing else), else the
/// config file; with the resume state when resuming.
fn run_config(run: &RunDir, resuming: bool, o: &TrainOptions) -> Result<(RunConfig, Option<ModelFile>)> {
    if resuming {
        let state = ModelFile::open_tensors(&run.state())?;
        let saved: Value = serde_json::from_str(
            &state.metadata("config").ok_or_else(|| anyhow!("{}: no config", run.state().display()))?,
        )?;
        let mut cfg = RunConfig::from_file(&saved, &run.state(), &TrainOptions::default())?;
        if let Some(path) = &o.config {
            let given = RunConfig::from_file(&read_config_file(path)?, path, o)?;
            if given.model != cfg.model {
                bail!(
                    "{}: its model differs from the run's in {} (resume with the run's own config)",
                    path.display(),
                    run.dir.display()
                );
            }
        }
        for (flag, differs) in [
            ("--batch", o.batch.is_some_and(|b| b != cfg.batch_size)),
            ("--size", o.size.is_some_and(|s| s != cfg.size)),
            ("--lr", o.base_lr.is_some_and(|l| l != cfg.base_learning_rate)),
            ("--seed", o.seed.is_some_and(|s| s != cfg.seed)),
        ] {
            if differs {
                bail!("{flag} differs from the run being resumed in {}", run.dir.display());
            }
        }
        cfg.steps = o.steps.unwrap_or(cfg.steps);
        cfg.save_every = o.save_every.unwrap_or(cfg.save_every);
        Ok((cfg, Some(state)))
    } else {
        let path = o.config.as_ref().ok_or_else(|| anyhow!("--config is required for a new run"))?;
        Ok((RunConfig::from_file(&read_config_file(path)?, path, o)?, None))
    }
}

/// The models (resumed from the run's state, initialised from `--init`, or
/// new), LPIPS, the two optimizers (with their moments when resuming), and
/// the step to start from.
fn build_trainer(
    gpu: &Arc<Gpu>,
    o: &TrainOptions,
    run: &RunDir,
    cfg: &RunConfig,
    state_file: Option<ModelFile>,
) -> Result<(Trainer, u64)> {
    let vq_cfg = cfg.vqgan()?;
    let mut loss_cfg = cfg.loss()?;
    let resuming = state_file.is_some();
    let gan = objective(&cfg.model, &vq_cfg)? == Objective::Gan;
    // Models: resumed, initialised from a model file, or new.
    let mut rng = Rng::new(cfg.seed);
    let (vq, disc, start_step, adam_steps) = if let Some(state) = &state_file {
        let vq = Vqgan::load(state, gpu, vq_cfg.clone(), "ae.")?;
        let disc = match gan {
            true => Some(Discriminator::load(
                state,
                gpu,
                "disc.",
                loss_cfg.disc_in_channels,
                loss_cfg.disc_ndf,
                loss_cfg.disc_num_layers,
            )?),
            false => None,
        };
        let meta = |k: &str| metadata_u64(state, k);
        (vq, disc, meta("step")?, Some((meta("adam_ae_step")? as u32, meta("adam_d_step")? as u32)))
    } else if let Some(init) = &o.init {
        let file = ModelFile::open(init)?;
        let vq = Vqgan::load(&file, gpu, vq_cfg.clone(), "")?;
        let disc = if !gan {
            None
        } else if file.has("loss.discriminator.main.0.weight") {
            Some(Discriminator::load(
                &file,
                gpu,
                "loss.discriminator.",
                loss_cfg.disc_in_channels,
                loss_cfg.disc_ndf,
                loss_cfg.disc_num_layers,
            )?)
        } else {
            Some(Discriminator::init(
                gpu,
                loss_cfg.disc_in_channels,
                loss_cfg.disc_ndf,
                loss_cfg.disc_num_layers,
                &mut rng,
            )?)
        };
        (vq, disc, 0, None)
    } else {
        let vq = Vqgan::random(gpu, vq_cfg.clone(), cfg.seed)?;
        let disc = match gan {
            true => Some(Discriminator::init(
                gpu,
                loss_cfg.disc_in_channels,
                loss_cfg.disc_ndf,
                loss_cfg.disc_num_layers,
                &mut rng,
            )?),
            false => None,
        };
        (vq, disc, 0, None)
    };
    // LPIPS is frozen: from --lpips, the --init file, or (resuming) the run's last model file.
    let lpips_source = o.lpips.clone().or(if resuming { Some(run.model()) } else { o.init.clone() });
    let lpips = match &lpips_source {
        Some(p) if p.exists() || o.lpips.is_some() => load_lpips(gpu, p)?,
        _ => None,
    };
    if lpips.is_none() && loss_cfg.perceptual_weight > 0.0 && gan {
        eprintln!(
            "note: no LPIPS weights (give --lpips FILE, or --init a VQModel file that has loss.perceptual_loss.*); \
                   training with perceptual_weight 0 (L1 reconstruction only)"
        );
        loss_cfg.perceptual_weight = 0.0;
    }
    if let (Some(path), None) = (&o.lpips, &lpips) {
        bail!("{}: no LPIPS weights in it (expected loss.perceptual_loss.* or net.slice1.0.weight, lin0.model.1.weight, ...)",
              path.display());
    }
    let mut trainer = Trainer::new(gpu, vq, disc, lpips, loss_cfg, cfg.learning_rate(), cfg.lpips_dropout, cfg.seed)?;
    if let (Some(state), Some((a, d))) = (&state_file, adam_steps) {
        trainer.load_moments(state, a, d)?;
    }
    if cfg.dead_code_steps > 0 {
        if vq_cfg.quantizer != crate::models::vqgan::Quantizer::Nearest {
            bail!("config: train.dead_code_steps restarts VectorQuantizer2 codes; this model's quantizer is not one");
        }
        trainer.dead_codes = Some(DeadCodes::new(vq_cfg.n_embed, cfg.dead_code_steps, start_step, cfg.seed));
    }
    if cfg.entropy_loss_weight > 0.0 {
        if vq_cfg.quantizer != crate::models::vqgan::Quantizer::Nearest {
            bail!("config: train.entropy_loss_weight applies to VectorQuantizer2 codebooks; this model's is not one");
        }
        trainer.entropy = Some((cfg.entropy_loss_weight as f32, cfg.entropy_temperature as f32));
    }
    Ok((trainer, start_step))
}

/// The run's codebook options in words (None: the reference's codebook and objective).
fn codebook_line(vq: &VqganConfig, cfg: &RunConfig) -> Option<String> {
    let mut parts = Vec::new();
    if vq.codebook.l2_norm {
        parts.push("l2-normalised (cosine) lookup".to_string());
    }
    if let Some(k) = vq.codebook.lookup_dim {
        parts.push(format!("looked up in {k} dimensions (quantize.proj_in/proj_out)"));
    }
    if cfg.dead_code_steps > 0 {
        parts.push(format!("codes unused for {} steps restart from encoder outputs", cfg.dead_code_steps));
    }
    if cfg.entropy_loss_weight > 0.0 {
        parts.push(format!("entropy loss x{} (temperature {})", cfg.entropy_loss_weight, cfg.entropy_temperature));
    }
    (!parts.is_empty()).then(|| format!("codebook: {} codes of {}; {}", vq.n_embed, vq.lookup_dim(), parts.join(", ")))
}

/// Codebook usage and throughput over the steps since the last log line.
struct LogWindow {
    codes: HashMap<u32, u64>,
    images: usize,
    start: Instant,
    restarted: usize,
}

impl LogWindow {
    fn new() -> Self {
        LogWindow { codes: HashMap::new(), images: 0, start: Instant::now(), restarted: 0 }
    }

    fn add(&mut self, indices: &[u32], images: usize) {
        for &i in indices {
            *self.codes.entry(i).or_default() += 1;
        }
        self.images += images;
    }

    /// exp(entropy) of the codes' frequencies: how many codes are in effective use.
    fn perplexity(&self) -> f64 {
        let total = self.codes.values().sum::<u64>().max(1) as f64;
        let entropy: f64 = self.codes.values().map(|&c| c as f64 / total).map(|p| -p * p.ln()).sum();
        entropy.exp()
    }

    fn images_per_s(&self) -> f64 {
        self.images as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }
}

fn save_checkpoint(trainer: &Trainer, run: &RunDir, cfg: &RunConfig, config_json: &Value, step: u64) -> Result<()> {
    let model = trainer.model_tensors()?;
    if let Some(bad) = first_non_finite(&model) {
        bail!(
            "step {step}: parameter '{bad}' holds NaN or inf; not saved. The previous checkpoint in {} is intact",
            run.dir.display()
        );
    }
    write_model_file(&run.model(), &cfg.model, &model, false)?;
    let metadata = HashMap::from([
        ("format".to_string(), "taming-train-state".to_string()),
        ("step".to_string(), step.to_string()),
        ("adam_ae_step".to_string(), trainer.adam_ae.step.to_string()),
        ("adam_d_step".to_string(), trainer.adam_d.as_ref().map_or(0, |a| a.step).to_string()),
        ("config".to_string(), config_json.to_string()),
    ]);
    write_safetensors(&run.state(), &trainer.state_tensors()?, metadata, false)
}

/// How well the validation inputs come back.
#[derive(Clone, Copy, Debug)]
pub enum Score {
    /// Mean PSNR in dB (photos 8-bit, maps over [-1, 1]).
    Psnr(f64),
    /// Share of label-map pixels given their label, in %.
    LabelAccuracy(f64),
}

impl Score {
    fn log(&self, step: u64) -> Value {
        match self {
            Score::Psnr(p) => json!({"step": step, "val_psnr": p}),
            Score::LabelAccuracy(a) => json!({"step": step, "val_label_accuracy": a}),
        }
    }

    fn describe(&self) -> String {
        match self {
            Score::Psnr(p) => format!("PSNR {p:.2} dB"),
            Score::LabelAccuracy(a) => format!("label accuracy {a:.2}%"),
        }
    }
}

/// The validation score, and `recon_<step>.png`: inputs above their reconstructions, up to 8
/// per row pair (label maps in the model's colours).
fn validate(trainer: &Trainer, kind: Kind, val: &[Picture], batch: usize, run: &RunDir, step: u64) -> Result<Score> {
    let n = val.len();
    let colors = trainer.vq.colorize.as_deref();
    let (mut total, mut tiles_in, mut tiles_out) = (0.0, Vec::new(), Vec::new());
    for group in val.chunks(batch.max(1)) {
        let x = maps::batch_tensor(&trainer.gpu, kind, &group.iter().collect::<Vec<_>>())?;
        let (rec, _) = trainer.reconstruct(&x)?;
        for (a, r) in group.iter().zip(maps::from_output(kind, &rec)?) {
            total += maps::agreement(a, &r).0.min(99.0);
            if tiles_in.len() < 16 {
                tiles_in.push(a.to_rgb(colors));
                tiles_out.push(r.to_rgb(colors));
            }
        }
    }
    let mut tiles = Vec::new();
    for (a, r) in tiles_in.chunks(8).zip(tiles_out.chunks(8)) {
        tiles.extend(a.iter().cloned());
        tiles.extend(r.iter().cloned());
    }
    images::save_png(&images::grid(&tiles, 8.min(n)), &run.path(&format!("recon_{step:06}.png")))?;
    let mean = total / n as f64;
    Ok(if matches!(kind, Kind::Labels(_)) { Score::LabelAccuracy(mean) } else { Score::Psnr(mean) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_blocks_report_unknown_keys_and_wrong_types() {
        let path = Path::new("run.yaml");
        let t: TrainBlock = train_block(&json!({"train": {"steps": 5, "flip": false}}), path).unwrap();
        assert_eq!((t.steps, t.flip, t.batch_size), (Some(5), Some(false), None));
        let none: TrainBlock = train_block(&json!({"model": {}}), path).unwrap();
        assert!(none.steps.is_none());
        let e = train_block::<TrainBlock>(&json!({"train": {"stpes": 5}}), path).unwrap_err().to_string();
        assert!(e.contains("run.yaml") && e.contains("stpes"), "{e}");
        let e = train_block::<TrainBlock>(&json!({"train": {"steps": "many"}}), path).unwrap_err().to_string();
        assert!(e.contains("run.yaml") && e.contains("invalid type"), "{e}");
        // The transformer's block: its own keys, and the VQGAN's size is not one of them.
        let e = train_block::<super::super::train_transformer::TrainBlock>(&json!({"train": {"size": 32}}), path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("size"), "{e}");
    }
}
