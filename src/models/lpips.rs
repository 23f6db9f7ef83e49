//! LPIPS perceptual distance (taming `modules/losses/lpips.py`): VGG16
//! feature slices of both images, channel-normalised, squared differences,
//! 1x1 `lin` layers, spatial mean, summed over the five slices.

use std::sync::Arc;

use anyhow::Result;

use super::weights::{ModelFile, Params};
use crate::engine::kernels::conv2d::ConvSpec;
use crate::engine::kernels::elementwise::Unary;
use crate::engine::{Gpu, Tape, Tensor, Var};

/// VGG16 conv layers (index in `features`, in, out) grouped into the five slices.
const SLICES: [&[(usize, usize, usize)]; 5] = [
    &[(0, 3, 64), (2, 64, 64)],
    &[(5, 64, 128), (7, 128, 128)],
    &[(10, 128, 256), (12, 256, 256), (14, 256, 256)],
    &[(17, 256, 512), (19, 512, 512), (21, 512, 512)],
    &[(24, 512, 512), (26, 512, 512), (28, 512, 512)],
];
const CHANNELS: [usize; 5] = [64, 128, 256, 512, 512];

pub struct Lpips {
    /// Parameters under LPIPS's own names (`net.slice1.0.weight`, `lin0.model.1.weight`, ...).
    pub params: Params,
    /// Training-mode dropout in front of the `lin` layers, as the reference's
    /// `model.train()` switches on: (p, seed for this step). None: off (eval, and parity).
    pub dropout: std::cell::Cell<Option<(f32, u64)>>,
}

impl Lpips {
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, prefix: &str) -> Result<Lpips> {
        let mut params = Params::default();
        params.load_prefixed(file, gpu, prefix, "scaling_layer.shift", &[1, 3, 1, 1])?;
        params.load_prefixed(file, gpu, prefix, "scaling_layer.scale", &[1, 3, 1, 1])?;
        for (s, convs) in SLICES.iter().enumerate() {
            for &(i, cin, cout) in convs.iter() {
                params.load_prefixed(
                    file,
                    gpu,
                    prefix,
                    &format!("net.slice{}.{i}.weight", s + 1),
                    &[cout, cin, 3, 3],
                )?;
                params.load_prefixed(file, gpu, prefix, &format!("net.slice{}.{i}.bias", s + 1), &[cout])?;
            }
        }
        for (l, &c) in CHANNELS.iter().enumerate() {
            params.load_prefixed(file, gpu, prefix, &format!("lin{l}.model.1.weight"), &[1, c, 1, 1])?;
        }
        Ok(Lpips { params, dropout: Default::default() })
    }

    /// Whether a model file carries LPIPS weights under `prefix`.
    pub fn present(file: &ModelFile, prefix: &str) -> bool {
        file.has(&format!("{prefix}lin0.model.1.weight"))
    }

    /// Per-sample distance [B] between images in [-1, 1]. LPIPS weights are
    /// constants here (frozen, as in the reference); gradients flow to the images.
    pub fn forward(&self, t: &Tape, a: &Var, b: &Var) -> Result<Var> {
        let p = |n: &str| -> Result<Var> { Ok(t.constant(self.params.get(n)?.clone())) };
        let fa = self.features(t, &p, a)?;
        let fb = self.features(t, &p, b)?;
        let batch = a.shape()[0];
        let mut total: Option<Var> = None;
        for (l, (x, y)) in fa.iter().zip(&fb).enumerate() {
            let d = t.add_scaled(&unit_channels(t, x)?, &unit_channels(t, y)?, 1.0, -1.0)?;
            let mut d = t.mul(&d, &d)?;
            if let Some((p_drop, seed)) = self.dropout.get() {
                d = t.dropout(&d, p_drop, &mut crate::engine::Rng::keyed(seed, l as u64, 0))?;
            }
            let s = t.conv2d(&d, &p(&format!("lin{l}.model.1.weight"))?, None, ConvSpec::same(1, 0))?;
            let hw = s.shape()[2] * s.shape()[3];
            let mean = t.scale(&t.sum_dim(&t.reshape(&s, &[batch, hw])?, 1)?, 1.0 / hw as f32)?;
            total = Some(match total {
                None => mean,
                Some(acc) => t.add(&acc, &mean)?,
            });
        }
        Ok(total.expect("five slices"))
    }

    fn features(&self, t: &Tape, p: &dyn Fn(&str) -> Result<Var>, x: &Var) -> Result<Vec<Var>> {
        // ScalingLayer: (x - shift) / scale, per channel; a one-channel map broadcasts against the
        // three shifts, as torch does for the reference's depth VQGAN.
        let x = &match x.shape()[1] {
            1 => t.concat(&[x, x, x], 1)?,
            _ => x.clone(),
        };
        let inner = x.shape()[2] * x.shape()[3];
        let shift = p("scaling_layer.shift")?;
        let scale = p("scaling_layer.scale")?;
        let neg_shift = t.scale(&t.reshape(&shift, &[3])?, -1.0)?;
        let inv_scale = t.unary(&t.reshape(&scale, &[3])?, Unary::Recip)?;
        let mut h = t.mul_channel(&t.add_channel(x, &neg_shift, inner)?, &inv_scale, inner)?;
        let mut out = Vec::new();
        for (s, convs) in SLICES.iter().enumerate() {
            if s > 0 {
                h = t.maxpool2x2(&h)?;
            }
            for &(i, _, _) in convs.iter() {
                let w = p(&format!("net.slice{}.{i}.weight", s + 1))?;
                let b = p(&format!("net.slice{}.{i}.bias", s + 1))?;
                h = t.unary(&t.conv2d(&h, &w, Some(&b), ConvSpec::same(1, 1))?, Unary::Relu)?;
            }
            out.push(h.clone());
        }
        Ok(out)
    }
}

/// x / (sqrt(sum over channels of x²) + 1e-10), per pixel (`normalize_tensor`).
fn unit_channels(t: &Tape, x: &Var) -> Result<Var> {
    let s = x.shape().to_vec();
    let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
    let flat = t.reshape(x, &[b, c, hw])?;
    let sq = t.sum_dim(&t.mul(&flat, &flat)?, 1)?; // [b, hw]
    let norm = t.unary(&t.unary(&sq, Unary::Sqrt)?, Unary::Affine(1.0, 1e-10))?;
    let inv = t.unary(&norm, Unary::Recip)?;
    t.reshape(&t.mul_mid(&flat, &inv, c, hw)?, &s)
}

/// Random LPIPS weights for timing and tests (not a trained network).
pub fn random_params(gpu: &Arc<Gpu>) -> Result<Vec<(String, Tensor)>> {
    use crate::engine::kernels::random_vec;
    let mut out = vec![
        ("scaling_layer.shift".to_string(), Tensor::from_f32(gpu, &[-0.030, -0.088, -0.188], &[1, 3, 1, 1])?),
        ("scaling_layer.scale".to_string(), Tensor::from_f32(gpu, &[0.458, 0.448, 0.450], &[1, 3, 1, 1])?),
    ];
    for (s, convs) in SLICES.iter().enumerate() {
        for &(i, cin, cout) in convs.iter() {
            out.push((
                format!("net.slice{}.{i}.weight", s + 1),
                Tensor::from_f32(gpu, &random_vec(cout * cin * 9, i as u64, 0.05), &[cout, cin, 3, 3])?,
            ));
            out.push((format!("net.slice{}.{i}.bias", s + 1), Tensor::zeros(gpu, &[cout])?));
        }
    }
    for (l, &c) in CHANNELS.iter().enumerate() {
        out.push((
            format!("lin{l}.model.1.weight"),
            Tensor::from_f32(gpu, &random_vec(c, 100 + l as u64, 0.1), &[1, c, 1, 1])?,
        ));
    }
    Ok(out)
}

impl Lpips {
    pub fn from_tensors(tensors: Vec<(String, Tensor)>) -> Lpips {
        let mut params = Params::default();
        for (n, t) in tensors {
            params.order.push(n.clone());
            params.tensors.insert(n, t);
        }
        Lpips { params, dropout: Default::default() }
    }
}
