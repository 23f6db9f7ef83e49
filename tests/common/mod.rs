#![allow(dead_code)]
use std::sync::{Arc, OnceLock};

use taming::engine::{DeviceRequest, Gpu};

/// One device for the whole test binary (tests run on threads of one process).
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(&DeviceRequest::from_env()).unwrap_or_else(|e| panic!("tests need a GPU or lavapipe: {e:#}"))
    })
    .clone()
}

/// Held by a test that sets an environment variable the kernels read on
/// every call (TAMING_IM2COL_BUDGET, TAMING_PACK_KERNEL: process-wide) and by
/// the tests whose path choice it would change midway.
pub fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// max |a - b| must be within tol * max(1, max |b|).
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max error {worst} at {at} (got {}, want {}) exceeds {} (tol {tol} x scale {scale})",
        got[at],
        want[at],
        tol * scale
    );
}

pub fn fixtures_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var("TAMING_FIXTURES").unwrap_or_else(|_| "../shared/fixtures".into());
    let p = std::path::PathBuf::from(dir);
    if p.join("vqgan").exists() {
        Some(p)
    } else {
        eprintln!("\n*** SKIPPED: parity fixtures not found at {} (set TAMING_FIXTURES) ***\n", p.display());
        None
    }
}
