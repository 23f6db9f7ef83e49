//! Data-parallel training on MPI (`cargo test --release --features mpi --test mpi`; needs
//! `mpirun`, e.g. Debian's openmpi-bin): 2 ranks × batch 4 reach the same parameters and Adam
//! moments as 1 process × batch 8, and a 2-rank run killed after a checkpoint resumes (with 2
//! ranks) to the same result as an uninterrupted single process.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use taming::models::weights::ModelFile;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taming-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Fifteen 32x32 images of coloured shapes (an odd count: the ranks tokenize unequal shares).
fn images(dir: &Path) -> PathBuf {
    let data = dir.join("images");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..15u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let inside = (x as i32 - 16).abs() + (y as i32 - 16).abs() < 4 + i as i32;
            if inside {
                image::Rgb([(15 * i) as u8, 200 - (10 * i) as u8, (x * 7) as u8])
            } else {
                image::Rgb([255, (y * 6) as u8, 255])
            }
        });
        img.save(data.join(format!("img{i:02}.png"))).unwrap();
    }
    data
}

/// A tiny unconditional GPT without dropout (dropout masks are drawn per rank).
const CONFIG: &str = r#"
model:
  base_learning_rate: 1.0e-4
  params:
    transformer_config:
      params: {n_layer: 1, n_head: 2, n_embd: 32}
train: {batch_size: 8, log_every: 1, val_images: 4, grad_clip: 1.0}
"#;

fn taming(ranks: usize) -> Command {
    let exe = env!("CARGO_BIN_EXE_taming");
    let mut c = if ranks == 1 {
        Command::new(exe)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "--allow-run-as-root", "-np", &ranks.to_string(), exe]);
        c
    };
    c.env("XDG_RUNTIME_DIR", "/tmp");
    c
}

fn train_args(dir: &Path, out: &str, steps: u64, save_every: u64) -> Vec<String> {
    let vqgan = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/class_transformer/model.safetensors");
    [
        "train-transformer",
        "--vqgan",
        vqgan.to_str().unwrap(),
        "--data",
        dir.join("images").to_str().unwrap(),
        "--config",
        dir.join("gpt.yaml").to_str().unwrap(),
        "--out",
        dir.join(out).to_str().unwrap(),
        "--steps",
        &steps.to_string(),
        "--save-every",
        &save_every.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e} (is mpirun installed? Debian: openmpi-bin)"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn state(run: &Path) -> Vec<(String, Vec<f32>)> {
    let f = ModelFile::open_tensors(&run.join("train_state.safetensors")).unwrap();
    let mut names = f.names();
    names.sort();
    names.into_iter().map(|n| (n.clone(), f.host(&n, None).unwrap().0)).collect()
}

fn step_of(run: &Path) -> Option<u64> {
    let f = ModelFile::open_tensors(&run.join("train_state.safetensors")).ok()?;
    f.metadata("step")?.parse().ok()
}

/// Every tensor of two runs' states within `tol` of its largest magnitude (the ranks sum their
/// halves of the batch in another order than one process does). Some parameters have a gradient
/// of zero in exact arithmetic (the attention's key bias: a softmax ignores a constant added to a
/// row; a bias before a GroupNorm of one channel per group): Adam normalises their rounding noise
/// into steps of up to lr, in either direction. They are found by their second moment (below 1e-6
/// of the run's largest, where the others are above 1e-4 of it) and held to `noise_bound`
/// (absolute), their moments not compared.
fn assert_same_state(a: &Path, b: &Path, tol: f32, noise_bound: f32) {
    let (sa, sb) = (state(a), state(b));
    assert_eq!(sa.len(), sb.len());
    assert!(sa.len() > 10, "{} tensors", sa.len());
    // "opt.v.rest" -> sqrt(max v) by rest (the parameter's name after its model prefix).
    let rms: std::collections::HashMap<String, f32> = sa
        .iter()
        .filter_map(|(n, v)| {
            let rest = n.split_once('.')?.1.strip_prefix("v.")?;
            Some((rest.to_string(), v.iter().fold(0f32, |m, x| m.max(*x)).sqrt()))
        })
        .collect();
    let largest = rms.values().fold(0f32, |m, x| m.max(*x));
    assert!(largest > 0.0);
    let mut noise = 0;
    for ((na, va), (nb, vb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        let rest = na.split_once('.').map_or(na.as_str(), |(_, r)| r);
        let (is_moment, param) = match rest.strip_prefix("m.").or(rest.strip_prefix("v.")) {
            Some(p) => (true, p),
            None => (false, rest),
        };
        let worst = va.iter().zip(vb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        if rms.get(param).is_some_and(|&r| r < 1e-6 * largest) {
            noise += 1;
            assert!(is_moment || worst <= noise_bound, "{na} (zero gradient): differs by {worst:e}");
            continue;
        }
        let scale = va.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        assert!(worst <= tol * scale, "{na}: differs by {worst:e} (scale {scale:e})");
    }
    assert!(noise < sa.len() / 4, "{noise} of {} tensors look like noise", sa.len());
}

#[test]
fn two_ranks_of_batch_4_equal_one_process_of_batch_8() {
    let dir = tmp("parity");
    images(&dir);
    std::fs::write(dir.join("gpt.yaml"), CONFIG).unwrap();
    let mut one = taming(1);
    one.args(train_args(&dir, "one", 4, 4));
    run(one, "1 process");
    let mut two = taming(2);
    two.args(train_args(&dir, "two", 4, 4));
    run(two, "2 ranks");
    assert_eq!(step_of(&dir.join("two")), Some(4));
    assert_same_state(&dir.join("one"), &dir.join("two"), 1e-4, 2.0 * 8e-4 * 4.0);
    // The code cache the two ranks tokenized in shares (7 and 8 images) is the one process's.
    let codes = |run: &str| std::fs::read(dir.join(run).join("codes.safetensors")).unwrap();
    assert!(codes("one") == codes("two"), "the ranks' code cache differs");
    // Rank 0 alone wrote the log: one line per step (and the codebook line), not two.
    let log = std::fs::read_to_string(dir.join("two/log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 4, "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_two_rank_run_resumes() {
    let dir = tmp("resume");
    images(&dir);
    std::fs::write(dir.join("gpt.yaml"), CONFIG).unwrap();
    let steps = 40;
    let mut reference = taming(1);
    reference.args(train_args(&dir, "one", steps, 2));
    run(reference, "1 process");
    // Two ranks, stopped (SIGTERM to mpirun) once a checkpoint is on disk.
    let mut two = taming(2);
    two.args(train_args(&dir, "two", steps, 2)).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = two.spawn().unwrap();
    let started = Instant::now();
    let killed_at = loop {
        if let Some(s) = step_of(&dir.join("two")) {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
            break s;
        }
        assert!(child.try_wait().unwrap().is_none(), "the 2-rank run ended before its first checkpoint");
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.wait();
    let at = step_of(&dir.join("two")).unwrap();
    assert!(at < steps, "killed at step {killed_at}, checkpoint {at}: the run had finished");
    let mut resumed = taming(2);
    resumed.args(train_args(&dir, "two", steps, 2)).arg("--resume");
    run(resumed, "2 ranks, resumed");
    assert_eq!(step_of(&dir.join("two")), Some(steps));
    assert_same_state(&dir.join("one"), &dir.join("two"), 1e-3, 2.0 * 8e-4 * 40.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny VQGAN (L1 + codebook; the discriminator starts after the run, and no LPIPS weights),
/// with dead-code restarts after one unused step (the ranks gather the batch's codes and rows).
const VQGAN_CONFIG: &str = r#"
model:
  base_learning_rate: 1.0e-4
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 8
    n_embed: 16
    ddconfig: {double_z: false, z_channels: 8, resolution: 16, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 1000, disc_ndf: 8, disc_num_layers: 1, perceptual_weight: 0.0}
train: {batch_size: 4, size: 16, resize: 16, log_every: 1, val_images: 2, workers: 1, dead_code_steps: 1}
"#;

#[test]
fn vqgan_two_ranks_of_batch_2_equal_one_process_of_batch_4() {
    let dir = tmp("vqgan");
    let data = images(&dir);
    std::fs::write(dir.join("vq.yaml"), VQGAN_CONFIG).unwrap();
    let args = |out: &str| -> Vec<String> {
        let (c, o) = (dir.join("vq.yaml"), dir.join(out));
        ["train-vqgan", "--data", data.to_str().unwrap(), "--config", c.to_str().unwrap(), "--out", o.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .chain(["--steps", "3", "--save-every", "3"].map(String::from))
            .collect()
    };
    let mut one = taming(1);
    one.args(args("one"));
    run(one, "1 process");
    let mut two = taming(2);
    two.args(args("two"));
    run(two, "2 ranks");
    assert_eq!(step_of(&dir.join("two")), Some(3));
    assert_same_state(&dir.join("one"), &dir.join("two"), 1e-4, 2.0 * 4e-4 * 3.0);
    let _ = std::fs::remove_dir_all(&dir);
}
