//! The first-use self-check of an adapter: a fresh cache runs the quick
//! check and stores the verdict; a cached pass costs nothing; a cached
//! failure refuses the device naming the kernels; a corrupt or foreign cache
//! file means a fresh check, never a panic.

mod common;
use common::gpu;

use taming::engine::check::verdict::{ensure, key, lookup, store, Trust, Verdict};

fn cache_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("taming-selfcheck-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn a_fresh_cache_runs_the_quick_check_once_then_costs_nothing() {
    let gpu = gpu();
    let file = cache_dir("fresh").join("nested").join("device-checks.json");
    let Trust::Checked(v) = ensure(&gpu, Some(&file), false).unwrap() else {
        panic!("a fresh cache must run the check")
    };
    assert!(v.passed, "{:?}", v.failed);
    assert!(v.checks > 150, "only {} checks in the quick check", v.checks);
    eprintln!("quick check: {} checks in {:.1} s", v.checks, v.seconds);
    assert_eq!(lookup(&file, &key(&gpu)), Some(v.clone()), "the verdict is cached");
    let started = std::time::Instant::now();
    assert_eq!(ensure(&gpu, Some(&file), false).unwrap(), Trust::Cached(v));
    assert!(started.elapsed().as_secs_f64() < 0.5, "a cached verdict took {:?}", started.elapsed());
    // No temp file is left beside it.
    let left: Vec<_> = std::fs::read_dir(file.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn a_cached_failure_refuses_the_device_naming_the_kernels() {
    let gpu = gpu();
    let file = cache_dir("failed").join("device-checks.json");
    let failed = Verdict {
        passed: false,
        checks: 240,
        failed: vec!["FAILED matmul default b1 1x1x1 max error 5.20e-1 (tolerance 1e-5)".into()],
        seconds: 1.0,
    };
    store(&file, &key(&gpu), &failed).unwrap();
    let e = format!("{:#}", ensure(&gpu, Some(&file), false).unwrap_err());
    for part in ["refusing", "1 of 240", "matmul default b1 1x1x1", "--backend", "taming check", "TAMING_UNCHECKED=1"] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    // The override computes anyway; another adapter's verdict is not this one's.
    assert_eq!(ensure(&gpu, Some(&file), true).unwrap(), Trust::Unchecked);
    assert_eq!(lookup(&file, "another adapter"), None);
}

#[test]
fn a_corrupt_or_foreign_cache_means_a_fresh_check() {
    let gpu = gpu();
    let dir = cache_dir("corrupt");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("device-checks.json");
    for junk in [
        "{ not json",
        "[]",
        r#"{"format": "something else", "verdicts": {}}"#,
        &format!(
            r#"{{"format": "taming-wgpu device checks 1", "verdicts": {{"{}": {{"passed": "yes"}}}}}}"#,
            key(&gpu).replace('\\', "\\\\").replace('"', "\\\"")
        ),
    ] {
        std::fs::write(&file, junk).unwrap();
        assert_eq!(lookup(&file, &key(&gpu)), None, "{junk}");
        match ensure(&gpu, Some(&file), false).unwrap() {
            Trust::Checked(v) => assert!(v.passed),
            other => panic!("{junk}: expected a fresh check, got {other:?}"),
        }
        assert!(lookup(&file, &key(&gpu)).is_some_and(|v| v.passed), "{junk}: the file was not rewritten");
    }
    // A cache folder that cannot be written: the check still decides, with a warning.
    let blocked = dir.join("device-checks.json").join("under-a-file.json");
    assert!(matches!(ensure(&gpu, Some(&blocked), false).unwrap(), Trust::Checked(_)));
}

/// The autotuner times each candidate of the knobs it is given (after its check), keeps the
/// built-in value unless another is clearly faster, and its winners round-trip through the
/// cache and apply on top of the built-in choices.
#[test]
fn autotuning_times_checked_candidates_and_caches_the_winners() {
    use taming::engine::autotune::{apply, key, lookup, store, tune, Choices};
    let gpu = gpu();
    let only = ["gemv_texels".to_string(), "kv_cache_texture".to_string()];
    let results = tune(&gpu, 1, &only, |_, _| {}).unwrap();
    assert_eq!(results.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["gemv_texels", "kv_cache_texture"]);
    for r in &results {
        assert!(r.times.len() >= 2, "{}: {:?}", r.name, r.times);
        assert!(r.times.iter().all(|(_, t)| t.is_some_and(|ms| ms > 0.0)), "every candidate passes here: {r:?}");
        let time = |v: &str| r.times.iter().find(|(x, _)| x == v).and_then(|(_, t)| *t).unwrap();
        // Another value replaces the built-in one only when it is at least 5% faster.
        assert!(r.chosen == r.built_in || time(&r.chosen) < 0.95 * time(&r.built_in), "{r:?}");
    }
    assert!(tune(&gpu, 1, &["no_such_knob".into()], |_, _| {}).unwrap_err().to_string().contains("gemv_texels"));
    // The cache: per adapter key, other entries kept, junk replaced.
    let path = cache_dir("tune").join("tuning.json");
    store(&path, "other adapter", &results).unwrap();
    store(&path, &key(&gpu), &results).unwrap();
    let got = lookup(&path, &key(&gpu)).unwrap();
    assert_eq!(got["gemv_texels"], results[0].chosen);
    assert!(lookup(&path, "other adapter").is_some());
    std::fs::write(&path, "{").unwrap();
    assert_eq!(lookup(&path, &key(&gpu)), None);
    // Applying choices changes those knobs only.
    let choices: Choices = [("gemv_texels".to_string(), "2".to_string()), ("winograd".into(), "false".into())].into();
    let t = apply(&gpu, &gpu.tuning, &choices);
    assert_eq!((t.gemv_texels, t.winograd), (2, false));
    assert_eq!((t.mm_entry, t.attention_via_matmul), (gpu.tuning.mm_entry, gpu.tuning.attention_via_matmul));
    let junk: Choices = [("gemv_texels".to_string(), "many".to_string()), ("gone".into(), "1".into())].into();
    assert_eq!(format!("{:?}", apply(&gpu, &gpu.tuning, &junk)), format!("{:?}", gpu.tuning));
}
