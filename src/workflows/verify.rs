//! `taming verify DIR...`: recompute the tensors of `DIR/reference.safetensors`
//! (dumped by the PyTorch reference) from `DIR/model.safetensors` and report
//! the error of each against its tolerance.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::engine::kernels::reduce::Reduce;
use crate::engine::{Gpu, Tape, Tensor};
use crate::models::vqgan::{Vqgan, VqganConfig};
use crate::models::weights::ModelFile;

#[derive(Default)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    /// Forward outputs: max |err| <= 1e-3 * max(1, max |ref|).
    fn forward(&mut self, name: &str, got: &[f32], want: &[f32]) {
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        self.compare(name, got, want, 1e-3 * scale);
    }
    /// Gradients: max |err| <= 1e-2 * max |ref|, with a floor of 1e-6 times
    /// the largest gradient of the model (`floor`): gradients that are zero
    /// in exact arithmetic (a bias right before a GroupNorm, an attention
    /// key's bias) hold only float noise in both implementations.
    fn gradient(&mut self, name: &str, got: &[f32], want: &[f32], floor: f32) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        self.compare(name, got, want, (1e-2 * scale).max(floor));
    }
    fn compare(&mut self, name: &str, got: &[f32], want: &[f32], tol: f32) {
        if got.len() != want.len() {
            println!("FAIL {name:<58} {} values, reference has {}", got.len(), want.len());
            self.failed += 1;
            return;
        }
        let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, |m, e| if e.is_nan() || m.is_nan() { f32::NAN } else { m.max(e) });
        let ok = err <= tol;
        println!("{} {name:<58} max|err| {err:.3e}  tol {tol:.3e}", if ok { "PASS" } else { "FAIL" });
        if ok { self.passed += 1 } else { self.failed += 1 }
    }
    fn exact(&mut self, name: &str, got: &[u32], want: &[u32]) {
        let wrong = got.iter().zip(want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
        let ok = wrong == 0;
        println!("{} {name:<58} {wrong} of {} differ (exact)", if ok { "PASS" } else { "FAIL" }, want.len());
        if ok { self.passed += 1 } else { self.failed += 1 }
    }
    fn skip(&mut self, names: &[String], why: &str) {
        if !names.is_empty() {
            println!("SKIP {} tensors ({}{}): {why}", names.len(), names[0], if names.len() > 1 { ", ..." } else { "" });
            self.skipped += names.len();
        }
    }
}

pub fn verify_dir(gpu: &Arc<Gpu>, dir: &Path, tally: &mut Tally) -> Result<()> {
    let model = ModelFile::open(&dir.join("model.safetensors"))?;
    let reference = ModelFile::open_tensors(&dir.join("reference.safetensors"))?;
    let target = model.config.get("target").and_then(|t| t.as_str()).unwrap_or("");
    println!("== {} ({target})", dir.display());
    match target {
        "taming.models.vqgan.VQModel" => verify_vqgan(gpu, &model, &reference, tally),
        other => {
            tally.skip(&reference.names(), &format!("checks for '{other}' models are not implemented yet"));
            Ok(())
        }
    }
}

fn verify_vqgan(gpu: &Arc<Gpu>, model: &ModelFile, reference: &ModelFile, tally: &mut Tally) -> Result<()> {
    let params = model.config.get("params").cloned().unwrap_or_default();
    let config = VqganConfig::from_params(&params)?;
    let vq = Vqgan::load(model, gpu, config, "")?;
    let (x, xs) = reference.host("input", None)?;
    let tape = Tape::new();
    let p = vq.params.vars(&tape);
    let xv = tape.constant(Tensor::from_f32(gpu, &x, &xs)?);
    let out = vq.forward(&tape, &p, &xv)?;
    let want = |n: &str| reference.host(n, None).map(|v| v.0);
    for (name, var) in [("encoder_out", &out.encoder_out), ("quant_conv_out", &out.quant_conv_out), ("z_q", &out.z_q),
                        ("codebook_loss", &out.codebook_loss), ("decoder_out", &out.decoder_out)] {
        tally.forward(name, &var.value.to_vec()?, &want(name)?);
    }
    tally.exact("indices", &out.indices, &reference.indices("indices")?.0);
    let rec = tape.reduce(&tape.add_scaled(&xv, &out.decoder_out, 1.0, -1.0)?, Reduce::MeanAbs)?;
    tally.forward("rec_l1", &rec.value.to_vec()?, &want("rec_l1")?);
    // grad.<param> = d(rec_l1 + codebook_loss)/d param
    let loss = tape.add(&rec, &out.codebook_loss)?;
    let names: Vec<String> = vq.params.order.clone();
    let vars: Vec<_> = names.iter().map(|n| p.get(n)).collect::<Result<_>>()?;
    let grads = tape.grad(&loss, &vars)?;
    let mut missing = Vec::new();
    let mut pairs = Vec::new();
    for (n, g) in names.iter().zip(grads) {
        let key = format!("grad.{n}");
        if !reference.has(&key) {
            missing.push(n.clone());
            continue;
        }
        match g {
            Some(g) => pairs.push((key.clone(), g.to_vec()?, want(&key)?)),
            None => bail!("no gradient reached parameter {n}"),
        }
    }
    let largest = pairs.iter().flat_map(|(_, _, w)| w.iter()).fold(0f32, |m, v| m.max(v.abs()));
    for (key, got, want) in pairs {
        tally.gradient(&key, &got, &want, 1e-6 * largest);
    }
    if !missing.is_empty() {
        println!("note: the reference has no gradient for {} parameters ({}...)", missing.len(), missing[0]);
    }
    let rest: Vec<String> = reference
        .names()
        .into_iter()
        .filter(|n| {
            !(n.starts_with("grad.")
                || ["input", "encoder_out", "quant_conv_out", "indices", "z_q", "codebook_loss", "decoder_out", "rec_l1"].contains(&n.as_str()))
        })
        .collect();
    let mut rest = rest;
    rest.sort();
    tally.skip(&rest, "LPIPS, discriminator and GAN-loss checks are not implemented yet");
    Ok(())
}

/// Verify each directory; prints `N passed, M failed` and returns whether all passed.
pub fn run(gpu: &Arc<Gpu>, dirs: &[std::path::PathBuf]) -> Result<bool> {
    let tally = run_tally(gpu, dirs)?;
    Ok(tally.failed == 0)
}

/// `run`, returning the counts.
pub fn run_tally(gpu: &Arc<Gpu>, dirs: &[std::path::PathBuf]) -> Result<Tally> {
    let mut tally = Tally::default();
    for d in dirs {
        if let Err(e) = verify_dir(gpu, d, &mut tally) {
            println!("FAIL {}: {e:#}", d.display());
            tally.failed += 1;
        }
    }
    if tally.skipped > 0 {
        println!("({} reference tensors skipped)", tally.skipped);
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(tally)
}
