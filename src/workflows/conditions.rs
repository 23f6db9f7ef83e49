//! The condition of a spatially conditioned transformer, as codes: a picture (photo, depth map
//! or label map) encoded by the cond stage's autoencoder, or the pixel coordinates the
//! reference's `CoordStage` quantizes (FacesHQ).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use image::imageops::FilterType;
use image::ImageBuffer;

use super::maps::{self, Kind, Picture};
use crate::engine::{Gpu, Tape};
use crate::models::cond_transformer::{Conditioning, Net2NetConfig};
use crate::models::vqgan::Vqgan;
use crate::models::weights::ModelFile;

pub enum CondStage {
    /// A second autoencoder and the kind of picture it reads.
    Vq {
        vq: Box<Vqgan>,
        kind: Kind,
    },
    Coord {
        n_embed: usize,
        down_factor: usize,
    },
}

impl CondStage {
    /// The transformer file's cond stage; None for unconditional and class-conditional models.
    pub fn load(file: &ModelFile, gpu: &Arc<Gpu>, net: &Net2NetConfig) -> Result<Option<CondStage>> {
        Ok(match &net.cond {
            Conditioning::Spatial { .. } => {
                let cfg = net.cond.cond_vqgan().expect("spatial")?;
                let kind = Kind::of(&cfg)?;
                Some(CondStage::Vq { vq: Box::new(Vqgan::load(file, gpu, cfg, "cond_stage_model.")?), kind })
            }
            Conditioning::Coord { n_embed, down_factor } => {
                Some(CondStage::Coord { n_embed: *n_embed, down_factor: *down_factor })
            }
            _ => None,
        })
    }

    /// What the condition is made of: a picture of this kind, or None (coordinates).
    pub fn kind(&self) -> Option<Kind> {
        match self {
            CondStage::Vq { kind, .. } => Some(*kind),
            CondStage::Coord { .. } => None,
        }
    }

    /// A condition picture read as the cond stage's kind, resized to cover ph x pw and
    /// center-cropped (label maps without blending).
    pub fn fit(&self, path: &Path, ph: usize, pw: usize) -> Result<Picture> {
        let Some(kind) = self.kind() else { bail!("this model is conditioned on coordinates, not on pictures") };
        fit(maps::load(kind, path)?, ph, pw)
    }

    /// The codes of conditions [B] at the image's size: pictures (ph x pw, one per sample), or
    /// for coordinates `pics` is empty and `count` copies of the coordinates of a ph x pw image.
    /// `downsample` is the reference's `downsample_cond_size`.
    pub fn encode(
        &self,
        gpu: &Arc<Gpu>,
        pics: &[&Picture],
        count: usize,
        (ph, pw): (usize, usize),
        downsample: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        match self {
            CondStage::Coord { n_embed, down_factor } => {
                let map = Picture::Grey(coordinates(ph as u32, pw as u32));
                let map = match downsample {
                    Some(s) => map.resize_nearest(s as u32, s as u32),
                    None => map,
                };
                let Picture::Grey(m) = map else { unreachable!() };
                let (w, h) = m.dimensions();
                let codes = coord_codes(m.as_raw(), h as usize, w as usize, *n_embed, *down_factor)?;
                Ok(vec![codes; count])
            }
            CondStage::Vq { vq, kind } => {
                let small: Vec<Picture>;
                let pics = match downsample {
                    Some(s) => {
                        small = pics.iter().map(|p| p.resize_nearest(s as u32, s as u32)).collect();
                        small.iter().collect::<Vec<_>>()
                    }
                    None => pics.to_vec(),
                };
                let t = Tape::inference();
                let p = vq.params.constants(&t);
                let mut out = Vec::new();
                for group in pics.chunks(4) {
                    let x = t.constant(maps::batch_tensor(gpu, *kind, group)?);
                    out.extend(vq.encode_indices(&t, &p, &x)?.0);
                }
                Ok(out)
            }
        }
    }
}

/// Resize to cover ph x pw, then center-crop: photos and maps bilinear, labels nearest.
pub fn fit(pic: Picture, ph: usize, pw: usize) -> Result<Picture> {
    let (w, h) = pic.dimensions();
    let scale = (ph as f64 / h as f64).max(pw as f64 / w as f64);
    let (nw, nh) =
        (((w as f64 * scale).round() as u32).max(pw as u32), ((h as f64 * scale).round() as u32).max(ph as u32));
    let (x0, y0) = ((nw - pw as u32) / 2, (nh - ph as u32) / 2);
    Ok(pic.resize(nw, nh, FilterType::Triangle).crop(x0, y0, pw as u32, ph as u32))
}

/// Nearest resize of a batch [B, C, H, W] to s x s (torch's `interpolate(size=(s, s))`, as
/// `downsample_cond_size`).
pub fn resize_nearest_chw(data: &[f32], shape: &[usize], s: usize) -> (Vec<f32>, Vec<usize>) {
    let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mut out = Vec::with_capacity(b * c * s * s);
    for plane in data.chunks(h * w).take(b * c) {
        for y in 0..s {
            for x in 0..s {
                out.push(plane[(y * h / s) * w + x * w / s]);
            }
        }
    }
    (out, vec![b, c, s, s])
}

/// The reference's FacesHQ coordinates of an h x w image: (y w + x) / (h w), in [0, 1).
pub fn coordinates(h: u32, w: u32) -> ImageBuffer<image::Luma<f32>, Vec<f32>> {
    let n = (h as f64) * (w as f64);
    ImageBuffer::from_fn(w, h, |x, y| image::Luma([((y as f64 * w as f64 + x as f64) / n) as f32]))
}

/// `CoordStage.encode`: the mean of each down x down block of `map` (h x w, values in [0, 1];
/// torch's area interpolation), clamped to [0, 1], times n_embed, rounded half to even.
pub fn coord_codes(map: &[f32], h: usize, w: usize, n_embed: usize, down: usize) -> Result<Vec<u32>> {
    if !h.is_multiple_of(down) || !w.is_multiple_of(down) || map.len() != h * w {
        bail!("a {h}x{w} coordinate map is not a whole number of {down}x{down} blocks");
    }
    if map.iter().any(|v| !(0.0..=1.0).contains(v)) {
        bail!("coordinates must lie in [0, 1]");
    }
    let (bh, bw) = (h / down, w / down);
    let mut out = Vec::with_capacity(bh * bw);
    for by in 0..bh {
        for bx in 0..bw {
            let mut sum = 0f64;
            for y in by * down..(by + 1) * down {
                for x in bx * down..(bx + 1) * down {
                    sum += map[y * w + x] as f64;
                }
            }
            let mean = ((sum / (down * down) as f64) as f32).clamp(0.0, 1.0);
            out.push((n_embed as f32 * mean).round_ties_even() as u32);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_quantize_as_the_coord_stage() {
        // 4x4 image, 2x2 blocks, 8 levels: block means (y*4+x)/16 = 2.5/16, 4.5/16, 10.5/16, 12.5/16.
        let m = coordinates(4, 4);
        assert_eq!(m.get_pixel(1, 2)[0], 9.0 / 16.0);
        let codes = coord_codes(m.as_raw(), 4, 4, 8, 2).unwrap();
        // 8 * [0.15625, 0.28125, 0.65625, 0.78125] = 1.25, 2.25, 5.25, 6.25
        assert_eq!(codes, vec![1, 2, 5, 6]);
        assert!(coord_codes(m.as_raw(), 4, 4, 8, 3).is_err());
        assert_eq!(coord_codes(&[0.5, 0.5, 0.5, 0.5], 2, 2, 3, 2).unwrap(), vec![2], "1.5 rounds to even");
    }
}
