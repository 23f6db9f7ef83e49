//! Adam and AdamW on the GPU (`shaders/optimizer.wgsl`), with parameter
//! groups (each parameter carries its weight decay), global gradient norm
//! and clipping, and state that can be saved and restored.

use anyhow::{bail, Result};

use super::kernels::reduce::{self, Reduce};
use super::kernels::{elementwise, grid_1d, u32_of};
use super::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/optimizer.wgsl`'s `Params`: bc1 and bc2_sqrt are the bias
    /// corrections 1 - β1^t and sqrt(1 - β2^t).
    OptimizerParams in "optimizer" as "Params" {
        n: u32, decoupled: u32, _pad0: u32, _pad1: u32,
        lr: f32, beta1: f32, beta2: f32, eps: f32,
        weight_decay: f32, bc1: f32, bc2_sqrt: f32, _pad2: f32,
    }
);

#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// AdamW (decay the weights directly) instead of Adam (decay added to the gradient).
    pub decoupled: bool,
}

impl AdamConfig {
    /// torch.optim.Adam defaults with the given learning rate and betas.
    pub fn adam(lr: f32, beta1: f32, beta2: f32) -> Self {
        AdamConfig { lr, beta1, beta2, eps: 1e-8, decoupled: false }
    }
    pub fn adamw(lr: f32, beta1: f32, beta2: f32) -> Self {
        AdamConfig { decoupled: true, ..Self::adam(lr, beta1, beta2) }
    }
}

struct Slot {
    param: Tensor,
    weight_decay: f32,
    m: Tensor,
    v: Tensor,
}

/// (m, v) per parameter, as host vectors.
pub type Moments = Vec<(Vec<f32>, Vec<f32>)>;

pub struct Adam {
    pub config: AdamConfig,
    pub step: u32,
    slots: Vec<Slot>,
}

impl Adam {
    /// `params`: (parameter, its weight decay) — a group with decay and one without.
    pub fn new(config: AdamConfig, params: &[(Tensor, f32)]) -> Result<Adam> {
        let mut slots = Vec::new();
        for (p, wd) in params {
            p.expect_dtype("optimised parameter", DType::F32)?;
            slots.push(Slot {
                param: p.clone(),
                weight_decay: *wd,
                m: Tensor::zeros(&p.gpu, p.shape())?,
                v: Tensor::zeros(&p.gpu, p.shape())?,
            });
        }
        Ok(Adam { config, step: 0, slots })
    }

    /// One update of every parameter, in place, from `grads` (same order as the parameters).
    pub fn update(&mut self, grads: &[&Tensor]) -> Result<()> {
        if grads.len() != self.slots.len() {
            bail!("optimizer: {} gradients for {} parameters", grads.len(), self.slots.len());
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - (c.beta1 as f64).powi(t);
        let bc2 = 1.0 - (c.beta2 as f64).powi(t);
        for (s, g) in self.slots.iter().zip(grads) {
            g.expect_shape("gradient", s.param.shape())?;
            let gpu = &s.param.gpu;
            // Four parameters per invocation where the size allows.
            let by4 = s.param.numel() % 4 == 0;
            let pipe = gpu.pipeline("optimizer", if by4 { "adam4" } else { "adam" }, &[])?;
            let n = if by4 { s.param.numel() / 4 } else { s.param.numel() };
            let params = OptimizerParams {
                n: u32_of("parameter size", n)?,
                decoupled: c.decoupled as u32,
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: s.weight_decay,
                bc1: bc1 as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                ..Default::default()
            };
            gpu.dispatch(
                &pipe,
                &params,
                &[s.param.binding(), g.binding(), s.m.binding(), s.v.binding()],
                grid_1d(gpu, n)?,
            )?;
        }
        Ok(())
    }

    /// Moments as host vectors (m, v per parameter) with the step count, for checkpoints.
    pub fn state(&self) -> Result<(u32, Moments)> {
        let mut out = Vec::new();
        for s in &self.slots {
            out.push((s.m.to_vec()?, s.v.to_vec()?));
        }
        Ok((self.step, out))
    }

    pub fn load_state(&mut self, step: u32, moments: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        if moments.len() != self.slots.len() {
            bail!("optimizer state has {} entries for {} parameters", moments.len(), self.slots.len());
        }
        for (i, (s, (m, v))) in self.slots.iter_mut().zip(moments).enumerate() {
            if m.len() != s.param.numel() || v.len() != s.param.numel() {
                bail!("optimizer state entry {i} has the wrong size for parameter {:?}", s.param.shape());
            }
            s.m = Tensor::from_f32(&s.param.gpu, m, s.param.shape())?;
            s.v = Tensor::from_f32(&s.param.gpu, v, s.param.shape())?;
        }
        self.step = step;
        Ok(())
    }
}

/// sqrt of the sum of squares of all gradients.
pub fn global_grad_norm(grads: &[&Tensor]) -> Result<f32> {
    let mut total = 0f64;
    for g in grads {
        total += reduce::reduce(g, Reduce::SumSquares)?.to_scalar()? as f64;
    }
    Ok(total.sqrt() as f32)
}

/// Scale the gradients so their global norm is at most `max_norm`
/// (torch.nn.utils.clip_grad_norm_); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f32) -> Result<f32> {
    let norm = global_grad_norm(&grads.iter().collect::<Vec<_>>())?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = elementwise::scale(g, coef)?;
        }
    }
    Ok(norm)
}

pub mod cpu {
    use super::AdamConfig;

    /// PyTorch's Adam/AdamW step on host vectors (f32, same operation order).
    pub fn adam_step(c: &AdamConfig, step: u32, wd: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let bc1 = (1.0 - (c.beta1 as f64).powi(step as i32)) as f32;
        let bc2_sqrt = ((1.0 - (c.beta2 as f64).powi(step as i32)).sqrt()) as f32;
        for i in 0..p.len() {
            let mut w = p[i];
            let mut gi = g[i];
            if wd != 0.0 {
                if c.decoupled {
                    w *= 1.0 - c.lr * wd;
                } else {
                    gi += wd * w;
                }
            }
            m[i] += (1.0 - c.beta1) * (gi - m[i]);
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
            let denom = v[i].sqrt() / bc2_sqrt + c.eps;
            p[i] = w - (c.lr / bc1) * m[i] / denom;
        }
    }
}
