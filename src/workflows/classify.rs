//! `taming train-classifier` and `taming score-samples`: an objective sample-quality figure
//! for class-conditional transformers, with no downloaded network. A small classifier
//! (`models::classifier`) learns the dataset's labels; the score is the share of samples drawn
//! for a class that it assigns to that class, per guidance scale, beside its accuracy on held-out
//! real images (the ceiling the samples are measured against).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use image::RgbImage;

use super::data::{self, Augment};
use super::images;
use super::run::progress_bar;
use super::sample::{decode_grid, generate, no_progress, Guidance, Pick};
use super::train_transformer::read_labels;
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{Gpu, Rng, Tape, Tensor};
use crate::models::classifier::{Classifier, FORMAT, SIZE};
use crate::models::cond_transformer::Conditioning;
use crate::models::weights::{write_safetensors, ModelFile};

#[derive(Clone, Debug)]
pub struct ClassifierOptions {
    pub data: PathBuf,
    pub labels: PathBuf,
    pub label_column: String,
    pub out: PathBuf,
    pub steps: u64,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    pub quiet: bool,
}

impl Default for ClassifierOptions {
    fn default() -> Self {
        ClassifierOptions {
            data: PathBuf::new(),
            labels: PathBuf::new(),
            label_column: "category".into(),
            out: PathBuf::from("classifier.safetensors"),
            steps: 1500,
            batch: 64,
            lr: 2e-3,
            seed: 0,
            quiet: false,
        }
    }
}

/// Images at the classifier's size as [B, 3, 32, 32] in [-1, 1], flipped where `flip` says.
fn batch_tensor(gpu: &Arc<Gpu>, imgs: &[&RgbImage], flip: &[bool]) -> Result<Tensor> {
    let mut data = Vec::with_capacity(imgs.len() * 3 * SIZE * SIZE);
    for (i, img) in imgs.iter().enumerate() {
        let sized;
        let img = if img.dimensions() != (SIZE as u32, SIZE as u32) {
            sized = image::imageops::resize(*img, SIZE as u32, SIZE as u32, image::imageops::FilterType::Triangle);
            &sized
        } else {
            *img
        };
        if flip.get(i).copied().unwrap_or(false) {
            images::to_chw(&image::imageops::flip_horizontal(img), &mut data);
        } else {
            images::to_chw(img, &mut data);
        }
    }
    Tensor::from_f32(gpu, &data, &[imgs.len(), 3, SIZE, SIZE])
}

/// The classes the classifier gives `imgs` (any size; resized to 32x32).
pub fn classify(gpu: &Arc<Gpu>, clf: &Classifier, imgs: &[RgbImage]) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(imgs.len());
    for chunk in imgs.chunks(64) {
        let t = Tape::inference();
        let p = clf.params.constants(&t);
        let x = t.constant(batch_tensor(gpu, &chunk.iter().collect::<Vec<_>>(), &[])?);
        let logits = clf.forward(&t, &p, &x)?.value.to_vec()?;
        out.extend(logits.chunks(clf.classes).map(crate::models::gpt::argmax));
    }
    Ok(out)
}

/// A classifier file: its weights and class names.
pub fn load_classifier(gpu: &Arc<Gpu>, path: &Path) -> Result<(Classifier, Vec<String>)> {
    let file = ModelFile::open_tensors(path)?;
    if file.metadata("format").as_deref() != Some(FORMAT) {
        bail!(
            "{}: not a classifier file (metadata format '{FORMAT}'; made by taming train-classifier)",
            path.display()
        );
    }
    let names: Vec<String> = serde_json::from_str(
        &file.metadata("class_names").ok_or_else(|| anyhow!("{}: no class_names in the metadata", path.display()))?,
    )?;
    let clf = Classifier::load(&file, gpu)?;
    if names.len() != clf.classes {
        bail!("{}: {} class names for {} outputs", path.display(), names.len(), clf.classes);
    }
    Ok((clf, names))
}

#[derive(Debug)]
pub struct ClassifierSummary {
    /// Accuracy on the held-out images (every 10th), in %.
    pub val_accuracy: f64,
    pub val_images: usize,
}

/// Train the classifier on the labelled images (every 10th held out), AdamW with cosine decay,
/// random flips; writes the file atomically.
pub fn train_classifier(gpu: &Arc<Gpu>, o: &ClassifierOptions) -> Result<ClassifierSummary> {
    let (examples, names) = read_labels(&o.labels, &o.data, &o.label_column)?;
    if names.len() < 2 {
        bail!("{}: the classifier needs at least 2 classes, the labels have {}", o.labels.display(), names.len());
    }
    if o.batch == 0 || o.steps == 0 {
        bail!("--batch and --steps must be positive");
    }
    let aug = Augment { resize: SIZE as u32, crop: SIZE as u32, random_crop: false, flip: false, nearest: false };
    let mut rng = Rng::new(o.seed);
    let say = |m: String| {
        if !o.quiet {
            eprintln!("{m}")
        }
    };
    say(format!("train-classifier: loading {} images ({} classes)", examples.len(), names.len()));
    let imgs = examples.iter().map(|e| data::load_sample(&e.path, &aug, &mut rng)).collect::<Result<Vec<_>>>()?;
    let labels: Vec<u32> = examples.iter().map(|e| e.class.expect("labelled")).collect();
    let order = rng.permutation(imgs.len());
    let val: Vec<usize> = order.iter().step_by(10).copied().collect();
    let train: Vec<usize> = order.iter().enumerate().filter(|(k, _)| k % 10 != 0).map(|(_, &i)| i).collect();
    if train.is_empty() || val.is_empty() {
        bail!("{}: too few images to hold out every 10th ({} in all)", o.labels.display(), imgs.len());
    }
    let clf = Classifier::random(gpu, names.len(), o.seed)?;
    let decays = |n: &str| n.starts_with("conv") && n.ends_with("weight") || n == "fc.weight";
    let params: Vec<(Tensor, f32)> =
        clf.params.order.iter().map(|n| (clf.params.tensors[n].clone(), if decays(n) { 0.01 } else { 0.0 })).collect();
    let mut adam = Adam::new(AdamConfig::adamw(o.lr, 0.9, 0.999), &params)?;
    let bar = progress_bar(o.steps, 0, o.quiet);
    let val_accuracy = |clf: &Classifier| -> Result<f64> {
        let got = classify(gpu, clf, &val.iter().map(|&i| imgs[i].clone()).collect::<Vec<_>>())?;
        Ok(100.0 * got.iter().zip(&val).filter(|(g, &i)| **g == labels[i]).count() as f64 / val.len() as f64)
    };
    for step in 0..o.steps {
        let pick: Vec<usize> = (0..o.batch).map(|_| train[rng.below(train.len())]).collect();
        let flips: Vec<bool> = pick.iter().map(|_| rng.next_f64() < 0.5).collect();
        let x = batch_tensor(gpu, &pick.iter().map(|&i| &imgs[i]).collect::<Vec<_>>(), &flips)?;
        let y: Vec<u32> = pick.iter().map(|&i| labels[i]).collect();
        let t = (step as f64 / o.steps as f64).min(1.0);
        adam.config.lr = (o.lr as f64 * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))) as f32;
        let tape = Tape::new();
        let p = clf.params.vars(&tape);
        let loss = tape.cross_entropy(&clf.forward(&tape, &p, &tape.constant(x))?, &y)?;
        let value = super::run::finite("the classifier loss", loss.value.to_scalar()?, step)?;
        let grads = p.gradients(&clf.params.order, &tape.backward(&loss)?)?;
        adam.update(&grads.iter().collect::<Vec<_>>())?;
        bar.set_position(step + 1);
        if (step + 1) % 100 == 0 {
            bar.set_message(format!("loss {value:.3}"));
        }
        if (step + 1) % 500 == 0 && step + 1 < o.steps {
            bar.println(format!("step {}: validation accuracy {:.1}%", step + 1, val_accuracy(&clf)?));
        }
    }
    bar.finish_and_clear();
    let acc = val_accuracy(&clf)?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("class_names".to_string(), serde_json::to_string(&names)?),
        ("val_accuracy".to_string(), format!("{acc:.2}")),
        ("steps".to_string(), o.steps.to_string()),
    ]);
    write_safetensors(&o.out, &clf.params.to_host("")?, metadata, false)?;
    say(format!(
        "validation accuracy {acc:.1}% on {} held-out images ({} classes; chance {:.1}%); wrote {}",
        val.len(),
        names.len(),
        100.0 / names.len() as f64,
        o.out.display()
    ));
    Ok(ClassifierSummary { val_accuracy: acc, val_images: val.len() })
}

#[derive(Clone, Debug)]
pub struct ScoreOptions {
    /// Samples per class.
    pub n: usize,
    /// Guidance scales to score (1: none).
    pub cfg_scales: Vec<f32>,
    pub temperature: f32,
    pub top_k: usize,
    pub seed: u64,
    /// Also a grid of the samples (a row per class) per scale: `{stem}_cfg{S}.png`.
    pub grid: Option<PathBuf>,
}

/// One guidance scale's score.
#[derive(Clone, Debug)]
pub struct Score {
    pub cfg_scale: f32,
    /// Share of all samples classified as their class, in %.
    pub accuracy: f64,
    /// Per transformer class: (name, accuracy %).
    pub per_class: Vec<(String, f64)>,
}

/// Samples `n` images per class of a class-conditional transformer at each guidance scale and
/// reports the share the classifier assigns to the class they were drawn for.
pub fn score_samples(gpu: &Arc<Gpu>, classifier: &Path, model: &Path, o: &ScoreOptions) -> Result<Vec<Score>> {
    let (clf, clf_names) = load_classifier(gpu, classifier)?;
    let sm = super::sample::SampleModel::load(gpu, model)?;
    let (cfg, names, gpt, vq) = (&sm.cfg, &sm.names, &sm.gpt, &sm.vq);
    let Conditioning::Class { n_classes } = cfg.cond else {
        bail!("{}: score-samples scores class-conditional transformers", model.display());
    };
    if names.len() != n_classes {
        bail!("{}: no class names in the metadata to match the classifier's", model.display());
    }
    // Transformer class k -> classifier output, by name.
    let to_clf: Vec<u32> = names
        .iter()
        .map(|n| {
            clf_names.iter().position(|c| c == n).map(|i| i as u32).ok_or_else(|| {
                anyhow!("class '{n}' of {} is not one of the classifier's ({})", model.display(), clf_names.join(", "))
            })
        })
        .collect::<Result<_>>()?;
    let null = cfg.null_token()?;
    if o.cfg_scales.iter().any(|&s| s != 1.0) && null.is_none() {
        bail!("{}: guidance needs a model trained with cond_dropout_prob", model.display());
    }
    let side = cfg.latent_side()?;
    let pick = Pick { temperature: o.temperature, top_k: o.top_k, top_p: 1.0, codes: vq.codes() };
    let mut out = Vec::new();
    for &scale in &o.cfg_scales {
        let mut rng = Rng::new(o.seed);
        let bar = progress_bar((n_classes * o.n) as u64, 0, false);
        bar.set_message(format!("samples at guidance scale {scale}"));
        let null_row = null.map(|t| vec![t]);
        let guidance = null_row.as_deref().filter(|_| scale != 1.0).map(|null| Guidance { scale, null });
        let mut tiles = Vec::new();
        let mut drawn_for = Vec::new();
        for k in 0..n_classes as u32 {
            for chunk in (0..o.n).collect::<Vec<_>>().chunks(16) {
                let conds = vec![vec![k]; chunk.len()];
                let codes =
                    generate(gpt, &conds, false, side, side, side, &[], pick, guidance, &mut rng, &mut no_progress)?;
                let codes: Vec<Vec<u32>> = codes.iter().map(|r| cfg.permuter.undo(r)).collect::<Result<_>>()?;
                tiles.extend(decode_grid(vq, &codes, side, side)?);
                drawn_for.extend(std::iter::repeat_n(k, chunk.len()));
                bar.inc(chunk.len() as u64);
            }
        }
        bar.finish_and_clear();
        let got = classify(gpu, &clf, &tiles)?;
        let hit = |i: usize| got[i] == to_clf[drawn_for[i] as usize];
        let accuracy = 100.0 * (0..tiles.len()).filter(|&i| hit(i)).count() as f64 / tiles.len().max(1) as f64;
        let per_class = (0..n_classes)
            .map(|k| {
                let of: Vec<usize> = (0..tiles.len()).filter(|&i| drawn_for[i] as usize == k).collect();
                (names[k].clone(), 100.0 * of.iter().filter(|&&i| hit(i)).count() as f64 / of.len().max(1) as f64)
            })
            .collect();
        if let Some(stem) = &o.grid {
            let path = stem.with_file_name(format!(
                "{}_cfg{scale}.png",
                stem.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "samples".into())
            ));
            images::save_png(&images::grid(&tiles, o.n), &path)?;
        }
        out.push(Score { cfg_scale: scale, accuracy, per_class });
    }
    Ok(out)
}
