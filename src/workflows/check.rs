//! `taming check`: every kernel family against its CPU reference on this
//! adapter, for every kernel variant it can choose; the verdict is cached as
//! the first-use check's would be.

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::engine::check::{self, verdict, Plan};
use crate::engine::Gpu;

/// Run the checks and print one line per comparison (or one JSON object per
/// line), then `N passed, M failed`. Returns whether all passed.
pub fn run(gpu: &Arc<Gpu>, quick: bool, families: &[String], variants: &[String], json: bool) -> Result<bool> {
    for f in families {
        if check::family(f).is_none() {
            let names: Vec<&str> = check::FAMILIES.iter().map(|f| f.name).collect();
            bail!("--family: unknown kernel family '{f}'; choose from {}", names.join(", "));
        }
    }
    let offered: Vec<String> = check::variants(gpu).into_iter().map(|v| v.name).collect();
    for v in variants {
        if !offered.contains(v) {
            bail!("--variant: this adapter has no kernel variant '{v}'; it offers {}", offered.join(", "));
        }
    }
    if !json {
        println!("checking {} ({})", gpu.describe(), if quick { "quick" } else { "every variant" });
        for note in check::not_offered(gpu) {
            println!("not offered here: {note}");
        }
    }
    let started = std::time::Instant::now();
    let plan = Plan { quick, families: families.to_vec(), variants: variants.to_vec() };
    let outcomes = check::run(gpu, &plan, move |o| {
        if json {
            println!("{}", o.to_json());
        } else {
            println!("{}", o.line());
        }
    })?;
    let v = verdict::Verdict::of(&outcomes, started.elapsed());
    let (failed, seconds) = (v.failed.len(), v.seconds);
    if json {
        println!(
            "{}",
            serde_json::json!({"summary": true, "device": gpu.describe(), "passed": v.checks - failed,
                                          "failed": failed, "seconds": seconds})
        );
    } else {
        println!("{} passed, {failed} failed ({seconds:.1} s)", v.checks - failed);
    }
    // A whole check stands for the first-use one (a failure refuses the device until the cache is cleared).
    if families.is_empty() && variants.is_empty() {
        if let Some(path) = verdict::cache_file() {
            if let Err(e) = verdict::store(&path, &verdict::key(gpu), &v) {
                eprintln!("warning: could not cache the verdict: {e:#}");
            }
        }
    }
    Ok(v.passed)
}
