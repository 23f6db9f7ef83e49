//! `taming verify DIR...`: recompute the tensors of `DIR/reference.safetensors`
//! (dumped by the PyTorch reference) from `DIR/model.safetensors` and report
//! the error of each against its tolerance.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::conditions::{self, CondStage};
use crate::engine::kernels::reduce::Reduce;
use crate::engine::{Gpu, Tape, Tensor};
use crate::models::cond_transformer::Conditioning;
use crate::models::discriminator::Discriminator;
use crate::models::gpt::{argmax, Gpt, GptConfig, KvDecoder};
use crate::models::lpips::Lpips;
use crate::models::vqgan::{Vqgan, VqganConfig};
use crate::models::vqloss::{bce_with_quant, discriminator_loss, generator_loss, LossConfig};
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
        let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, |m, e| {
            if e.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(e)
            }
        });
        let ok = err <= tol;
        println!("{} {name:<58} max|err| {err:.3e}  tol {tol:.3e}", if ok { "PASS" } else { "FAIL" });
        if ok {
            self.passed += 1
        } else {
            self.failed += 1
        }
    }
    fn exact(&mut self, name: &str, got: &[u32], want: &[u32]) {
        let wrong = got.iter().zip(want).filter(|(a, b)| a != b).count() + got.len().abs_diff(want.len());
        let ok = wrong == 0;
        println!("{} {name:<58} {wrong} of {} differ (exact)", if ok { "PASS" } else { "FAIL" }, want.len());
        if ok {
            self.passed += 1
        } else {
            self.failed += 1
        }
    }
    fn skip(&mut self, names: &[String], why: &str) {
        if !names.is_empty() {
            println!(
                "SKIP {} tensors ({}{}): {why}",
                names.len(),
                names[0],
                if names.len() > 1 { ", ..." } else { "" }
            );
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
        t if crate::models::vqgan::is_target(t) => verify_vqgan(gpu, &model, &reference, tally),
        crate::models::cond_transformer::TARGET => verify_transformer(gpu, &model, &reference, tally),
        other => {
            tally.skip(&reference.names(), &format!("checks for '{other}' models are not implemented yet"));
            Ok(())
        }
    }
}

fn verify_vqgan(gpu: &Arc<Gpu>, model: &ModelFile, reference: &ModelFile, tally: &mut Tally) -> Result<()> {
    let params = model.config.get("params").cloned().unwrap_or_default();
    let config = VqganConfig::from_config(&model.config)?;
    let gumbel = matches!(config.quantizer, crate::models::vqgan::Quantizer::Gumbel { .. });
    let vq = Vqgan::load(model, gpu, config, "")?;
    let (x, xs) = reference.host("input", None)?;
    let tape = Tape::new();
    let p = vq.params.vars(&tape);
    let xv = tape.constant(Tensor::from_f32(gpu, &x, &xs)?);
    let out = vq.forward(&tape, &p, &xv)?;
    let want = |n: &str| reference.host(n, None).map(|v| v.0);
    for (name, var) in [
        ("encoder_out", &out.encoder_out),
        ("quant_conv_out", &out.quant_conv_out),
        ("z_q", &out.z_q),
        ("codebook_loss", &out.codebook_loss),
        ("decoder_out", &out.decoder_out),
    ] {
        tally.forward(name, &var.value.to_vec()?, &want(name)?);
    }
    tally.exact("indices", &out.indices.read()?, &reference.indices("indices")?.0);
    let rec = tape.reduce(&tape.add_scaled(&xv, &out.decoder_out, 1.0, -1.0)?, Reduce::MeanAbs)?;
    tally.forward("rec_l1", &rec.value.to_vec()?, &want("rec_l1")?);
    if let Some(logits) = &out.quant_logits {
        tally.forward("quant_logits", &logits.value.to_vec()?, &want("quant_logits")?);
    }
    if gumbel {
        // The Gumbel choice has no gradient to compare (training it is not implemented).
        let done = [
            "input",
            "encoder_out",
            "quant_conv_out",
            "quant_logits",
            "indices",
            "z_q",
            "codebook_loss",
            "decoder_out",
            "rec_l1",
        ];
        skip_unchecked(tally, reference, &done.map(String::from));
        return Ok(());
    }
    // grad.<param> = d(rec_l1 + codebook_loss)/d param
    let loss = tape.add(&rec, &out.codebook_loss)?;
    let names: Vec<String> = vq.params.order.clone();
    let vars: Vec<_> = names.iter().map(|n| p.get(n)).collect::<Result<_>>()?;
    if reference.has(&format!("grad.{}", names[0])) {
        check_gradients(tally, reference, "grad.", &names, tape.grad(&loss, &vars)?)?;
    }
    let mut done: Vec<String> =
        ["input", "encoder_out", "quant_conv_out", "indices", "z_q", "codebook_loss", "decoder_out", "rec_l1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    done.extend(names.iter().map(|n| format!("grad.{n}")));

    // A segmentation model: its label maps one-hot on the GPU, and its objective.
    if reference.has("input_labels") {
        check_one_hot(gpu, reference, "input_labels", "input", vq.config.n_labels.unwrap_or(0), &x, tally)?;
        done.push("input_labels".into());
    }
    if params.pointer("/lossconfig/target").and_then(|t| t.as_str()) == Some(crate::models::vqloss::BCE_TARGET) {
        let w = params.pointer("/lossconfig/params/codebook_weight").and_then(|v| v.as_f64()).unwrap_or(1.0);
        let (ae, bce) = bce_with_quant(&tape, &xv, &out.decoder_out, &out.codebook_loss, w as f32)?;
        tally.forward("bce_loss", &bce.value.to_vec()?, &want("bce_loss")?);
        tally.forward("ae_loss", &ae.value.to_vec()?, &want("ae_loss")?);
        check_gradients(tally, reference, "ae_grad.", &names, tape.grad(&ae, &vars)?)?;
        done.extend(["bce_loss", "ae_loss"].map(String::from));
        done.extend(names.iter().map(|n| format!("ae_grad.{n}")));
    }

    // The full objective, when the file has the loss modules' weights.
    let loss_params = params.get("lossconfig").and_then(|l| l.get("params")).cloned();
    let lp = "loss.perceptual_loss.";
    if let Some(lcfg) =
        loss_params.filter(|_| Lpips::present(model, lp) && model.has("loss.discriminator.main.0.weight"))
    {
        let cfg = LossConfig::from_params(&lcfg)?;
        let lpips = Lpips::load(model, gpu, lp)?;
        let disc = Discriminator::load(
            model,
            gpu,
            "loss.discriminator.",
            cfg.disc_in_channels,
            cfg.disc_ndf,
            cfg.disc_num_layers,
        )?;
        let dp = disc.params.vars(&tape);
        let last = p.get("decoder.conv_out.weight")?;
        let g = generator_loss(
            &tape,
            &cfg,
            &xv,
            &out.decoder_out,
            &out.codebook_loss,
            Some(&lpips),
            &disc,
            &dp,
            last,
            cfg.disc_start,
        )?;
        if let Some(l) = &g.lpips {
            tally.forward("lpips", &l.value.to_vec()?, &want("lpips")?);
        }
        tally.forward("nll_loss", &g.nll_loss.value.to_vec()?, &want("nll_loss")?);
        let (Some(logits_fake), Some(g_loss)) = (&g.logits_fake, &g.g_loss) else {
            bail!("internal: the discriminator did not run at disc_start")
        };
        tally.forward("disc_logits_fake", &logits_fake.value.to_vec()?, &want("disc_logits_fake")?);
        tally.forward("g_loss", &g_loss.value.to_vec()?, &want("g_loss")?);
        tally.forward("d_weight", &[g.d_weight], &want("d_weight")?);
        tally.forward("ae_loss", &g.loss.value.to_vec()?, &want("ae_loss")?);
        check_gradients(tally, reference, "ae_grad.", &names, tape.grad(&g.loss, &vars)?)?;
        let d = discriminator_loss(&tape, &cfg, &disc, &dp, &xv, &out.decoder_out, cfg.disc_start)?;
        tally.forward("disc_logits_real", &d.logits_real.value.to_vec()?, &want("disc_logits_real")?);
        tally.forward("disc_logits_fake_detached", &d.logits_fake.value.to_vec()?, &want("disc_logits_fake_detached")?);
        tally.forward("d_loss", &d.loss.value.to_vec()?, &want("d_loss")?);
        let dnames = disc.params.order.clone();
        let dvars: Vec<_> = dnames.iter().map(|n| dp.get(n)).collect::<Result<_>>()?;
        check_gradients(
            tally,
            reference,
            "d_grad.",
            &dnames.iter().map(|n| format!("loss.discriminator.{n}")).collect::<Vec<_>>(),
            tape.grad(&d.loss, &dvars)?,
        )?;
        for n in [
            "lpips",
            "nll_loss",
            "disc_logits_fake",
            "g_loss",
            "d_weight",
            "ae_loss",
            "disc_logits_real",
            "disc_logits_fake_detached",
            "d_loss",
        ] {
            done.push(n.to_string());
        }
        done.extend(names.iter().map(|n| format!("ae_grad.{n}")));
        done.extend(dnames.iter().map(|n| format!("d_grad.loss.discriminator.{n}")));
    }
    skip_unchecked(tally, reference, &done);
    Ok(())
}

fn verify_transformer(gpu: &Arc<Gpu>, model: &ModelFile, reference: &ModelFile, tally: &mut Tally) -> Result<()> {
    let params = model.config.get("params").cloned().unwrap_or_default();
    let gcfg = GptConfig::from_params(
        params.pointer("/transformer_config/params").ok_or_else(|| anyhow!("config: no transformer_config.params"))?,
    )?;
    let vcfg = VqganConfig::from_config(
        params.pointer("/first_stage_config").ok_or_else(|| anyhow!("config: no first_stage_config"))?,
    )?;
    let net = crate::models::cond_transformer::Net2NetConfig::from_config(&model.config)?;
    let vq = Vqgan::load(model, gpu, vcfg, "first_stage_model.")?;
    let gpt = Gpt::load(model, gpu, gcfg.clone(), "transformer.")?;
    let (img, shape) = reference.host("image", None)?;
    let inf = Tape::inference();
    let vp = vq.params.vars(&inf);
    let (z, h, w) = vq.encode_indices(&inf, &vp, &inf.constant(Tensor::from_f32(gpu, &img, &shape)?))?;
    // The codes in the order the transformer reads them (the reference's encode_to_z permutes them).
    let permuter = crate::models::permuter::Permuter::from_config(params.get("permuter_config"), h, w)?;
    let z: Vec<Vec<u32>> = z.iter().map(|r| permuter.apply(r)).collect::<Result<_>>()?;
    let b = z.len();
    tally.exact("z_indices", &z.concat(), &reference.indices("z_indices")?.0);
    // The conditioning: the start token, or each image's class (the reference's
    // Labelator turns the class label into the one conditioning token).
    let c: Vec<Vec<u32>> = match &net.cond {
        Conditioning::Class { .. } => {
            let labels = reference.indices("c_indices")?.0;
            if labels.len() != b {
                bail!("reference: {} class labels for {b} images", labels.len());
            }
            labels.iter().map(|&k| net.cond.tokens(Some(k))).collect::<Result<_>>()?
        }
        // The cond stage's codes of the condition as the reference gave it (a photo, a map, a
        // one-hot label map, or coordinates).
        Conditioning::Spatial { .. } | Conditioning::Coord { .. } => {
            let stage = CondStage::load(model, gpu, &net)?.expect("spatial");
            let (cimg, cshape) = reference.host("cond_image", None).map_err(|e| {
                anyhow!("reference: no cond_image (dump it with tools/dump_reference.py --cond): {e:#}")
            })?;
            let (cimg, cshape) = match net.downsample_cond {
                Some(s) => conditions::resize_nearest_chw(&cimg, &cshape, s),
                None => (cimg, cshape),
            };
            if reference.has("cond_labels") && net.downsample_cond.is_none() {
                check_one_hot(gpu, reference, "cond_labels", "cond_image", cshape[1], &cimg, tally)?;
            }
            match &stage {
                CondStage::Vq { vq: cvq, .. } => {
                    let cp = cvq.params.vars(&inf);
                    cvq.encode_indices(&inf, &cp, &inf.constant(Tensor::from_f32(gpu, &cimg, &cshape)?))?.0
                }
                CondStage::Coord { n_embed, down_factor } => cimg
                    .chunks(cshape[2] * cshape[3])
                    .map(|m| conditions::coord_codes(m, cshape[2], cshape[3], *n_embed, *down_factor))
                    .collect::<Result<_>>()?,
            }
        }
        _ => vec![net.cond.tokens(None)?; b],
    };
    let c_len = c[0].len();
    tally.exact("c_indices", &c.concat(), &reference.indices("c_indices")?.0);
    // Teacher forcing: logits of the image positions from [c, z][:-1].
    let tape = Tape::new();
    let gp = gpt.params.vars(&tape);
    let input: Vec<Vec<u32>> = (0..b).map(|i| [c[i].clone(), z[i][..z[i].len() - 1].to_vec()].concat()).collect();
    // The logits of the image positions: from the last conditioning token on.
    let logits = gpt.forward(&tape, &gp, &input)?;
    let logits = if c_len > 1 { tape.slice(&logits, 1, c_len - 1, h * w)? } else { logits };
    tally.forward("logits", &logits.value.to_vec()?, &reference.host("logits", None)?.0);
    let v = gcfg.vocab_size;
    let flat = tape.reshape(&logits, &[b * h * w, v])?;
    let ce = tape.cross_entropy(&flat, &z.concat())?;
    tally.forward("ce_loss", &ce.value.to_vec()?, &reference.host("ce_loss", None)?.0);
    let names = gpt.params.order.clone();
    let vars: Vec<_> = names.iter().map(|n| gp.get(n)).collect::<Result<_>>()?;
    check_gradients(tally, reference, "grad.transformer.", &names, tape.grad(&ce, &vars)?)?;
    // Greedy decoding from the start token, recomputing the whole prefix each step.
    let gi = gpt.params.vars(&inf);
    let mut seqs = c.clone();
    for _ in 0..h * w {
        let lg = gpt.forward(&inf, &gi, &seqs)?.value.to_vec()?;
        let tl = seqs[0].len();
        for (i, s) in seqs.iter_mut().enumerate() {
            let row = &lg[(i * tl + tl - 1) * v..(i * tl + tl) * v];
            let best = row.iter().enumerate().fold(0, |bi, (j, &x)| if x > row[bi] { j } else { bi });
            s.push(best as u32);
        }
    }
    let greedy: Vec<Vec<u32>> = seqs.iter().map(|s| s[c_len..].to_vec()).collect();
    tally.exact("greedy_indices", &greedy.concat(), &reference.indices("greedy_indices")?.0);
    // The same decoding with the KV cache must give the same tokens.
    let mut dec = KvDecoder::new(&gpt, b)?;
    let mut cached: Vec<Vec<u32>> = vec![Vec::new(); b];
    for k in 0..c_len - 1 {
        dec.step(&c.iter().map(|r| r[k]).collect::<Vec<_>>())?;
    }
    let mut next: Vec<u32> = c.iter().map(|r| r[c_len - 1]).collect();
    for _ in 0..h * w {
        let lg = dec.step(&next)?;
        next = (0..b).map(|i| argmax(&lg[i * v..(i + 1) * v])).collect();
        for (row, &t) in cached.iter_mut().zip(&next) {
            row.push(t);
        }
    }
    tally.exact("greedy_indices (KV cache)", &cached.concat(), &reference.indices("greedy_indices")?.0);
    let raster: Vec<Vec<u32>> = greedy.iter().map(|r| permuter.undo(r)).collect::<Result<_>>()?;
    let image = vq.decode_indices(&inf, &vp, &raster, h, w)?;
    tally.forward("greedy_image", &image.value.to_vec()?, &reference.host("greedy_image", None)?.0);
    let mut done: Vec<String> = [
        "image",
        "z_indices",
        "c_indices",
        "logits",
        "ce_loss",
        "greedy_indices",
        "greedy_image",
        "cond_image",
        "cond_labels",
        "class_label",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    done.extend(names.iter().map(|n| format!("grad.transformer.{n}")));
    skip_unchecked(tally, reference, &done);
    Ok(())
}

/// Compare `prefix<name>` of the reference with each gradient (tolerance floor:
/// 1e-6 of the largest reference gradient of the group).
/// Label ids [B, H, W] of the reference made one-hot of `n` labels on the GPU, against the
/// reference's own one-hot tensor (`want`, named `what`).
fn check_one_hot(
    gpu: &Arc<Gpu>,
    reference: &ModelFile,
    ids_name: &str,
    what: &str,
    n: usize,
    want: &[f32],
    tally: &mut Tally,
) -> Result<()> {
    let (ids, s) = reference.indices(ids_name)?;
    let onehot = crate::engine::kernels::quantize::one_hot(&ids, s[0], s[1], s[2], n, gpu)?;
    tally.forward(&format!("{what} (one-hot of {ids_name})"), &onehot.to_vec()?, want);
    Ok(())
}

/// Every reference tensor not in `done`, reported as skipped.
fn skip_unchecked(tally: &mut Tally, reference: &ModelFile, done: &[String]) {
    let mut rest: Vec<String> = reference.names().into_iter().filter(|n| !done.contains(n)).collect();
    rest.sort();
    tally.skip(&rest, "no check for these tensors");
}

fn check_gradients(
    tally: &mut Tally,
    reference: &ModelFile,
    prefix: &str,
    names: &[String],
    grads: Vec<Option<Tensor>>,
) -> Result<()> {
    let mut pairs = Vec::new();
    let mut missing = 0;
    for (n, g) in names.iter().zip(grads) {
        let key = format!("{prefix}{n}");
        if !reference.has(&key) {
            missing += 1;
            continue;
        }
        match g {
            Some(g) => pairs.push((key.clone(), g.to_vec()?, reference.host(&key, None)?.0)),
            None => bail!("no gradient reached {n}"),
        }
    }
    if missing > 0 {
        println!("note: the reference has no {prefix}* for {missing} parameters");
    }
    let largest = pairs.iter().flat_map(|(_, _, w)| w.iter()).fold(0f32, |m, v| m.max(v.abs()));
    for (key, got, want) in pairs {
        tally.gradient(&key, &got, &want, 1e-6 * largest);
    }
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
        if d.is_file() {
            // `taming verify fixtures/*` also expands to files such as a README.
            println!("(skipping {}: not a directory)", d.display());
            continue;
        }
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
