//! `taming reconstruct`, `taming encode`, `taming decode`: the VQGAN on
//! your images. Several images of one size run as a batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;

use super::images;
use crate::engine::{Gpu, Tape, Tensor};
use crate::models::vqgan::{Vqgan, VqganConfig};
use crate::models::weights::ModelFile;

/// The first stage of a model file: a VQModel, or the first_stage_model of a Net2NetTransformer.
pub fn load_vqgan(gpu: &Arc<Gpu>, path: &Path) -> Result<Vqgan> {
    let file = ModelFile::open(path)?;
    let target = file.config.get("target").and_then(|t| t.as_str()).unwrap_or("");
    let params = file.config.get("params").cloned().unwrap_or_default();
    let (cfg, prefix) = match target {
        crate::models::vqgan::TARGET => (params, ""),
        crate::models::cond_transformer::TARGET => (
            params
                .pointer("/first_stage_config/params")
                .cloned()
                .ok_or_else(|| anyhow!("{}: no first_stage_config", path.display()))?,
            "first_stage_model.",
        ),
        other => bail!("{}: target '{other}' has no VQGAN", path.display()),
    };
    let config = VqganConfig::from_params(&cfg).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if config.in_channels != 3 {
        bail!("{}: the model takes {} input channels; images have 3", path.display(), config.in_channels);
    }
    Vqgan::load(&file, gpu, config, prefix)
}

pub struct ImageOptions {
    /// Resize the short side to this many pixels first.
    pub size: Option<u32>,
    pub batch: usize,
}

/// Decode, resize and crop every image first, so a bad file fails before any output is written.
fn prepare_all(paths: &[PathBuf], f: u32, opts: &ImageOptions) -> Result<Vec<RgbImage>> {
    if paths.is_empty() {
        bail!("no images given");
    }
    paths.iter().map(|p| images::prepare(images::load_rgb(p)?, opts.size, f, p)).collect()
}

/// Batches of indices of same-sized images.
fn batches(imgs: &[RgbImage], batch: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, img) in imgs.iter().enumerate() {
        match out.iter_mut().find(|b| b.len() < batch.max(1) && imgs[b[0]].dimensions() == img.dimensions()) {
            Some(b) => b.push(i),
            None => out.push(vec![i]),
        }
    }
    out
}

fn batch_tensor(gpu: &Arc<Gpu>, imgs: &[&RgbImage]) -> Result<Tensor> {
    let (w, h) = imgs[0].dimensions();
    let mut data = Vec::with_capacity(imgs.len() * 3 * (w * h) as usize);
    for img in imgs {
        images::to_chw(img, &mut data);
    }
    Tensor::from_f32(gpu, &data, &[imgs.len(), 3, h as usize, w as usize])
}

/// Writes `<stem>_rec.png` (input | reconstruction) per image; returns the PSNRs.
pub fn reconstruct(
    gpu: &Arc<Gpu>,
    model: &Path,
    paths: &[PathBuf],
    out: &Path,
    opts: &ImageOptions,
) -> Result<Vec<f64>> {
    let vq = load_vqgan(gpu, model)?;
    let imgs = prepare_all(paths, vq.config.factor() as u32, opts)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let mut psnrs = vec![0.0; imgs.len()];
    let total = imgs.len();
    let mut done = 0;
    for b in batches(&imgs, opts.batch) {
        let group: Vec<&RgbImage> = b.iter().map(|&i| &imgs[i]).collect();
        let x = tape.constant(batch_tensor(gpu, &group)?);
        let rec = vq.forward(&tape, &p, &x)?.decoder_out.value.to_vec()?;
        let (w, h) = group[0].dimensions();
        let per = (3 * w * h) as usize;
        for (k, &i) in b.iter().enumerate() {
            let r = images::from_chw(&rec[k * per..(k + 1) * per], h, w);
            psnrs[i] = images::psnr(&imgs[i], &r);
            let stem =
                paths[i].file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| format!("image{i}"));
            let dest = out.join(format!("{stem}_rec.png"));
            images::save_png(&images::side_by_side(&[&imgs[i], &r]), &dest)?;
            done += 1;
            println!("[{done}/{total}] {}  PSNR {:.2} dB  -> {}", paths[i].display(), psnrs[i], dest.display());
        }
    }
    if total > 1 {
        println!("mean PSNR {:.2} dB over {total} images", psnrs.iter().sum::<f64>() / total as f64);
    }
    Ok(psnrs)
}

/// Codebook indices of every image (all the same size) as an int64 .npy [N, h, w].
pub fn encode(gpu: &Arc<Gpu>, model: &Path, paths: &[PathBuf], out: &Path, opts: &ImageOptions) -> Result<Vec<usize>> {
    let vq = load_vqgan(gpu, model)?;
    let imgs = prepare_all(paths, vq.config.factor() as u32, opts)?;
    if let Some((i, img)) = imgs.iter().enumerate().find(|(_, im)| im.dimensions() != imgs[0].dimensions()) {
        bail!(
            "{} is {}x{} after preparation but {} is {}x{}; pass --size so all images share one size",
            paths[i].display(),
            img.width(),
            img.height(),
            paths[0].display(),
            imgs[0].width(),
            imgs[0].height()
        );
    }
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let mut codes = Vec::new();
    let (mut h, mut w) = (0, 0);
    for b in batches(&imgs, opts.batch) {
        let group: Vec<&RgbImage> = b.iter().map(|&i| &imgs[i]).collect();
        let (rows, hh, ww) = vq.encode_indices(&tape, &p, &tape.constant(batch_tensor(gpu, &group)?))?;
        (h, w) = (hh, ww);
        codes.extend(rows.into_iter().flatten());
    }
    let shape = vec![imgs.len(), h, w];
    images::save_npy_i64(out, &shape, &codes)?;
    println!("wrote {} ({} images, {h}x{w} codes each)", out.display(), imgs.len());
    Ok(shape)
}

/// Images from an indices .npy ([N, h, w] or [h, w]); writes `<out>/<k>.png`.
pub fn decode(gpu: &Arc<Gpu>, model: &Path, codes: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let vq = load_vqgan(gpu, model)?;
    let (shape, data) = images::load_npy_codes(codes)?;
    let (n, h, w) = match shape.as_slice() {
        [n, h, w] => (*n, *h, *w),
        [h, w] => (1, *h, *w),
        other => bail!("{}: codes of shape {other:?}; expected [N, h, w] or [h, w]", codes.display()),
    };
    if let Some(bad) = data.iter().find(|&&c| c as usize >= vq.config.n_embed) {
        bail!("{}: code {bad} is outside the codebook of {}", codes.display(), vq.config.n_embed);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let mut written = Vec::new();
    for (k, rows) in data.chunks(h * w).collect::<Vec<_>>().chunks(4).enumerate() {
        let idx: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
        let img = vq.decode_indices(&tape, &p, &idx, h, w)?.value.to_vec()?;
        let (ih, iw) = ((h * vq.config.factor()) as u32, (w * vq.config.factor()) as u32);
        let per = (3 * ih * iw) as usize;
        for j in 0..idx.len() {
            let dest = out.join(format!("{}.png", k * 4 + j));
            images::save_png(&images::from_chw(&img[j * per..(j + 1) * per], ih, iw), &dest)?;
            written.push(dest);
        }
    }
    println!("wrote {} images of {}x{} to {}", n, w * vq.config.factor(), h * vq.config.factor(), out.display());
    Ok(written)
}
