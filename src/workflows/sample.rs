//! `taming sample`: images from a Net2NetTransformer model file, token by
//! token, then decoded by its first stage into a grid PNG. Grids of the
//! training size use the KV cache; larger grids use the paper's sliding
//! attention window (each token sampled with the window around it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use super::conditions::CondStage;
use super::images;
use super::maps::Picture;
use crate::engine::distributed::Shard;
use crate::engine::{Gpu, Tape};
use crate::models::cond_transformer::{Conditioning, Net2NetConfig};
use crate::models::gpt::{Gpt, KvDecoder};
use crate::models::vqgan::Vqgan;
use crate::models::weights::ModelFile;

/// The demo model that `taming sample` uses when no --model is given.
pub const DEMO_MODEL: &str = "weights/emoji_transformer.safetensors";

#[derive(Clone)]
pub struct SampleOptions {
    pub n: usize,
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
    pub seed: u64,
    /// Class for class-conditional models: its index or (part of) its name.
    pub class: Option<String>,
    pub batch: usize,
    /// Image size in pixels (height, width); None: the training size.
    pub size: Option<(usize, usize)>,
    /// The condition image (segmentation or depth map) for spatially conditioned models.
    pub cond: Option<PathBuf>,
    /// Also one PNG per sample in this folder (as the reference's `sample_fast.py`).
    pub per_image: Option<PathBuf>,
    /// Also every sample in one .npz (`arr_0`: uint8 N x H x W x 3), what FID tools read.
    pub npz: Option<PathBuf>,
    /// Image completion: this image's codes give the top `keep_rows` rows of every sample.
    pub complete: Option<PathBuf>,
    pub keep_rows: usize,
    /// Classifier-free guidance scale (None: DEFAULT_CFG_SCALE for models trained with condition
    /// dropout, else 1, no guidance).
    pub cfg_scale: Option<f32>,
    /// Only this part of the samples (None: the rank under mpirun/srun, else all).
    pub shard: Option<Shard>,
}

/// The guidance scale `taming sample` uses for models trained with condition dropout.
pub const DEFAULT_CFG_SCALE: f32 = 3.0;

/// The command's defaults (`taming sample --help`).
impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            n: 16,
            temperature: 1.0,
            top_k: 100,
            top_p: 1.0,
            seed: 0,
            class: None,
            batch: 16,
            size: None,
            cond: None,
            per_image: None,
            npz: None,
            complete: None,
            keep_rows: 0,
            cfg_scale: None,
            shard: None,
        }
    }
}

/// Class-conditional models without --class sample a row per class; beyond
/// this many classes (ImageNet's 1000) that grid would be too large to mean anything.
pub const MAX_CLASS_ROWS: usize = 100;

pub use crate::engine::rng::Rng;

/// Pick a token from logits with temperature, top-k and top-p (nucleus) filtering.
pub fn pick(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, rng: &mut Rng) -> u32 {
    if top_k == 1 || temperature <= 0.0 {
        return crate::models::gpt::argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let m = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - m) / temperature as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.next_f64() * total;
    for (p, &i) in probs.iter().zip(&order) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    *order.last().unwrap() as u32
}

/// The model file to sample: the given one, or the demo model found in
/// `weights/` under the current folder or beside the executable.
pub fn model_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from(DEMO_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(DEMO_MODEL));
        }
    }
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        anyhow!(
            "no --model given and the demo model {DEMO_MODEL} was not found (run from the repository, or pass --model)"
        )
    })
}

/// Class names stored with a class-conditional model (metadata `class_names`, a JSON list).
pub fn class_names(file: &ModelFile) -> Vec<String> {
    file.metadata("class_names").and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// `--class`: an index, or a name (case-insensitive; a unique prefix is enough).
pub fn resolve_class(arg: &str, names: &[String], n_classes: usize) -> Result<u32> {
    if let Ok(k) = arg.parse::<u32>() {
        if (k as usize) < n_classes {
            return Ok(k);
        }
        bail!("--class {k}: the model has {n_classes} classes (0..{})", n_classes - 1);
    }
    let want = arg.to_lowercase();
    let hits: Vec<usize> =
        names.iter().enumerate().filter(|(_, n)| n.to_lowercase().starts_with(&want)).map(|(i, _)| i).collect();
    match hits.as_slice() {
        [k] => Ok(*k as u32),
        [] => bail!(
            "--class '{arg}': not a class of this model ({})",
            if names.is_empty() { "it stores no names".into() } else { names.join(", ") }
        ),
        _ => bail!(
            "--class '{arg}' matches several classes: {}",
            hits.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Sampling settings shared by `taming sample` and the training grids.
#[derive(Clone, Copy)]
pub struct Pick {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// Image tokens are the ids below this (the first stage's codes): ids past them in a
    /// shared vocabulary (classes, the null token) are never drawn for an image position.
    pub codes: usize,
}

/// Classifier-free guidance (Ho & Salimans; LlamaGen's form): each sequence also runs with the
/// null condition, and tokens are drawn from the logits u + scale (c - u) of the conditional
/// (c) and null (u) rows. scale 1 is the conditional model alone.
#[derive(Clone, Copy)]
pub struct Guidance<'a> {
    pub scale: f32,
    /// The null conditioning sequence (as long as each row of `cond`).
    pub null: &'a [u32],
}

/// u + scale (c - u).
pub fn guided_logits(c: &[f32], u: &[f32], scale: f32) -> Vec<f32> {
    c.iter().zip(u).map(|(&c, &u)| u + scale * (c - u)).collect()
}

/// Where `generate` is: `done` of `total` codes of each sample drawn, and the samples' codes so far
/// (`codes[s][..done]`, in the transformer's order; entries past `done` mean nothing).
pub struct Partial<'a> {
    pub done: usize,
    pub total: usize,
    pub codes: &'a [Vec<u32>],
}

/// A `generate` progress callback that ignores progress.
pub fn no_progress(_: Partial) -> Result<()> {
    Ok(())
}

/// Codes [B][h*w] on an h x w grid, one sample per conditioning sequence in
/// `cond`; with `cond_grid`, each is instead an h x w code grid of the
/// condition image (spatial conditioning), of which each window takes its
/// part. `window` is the side of the training grid. Grids within the window
/// use the KV cache; larger ones the sliding window. The first
/// `prefix.len()` codes (raster order) are given instead of sampled: image
/// completion, as the reference's half-image samples. `progress` sees every code drawn; an error
/// from it stops the sampling (a closed page in `taming serve`) and is returned.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    gpt: &Gpt,
    cond: &[Vec<u32>],
    cond_grid: bool,
    h: usize,
    w: usize,
    window: usize,
    prefix: &[u32],
    pick_opts: Pick,
    guidance: Option<Guidance>,
    rng: &mut Rng,
    progress: &mut dyn FnMut(Partial) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    // With guidance the batch doubles: rows pairs.. are the null-conditioned twins of 0..pairs,
    // fed the same tokens.
    let pairs = cond.len();
    let doubled: Vec<Vec<u32>>;
    let cond = match guidance {
        Some(g) => {
            if cond.iter().any(|c| c.len() != g.null.len()) {
                bail!("guidance: the null condition has {} tokens, the conditions {}", g.null.len(), cond[0].len());
            }
            doubled = cond.iter().cloned().chain(std::iter::repeat_n(g.null.to_vec(), pairs)).collect();
            &doubled[..]
        }
        None => cond,
    };
    let b = cond.len();
    let v = gpt.config.vocab_size;
    if pick_opts.codes == 0 || pick_opts.codes > v {
        bail!("sampling: {} image codes for a vocabulary of {v} tokens", pick_opts.codes);
    }
    // The logits sample s draws from, given the batch's rows of logits (row r at lg(r)),
    // over the image codes only.
    let n = pick_opts.codes;
    let sample_logits = |lg: &dyn Fn(usize) -> Vec<f32>, s: usize| -> Vec<f32> {
        match guidance {
            Some(g) => guided_logits(&lg(s)[..n], &lg(pairs + s)[..n], g.scale),
            None => lg(s)[..n].to_vec(),
        }
    };
    let total = h * w;
    if prefix.len() > total || prefix.iter().any(|&t| t as usize >= v) {
        bail!("image completion: {} given codes for a {h}x{w} grid of a {v}-token vocabulary", prefix.len());
    }
    if cond_grid && (h < window || w < window || cond.iter().any(|c| c.len() != total)) {
        bail!("spatial conditioning needs a condition code grid of the output's {h}x{w}, at least the {window}x{window} training window");
    }
    let c_len = if cond_grid { window * window } else { cond[0].len() };
    // The conditioning of the window whose top-left code is (i0, j0).
    let window_cond = |s: usize, i0: usize, j0: usize| -> Vec<u32> {
        if cond_grid {
            (0..window * window).map(|k| cond[s][(i0 + k / window) * w + j0 + k % window]).collect()
        } else {
            cond[s].clone()
        }
    };
    if w == window && h <= window && (!cond_grid || h == window) {
        let cond: Vec<Vec<u32>> = (0..b).map(|s| window_cond(s, 0, 0)).collect();
        // The whole sequence fits the training window: one pass with the KV cache.
        let mut dec = KvDecoder::new(gpt, b)?;
        for k in 0..c_len - 1 {
            dec.step(&cond.iter().map(|c| c[k]).collect::<Vec<_>>())?;
        }
        let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(total); pairs];
        let mut next: Vec<u32> = cond.iter().map(|c| c[c_len - 1]).collect();
        for step in 0..total {
            let lg = dec.step(&next)?;
            let chosen: Vec<u32> = match prefix.get(step) {
                Some(&given) => vec![given; pairs],
                None => (0..pairs)
                    .map(|i| {
                        let row = sample_logits(&|r| lg[r * v..(r + 1) * v].to_vec(), i);
                        pick(&row, pick_opts.temperature, pick_opts.top_k, pick_opts.top_p, rng)
                    })
                    .collect(),
            };
            next = (0..b).map(|r| chosen[r % pairs]).collect();
            for (row, &t) in out.iter_mut().zip(&chosen) {
                row.push(t);
            }
            progress(Partial { done: step + 1, total, codes: &out })?;
        }
        return Ok(out);
    }
    if h < window || w < window {
        bail!(
            "a {h}x{w} code grid is smaller than the model's {window}x{window} window in one direction; \
               sample at least the training size"
        );
    }
    // Sliding window (the reference's scripts/sample_conditional.py): the
    // window's top-left corner follows the token, centred where it can be.
    let half = window / 2;
    let local = |i: usize, n: usize| {
        if i <= half {
            i
        } else if n - i < half {
            window - (n - i)
        } else {
            half
        }
    };
    let mut idx = vec![vec![0u32; total]; pairs];
    let tape = Tape::inference();
    let p = gpt.params.vars(&tape);
    for i in 0..h {
        let li = local(i, h);
        for j in 0..w {
            let lj = local(j, w);
            if let Some(&given) = prefix.get(i * w + j) {
                idx.iter_mut().for_each(|row| row[i * w + j] = given);
                progress(Partial { done: i * w + j + 1, total, codes: &idx })?;
                continue;
            }
            let (i0, j0) = (i - li, j - lj);
            let pos = li * window + lj; // this token's place in the window
            let input: Vec<Vec<u32>> = (0..b)
                .map(|s| {
                    let mut seq = window_cond(s, i0, j0);
                    for k in 0..pos {
                        let (r, c) = (i0 + k / window, j0 + k % window);
                        seq.push(idx[s % pairs][r * w + c]);
                    }
                    seq
                })
                .collect();
            let lg = gpt.forward(&tape, &p, &input)?.value.to_vec()?;
            let tl = input[0].len();
            for (s, row) in idx.iter_mut().enumerate() {
                let logits = sample_logits(&|r| lg[(r * tl + tl - 1) * v..(r * tl + tl) * v].to_vec(), s);
                row[i * w + j] = pick(&logits, pick_opts.temperature, pick_opts.top_k, pick_opts.top_p, rng);
            }
            progress(Partial { done: i * w + j + 1, total, codes: &idx })?;
        }
    }
    Ok(idx)
}

/// Images as numpy's `np.savez(path, arr_0)` of a uint8 [N, H, W, 3] array
/// (stored, zip64 where large), written to a temp file and renamed.
pub fn write_npz_images(path: &Path, tiles: &[image::RgbImage]) -> Result<()> {
    use npyz::WriterBuilder;
    use std::io::Write;
    let (h, w) = tiles.first().map_or((0, 0), |t| (t.height() as u64, t.width() as u64));
    if tiles.iter().any(|t| t.height() as u64 != h || t.width() as u64 != w) {
        bail!("{}: the images differ in size", path.display());
    }
    let tmp = path.with_extension(format!("npz.tmp{}", std::process::id()));
    let write = || -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(tiles.len() as u64 * h * w * 3 > u32::MAX as u64 / 2);
        zip.start_file("arr_0.npy", options)?;
        let mut npy = npyz::WriteOptions::<u8>::new()
            .default_dtype()
            .shape(&[tiles.len() as u64, h, w, 3])
            .writer(&mut zip)
            .begin_nd()?;
        for t in tiles {
            npy.extend(t.as_raw().iter().copied())?;
        }
        npy.finish()?;
        zip.finish()?.flush()?;
        Ok(())
    };
    let done = write().and_then(|_| std::fs::rename(&tmp, path).map_err(Into::into));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.map_err(|e| anyhow!("writing {}: {e:#}", path.display()))
}

/// The codes of an image resized to cover ph x pw and center-cropped (`conditions::fit`),
/// by `vq`'s encoder and quantizer.
fn encode_fitted(gpu: &Arc<Gpu>, vq: &Vqgan, path: &Path, ph: usize, pw: usize) -> Result<Vec<u32>> {
    let pic = super::conditions::fit(super::maps::Picture::Rgb(images::load_rgb(path)?), ph, pw)?;
    let t = Tape::inference();
    let p = vq.params.constants(&t);
    let x = t.constant(super::maps::batch_tensor(gpu, super::maps::Kind::Rgb, &[&pic])?);
    Ok(vq.encode_indices(&t, &p, &x)?.0.into_iter().next().unwrap_or_default())
}

/// Decode code grids into 8-bit images.
pub fn decode_grid(vq: &Vqgan, codes: &[Vec<u32>], h: usize, w: usize) -> Result<Vec<image::RgbImage>> {
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let f = vq.config.factor();
    let (ph, pw) = (h * f, w * f);
    let mut tiles = Vec::new();
    for chunk in codes.chunks(4) {
        let img = vq.decode_indices(&tape, &p, chunk, h, w)?.value.to_vec()?;
        let per = 3 * ph * pw;
        for k in 0..chunk.len() {
            tiles.push(images::from_chw(&img[k * per..(k + 1) * per], ph as u32, pw as u32));
        }
    }
    Ok(tiles)
}

/// What one `taming sample` run has loaded and decided, shared by every condition.
struct Loaded<'a> {
    sm: &'a SampleModel,
    grid: SampleGrid,
    prefix: Vec<u32>,
    /// Classifier-free guidance: the scale and the null token.
    guidance: Option<(f32, u32)>,
}

/// A transformer model file loaded for sampling: its config, transformer, first stage, cond stage
/// and class names (`taming sample`, `taming serve`).
pub struct SampleModel {
    pub path: PathBuf,
    pub cfg: Net2NetConfig,
    pub gpt: Gpt,
    pub vq: Vqgan,
    pub stage: Option<CondStage>,
    pub names: Vec<String>,
}

/// The grid a request samples: pixels, codes, the training window's side in codes, and whether
/// the condition is a code grid of the image's size.
#[derive(Clone, Copy, Debug)]
pub struct SampleGrid {
    pub ph: usize,
    pub pw: usize,
    pub h: usize,
    pub w: usize,
    pub window: usize,
    pub cond_grid: bool,
}

impl SampleModel {
    pub fn load(gpu: &Arc<Gpu>, path: &Path) -> Result<SampleModel> {
        Self::from_file(gpu, &ModelFile::open(path)?)
    }

    /// From a model file already read.
    pub fn from_file(gpu: &Arc<Gpu>, file: &ModelFile) -> Result<SampleModel> {
        let path = &file.path;
        let cfg = Net2NetConfig::from_config(&file.config).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let gpt = Gpt::load(file, gpu, cfg.gpt.clone(), "transformer.")?;
        let vq = Vqgan::load(file, gpu, cfg.vqgan()?, "first_stage_model.")?;
        let stage = CondStage::load(file, gpu, &cfg)?;
        Ok(SampleModel { path: path.clone(), gpt, vq, stage, names: class_names(file), cfg })
    }

    /// Whether the condition is a picture (segmentation, depth, ...): its kind.
    pub fn reads_pictures(&self) -> Option<super::maps::Kind> {
        self.stage.as_ref().and_then(|s| s.kind())
    }

    /// The grid of `size` pixels (None: the training size), refused where this model cannot
    /// sample it (`completing`: image completion needs raster order).
    pub fn grid(&self, size: Option<(usize, usize)>, completing: bool) -> Result<SampleGrid> {
        let f = self.vq.config.factor();
        let res = self.vq.config.resolution;
        let (ph, pw) = size.unwrap_or((res, res));
        if ph % f != 0 || pw % f != 0 || ph == 0 || pw == 0 {
            bail!("--size {ph}x{pw}: both sides must be positive multiples of the downsampling factor {f}");
        }
        let (h, w) = (ph / f, pw / f);
        let cfg = &self.cfg;
        let cond_grid = cfg.cond_is_grid()?;
        let window = cfg.latent_side()?;
        if self.stage.is_some() && !cond_grid && (h, w) != (window, window) {
            bail!(
                "this model's condition codes do not line up with its image codes (downsample_cond_size, or a cond \
                 stage of another downsampling factor): it samples at its training size ({window}x{window} codes)"
            );
        }
        if !cfg.permuter.is_identity() && ((h, w) != (window, window) || completing) {
            bail!(
                "this model reads its codes in {:?} order: it samples at its training size ({window}x{window} codes), \
                 without --complete (the sliding window and completion need raster order)",
                cfg.permuter.kind
            );
        }
        if (h < window || w < window) && (h, w) != (window.min(h), window) {
            bail!(
                "--size {ph}x{pw}: a {h}x{w} code grid is smaller than the model's {window}x{window} window; \
                 sample at least the training size ({res}x{res})"
            );
        }
        Ok(SampleGrid { ph, pw, h, w, window, cond_grid })
    }

    /// Classifier-free guidance at `scale` (None: DEFAULT_CFG_SCALE for models trained with
    /// condition dropout, else none): (scale, null token), or None for no guidance.
    pub fn guidance(&self, scale: Option<f32>) -> Result<Option<(f32, u32)>> {
        let null = self.cfg.null_token()?;
        let scale = match (scale, null) {
            (Some(s), _) if !s.is_finite() => bail!("--cfg-scale {s}: not a finite number"),
            (Some(s), None) if s != 1.0 => bail!(
                "--cfg-scale {s}: this model was not trained with condition dropout (cond_dropout_prob), so it has \
                 no null condition to guide against"
            ),
            (Some(s), _) => s,
            (None, Some(_)) => DEFAULT_CFG_SCALE,
            (None, None) => 1.0,
        };
        Ok(null.filter(|_| scale != 1.0).map(|t| (scale, t)))
    }

    /// The conditioning sequence of class `class` (an index or a name) for class models, of the
    /// start token for unconditional ones, refused where the model takes another condition.
    pub fn class_tokens(&self, class: Option<&str>) -> Result<Vec<u32>> {
        match (&self.cfg.cond, class) {
            (Conditioning::Class { n_classes }, Some(k)) => {
                let k = resolve_class(k, &self.names, *n_classes)?;
                self.cfg.cond.tokens(Some(k))
            }
            (Conditioning::Class { n_classes }, None) => {
                bail!("this model is class-conditional ({n_classes} classes): give a class")
            }
            (Conditioning::Unconditional { .. }, None) => self.cfg.cond.tokens(None),
            (Conditioning::Unconditional { .. }, Some(_)) => bail!("--class: this model is unconditional"),
            _ => bail!("--class: this model is conditioned spatially, not on a class"),
        }
    }

    /// The conditioning sequences of `n` samples on `grid`: the class's (or the start token's),
    /// the coordinates', or the codes of `picture` (spatial models; fitted to the grid's size).
    pub fn conditions(
        &self,
        gpu: &Arc<Gpu>,
        grid: &SampleGrid,
        class: Option<&str>,
        picture: Option<Picture>,
        n: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let size = (grid.ph, grid.pw);
        match (&self.cfg.cond, &self.stage) {
            (Conditioning::Coord { .. }, Some(stage)) => stage.encode(gpu, &[], n, size, self.cfg.downsample_cond),
            (Conditioning::Spatial { .. }, Some(stage)) => {
                let kind = stage.kind().map(|k| k.describe()).unwrap_or_default();
                let pic =
                    picture.ok_or_else(|| anyhow!("this model is conditioned on {kind}: give a condition image"))?;
                let pic = super::conditions::fit(pic, grid.ph, grid.pw)?;
                Ok(vec![stage.encode(gpu, &[&pic], 1, size, self.cfg.downsample_cond)?.remove(0); n])
            }
            _ if picture.is_some() => bail!("this model is not conditioned on pictures"),
            _ => Ok(vec![self.class_tokens(class)?; n]),
        }
    }
}

pub fn sample(gpu: &Arc<Gpu>, model: Option<&Path>, out: &Path, o: &SampleOptions) -> Result<()> {
    let model = model_path(model)?;
    let sm = SampleModel::load(gpu, &model)?;
    if o.cond.is_some() && sm.reads_pictures().is_none() {
        bail!("--cond: this model is not conditioned on pictures");
    }
    if sm.stage.is_some() && o.class.is_some() {
        bail!("--class: this model is conditioned spatially, not on a class");
    }
    if o.keep_rows > 0 && o.complete.is_none() {
        bail!("--keep-rows needs --complete IMAGE");
    }
    let grid = sm.grid(o.size, o.complete.is_some())?;
    let (ph, pw, h, w) = (grid.ph, grid.pw, grid.h, grid.w);
    // Image completion: the top rows of the image's codes are kept, the rest sampled.
    let prefix = match &o.complete {
        Some(path) => {
            if o.keep_rows > h {
                bail!("--keep-rows {}: the {h}x{w} code grid has {h} rows", o.keep_rows);
            }
            let codes = encode_fitted(gpu, &sm.vq, path, ph, pw)?;
            codes[..o.keep_rows * w].to_vec()
        }
        None => Vec::new(),
    };
    let guidance = sm.guidance(o.cfg_scale)?;
    if let Some((scale, _)) = guidance {
        eprintln!("classifier-free guidance: scale {scale} (--cfg-scale 1 turns it off)");
    }
    let run = Loaded { sm: &sm, grid, prefix, guidance };
    let square = |n: usize| (n as f64).sqrt().ceil() as usize;
    // The condition's codes, repeated for every sample.
    let spatial = |path: &Path| -> Result<Vec<Vec<u32>>> {
        let kind = sm.reads_pictures().expect("spatial models read pictures");
        sm.conditions(gpu, &grid, None, Some(super::maps::load(kind, path)?), o.n)
    };
    let (cfg, names) = (&sm.cfg, &sm.names);
    match (&cfg.cond, &o.class) {
        (Conditioning::Spatial { .. }, _) => {
            let path = o.cond.as_ref().ok_or_else(|| {
                let kind = sm.reads_pictures().map(|k| k.describe()).unwrap_or_default();
                anyhow!("this model is conditioned on {kind}: pass --cond FILE|DIR")
            })?;
            if !path.is_dir() {
                return run.write(&spatial(path)?, square(o.n), out, o.per_image.as_deref(), o.npz.as_deref(), o);
            }
            // A folder of conditions (the reference's make_samples.py): one grid per condition image.
            if o.npz.is_some() {
                bail!("--npz with a folder of conditions: sample one condition at a time, or use --per-image");
            }
            let files = super::data::list_images(path)?;
            std::fs::create_dir_all(out).map_err(|e| anyhow!("creating {}: {e}", out.display()))?;
            for file in files {
                let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let per_image = o.per_image.as_ref().map(|d| d.join(&stem));
                run.write(
                    &spatial(&file)?,
                    square(o.n),
                    &out.join(format!("{stem}.png")),
                    per_image.as_deref(),
                    None,
                    o,
                )?;
            }
            Ok(())
        }
        (Conditioning::Class { n_classes }, None) => {
            // A row of up to 8 samples per class.
            if *n_classes > MAX_CLASS_ROWS {
                bail!(
                    "this model has {n_classes} classes: give --class K (index or name); a grid with a row per class \
                     would hold {n_classes} x {} images",
                    o.n.clamp(1, 8)
                );
            }
            let per = o.n.clamp(1, 8);
            let mut conds = Vec::new();
            for k in 0..*n_classes as u32 {
                conds.extend(std::iter::repeat_n(cfg.cond.tokens(Some(k))?, per));
            }
            eprintln!(
                "class-conditional model: {per} samples for each of its {n_classes} classes, one row per class{}",
                if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) }
            );
            run.write(&conds, per, out, o.per_image.as_deref(), o.npz.as_deref(), o)
        }
        // A class, the start token, or the coordinates.
        _ => {
            let conds = sm.conditions(gpu, &grid, o.class.as_deref(), None, o.n)?;
            run.write(&conds, square(o.n), out, o.per_image.as_deref(), o.npz.as_deref(), o)
        }
    }
}

impl Loaded<'_> {
    /// Sample one image per conditioning sequence, decode, and write the grid
    /// (`cols` wide) and the optional per-image PNGs and .npz.
    fn write(
        &self,
        conds: &[Vec<u32>],
        cols: usize,
        out: &Path,
        per_image: Option<&Path>,
        npz: Option<&Path>,
        o: &SampleOptions,
    ) -> Result<()> {
        let SampleGrid { ph, pw, h, w, window, cond_grid } = self.grid;
        let sm = self.sm;
        // A shard: its consecutive share of the conditions, its own seed, its own files.
        let shard = Shard::or_rank(o.shard);
        let (conds, first, seed) = match shard {
            Some(s) => {
                let r = s.range(conds.len());
                eprintln!("shard {}/{}: samples {}..{} of {}", s.index, s.count, r.start, r.end, conds.len());
                let seed = Rng::keyed(o.seed, 0x5AAD, s.index as u64).next_u64();
                (&conds[r.clone()], r.start, seed)
            }
            None => (conds, 0, o.seed),
        };
        if conds.is_empty() {
            bail!("sample: no samples in this shard (--n {} over the shards)", o.n);
        }
        let (out, npz) = match shard {
            Some(s) => (s.file(out), npz.map(|p| s.file(p))),
            None => (out.to_path_buf(), npz.map(Path::to_path_buf)),
        };
        let (out, npz) = (out.as_path(), npz.as_deref());
        let mut rng = Rng::new(seed);
        let mut all: Vec<Vec<u32>> = Vec::new();
        let bar = super::run::progress_bar((conds.len() * h * w) as u64, 0, false);
        bar.set_message(format!("tokens ({h}x{w} codes per image)"));
        let opts = Pick { temperature: o.temperature, top_k: o.top_k, top_p: o.top_p, codes: sm.vq.codes() };
        let null = self.guidance.map(|(_, t)| vec![t; conds.first().map_or(0, |c| c.len())]);
        let guidance = self.guidance.zip(null.as_deref()).map(|((scale, _), null)| Guidance { scale, null });
        for group in conds.chunks(o.batch.max(1)) {
            let done = all.len() * h * w;
            let b = group.len();
            let mut progress = |p: Partial| {
                bar.set_position((done + p.done * b) as u64);
                Ok(())
            };
            all.extend(generate(
                &sm.gpt,
                group,
                cond_grid,
                h,
                w,
                window,
                &self.prefix,
                opts,
                guidance,
                &mut rng,
                &mut progress,
            )?);
        }
        bar.finish_and_clear();
        let all: Vec<Vec<u32>> = all.iter().map(|r| sm.cfg.permuter.undo(r)).collect::<Result<_>>()?;
        let tiles = decode_grid(&sm.vq, &all, h, w)?;
        images::save_png(&images::grid(&tiles, cols), out)?;
        if let Some(dir) = per_image {
            std::fs::create_dir_all(dir).map_err(|e| anyhow!("creating {}: {e}", dir.display()))?;
            for (i, t) in tiles.iter().enumerate() {
                images::save_png(t, &dir.join(format!("{:06}.png", first + i)))?;
            }
            println!("wrote {} PNGs into {}", tiles.len(), dir.display());
        }
        if let Some(path) = npz {
            write_npz_images(path, &tiles)?;
            println!("wrote {} (arr_0: uint8 {}x{ph}x{pw}x3)", path.display(), tiles.len());
        }
        println!("wrote {} ({} samples, {ph}x{pw}, from {})", out.display(), all.len(), sm.path.display());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_by_index_or_unique_prefix() {
        let names: Vec<String> = ["Flags", "Food & Drink", "Smileys & Emotion"].iter().map(|s| s.to_string()).collect();
        assert_eq!(resolve_class("2", &names, 3).unwrap(), 2);
        assert_eq!(resolve_class("smi", &names, 3).unwrap(), 2);
        assert_eq!(resolve_class("FLAGS", &names, 3).unwrap(), 0);
        assert!(resolve_class("3", &names, 3).is_err());
        assert!(resolve_class("f", &names, 3).is_err(), "two classes start with f");
        assert!(resolve_class("cars", &names, 3).is_err());
    }

    #[test]
    fn greedy_and_top_k_picks() {
        let logits = [0.1f32, 3.0, 0.2, 2.9];
        let mut rng = crate::engine::Rng::new(1);
        // top_k 1 is greedy whatever the temperature.
        for _ in 0..20 {
            assert_eq!(pick(&logits, 5.0, 1, 1.0, &mut rng), 1);
        }
        // top_k 2 never picks outside the two best.
        for _ in 0..200 {
            let k = pick(&logits, 1.0, 2, 1.0, &mut rng);
            assert!(k == 1 || k == 3, "{k}");
        }
    }
}
