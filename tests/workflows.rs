//! reconstruct / encode / decode on real images with the fixture model.

mod common;
use common::gpu;

use taming::workflows::autoencode::{decode, encode, reconstruct, ImageOptions};
use taming::workflows::images::{load_npy_codes, save_npy_i64};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("taming-wf-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn npy_codes_round_trip() {
    let d = tmp("npy");
    let p = d.join("c.npy");
    let data: Vec<u32> = (0..24).collect();
    save_npy_i64(&p, &[2, 3, 4], &data).unwrap();
    assert_eq!(load_npy_codes(&p).unwrap(), (vec![2, 3, 4], data));
    std::fs::write(&p, b"junk").unwrap();
    assert!(load_npy_codes(&p).is_err());
    // Files as numpy writes them in other dtypes, byte orders and layouts.
    let npy = |descr: &str, fortran: bool, shape: &str, body: &[u8]| -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(body);
        b
    };
    let be32: Vec<u8> = [7u32, 0, 1023].iter().flat_map(|v| (*v as i32).to_be_bytes()).collect();
    let cases: [(Vec<u8>, Vec<usize>, Vec<u32>); 4] = [
        (npy(">i4", false, "(3,)", &be32), vec![3], vec![7, 0, 1023]),
        (npy("|u1", false, "(2, 2)", &[1, 2, 3, 250]), vec![2, 2], vec![1, 2, 3, 250]),
        // Fortran order: [[0, 1, 2], [3, 4, 5]] stored column by column.
        (npy("<u2", true, "(2, 3)", &[0, 0, 3, 0, 1, 0, 4, 0, 2, 0, 5, 0]), vec![2, 3], vec![0, 1, 2, 3, 4, 5]),
        (npy("<i8", false, "(1, 2)", &[9, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]), vec![1, 2], vec![9, 8]),
    ];
    for (bytes, shape, want) in cases {
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(load_npy_codes(&p).unwrap(), (shape, want));
    }
    // Floats, negative codes and truncated data are errors naming the file.
    for bad in [
        npy("<f4", false, "(1,)", &[0, 0, 128, 63]),
        npy("<i2", false, "(1,)", &[255, 255]),
        npy("<i4", false, "(4,)", &[1, 0]),
    ] {
        std::fs::write(&p, &bad).unwrap();
        let e = load_npy_codes(&p).unwrap_err().to_string();
        assert!(e.contains("c.npy"), "{e}");
    }
}

#[test]
fn reconstruct_encode_decode_on_emoji() {
    let Some(fixtures) = common::fixtures_dir() else { return };
    let model = fixtures.join("vqgan/model.safetensors");
    let data = fixtures.join("../data/emoji/noto");
    let mut imgs: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().path()).collect();
    imgs.sort();
    imgs.truncate(3);
    let out = tmp("rec");
    let opts = ImageOptions { size: Some(32), batch: 2 };
    let psnr = reconstruct(&gpu(), &model, &imgs, &out, &opts).unwrap();
    assert_eq!(psnr.len(), 3);
    assert!(psnr.iter().all(|p| p.is_finite() && *p > 0.0));
    let pair = image::open(out.join(format!("{}_rec.png", imgs[0].file_stem().unwrap().to_string_lossy()))).unwrap();
    assert_eq!((pair.width(), pair.height()), (32 + 2 + 32, 32));

    let codes = out.join("codes.npy");
    assert_eq!(encode(&gpu(), &model, &imgs, &codes, &opts).unwrap(), vec![3, 8, 8]);
    let (shape, c) = load_npy_codes(&codes).unwrap();
    assert_eq!(shape, vec![3, 8, 8]);
    assert!(c.iter().all(|&v| v < 64));
    // In shards (--shard i/n): consecutive shares, each in its own file, together the whole.
    use taming::engine::distributed::Shard;
    let mut joined = Vec::new();
    for i in 0..2 {
        let shard = Shard { index: i, count: 2 };
        let shape = taming::workflows::autoencode::encode_shard(&gpu(), &model, &imgs, &codes, &opts, Some(shard));
        assert_eq!(shape.unwrap()[0], if i == 0 { 1 } else { 2 });
        joined.extend(load_npy_codes(&shard.file(&codes)).unwrap().1);
    }
    assert_eq!(joined, c, "the shards' codes are the whole's");
    let written = decode(&gpu(), &model, &codes, &out.join("dec")).unwrap();
    assert_eq!(written.len(), 3);
    // Decoding the codes gives the reconstruction's right half: the same
    // decoder input up to rounding (reconstruct feeds the straight-through
    // z + (z_q - z), as the reference does), so a pixel near a rounding edge
    // may land one level apart.
    let dec = image::open(&written[0]).unwrap().to_rgb8();
    let rec = image::imageops::crop_imm(&pair.to_rgb8(), 34, 0, 32, 32).to_image();
    let diffs: Vec<i32> = dec.as_raw().iter().zip(rec.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).collect();
    let differing = diffs.iter().filter(|&&d| d > 0).count();
    assert!(
        diffs.iter().all(|&d| d <= 1) && differing * 100 <= diffs.len(),
        "decode vs reconstruct: {differing} of {} bytes differ, by up to {}",
        diffs.len(),
        diffs.iter().max().unwrap()
    );

    // Bad input: an image that does not decode; nothing is written.
    let bad = out.join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let e =
        reconstruct(&gpu(), &model, std::slice::from_ref(&bad), &out.join("none"), &opts).err().unwrap().to_string();
    assert!(e.contains("bad.png") && e.contains("decode"), "{e}");
    assert!(!out.join("none").exists());
    // Codes outside the codebook.
    save_npy_i64(&out.join("big.npy"), &[1, 2, 2], &[0, 1, 2, 999]).unwrap();
    assert!(decode(&gpu(), &model, &out.join("big.npy"), &out.join("dec2")).is_err());
    // An image smaller than the downsampling factor.
    let tiny = out.join("tiny.png");
    image::RgbImage::new(3, 3).save(&tiny).unwrap();
    let e = reconstruct(&gpu(), &model, &[tiny], &out.join("none"), &ImageOptions { size: None, batch: 1 })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("smaller than"), "{e}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn token_picking_follows_temperature_top_k_and_top_p() {
    use taming::workflows::sample::{pick, Rng};
    let logits = [0.0f32, 3.0, 1.0, 2.9];
    let mut rng = Rng::new(1);
    assert_eq!(pick(&logits, 1.0, 1, 1.0, &mut rng), 1); // greedy
    assert_eq!(pick(&logits, 0.0, 0, 1.0, &mut rng), 1); // temperature 0 = greedy
    for _ in 0..50 {
        let t = pick(&logits, 1.0, 2, 1.0, &mut rng); // only the two best survive top-k 2
        assert!(t == 1 || t == 3);
        assert_eq!(pick(&logits, 1.0, 0, 0.01, &mut rng), 1); // tiny nucleus = the best token
    }
    // Sampling follows the softmax: token 1 (p ~ 0.47) comes up about as often as expected.
    let n = 4000;
    let hits = (0..n).filter(|_| pick(&logits, 1.0, 0, 1.0, &mut rng) == 1).count();
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64).exp()).collect();
    let p1 = e[1] / e.iter().sum::<f64>();
    assert!((hits as f64 / n as f64 - p1).abs() < 0.03, "{hits} of {n} vs p = {p1}");
}

#[test]
fn sampling_is_seeded_and_checks_its_arguments() {
    let Some(fixtures) = common::fixtures_dir() else { return };
    use taming::workflows::sample::{sample, SampleOptions};
    let model = fixtures.join("transformer/model.safetensors");
    let out = tmp("sample");
    let o = SampleOptions { n: 3, top_k: 10, top_p: 0.9, seed: 5, batch: 2, ..Default::default() };
    sample(&gpu(), Some(&model), &out.join("a.png"), &o).unwrap();
    sample(&gpu(), Some(&model), &out.join("b.png"), &o).unwrap();
    let (a, b) = (image::open(out.join("a.png")).unwrap().to_rgb8(), image::open(out.join("b.png")).unwrap().to_rgb8());
    assert_eq!(a, b, "the same seed must give the same samples");
    assert_eq!((a.width(), a.height()), (2 * 32 + 2, 2 * 32 + 2)); // 3 samples in a 2x2 grid
    let e = sample(&gpu(), Some(&model), &out.join("c.png"), &SampleOptions { class: Some("1".into()), ..o.clone() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unconditional"), "{e}");
    let e = sample(&gpu(), Some(&fixtures.join("vqgan/model.safetensors")), &out.join("c.png"), &o)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a Net2NetTransformer"), "{e}");
    // Larger than the 8x8-code training window: the sliding window (12x10 codes).
    let big = SampleOptions { n: 1, size: Some((48, 40)), ..o.clone() };
    sample(&gpu(), Some(&model), &out.join("big.png"), &big).unwrap();
    let img = image::open(out.join("big.png")).unwrap();
    assert_eq!((img.width(), img.height()), (40, 48));
    let e = sample(&gpu(), Some(&model), &out.join("d.png"), &SampleOptions { size: Some((30, 32)), ..o.clone() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("multiples of the downsampling factor"), "{e}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn the_shipped_demo_model_samples_without_arguments() {
    use taming::workflows::sample::{sample, SampleOptions};
    // `taming sample` with no --model uses weights/emoji_transformer.safetensors (f16):
    // one row per class of the class-conditional demo.
    let out = tmp("demo");
    let o = SampleOptions { n: 1, ..Default::default() };
    sample(&gpu(), None, &out.join("demo.png"), &o).unwrap();
    let img = image::open(out.join("demo.png")).unwrap();
    assert_eq!((img.width(), img.height()), (32, 9 * 32 + 8 * 2));
    // One PNG per sample and an .npz of them all, as FID tools read it.
    let smileys = SampleOptions {
        n: 2,
        class: Some("smileys".into()),
        per_image: Some(out.join("each")),
        npz: Some(out.join("smileys.npz")),
        ..o.clone()
    };
    sample(&gpu(), None, &out.join("smileys.png"), &smileys).unwrap();
    let each: Vec<image::RgbImage> =
        (0..2).map(|i| image::open(out.join("each").join(format!("{i:06}.png"))).unwrap().to_rgb8()).collect();
    let mut zip = zip::ZipArchive::new(std::fs::File::open(out.join("smileys.npz")).unwrap()).unwrap();
    assert_eq!(zip.file_names().collect::<Vec<_>>(), ["arr_0.npy"]);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name("arr_0.npy").unwrap(), &mut bytes).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(npy.shape(), &[2, 32, 32, 3]);
    let pixels: Vec<u8> = npy.into_vec().unwrap();
    assert_eq!(pixels, each.iter().flat_map(|t| t.as_raw().clone()).collect::<Vec<u8>>());
    // Shard 1 of 2 of 3 samples: samples 1 and 2, numbered so, in its own grid and .npz.
    let shard = taming::engine::distributed::Shard { index: 1, count: 2 };
    let part = SampleOptions { n: 3, per_image: Some(out.join("part")), shard: Some(shard), ..smileys.clone() };
    sample(&gpu(), None, &out.join("part.png"), &part).unwrap();
    assert!(out.join("part.shard-1-of-2.png").exists() && out.join("smileys.shard-1-of-2.npz").exists());
    let named: Vec<bool> = (0..3).map(|i| out.join("part").join(format!("{i:06}.png")).exists()).collect();
    assert_eq!(named, [false, true, true]);
    std::fs::remove_dir_all(&out).ok();
}

/// Image completion: the given codes come back unchanged as the first codes
/// of every sample (KV-cache and sliding-window paths), the rest is sampled;
/// `sample --complete IMAGE --keep-rows K` checks its arguments.
#[test]
fn completion_keeps_the_given_codes() {
    use taming::models::cond_transformer::Net2NetConfig;
    use taming::models::gpt::Gpt;
    use taming::models::weights::ModelFile;
    use taming::workflows::sample::{generate, no_progress, sample, Pick, Rng, SampleOptions};
    let Some(fixtures) = common::fixtures_dir() else { return };
    let model = fixtures.join("transformer/model.safetensors");
    let file = ModelFile::open(&model).unwrap();
    let cfg = Net2NetConfig::from_config(&file.config).unwrap();
    let gpt = Gpt::load(&file, &gpu(), cfg.gpt.clone(), "transformer.").unwrap();
    let side = cfg.latent_side().unwrap();
    let cond = vec![cfg.cond.tokens(None).unwrap(); 2];
    let v = cfg.gpt.vocab_size as u32;
    let opts = Pick { temperature: 1.0, top_k: 0, top_p: 1.0, codes: v as usize };
    for (h, w) in [(side, side), (side + 2, side + 1)] {
        let prefix: Vec<u32> = (0..w as u32 + 3).map(|i| (i * 37) % v).collect();
        let codes =
            generate(&gpt, &cond, false, h, w, side, &prefix, opts, None, &mut Rng::new(3), &mut no_progress).unwrap();
        for row in &codes {
            assert_eq!(row.len(), h * w);
            assert_eq!(&row[..prefix.len()], &prefix[..], "{h}x{w}");
        }
        // Everything given: nothing is sampled.
        let all: Vec<u32> = (0..(h * w) as u32).map(|i| (i * 11) % v).collect();
        let codes =
            generate(&gpt, &cond, false, h, w, side, &all, opts, None, &mut Rng::new(4), &mut no_progress).unwrap();
        assert!(codes.iter().all(|r| r == &all));
    }
    let too_many = vec![0u32; side * side + 1];
    assert!(generate(&gpt, &cond, false, side, side, side, &too_many, opts, None, &mut Rng::new(5), &mut no_progress)
        .is_err());
    // The command: an image's top rows kept; bad arguments named.
    let out = tmp("complete");
    let image = taming::workflows::data::list_images(std::path::Path::new("../shared/data/emoji")).unwrap()[0].clone();
    let o = SampleOptions {
        n: 2,
        top_k: 10,
        seed: 1,
        batch: 2,
        complete: Some(image),
        keep_rows: side / 2,
        ..Default::default()
    };
    sample(&gpu(), Some(&model), &out.join("half.png"), &o).unwrap();
    let e = sample(&gpu(), Some(&model), &out.join("x.png"), &SampleOptions { keep_rows: side + 1, ..o.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("--keep-rows"), "{e}");
    let e = sample(&gpu(), Some(&model), &out.join("x.png"), &SampleOptions { complete: None, ..o.clone() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("--complete"), "{e}");
    std::fs::remove_dir_all(&out).ok();
}

/// `TAMING_PROFILE=gpu`: each dispatch is timed by the device's timestamps (no waits between
/// dispatches), and the table, printed when the device goes, has every kernel's count and time;
/// `gpu-grid` gives a row per kernel and workgroup grid.
#[test]
fn the_gpu_timestamp_profile_times_each_kernel() {
    for mode in ["gpu", "gpu-grid"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_taming"))
            .args(["bench", "rows", "--runs", "1"])
            .env("TAMING_PROFILE", mode)
            .env("XDG_RUNTIME_DIR", "/tmp")
            .output()
            .expect("running taming");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bench rows failed: {err}");
        assert!(err.contains("GPU timestamps"), "no GPU-timestamp profile in: {err}");
        // Rows: total s, share %, count x, median ms, workgroups, kernel (and its grid).
        let rows: Vec<(f64, usize, &str)> = err
            .lines()
            .filter(|l| l.contains("gemv") && l.contains(" x "))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].parse().expect("a total"), f[3].parse().expect("a count"), *f.last().unwrap())
            })
            .collect();
        assert!(!rows.is_empty(), "no row product in the profile: {err}");
        // bench rows times 1x2048 . 2048x512 with f32 and f16 weights: several products of each.
        let (secs, count) = rows.iter().fold((0.0, 0), |(s, n), &(t, c, _)| (s + t, n + c));
        assert!(count >= 2 && secs > 0.0, "{count} row products in {secs} s: {err}");
        for (_, _, last) in &rows {
            let grid = last.starts_with('[') && last.ends_with(']') && last.matches('x').count() == 2;
            assert_eq!(grid, mode == "gpu-grid", "{mode}: row ends in '{last}': {err}");
        }
    }
}

/// A tuning or profile variable that the engine cannot read is an error naming it and its value,
/// never silently the default.
#[test]
fn unreadable_tuning_variables_are_errors_naming_them() {
    for (key, value) in [("TAMING_CHUNK", "abc"), ("TAMING_WINOGRAD", "yes"), ("TAMING_PROFILE", "on")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_taming"))
            .args(["bench", "rows", "--runs", "1"])
            .env(key, value)
            .env("XDG_RUNTIME_DIR", "/tmp")
            .output()
            .expect("running taming");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}={value} was accepted: {err}");
        assert!(err.contains(&format!("{key}={value}")), "the error does not name {key}={value}: {err}");
    }
}

/// `taming tune --help` names every choice the autotuner has (the list is written by hand there).
#[test]
fn tune_help_names_every_knob() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taming")).args(["tune", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).replace(['\n', ' '], "");
    for knob in taming::engine::autotune::knob_names() {
        assert!(help.contains(&format!("{knob},")) || help.contains(&format!("{knob};")), "{knob} missing: {help}");
    }
}
