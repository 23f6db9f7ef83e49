//! `taming bench`: throughput of kernels and of whole models (VQGAN, GPT, their training steps,
//! sampling). Each figure is the median of several timed runs after a warm-up. The README gives the
//! latest figures on lavapipe; their history is in the module docs of the kernels and models they
//! measure (`engine::kernels` and its modules, `models::gpt`, `models::vqgan`).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::engine::kernels::reduce::Reduce;
use crate::engine::kernels::{self, random_vec};
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{Gpu, Tape, Tensor, Var};
use crate::models::gpt::{argmax, Gpt, GptConfig, KvDecoder};
use crate::models::vqgan::{resnet_block, Vqgan, VqganConfig};
use crate::models::weights::{ParamVars, Params};

pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// Median milliseconds per run, for the table.
    pub ms: f64,
}

/// Median wall time in ms of `f` (which must end with the GPU idle).
pub fn median_ms(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(times[times.len() / 2])
}

fn rand_tensor(gpu: &Arc<Gpu>, shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_f32(gpu, &random_vec(n, seed, 1.0), shape)
}

fn gflops(name: &str, flop: f64, ms: f64) -> Figure {
    Figure { name: name.into(), value: flop / ms / 1e6, unit: "GFLOP/s", ms }
}

pub fn kernel_figures(gpu: &Arc<Gpu>, runs: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    use kernels::matmul::matmul;
    // Dispatch round trip: one tiny kernel, submitted and waited for.
    {
        let x = rand_tensor(gpu, &[4, 4], 1)?;
        let ms = median_ms(3, runs.max(20), || {
            let y = kernels::copy::transpose(&x)?;
            drop(y);
            gpu.sync()
        })?;
        report(&Figure { name: "dispatch round trip".into(), value: ms, unit: "ms", ms });
        // 200 dispatches in one submission, each followed by `between` (nothing, or a command).
        let batch = |between: &dyn Fn() -> Result<()>| {
            median_ms(1, runs.max(5), || {
                for _ in 0..200 {
                    drop(kernels::copy::transpose(&x)?);
                    between()?;
                }
                gpu.sync()
            })
        };
        // The cost of one more dispatch inside a long submission (what a
        // token-by-token decoder pays per kernel).
        let ms = batch(&|| Ok(()))?;
        report(&Figure {
            name: "dispatch in a batch of 200 (each)".into(),
            value: ms / 200.0,
            unit: "ms",
            ms: ms / 200.0,
        });
        // What a copy command between two dispatches adds (it ends the compute pass): the
        // training step's flat-texture copies and the optimizer's staging are such commands.
        let staging = Tensor::zeros(gpu, &[64])?;
        let flat = rand_tensor(gpu, &[64, 64], 4)?;
        let copies: [(&str, &dyn Fn() -> Result<()>); 2] = [
            ("buffer copy between dispatches (each)", &|| {
                gpu.copy(x.buffer(), 0, staging.buffer(), 0, 64);
                Ok(())
            }),
            ("flat texture copy between dispatches (each)", &|| {
                drop(kernels::copy::flat_texture(&flat, 0, 4096)?);
                Ok(())
            }),
        ];
        for (name, command) in copies {
            let per = (batch(command)? - ms).max(0.0) / 200.0;
            report(&Figure { name: name.into(), value: per, unit: "ms", ms: per });
        }
    }
    {
        let n = 1024;
        let a = rand_tensor(gpu, &[n, n], 2)?;
        let b = rand_tensor(gpu, &[n, n], 3)?;
        let ms = median_ms(2, runs, || {
            let c = matmul(&a, &b, false, false, None)?;
            drop(c);
            gpu.sync()
        })?;
        report(&gflops("matmul 1024x1024x1024", 2.0 * (n * n * n) as f64, ms));
        let ms = median_ms(2, runs, || {
            let c = matmul(&a, &b, false, true, None)?;
            drop(c);
            gpu.sync()
        })?;
        report(&gflops("matmul 1024x1024x1024 (B transposed)", 2.0 * (n * n * n) as f64, ms));
        // Every product tile this adapter offers, side by side (the autotuner's candidates).
        for tile in crate::engine::device::MM_TILES.iter().filter(|t| t.entry != gpu.tuning.mm_entry) {
            let Ok(tuning) = gpu.tuning.with_tile(&gpu.info, gpu.features, tile.entry) else { continue };
            let other = gpu.variant(tuning)?;
            let (a, b) = (rand_tensor(&other, &[n, n], 2)?, rand_tensor(&other, &[n, n], 3)?);
            let ms = median_ms(1, runs.min(5), || {
                drop(matmul(&a, &b, false, false, None)?);
                other.sync()
            })?;
            report(&gflops(
                &format!("  with tile {} instead of {}", tile.entry, gpu.tuning.mm_entry),
                2.0 * (n * n * n) as f64,
                ms,
            ));
        }
        // The size where a GPU shows its peak (seconds on a software device: 2 runs).
        let n = 4096;
        let (a, b) = (rand_tensor(gpu, &[n, n], 2)?, rand_tensor(gpu, &[n, n], 3)?);
        let ms = median_ms(1, runs.min(2), || {
            drop(matmul(&a, &b, false, false, None)?);
            gpu.sync()
        })?;
        report(&gflops("matmul 4096x4096x4096", 2.0 * (n * n * n) as f64, ms));
    }
    {
        // The product inside the conv below: weights [128, 1152] x patches [1152, 4096].
        let a = rand_tensor(gpu, &[128, 1152], 11)?;
        let b = rand_tensor(gpu, &[1152, 4096], 12)?;
        let ms = median_ms(2, runs, || {
            drop(matmul(&a, &b, false, false, None)?);
            gpu.sync()
        })?;
        report(&gflops("matmul 128x4096x1152 (conv-shaped)", 2.0 * (128 * 4096 * 1152) as f64, ms));
    }
    {
        use kernels::conv2d::{conv2d_with, ConvPath, ConvSpec};
        let x = rand_tensor(gpu, &[1, 128, 64, 64], 4)?;
        let w = rand_tensor(gpu, &[128, 128, 3, 3], 5)?;
        let b = rand_tensor(gpu, &[128], 6)?;
        // The path convolutions take here, then direct implicit GEMM where that
        // is another path. GFLOP/s always count the direct convolution's
        // multiply-adds (Winograd does 4x fewer).
        let winograd = kernels::winograd::applies(&x, &w, ConvSpec::same(1, 1)) && kernels::winograd::pays_off(&x);
        let paths: &[(ConvPath, &str)] = if winograd {
            &[(ConvPath::Best, " (Winograd)"), (ConvPath::Implicit, " (implicit GEMM)")]
        } else {
            &[(ConvPath::Best, "")]
        };
        for &(path, label) in paths {
            let ms = median_ms(2, runs, || {
                drop(conv2d_with(&x, &w, Some(&b), ConvSpec::same(1, 1), path)?);
                gpu.sync()
            })?;
            report(&gflops(
                &format!("conv 3x3 128->128 on 1x128x64x64{label}"),
                2.0 * (128 * 128 * 9 * 64 * 64) as f64,
                ms,
            ));
        }
        let g = rand_tensor(gpu, &[128], 7)?;
        let ms = median_ms(2, runs, || {
            drop(kernels::norm::group_norm(&x, &g, &b, true)?);
            gpu.sync()
        })?;
        // Bytes: read once for the statistics, once to normalise, written once.
        let bytes = 3.0 * 4.0 * (128 * 64 * 64) as f64;
        report(&Figure { name: "group norm + swish on 1x128x64x64".into(), value: bytes / ms / 1e6, unit: "GB/s", ms });
        // The demo VQGAN's largest layer in training: dx and dW (two products of 2·B·H·W·Cout·Cin·9).
        let xs = rand_tensor(gpu, &[8, 32, 32, 32], 11)?;
        let ws = rand_tensor(gpu, &[32, 32, 3, 3], 12)?;
        let dys = rand_tensor(gpu, &[8, 32, 32, 32], 13)?;
        let ms = median_ms(2, runs, || {
            drop(kernels::conv2d::conv2d_backward(&xs, &ws, &dys, ConvSpec::same(1, 1), None)?);
            gpu.sync()
        })?;
        report(&gflops("conv 3x3 32->32 backward on 8x32x32x32", 2.0 * 2.0 * (8 * 32 * 32 * 32 * 32 * 9) as f64, ms));
        let ms = median_ms(2, runs, || {
            drop(conv2d_with(&xs, &ws, None, ConvSpec::same(1, 1), ConvPath::Best)?);
            gpu.sync()
        })?;
        report(&gflops("conv 3x3 32->32 on 8x32x32x32", 2.0 * (8 * 32 * 32 * 32 * 32 * 9) as f64, ms));
        // The bandwidth every elementwise kernel is bounded by: a + b over 4M floats.
        let a = rand_tensor(gpu, &[1 << 22], 8)?;
        let ms = median_ms(2, runs, || {
            drop(kernels::elementwise::add(&a, &a)?);
            gpu.sync()
        })?;
        let bytes = 3.0 * 4.0 * (1 << 22) as f64;
        report(&Figure { name: "elementwise a + b, 4M floats".into(), value: bytes / ms / 1e6, unit: "GB/s", ms });
    }
    {
        let (t, c, heads) = (256, 512, 8);
        let q = rand_tensor(gpu, &[1, t, c], 8)?;
        let k = rand_tensor(gpu, &[1, t, c], 9)?;
        let v = rand_tensor(gpu, &[1, t, c], 10)?;
        let ms = median_ms(2, runs, || {
            drop(kernels::attention::multi_head(&q, &k, &v, heads, true)?);
            gpu.sync()
        })?;
        // QKᵀ and PV over the causal half: 2 * 2 * T²/2 * C.
        report(&gflops("causal attention 8 heads x 256 tokens x 64", 2.0 * (t * t * c) as f64, ms));
    }
    row_product_figures(gpu, runs, &mut report)?;
    // Every other kernel choice, each value on its autotuning workload (the current one marked).
    crate::engine::autotune::side_by_side(gpu, runs.min(3), |knob, value, current, ms| {
        let mark = if current { " (current)" } else { "" };
        report(&Figure { name: format!("variant {knob}={value}{mark}"), value: ms, unit: "ms", ms });
    })
}

/// Token-by-token decoding's products: one row times a packed weight.
pub fn row_product_figures(gpu: &Arc<Gpu>, runs: usize, report: &mut impl FnMut(&Figure)) -> Result<()> {
    {
        // One row times a packed 2048 x 512 weight (a GPT MLP layer).
        let (k, n) = (2048, 512);
        let x = rand_tensor(gpu, &[1, k], 13)?;
        let w = rand_tensor(gpu, &[n, k], 14)?;
        for half in [false, true] {
            // 20 copies (80 MB in f32), one product each, as a decoder step
            // runs them: the weights stream from memory, not cache.
            let copies: Vec<_> =
                (0..20).map(|_| kernels::matmul::pack_row_weight(&w, true, half)).collect::<Result<_>>()?;
            let ms = median_ms(2, runs, || {
                for pw in &copies {
                    drop(kernels::matmul::gemv(&x, pw, None, false)?);
                }
                gpu.sync()
            })? / copies.len() as f64;
            let bytes = (k * n * if half { 2 } else { 4 }) as f64;
            let name = format!("row product 1x{k} . {k}x{n} ({} weights)", if half { "f16" } else { "f32" });
            report(&Figure { name, value: bytes / ms / 1e6, unit: "GB/s", ms });
        }
    }
    Ok(())
}

/// Time one training step (forward, backward, optimizer) and its peak memory.
/// Matrices get weight decay 0.01, vectors none (minGPT's groups).
fn train_step_figures(
    gpu: &Arc<Gpu>,
    name: &str,
    params: &Params,
    runs: usize,
    forward: impl Fn(&Tape, &ParamVars) -> Result<Var>,
    report: &mut impl FnMut(&Figure),
) -> Result<()> {
    let groups: Vec<(Tensor, f32)> = params
        .order
        .iter()
        .map(|n| (params.tensors[n].clone(), if params.tensors[n].rank() >= 2 { 0.01 } else { 0.0 }))
        .collect();
    let mut opt = Adam::new(AdamConfig::adamw(1e-4, 0.9, 0.95), &groups)?;
    let mut peak = 0u64;
    let ms = median_ms(1, runs, || {
        gpu.sync()?;
        gpu.reset_peak_memory();
        let tape = Tape::new();
        let p = params.vars(&tape);
        let loss = forward(&tape, &p)?;
        let grads = tape.backward(&loss)?;
        let gs: Vec<&Tensor> =
            params.order.iter().map(|n| grads.get(&p.vars[n]).expect("every parameter has a gradient")).collect();
        opt.update(&gs)?;
        gpu.sync()?;
        peak = peak.max(gpu.memory_usage().1);
        Ok(())
    })?;
    report(&Figure { name: format!("{name} training step"), value: ms, unit: "ms", ms });
    report(&Figure {
        name: format!("{name} training step peak memory"),
        value: peak as f64 / (1 << 20) as f64,
        unit: "MiB",
        ms,
    });
    Ok(())
}

/// The parameters of `model` whose names start with `prefix`.
fn subset(model: &Params, prefix: &str) -> Params {
    let mut p = Params::default();
    for n in model.order.iter().filter(|n| n.starts_with(prefix)) {
        p.order.push(n.clone());
        p.tensors.insert(n.clone(), model.tensors[n].clone());
    }
    p
}

/// One block of the GPT (models::gpt), random weights: forward alone, then a training step.
fn gpt_block_figures(gpu: &Arc<Gpu>, runs: usize, report: &mut impl FnMut(&Figure)) -> Result<()> {
    let (tl, c, heads) = (256, 512, 8);
    let gpt = Gpt::random(
        gpu,
        GptConfig { vocab_size: 16, block_size: tl, n_layer: 1, n_head: heads, n_embd: c, pdrop: [0.0; 3] },
        1,
    )?;
    let block = subset(&gpt.params, "blocks.0.");
    let x = rand_tensor(gpu, &[tl, c], 20)?;
    {
        // Forward only, for comparison with the reference figure of SPEC.md.
        let tape = Tape::inference();
        let p = block.vars(&tape);
        let ms = median_ms(1, runs, || {
            drop(gpt.block(&tape, &p, "blocks.0", &tape.constant(x.clone()), 1, tl)?);
            gpu.sync()
        })?;
        report(&Figure { name: "GPT block forward (256 tokens, 512 wide, 8 heads)".into(), value: ms, unit: "ms", ms });
    }
    train_step_figures(
        gpu,
        "GPT block (256 tokens, 512 wide, 8 heads)",
        &block,
        runs,
        |t, p| {
            let y = gpt.block(t, p, "blocks.0", &t.constant(x.clone()), 1, tl)?;
            t.reduce(&t.mul(&y, &y)?, Reduce::Mean)
        },
        report,
    )
}

/// One ResnetBlock of the VQGAN (models::vqgan), 128 channels, random weights.
fn resnet_block_figures(gpu: &Arc<Gpu>, runs: usize, report: &mut impl FnMut(&Figure)) -> Result<()> {
    let ch = 128;
    let cfg = VqganConfig {
        ch,
        ch_mult: vec![1],
        num_res_blocks: 1,
        attn_resolutions: vec![],
        in_channels: 3,
        out_ch: 3,
        z_channels: ch,
        double_z: false,
        resolution: 32,
        embed_dim: 4,
        n_embed: 4,
        dropout: 0.0,
        quantizer: crate::models::vqgan::Quantizer::Nearest,
        codebook: Default::default(),
        n_labels: None,
        remap: false,
    };
    // Only the block's weights stay resident, so the peak memory is the block's.
    let block = subset(&Vqgan::random(gpu, cfg, 2)?.params, "encoder.down.0.block.0.");
    let img = rand_tensor(gpu, &[1, ch, 32, 32], 21)?;
    train_step_figures(
        gpu,
        "ResnetBlock 128ch on 1x128x32x32",
        &block,
        runs,
        |t, p| {
            let y = resnet_block(t, p, "encoder.down.0.block.0", t.constant(img.clone()))?;
            t.reduce(&t.mul(&y, &y)?, Reduce::Mean)
        },
        report,
    )
}

pub fn train_figures(gpu: &Arc<Gpu>, runs: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    demo_step_figures(gpu, runs, &mut report)?;
    gpt_block_figures(gpu, runs, &mut report)?;
    resnet_block_figures(gpu, runs, &mut report)
}

/// PyTorch CPU's demo step (the reference's modules, 2 threads, OpenBLAS; median of its runs on
/// the 2-core VM of README's table, 2026-12-04: `tools/torch_bench_train.py vqgan-demo` in
/// ../shared).
const TORCH_DEMO_STEP_MS: f64 = 67.5;

/// The demo VQGAN's training step as `train-vqgan` runs it (weights/emoji_vqgan.yaml: L1 +
/// codebook loss before its disc_start, batch 8 at 32x32, Adam; random weights), the median of
/// at least 9 steps after 3 untimed ones, beside PyTorch's.
fn demo_step_figures(gpu: &Arc<Gpu>, runs: usize, report: &mut impl FnMut(&Figure)) -> Result<()> {
    let demo = demo_run_config()?;
    let name = format!("demo VQGAN train step as trained, {0}x{0} batch {1}", demo.size, demo.batch_size);
    let (loss, batch, size) = (demo.loss()?, demo.batch_size, demo.size as usize);
    let (ms, commands) = vqgan_step_ms(gpu, demo.vqgan()?, loss, (batch, size), false, (3, runs.max(9)), true)?;
    report(&Figure { name, value: ms, unit: "ms", ms });
    let ratio = format!("  ratio to PyTorch CPU ({TORCH_DEMO_STEP_MS} ms, README; issue 23 asks <= 3)");
    report(&Figure { name: ratio, value: ms / TORCH_DEMO_STEP_MS, unit: "x", ms });
    // Commands a step, a count the VM's noise does not move: on CPU drivers each costs tens of
    // microseconds besides its work (`bench kernels`' dispatch and copy figures).
    report(&Figure { name: "  dispatches a step".into(), value: commands.0 as f64, unit: "commands", ms });
    report(&Figure {
        name: "  copies and other commands a step".into(),
        value: commands.1 as f64,
        unit: "commands",
        ms,
    });
    Ok(())
}

/// weights/emoji_vqgan.yaml (built in) as `train-vqgan` reads it.
fn demo_run_config() -> Result<super::train_vqgan::RunConfig> {
    use super::train_vqgan::{RunConfig, TrainOptions};
    let yaml: serde_json::Value = serde_yaml::from_str(include_str!("../../weights/emoji_vqgan.yaml"))?;
    RunConfig::from_file(&yaml, std::path::Path::new("weights/emoji_vqgan.yaml"), &TrainOptions::default())
}

/// The median time (ms) of a VQGAN training step (`train_vqgan::Trainer::step`, with the
/// discriminator and, where asked, LPIPS; random weights) on random images (batch, size), after
/// `warmup` untimed steps, and with `count_commands` the (dispatches, copy commands) of one more
/// step (else zeros). Leaves the step's peak memory in `gpu.memory_usage()`.
fn vqgan_step_ms(
    gpu: &Arc<Gpu>,
    cfg: VqganConfig,
    loss: crate::models::vqloss::LossConfig,
    (batch, size): (usize, usize),
    with_lpips: bool,
    (warmup, runs): (usize, usize),
    count_commands: bool,
) -> Result<(f64, (u64, u64))> {
    use super::train_vqgan::Trainer;
    use crate::models::discriminator::Discriminator;
    use crate::models::lpips::{self, Lpips};
    let vq = Vqgan::random(gpu, cfg, 3)?;
    let disc = Discriminator::init(gpu, 3, loss.disc_ndf, loss.disc_num_layers, &mut crate::engine::Rng::new(4))?;
    let lp = if with_lpips { Some(Lpips::from_tensors(lpips::random_params(gpu)?)) } else { None };
    let mut trainer = Trainer::new(gpu, vq, Some(disc), lp, loss, 1e-4, false, 0)?;
    let x = rand_tensor(gpu, &[batch, 3, size, size], 31)?;
    gpu.reset_peak_memory();
    let ms = median_ms(warmup, runs, || {
        trainer.step(&x, 0)?;
        gpu.sync()
    })?;
    if !count_commands {
        return Ok((ms, (0, 0)));
    }
    let before = gpu.command_counts();
    trainer.step(&x, 0)?;
    gpu.sync()?;
    let after = gpu.command_counts();
    Ok((ms, (after.0 - before.0, after.1 - before.1)))
}

/// Encode + quantize + decode of one 256x256 image with the ImageNet f16
/// config (random weights), against the PyTorch CPU figure of SPEC.md.
pub fn vqgan_figures(gpu: &Arc<Gpu>, runs: usize, size: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    let vq = Vqgan::random(gpu, Vqgan::imagenet_f16_config(), 7)?;
    if size == 0 || !size.is_multiple_of(16) {
        bail!("bench vqgan --size {size}: a positive multiple of 16 (the f16 config's factor)");
    }
    let x = rand_tensor(gpu, &[1, 3, size, size], 30)?;
    let tape = Tape::inference();
    let p = vq.params.vars(&tape);
    let xv = tape.constant(x);
    gpu.reset_peak_memory();
    // Each run takes tens of seconds on a software device: a few runs suffice.
    let ms = median_ms(1, runs.min(3), || {
        drop(vq.forward(&tape, &p, &xv)?);
        gpu.sync()
    })?;
    report(&Figure { name: format!("VQGAN f16 encode+quantize+decode 1x{size}x{size}"), value: ms, unit: "ms", ms });
    if size == 256 {
        report(&Figure { name: "  ratio to PyTorch CPU (3.3 s, SPEC.md)".into(), value: ms / 3300.0, unit: "x", ms });
    }
    report(&Figure {
        name: "  peak memory of live tensors".into(),
        value: gpu.memory_usage().1 as f64 / (1 << 20) as f64,
        unit: "MiB",
        ms,
    });
    if let Some(kib) = peak_rss_kib() {
        report(&Figure { name: "  peak resident memory of the process".into(), value: kib / 1024.0, unit: "MiB", ms });
    }
    Ok(())
}

/// The process's peak resident set (Linux `VmHWM`), in KiB; None elsewhere. On a software
/// device the GPU's memory is the process's, so this is the figure to compare with PyTorch CPU.
fn peak_rss_kib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One training step (generator + discriminator, as `train-vqgan` runs it)
/// of the demo config at its training size and batch, and of the ImageNet f16
/// config at 256x256 batch 1 with LPIPS (random weights throughout).
pub fn vqgan_train_figures(gpu: &Arc<Gpu>, runs: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    use crate::models::vqloss::LossConfig;
    let demo = demo_run_config()?;
    let demo_loss = demo.loss()?;
    let imagenet_loss = LossConfig::from_params(&serde_json::json!({"disc_weight": 0.8}))?;
    // (name, config, loss, batch, size, LPIPS, warm-up runs, timed runs): one ImageNet step
    // takes minutes on a software device, so it is timed once, without a warm-up.
    let cases = [
        (
            format!("demo VQGAN train step, {0}x{0} batch {1}, no LPIPS", demo.size, demo.batch_size),
            demo.vqgan()?,
            demo_loss,
            demo.batch_size,
            demo.size as usize,
            false,
            1,
            runs.min(5),
        ),
        (
            "ImageNet f16 VQGAN train step, 256x256 batch 1, with LPIPS".to_string(),
            Vqgan::imagenet_f16_config(),
            imagenet_loss,
            1,
            256,
            true,
            0,
            1,
        ),
    ];
    for (name, cfg, mut loss, batch, size, with_lpips, warmup, runs) in cases {
        loss.disc_start = 0; // time the full step: generator and discriminator
        let (ms, _) = vqgan_step_ms(gpu, cfg, loss, (batch, size), with_lpips, (warmup, runs), false)?;
        report(&Figure { name: name.clone(), value: ms, unit: "ms", ms });
        report(&Figure { name: "  images/s".into(), value: batch as f64 / ms * 1e3, unit: "img/s", ms });
        report(&Figure {
            name: "  peak memory".into(),
            value: gpu.memory_usage().1 as f64 / (1 << 20) as f64,
            unit: "MiB",
            ms,
        });
    }
    Ok(())
}

/// The GPT the sampling and training benchmarks time: 12 layers, 512 wide, 8 heads, vocab 1024.
fn bench_gpt_config() -> GptConfig {
    GptConfig { vocab_size: 1024, block_size: 256, n_layer: 12, n_head: 8, n_embd: 512, pdrop: [0.0; 3] }
}

/// Greedy sampling with the KV cache: 255 tokens after a start token with a
/// 12-layer, 512-wide GPT (8 heads, vocab 1024; random weights), batch 1 and
/// 16, with f32 weights and with the weights rounded to f16 (as the decoder
/// keeps those of an f16 model file).
pub fn gpt_sampling_figures(gpu: &Arc<Gpu>, runs: usize, report: &mut impl FnMut(&Figure)) -> Result<Gpt> {
    let gpt = Gpt::random(gpu, bench_gpt_config(), 11)?;
    for (batch, half) in [(1usize, false), (1, true), (16, false)] {
        let mut tokens = 0;
        let ms = median_ms(0, runs.min(2), || {
            let mut dec = KvDecoder::with_precision(&gpt, batch, half)?;
            let mut next = vec![0u32; batch];
            for _ in 0..255 {
                let lg = dec.step(&next)?;
                next = (0..batch).map(|b| argmax(&lg[b * 1024..(b + 1) * 1024])).collect();
            }
            tokens = 255 * batch;
            Ok(())
        })?;
        let weights = if half { "f16" } else { "f32" };
        if batch == 1 {
            report(&Figure {
                name: format!("GPT 12x512 greedy sampling, 255 tokens, batch 1, {weights} weights"),
                value: ms,
                unit: "ms",
                ms,
            });
            report(&Figure {
                name: "  ratio to PyTorch CPU with KV cache (10.5 s)".into(),
                value: ms / 10500.0,
                unit: "x",
                ms,
            });
        }
        report(&Figure {
            name: format!("GPT 12x512 sampling tokens/s, batch {batch}, {weights} weights"),
            value: tokens as f64 / ms * 1e3,
            unit: "tokens/s",
            ms,
        });
    }
    Ok(gpt)
}

/// Sampling (above), then one training step of the same GPT.
pub fn gpt_figures(gpu: &Arc<Gpu>, runs: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    let gpt = gpt_sampling_figures(gpu, runs, &mut report)?;
    gpt_train_figures(gpu, &gpt, runs, report)
}

/// One training step of the 12x512 GPT as train-transformer runs it: batch 8 x 256 tokens, AdamW
/// (random weights; `gpt` for these weights, else new ones). One untimed step first, so that the
/// figure is a steady-state step (pipelines compiled, buffers pooled), then the median of up to 3.
pub fn gpt_train_figures(gpu: &Arc<Gpu>, gpt: &Gpt, runs: usize, mut report: impl FnMut(&Figure)) -> Result<()> {
    let (b, tl) = (8usize, 256usize);
    let ids: Vec<Vec<u32>> = (0..b).map(|i| (0..tl).map(|t| ((i * 131 + t * 17) % 1024) as u32).collect()).collect();
    let c: Vec<Vec<u32>> = ids.iter().map(|r| r[..1].to_vec()).collect();
    let z: Vec<Vec<u32>> = ids.iter().map(|r| r[1..].to_vec()).collect();
    let groups: Vec<(Tensor, f32)> = gpt
        .params
        .order
        .iter()
        .map(|n| (gpt.params.tensors[n].clone(), if Gpt::decays(n) { 0.01 } else { 0.0 }))
        .collect();
    let mut adam = Adam::new(AdamConfig::adamw(1e-4, 0.9, 0.95), &groups)?;
    gpu.reset_peak_memory();
    let ms = median_ms(1, runs.min(3), || {
        let tape = Tape::new();
        let p = gpt.params.vars(&tape);
        let loss = crate::models::cond_transformer::image_loss(&tape, gpt, &p, (&c, &z, &z), None)?;
        let grads = tape.backward(&loss)?;
        let g: Vec<Tensor> = gpt
            .params
            .order
            .iter()
            .map(|n| grads.get(p.get(n)?).cloned().ok_or_else(|| anyhow::anyhow!("no gradient for {n}")))
            .collect::<Result<_>>()?;
        adam.update(&g.iter().collect::<Vec<_>>())?;
        gpu.sync()
    })?;
    report(&Figure {
        name: "GPT 12x512 training step, batch 8 x 256 tokens (AdamW)".into(),
        value: ms,
        unit: "ms",
        ms,
    });
    report(&Figure { name: "  tokens/s".into(), value: (b * tl) as f64 / ms * 1e3, unit: "tokens/s", ms });
    report(&Figure {
        name: "  peak memory".into(),
        value: gpu.memory_usage().1 as f64 / (1 << 20) as f64,
        unit: "MiB",
        ms,
    });
    Ok(())
}

/// Whether mode `what` times training steps: those open their device as the training commands
/// do (`engine::open_for_training`), so their figures are the steps `train-*` runs.
pub fn measures_training(what: &str) -> bool {
    matches!(what, "train" | "vqgan-train" | "gpt-train")
}

pub fn run(gpu: &Arc<Gpu>, what: &str, runs: usize, size: Option<usize>, json: bool) -> Result<()> {
    if size.is_some() && what != "vqgan" {
        bail!("bench: --size applies to the vqgan mode");
    }
    let device = gpu.info.name.clone();
    if !json {
        println!("device: {}", gpu.describe());
    }
    let report = |f: &Figure| {
        if json {
            println!("{}", serde_json::json!({"name": f.name, "value": f.value, "unit": f.unit, "device": device}));
        } else if f.unit == "ms" || f.unit == "MiB" || f.unit == "x" {
            println!("{:<60} {:>10.3} {}", f.name, f.value, f.unit);
        } else if f.unit == "commands" {
            println!("{:<60} {:>10} {}", f.name, f.value, f.unit);
        } else {
            println!("{:<60} {:>10.2} {:<8} ({:.2} ms)", f.name, f.value, f.unit, f.ms);
        }
    };
    match what {
        "kernels" => kernel_figures(gpu, runs, report),
        "rows" => row_product_figures(gpu, runs, &mut { report }),
        "train" => train_figures(gpu, runs, report),
        "vqgan" => vqgan_figures(gpu, runs, size.unwrap_or(256), report),
        "vqgan-train" => vqgan_train_figures(gpu, runs, report),
        "gpt" => gpt_figures(gpu, runs, report),
        "gpt-sample" => gpt_sampling_figures(gpu, runs, &mut { report }).map(drop),
        "gpt-train" => gpt_train_figures(gpu, &Gpt::random(gpu, bench_gpt_config(), 11)?, runs, report),
        other => bail!(
            "bench: unknown mode '{other}' (available: kernels, rows, train, vqgan, vqgan-train, gpt, gpt-sample, \
             gpt-train)"
        ),
    }
}
