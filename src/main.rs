//! The `taming` command: parses arguments and calls the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use taming::engine::{DeviceRequest, Gpu};
use taming::workflows;

#[derive(Parser)]
#[command(name = "taming", version, about = "Taming Transformers (VQGAN + GPT) on any GPU, through wgpu")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct DeviceArgs {
    /// Adapter to use: its index in `taming info` or part of its name [env: TAMING_ADAPTER]
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Graphics API: vulkan, metal, dx12 or gl (comma list allowed) [env: TAMING_BACKEND]
    #[arg(long, global = true)]
    backend: Option<String>,
}

#[derive(Args)]
struct ImageArgs {
    /// Resize the short side to this many pixels (then center-crop to a multiple of the downsampling factor)
    #[arg(long)]
    size: Option<u32>,
    /// Images per batch (images of one size are batched)
    #[arg(long, default_value_t = 4)]
    batch: usize,
}

impl ImageArgs {
    fn options(&self) -> workflows::autoencode::ImageOptions {
        workflows::autoencode::ImageOptions { size: self.size, batch: self.batch }
    }
}

/// What both training commands take.
#[derive(Args)]
struct RunArgs {
    /// Run config, YAML (the reference's) or JSON: a `model:` block and an optional `train:` block
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Run folder: model.safetensors (the last checkpoint), train_state.safetensors (for --resume), log.jsonl, grids
    #[arg(long)]
    out: std::path::PathBuf,
    /// Continue the run in --out from its last checkpoint
    #[arg(long)]
    resume: bool,
    /// Total training steps (overrides the config)
    #[arg(long)]
    steps: Option<u64>,
    /// Examples per step (overrides the config)
    #[arg(long)]
    batch: Option<usize>,
    /// Base learning rate; the rate used is base × batch, as the reference (overrides the config)
    #[arg(long)]
    lr: Option<f64>,
    /// Steps between checkpoints, validation and grids (overrides the config)
    #[arg(long)]
    save_every: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the adapters, and the chosen one's limits and features
    Info,
    /// Check parity with the PyTorch reference: recompute DIR/reference.safetensors from DIR/model.safetensors
    Verify {
        /// Fixture directories (model.safetensors + reference.safetensors)
        #[arg(required = true)]
        dirs: Vec<std::path::PathBuf>,
    },
    /// Encode and decode images; writes input | reconstruction PNGs and prints PSNR (label maps: % right)
    Reconstruct {
        /// Model file (VQModel, GumbelVQ, VQSegmentationModel, ldm VQModel, or a Net2NetTransformer's first stage)
        #[arg(long)]
        model: std::path::PathBuf,
        /// Images (PNG or JPEG) as the model reads them: photos, one-channel maps (grey PNGs, or depth as RGBA
        /// float32), or label maps (single-channel PNGs of class ids)
        #[arg(required = true)]
        images: Vec<std::path::PathBuf>,
        /// Output directory
        #[arg(long, default_value = "reconstructions")]
        out: std::path::PathBuf,
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Images to codebook indices, saved as an int64 .npy [N, h, w]
    Encode {
        #[arg(long)]
        model: std::path::PathBuf,
        #[arg(required = true)]
        images: Vec<std::path::PathBuf>,
        /// Output .npy file
        #[arg(long, default_value = "codes.npy")]
        out: std::path::PathBuf,
        #[command(flatten)]
        image: ImageArgs,
        /// Encode part i of n of the images (consecutive shares), into --out with .shard-i-of-n before
        /// its extension [default under mpirun/srun: the rank]
        #[arg(long, value_name = "i/n", value_parser = parse_shard)]
        shard: Option<taming::engine::distributed::Shard>,
    },
    /// Codebook indices (.npy [N, h, w]) to PNG images
    Decode {
        #[arg(long)]
        model: std::path::PathBuf,
        /// Indices file written by `taming encode` (or NumPy)
        #[arg(long)]
        codes: std::path::PathBuf,
        /// Output directory
        #[arg(long, default_value = "decoded")]
        out: std::path::PathBuf,
    },
    /// Sample images from a transformer model file, saved as a grid PNG
    Sample {
        /// Net2NetTransformer model file [default: the demo model, weights/emoji_transformer.safetensors]
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Number of images (class-conditional models without --class: per class, at most 8)
        #[arg(long, default_value_t = 16)]
        n: usize,
        /// Softmax temperature (0: greedy)
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Keep the k most likely tokens (0: all; 1: greedy)
        #[arg(long, default_value_t = 100)]
        top_k: usize,
        /// Nucleus sampling threshold (1.0: off)
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Class for class-conditional models: index or name (e.g. 3, or "smileys")
        #[arg(long)]
        class: Option<String>,
        /// Image size in pixels, HxW (e.g. 64x96); larger than the training size samples with a sliding window
        #[arg(long, value_parser = parse_size)]
        size: Option<(usize, usize)>,
        /// Condition for spatially conditioned models (a label map, depth map or photo, as the model's cond
        /// stage reads it), or a folder of them: then --out is a folder with one grid per condition
        #[arg(long)]
        cond: Option<std::path::PathBuf>,
        /// Sequences decoded together
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Also write one PNG per sample into this folder (000000.png, ...)
        #[arg(long)]
        per_image: Option<std::path::PathBuf>,
        /// Also write every sample into this .npz (arr_0: uint8 N x H x W x 3, what FID tools read)
        #[arg(long)]
        npz: Option<std::path::PathBuf>,
        /// Classifier-free guidance: logits = u + S (c - u) of the conditional and null-conditioned
        /// runs (models trained with cond_dropout_prob) [default: 3 for such models, else 1 = off]
        #[arg(long, value_name = "S")]
        cfg_scale: Option<f32>,
        /// Image completion: every sample starts from this image's top --keep-rows rows of codes
        #[arg(long)]
        complete: Option<std::path::PathBuf>,
        /// Rows of codes kept from --complete's image (a code row is f pixels; half the rows is the paper's figure)
        #[arg(long, default_value_t = 0)]
        keep_rows: usize,
        /// Output PNG (a grid of all samples)
        #[arg(long, default_value = "samples.png")]
        out: std::path::PathBuf,
        /// Sample part i of n of the images (its share of --n, drawn with a seed of its own; outputs
        /// with .shard-i-of-n before the extension, --per-image files numbered globally)
        /// [default under mpirun/srun: the rank]
        #[arg(long, value_name = "i/n", value_parser = parse_shard)]
        shard: Option<taming::engine::distributed::Shard>,
    },
    /// Serve the interactive sampler as a local web page (Sample, Reconstruct, Models): progress
    /// streams to the page as codes are drawn; one queue for the GPU
    Serve {
        /// Model files to offer: transformers (sample; their first stage reconstructs) or
        /// autoencoders (reconstruct), repeatable [default: the demo model]
        #[arg(long = "model")]
        models: Vec<std::path::PathBuf>,
        /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Largest upload (condition images, images to reconstruct), in MiB
        #[arg(long, default_value_t = 16)]
        max_upload_mb: usize,
        /// Most samples per request
        #[arg(long, default_value_t = 16)]
        max_count: usize,
        /// Largest image side in pixels (samples beyond the training size use the sliding window)
        #[arg(long, default_value_t = 1024)]
        max_size: usize,
    },
    /// Train a VQGAN (stage 1) on a folder of images, maps or label maps (the config's kind); checkpoints, logs
    /// and grids go to --out
    TrainVqgan {
        /// Folder of images (searched recursively) or a text file listing them
        #[arg(long)]
        data: std::path::PathBuf,
        /// Start from this model file's weights (and its discriminator and LPIPS, when it has them)
        #[arg(long)]
        init: Option<std::path::PathBuf>,
        /// LPIPS weights: a VQModel file with loss.perceptual_loss.*, or a converted VGG16 + lin file
        #[arg(long)]
        lpips: Option<std::path::PathBuf>,
        /// Training crop size in pixels (overrides the config)
        #[arg(long)]
        size: Option<u32>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Train the transformer (stage 2) over a VQGAN's codes: unconditional, class-conditional (--labels) or on condition images (--cond-data)
    TrainTransformer {
        /// The first stage: a VQModel file (e.g. from train-vqgan); not needed with --resume
        #[arg(long)]
        vqgan: Option<std::path::PathBuf>,
        /// Folder of images (searched recursively); with --labels, the folder the CSV's paths are relative to
        #[arg(long)]
        data: std::path::PathBuf,
        /// CSV with a header, a `file` column and a label column: trains a class-conditional model
        #[arg(long)]
        labels: Option<std::path::PathBuf>,
        /// The CSV column holding the class [default: category]
        #[arg(long)]
        label_column: Option<String>,
        /// Spatial conditioning: folder of conditions (label maps, depth maps, photos) with the images' relative
        /// paths and stems
        #[arg(long)]
        cond_data: Option<std::path::PathBuf>,
        /// Spatial conditioning: the autoencoder that tokenizes the conditions (a VQModel or VQSegmentationModel
        /// file, or a conditioned transformer's cond stage)
        #[arg(long)]
        cond_vqgan: Option<std::path::PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Rewrite a model file with f16 weights (half the size)
    ExportHalf { input: std::path::PathBuf, output: std::path::PathBuf },
    /// Check every kernel against its CPU reference on this device (every variant it can choose);
    /// exit status 1 on any failure. Run it on your GPU and attach the output to a report.
    Check {
        /// Only the first-use level: the device's own kernel choices, the first cases of each family
        #[arg(long)]
        quick: bool,
        /// Only these kernel families (repeatable): matmul, conv2d, winograd, norm, attention, ...
        #[arg(long = "family")]
        families: Vec<String>,
        /// Only these kernel variants (repeatable), by the name the output shows: default,
        /// max_binding=16384, mm_tile=..., ...
        #[arg(long = "variant")]
        variants: Vec<String>,
        /// One JSON object per check, then a summary object
        #[arg(long)]
        json: bool,
    },
    /// Train a small image classifier on labelled images (every 10th held out), for score-samples
    TrainClassifier {
        /// Folder the CSV's paths are relative to
        #[arg(long)]
        data: std::path::PathBuf,
        /// CSV with a header, a `file` column and the label column
        #[arg(long)]
        labels: std::path::PathBuf,
        /// The CSV column holding the class
        #[arg(long, default_value = "category")]
        label_column: String,
        /// Output classifier file
        #[arg(long, default_value = "classifier.safetensors")]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 1500)]
        steps: u64,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Sample-quality score of a class-conditional transformer: the share of its samples for each
    /// class that a classifier (train-classifier) assigns to that class, per guidance scale
    ScoreSamples {
        /// Classifier file from train-classifier
        #[arg(long)]
        classifier: std::path::PathBuf,
        /// Class-conditional transformer [default: the demo model, weights/emoji_transformer.safetensors]
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Samples per class
        #[arg(long, default_value_t = 32)]
        n: usize,
        /// Guidance scales to score, comma-separated (1: none)
        #[arg(long, value_delimiter = ',', default_values_t = vec![1.0f32, 3.0])]
        cfg_scale: Vec<f32>,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 100)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the samples as grids (a row per class), one per scale: STEM_cfgS.png
        #[arg(long)]
        grid: Option<std::path::PathBuf>,
        /// One JSON object per scale
        #[arg(long)]
        json: bool,
    },
    /// Time every kernel choice (product tiles, Winograd, attention, row products, ...) on this device,
    /// each after its quick check, and cache the fastest for later runs (GPUs are tuned at first use)
    Tune {
        /// Timed runs per candidate (the median counts)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Only this choice (repeatable): mm_tile, pack_kernel, winograd, textures_via_buffer,
        /// reads_via_texture, elementwise_via_texture, stats_workgroup, stats_subgroup,
        /// stats_lanes, norm_backward_lanes, reduce_subgroup, attention_via_matmul, attention_tiled,
        /// gemv_subgroup, gemv_split_k, gemv_texels, decode_key_chunk, buffer_read_max_values, kv_cache_texture,
        /// conv_workgroup, conv_channel_packed, convt_narrow, conv_dw_direct, conv_dx_transposed; the result is
        /// printed, not cached
        #[arg(long = "knob")]
        knobs: Vec<String>,
    },
    /// Measure throughput (modes: kernels, rows, train, vqgan, vqgan-train, gpt, gpt-sample, gpt-train)
    Bench {
        /// What to measure
        #[arg(default_value = "kernels")]
        what: String,
        /// Timed runs per figure (the median is reported)
        #[arg(long, default_value_t = 9)]
        runs: usize,
        /// vqgan: the image side in pixels (default 256)
        #[arg(long)]
        size: Option<usize>,
        /// One JSON object per line: name, value, unit, device
        #[arg(long)]
        json: bool,
    },
}

/// "HxW" or "N" (square), in pixels.
fn parse_shard(s: &str) -> Result<taming::engine::distributed::Shard, String> {
    taming::engine::distributed::Shard::parse(s).map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let num = |p: &str| p.trim().parse::<usize>().map_err(|_| format!("'{s}' is not a size like 64x96 or 64"));
    match parts.as_slice() {
        [n] => num(n).map(|n| (n, n)),
        [h, w] => Ok((num(h)?, num(w)?)),
        _ => Err(format!("'{s}' is not a size like 64x96 or 64")),
    }
}

fn main() {
    restore_sigpipe();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `taming bench | head` should end quietly, as other command-line tools do,
/// not panic when stdout closes: restore the default SIGPIPE action that the
/// Rust runtime turns off.
#[cfg(unix)]
fn restore_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: setting a signal's disposition to its default is async-signal-safe and has no preconditions.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let req = DeviceRequest { adapter: cli.device.adapter, backend: cli.device.backend, mm_tile: None }.or_env();
    match cli.command {
        Command::Info => workflows::info::run(&req),
        Command::Verify { dirs } => {
            let gpu = taming::engine::open(&req)?;
            if !workflows::verify::run(&gpu, &dirs)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Reconstruct { model, images, out, image } => {
            let gpu = taming::engine::open(&req)?;
            workflows::autoencode::reconstruct(&gpu, &model, &images, &out, &image.options()).map(|_| ())
        }
        Command::Encode { model, images, out, image, shard } => {
            let gpu = taming::engine::open(&req)?;
            workflows::autoencode::encode_shard(&gpu, &model, &images, &out, &image.options(), shard).map(|_| ())
        }
        Command::Decode { model, codes, out } => {
            let gpu = taming::engine::open(&req)?;
            workflows::autoencode::decode(&gpu, &model, &codes, &out).map(|_| ())
        }
        Command::Serve { models, host, port, max_upload_mb, max_count, max_size } => {
            let models = if models.is_empty() { vec![workflows::sample::model_path(None)?] } else { models };
            let gpu = taming::engine::open(&req)?;
            let o = workflows::serve::ServeOptions {
                models,
                host,
                port,
                max_upload: max_upload_mb << 20,
                max_count,
                max_side: max_size,
            };
            workflows::serve::serve(&gpu, &o)
        }
        Command::Sample {
            model,
            n,
            temperature,
            top_k,
            top_p,
            seed,
            class,
            size,
            cond,
            batch,
            per_image,
            npz,
            complete,
            keep_rows,
            cfg_scale,
            out,
            shard,
        } => {
            let gpu = taming::engine::open(&req)?;
            let o = workflows::sample::SampleOptions {
                n,
                temperature,
                top_k,
                top_p,
                seed,
                class,
                batch,
                size,
                cond,
                per_image,
                npz,
                complete,
                keep_rows,
                cfg_scale,
                shard,
            };
            workflows::sample::sample(&gpu, model.as_deref(), &out, &o)
        }
        Command::TrainVqgan { data, init, lpips, size, run: r } => {
            let gpu = taming::engine::open_for_training(&req)?;
            let o = workflows::train_vqgan::TrainOptions {
                data,
                config: r.config,
                out: r.out,
                resume: r.resume,
                init,
                lpips,
                steps: r.steps,
                batch: r.batch,
                size,
                base_lr: r.lr,
                save_every: r.save_every,
                seed: r.seed,
                quiet: false,
            };
            workflows::train_vqgan::train(&gpu, &o).map(|_| ())
        }
        Command::TrainTransformer { vqgan, data, labels, label_column, cond_data, cond_vqgan, run: r } => {
            let gpu = taming::engine::open_for_training(&req)?;
            let o = workflows::train_transformer::TransformerOptions {
                vqgan,
                data,
                labels,
                label_column,
                cond_data,
                cond_vqgan,
                config: r.config,
                out: r.out,
                resume: r.resume,
                steps: r.steps,
                batch: r.batch,
                base_lr: r.lr,
                save_every: r.save_every,
                seed: r.seed,
                quiet: false,
            };
            workflows::train_transformer::train(&gpu, &o).map(|_| ())
        }
        Command::Check { quick, families, variants, json } => {
            let gpu = Gpu::new(&req)?;
            if !workflows::check::run(&gpu, quick, &families, &variants, json)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::TrainClassifier { data, labels, label_column, out, steps, batch, seed } => {
            let gpu = taming::engine::open(&req)?;
            let o = workflows::classify::ClassifierOptions {
                data,
                labels,
                label_column,
                out,
                steps,
                batch,
                seed,
                ..Default::default()
            };
            workflows::classify::train_classifier(&gpu, &o).map(|_| ())
        }
        Command::ScoreSamples { classifier, model, n, cfg_scale, temperature, top_k, seed, grid, json } => {
            let gpu = taming::engine::open(&req)?;
            let model = workflows::sample::model_path(model.as_deref())?;
            let o = workflows::classify::ScoreOptions { n, cfg_scales: cfg_scale, temperature, top_k, seed, grid };
            for s in workflows::classify::score_samples(&gpu, &classifier, &model, &o)? {
                if json {
                    let per: serde_json::Map<String, serde_json::Value> =
                        s.per_class.iter().map(|(n, a)| (n.clone(), serde_json::json!(a))).collect();
                    println!(
                        "{}",
                        serde_json::json!({"cfg_scale": s.cfg_scale, "accuracy": s.accuracy, "per_class": per})
                    );
                } else {
                    let per: Vec<String> = s.per_class.iter().map(|(n, a)| format!("{n} {a:.0}%")).collect();
                    println!(
                        "guidance {}: {:.1}% of {} samples classified as their class ({})",
                        s.cfg_scale,
                        s.accuracy,
                        n * s.per_class.len(),
                        per.join(", ")
                    );
                }
            }
            Ok(())
        }
        Command::Tune { runs, knobs } => workflows::info::tune(&req, runs, &knobs),
        Command::ExportHalf { input, output } => workflows::train_transformer::export_half(&input, &output),
        Command::Bench { what, runs, size, json } => {
            let gpu = match workflows::bench::measures_training(&what) {
                true => taming::engine::open_for_training(&req)?,
                false => taming::engine::open(&req)?,
            };
            workflows::bench::run(&gpu, &what, runs, size, json)
        }
    }
}
