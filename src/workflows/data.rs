//! Training images: a folder (recursive) or a list file; decoded, resized
//! (short side), cropped (random for training, center for validation) and
//! optionally flipped on background threads, a few batches ahead of the GPU.
//! Every choice for step s comes from (seed, s), so a resumed run sees the
//! same batches as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use image::{imageops::FilterType, RgbImage};

use super::maps::{self, Kind, Picture};
use crate::engine::Rng;

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The images under `source`: a folder (searched recursively, sorted) or a
/// text file with one path per line (relative to the file's folder; `#` comments).
pub fn list_images(source: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(source).with_context(|| format!("data source {}", source.display()))?;
    let mut out = Vec::new();
    if meta.is_dir() {
        let mut stack = vec![source.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("reading folder {}", dir.display()))? {
                let p = entry?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                {
                    out.push(p);
                }
            }
        }
        out.sort();
    } else {
        let text =
            std::fs::read_to_string(source).with_context(|| format!("reading list file {}", source.display()))?;
        let base = source.parent().unwrap_or(Path::new("."));
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let p = Path::new(line);
            out.push(if p.is_absolute() { p.to_path_buf() } else { base.join(p) });
        }
    }
    if out.is_empty() {
        bail!("{}: no images (.png, .jpg) found", source.display());
    }
    Ok(out)
}

/// Read every file's header (fast: no pixel decoding), so a file that is not
/// an image stops the run at the start rather than hours into it.
pub fn check_headers(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let reader = image::ImageReader::open(p)
            .with_context(|| format!("opening {}", p.display()))?
            .with_guessed_format()
            .with_context(|| format!("reading {}", p.display()))?;
        reader.into_dimensions().map_err(|e| anyhow!("{}: not a readable image: {e}", p.display()))?;
    }
    Ok(())
}

/// Hold out `n` images for validation, spread evenly over the sorted list.
pub fn split_validation(paths: Vec<PathBuf>, n: usize) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    if n >= paths.len() {
        bail!("{} images: too few to hold out {n} for validation", paths.len());
    }
    let stride = paths.len() as f64 / n.max(1) as f64;
    let val_idx: std::collections::HashSet<usize> = (0..n).map(|i| (i as f64 * stride) as usize).collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, p) in paths.into_iter().enumerate() {
        if val_idx.contains(&i) {
            val.push(p)
        } else {
            train.push(p)
        }
    }
    Ok((train, val))
}

#[derive(Clone, Copy, Debug)]
pub struct Augment {
    /// Short side after resizing.
    pub resize: u32,
    /// Square crop size.
    pub crop: u32,
    /// Random crop position (training) or center (validation).
    pub random_crop: bool,
    /// Random horizontal flip with probability 0.5.
    pub flip: bool,
    /// Nearest-neighbour resizing (label maps), instead of bilinear.
    pub nearest: bool,
}

/// One image, decoded and augmented; the random choices come from `rng`.
pub fn load_sample(path: &Path, aug: &Augment, rng: &mut Rng) -> Result<RgbImage> {
    match load_picture(path, Kind::Rgb, aug, rng)? {
        Picture::Rgb(img) => Ok(img),
        _ => unreachable!("an RGB picture"),
    }
}

/// One input of the model's kind (photo, map, label map), decoded and augmented: the short
/// side resized (label maps nearest, else bilinear), a square crop, a flip; the random choices
/// come from `rng`.
pub fn load_picture(path: &Path, kind: Kind, aug: &Augment, rng: &mut Rng) -> Result<Picture> {
    let mut pic = maps::load(kind, path)?;
    let (w, h) = pic.dimensions();
    if w.min(h) != aug.resize {
        let scale = aug.resize as f64 / w.min(h) as f64;
        let (nw, nh) =
            (((w as f64 * scale).round() as u32).max(aug.resize), ((h as f64 * scale).round() as u32).max(aug.resize));
        pic = pic.resize(nw, nh, if aug.nearest { FilterType::Nearest } else { FilterType::Triangle });
    }
    let (w, h) = pic.dimensions();
    if w < aug.crop || h < aug.crop {
        bail!("{}: {w}x{h} after resizing is smaller than the crop {}", path.display(), aug.crop);
    }
    let (x0, y0) = if aug.random_crop {
        (rng.below((w - aug.crop + 1) as usize) as u32, rng.below((h - aug.crop + 1) as usize) as u32)
    } else {
        ((w - aug.crop) / 2, (h - aug.crop) / 2)
    };
    let pic = pic.crop(x0, y0, aug.crop, aug.crop);
    Ok(if aug.flip && rng.next_f64() < 0.5 { pic.flip_horizontal() } else { pic })
}

/// Which image sits at position `q` of the endless stream: each epoch is a
/// fresh permutation of the list, drawn from (seed, epoch).
pub struct Order {
    seed: u64,
    n: usize,
    epoch: u64,
    perm: Vec<usize>,
}

impl Order {
    pub fn new(seed: u64, n: usize) -> Order {
        Order { seed, n, epoch: u64::MAX, perm: Vec::new() }
    }
    pub fn at(&mut self, q: u64) -> usize {
        let epoch = q / self.n as u64;
        if epoch != self.epoch {
            self.epoch = epoch;
            self.perm = Rng::keyed(self.seed, 1, epoch).permutation(self.n);
        }
        self.perm[(q % self.n as u64) as usize]
    }
}

/// The inputs of one training step, and the position in the list of each.
pub struct Batch {
    pub step: u64,
    pub pictures: Vec<Picture>,
    pub items: Vec<usize>,
}

/// Batches for steps `start..`, made by a background thread (which decodes
/// each batch on `workers` threads) and queued a few steps ahead.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
}

impl Loader {
    pub fn start(
        paths: Arc<Vec<PathBuf>>,
        kind: Kind,
        batch: usize,
        aug: Augment,
        seed: u64,
        start: u64,
        workers: usize,
    ) -> Loader {
        let (tx, rx) = sync_channel(3);
        std::thread::spawn(move || {
            let mut order = Order::new(seed, paths.len());
            for step in start.. {
                let items: Vec<usize> = (0..batch as u64).map(|i| order.at(step * batch as u64 + i)).collect();
                let made = make_batch(&paths, kind, &items, &aug, seed, step, workers).map(|pictures| Batch {
                    step,
                    pictures,
                    items,
                });
                let failed = made.is_err();
                if tx.send(made).is_err() || failed {
                    return; // the trainer stopped, or this batch could not be made
                }
            }
        });
        Loader { rx }
    }

    pub fn next(&self) -> Result<Batch> {
        self.rx.recv().map_err(|_| anyhow!("internal: the data loader stopped"))?
    }
}

/// Decode `items` in parallel; item i of step s uses the generator (seed, s, i).
fn make_batch(
    paths: &[PathBuf],
    kind: Kind,
    items: &[usize],
    aug: &Augment,
    seed: u64,
    step: u64,
    workers: usize,
) -> Result<Vec<Picture>> {
    let workers = workers.clamp(1, items.len().max(1));
    let mut slots: Vec<Option<Result<Picture>>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let chunks: Vec<_> = slots.chunks_mut(items.len().div_ceil(workers)).enumerate().collect();
        let per = items.len().div_ceil(workers);
        for (c, chunk) in chunks {
            scope.spawn(move || {
                for (k, slot) in chunk.iter_mut().enumerate() {
                    let i = c * per + k;
                    let mut rng = Rng::keyed(seed, 2 + step, i as u64);
                    *slot = Some(load_picture(&paths[items[i]], kind, aug, &mut rng));
                }
            });
        }
    });
    slots.into_iter().map(|slot| slot.expect("every slot is filled")).collect()
}

/// Validation inputs: decoded once, center-cropped.
pub fn load_validation(paths: &[PathBuf], kind: Kind, aug: &Augment) -> Result<Vec<Picture>> {
    let aug = Augment { random_crop: false, flip: false, ..*aug };
    paths.iter().map(|p| load_picture(p, kind, &aug, &mut Rng::new(0))).collect()
}
