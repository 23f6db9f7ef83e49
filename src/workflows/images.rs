//! Images in and out: decoding (RGBA composited on white, grey to RGB),
//! resizing and cropping, [-1, 1] tensors, PNG writing, PSNR, .npy codes.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::{imageops::FilterType, RgbImage};

use crate::models::weights::write_atomically;

/// Load an image as RGB; transparency is composited on white.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::open(path).map_err(|e| anyhow!("{}: cannot decode image: {e}", path.display()))?;
    Ok(rgb_on_white(&img))
}

/// An image as RGB, transparency composited on white.
pub fn rgb_on_white(img: &image::DynamicImage) -> RgbImage {
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as f32 / 255.0;
        for c in 0..3 {
            o[c] = (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        }
    }
    out
}

/// Resize the short side to `size` (if given), then center-crop to a multiple of `multiple`.
pub fn prepare(img: RgbImage, size: Option<u32>, multiple: u32, what: &Path) -> Result<RgbImage> {
    let mut img = img;
    if let Some(s) = size {
        let (w, h) = img.dimensions();
        let scale = s as f32 / w.min(h) as f32;
        let (nw, nh) = (((w as f32 * scale).round() as u32).max(s), ((h as f32 * scale).round() as u32).max(s));
        img = image::imageops::resize(&img, nw, nh, FilterType::Lanczos3);
    }
    let (w, h) = img.dimensions();
    if w < multiple || h < multiple {
        bail!("{}: {w}x{h} is smaller than the model's downsampling factor {multiple}", what.display());
    }
    let (cw, ch) = (w / multiple * multiple, h / multiple * multiple);
    Ok(image::imageops::crop_imm(&img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image())
}

/// [3, H, W] floats in [-1, 1], appended to `out`.
pub fn to_chw(img: &RgbImage, out: &mut Vec<f32>) {
    let (w, h) = img.dimensions();
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                out.push(img.get_pixel(x, y)[c] as f32 / 127.5 - 1.0);
            }
        }
    }
}

/// One [3, H, W] image in [-1, 1] back to 8-bit RGB.
pub fn from_chw(data: &[f32], h: u32, w: u32) -> RgbImage {
    let plane = (h * w) as usize;
    RgbImage::from_fn(w, h, |x, y| {
        let i = (y * w + x) as usize;
        let px = |c: usize| ((data[c * plane + i].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
        image::Rgb([px(0), px(1), px(2)])
    })
}

/// PSNR in dB between two 8-bit images.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Write atomically: a temp file beside the target, then rename.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    write_atomically(path, &bytes)
}

/// Images side by side with a 2-pixel white gap.
pub fn side_by_side(images: &[&RgbImage]) -> RgbImage {
    let h = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let w: u32 = images.iter().map(|i| i.width()).sum::<u32>() + 2 * (images.len().saturating_sub(1) as u32);
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut x0 = 0;
    for img in images {
        image::imageops::replace(&mut out, *img, x0 as i64, 0);
        x0 += img.width() + 2;
    }
    out
}

/// Integer codes as a NumPy .npy file (int64, C order), written atomically.
pub fn save_npy_i64(path: &Path, shape: &[usize], data: &[u32]) -> Result<()> {
    use npyz::WriterBuilder;
    let mut bytes = Vec::new();
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&dims).writer(&mut bytes).begin_nd()?;
    w.extend(data.iter().map(|&v| v as i64))?;
    w.finish()?;
    write_atomically(path, &bytes)
}

/// Read integer codes from a .npy file as numpy writes it: any integer dtype
/// (signed or not, 1 to 8 bytes, either byte order), C or Fortran order.
pub fn load_npy_codes(path: &Path) -> Result<(Vec<usize>, Vec<u32>)> {
    use npyz::TypeChar;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| anyhow!("{}: not a .npy file ({e})", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let dtype = npy.dtype();
    let npyz::DType::Plain(ts) = &dtype else {
        bail!("{}: dtype {} is not an integer type", path.display(), dtype.descr());
    };
    let truncated = |e: std::io::Error| anyhow!("{}: truncated or unreadable data ({e})", path.display());
    let values: Vec<i128> = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Int, 1) => npy.into_vec::<i8>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Int, 2) => npy.into_vec::<i16>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Int, 4) => npy.into_vec::<i32>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Int, 8) => npy.into_vec::<i64>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Uint, 1) => npy.into_vec::<u8>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Uint, 2) => npy.into_vec::<u16>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Uint, 4) => npy.into_vec::<u32>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        (TypeChar::Uint, 8) => npy.into_vec::<u64>().map_err(truncated)?.into_iter().map(i128::from).collect(),
        _ => bail!("{}: dtype {ts} is not an integer type", path.display()),
    };
    let n: usize = shape.iter().product();
    if values.len() != n {
        bail!("{}: {} values for shape {shape:?}", path.display(), values.len());
    }
    // Fortran order: the first index varies fastest; gather into C order.
    let at = |i: usize| -> usize {
        if !fortran {
            return i;
        }
        let (mut rest, mut j, mut stride) = (i, 0, 1);
        let mut idx = vec![0; shape.len()];
        for (k, &d) in shape.iter().enumerate().rev() {
            idx[k] = rest % d.max(1);
            rest /= d.max(1);
        }
        for (k, &d) in shape.iter().enumerate() {
            j += idx[k] * stride;
            stride *= d;
        }
        j
    };
    let data = (0..n)
        .map(|i| {
            let v = values[at(i)];
            u32::try_from(v).map_err(|_| anyhow!("{}: negative or huge code {v}", path.display()))
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((shape, data))
}

/// Tiles in rows of `cols`, 2-pixel white gaps.
pub fn grid(tiles: &[RgbImage], cols: usize) -> RgbImage {
    let rows: Vec<RgbImage> = tiles.chunks(cols.max(1)).map(|r| side_by_side(&r.iter().collect::<Vec<_>>())).collect();
    let w = rows.iter().map(|r| r.width()).max().unwrap_or(0);
    let h: u32 = rows.iter().map(|r| r.height()).sum::<u32>() + 2 * rows.len().saturating_sub(1) as u32;
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut y = 0;
    for r in &rows {
        image::imageops::replace(&mut out, r, 0, y as i64);
        y += r.height() + 2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chw_round_trip_and_psnr() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 50) as u8, (y * 80) as u8, 255]));
        let mut chw = Vec::new();
        to_chw(&img, &mut chw);
        assert_eq!(chw.len(), 3 * 5 * 3);
        assert!(chw.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(from_chw(&chw, 3, 5), img);
        assert_eq!(psnr(&img, &img), f64::INFINITY);
        let mut off = img.clone();
        off.as_mut().iter_mut().for_each(|v| *v = v.saturating_sub(1));
        // Mostly one level off: about 48 dB.
        assert!((45.0..60.0).contains(&psnr(&img, &off)), "{}", psnr(&img, &off));
    }
}
