//! The engine checks itself on the device it is given: every kernel family
//! against its CPU reference, forward and backward, on small ragged shapes,
//! for every variant `Tuning` can choose on the adapter.
//!
//! `taming check` runs all of it; the first use of an adapter runs the quick
//! level and caches the verdict (`verdict.rs`); `tests/kernels.rs` and
//! `tests/autodiff.rs` call the same families, so there is one copy of each
//! comparison. A family records one `Outcome` per comparison; an error from a
//! kernel (a pipeline the driver refuses, a device error) is a failed outcome
//! naming the family, never a panic.

mod backward;
mod forward;
pub mod verdict;

use std::sync::Arc;

use anyhow::Result;

use super::device::{Gpu, Tuning, MM_TILES};
use super::kernels::random_vec;
use super::tensor::Tensor;

/// One comparison of a kernel's output with its CPU reference.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub kernel: String,
    /// The tuning variant it ran under (`default`, `mm_tile=mm_8x8`, ...).
    pub variant: String,
    pub shape: String,
    /// max |got - want| / max(1, max |want|).
    pub max_error: f32,
    pub tolerance: f32,
    /// An error the kernel returned instead of a result.
    pub error: Option<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.max_error <= self.tolerance
    }

    /// One line: kernel, variant, shape, error against tolerance, verdict.
    pub fn line(&self) -> String {
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        match &self.error {
            Some(e) => format!("{verdict:<6} {:<28} {:<26} {:<34} error: {e}", self.kernel, self.variant, self.shape),
            None => format!(
                "{verdict:<6} {:<28} {:<26} {:<34} max error {:.2e} (tolerance {:.0e})",
                self.kernel, self.variant, self.shape, self.max_error, self.tolerance
            ),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": self.kernel, "variant": self.variant, "shape": self.shape,
            "max_error": if self.max_error.is_finite() { serde_json::json!(self.max_error) } else { serde_json::json!(self.max_error.to_string()) },
            "tolerance": self.tolerance, "error": self.error, "passed": self.passed(),
        })
    }
}

/// What sees each outcome as it is recorded.
type Report = Box<dyn FnMut(&Outcome)>;

/// Runs comparisons on one device and collects their outcomes.
pub struct Checker {
    pub gpu: Arc<Gpu>,
    pub variant: String,
    /// The first-use level: the first cases of each family only.
    pub quick: bool,
    outcomes: Vec<Outcome>,
    report: Option<Report>,
}

impl Checker {
    pub fn new(gpu: Arc<Gpu>, variant: &str, quick: bool) -> Checker {
        Checker { gpu, variant: variant.to_string(), quick, outcomes: Vec::new(), report: None }
    }

    /// Called with every outcome as it is recorded (for printing progress).
    pub fn on_outcome(mut self, f: impl FnMut(&Outcome) + 'static) -> Checker {
        self.report = Some(Box::new(f));
        self
    }

    pub fn outcomes(&self) -> &[Outcome] {
        &self.outcomes
    }

    pub fn into_outcomes(self) -> Vec<Outcome> {
        self.outcomes
    }

    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| !o.passed()).collect()
    }

    /// For tests: panics with every failed line.
    pub fn assert_passed(&self) {
        let failed: Vec<String> = self.failures().iter().map(|o| o.line()).collect();
        assert!(!self.outcomes.is_empty(), "no checks ran");
        assert!(failed.is_empty(), "{} of {} checks failed:\n{}", failed.len(), self.outcomes.len(), failed.join("\n"));
    }

    fn push(&mut self, o: Outcome) {
        if let Some(r) = &mut self.report {
            r(&o);
        }
        self.outcomes.push(o);
    }

    /// Random values in [-1, 1) and the same as a tensor on this device.
    pub fn rand(&self, shape: &[usize], seed: u64) -> Result<(Vec<f32>, Tensor)> {
        let v = random_vec(shape.iter().product(), seed, 1.0);
        let t = Tensor::from_f32(&self.gpu, &v, shape)?;
        Ok((v, t))
    }

    pub fn tensor(&self, v: &[f32], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_f32(&self.gpu, v, shape)
    }

    /// Record max |got - want| against `tol` × max(1, max |want|); an error
    /// from the kernel (or a length mismatch) is a failure.
    pub fn close(&mut self, kernel: &str, shape: impl Into<String>, got: Result<Vec<f32>>, want: &[f32], tol: f32) {
        // Products in f16 (opt-in) round to 11 bits: they are held to 2e-2 of the output's scale.
        let tol = if self.gpu.tuning.f16_products { tol.max(F16_TOLERANCE) } else { tol };
        let (max_error, error) = match got {
            Err(e) => (f32::INFINITY, Some(format!("{e:#}"))),
            Ok(g) if g.len() != want.len() => (f32::INFINITY, Some(format!("{} values, want {}", g.len(), want.len()))),
            Ok(g) => (relative_error(&g, want), None),
        };
        self.push(Outcome {
            kernel: kernel.into(),
            variant: self.variant.clone(),
            shape: shape.into(),
            max_error,
            tolerance: tol,
            error,
        });
    }

    /// Record an exact comparison (indices): the number of differing entries is the error.
    pub fn equal<T: PartialEq>(&mut self, kernel: &str, shape: impl Into<String>, got: Result<Vec<T>>, want: &[T]) {
        let (max_error, error) = match got {
            Err(e) => (f32::INFINITY, Some(format!("{e:#}"))),
            Ok(g) if g.len() != want.len() => (f32::INFINITY, Some(format!("{} values, want {}", g.len(), want.len()))),
            Ok(g) => {
                let differ = g.iter().zip(want).filter(|(a, b)| a != b).count();
                (differ as f32, (differ > 0).then(|| format!("{differ} of {} entries differ", want.len())))
            }
        };
        self.push(Outcome {
            kernel: kernel.into(),
            variant: self.variant.clone(),
            shape: shape.into(),
            max_error,
            tolerance: 0.0,
            error,
        });
    }

    /// Record a family that stopped with an error before its comparisons finished.
    fn family_error(&mut self, family: &str, e: anyhow::Error) {
        let o = Outcome {
            kernel: family.into(),
            variant: self.variant.clone(),
            shape: "-".into(),
            max_error: f32::INFINITY,
            tolerance: 0.0,
            error: Some(format!("{e:#}")),
        };
        self.push(o);
    }

    /// Run one family; an error it returns becomes a failed outcome.
    pub fn run(&mut self, family: &Family) {
        if let Err(e) = (family.run)(self) {
            self.family_error(family.name, e);
        }
        // A device error left pending by the family belongs to it.
        if let Err(e) = self.gpu.sync() {
            self.family_error(family.name, e);
        }
    }
}

/// max |a - b| / max(1, max |b|); NaN anywhere makes it NaN (a failure).
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        let e = (g - w).abs();
        if e > worst || e.is_nan() {
            worst = e;
        }
    }
    worst / scale
}

/// A kernel family's comparisons.
pub struct Family {
    pub name: &'static str,
    pub run: fn(&mut Checker) -> Result<()>,
}

/// Every family, forward then backward.
pub const FAMILIES: &[Family] = &[
    Family { name: "matmul", run: forward::matmul },
    Family { name: "conv2d", run: forward::conv2d },
    Family { name: "winograd", run: forward::winograd },
    Family { name: "norm_conv2d", run: forward::norm_conv2d },
    Family { name: "norm", run: forward::norms },
    Family { name: "softmax", run: forward::softmax_cross_entropy },
    Family { name: "attention", run: forward::attention },
    Family { name: "quantize", run: forward::quantize },
    Family { name: "elementwise", run: forward::elementwise },
    Family { name: "data_movement", run: forward::data_movement },
    Family { name: "row_products", run: forward::row_products },
    Family { name: "backward", run: backward::ops },
    Family { name: "conv2d_backward", run: backward::conv2d_pieces },
    Family { name: "optimizer", run: backward::optimizer },
];

pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// A tuning to check and the families whose kernels it changes.
pub struct Variant {
    pub name: String,
    pub tuning: Tuning,
    pub families: Vec<&'static str>,
}

/// What `close` allows where the products run in f16 (`Tuning::f16_products`): values rounded to
/// 11 bits and 16-term sums in f16 put results about 1e-3 of their scale from f32's.
pub const F16_TOLERANCE: f32 = 2e-2;

/// The storage binding limit of the `max_binding` variant: small enough that most check shapes
/// split, large enough for one row of each.
pub const SMALL_BINDING: u64 = 16384;

/// The adapter's own tuning (every family) and each alternative its
/// `Tuning` can take on this adapter, with the families it affects.
pub fn variants(gpu: &Gpu) -> Vec<Variant> {
    let base = gpu.tuning.clone();
    let all: Vec<&'static str> = FAMILIES.iter().map(|f| f.name).collect();
    let mut out = vec![Variant { name: "default".into(), tuning: base.clone(), families: all.clone() }];
    let mut add = |name: String, tuning: Tuning, families: &[&'static str]| {
        out.push(Variant { name, tuning, families: families.to_vec() })
    };
    let products = ["matmul", "conv2d", "winograd", "norm_conv2d", "attention", "conv2d_backward"];
    for tile in MM_TILES.iter().filter(|t| t.entry != base.mm_entry) {
        if let Ok(tuning) = base.with_tile(&gpu.info, gpu.features, tile.entry) {
            add(format!("mm_tile={}", tile.entry), tuning, &products);
        }
    }
    add(
        format!("pack_kernel={}", !base.pack_kernel),
        Tuning { pack_kernel: !base.pack_kernel, ..base.clone() },
        &["matmul", "conv2d", "winograd", "norm"],
    );
    add(
        format!("reads_via_texture={}", !base.reads_via_texture),
        Tuning { reads_via_texture: !base.reads_via_texture, ..base.clone() },
        &[
            "norm",
            "norm_conv2d",
            "conv2d",
            "winograd",
            "conv2d_backward",
            "backward",
            "data_movement",
            "elementwise",
            "matmul",
            "optimizer",
            "softmax",
            "attention",
        ],
    );
    // Small tensors through flat copies too, where the device reads through them at all (the
    // checks' shapes are mostly below the threshold).
    if base.reads_via_texture && base.buffer_read_max_values > 0 {
        add(
            "buffer_read_max_values=0".into(),
            Tuning { buffer_read_max_values: 0, ..base.clone() },
            &["matmul", "conv2d", "conv2d_backward", "backward", "softmax", "attention", "data_movement"],
        );
    }
    // The elementwise ops' other read path, where the device reads through textures at all.
    if base.reads_via_texture {
        add(
            format!("elementwise_via_texture={}", !base.elementwise_via_texture),
            Tuning { elementwise_via_texture: !base.elementwise_via_texture, ..base.clone() },
            &["elementwise", "backward"],
        );
    }
    if gpu.features.contains(wgpu::Features::SHADER_F16) && !base.f16_products {
        add("f16_products=true".into(), Tuning { f16_products: true, ..base.clone() }, &["matmul"]);
    }
    add(
        format!("conv_workgroup={}", !base.conv_workgroup),
        Tuning { conv_workgroup: !base.conv_workgroup, ..base.clone() },
        &["conv2d", "norm_conv2d", "conv2d_backward"],
    );
    add(
        format!("stats_workgroup={}", !base.stats_workgroup),
        Tuning { stats_workgroup: !base.stats_workgroup, ..base.clone() },
        &["norm", "norm_conv2d"],
    );
    if super::device::winograd_works(&gpu.info) {
        add(
            format!("winograd={}", !base.winograd),
            Tuning { winograd: !base.winograd, ..base.clone() },
            &["conv2d", "winograd", "norm_conv2d"],
        );
    }
    if super::device::winograd_works(&gpu.info) || base.mm_family == "matmul_subgroup" {
        add(
            format!("textures_via_buffer={}", !base.textures_via_buffer),
            Tuning {
                textures_via_buffer: !base.textures_via_buffer,
                winograd: base.winograd || super::device::winograd_works(&gpu.info),
                ..base.clone()
            },
            &["matmul", "conv2d", "winograd", "norm_conv2d", "conv2d_backward", "backward"],
        );
    }
    add(
        format!("attention_tiled={}", !base.attention_tiled),
        Tuning { attention_tiled: !base.attention_tiled, ..base.clone() },
        &["backward"],
    );
    if base.stats_subgroup || gpu.features.contains(wgpu::Features::SUBGROUP) {
        add(
            format!("stats_subgroup={}", !base.stats_subgroup),
            Tuning { stats_subgroup: !base.stats_subgroup, ..base.clone() },
            &["norm", "norm_conv2d"],
        );
    }
    if base.stats_lanes || super::device::subgroups_of_8(&gpu.info, gpu.features) {
        add(
            format!("stats_lanes={}", !base.stats_lanes),
            Tuning { stats_lanes: !base.stats_lanes, ..base.clone() },
            &["norm", "norm_conv2d", "backward"],
        );
    }
    if base.norm_backward_lanes || super::device::subgroups_of_8(&gpu.info, gpu.features) {
        add(
            format!("norm_backward_lanes={}", !base.norm_backward_lanes),
            Tuning { norm_backward_lanes: !base.norm_backward_lanes, ..base.clone() },
            &["norm", "norm_conv2d", "backward"],
        );
    }
    if base.reduce_subgroup || gpu.features.contains(wgpu::Features::SUBGROUP) {
        add(
            format!("reduce_subgroup={}", !base.reduce_subgroup),
            Tuning { reduce_subgroup: !base.reduce_subgroup, ..base.clone() },
            &["softmax", "attention", "backward", "data_movement", "conv2d_backward"],
        );
    }
    add(
        format!("attention_via_matmul={}", !base.attention_via_matmul),
        Tuning { attention_via_matmul: !base.attention_via_matmul, ..base.clone() },
        &["backward"],
    );
    if base.gemv_subgroup || gpu.features.contains(wgpu::Features::SUBGROUP) {
        add(
            format!("gemv_subgroup={}", !base.gemv_subgroup),
            Tuning { gemv_subgroup: !base.gemv_subgroup, ..base.clone() },
            &["row_products"],
        );
    }
    let key_chunk = if base.decode_key_chunk == 16 { 4 } else { 16 };
    add(
        format!("decode_key_chunk={key_chunk}"),
        Tuning { decode_key_chunk: key_chunk, ..base.clone() },
        &["attention"],
    );
    add(
        format!("gemv_split_k={}", !base.gemv_split_k),
        Tuning { gemv_split_k: !base.gemv_split_k, ..base.clone() },
        &["row_products"],
    );
    for texels in [1, 2, 4].into_iter().filter(|&t| t != base.gemv_texels) {
        add(format!("gemv_texels={texels}"), Tuning { gemv_texels: texels, ..base.clone() }, &["row_products"]);
    }
    // Small storage bindings: every family's kernels split tensors larger than one binding, and
    // do so on the checks' small shapes (runs of planes, channels, rows, windows of products),
    // with windows starting on 256-byte offsets, the largest alignment GPUs ask for (lavapipe
    // asks for 16: an H200's 32 found a split path that lavapipe's checks had passed).
    let small = Tuning { max_binding: Some(SMALL_BINDING), binding_align: Some(256), ..base.clone() };
    add(format!("max_binding={SMALL_BINDING}"), small, &all);
    if base.conv_channel_packed && base.mm_family == "matmul_subgroup" {
        let tuning = Tuning { conv_channel_packed: false, ..base.clone() };
        add("conv_channel_packed=false".into(), tuning, &["conv2d_backward"]);
    }
    if base.convt_narrow && base.conv_channel_packed && base.mm_family == "matmul_subgroup" {
        add("convt_narrow=false".into(), Tuning { convt_narrow: false, ..base.clone() }, &["conv2d_backward"]);
    }
    if base.conv_dw_direct && base.mm_family == "matmul_subgroup" {
        add("conv_dw_direct=false".into(), Tuning { conv_dw_direct: false, ..base.clone() }, &["conv2d_backward"]);
    }
    // A small im2col budget: convolutions in pieces that split images.
    add("im2col_budget=4096".into(), Tuning { im2col_budget: 4096, ..base.clone() }, &["conv2d", "conv2d_backward"]);
    out
}

/// Kernel paths this adapter never takes, and why (printed by `taming check`).
pub fn not_offered(gpu: &Gpu) -> Vec<String> {
    let mut out = Vec::new();
    if !super::device::winograd_works(&gpu.info) {
        out.push(format!(
            "Winograd convolutions: not taken on the {:?} backend (wrong results on Mesa's GL)",
            gpu.info.backend
        ));
    }
    if !gpu.features.contains(wgpu::Features::SUBGROUP)
        || gpu.info.subgroup_min_size != 8
        || gpu.info.subgroup_max_size != 8
    {
        out.push(
            "subgroup products (ms_32x8, implicit-GEMM convolutions, subgroup row products): need 8-lane subgroups"
                .into(),
        );
    }
    out
}

/// What to run: the quick first-use level (the adapter's tuning, the first
/// cases of each family) or everything, optionally only some families.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub quick: bool,
    /// Only these families (all when empty).
    pub families: Vec<String>,
    /// Only these variants, by name (all when empty).
    pub variants: Vec<String>,
}

/// Run the plan on `gpu`; `report` sees every outcome as it comes.
pub fn run(gpu: &Arc<Gpu>, plan: &Plan, report: impl FnMut(&Outcome) + Clone + 'static) -> Result<Vec<Outcome>> {
    let wanted = |name: &str| plan.families.is_empty() || plan.families.iter().any(|f| f == name);
    let mut outcomes = Vec::new();
    let variants = variants(gpu);
    let variants = if plan.quick { &variants[..1] } else { &variants[..] };
    for v in variants.iter().filter(|v| plan.variants.is_empty() || plan.variants.contains(&v.name)) {
        let families: Vec<&Family> =
            FAMILIES.iter().filter(|f| v.families.contains(&f.name) && wanted(f.name)).collect();
        if families.is_empty() {
            continue;
        }
        // The default variant runs on the device itself (its caches stay warm).
        let device = if v.name == "default" { gpu.clone() } else { gpu.variant(v.tuning.clone())? };
        let mut c = Checker::new(device, &v.name, plan.quick).on_outcome(report.clone());
        for f in families {
            c.run(f);
        }
        outcomes.extend(c.into_outcomes());
    }
    Ok(outcomes)
}
