//! What a VQGAN reads and writes, by model: RGB photos, one-channel maps (depth as the
//! reference's datasets store it, or grey PNGs), and segmentation label maps (pixel value =
//! class id, one-hot on the GPU as `VQSegmentationModel` reads them).

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageBuffer, Luma, RgbImage};

use super::images;
use crate::engine::kernels::quantize;
use crate::engine::{Gpu, Tensor};
use crate::models::vqgan::VqganConfig;

/// The kind of input a VQGAN takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Rgb,
    /// One channel in [-1, 1]: depth or grey.
    Grey,
    /// A label map of this many classes, read one-hot.
    Labels(usize),
}

impl Kind {
    pub fn of(c: &VqganConfig) -> Result<Kind> {
        match (c.n_labels, c.in_channels) {
            (Some(n), _) => Ok(Kind::Labels(n)),
            (None, 3) => Ok(Kind::Rgb),
            (None, 1) => Ok(Kind::Grey),
            (None, n) => {
                bail!("a VQGAN of {n} input channels: only RGB (3), one-channel maps (1) and label maps are supported")
            }
        }
    }

    /// Channels of the model's input.
    pub fn channels(self) -> usize {
        match self {
            Kind::Rgb => 3,
            Kind::Grey => 1,
            Kind::Labels(n) => n,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Kind::Rgb => "RGB images".into(),
            Kind::Grey => "one-channel maps (depth or grey PNGs)".into(),
            Kind::Labels(n) => format!("label maps of {n} classes"),
        }
    }
}

/// One input, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Picture {
    Rgb(RgbImage),
    /// Values in [-1, 1].
    Grey(ImageBuffer<Luma<f32>, Vec<f32>>),
    /// Class ids.
    Labels(ImageBuffer<Luma<u32>, Vec<u32>>),
}

/// Read `path` as the model's input kind.
/// - RGB: any image, transparency composited on white.
/// - Grey: an RGBA PNG is depth in the reference's format (each pixel's four bytes one float32,
///   `taming/data/imagenet.py` `rgba_to_depth`), min-max normalised to [-1, 1] as its datasets
///   do; a grey 8- or 16-bit PNG is taken as it is (0 -> -1, full scale -> 1); colour images
///   are converted to grey.
/// - Labels: a single-channel 8- or 16-bit PNG whose pixel values are class ids (the format of
///   the reference's S-FLCKR, ADE20k and COCO-Stuff maps); an id of n_labels or more is an error.
pub fn load(kind: Kind, path: &Path) -> Result<Picture> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    decode(kind, &bytes, &path.display().to_string())
}

/// `load` of an image file's bytes (an upload); `what` names it in errors.
pub fn decode(kind: Kind, bytes: &[u8], what: &str) -> Result<Picture> {
    let decode = || image::load_from_memory(bytes).map_err(|e| anyhow!("{what}: cannot decode image: {e}"));
    match kind {
        Kind::Rgb => Ok(Picture::Rgb(images::rgb_on_white(&decode()?))),
        Kind::Grey => {
            let img = decode()?;
            let (w, h) = (img.width(), img.height());
            let values: Vec<f32> = match &img {
                DynamicImage::ImageRgba8(rgba) => {
                    let depth: Vec<f32> =
                        rgba.as_raw().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    if let Some(bad) = depth.iter().find(|v| !v.is_finite()) {
                        bail!("{what}: an RGBA depth map (float32 per pixel) holding {bad}");
                    }
                    let (lo, hi) = depth.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    depth.iter().map(|&v| 2.0 * ((v - lo) / (hi - lo).max(1e-8)) - 1.0).collect()
                }
                DynamicImage::ImageLuma16(g) => g.as_raw().iter().map(|&v| v as f32 / 32767.5 - 1.0).collect(),
                other => other.to_luma8().as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect(),
            };
            Ok(Picture::Grey(ImageBuffer::from_raw(w, h, values).expect("w*h values")))
        }
        Kind::Labels(n) => {
            let img = decode()?;
            let (w, h) = (img.width(), img.height());
            let ids: Vec<u32> = match &img {
                DynamicImage::ImageLuma8(g) => g.as_raw().iter().map(|&v| v as u32).collect(),
                DynamicImage::ImageLuma16(g) => g.as_raw().iter().map(|&v| v as u32).collect(),
                other => bail!(
                    "{what}: a label map must be a single-channel PNG whose pixel values are class ids, not {:?}",
                    other.color()
                ),
            };
            if let Some(bad) = ids.iter().find(|&&v| v as usize >= n) {
                bail!("{what}: label {bad} is outside the model's {n} labels (0..{})", n - 1);
            }
            Ok(Picture::Labels(ImageBuffer::from_raw(w, h, ids).expect("w*h ids")))
        }
    }
}

impl Picture {
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Picture::Rgb(i) => i.dimensions(),
            Picture::Grey(i) => i.dimensions(),
            Picture::Labels(i) => i.dimensions(),
        }
    }

    /// Resize the short side to `size` (if given), then center-crop to a multiple of `multiple`:
    /// photos Lanczos, maps bilinear, labels nearest (as the reference's rescalers).
    pub fn prepare(self, size: Option<u32>, multiple: u32, what: &Path) -> Result<Picture> {
        if let Picture::Rgb(img) = self {
            return Ok(Picture::Rgb(images::prepare(img, size, multiple, what)?));
        }
        let (w, h) = self.dimensions();
        let (nw, nh) = match size {
            Some(s) => {
                let scale = s as f32 / w.min(h) as f32;
                (((w as f32 * scale).round() as u32).max(s), ((h as f32 * scale).round() as u32).max(s))
            }
            None => (w, h),
        };
        if nw < multiple || nh < multiple {
            bail!("{}: {nw}x{nh} is smaller than the model's downsampling factor {multiple}", what.display());
        }
        let (cw, ch) = (nw / multiple * multiple, nh / multiple * multiple);
        Ok(self.resize(nw, nh, FilterType::Triangle).crop((nw - cw) / 2, (nh - ch) / 2, cw, ch))
    }

    /// Resized to exactly nw x nh: label maps nearest (`resize_nearest`), the others with `filter`.
    pub fn resize(self, nw: u32, nh: u32, filter: FilterType) -> Picture {
        if (nw, nh) == self.dimensions() {
            return self;
        }
        match self {
            Picture::Rgb(i) => Picture::Rgb(image::imageops::resize(&i, nw, nh, filter)),
            Picture::Grey(i) => Picture::Grey(image::imageops::resize(&i, nw, nh, filter)),
            labels @ Picture::Labels(_) => labels.resize_nearest(nw, nh),
        }
    }

    /// The w x h window whose top-left pixel is (x0, y0).
    pub fn crop(&self, x0: u32, y0: u32, w: u32, h: u32) -> Picture {
        use image::imageops::crop_imm;
        match self {
            Picture::Rgb(i) => Picture::Rgb(crop_imm(i, x0, y0, w, h).to_image()),
            Picture::Grey(i) => Picture::Grey(crop_imm(i, x0, y0, w, h).to_image()),
            Picture::Labels(i) => Picture::Labels(crop_imm(i, x0, y0, w, h).to_image()),
        }
    }

    /// Nearest-neighbour resize to exactly w x h (torch's `interpolate(mode="nearest")`:
    /// source = floor(dst * in / out)), as the reference's `downsample_cond_size`.
    pub fn resize_nearest(&self, nw: u32, nh: u32) -> Picture {
        fn nearest<P: image::Pixel>(
            i: &ImageBuffer<P, Vec<P::Subpixel>>,
            nw: u32,
            nh: u32,
        ) -> ImageBuffer<P, Vec<P::Subpixel>> {
            let (w, h) = i.dimensions();
            ImageBuffer::from_fn(nw, nh, |x, y| {
                *i.get_pixel((x as u64 * w as u64 / nw as u64) as u32, (y as u64 * h as u64 / nh as u64) as u32)
            })
        }
        match self {
            Picture::Rgb(i) => Picture::Rgb(nearest(i, nw, nh)),
            Picture::Grey(i) => Picture::Grey(nearest(i, nw, nh)),
            Picture::Labels(i) => Picture::Labels(nearest(i, nw, nh)),
        }
    }

    /// Mirrored left to right.
    pub fn flip_horizontal(&self) -> Picture {
        use image::imageops::flip_horizontal as flip;
        match self {
            Picture::Rgb(i) => Picture::Rgb(flip(i)),
            Picture::Grey(i) => Picture::Grey(flip(i)),
            Picture::Labels(i) => Picture::Labels(flip(i)),
        }
    }

    /// For pictures: grey maps as grey, labels in the model's `colorize` colours.
    pub fn to_rgb(&self, colorize: Option<&[f32]>) -> RgbImage {
        match self {
            Picture::Rgb(i) => i.clone(),
            Picture::Grey(i) => RgbImage::from_fn(i.width(), i.height(), |x, y| {
                let v = ((i.get_pixel(x, y)[0].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                image::Rgb([v, v, v])
            }),
            Picture::Labels(i) => {
                let palette = label_palette(colorize, i.pixels().map(|p| p[0]).max().unwrap_or(0) as usize + 1);
                RgbImage::from_fn(i.width(), i.height(), |x, y| palette[i.get_pixel(x, y)[0] as usize])
            }
        }
    }
}

/// Colours of labels 0..n: the reference's `to_rgb` (a 1x1 convolution of the one-hot map with
/// `colorize` [3, n_labels], scaled to [-1, 1] by its min and max), with the min and max taken
/// over the whole projection so a label keeps its colour in every picture. Without a
/// `colorize`, a fixed hash of the label.
pub fn label_palette(colorize: Option<&[f32]>, n: usize) -> Vec<image::Rgb<u8>> {
    match colorize {
        Some(c) if c.len() >= 3 * n && n > 0 => {
            let labels = c.len() / 3;
            let (lo, hi) = c.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            (0..n)
                .map(|k| {
                    let ch = |i: usize| (255.0 * (c[i * labels + k] - lo) / (hi - lo).max(1e-8)).round() as u8;
                    image::Rgb([ch(0), ch(1), ch(2)])
                })
                .collect()
        }
        _ => (0..n)
            .map(|k| {
                let h = (k as u32).wrapping_mul(2654435761);
                image::Rgb([(h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8])
            })
            .collect(),
    }
}

/// Same-sized pictures as the model's input tensor [B, C, H, W] (label maps one-hot).
pub fn batch_tensor(gpu: &Arc<Gpu>, kind: Kind, pics: &[&Picture]) -> Result<Tensor> {
    let (w, h) = pics[0].dimensions();
    let (w, h) = (w as usize, h as usize);
    if let Kind::Labels(n) = kind {
        let mut ids = Vec::with_capacity(pics.len() * w * h);
        for p in pics {
            match p {
                Picture::Labels(i) => ids.extend_from_slice(i.as_raw()),
                _ => bail!("a segmentation model reads label maps"),
            }
        }
        return quantize::one_hot(&ids, pics.len(), h, w, n, gpu);
    }
    let mut data = Vec::with_capacity(pics.len() * kind.channels() * w * h);
    for p in pics {
        match p {
            Picture::Rgb(i) => images::to_chw(i, &mut data),
            Picture::Grey(i) => data.extend_from_slice(i.as_raw()),
            Picture::Labels(_) => bail!("a model of {} does not read label maps", kind.describe()),
        }
    }
    Tensor::from_f32(gpu, &data, &[pics.len(), kind.channels(), h, w])
}

/// The model's output [B, C, H, W] as pictures: photos and maps clamped to [-1, 1], label
/// logits as the most likely label (the reference's argmax in `log_images`).
pub fn from_output(kind: Kind, out: &Tensor) -> Result<Vec<Picture>> {
    let (b, c, h, w) = (out.dim(0), out.dim(1), out.dim(2) as u32, out.dim(3) as u32);
    let plane = (h * w) as usize;
    Ok(match kind {
        Kind::Labels(_) => {
            let ids = quantize::argmax_channels(out)?.to_u32_vec()?;
            ids.chunks(plane)
                .map(|p| Picture::Labels(ImageBuffer::from_raw(w, h, p.to_vec()).expect("plane")))
                .collect()
        }
        Kind::Rgb => {
            let v = out.to_vec()?;
            v.chunks(c * plane).map(|s| Picture::Rgb(images::from_chw(s, h, w))).collect()
        }
        Kind::Grey => {
            let v = out.to_vec()?;
            (0..b)
                .map(|i| {
                    let s = v[i * c * plane..i * c * plane + plane].iter().map(|x| x.clamp(-1.0, 1.0)).collect();
                    Picture::Grey(ImageBuffer::from_raw(w, h, s).expect("plane"))
                })
                .collect()
        }
    })
}

/// How close a reconstruction is: PSNR in dB for photos (8-bit) and maps (range [-1, 1]), the
/// share of pixels with the right label for label maps.
pub fn agreement(a: &Picture, b: &Picture) -> (f64, &'static str) {
    match (a, b) {
        (Picture::Rgb(x), Picture::Rgb(y)) => (images::psnr(x, y), "dB PSNR"),
        (Picture::Grey(x), Picture::Grey(y)) => {
            let mse = x.as_raw().iter().zip(y.as_raw()).map(|(&p, &q)| ((p - q) as f64).powi(2)).sum::<f64>()
                / x.as_raw().len().max(1) as f64;
            (if mse == 0.0 { f64::INFINITY } else { 10.0 * (4.0 / mse).log10() }, "dB PSNR")
        }
        (Picture::Labels(x), Picture::Labels(y)) => {
            let same = x.as_raw().iter().zip(y.as_raw()).filter(|(p, q)| p == q).count();
            (100.0 * same as f64 / x.as_raw().len().max(1) as f64, "% of labels")
        }
        _ => (f64::NAN, "(different kinds)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_in_the_reference_format_is_min_max_normalised() {
        let dir = std::env::temp_dir().join(format!("taming-maps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let depth = [0.5f32, 2.0, 3.5, 2.0];
        let bytes: Vec<u8> = depth.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = dir.join("d.png");
        image::RgbaImage::from_raw(2, 2, bytes).unwrap().save(&path).unwrap();
        let Picture::Grey(g) = load(Kind::Grey, &path).unwrap() else { panic!("not grey") };
        assert_eq!(g.as_raw(), &vec![-1.0, 0.0, 1.0, 0.0]);
        let labels = image::GrayImage::from_raw(2, 2, vec![0, 3, 4, 1]).unwrap();
        labels.save(&path).unwrap();
        let e = load(Kind::Labels(4), &path).unwrap_err().to_string();
        assert!(e.contains("label 4 is outside the model's 4 labels") && e.contains("d.png"), "{e}");
        let Picture::Labels(l) = load(Kind::Labels(5), &path).unwrap() else { panic!("not labels") };
        assert_eq!(l.as_raw(), &vec![0, 3, 4, 1]);
        // torch's nearest: source index floor(dst * in / out).
        let Picture::Labels(small) = Picture::Labels(l).resize_nearest(1, 1) else { panic!() };
        assert_eq!(small.as_raw(), &vec![0]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
