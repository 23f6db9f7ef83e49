//! The VQGAN objective (taming `VQLPIPSWithDiscriminator`): L1 + LPIPS
//! reconstruction, codebook loss, hinge (or vanilla) GAN loss with the
//! adaptive weight λ from the gradients at the decoder's last layer.

use anyhow::{bail, Result};

use super::discriminator::Discriminator;
use super::lpips::Lpips;
use super::weights::ParamVars;
use crate::engine::kernels::elementwise::Unary;
use crate::engine::kernels::reduce::Reduce;
use crate::engine::{Tape, Var};

#[derive(Clone, Debug)]
pub struct LossConfig {
    pub disc_start: usize,
    pub codebook_weight: f32,
    pub perceptual_weight: f32,
    pub disc_factor: f32,
    pub disc_weight: f32,
    pub disc_ndf: usize,
    pub disc_num_layers: usize,
    pub disc_in_channels: usize,
    /// "hinge" or "vanilla"
    pub disc_loss: String,
}

/// The reference class of a segmentation VQGAN's objective.
pub const BCE_TARGET: &str = "taming.modules.losses.segmentation.BCELossWithQuant";

/// `BCELossWithQuant`: binary cross-entropy of the decoder's logits against the one-hot label
/// map x (mean over every element, `binary_cross_entropy_with_logits`), + codebook_weight x the
/// codebook loss. Returns (loss, bce).
pub fn bce_with_quant(
    t: &Tape,
    x: &Var,
    logits: &Var,
    codebook_loss: &Var,
    codebook_weight: f32,
) -> Result<(Var, Var)> {
    // softplus(l) - l y = max(l, 0) - l y + log(1 + e^-|l|), torch's stable form.
    let per = t.add_scaled(&t.unary(logits, Unary::Softplus)?, &t.mul(logits, x)?, 1.0, -1.0)?;
    let bce = t.reduce(&per, Reduce::Mean)?;
    Ok((t.add_scaled(&bce, codebook_loss, 1.0, codebook_weight)?, bce))
}

impl LossConfig {
    /// From `lossconfig.params` (defaults as the reference's constructor).
    pub fn from_params(p: &serde_json::Value) -> Result<Self> {
        let f = |k: &str, d: f64| p.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let disc_loss = p.get("disc_loss").and_then(|v| v.as_str()).unwrap_or("hinge").to_string();
        if disc_loss != "hinge" && disc_loss != "vanilla" {
            bail!("lossconfig: disc_loss '{disc_loss}' is not hinge or vanilla");
        }
        if p.get("disc_conditional").and_then(|v| v.as_bool()).unwrap_or(false) {
            bail!("lossconfig: disc_conditional is not supported");
        }
        Ok(LossConfig {
            disc_start: f("disc_start", 0.0) as usize,
            codebook_weight: f("codebook_weight", 1.0) as f32,
            perceptual_weight: f("perceptual_weight", 1.0) as f32,
            disc_factor: f("disc_factor", 1.0) as f32,
            disc_weight: f("disc_weight", 1.0) as f32,
            disc_ndf: f("disc_ndf", 64.0) as usize,
            disc_num_layers: f("disc_num_layers", 3.0) as usize,
            disc_in_channels: f("disc_in_channels", 3.0) as usize,
            disc_loss,
        })
    }

    /// `adopt_weight`: the GAN terms are off before `disc_start`.
    pub fn disc_factor_at(&self, step: usize) -> f32 {
        if step < self.disc_start {
            0.0
        } else {
            self.disc_factor
        }
    }
}

pub struct GeneratorLoss {
    /// Per-sample LPIPS [B] (None when the perceptual weight is 0 or weights are absent).
    pub lpips: Option<Var>,
    pub nll_loss: Var,
    /// D(x̂) and -mean(D(x̂)); None before `disc_start`, where the GAN term is
    /// multiplied by 0 and the discriminator is not run at all.
    pub logits_fake: Option<Var>,
    pub g_loss: Option<Var>,
    pub d_weight: f32,
    pub loss: Var,
}

/// Optimizer-0 step of the reference: reconstruction + λ·GAN + codebook.
#[allow(clippy::too_many_arguments)]
pub fn generator_loss(
    t: &Tape,
    cfg: &LossConfig,
    x: &Var,
    recon: &Var,
    codebook_loss: &Var,
    lpips: Option<&Lpips>,
    disc: &Discriminator,
    dp: &ParamVars,
    last_layer: &Var,
    step: usize,
) -> Result<GeneratorLoss> {
    let l1 = t.reduce(&t.add_scaled(x, recon, 1.0, -1.0)?, Reduce::MeanAbs)?;
    let (nll_loss, lp) = match lpips {
        Some(net) if cfg.perceptual_weight > 0.0 => {
            let p = net.forward(t, x, recon)?;
            // mean(|x - x̂| + w·p) over all pixels = mean|x - x̂| + w·mean_b(p)
            let pm = t.reduce(&p, Reduce::Mean)?;
            (t.add_scaled(&l1, &pm, 1.0, cfg.perceptual_weight)?, Some(p))
        }
        _ => (l1, None),
    };
    let disc_factor = cfg.disc_factor_at(step);
    let mut loss = t.add_scaled(&nll_loss, codebook_loss, 1.0, cfg.codebook_weight)?;
    if disc_factor == 0.0 {
        return Ok(GeneratorLoss { lpips: lp, nll_loss, logits_fake: None, g_loss: None, d_weight: 0.0, loss });
    }
    let logits_fake = disc.forward(t, dp, recon)?;
    let g_loss = t.scale(&t.reduce(&logits_fake, Reduce::Mean)?, -1.0)?;
    // λ = clamp(|∇nll| / (|∇g| + 1e-4), 0, 1e4) · disc_weight, at the decoder's last layer, detached.
    let gn = t.grad(&nll_loss, &[last_layer])?.remove(0);
    let gg = t.grad(&g_loss, &[last_layer])?.remove(0);
    let norm = |g: Option<crate::engine::Tensor>| -> Result<f32> {
        match g {
            Some(g) => Ok(crate::engine::kernels::reduce::reduce(&g, Reduce::L2Norm)?.to_scalar()?),
            None => Ok(0.0),
        }
    };
    let d_weight = (norm(gn)? / (norm(gg)? + 1e-4)).clamp(0.0, 1e4) * cfg.disc_weight;
    // Same summation order as the reference: nll + λ·f·g + w_cb·codebook.
    loss = t.add_scaled(
        &t.add_scaled(&nll_loss, &g_loss, 1.0, d_weight * disc_factor)?,
        codebook_loss,
        1.0,
        cfg.codebook_weight,
    )?;
    Ok(GeneratorLoss { lpips: lp, nll_loss, logits_fake: Some(logits_fake), g_loss: Some(g_loss), d_weight, loss })
}

pub struct DiscriminatorLoss {
    pub logits_real: Var,
    pub logits_fake: Var,
    pub loss: Var,
}

/// Optimizer-1 step: the discriminator on real and (detached) reconstructed
/// images, each forward with its own batch statistics as in the reference.
pub fn discriminator_loss(
    t: &Tape,
    cfg: &LossConfig,
    disc: &Discriminator,
    dp: &ParamVars,
    x: &Var,
    recon: &Var,
    step: usize,
) -> Result<DiscriminatorLoss> {
    let logits_real = disc.forward(t, dp, &x.detach())?;
    let logits_fake = disc.forward(t, dp, &recon.detach())?;
    let (ra, rb) = if cfg.disc_loss == "hinge" {
        // 0.5 (mean relu(1 - real) + mean relu(1 + fake))
        let a = t.unary(&logits_real, Unary::Affine(-1.0, 1.0))?;
        let b = t.unary(&logits_fake, Unary::Affine(1.0, 1.0))?;
        (t.reduce(&t.unary(&a, Unary::Relu)?, Reduce::Mean)?, t.reduce(&t.unary(&b, Unary::Relu)?, Reduce::Mean)?)
    } else {
        // vanilla: 0.5 (mean softplus(-real) + mean softplus(fake))
        let a = t.unary(&logits_real, Unary::Affine(-1.0, 0.0))?;
        (
            t.reduce(&t.unary(&a, Unary::Softplus)?, Reduce::Mean)?,
            t.reduce(&t.unary(&logits_fake, Unary::Softplus)?, Reduce::Mean)?,
        )
    };
    let f = 0.5 * cfg.disc_factor_at(step);
    let loss = t.add_scaled(&ra, &rb, f, f)?;
    Ok(DiscriminatorLoss { logits_real, logits_fake, loss })
}
