//! `train-vqgan` end to end on a tiny model and a folder of generated
//! images: checkpoints that other commands load, the log, an exact resume,
//! the NaN stop, and clear errors for bad data and configs.

mod common;
use common::gpu;

use std::path::{Path, PathBuf};

use taming::models::weights::ModelFile;
use taming::workflows::autoencode::{reconstruct, ImageOptions};
use taming::workflows::train_vqgan::{train, TrainOptions};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taming-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Ten 20x24 images (RGBA, some transparent pixels) of coloured shapes in nested folders.
fn image_folder(dir: &Path) -> PathBuf {
    let data = dir.join("images");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    for i in 0..10u32 {
        let img = image::RgbaImage::from_fn(24, 20, |x, y| {
            let inside = (x as i32 - 12).abs() + (y as i32 - 10).abs() < 3 + i as i32;
            if inside {
                image::Rgba([(40 * i) as u8, 200 - (15 * i) as u8, (x * 10) as u8, 255])
            } else {
                image::Rgba([0, 0, 0, (y * 12) as u8])
            }
        });
        let folder = if i % 2 == 0 { data.clone() } else { data.join("sub") };
        img.save(folder.join(format!("img{i}.png"))).unwrap();
    }
    data
}

const CONFIG: &str = r#"
model:
  base_learning_rate: 1.0e-4
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 16
    ddconfig: {double_z: false, z_channels: 8, resolution: 16, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 2, disc_ndf: 8, disc_num_layers: 1, disc_weight: 0.8, disc_loss: LOSS}
data:
  params: {batch_size: 2}
train: {steps: 4, size: 16, resize: 16, save_every: 2, log_every: 1, val_images: 2, workers: 2}
"#;

fn config(dir: &Path, loss: &str) -> PathBuf {
    let p = dir.join("config.yaml");
    std::fs::write(&p, CONFIG.replace("LOSS", loss)).unwrap();
    p
}

fn opts(data: &Path, config: &Path, out: &Path) -> TrainOptions {
    TrainOptions { data: data.into(), config: Some(config.into()), out: out.into(), quiet: true, ..Default::default() }
}

fn state(run: &Path) -> Vec<(String, Vec<f32>)> {
    let f = ModelFile::open_tensors(&run.join("train_state.safetensors")).unwrap();
    let mut names = f.names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = f.host(&n, None).unwrap().0;
            (n, v)
        })
        .collect()
}

#[test]
fn train_vqgan_checkpoints_logs_and_resumes_exactly() {
    let dir = tmp("resume");
    let data = image_folder(&dir);
    let cfg = config(&dir, "hinge");
    // Four steps in one go; the discriminator joins at step 2.
    let full = dir.join("full");
    let s = train(&gpu(), &opts(&data, &cfg, &full)).unwrap();
    assert_eq!(s.steps_done, 4);
    for f in [
        "model.safetensors",
        "train_state.safetensors",
        "log.jsonl",
        "config.json",
        "recon_000000.png",
        "recon_000004.png",
    ] {
        assert!(full.join(f).exists(), "{f} missing");
    }
    let log: Vec<serde_json::Value> = std::fs::read_to_string(full.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&serde_json::Value> = log.iter().filter(|l| l.get("ae_loss").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for l in &steps {
        assert!(l["ae_loss"].as_f64().unwrap().is_finite() && l["codes_used"].as_u64().unwrap() >= 1);
        assert!(l["perplexity"].as_f64().unwrap() >= 1.0);
    }
    assert_eq!(steps[1]["disc_factor"].as_f64(), Some(0.0));
    assert_eq!(steps[2]["disc_factor"].as_f64(), Some(1.0));
    assert!(steps[3]["d_loss"].as_f64().unwrap() > 0.0, "the discriminator trains after disc_start: {}", steps[3]);
    assert!(log.iter().filter(|l| l.get("val_psnr").is_some()).count() == 3);
    // The checkpoint is a model file the other commands load.
    let model = ModelFile::open(&full.join("model.safetensors")).unwrap();
    assert!(model.has("loss.discriminator.main.0.weight") && model.has("loss.discriminator.main.3.running_mean"));
    let img = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_file()).unwrap();
    let psnr = reconstruct(
        &gpu(),
        &full.join("model.safetensors"),
        &[img],
        &dir.join("rec"),
        &ImageOptions { size: Some(16), batch: 1 },
    )
    .unwrap();
    assert!(psnr[0].is_finite());

    // Two steps, then a resume to four: the same parameters and moments, bit for bit.
    let part = dir.join("part");
    train(&gpu(), &TrainOptions { steps: Some(2), ..opts(&data, &cfg, &part) }).unwrap();
    assert!(train(&gpu(), &opts(&data, &cfg, &part)).unwrap_err().to_string().contains("--resume"));
    let r = train(&gpu(), &TrainOptions { resume: true, config: None, steps: Some(4), ..opts(&data, &cfg, &part) })
        .unwrap();
    assert_eq!(r.steps_done, 2);
    let (a, b) = (state(&full), state(&part));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    let lines = std::fs::read_to_string(part.join("log.jsonl")).unwrap().lines().count();
    assert_eq!(lines, log.len(), "the resumed log has the same entries");
}

#[test]
fn train_vqgan_vanilla_loss_and_nan_stop() {
    let dir = tmp("nan");
    let data = image_folder(&dir);
    let cfg = config(&dir, "vanilla");
    let run = dir.join("run");
    // A learning rate so large that the weights overflow: the run must stop with a clear message.
    let o = TrainOptions { base_lr: Some(1e36), save_every: Some(1), steps: Some(6), ..opts(&data, &cfg, &run) };
    let err = train(&gpu(), &o).unwrap_err().to_string();
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    assert!(err.contains("last good checkpoint") || err.contains("not saved"), "{err}");
    // Whatever was saved is a complete model file.
    if run.join("model.safetensors").exists() {
        ModelFile::open(&run.join("model.safetensors")).unwrap();
    }
    // The vanilla GAN loss trains.
    let ok = dir.join("ok");
    train(&gpu(), &TrainOptions { steps: Some(3), ..opts(&data, &cfg, &ok) }).unwrap();
}

#[test]
fn train_vqgan_bad_input_is_named() {
    let dir = tmp("bad");
    let data = image_folder(&dir);
    let cfg = config(&dir, "hinge");
    std::fs::write(data.join("broken.png"), b"not a png").unwrap();
    let err = format!("{:#}", train(&gpu(), &opts(&data, &cfg, &dir.join("a"))).unwrap_err());
    assert!(err.contains("broken.png"), "{err}");
    std::fs::remove_file(data.join("broken.png")).unwrap();

    let err = format!(
        "{:#}",
        train(&gpu(), &TrainOptions { size: Some(15), ..opts(&data, &cfg, &dir.join("b")) }).unwrap_err()
    );
    assert!(err.contains("multiple of the downsampling factor"), "{err}");
    let err = format!("{:#}", train(&gpu(), &opts(&dir.join("nowhere"), &cfg, &dir.join("c"))).unwrap_err());
    assert!(err.contains("nowhere"), "{err}");
    std::fs::write(dir.join("bad.yaml"), "model: [unclosed").unwrap();
    let err = format!("{:#}", train(&gpu(), &opts(&data, &dir.join("bad.yaml"), &dir.join("d"))).unwrap_err());
    assert!(err.contains("bad.yaml"), "{err}");
    let lp = dir.join("lpips.safetensors");
    std::fs::write(&lp, b"junk").unwrap();
    let err = format!(
        "{:#}",
        train(&gpu(), &TrainOptions { lpips: Some(lp), ..opts(&data, &cfg, &dir.join("e")) }).unwrap_err()
    );
    assert!(err.contains("lpips.safetensors"), "{err}");
}

const GPT_CONFIG: &str = r#"
model:
  base_learning_rate: 1.0e-4
  params:
    pkeep: 0.9
    transformer_config:
      params: {n_layer: 1, n_head: 2, n_embd: 32}
train: {steps: 4, batch_size: 3, save_every: 2, log_every: 1, val_images: 2, lr_schedule: cosine, warmup_steps: 2, grad_clip: 1.0}
"#;

#[test]
fn train_transformer_class_conditional_resumes_exactly_and_samples() {
    use taming::workflows::sample::{sample, SampleOptions};
    use taming::workflows::train_transformer::{train as train_gpt, TransformerOptions};
    let dir = tmp("gpt");
    let data = image_folder(&dir);
    // A first stage to tokenize with: one step of train-vqgan is enough to have a model file.
    let vq_run = dir.join("vq");
    train(&gpu(), &TrainOptions { steps: Some(1), ..opts(&data, &config(&dir, "hinge"), &vq_run) }).unwrap();
    let vqgan = vq_run.join("model.safetensors");
    // Labels: two classes, paths relative to --data, one quoted field.
    let mut csv = String::from("file,category,name\n");
    for i in 0..10 {
        let f = if i % 2 == 0 { format!("img{i}.png") } else { format!("sub/img{i}.png") };
        csv.push_str(&format!("{f},{},\"shape, {i}\"\n", if i < 5 { "round" } else { "square" }));
    }
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, csv).unwrap();
    let cfg = dir.join("gpt.yaml");
    // With minGPT's dropout on: its masks come from (seed, step), so the resume below is exact.
    let dropout = "n_embd: 32, embd_pdrop: 0.1, resid_pdrop: 0.1, attn_pdrop: 0.1}";
    std::fs::write(&cfg, GPT_CONFIG.replace("n_embd: 32}", dropout)).unwrap();
    let o = |out: &Path| TransformerOptions {
        vqgan: Some(vqgan.clone()),
        data: data.clone(),
        labels: Some(labels.clone()),
        config: Some(cfg.clone()),
        out: out.into(),
        quiet: true,
        ..Default::default()
    };
    let full = dir.join("full");
    let s = train_gpt(&gpu(), &o(&full)).unwrap();
    assert_eq!(s.steps_done, 4);
    assert!(s.val_bits_per_token.unwrap().is_finite());
    for f in ["model.safetensors", "train_state.safetensors", "codes.safetensors", "log.jsonl", "samples_000004.png"] {
        assert!(full.join(f).exists(), "{f} missing");
    }
    let log: Vec<serde_json::Value> = std::fs::read_to_string(full.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lrs: Vec<f64> = log.iter().filter_map(|l| l["lr"].as_f64()).collect();
    assert_eq!(lrs.len(), 4);
    assert!(lrs[0] < lrs[1] && lrs[3] < lrs[1], "warm-up then cosine decay: {lrs:?}");
    // Resume: two steps, then two more, equal to the four-step run bit for bit (the token cache is reused).
    let part = dir.join("part");
    train_gpt(&gpu(), &TransformerOptions { steps: Some(2), ..o(&part) }).unwrap();
    std::fs::copy(full.join("codes.safetensors"), part.join("codes.safetensors")).unwrap();
    train_gpt(&gpu(), &TransformerOptions { resume: true, steps: Some(4), vqgan: None, config: None, ..o(&part) })
        .unwrap();
    let (a, b) = (state(&full), state(&part));
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    // The checkpoint samples by class name or index; bad classes are named.
    let model = full.join("model.safetensors");
    let so = SampleOptions { n: 2, top_k: 5, seed: 1, class: Some("squ".into()), batch: 2, ..Default::default() };
    sample(&gpu(), Some(&model), &dir.join("s.png"), &so).unwrap();
    sample(&gpu(), Some(&model), &dir.join("s1.png"), &SampleOptions { class: Some("0".into()), ..so.clone() })
        .unwrap();
    let e = sample(&gpu(), Some(&model), &dir.join("s2.png"), &SampleOptions { class: Some("7".into()), ..so.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 classes"), "{e}");
    // Guidance needs a model trained with condition dropout.
    let e = sample(&gpu(), Some(&model), &dir.join("g.png"), &SampleOptions { cfg_scale: Some(2.0), ..so.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("cond_dropout_prob"), "{e}");
    // Without --class: a row per class.
    sample(&gpu(), Some(&model), &dir.join("s3.png"), &SampleOptions { class: None, n: 3, ..so.clone() }).unwrap();
    let rows = image::open(dir.join("s3.png")).unwrap();
    assert_eq!((rows.width(), rows.height()), (3 * 16 + 2 * 2, 2 * 16 + 2));
    // Sliding window: 16x20 px = 8x10 codes from a model trained on 8x8 codes.
    let wide = SampleOptions { n: 1, size: Some((16, 20)), ..so.clone() };
    sample(&gpu(), Some(&model), &dir.join("wide.png"), &wide).unwrap();
    assert_eq!(image::open(dir.join("wide.png")).unwrap().width(), 20);
    // f16 export loads and samples the same way.
    taming::workflows::train_transformer::export_half(&model, &dir.join("half.safetensors")).unwrap();
    assert!(
        std::fs::metadata(dir.join("half.safetensors")).unwrap().len()
            < std::fs::metadata(&model).unwrap().len() * 6 / 10
    );
    sample(&gpu(), Some(&dir.join("half.safetensors")), &dir.join("h.png"), &so).unwrap();
    // Bad labels are named.
    std::fs::write(&labels, "file,category\nmissing.png,round\n").unwrap();
    let e = format!("{:#}", train_gpt(&gpu(), &o(&dir.join("bad"))).unwrap_err());
    assert!(e.contains("missing.png"), "{e}");
}

/// Our codebook options and classifier-free guidance end to end: a VQGAN with the l2-normalised
/// 4-dimensional lookup and dead-code restarts trains, saves and reconstructs; a transformer with
/// condition dropout over its codes has the null token in its vocabulary and samples with
/// guidance; guidance at scale 0 is exactly the null-conditioned model.
#[test]
fn codebook_options_and_classifier_free_guidance() {
    use taming::models::cond_transformer::Net2NetConfig;
    use taming::models::gpt::Gpt;
    use taming::workflows::sample::{generate, no_progress, sample, Guidance, Pick, Rng, SampleOptions};
    use taming::workflows::train_transformer::{train as train_gpt, TransformerOptions};
    let dir = tmp("cfg");
    let data = image_folder(&dir);
    let vq_cfg = dir.join("vq.yaml");
    let options = "n_embed: 64\n    codebook_l2_norm: true\n    codebook_embed_dim: 4\n";
    let text = CONFIG
        .replace("n_embed: 16\n", options)
        .replace("workers: 2}", "workers: 2, dead_code_steps: 1, entropy_loss_weight: 0.1}");
    std::fs::write(&vq_cfg, text.replace("LOSS", "hinge")).unwrap();
    let vq_run = dir.join("vq");
    train(&gpu(), &TrainOptions { steps: Some(3), ..opts(&data, &vq_cfg, &vq_run) }).unwrap();
    let log = std::fs::read_to_string(vq_run.join("log.jsonl")).unwrap();
    let restarted: u64 = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["codes_restarted"].as_u64())
        .sum();
    assert!(restarted > 0, "64 codes, 128 positions a step: some codes must go unused and restart\n{log}");
    let entropy: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["entropy_loss"].as_f64())
        .collect();
    assert!(entropy.len() == 3 && entropy.iter().all(|e| e.is_finite() && *e != 0.0), "{entropy:?}");
    let vqgan = vq_run.join("model.safetensors");
    let file = ModelFile::open(&vqgan).unwrap();
    assert_eq!(file.host("quantize.proj_in.weight", None).unwrap().1, vec![4, 8]);
    assert_eq!(file.host("quantize.embedding.weight", None).unwrap().1, vec![64, 4]);
    let psnr = reconstruct(
        &gpu(),
        &vqgan,
        &[data.join("img0.png")],
        &dir.join("rec"),
        &ImageOptions { size: Some(16), batch: 1 },
    );
    assert!(psnr.unwrap()[0].is_finite());

    let mut csv = String::from("file,category\n");
    for i in 0..10 {
        let f = if i % 2 == 0 { format!("img{i}.png") } else { format!("sub/img{i}.png") };
        csv.push_str(&format!("{f},{}\n", if i < 5 { "round" } else { "square" }));
    }
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, csv).unwrap();
    let cfg = dir.join("gpt.yaml");
    std::fs::write(&cfg, GPT_CONFIG.replace("pkeep: 0.9", "pkeep: 0.9\n    cond_dropout_prob: 0.5")).unwrap();
    let out = dir.join("gpt");
    let o = TransformerOptions {
        vqgan: Some(vqgan.clone()),
        data: data.clone(),
        labels: Some(labels),
        config: Some(cfg),
        out: out.clone(),
        quiet: true,
        steps: Some(2),
        ..Default::default()
    };
    train_gpt(&gpu(), &o).unwrap();
    let model = out.join("model.safetensors");
    let file = ModelFile::open(&model).unwrap();
    let net = Net2NetConfig::from_config(&file.config).unwrap();
    assert_eq!(net.gpt.vocab_size, 65, "64 codes and the null token");
    assert_eq!(net.null_token().unwrap(), Some(64));
    let last = std::fs::read_to_string(out.join("log.jsonl")).unwrap().lines().last().unwrap().to_string();
    let last: serde_json::Value = serde_json::from_str(&last).unwrap();
    for key in ["val_bits_per_token", "val_bits_null_condition", "val_bits_guided"] {
        assert!(last[key].as_f64().is_some_and(f64::is_finite), "{key} in {last}");
    }
    let so = SampleOptions { n: 2, top_k: 5, seed: 1, class: Some("round".into()), batch: 2, ..Default::default() };
    for scale in [None, Some(2.5)] {
        sample(&gpu(), Some(&model), &dir.join("g.png"), &SampleOptions { cfg_scale: scale, ..so.clone() }).unwrap();
        assert_eq!(image::open(dir.join("g.png")).unwrap().width(), 2 * 16 + 2);
    }
    // Scale 0 samples u alone: the null condition's tokens, draw for draw, in the KV cache
    // (8x8 codes) and in the sliding window (8x10).
    let gpt = Gpt::load(&file, &gpu(), net.gpt.clone(), "transformer.").unwrap();
    let pick = Pick { temperature: 1.0, top_k: 0, top_p: 1.0, codes: 64 };
    for w in [8, 10] {
        let run = |cond: &[Vec<u32>], g: Option<Guidance>| {
            generate(&gpt, cond, false, 8, w, 8, &[], pick, g, &mut Rng::new(3), &mut no_progress).unwrap()
        };
        let null = [64u32];
        let guided = run(&[vec![0], vec![1]], Some(Guidance { scale: 0.0, null: &null }));
        assert_eq!(guided, run(&[vec![64], vec![64]], None), "width {w}");
    }
    // score-samples: a classifier on the same labels scores the model's samples per scale.
    use taming::workflows::classify::{score_samples, train_classifier, ClassifierOptions, ScoreOptions};
    let clf = dir.join("clf.safetensors");
    let co = ClassifierOptions {
        data: data.clone(),
        labels: dir.join("labels.csv"),
        out: clf.clone(),
        steps: 3,
        batch: 4,
        quiet: true,
        ..Default::default()
    };
    train_classifier(&gpu(), &co).unwrap();
    let so = ScoreOptions {
        n: 2,
        cfg_scales: vec![1.0, 2.0],
        temperature: 1.0,
        top_k: 5,
        seed: 0,
        grid: Some(dir.join("q.png")),
    };
    let scores = score_samples(&gpu(), &clf, &model, &so).unwrap();
    assert_eq!(scores.len(), 2);
    for s in &scores {
        assert_eq!(s.per_class.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["round", "square"]);
        let mean = s.per_class.iter().map(|(_, a)| a).sum::<f64>() / 2.0;
        assert!((mean - s.accuracy).abs() < 1e-9, "equal classes: the mean of the per-class shares");
    }
    assert!(dir.join("q_cfg2.png").exists() && dir.join("q_cfg1.png").exists());
    // A model file is not a classifier.
    let e = score_samples(&gpu(), &model, &model, &so).unwrap_err().to_string();
    assert!(e.contains("not a classifier"), "{e}");
}

/// The classifier learns an easy labelling (red vs blue squares at random places) to 100% on
/// its held-out images, and `classify` agrees with the labels.
#[test]
fn the_sample_classifier_learns_colours() {
    use taming::workflows::classify::{classify, load_classifier, train_classifier, ClassifierOptions};
    let dir = tmp("clf");
    let data = dir.join("img");
    std::fs::create_dir_all(&data).unwrap();
    let mut csv = String::from("file,category\n");
    let mut imgs = Vec::new();
    for i in 0..40u32 {
        let red = i % 2 == 0;
        let (x0, y0) = ((i * 7) % 20, (i * 11) % 20);
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let inside = x >= x0 && x < x0 + 12 && y >= y0 && y < y0 + 12;
            match (inside, red) {
                (true, true) => image::Rgb([220, 30, 40]),
                (true, false) => image::Rgb([30, 40, 220]),
                _ => image::Rgb([128, 128, 128]),
            }
        });
        img.save(data.join(format!("{i}.png"))).unwrap();
        csv.push_str(&format!("{i}.png,{}\n", if red { "red" } else { "blue" }));
        imgs.push((img, red));
    }
    std::fs::write(dir.join("labels.csv"), csv).unwrap();
    let out = dir.join("clf.safetensors");
    let o = ClassifierOptions {
        data: data.clone(),
        labels: dir.join("labels.csv"),
        out: out.clone(),
        steps: 60,
        batch: 16,
        quiet: true,
        ..Default::default()
    };
    let s = train_classifier(&gpu(), &o).unwrap();
    assert_eq!((s.val_images, s.val_accuracy), (4, 100.0));
    let (clf, names) = load_classifier(&gpu(), &out).unwrap();
    assert_eq!(names, ["blue", "red"]);
    let got = classify(&gpu(), &clf, &imgs.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>()).unwrap();
    let right = got.iter().zip(&imgs).filter(|(g, (_, red))| **g == *red as u32).count();
    assert!(right >= 38, "{right} of 40 classified right");
    // Bad input is named.
    std::fs::write(dir.join("labels.csv"), "file,category\n0.png,red\n").unwrap();
    let e = train_classifier(&gpu(), &o).unwrap_err().to_string();
    assert!(e.contains("at least 2 classes"), "{e}");
}

#[test]
fn train_transformer_on_condition_images_and_sample_with_one() {
    use taming::workflows::sample::{sample, SampleOptions};
    use taming::workflows::train_transformer::{train as train_gpt, TransformerOptions};
    let dir = tmp("spatial");
    let data = image_folder(&dir);
    // Condition images: grey versions of the images, same relative paths.
    let cond = dir.join("cond");
    for p in taming::workflows::data::list_images(&data).unwrap() {
        let rel = p.strip_prefix(&data).unwrap();
        std::fs::create_dir_all(cond.join(rel).parent().unwrap()).unwrap();
        image::open(&p).unwrap().grayscale().to_rgb8().save(cond.join(rel)).unwrap();
    }
    let vq_run = dir.join("vq");
    train(&gpu(), &TrainOptions { steps: Some(1), ..opts(&data, &config(&dir, "hinge"), &vq_run) }).unwrap();
    let vqgan = vq_run.join("model.safetensors");
    let cfg = dir.join("gpt.yaml");
    // With condition dropout: the samples below (training size and sliding window) use guidance
    // against a grid of null tokens by default.
    let text =
        GPT_CONFIG.replace("steps: 4", "steps: 2").replace("pkeep: 0.9", "pkeep: 0.9\n    cond_dropout_prob: 0.3");
    std::fs::write(&cfg, text).unwrap();
    let o = TransformerOptions {
        vqgan: Some(vqgan.clone()),
        data: data.clone(),
        cond_data: Some(cond.clone()),
        cond_vqgan: Some(vqgan.clone()),
        config: Some(cfg.clone()),
        out: dir.join("run"),
        quiet: true,
        ..Default::default()
    };
    let s = train_gpt(&gpu(), &o).unwrap();
    assert_eq!(s.steps_done, 2);
    let model = dir.join("run/model.safetensors");
    let file = taming::models::weights::ModelFile::open(&model).unwrap();
    assert!(file.has("cond_stage_model.quantize.embedding.weight"));
    // The block holds 64 condition codes + 63 image codes.
    assert_eq!(file.config.pointer("/params/transformer_config/params/block_size").unwrap().as_u64(), Some(64 + 63));
    // 16 codes shared by the image and the condition, and the null token.
    assert_eq!(file.config.pointer("/params/transformer_config/params/vocab_size").unwrap().as_u64(), Some(17));
    let cond_img = taming::workflows::data::list_images(&cond).unwrap()[0].clone();
    let so = SampleOptions { n: 2, top_k: 5, seed: 1, batch: 2, cond: Some(cond_img.clone()), ..Default::default() };
    sample(&gpu(), Some(&model), &dir.join("a.png"), &so).unwrap();
    // Larger than the window: the condition's window moves with the sampled code.
    sample(&gpu(), Some(&model), &dir.join("b.png"), &SampleOptions { n: 1, size: Some((20, 16)), ..so.clone() })
        .unwrap();
    assert_eq!(image::open(dir.join("b.png")).unwrap().height(), 20);
    sample(&gpu(), Some(&model), &dir.join("b1.png"), &SampleOptions { cfg_scale: Some(1.0), ..so.clone() }).unwrap();
    let e = sample(&gpu(), Some(&model), &dir.join("c.png"), &SampleOptions { cond: None, ..so.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("--cond"), "{e}");
    // A folder of conditions: one grid per condition image, per-image PNGs under their names.
    let grids = dir.join("grids");
    let each = dir.join("each");
    sample(
        &gpu(),
        Some(&model),
        &grids,
        &SampleOptions { cond: Some(cond.clone()), per_image: Some(each.clone()), ..so.clone() },
    )
    .unwrap();
    let conds = taming::workflows::data::list_images(&cond).unwrap();
    for c in &conds {
        let stem = c.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(grids.join(format!("{stem}.png")).exists(), "no grid for {stem}");
        assert!(each.join(&stem).join("000001.png").exists(), "no per-image samples for {stem}");
    }
    let e = sample(
        &gpu(),
        Some(&model),
        &grids,
        &SampleOptions { cond: Some(cond.clone()), npz: Some(dir.join("x.npz")), ..so.clone() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--npz"), "{e}");
    // A missing condition image is named.
    std::fs::remove_file(cond.join("img0.png")).unwrap();
    let e = format!("{:#}", train_gpt(&gpu(), &TransformerOptions { out: dir.join("run2"), ..o.clone() }).unwrap_err());
    assert!(e.contains("img0"), "{e}");
}

/// A transformer that reads its codes in another order (the reference's
/// permuter_config): trained on permuted codes, saved with its permuter,
/// sampled in that order and unpermuted before decoding; the sliding window
/// (raster order only) is refused by name.
#[test]
fn train_transformer_with_a_permuter_trains_and_samples() {
    use taming::workflows::sample::{sample, SampleOptions};
    use taming::workflows::train_transformer::{train as train_gpt, TransformerOptions};
    let dir = tmp("permuter");
    let data = image_folder(&dir);
    let vq_run = dir.join("vq");
    train(&gpu(), &TrainOptions { steps: Some(1), ..opts(&data, &config(&dir, "hinge"), &vq_run) }).unwrap();
    let cfg = dir.join("gpt.yaml");
    std::fs::write(
        &cfg,
        GPT_CONFIG.replace(
            "    pkeep: 0.9\n",
            "    pkeep: 0.9\n    permuter_config: {target: taming.modules.transformer.permuter.Subsample, params: {H: 8, W: 8}}\n",
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let o = TransformerOptions {
        vqgan: Some(vq_run.join("model.safetensors")),
        data: data.clone(),
        config: Some(cfg.clone()),
        out: run.clone(),
        steps: Some(2),
        quiet: true,
        ..Default::default()
    };
    let s = train_gpt(&gpu(), &o).unwrap();
    assert!(s.val_bits_per_token.unwrap().is_finite());
    let model = run.join("model.safetensors");
    let file = ModelFile::open(&model).unwrap();
    assert_eq!(
        file.config.pointer("/params/permuter_config/target").and_then(|t| t.as_str()),
        Some("taming.modules.transformer.permuter.Subsample")
    );
    let so = SampleOptions { n: 2, top_k: 5, seed: 1, batch: 2, ..Default::default() };
    sample(&gpu(), Some(&model), &dir.join("s.png"), &so).unwrap();
    let e = sample(&gpu(), Some(&model), &dir.join("w.png"), &SampleOptions { size: Some((16, 20)), ..so.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("Subsample"), "{e}");
    // A permuter for another grid is an error naming both.
    std::fs::write(&cfg, GPT_CONFIG.replace("    pkeep: 0.9\n", "    pkeep: 0.9\n    permuter_config: {target: taming.modules.transformer.permuter.ZCurve, params: {H: 16, W: 16}}\n")).unwrap();
    let e = format!("{:#}", train_gpt(&gpu(), &TransformerOptions { out: dir.join("run2"), ..o.clone() }).unwrap_err());
    assert!(e.contains("8x8"), "{e}");
}

/// CONFIG as a VQSegmentationModel of 5 labels trained with BCELossWithQuant.
fn segmentation_config() -> String {
    CONFIG
        .replace("target: taming.models.vqgan.VQModel", "target: taming.models.vqgan.VQSegmentationModel")
        .replace("    embed_dim: 8\n", "    embed_dim: 8\n    n_labels: 5\n")
        .replace("in_channels: 3, out_ch: 3", "in_channels: 5, out_ch: 5")
        .replace(
            "target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "target: taming.modules.losses.segmentation.BCELossWithQuant",
        )
        .replace(
            "params: {disc_start: 2, disc_ndf: 8, disc_num_layers: 1, disc_weight: 0.8, disc_loss: LOSS}",
            "params: {codebook_weight: 1.0}",
        )
}

/// Ten 20x24 label maps of 5 labels (single-channel PNGs, pixel = class id): a diamond of
/// label 1 + (i mod 4) on label 0.
fn label_folder(dir: &Path) -> PathBuf {
    let data = dir.join("labels");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..10u32 {
        let img = image::GrayImage::from_fn(24, 20, |x, y| {
            let inside = (x as i32 - 12).abs() + (y as i32 - 10).abs() < 3 + i as i32;
            image::Luma([if inside { 1 + (i % 4) as u8 } else { 0 }])
        });
        img.save(data.join(format!("map{i}.png"))).unwrap();
    }
    data
}

/// A segmentation VQGAN (VQSegmentationModel + BCELossWithQuant) and a one-channel VQGAN train on
/// label maps and grey maps: finite losses, the right validation score, model files that
/// reconstruct (a label accuracy, a PSNR), the segmentation model without a discriminator but
/// with its `colorize`, and a resume.
#[test]
fn segmentation_and_one_channel_vqgans_train() {
    let dir = tmp("kinds");
    let labels = label_folder(&dir);
    let seg = segmentation_config();
    let cfg = dir.join("seg.yaml");
    std::fs::write(&cfg, &seg).unwrap();
    let run = dir.join("seg");
    let s = train(&gpu(), &TrainOptions { steps: Some(2), ..opts(&labels, &cfg, &run) }).unwrap();
    assert!(s.val_psnr.is_none());
    let acc = s.val_label_accuracy.expect("a label accuracy");
    assert!((0.0..=100.0).contains(&acc), "{acc}");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    assert!(log.contains("val_label_accuracy") && !log.contains("val_psnr"), "{log}");
    let model = ModelFile::open(&run.join("model.safetensors")).unwrap();
    assert!(!model.has("loss.discriminator.main.0.weight") && model.has("colorize"));
    let map = labels.join("map3.png");
    let scores = reconstruct(
        &gpu(),
        &run.join("model.safetensors"),
        &[map],
        &dir.join("rec"),
        &ImageOptions { size: Some(16), batch: 1 },
    )
    .unwrap();
    assert!((0.0..=100.0).contains(&scores[0]));
    train(&gpu(), &TrainOptions { steps: Some(3), resume: true, ..opts(&labels, &cfg, &run) }).unwrap();

    // One channel: the same shapes as grey PNGs, GAN objective with a one-channel discriminator.
    let grey = dir.join("grey");
    std::fs::create_dir_all(&grey).unwrap();
    for e in std::fs::read_dir(&labels).unwrap() {
        let p = e.unwrap().path();
        let g = image::open(&p).unwrap().to_luma8();
        image::GrayImage::from_fn(24, 20, |x, y| image::Luma([g.get_pixel(x, y)[0] * 60]))
            .save(grey.join(p.file_name().unwrap()))
            .unwrap();
    }
    let one = CONFIG.replace("LOSS", "hinge").replace("in_channels: 3, out_ch: 3", "in_channels: 1, out_ch: 1");
    let cfg = dir.join("one.yaml");
    std::fs::write(&cfg, one.replace("disc_loss: hinge", "disc_loss: hinge, disc_in_channels: 1")).unwrap();
    let s = train(&gpu(), &TrainOptions { steps: Some(3), ..opts(&grey, &cfg, &dir.join("one")) }).unwrap();
    assert!(s.val_psnr.is_some_and(|p| p.is_finite()));
    // A discriminator that does not read the model's channels is an error naming the key.
    std::fs::write(&cfg, &one).unwrap();
    let e = train(&gpu(), &opts(&grey, &cfg, &dir.join("bad"))).unwrap_err().to_string();
    assert!(e.contains("disc_in_channels"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Transformers conditioned on label maps (a segmentation VQGAN's codes) and on coordinates
/// (CoordStage): trained from label-map PNGs beside the images, sampled from one label map and
/// from a folder of them; the coordinate model needs no condition files and refuses --cond.
#[test]
fn train_transformers_on_label_maps_and_coordinates_and_sample() {
    use taming::workflows::sample::{sample, SampleOptions};
    use taming::workflows::train_transformer::{train as train_gpt, TransformerOptions};
    let dir = tmp("labelcond");
    let data = image_folder(&dir);
    // Label maps with the images' relative paths: 5 labels from the images' grey levels.
    let cond = dir.join("cond");
    for p in taming::workflows::data::list_images(&data).unwrap() {
        let rel = p.strip_prefix(&data).unwrap();
        std::fs::create_dir_all(cond.join(rel).parent().unwrap()).unwrap();
        let g = image::open(&p).unwrap().to_luma8();
        image::GrayImage::from_fn(g.width(), g.height(), |x, y| image::Luma([g.get_pixel(x, y)[0] / 52]))
            .save(cond.join(rel))
            .unwrap();
    }
    let vq_run = dir.join("vq");
    train(&gpu(), &TrainOptions { steps: Some(1), ..opts(&data, &config(&dir, "hinge"), &vq_run) }).unwrap();
    let seg = segmentation_config();
    std::fs::write(dir.join("seg.yaml"), seg).unwrap();
    let seg_run = dir.join("segvq");
    train(&gpu(), &TrainOptions { steps: Some(1), ..opts(&cond, &dir.join("seg.yaml"), &seg_run) }).unwrap();
    let cfg = dir.join("gpt.yaml");
    std::fs::write(&cfg, GPT_CONFIG.replace("steps: 4", "steps: 2")).unwrap();
    let o = TransformerOptions {
        vqgan: Some(vq_run.join("model.safetensors")),
        data: data.clone(),
        cond_data: Some(cond.clone()),
        cond_vqgan: Some(seg_run.join("model.safetensors")),
        config: Some(cfg.clone()),
        out: dir.join("run"),
        quiet: true,
        ..Default::default()
    };
    train_gpt(&gpu(), &o).unwrap();
    let model = dir.join("run/model.safetensors");
    let file = ModelFile::open(&model).unwrap();
    assert!(file.has("cond_stage_model.colorize") && file.has("cond_stage_model.quantize.embedding.weight"));
    assert_eq!(
        file.config.pointer("/params/cond_stage_config/target").and_then(|t| t.as_str()),
        Some("taming.models.vqgan.VQSegmentationModel")
    );
    let map = taming::workflows::data::list_images(&cond).unwrap()[0].clone();
    let so = SampleOptions { n: 2, top_k: 5, seed: 1, batch: 2, cond: Some(map.clone()), ..Default::default() };
    sample(&gpu(), Some(&model), &dir.join("a.png"), &so).unwrap();
    sample(&gpu(), Some(&model), &dir.join("grids"), &SampleOptions { cond: Some(cond.clone()), ..so.clone() })
        .unwrap();
    // A photo is not a label map: the error names the file.
    let photo = taming::workflows::data::list_images(&data).unwrap()[0].clone();
    let e = format!(
        "{:#}",
        sample(&gpu(), Some(&model), &dir.join("b.png"), &SampleOptions { cond: Some(photo.clone()), ..so.clone() })
            .unwrap_err()
    );
    assert!(e.contains(&photo.display().to_string()) && e.contains("single-channel"), "{e}");

    // Coordinates: the config's cond stage, no condition files.
    std::fs::write(
        &cfg,
        GPT_CONFIG.replace("steps: 4", "steps: 2").replace(
            "    pkeep: 0.9\n",
            "    pkeep: 0.9\n    cond_stage_config: {target: taming.modules.misc.coord.CoordStage, params: {n_embed: 16, down_factor: 2}}\n",
        ),
    )
    .unwrap();
    let o = TransformerOptions { cond_data: None, cond_vqgan: None, out: dir.join("coord"), ..o };
    let s = train_gpt(&gpu(), &o).unwrap();
    assert!(s.val_bits_per_token.unwrap().is_finite());
    let model = dir.join("coord/model.safetensors");
    let file = ModelFile::open(&model).unwrap();
    assert_eq!(file.config.pointer("/params/transformer_config/params/block_size").unwrap().as_u64(), Some(64 + 63));
    let so = SampleOptions { cond: None, ..so };
    sample(&gpu(), Some(&model), &dir.join("c.png"), &so).unwrap();
    let e = sample(&gpu(), Some(&model), &dir.join("d.png"), &SampleOptions { cond: Some(map), ..so.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("--cond"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
