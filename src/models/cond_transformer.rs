//! The conditional transformer of the paper (taming `Net2NetTransformer`):
//! the GPT reads a conditioning sequence c followed by the image's codes z
//! and is trained to predict z. c is a start token (unconditional), a class
//! token (`Labelator`), or the codes of a second VQGAN (`cond_stage_model`)
//! for a spatial condition such as a segmentation or depth map; c and z share
//! the GPT's vocabulary, as in the reference. With `pkeep` < 1, training
//! replaces each input code by a random one with probability 1 - pkeep.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::gpt::{Gpt, GptConfig};
use super::permuter::Permuter;
use super::vqgan::VqganConfig;
use super::weights::ParamVars;
use crate::engine::{Rng, Tape, Var};

pub const TARGET: &str = "taming.models.cond_transformer.Net2NetTransformer";
pub const GPT_TARGET: &str = "taming.modules.transformer.mingpt.GPT";
pub const LABELATOR_TARGET: &str = "taming.modules.util.Labelator";
pub const COORD_TARGET: &str = "taming.modules.misc.coord.CoordStage";
pub use super::vqgan::TARGET as VQMODEL_TARGET;

#[derive(Clone, Debug, PartialEq)]
pub enum Conditioning {
    /// `cond_stage_config: __is_unconditional__`: one start token.
    Unconditional { sos_token: u32 },
    /// `Labelator`: the class index is the one conditioning token.
    Class { n_classes: usize },
    /// A second autoencoder (`cond_stage_config`, its weights under
    /// `cond_stage_model.`): c is its code grid of the condition (a photo,
    /// a depth map, or a one-hot label map for a VQSegmentationModel).
    Spatial { config: Value },
    /// `CoordStage`: c is the image's pixel coordinates, (y W + x) / (H W),
    /// averaged over down_factor x down_factor blocks and rounded to
    /// multiples of 1/n_embed (FacesHQ's transformer).
    Coord { n_embed: usize, down_factor: usize },
}

impl Conditioning {
    /// The conditioning tokens for one sample (its class, if any).
    pub fn tokens(&self, class: Option<u32>) -> Result<Vec<u32>> {
        match (self, class) {
            (Conditioning::Unconditional { sos_token }, _) => Ok(vec![*sos_token]),
            (Conditioning::Class { n_classes }, Some(k)) if (k as usize) < *n_classes => Ok(vec![k]),
            (Conditioning::Class { n_classes }, Some(k)) => {
                bail!("class {k} is outside the model's {n_classes} classes")
            }
            (Conditioning::Class { .. }, None) => bail!("this model is class-conditional: a class is needed"),
            (Conditioning::Spatial { .. } | Conditioning::Coord { .. }, _) => {
                bail!("this model is conditioned spatially: a code grid is the conditioning")
            }
        }
    }

    /// The condition VQGAN's config (spatial conditioning only).
    pub fn cond_vqgan(&self) -> Option<Result<VqganConfig>> {
        match self {
            Conditioning::Spatial { config } => Some(VqganConfig::from_config(config)),
            _ => None,
        }
    }
}

/// A Net2NetTransformer's config (the model file's `config`).
#[derive(Clone, Debug)]
pub struct Net2NetConfig {
    pub gpt: GptConfig,
    /// `first_stage_config` as given (target and params of the VQModel).
    pub first_stage: Value,
    pub cond: Conditioning,
    pub pkeep: f32,
    /// The order of the image codes the transformer reads and writes.
    pub permuter: Permuter,
    /// `downsample_cond_size`: the condition resized (nearest) to this square size before the
    /// cond stage encodes it.
    pub downsample_cond: Option<usize>,
    /// `cond_dropout_prob` (ours; `class_dropout_prob`, LlamaGen's name, is read as the same):
    /// in training, each
    /// sequence's conditioning is replaced by null tokens with this probability, so the model
    /// also learns p(z) and sampling can use classifier-free guidance. The null token is one
    /// id past the codes and classes (the vocabulary grows by one).
    pub cond_dropout: f32,
}

impl Net2NetConfig {
    pub fn from_config(model: &Value) -> Result<Net2NetConfig> {
        let c = Self::parse(model)?;
        c.check()?;
        Ok(c)
    }

    /// The config as given, before `check` (which needs the GPT's sizes to fit the stages).
    pub fn parse(model: &Value) -> Result<Net2NetConfig> {
        let target = model.get("target").and_then(|t| t.as_str()).unwrap_or("");
        if target != TARGET {
            bail!("target '{target}' is not a Net2NetTransformer");
        }
        let p = model.get("params").ok_or_else(|| anyhow!("config: no params"))?;
        use super::config_keys::{check, Key::*};
        check(
            "params",
            p,
            &[
                Used("transformer_config"),
                Used("first_stage_config"),
                Used("cond_stage_config"),
                Used("pkeep"),
                Used("sos_token"),
                Inert("ckpt_path"),
                Inert("ignore_keys"),
                Inert("first_stage_key"),
                Inert("cond_stage_key"),
                Inert("unconditional"),
                Used("permuter_config"),
                Used("downsample_cond_size"),
                Used("cond_dropout_prob"),
                Used("class_dropout_prob"),
            ],
        )?;
        let gpt = GptConfig::from_params(
            p.pointer("/transformer_config/params").ok_or_else(|| anyhow!("config: no transformer_config.params"))?,
        )?;
        let first_stage =
            p.get("first_stage_config").cloned().ok_or_else(|| anyhow!("config: no first_stage_config"))?;
        let cond = match p.get("cond_stage_config") {
            Some(Value::String(s)) if s == "__is_unconditional__" => Conditioning::Unconditional {
                sos_token: p.get("sos_token").and_then(|v| v.as_u64()).unwrap_or(0) as u32,
            },
            Some(c) if c.get("target").and_then(|t| t.as_str()) == Some(LABELATOR_TARGET) => {
                let n = c
                    .pointer("/params/n_classes")
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| anyhow!("config: Labelator without n_classes"))?;
                Conditioning::Class { n_classes: n as usize }
            }
            Some(c) if super::vqgan::is_target(c.get("target").and_then(|t| t.as_str()).unwrap_or("")) => {
                Conditioning::Spatial { config: c.clone() }
            }
            Some(c) if c.get("target").and_then(|t| t.as_str()) == Some(COORD_TARGET) => {
                let q = c.get("params").cloned().unwrap_or_default();
                check("cond_stage_config.params", &q, &[Used("n_embed"), Used("down_factor")])?;
                let get = |k: &str| {
                    q.get(k)
                        .and_then(|v| v.as_u64())
                        .map(|v| v as usize)
                        .ok_or_else(|| anyhow!("config: CoordStage without an integer {k}"))
                };
                Conditioning::Coord { n_embed: get("n_embed")?, down_factor: get("down_factor")? }
            }
            Some(c) => bail!(
                "cond_stage_config '{}' is not supported (__is_unconditional__, {LABELATOR_TARGET}, \
                              {COORD_TARGET} or an autoencoder such as {VQMODEL_TARGET} are)",
                c.get("target").and_then(|t| t.as_str()).unwrap_or("?")
            ),
            None => bail!("config: no cond_stage_config"),
        };
        let side = {
            let v = VqganConfig::from_params(
                first_stage.get("params").ok_or_else(|| anyhow!("config: no first_stage_config.params"))?,
            )?;
            v.resolution / v.factor()
        };
        let c = Net2NetConfig {
            gpt,
            first_stage,
            cond,
            pkeep: p.get("pkeep").and_then(|v| v.as_f64()).unwrap_or(1.0) as f32,
            permuter: Permuter::from_config(p.get("permuter_config"), side, side)?,
            downsample_cond: match p.get("downsample_cond_size").and_then(|v| v.as_i64()) {
                None | Some(-1) => None,
                Some(s) if s > 0 => Some(s as usize),
                Some(s) => bail!("config: downsample_cond_size {s} (-1 for none, or a size in pixels)"),
            },
            cond_dropout: match (p.get("cond_dropout_prob"), p.get("class_dropout_prob")) {
                (Some(_), Some(_)) => {
                    bail!("config: cond_dropout_prob and class_dropout_prob are the same setting: give one")
                }
                (None | Some(Value::Null), None | Some(Value::Null)) => 0.0,
                (Some(v), _) | (_, Some(v)) => match v.as_f64() {
                    Some(x) if (0.0..1.0).contains(&x) => x as f32,
                    _ => bail!("config: cond_dropout_prob {v} must be a number in [0, 1)"),
                },
            },
        };
        if c.cond_dropout > 0.0 && matches!(c.cond, Conditioning::Unconditional { .. } | Conditioning::Coord { .. }) {
            bail!("config: cond_dropout_prob needs a class or image condition to drop (this model has none)");
        }
        Ok(c)
    }

    /// The GPT's smallest block_size (the conditioning + all image codes but the last) and
    /// vocab_size (the codes and classes the sequences hold) for these stages.
    pub fn gpt_needs(&self) -> Result<(usize, usize)> {
        let v = self.vqgan()?;
        let side = v.resolution / v.factor();
        let vocab = match &self.cond {
            Conditioning::Class { n_classes } => v.n_embed.max(*n_classes),
            Conditioning::Spatial { .. } => v.n_embed.max(self.cond.cond_vqgan().expect("spatial")?.n_embed),
            // Coordinates round to 0..=n_embed; the largest a block's mean reaches is below n_embed.
            Conditioning::Coord { n_embed, .. } => v.n_embed.max(*n_embed),
            _ => v.n_embed,
        };
        let null = (self.cond_dropout > 0.0) as usize;
        Ok((self.cond_len()? + side * side - 1, vocab + null))
    }

    /// The null condition token (models trained with `cond_dropout_prob`): the last id the
    /// stages need.
    pub fn null_token(&self) -> Result<Option<u32>> {
        if self.cond_dropout <= 0.0 {
            return Ok(None);
        }
        Ok(Some(self.gpt_needs()?.1 as u32 - 1))
    }

    pub fn vqgan(&self) -> Result<VqganConfig> {
        VqganConfig::from_params(
            self.first_stage.get("params").ok_or_else(|| anyhow!("config: no first_stage_config.params"))?,
        )
    }

    /// Codes per image side at the first stage's resolution.
    pub fn latent_side(&self) -> Result<usize> {
        let v = self.vqgan()?;
        Ok(v.resolution / v.factor())
    }

    /// The cond stage's downsampling factor (spatial conditioning).
    pub fn cond_factor(&self) -> Result<Option<usize>> {
        Ok(match &self.cond {
            Conditioning::Spatial { .. } => Some(self.cond.cond_vqgan().expect("spatial")?.factor()),
            Conditioning::Coord { down_factor, .. } => Some(*down_factor),
            _ => None,
        })
    }

    /// Whether the condition codes form a grid aligned with the image's codes (spatial
    /// conditioning at the image's own size), so a sliding window can take its part of them.
    pub fn cond_is_grid(&self) -> Result<bool> {
        Ok(self.cond_factor()? == Some(self.vqgan()?.factor()) && self.downsample_cond.is_none())
    }

    /// Conditioning tokens per sequence at the training size.
    pub fn cond_len(&self) -> Result<usize> {
        let v = self.vqgan()?;
        match self.cond_factor()? {
            Some(f) => Ok((self.downsample_cond.unwrap_or(v.resolution) / f).pow(2)),
            None => Ok(1),
        }
    }

    fn check(&self) -> Result<()> {
        let v = self.vqgan()?;
        if v.in_channels != 3 || v.out_ch != 3 || v.n_labels.is_some() {
            bail!("config: a first stage of {} input channels: only RGB first stages are supported", v.in_channels);
        }
        if let Some(c) = self.cond.cond_vqgan() {
            let c = c?;
            if c.n_labels.is_none() && c.in_channels != 3 && c.in_channels != 1 {
                bail!(
                    "config: cond_stage_config is a VQModel of {} input channels: condition photos (3), maps (1) \
                     and label maps (VQSegmentationModel) are supported",
                    c.in_channels
                );
            }
        }
        if let Some(f) = self.cond_factor()? {
            if !self.downsample_cond.unwrap_or(v.resolution).is_multiple_of(f) {
                bail!("config: the condition's size is not a multiple of its stage's downsampling factor {f}");
            }
        }
        let side = v.resolution / v.factor();
        let c_len = self.cond_len()?;
        let (block, need) = self.gpt_needs()?;
        if block > self.gpt.block_size {
            bail!(
                "config: {c_len} conditioning + {side}x{side} image tokens need a block_size of at least {block}, not {}",
                self.gpt.block_size
            );
        }
        if self.gpt.vocab_size < need {
            bail!(
                "config: vocab_size {} is smaller than the {need} codes and classes it must hold",
                self.gpt.vocab_size
            );
        }
        Ok(())
    }

    pub fn to_config(&self) -> Value {
        let g = &self.gpt;
        let mut params = json!({
            "transformer_config": {"target": GPT_TARGET, "params": {"vocab_size": g.vocab_size, "block_size": g.block_size,
                "n_layer": g.n_layer, "n_head": g.n_head, "n_embd": g.n_embd,
                "embd_pdrop": g.pdrop[0], "resid_pdrop": g.pdrop[1], "attn_pdrop": g.pdrop[2]}},
            "first_stage_config": self.first_stage,
            "first_stage_key": "image",
            "pkeep": self.pkeep,
        });
        match self.cond {
            Conditioning::Unconditional { sos_token } => {
                params["cond_stage_config"] = json!("__is_unconditional__");
                params["sos_token"] = json!(sos_token);
            }
            Conditioning::Class { n_classes } => {
                params["cond_stage_config"] = json!({"target": LABELATOR_TARGET, "params": {"n_classes": n_classes}});
                params["cond_stage_key"] = json!("class_label");
            }
            Conditioning::Spatial { ref config } => {
                params["cond_stage_config"] = config.clone();
                params["cond_stage_key"] = json!("condition");
            }
            Conditioning::Coord { n_embed, down_factor } => {
                params["cond_stage_config"] =
                    json!({"target": COORD_TARGET, "params": {"n_embed": n_embed, "down_factor": down_factor}});
                params["cond_stage_key"] = json!("coord");
            }
        }
        if let Some(s) = self.downsample_cond {
            params["downsample_cond_size"] = json!(s);
        }
        if self.cond_dropout > 0.0 {
            params["cond_dropout_prob"] = json!(self.cond_dropout);
        }
        if let Some(pc) = self.permuter.to_config() {
            params["permuter_config"] = pc;
        }
        json!({"target": TARGET, "params": params})
    }
}

/// Training input: each code kept with probability `pkeep`, else replaced by
/// a random token of the vocabulary (the reference's `pkeep` corruption).
pub fn corrupt(z: &[u32], pkeep: f32, vocab: usize, rng: &mut Rng) -> Vec<u32> {
    if pkeep >= 1.0 {
        return z.to_vec();
    }
    z.iter().map(|&t| if rng.next_f64() < pkeep as f64 { t } else { rng.below(vocab) as u32 }).collect()
}

/// Condition dropout: each row of `c` becomes null tokens with probability `p` (nothing drawn
/// when p is 0, so runs without it keep their random streams).
pub fn drop_conditions(c: &mut [Vec<u32>], p: f32, null: Option<u32>, rng: &mut Rng) {
    let Some(null) = null else { return };
    if p <= 0.0 {
        return;
    }
    for row in c.iter_mut() {
        if rng.next_f64() < p as f64 {
            row.iter_mut().for_each(|t| *t = null);
        }
    }
}

/// Conditioning, input and target codes of a batch: (c, a, z), one row per sequence.
pub type Sequences<'a> = (&'a [Vec<u32>], &'a [Vec<u32>], &'a [Vec<u32>]);

/// Cross-entropy of the image codes: logits of [c, a][:-1] at the image
/// positions against z (mean over all image tokens of the batch). With a
/// generator the GPT runs in training mode (its dropout), else in eval mode.
pub fn image_loss(t: &Tape, gpt: &Gpt, p: &ParamVars, (c, a, z): Sequences, dropout: Option<&mut Rng>) -> Result<Var> {
    let flat = image_logits(t, gpt, p, c, a, z[0].len(), dropout)?;
    t.cross_entropy(&flat, &z.concat())
}

/// The logits [B * z_len, vocab] that predict the image codes: those of [c, a][:-1] at the
/// image positions.
pub fn image_logits(
    t: &Tape,
    gpt: &Gpt,
    p: &ParamVars,
    c: &[Vec<u32>],
    a: &[Vec<u32>],
    z_len: usize,
    dropout: Option<&mut Rng>,
) -> Result<Var> {
    let b = a.len();
    let c_len = c[0].len();
    let input: Vec<Vec<u32>> = (0..b).map(|i| [c[i].as_slice(), &a[i][..z_len - 1]].concat()).collect();
    let logits = match dropout {
        Some(rng) => gpt.forward_training(t, p, &input, rng)?,
        None => gpt.forward(t, p, &input)?,
    };
    let v = gpt.config.vocab_size;
    let logits = t.slice(&logits, 1, c_len - 1, z_len)?;
    t.reshape(&logits, &[b * z_len, v])
}
