//! The PatchGAN discriminator (taming `NLayerDiscriminator`): 4x4 convs,
//! BatchNorm with batch statistics, LeakyReLU 0.2; `main.{i}` names.

use std::cell::RefCell;
use std::sync::Arc;

use anyhow::Result;

use super::weights::{HostData, HostTensor, ModelFile, ParamVars, Params};
use crate::engine::kernels::conv2d::ConvSpec;
use crate::engine::kernels::elementwise::Unary;
use crate::engine::kernels::norm::NormKind;
use crate::engine::{Gpu, Rng, Tape, Var};

pub struct Discriminator {
    pub params: Params,
    pub n_layers: usize,
    /// BatchNorm running statistics (momentum 0.1, unbiased variance, as
    /// torch), updated by every forward while training. Training always
    /// normalises with batch statistics; these are kept for the checkpoint.
    pub running: RefCell<RunningStats>,
    /// Whether `forward` updates `running` (on in training, off in verify).
    pub track_running_stats: bool,
}

#[derive(Clone, Debug, Default)]
pub struct RunningStats {
    /// (BatchNorm module index, running_mean, running_var)
    pub layers: Vec<(usize, Vec<f32>, Vec<f32>)>,
    pub num_batches_tracked: i64,
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
    pub fn load(
        file: &ModelFile,
        gpu: &Arc<Gpu>,
        prefix: &str,
        in_ch: usize,
        ndf: usize,
        n_layers: usize,
    ) -> Result<Discriminator> {
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
        let mut running = RunningStats::default();
        for (i, _, cout, _, _, bn) in layers(in_ch, ndf, n_layers) {
            if bn {
                let name = |s: &str| format!("{prefix}main.{}.{s}", i + 1);
                let (mean, var) = if file.has(&name("running_mean")) {
                    (
                        file.host(&name("running_mean"), Some(&[cout]))?.0,
                        file.host(&name("running_var"), Some(&[cout]))?.0,
                    )
                } else {
                    (vec![0.0; cout], vec![1.0; cout])
                };
                running.layers.push((i + 1, mean, var));
            }
        }
        if file.has(&format!("{prefix}main.{}.num_batches_tracked", 3)) {
            running.num_batches_tracked = file
                .host(&format!("{prefix}main.3.num_batches_tracked"), None)?
                .0
                .first()
                .map(|&v| v as i64)
                .unwrap_or(0);
        }
        Ok(Discriminator { params, n_layers, running: RefCell::new(running), track_running_stats: false })
    }

    /// A new discriminator initialised as the reference's `weights_init`:
    /// conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0;
    /// conv biases keep torch's default U(±1/sqrt(fan_in)).
    pub fn init(gpu: &Arc<Gpu>, in_ch: usize, ndf: usize, n_layers: usize, rng: &mut Rng) -> Result<Discriminator> {
        let mut params = Params::default();
        let mut running = RunningStats::default();
        for (i, cin, cout, _, bias, bn) in layers(in_ch, ndf, n_layers) {
            let w: Vec<f32> = (0..cout * cin * 16).map(|_| (0.02 * rng.normal()) as f32).collect();
            params.insert(gpu, &format!("main.{i}.weight"), &w, &[cout, cin, 4, 4])?;
            if bias {
                let bound = 1.0 / ((cin * 16) as f64).sqrt();
                let b: Vec<f32> = (0..cout).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect();
                params.insert(gpu, &format!("main.{i}.bias"), &b, &[cout])?;
            }
            if bn {
                let g: Vec<f32> = (0..cout).map(|_| (1.0 + 0.02 * rng.normal()) as f32).collect();
                params.insert(gpu, &format!("main.{}.weight", i + 1), &g, &[cout])?;
                params.insert(gpu, &format!("main.{}.bias", i + 1), &vec![0.0; cout], &[cout])?;
                running.layers.push((i + 1, vec![0.0; cout], vec![1.0; cout]));
            }
        }
        Ok(Discriminator { params, n_layers, running: RefCell::new(running), track_running_stats: false })
    }

    /// Parameters and BatchNorm buffers under `{prefix}main.…`, as the reference state_dict.
    pub fn to_host(&self, prefix: &str) -> Result<Vec<HostTensor>> {
        let mut out = self.params.to_host(prefix)?;
        let running = self.running.borrow();
        for (i, mean, var) in &running.layers {
            out.push(HostTensor {
                name: format!("{prefix}main.{i}.running_mean"),
                shape: vec![mean.len()],
                data: HostData::F32(mean.clone()),
            });
            out.push(HostTensor {
                name: format!("{prefix}main.{i}.running_var"),
                shape: vec![var.len()],
                data: HostData::F32(var.clone()),
            });
            out.push(HostTensor {
                name: format!("{prefix}main.{i}.num_batches_tracked"),
                shape: vec![],
                data: HostData::I64(vec![running.num_batches_tracked]),
            });
        }
        Ok(out)
    }

    /// torch's BatchNorm2d running-statistics update from one batch of activations [B, C, H, W].
    fn update_running(&self, layer: usize, x: &[f32], shape: &[usize]) {
        let (b, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
        let n = (b * hw) as f64;
        let mut running = self.running.borrow_mut();
        let Some((_, mean, var)) = running.layers.iter_mut().find(|l| l.0 == layer) else { return };
        for ch in 0..c {
            let (mut s, mut s2) = (0f64, 0f64);
            for bi in 0..b {
                for &v in &x[(bi * c + ch) * hw..(bi * c + ch + 1) * hw] {
                    s += v as f64;
                    s2 += (v as f64) * (v as f64);
                }
            }
            let m = s / n;
            let unbiased = if n > 1.0 { (s2 - n * m * m).max(0.0) / (n - 1.0) } else { 0.0 };
            mean[ch] = (0.9 * mean[ch] as f64 + 0.1 * m) as f32;
            var[ch] = (0.9 * var[ch] as f64 + 0.1 * unbiased) as f32;
        }
    }

    /// Patch logits [B, 1, h, w] (train mode: BatchNorm uses this batch's statistics).
    pub fn forward(&self, t: &Tape, p: &ParamVars, x: &Var) -> Result<Var> {
        let in_ch = x.shape()[1];
        let ndf = self.params.get("main.0.weight")?.dim(0);
        let all = layers(in_ch, ndf, self.n_layers);
        let last = all.len() - 1;
        if self.track_running_stats {
            self.running.borrow_mut().num_batches_tracked += 1;
        }
        let mut h = x.clone();
        for (k, (i, _, _, stride, bias, bn)) in all.into_iter().enumerate() {
            let b = if bias { Some(p.get(&format!("main.{i}.bias"))?) } else { None };
            h = t.conv2d(&h, p.get(&format!("main.{i}.weight"))?, b, ConvSpec::same(stride, 1))?;
            if bn {
                if self.track_running_stats {
                    self.update_running(i + 1, &h.value.to_vec()?, h.shape());
                }
                h = t.norm(
                    &h,
                    NormKind::Batch,
                    p.get(&format!("main.{}.weight", i + 1))?,
                    p.get(&format!("main.{}.bias", i + 1))?,
                    1e-5,
                )?;
            }
            if k != last {
                h = t.unary(&h, Unary::LeakyRelu(0.2))?;
            }
        }
        Ok(h)
    }
}
