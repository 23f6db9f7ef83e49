//! `taming info`: what device we run on and what it offers.

use anyhow::Result;

use crate::engine::device::{list_adapters, DeviceRequest, Gpu};

pub fn run(req: &DeviceRequest) -> Result<()> {
    let adapters = list_adapters(req)?;
    println!("adapters (best first):");
    for (i, a) in adapters.iter().enumerate() {
        let inf = a.get_info();
        println!(
            "  [{i}] {} ({:?}, {:?}, driver {} {})",
            inf.name, inf.backend, inf.device_type, inf.driver, inf.driver_info
        );
    }
    let gpu = Gpu::new(req)?;
    let l = &gpu.limits;
    println!("\nusing: {}", gpu.info.name);
    println!("  backend:            {:?}", gpu.info.backend);
    println!("  device type:        {:?}", gpu.info.device_type);
    println!("  driver:             {} {}", gpu.info.driver, gpu.info.driver_info);
    let size =
        |bytes: u64| if bytes >= 1 << 20 { format!("{} MiB", bytes >> 20) } else { format!("{} KiB", bytes >> 10) };
    println!(
        "  max buffer:         {}; a VQGAN's larger activations are held as runs of channels{}",
        size(gpu.max_buffer()),
        if gpu.tuning.max_buffer.is_some() { " (limited by TAMING_MAX_BUFFER)" } else { "" }
    );
    println!(
        "  storage binding:    {} at most; larger tensors are bound a window at a time{}",
        size(gpu.max_binding()),
        if gpu.tuning.max_binding.is_some() { " (limited by TAMING_MAX_BINDING)" } else { "" }
    );
    println!("  storage bindings:   {} per stage", l.max_storage_buffers_per_shader_stage);
    println!(
        "  workgroup size:     {} x {} x {} (max {} invocations)",
        l.max_compute_workgroup_size_x,
        l.max_compute_workgroup_size_y,
        l.max_compute_workgroup_size_z,
        l.max_compute_invocations_per_workgroup
    );
    println!("  workgroups/dim:     {}", l.max_compute_workgroups_per_dimension);
    println!("  workgroup memory:   {} KiB", l.max_compute_workgroup_storage_size >> 10);
    println!("  subgroup size:      {}..{}", gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
    let has = |f: wgpu::Features| if gpu.features.contains(f) { "yes" } else { "no" };
    println!(
        "  features:           f16 {}, subgroups {}, timestamps {}",
        has(wgpu::Features::SHADER_F16),
        has(wgpu::Features::SUBGROUP),
        has(wgpu::Features::TIMESTAMP_QUERY)
    );
    let t = &gpu.tuning;
    println!(
        "  kernel tuning:      matmul {} ({}x{} per invocation, workgroup {}x{}{}; TAMING_MM_TILE overrides)",
        t.mm_entry,
        t.mm_tm,
        t.mm_tn,
        t.mm_wg_x,
        t.mm_wg_y,
        if t.mm_family == "matmul_subgroup" { ", A shared across the subgroup" } else { "" }
    );
    println!(
        "  3x3 convolutions:   {} (TAMING_WINOGRAD=0|1 overrides)",
        if t.winograd {
            "Winograd F(4x4, 3x3) from 32x32 images up, implicit GEMM or im2col below"
        } else {
            "implicit GEMM or im2col"
        }
    );
    println!("  autotuning:         {}", crate::engine::autotune::describe(&gpu));
    let cache = crate::engine::check::verdict::cache_file();
    println!("  self-check:         {}", crate::engine::check::verdict::describe(&gpu, cache.as_deref()));
    Ok(())
}

/// `taming tune`: time every kernel choice on the device (from the built-in choices), print
/// them side by side, and cache the winners for later runs.
pub fn tune(req: &DeviceRequest, runs: usize, only: &[String]) -> Result<()> {
    use crate::engine::autotune;
    let gpu = Gpu::new(req)?;
    println!("tuning on {} ({} timed runs per candidate, after its quick check)", gpu.describe(), runs);
    let bar = indicatif::ProgressBar::new_spinner();
    let started = std::time::Instant::now();
    let results = autotune::tune(&gpu, runs, only, |k, v| bar.set_message(format!("{k} = {v}")))?;
    bar.finish_and_clear();
    for r in &results {
        if r.times.is_empty() {
            println!("  {:<22} {} (pinned by its environment variable)", r.name, r.chosen);
            continue;
        }
        let cells: Vec<String> = r
            .times
            .iter()
            .map(|(v, t)| match t {
                Some(ms) => format!("{v} {ms:.2} ms"),
                None => format!("{v} FAILED its check"),
            })
            .collect();
        let note = if r.chosen == r.built_in { String::new() } else { format!(" (built-in {})", r.built_in) };
        println!("  {:<22} {} -> {}{note}", r.name, cells.join(" | "), r.chosen);
    }
    println!("{} in {:.1} s", autotune::summary(&results), started.elapsed().as_secs_f64());
    match autotune::cache_file() {
        Some(_) if !only.is_empty() => println!("not cached: only some choices were timed (--knob)"),
        Some(path) => {
            autotune::store(&path, &autotune::key(&gpu), &results)?;
            println!("cached in {} (TAMING_AUTOTUNE=0 ignores it)", path.display());
        }
        None => println!("no cache folder (set HOME or TAMING_CACHE_DIR): not cached"),
    }
    Ok(())
}
