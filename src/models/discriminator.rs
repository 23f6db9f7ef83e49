//! The PatchGAN discriminator (taming `NLayerDiscriminator`): 4x4 convs,
//! BatchNorm with batch statistics, LeakyReLU 0.2; `main.{i}` names.

use std::sync::Arc;

use anyhow::Result;

use super::weights::{ModelFile, ParamVars, Params};
use crate::engine::kernels::conv2d::ConvSpec;
use crate::engine::kernels::elementwise::Unary;
use crate::engine::kernels::norm::NormKind;
use crate::engine::{Gpu, Tape, Var};

pub struct Discriminator {
    pub params: Params,
    pub n_layers: usize,
}

/// (module index, in, out, stride, has bias, followed by BatchNorm at index+1)
fn layers(in_ch: usize, ndf: usize, n_layers: usize) -> Vec<(usize, usize, usize, usize, bool, bool)> {
    let mut out = vec![(0, in_ch, ndf, 2, true, false)];
    let mut mult = 1;
    let mut idx = 2;
    for n in 1..n_layers {
        let prev = mult;
        mult = (1 << n).min(8);
        out.push((idx, ndf * prev, ndf * mult, 2, false, true));
        idx += 3;
    }
    let prev = mult;
    mult = (1 << n_layers).min(8);
    out.push((idx, ndf * prev, ndf * mult, 1, false, true));
    idx += 3;
    out.push((idx, ndf * mult, 1, 1, true, false));
    out
}

impl Discriminator {
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, prefix: &str, in_ch: usize, ndf: usize, n_layers: usize) -> Result<Discriminator> {
        let mut params = Params::default();
        for (i, cin, cout, _, bias, bn) in layers(in_ch, ndf, n_layers) {
            params.load_prefixed(file, gpu, prefix, &format!("main.{i}.weight"), &[cout, cin, 4, 4])?;
            if bias {
                params.load_prefixed(file, gpu, prefix, &format!("main.{i}.bias"), &[cout])?;
            }
            if bn {
                params.load_prefixed(file, gpu, prefix, &format!("main.{}.weight", i + 1), &[cout])?;
                params.load_prefixed(file, gpu, prefix, &format!("main.{}.bias", i + 1), &[cout])?;
            }
        }
        Ok(Discriminator { params, n_layers })
    }

    /// Patch logits [B, 1, h, w] (train mode: BatchNorm uses this batch's statistics).
    pub fn forward(&self, t: &Tape, p: &ParamVars, x: &Var) -> Result<Var> {
        let in_ch = x.shape()[1];
        let ndf = self.params.get("main.0.weight")?.dim(0);
        let all = layers(in_ch, ndf, self.n_layers);
        let last = all.len() - 1;
        let mut h = x.clone();
        for (k, (i, _, _, stride, bias, bn)) in all.into_iter().enumerate() {
            let b = if bias { Some(p.get(&format!("main.{i}.bias"))?) } else { None };
            h = t.conv2d(&h, p.get(&format!("main.{i}.weight"))?, b, ConvSpec::same(stride, 1))?;
            if bn {
                h = t.norm(&h, NormKind::Batch, p.get(&format!("main.{}.weight", i + 1))?, p.get(&format!("main.{}.bias", i + 1))?, 1e-5)?;
            }
            if k != last {
                h = t.unary(&h, Unary::LeakyRelu(0.2))?;
            }
        }
        Ok(h)
    }
}
