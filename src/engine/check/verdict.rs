//! First use of an adapter: before the first computation on an adapter not
//! seen before, the quick check runs once and its verdict is cached in the
//! user's cache folder, keyed by adapter name, backend, driver, engine
//! version and the kernel choices. A failed verdict refuses the device with
//! the failing kernels named; `TAMING_UNCHECKED=1` runs anyway. A cache
//! file that does not parse, or belongs to another format, means a fresh
//! check, never a panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{run, Plan};
use crate::engine::device::{DeviceRequest, Gpu};

const FORMAT: &str = "taming-wgpu device checks 1";

/// What the quick check found on one adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    pub checks: usize,
    /// The failed lines (kernel, variant, shape, error).
    pub failed: Vec<String>,
    pub seconds: f64,
}

impl Verdict {
    /// The verdict of these outcomes, which took `elapsed`.
    pub fn of(outcomes: &[super::Outcome], elapsed: std::time::Duration) -> Verdict {
        let failed: Vec<String> = outcomes.iter().filter(|o| !o.passed()).map(|o| o.line()).collect();
        Verdict { passed: failed.is_empty(), checks: outcomes.len(), failed, seconds: whole_ms(elapsed) }
    }
}

/// Seconds in whole milliseconds, as the cache stores them (so a verdict
/// read back equals the one written).
pub fn whole_ms(d: std::time::Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// Where the verdicts live: `TAMING_CACHE_DIR`, else `$XDG_CACHE_HOME/taming-wgpu`,
/// else `~/.cache/taming-wgpu` (`%LOCALAPPDATA%\taming-wgpu` on Windows).
pub fn cache_file() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = var("TAMING_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("taming-wgpu")))
        .or_else(|| var("LOCALAPPDATA").map(|d| d.join("taming-wgpu")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("taming-wgpu")))?;
    Some(dir.join("device-checks.json"))
}

/// The adapter, its driver, this engine's version, its kernels' sources and the kernel choices:
/// any change means a new check (a build whose kernels changed at the same version included).
pub fn key(gpu: &Gpu) -> String {
    format!("{} | kernels {:016x} | {:?}", adapter_identity(gpu), crate::engine::shaders::sources_hash(), gpu.tuning)
}

/// The adapter, its driver and this engine's version, as the caches key them.
pub fn adapter_identity(gpu: &Gpu) -> String {
    let i = &gpu.info;
    format!(
        "{} | {:?} | {} {} | vendor {:#x} device {:#x} | taming-wgpu {}",
        i.name,
        i.backend,
        i.driver,
        i.driver_info,
        i.vendor,
        i.device,
        env!("CARGO_PKG_VERSION")
    )
}

fn read_all(path: &Path) -> Option<serde_json::Map<String, Value>> {
    read_cache(path, FORMAT, "verdicts")
}

/// The entries under `section` of a cache file (the verdicts here, the autotuner's winners) whose
/// `format` is `format`; None when it is missing, unreadable or of another format.
pub(crate) fn read_cache(path: &Path, format: &str, section: &str) -> Option<serde_json::Map<String, Value>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    if v.get("format")?.as_str()? != format {
        return None;
    }
    v.get(section)?.as_object().cloned()
}

/// Write `entries` under `section` with `format` (its folder made, a temp file renamed over it:
/// a killed process leaves the old file or the new one).
pub(crate) fn write_cache(
    path: &Path,
    format: &str,
    section: &str,
    entries: serde_json::Map<String, Value>,
) -> Result<()> {
    let text = serde_json::to_string_pretty(&json!({ "format": format, section: entries }))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// The cached verdict for `key`, if the file holds a well-formed one.
pub fn lookup(path: &Path, key: &str) -> Option<Verdict> {
    let all = read_all(path)?;
    let v = all.get(key)?;
    Some(Verdict {
        passed: v.get("passed")?.as_bool()?,
        checks: v.get("checks")?.as_u64()? as usize,
        failed: v.get("failed")?.as_array()?.iter().map(|l| l.as_str().map(String::from)).collect::<Option<_>>()?,
        seconds: v.get("ms")?.as_u64()? as f64 / 1000.0,
    })
}

/// Add or replace `key`'s verdict (temp file + rename, so a killed process
/// leaves the old file or the new one; an unreadable old file is replaced).
pub fn store(path: &Path, key: &str, verdict: &Verdict) -> Result<()> {
    let mut all = read_all(path).unwrap_or_default();
    all.insert(
        key.to_string(),
        json!({
            "passed": verdict.passed, "checks": verdict.checks, "failed": verdict.failed,
        "ms": (verdict.seconds * 1000.0).round() as u64,
        }),
    );
    write_cache(path, FORMAT, "verdicts", all)
}

/// Run the quick check on `gpu` now.
pub fn quick_check(gpu: &Arc<Gpu>) -> Result<Verdict> {
    let started = std::time::Instant::now();
    let outcomes = run(gpu, &Plan { quick: true, ..Plan::default() }, |_| {})?;
    Ok(Verdict::of(&outcomes, started.elapsed()))
}

/// How a device came to be trusted.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    /// A cached verdict (from an earlier quick check or `taming check`).
    Cached(Verdict),
    /// The quick check ran now.
    Checked(Verdict),
    /// `TAMING_UNCHECKED=1`: not checked.
    Unchecked,
}

/// Whether the user asked to compute on an unchecked or failing device.
pub fn unchecked_by_env() -> bool {
    std::env::var("TAMING_UNCHECKED").is_ok_and(|v| v == "1")
}

/// Make sure `gpu` computes what its CPU references compute: the cached
/// verdict, or the quick check now (then cached at `cache`, when given).
/// A failed verdict is an error naming the failing kernels, unless `unchecked`.
pub fn ensure(gpu: &Arc<Gpu>, cache: Option<&Path>, unchecked: bool) -> Result<Trust> {
    if unchecked {
        return Ok(Trust::Unchecked);
    }
    let key = key(gpu);
    if let Some(v) = cache.and_then(|p| lookup(p, &key)) {
        return if v.passed { Ok(Trust::Cached(v)) } else { Err(refusal(gpu, &v, cache)) };
    }
    eprintln!("checking the kernels on {} once (first use of this adapter and driver) ...", gpu.describe());
    let v = quick_check(gpu)?;
    eprintln!("  {} checks, {} failed, {:.1} s", v.checks, v.failed.len(), v.seconds);
    if let Some(p) = cache {
        if let Err(e) = store(p, &key, &v) {
            eprintln!("warning: could not cache the device check ({e:#}); it will run again next time");
        }
    }
    if v.passed {
        Ok(Trust::Checked(v))
    } else {
        Err(refusal(gpu, &v, cache))
    }
}

/// The error for a device whose kernels disagree with their CPU references.
pub fn refusal(gpu: &Gpu, v: &Verdict, cache: Option<&Path>) -> anyhow::Error {
    let shown: Vec<&String> = v.failed.iter().take(12).collect();
    let more = if v.failed.len() > shown.len() {
        format!("\n  ... and {} more", v.failed.len() - shown.len())
    } else {
        String::new()
    };
    let cache =
        cache.map(|p| format!(" (verdict cached in {}; delete it to check again)", p.display())).unwrap_or_default();
    anyhow::anyhow!(
        "refusing {}: {} of {} kernel checks disagree with the CPU references{cache}, so its results would be wrong:\n  {}{more}\n\
         Choose another device (`taming info` lists them; --adapter N or --backend vulkan|metal|dx12|gl), \
         run `taming check` for the full report, or set TAMING_UNCHECKED=1 to compute anyway at your own risk.",
        gpu.describe(),
        v.failed.len(),
        v.checks,
        shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
    )
}

/// A human line for `taming info`.
pub fn describe(gpu: &Gpu, cache: Option<&Path>) -> String {
    if unchecked_by_env() {
        return "not checked (TAMING_UNCHECKED=1)".into();
    }
    match cache.and_then(|p| lookup(p, &key(gpu))) {
        Some(v) if v.passed => {
            format!("passed ({} checks in {:.1} s; cached in {})", v.checks, v.seconds, cache.unwrap().display())
        }
        Some(v) => format!("FAILED ({} of {} checks; `taming check` for details)", v.failed.len(), v.checks),
        None => "not checked yet (the first computation runs the quick check; `taming check` runs all)".into(),
    }
}

/// Open the requested device for computing: the raw device with its autotuned kernel choices
/// (`autotune::tuned`), then `ensure` with the user's cache. Every command that computes opens its device here.
pub fn open(req: &DeviceRequest) -> Result<Arc<Gpu>> {
    let gpu = crate::engine::autotune::tuned(Gpu::new(req)?)?;
    ensure(&gpu, cache_file().as_deref(), unchecked_by_env())?;
    Ok(gpu)
}

/// `open` for a training command: first asks Mesa's CPU drivers for more worker threads
/// (`device::cpu_driver_threads_for_training`). Call it before any other device opens.
pub fn open_for_training(req: &DeviceRequest) -> Result<Arc<Gpu>> {
    crate::engine::device::cpu_driver_threads_for_training();
    open(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_lookup_survive_junk_and_keep_other_adapters() {
        let dir = std::env::temp_dir().join(format!("taming-verdict-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("sub").join("device-checks.json");
        let pass = Verdict { passed: true, checks: 3, failed: vec![], seconds: 0.5 };
        let fail = Verdict { passed: false, checks: 3, failed: vec!["FAILED x".into()], seconds: 0.5 };
        assert_eq!(lookup(&file, "a"), None);
        store(&file, "a", &pass).unwrap();
        store(&file, "b", &fail).unwrap();
        assert_eq!(lookup(&file, "a"), Some(pass.clone()));
        assert_eq!(lookup(&file, "b"), Some(fail));
        for junk in
            ["", "{", "null", r#"{"format": 1}"#, r#"{"format": "taming-wgpu device checks 1", "verdicts": []}"#]
        {
            std::fs::write(&file, junk).unwrap();
            assert_eq!(lookup(&file, "a"), None, "{junk:?}");
            store(&file, "a", &pass).unwrap();
            assert_eq!(lookup(&file, "a"), Some(pass.clone()), "{junk:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
