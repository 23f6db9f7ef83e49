//! `taming reconstruct`, `taming encode`, `taming decode`: the VQGAN on
//! your images. Several images of one size run as a batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::images;
use super::maps::{self, Kind, Picture};
use crate::engine::distributed::Shard;
use crate::engine::{Gpu, Tape};
use crate::models::vqgan::{Vqgan, VqganConfig};
use crate::models::weights::ModelFile;
use anyhow::{anyhow, bail, Context, Result};

/// The first stage of a model file: an autoencoder (VQModel, GumbelVQ, VQSegmentationModel,
/// latent-diffusion VQModel), or the first_stage_model of a Net2NetTransformer.
pub fn load_vqgan(gpu: &Arc<Gpu>, path: &Path) -> Result<Vqgan> {
    vqgan_of(gpu, &ModelFile::open(path)?)
}

/// `load_vqgan` of a model file already read.
pub fn vqgan_of(gpu: &Arc<Gpu>, file: &ModelFile) -> Result<Vqgan> {
    let path = &file.path;
    let target = file.config.get("target").and_then(|t| t.as_str()).unwrap_or("");
    let (block, prefix) = match target {
        t if crate::models::vqgan::is_target(t) => (file.config.clone(), ""),
        crate::models::cond_transformer::TARGET => (
            file.config
                .pointer("/params/first_stage_config")
                .cloned()
                .ok_or_else(|| anyhow!("{}: no first_stage_config", path.display()))?,
            "first_stage_model.",
        ),
        other => bail!("{}: target '{other}' has no VQGAN", path.display()),
    };
    let config = VqganConfig::from_config(&block).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Kind::of(&config).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Vqgan::load(file, gpu, config, prefix)
}

pub struct ImageOptions {
    /// Resize the short side to this many pixels first.
    pub size: Option<u32>,
    pub batch: usize,
}

/// Decode, resize and crop every input first, so a bad file fails before any output is written.
fn prepare_all(kind: Kind, paths: &[PathBuf], f: u32, opts: &ImageOptions) -> Result<Vec<Picture>> {
    if paths.is_empty() {
        bail!("no images given");
    }
    paths.iter().map(|p| maps::load(kind, p)?.prepare(opts.size, f, p)).collect()
}

/// Batches of indices of same-sized pictures.
fn batches(pics: &[Picture], batch: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, pic) in pics.iter().enumerate() {
        match out.iter_mut().find(|b| b.len() < batch.max(1) && pics[b[0]].dimensions() == pic.dimensions()) {
            Some(b) => b.push(i),
            None => out.push(vec![i]),
        }
    }
    out
}

/// Writes `<stem>_rec.png` (input | reconstruction) per input; returns how close each came
/// (PSNR in dB, or the share of right labels for label maps).
pub fn reconstruct(
    gpu: &Arc<Gpu>,
    model: &Path,
    paths: &[PathBuf],
    out: &Path,
    opts: &ImageOptions,
) -> Result<Vec<f64>> {
    let vq = load_vqgan(gpu, model)?;
    let kind = Kind::of(&vq.config)?;
    let pics = prepare_all(kind, paths, vq.config.factor() as u32, opts)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let mut scores = vec![0.0; pics.len()];
    let mut unit = "";
    let total = pics.len();
    let mut done = 0;
    let colors = vq.colorize.as_deref();
    for b in batches(&pics, opts.batch) {
        let group: Vec<&Picture> = b.iter().map(|&i| &pics[i]).collect();
        let x = tape.constant(maps::batch_tensor(gpu, kind, &group)?);
        let recs = maps::from_output(kind, &vq.forward(&tape, &p, &x)?.decoder_out.value)?;
        for (k, &i) in b.iter().enumerate() {
            let (score, u) = maps::agreement(&pics[i], &recs[k]);
            (scores[i], unit) = (score, u);
            let stem =
                paths[i].file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("image{i}"));
            let dest = out.join(format!("{stem}_rec.png"));
            images::save_png(&images::side_by_side(&[&pics[i].to_rgb(colors), &recs[k].to_rgb(colors)]), &dest)?;
            done += 1;
            println!("[{done}/{total}] {}  {score:.2} {unit}  -> {}", paths[i].display(), dest.display());
        }
    }
    if total > 1 {
        println!("mean {:.2} {unit} over {total} inputs", scores.iter().sum::<f64>() / total as f64);
    }
    Ok(scores)
}

/// Codes of every input (all the same size) as an int64 .npy [N, h, w]. With a shard (`--shard
/// i/n`, or the rank under mpirun/srun), its consecutive share of the inputs, written to
/// `out` with `.shard-i-of-n` before the extension.
pub fn encode(gpu: &Arc<Gpu>, model: &Path, paths: &[PathBuf], out: &Path, opts: &ImageOptions) -> Result<Vec<usize>> {
    encode_shard(gpu, model, paths, out, opts, None)
}

/// `encode` of shard `shard` (None: the rank under mpirun/srun, else every input).
pub fn encode_shard(
    gpu: &Arc<Gpu>,
    model: &Path,
    paths: &[PathBuf],
    out: &Path,
    opts: &ImageOptions,
    shard: Option<Shard>,
) -> Result<Vec<usize>> {
    let (paths, out) = match Shard::or_rank(shard) {
        Some(s) => {
            let r = s.range(paths.len());
            eprintln!("shard {}/{}: inputs {}..{} of {}", s.index, s.count, r.start, r.end, paths.len());
            (&paths[r], s.file(out))
        }
        None => (paths, out.to_path_buf()),
    };
    if paths.is_empty() {
        bail!("encode: no inputs in this shard");
    }
    let out = out.as_path();
    let vq = load_vqgan(gpu, model)?;
    let kind = Kind::of(&vq.config)?;
    let pics = prepare_all(kind, paths, vq.config.factor() as u32, opts)?;
    if let Some((i, pic)) = pics.iter().enumerate().find(|(_, p)| p.dimensions() != pics[0].dimensions()) {
        let ((w, h), (w0, h0)) = (pic.dimensions(), pics[0].dimensions());
        bail!(
            "{} is {w}x{h} after preparation but {} is {w0}x{h0}; pass --size so all images share one size",
            paths[i].display(),
            paths[0].display(),
        );
    }
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let mut codes = Vec::new();
    let (mut h, mut w) = (0, 0);
    for b in batches(&pics, opts.batch) {
        let group: Vec<&Picture> = b.iter().map(|&i| &pics[i]).collect();
        let (rows, hh, ww) = vq.encode_indices(&tape, &p, &tape.constant(maps::batch_tensor(gpu, kind, &group)?))?;
        (h, w) = (hh, ww);
        codes.extend(rows.into_iter().flatten());
    }
    let shape = vec![pics.len(), h, w];
    images::save_npy_i64(out, &shape, &codes)?;
    println!("wrote {} ({} inputs, {h}x{w} codes each)", out.display(), pics.len());
    Ok(shape)
}

/// Pictures from a codes .npy ([N, h, w] or [h, w]); writes `<out>/<k>.png`.
pub fn decode(gpu: &Arc<Gpu>, model: &Path, codes: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let vq = load_vqgan(gpu, model)?;
    let kind = Kind::of(&vq.config)?;
    let (shape, data) = images::load_npy_codes(codes)?;
    let (n, h, w) = match shape.as_slice() {
        [n, h, w] => (*n, *h, *w),
        [h, w] => (1, *h, *w),
        other => bail!("{}: codes of shape {other:?}; expected [N, h, w] or [h, w]", codes.display()),
    };
    if let Some(bad) = data.iter().find(|&&c| c as usize >= vq.codes()) {
        bail!("{}: code {bad} is outside the model's {} codes", codes.display(), vq.codes());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let mut written = Vec::new();
    for (k, rows) in data.chunks(h * w).collect::<Vec<_>>().chunks(4).enumerate() {
        let idx: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
        let pics = maps::from_output(kind, &vq.decode_indices(&tape, &p, &idx, h, w)?.value)?;
        for (j, pic) in pics.iter().enumerate() {
            let dest = out.join(format!("{}.png", k * 4 + j));
            images::save_png(&pic.to_rgb(vq.colorize.as_deref()), &dest)?;
            written.push(dest);
        }
    }
    println!("wrote {} pictures of {}x{} to {}", n, w * vq.config.factor(), h * vq.config.factor(), out.display());
    Ok(written)
}
