//! A small image classifier (ours, not the paper's): the objective sample-quality figure for
//! class-conditional models without downloaded networks (no Inception here). Trained by this
//! engine on the dataset's own labels, it tells what share of the samples drawn for a class
//! look like that class. Three stride-2 3x3 convolutions with GroupNorm and swish, a global
//! mean, and a linear layer; 32x32 RGB inputs in [-1, 1].

use std::sync::Arc;

use anyhow::{bail, Result};

use super::weights::{ModelFile, ParamVars, Params};
use crate::engine::kernels::conv2d::ConvSpec;
use crate::engine::kernels::norm::NormKind;
use crate::engine::{Gpu, Rng, Tape, Var};

/// The metadata `format` of a classifier file.
pub const FORMAT: &str = "taming-classifier";
/// Input side in pixels.
pub const SIZE: usize = 32;
const WIDTHS: [usize; 3] = [32, 64, 128];

pub struct Classifier {
    pub params: Params,
    pub classes: usize,
}

/// Every parameter and its shape.
pub fn parameter_shapes(classes: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut cin = 3;
    for (i, &c) in WIDTHS.iter().enumerate() {
        out.push((format!("conv{i}.weight"), vec![c, cin, 3, 3]));
        out.push((format!("conv{i}.bias"), vec![c]));
        out.push((format!("norm{i}.weight"), vec![c]));
        out.push((format!("norm{i}.bias"), vec![c]));
        cin = c;
    }
    out.push(("fc.weight".into(), vec![classes, cin]));
    out.push(("fc.bias".into(), vec![classes]));
    out
}

impl Classifier {
    /// New weights as torch initialises them (U(±1/sqrt(fan_in)); norms 1 and 0).
    pub fn random(gpu: &Arc<Gpu>, classes: usize, seed: u64) -> Result<Classifier> {
        if classes < 2 {
            bail!("a classifier needs at least 2 classes, not {classes}");
        }
        let mut rng = Rng::new(seed);
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(classes) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.starts_with("norm") {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else {
                let layer = name.rsplit_once('.').map_or("", |(m, _)| m);
                let fan_in: usize = parameter_shapes(classes)
                    .iter()
                    .find(|(nm, _)| nm == &format!("{layer}.weight"))
                    .map_or(1, |(_, s)| s[1..].iter().product());
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect()
            };
            params.insert(gpu, &name, &data, &shape)?;
        }
        Ok(Classifier { params, classes })
    }

    /// From a classifier file (checks every tensor's shape).
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>) -> Result<Classifier> {
        let classes = file.host("fc.bias", None)?.1[0];
        let mut params = Params::default();
        for (name, shape) in parameter_shapes(classes) {
            params.load(file, gpu, &name, &shape)?;
        }
        Ok(Classifier { params, classes })
    }

    /// Logits [B, classes] of images x [B, 3, 32, 32].
    pub fn forward(&self, t: &Tape, p: &ParamVars, x: &Var) -> Result<Var> {
        let s = x.shape();
        if s.len() != 4 || s[1] != 3 || s[2] != SIZE || s[3] != SIZE {
            bail!("classifier input {s:?}: expected [B, 3, {SIZE}, {SIZE}]");
        }
        let mut h = x.clone();
        for i in 0..WIDTHS.len() {
            h = t.conv2d(
                &h,
                p.get(&format!("conv{i}.weight"))?,
                Some(p.get(&format!("conv{i}.bias"))?),
                ConvSpec::same(2, 1),
            )?;
            let (g, b) = (p.get(&format!("norm{i}.weight"))?, p.get(&format!("norm{i}.bias"))?);
            h = t.norm_swish(&h, NormKind::Group { groups: 32 }, g, b, 1e-6)?;
        }
        let s = h.shape().to_vec();
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let pooled = t.scale(&t.sum_dim(&t.reshape(&h, &[b, c, hw])?, 2)?, 1.0 / hw as f32)?;
        t.matmul(&pooled, p.get("fc.weight")?, false, true, Some(p.get("fc.bias")?))
    }
}
