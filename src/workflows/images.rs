//! Images in and out: decoding (RGBA composited on white, grey to RGB),
//! resizing and cropping, [-1, 1] tensors, PNG writing, PSNR, .npy codes.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use image::{imageops::FilterType, RgbImage};

use crate::models::weights::write_atomically;

/// Load an image as RGB; transparency is composited on white.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::open(path).map_err(|e| anyhow!("{}: cannot decode image: {e}", path.display()))?;
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as f32 / 255.0;
        for c in 0..3 {
            o[c] = (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        }
    }
    Ok(out)
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
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': {shape_str}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for &v in data {
        bytes.extend_from_slice(&(v as i64).to_le_bytes());
    }
    write_atomically(path, &bytes)
}

/// Read an integer .npy (int64/int32/uint8..) written by NumPy or `save_npy_i64`.
pub fn load_npy_codes(path: &Path) -> Result<(Vec<usize>, Vec<u32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{}: not a .npy file", path.display());
    }
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(
        bytes.get(start..start + hlen).ok_or_else(|| anyhow!("{}: truncated header", path.display()))?,
    )?;
    if header.contains("'fortran_order': True") {
        bail!("{}: Fortran-order arrays are not supported", path.display());
    }
    let descr = header
        .split("'descr':")
        .nth(1)
        .and_then(|s| s.split('\'').nth(1))
        .ok_or_else(|| anyhow!("{}: no dtype", path.display()))?;
    let shape_s = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow!("{}: no shape", path.display()))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(|d| d.trim())
        .filter(|d| !d.is_empty())
        .map(|d| d.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow!("{}: bad shape '{shape_s}'", path.display()))?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    let width = match descr {
        "<i8" | "<u8" => 8,
        "<i4" | "<u4" => 4,
        "<i2" | "<u2" => 2,
        "|u1" | "|i1" => 1,
        other => bail!("{}: dtype {other} is not an integer type", path.display()),
    };
    if body.len() < n * width {
        bail!("{}: truncated data ({} of {} bytes)", path.display(), body.len(), n * width);
    }
    let data = (0..n)
        .map(|i| {
            let b = &body[i * width..(i + 1) * width];
            let v: i64 = match width {
                8 => i64::from_le_bytes(b.try_into().unwrap()),
                4 => i32::from_le_bytes(b.try_into().unwrap()) as i64,
                2 => i16::from_le_bytes(b.try_into().unwrap()) as i64,
                _ => b[0] as i64,
            };
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
