//! What both training commands share: the run folder, the JSONL log that a
//! resume rewinds, the progress bar, and the NaN/inf stop.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::models::weights::{write_atomically, HostData, HostTensor};

/// A run's files: `model.safetensors` (the last checkpoint, a model file),
/// `train_state.safetensors` (what `--resume` reads), `config.json`, `log.jsonl`.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// The run folder `out`, created if needed; whether a run is being resumed
    /// (`resume` and a saved state). A new run refuses a folder that holds one.
    pub fn open(out: &Path, resume: bool) -> Result<(RunDir, bool)> {
        let run = RunDir { dir: out.to_path_buf() };
        let saved = run.state().exists();
        if !resume && saved {
            anyhow::bail!(
                "{} already holds a run; pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        Ok((run, resume && saved))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn state(&self) -> PathBuf {
        self.path("train_state.safetensors")
    }
    pub fn model(&self) -> PathBuf {
        self.path("model.safetensors")
    }

    /// `config.json`: the run's whole config, for people to read (written atomically).
    pub fn write_config(&self, config: &serde_json::Value) -> Result<()> {
        crate::models::weights::write_atomically(
            &self.path("config.json"),
            serde_json::to_string_pretty(config)?.as_bytes(),
        )
    }
}

/// The run's log, opened for appending. A resumed run first drops the lines
/// past its checkpoint's step (they will be written again); a new run starts empty.
pub fn open_log(path: &Path, keep_until: Option<u64>) -> Result<std::fs::File> {
    let kept: String = match keep_until {
        Some(step) => std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        None => String::new(),
    };
    write_atomically(path, kept.as_bytes())?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))
}

/// An integer from a resume state's metadata.
pub fn metadata_u64(state: &crate::models::weights::ModelFile, key: &str) -> Result<u64> {
    state
        .metadata(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("{}: metadata '{key}' missing", state.path.display()))
}

/// `open_log` on rank 0 of a data-parallel run (the other ranks write no log: None).
pub fn open_rank_log(
    world: &crate::engine::distributed::World,
    path: &Path,
    keep_until: Option<u64>,
) -> Result<Option<std::fs::File>> {
    world.is_root().then(|| open_log(path, keep_until)).transpose()
}

pub fn log_line(log: &mut std::fs::File, v: &Value) -> Result<()> {
    writeln!(log, "{v}").context("writing the run log")
}

pub fn progress_bar(total: u64, start: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
            .expect("static template"),
    );
    bar.set_position(start);
    bar
}

/// A loss became NaN or inf: the run stops before the update is applied.
#[derive(Debug)]
pub struct NonFinite(pub String);

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFinite {}

/// `v`, or a [`NonFinite`] error naming it.
pub fn finite(name: &str, v: f32, step: u64) -> Result<f32> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(anyhow!(NonFinite(format!("step {step}: {name} is {v}"))))
    }
}

/// The first tensor holding NaN or inf, if any (checked before a checkpoint is written).
pub fn first_non_finite(tensors: &[HostTensor]) -> Option<&str> {
    tensors
        .iter()
        .find(|t| matches!(&t.data, HostData::F32(v) if v.iter().any(|x| !x.is_finite())))
        .map(|t| t.name.as_str())
}

/// Adam moments as `{prefix}.m.{name}` / `{prefix}.v.{name}` tensors.
pub fn moment_tensors(
    prefix: &str,
    names: &[String],
    shapes: &[Vec<usize>],
    moments: Vec<(Vec<f32>, Vec<f32>)>,
) -> Vec<HostTensor> {
    let mut out = Vec::new();
    for ((n, shape), (m, v)) in names.iter().zip(shapes).zip(moments) {
        out.push(HostTensor { name: format!("{prefix}.m.{n}"), shape: shape.clone(), data: HostData::F32(m) });
        out.push(HostTensor { name: format!("{prefix}.v.{n}"), shape: shape.clone(), data: HostData::F32(v) });
    }
    out
}

/// A YAML or JSON file as JSON.
pub fn read_config_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))
    } else {
        serde_yaml::from_str(&text).map_err(|e| anyhow!("{}: not valid YAML: {e}", path.display()))
    }
}
