//! Every kernel family against its CPU reference through the library's
//! checks (`taming::engine::check`, the comparisons `taming check` runs), on
//! the test device and on every variant its tuning can take; the GL backend
//! where Mesa's is present; and the error paths and properties that are not
//! comparisons.

mod common;
use common::{assert_close, gpu};

use taming::engine::check::{self, Checker};
use taming::engine::device::list_adapters;
use taming::engine::kernels::conv2d::{ConvSpec, NormSwish};
use taming::engine::kernels::norm::NormKind;
use taming::engine::kernels::reduce::Reduce;
use taming::engine::kernels::{self, random_vec};
use taming::engine::{DType, DeviceRequest, Gpu, Tensor};

fn rand(shape: &[usize], seed: u64) -> (Vec<f32>, Tensor) {
    let v = random_vec(shape.iter().product(), seed, 1.0);
    let t = Tensor::from_f32(&gpu(), &v, shape).unwrap();
    (v, t)
}

/// One family on the test device's own tuning.
fn family(name: &str) {
    let mut c = Checker::new(gpu(), "default", false);
    c.run(check::family(name).unwrap_or_else(|| panic!("no family {name}")));
    eprintln!("{name}: {} checks", c.outcomes().len());
    c.assert_passed();
}

#[test]
fn matmul_matches_cpu() {
    family("matmul");
}

#[test]
fn conv2d_paths_match_cpu() {
    family("conv2d");
}

#[test]
fn winograd_matches_direct_convolution() {
    family("winograd");
}

#[test]
fn conv2d_after_norm_swish_matches_norm_then_conv() {
    family("norm_conv2d");
}

#[test]
fn norms_match_cpu() {
    family("norm");
}

#[test]
fn softmax_and_cross_entropy_match_cpu() {
    family("softmax");
}

#[test]
fn attention_matches_cpu() {
    family("attention");
}

#[test]
fn quantizer_matches_cpu() {
    family("quantize");
}

#[test]
fn activations_and_arithmetic_match_cpu() {
    family("elementwise");
}

#[test]
fn data_movement_matches_cpu() {
    family("data_movement");
}

#[test]
fn row_products_match_cpu() {
    family("row_products");
}

#[test]
fn every_family_has_a_test() {
    let tested = [
        "matmul",
        "conv2d",
        "winograd",
        "norm_conv2d",
        "norm",
        "softmax",
        "attention",
        "quantize",
        "elementwise",
        "data_movement",
        "row_products",
        "backward",
        "conv2d_backward",
        "optimizer",
    ];
    for f in check::FAMILIES {
        assert!(tested.contains(&f.name), "family {} has no test here or in tests/autodiff.rs", f.name);
    }
}

/// The alternatives this device's tuning can take, each on its own device
/// with the families it changes (the tests below split them by kind).
fn variants(prefix: &str) {
    let gpu = gpu();
    let variants: Vec<_> = check::variants(&gpu).into_iter().filter(|v| v.name.starts_with(prefix)).collect();
    if variants.is_empty() {
        eprintln!("{prefix}*: no such variant on this device");
        return;
    }
    for v in variants {
        let started = std::time::Instant::now();
        let device = gpu.variant(v.tuning.clone()).unwrap();
        let mut c = Checker::new(device, &v.name, false);
        for f in check::FAMILIES.iter().filter(|f| v.families.contains(&f.name)) {
            c.run(f);
        }
        eprintln!("{}: {} checks in {:.1} s", v.name, c.outcomes().len(), started.elapsed().as_secs_f32());
        c.assert_passed();
    }
}

const VARIANT_KINDS: [&str; 23] = [
    "mm_tile=",
    "pack_kernel=",
    "reads_via_texture=",
    "winograd=",
    "attention_via_matmul=",
    "gemv_",
    "im2col_budget=",
    "max_binding=",
    "conv_dw_direct=",
    "conv_channel_packed=",
    "stats_workgroup=",
    "attention_tiled=",
    "conv_workgroup=",
    "f16_products=",
    "reduce_subgroup=",
    "stats_subgroup=",
    "textures_via_buffer=",
    "convt_narrow=",
    "decode_key_chunk=",
    "elementwise_via_texture=",
    "stats_lanes=",
    "norm_backward_lanes=",
    "buffer_read_max_values=",
];

#[test]
fn every_variant_kind_has_a_test() {
    for v in check::variants(&gpu()).iter().skip(1) {
        assert!(VARIANT_KINDS.iter().any(|k| v.name.starts_with(k)), "variant {} is not tested", v.name);
    }
}

/// Small tensors read through flat texture copies too (channel packs, dW's slice sums, softmax
/// rows, axis sums), which the device's tuning reads from their buffers.
#[test]
fn variant_small_reads_through_copies() {
    variants(VARIANT_KINDS[22]);
}

#[test]
fn variant_weight_gradients() {
    variants(VARIANT_KINDS[8]);
}

#[test]
fn variant_full_width_channel_packed_products() {
    variants(VARIANT_KINDS[17]);
}

#[test]
fn variant_channel_packed_convolutions() {
    variants(VARIANT_KINDS[9]);
}

/// Norm statistics by a workgroup reduction (GPUs' default) or by partial sums (CPU devices').
#[test]
fn variant_norm_statistics_by_workgroup() {
    variants(VARIANT_KINDS[10]);
}

/// Norm statistics with subgroup sums (GPUs' default with subgroups).
#[test]
fn variant_norm_statistics_by_subgroup() {
    variants(VARIANT_KINDS[15]);
}

/// Norm statistics by one subgroup of 8 lanes per statistic (lavapipe's default), or by partial
/// sums and their combination; with the lanes, a group norm (+ swish) whose statistics fit also
/// writes its output in the same dispatch (`norm_lanes_flat`), which these checks cover too.
#[test]
fn variant_norm_statistics_by_lanes() {
    variants(VARIANT_KINDS[20]);
}

/// A group norm's backward by one subgroup of 8 lanes per group in one dispatch (lavapipe's
/// default), or by the planes' sums, the group means and dx in three.
#[test]
fn variant_norm_backward_by_lanes() {
    variants(VARIANT_KINDS[21]);
}

/// Row reductions (softmax, sums along an axis) by a workgroup per row with subgroup sums (GPUs'
/// default with subgroups).
#[test]
fn variant_subgroup_reductions() {
    variants(VARIANT_KINDS[14]);
}

/// Attention by workgroups that stage key/value tiles (GPUs' default), through the tape's ops.
#[test]
fn variant_tiled_attention() {
    variants(VARIANT_KINDS[11]);
}

/// Convolutions by implicit GEMM on workgroup tiles (GPUs' default), forward and backward.
#[test]
fn variant_workgroup_convolutions() {
    variants(VARIANT_KINDS[12]);
}

/// Winograd's transforms and the channel pack through a buffer copied into the products'
/// texture, or straight into it.
#[test]
fn variant_textures_via_buffer() {
    variants(VARIANT_KINDS[16]);
}

/// Products in f16 arithmetic (opt-in), held to `check::F16_TOLERANCE`.
#[test]
fn variant_f16_products() {
    variants(VARIANT_KINDS[13]);
}

/// The direct weight gradient (`conv2d::weight_gradient_direct`) where its operands exceed one
/// storage binding: images in pieces (the slices accumulate), dY packed in windows, the slices
/// summed by runs of output channels, the bias gradient from the product's spare column group
/// where it takes one; against the CPU reference.
#[test]
fn direct_weight_gradient_splits_across_small_bindings() {
    use taming::engine::kernels::conv2d::{self, cpu};
    let base = gpu();
    let device = base.variant(taming::engine::Tuning { max_binding: Some(16384), ..base.tuning.clone() }).unwrap();
    for (spec, kk, (b, cin, cout, h, w)) in
        [(ConvSpec::same(1, 1), 3, (3, 32, 40, 8, 8)), (ConvSpec::downsample(), 3, (2, 16, 36, 12, 16))]
    {
        let x = random_vec(b * cin * h * w, 1, 1.0);
        let wt = random_vec(cout * cin * kk * kk, 2, 1.0);
        let (ho, wo) = spec.out_size(h, w, kk, kk).unwrap();
        let g = random_vec(b * cout * ho * wo, 3, 1.0);
        let (_, want, want_db) = cpu::conv2d_backward(&x, b, cin, h, w, &wt, cout, kk, kk, &g, spec);
        let xt = Tensor::from_f32(&device, &x, &[b, cin, h, w]).unwrap();
        let gt = Tensor::from_f32(&device, &g, &[b, cout, ho, wo]).unwrap();
        let dw = Tensor::empty(&device, &[cout, cin, kk, kk], DType::F32).unwrap();
        let what = format!("{spec:?} {b}x{cin}x{h}x{w}->{cout}");
        match conv2d::weight_gradient_direct(&xt, &gt, spec, (kk, kk), &dw, None) {
            Ok(conv2d::DirectGradient::NotTaken) => eprintln!("this device does not take the direct weight gradient"),
            // Both shapes leave the product's last workgroup lanes to spare (N = 288, 144).
            Ok(conv2d::DirectGradient::Weights) => panic!("{what}: no bias gradient"),
            Ok(conv2d::DirectGradient::WeightsAndBias(db)) => {
                assert_close(&format!("dW {what}"), &dw.to_vec().unwrap(), &want, 1e-4);
                assert_close(&format!("dbias {what}"), &db.to_vec().unwrap(), &want_db, 1e-4);
            }
            Err(e) => panic!("direct weight gradient on 16 KiB bindings: {e:#}"),
        }
    }
}

/// A forward convolution's input planes kept for its weight gradient (`conv2d::SavedPlanes`):
/// dW from them matches the CPU reference; where dW takes the images in pieces (a small im2col
/// budget: the forward packs both images at once, dW one at a time) or the planes are another
/// input's (another shape), it packs its own.
#[test]
fn weight_gradient_reuses_the_forward_planes() {
    use taming::engine::kernels::conv2d::{self, cpu, ConvPath};
    let base = gpu();
    let kk = 3;
    for (budget, spec) in
        [(None, ConvSpec::same(1, 1)), (Some(2000), ConvSpec::same(1, 1)), (None, ConvSpec::downsample())]
    {
        let budget = budget.unwrap_or(base.tuning.im2col_budget);
        let device = base.variant(taming::engine::Tuning { im2col_budget: budget, ..base.tuning.clone() }).unwrap();
        let (b, cin, cout) = (2, 8, 12);
        let wt = random_vec(cout * cin * kk * kk, 2, 1.0);
        let wtt = Tensor::from_f32(&device, &wt, &[cout, cin, kk, kk]).unwrap();
        let x = random_vec(b * cin * 8 * 8, 1, 1.0);
        let xt = Tensor::from_f32(&device, &x, &[b, cin, 8, 8]).unwrap();
        let mut saved = None;
        conv2d::conv2d_saving(&xt, &wtt, None, spec, ConvPath::ChannelPacked, Some(&mut saved)).unwrap();
        if saved.is_none() {
            eprintln!("this device's forward convolution kept no planes");
            return;
        }
        // The planes' own input, then one of another shape.
        for (h, w, seed) in [(8, 8, 1), (12, 8, 4)] {
            let x = random_vec(b * cin * h * w, seed, 1.0);
            let xt = if h == 8 { xt.clone() } else { Tensor::from_f32(&device, &x, &[b, cin, h, w]).unwrap() };
            let (ho, wo) = spec.out_size(h, w, kk, kk).unwrap();
            let g = random_vec(b * cout * ho * wo, 3, 1.0);
            let (_, want, _) = cpu::conv2d_backward(&x, b, cin, h, w, &wt, cout, kk, kk, &g, spec);
            let gt = Tensor::from_f32(&device, &g, &[b, cout, ho, wo]).unwrap();
            let dw = Tensor::empty(&device, &[cout, cin, kk, kk], DType::F32).unwrap();
            let what = format!("{spec:?} {b}x{cin}x{h}x{w}->{cout}, im2col budget {budget}");
            match conv2d::weight_gradient_direct(&xt, &gt, spec, (kk, kk), &dw, saved.as_ref()) {
                Ok(conv2d::DirectGradient::NotTaken) => panic!("{what}: kept planes but no direct weight gradient"),
                Ok(_) => assert_close(&format!("dW {what}"), &dw.to_vec().unwrap(), &want, 1e-4),
                Err(e) => panic!("{what}: {e:#}"),
            }
        }
    }
}

/// Training's backward passes on tensors larger than one binding (whole images within one):
/// col2im's input gradient (dY in per-image pieces instead of one transposed copy, dx bound by
/// windows of images) and the group norm's backward (runs of images) match the CPU references.
#[test]
fn convolution_and_norm_backward_split_across_small_bindings() {
    use taming::engine::kernels::conv2d::{self, cpu};
    use taming::engine::kernels::norm::{self, NormKind};
    let base = gpu();
    let device = base.variant(taming::engine::Tuning { max_binding: Some(40 << 10), ..base.tuning.clone() }).unwrap();
    // 73.7 KB of input and output gradient, 18.4 KB an image.
    for (spec, kk, (b, cin, cout, h, w)) in
        [(ConvSpec::downsample(), 3, (4, 8, 32, 24, 24)), (ConvSpec::same(2, 1), 4, (4, 8, 32, 24, 24))]
    {
        let x = random_vec(b * cin * h * w, 1, 1.0);
        let wt = random_vec(cout * cin * kk * kk, 2, 1.0);
        let (ho, wo) = spec.out_size(h, w, kk, kk).unwrap();
        let g = random_vec(b * cout * ho * wo, 3, 1.0);
        let (want_dx, want_dw, want_db) = cpu::conv2d_backward(&x, b, cin, h, w, &wt, cout, kk, kk, &g, spec);
        let xt = Tensor::from_f32(&device, &x, &[b, cin, h, w]).unwrap();
        let wtt = Tensor::from_f32(&device, &wt, &[cout, cin, kk, kk]).unwrap();
        let gt = Tensor::from_f32(&device, &g, &[b, cout, ho, wo]).unwrap();
        let what = format!("{spec:?} {b}x{cin}x{h}x{w}->{cout}");
        let paths = conv2d::BackwardPaths { dx: true, dx_by_convolution: false, dw_direct: false };
        let (dx, dw, db) = conv2d::conv2d_backward_with(&xt, &wtt, &gt, spec, paths, None)
            .unwrap_or_else(|e| panic!("conv backward {what} on 40 KiB bindings: {e:#}"));
        let dx = dx.unwrap_or_else(|| panic!("conv backward {what}: no dx"));
        assert_close(&format!("dx {what}"), &dx.to_vec().unwrap(), &want_dx, 1e-4);
        assert_close(&format!("dW {what}"), &dw.to_vec().unwrap(), &want_dw, 1e-4);
        assert_close(&format!("db {what}"), &db.to_vec().unwrap(), &want_db, 1e-4);
    }
    let shape = [4usize, 32, 12, 12];
    let kind = NormKind::Group { groups: 8 };
    let (x, g) = (random_vec(shape.iter().product(), 4, 1.0), random_vec(shape.iter().product(), 5, 1.0));
    let (gamma, beta) = (random_vec(32, 6, 1.0), random_vec(32, 7, 1.0));
    let (want_dx, want_dg, want_db) = norm::cpu::norm_backward(&x, &shape, kind, &gamma, 1e-6, &g);
    let xt = Tensor::from_f32(&device, &x, &shape).unwrap();
    let (gmt, bt) =
        (Tensor::from_f32(&device, &gamma, &[32]).unwrap(), Tensor::from_f32(&device, &beta, &[32]).unwrap());
    let out = norm::norm(&xt, kind, &gmt, &bt, 1e-6, false).unwrap();
    let gt = Tensor::from_f32(&device, &g, &shape).unwrap();
    let (dx, dg, db) = norm::norm_backward(&xt, &gt, &out.stats, &gmt, kind, None).unwrap();
    assert_close("group norm dx on 40 KiB bindings", &dx.to_vec().unwrap(), &want_dx, 1e-4);
    assert_close("group norm dgamma", &dg.to_vec().unwrap(), &want_dg, 1e-4);
    assert_close("group norm dbeta", &db.to_vec().unwrap(), &want_db, 1e-4);
}

/// Batch norm (the discriminator's) on a tensor larger than one binding, with its statistics read
/// from the buffer (not a texture copy): statistics and backward through channel-major copies
/// match the CPU references.
#[test]
fn batch_norm_splits_across_small_bindings() {
    use taming::engine::kernels::norm::{self, NormKind};
    let base = gpu();
    let tuning = taming::engine::Tuning {
        max_binding: Some(40 << 10),
        reads_via_texture: false,
        stats_subgroup: false,
        stats_workgroup: false,
        ..base.tuning.clone()
    };
    let device = base.variant(tuning).unwrap();
    // 64 KiB, 4 KiB a channel plane.
    let shape = [4usize, 16, 16, 16];
    let n: usize = shape.iter().product();
    let x: Vec<f32> = random_vec(n, 8, 1.0).iter().map(|v| v * 3.0 + 2.0).collect();
    let g = random_vec(n, 9, 1.0);
    let (gamma, beta) = (random_vec(16, 10, 1.0), random_vec(16, 11, 1.0));
    let xt = Tensor::from_f32(&device, &x, &shape).unwrap();
    let (gmt, bt) =
        (Tensor::from_f32(&device, &gamma, &[16]).unwrap(), Tensor::from_f32(&device, &beta, &[16]).unwrap());
    let out = norm::norm(&xt, NormKind::Batch, &gmt, &bt, 1e-5, false).unwrap();
    let want = norm::cpu::norm(&x, &shape, NormKind::Batch, &gamma, &beta, 1e-5, false);
    assert_close("batch norm on 40 KiB bindings", &out.y.to_vec().unwrap(), &want, 1e-4);
    let gt = Tensor::from_f32(&device, &g, &shape).unwrap();
    let (dx, dg, db) = norm::norm_backward(&xt, &gt, &out.stats, &gmt, NormKind::Batch, None).unwrap();
    let (want_dx, want_dg, want_db) = norm::cpu::norm_backward(&x, &shape, NormKind::Batch, &gamma, 1e-5, &g);
    assert_close("batch norm dx on 40 KiB bindings", &dx.to_vec().unwrap(), &want_dx, 1e-4);
    assert_close("batch norm dgamma", &dg.to_vec().unwrap(), &want_dg, 1e-4);
    assert_close("batch norm dbeta", &db.to_vec().unwrap(), &want_db, 1e-4);
}

#[test]
fn variant_matmul_tiles() {
    variants(VARIANT_KINDS[0]);
}

#[test]
fn variant_pack_kernels() {
    variants(VARIANT_KINDS[1]);
}

#[test]
fn variant_norm_statistics() {
    variants(VARIANT_KINDS[2]);
}

#[test]
fn variant_winograd() {
    variants(VARIANT_KINDS[3]);
}

#[test]
fn variant_attention() {
    variants(VARIANT_KINDS[4]);
}

#[test]
fn variant_row_products() {
    variants(VARIANT_KINDS[5]);
}

#[test]
fn variant_decode_key_chunk() {
    variants(VARIANT_KINDS[18]);
}

/// Elementwise ops through flat texture copies (off by default on lavapipe, where the device
/// reads through textures at all), with the backward family that runs them.
#[test]
fn variant_elementwise_texture_reads() {
    variants(VARIANT_KINDS[19]);
}

#[test]
fn variant_im2col_in_pieces() {
    variants(VARIANT_KINDS[6]);
}

/// Small storage bindings: every kernel that splits a tensor larger than one binding does it
/// on the checks' shapes and still matches its CPU reference.
#[test]
fn variant_small_bindings() {
    variants(VARIANT_KINDS[7]);
}

/// Mesa's OpenGL device (llvmpipe through wgpu's GL backend): every check
/// of every variant, and the PyTorch fixtures, where it is present.
#[test]
fn gl_backend_passes_every_check_and_the_fixtures() {
    let req = DeviceRequest { backend: Some("gl".into()), ..Default::default() };
    if list_adapters(&req).map(|a| a.is_empty()).unwrap_or(true) {
        eprintln!("\n*** SKIPPED: no OpenGL adapter (Mesa's libegl-mesa0 + libgl1-mesa-dri give one) ***\n");
        return;
    }
    let gl = Gpu::new(&req).unwrap();
    let started = std::time::Instant::now();
    let outcomes = check::run(&gl, &check::Plan::default(), |_| {}).unwrap();
    let failed: Vec<String> = outcomes.iter().filter(|o| !o.passed()).map(|o| o.line()).collect();
    eprintln!("GL: {} checks in {:.1} s", outcomes.len(), started.elapsed().as_secs_f32());
    assert!(outcomes.len() > 500, "only {} checks ran on GL", outcomes.len());
    assert!(failed.is_empty(), "on GL:\n{}", failed.join("\n"));
    if let Some(dir) = common::fixtures_dir() {
        let tally = taming::workflows::verify::run_tally(&gl, &[dir.join("vqgan"), dir.join("transformer")]).unwrap();
        assert_eq!(tally.failed, 0, "fixtures on GL: see the output above");
        assert!(tally.passed >= 438, "only {} fixture checks ran on GL", tally.passed);
    }
}

#[test]
fn unknown_or_unsupported_tiles_are_errors() {
    let bad = DeviceRequest { mm_tile: Some("17x3".into()), ..DeviceRequest::from_env() };
    let e = Gpu::new(&bad).err().expect("an unknown tile is an error");
    assert!(format!("{e:#}").contains("unknown matmul tile '17x3'"), "{e:#}");
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let (_, a) = rand(&[3, 4], 1);
    let (_, b) = rand(&[5, 6], 2);
    let e = kernels::matmul::matmul(&a, &b, false, false, None).unwrap_err();
    assert!(format!("{e}").contains("inner dimensions"), "{e}");
    let (_, bias) = rand(&[7], 3);
    let (_, b) = rand(&[4, 6], 4);
    assert!(kernels::matmul::matmul(&a, &b, false, false, Some(&bias)).is_err());
    let (_, v) = rand(&[4], 5);
    assert!(kernels::matmul::matmul(&v, &b, false, false, None).is_err());
    // Convolution channels that do not agree.
    let (_, x) = rand(&[1, 3, 8, 8], 1);
    let (_, w) = rand(&[4, 5, 3, 3], 2);
    assert!(kernels::conv2d::conv2d(&x, &w, None, ConvSpec::same(1, 1)).is_err());
    // Attention: heads that do not divide, a KV position past the cache, heads that differ.
    let (_, q) = rand(&[2, 24, 35], 4);
    assert!(kernels::attention::multi_head(&q, &q, &q, 7, true).is_err());
    let (_, cache) = rand(&[2, 128, 96], 30);
    let kv = kernels::attention::KvCache::from_rows(cache, false).unwrap();
    assert!(kv.attend(4, 128).is_err());
    assert!(kv.attend(5, 3).is_err());
    // Elementwise shapes, concat along a mismatched dimension, swap_dims of the wrong size.
    let (_, x) = rand(&[2, 3, 5, 7], 15);
    let (_, y) = rand(&[2, 4, 5, 7], 18);
    assert!(kernels::elementwise::add(&x, &y).is_err());
    assert!(kernels::copy::concat(&[&x, &y], 2).is_err());
    assert!(kernels::copy::swap_dims(&x, 2, 3, 5, 8).is_err());
    // Layer norm of rows with a gamma of the wrong size.
    let (_, xt) = rand(&[2, 6], 43);
    let (_, gt) = rand(&[5], 44);
    assert!(kernels::norm::layer_norm_rows(&xt, &gt, &gt, 1e-5).is_err());
    // Row products: K not a multiple of 4, an output too small, the input as output.
    use kernels::matmul::{gemv_into, pack_row_weight, Epilogue};
    let (_, wt) = rand(&[8, 6], 1);
    let (_, xt) = rand(&[1, 6], 2);
    let packed = pack_row_weight(&wt, true, false).unwrap();
    let out = Tensor::zeros(&gpu(), &[8]).unwrap();
    assert!(gemv_into(&xt, &packed, None, Epilogue::default(), &out, 0, 8).is_err());
    let (_, wt) = rand(&[8, 4], 3);
    let (_, xt) = rand(&[2, 4], 4);
    let packed = pack_row_weight(&wt, true, false).unwrap();
    assert!(gemv_into(&xt, &packed, None, Epilogue::default(), &out, 0, 8).is_err());
    assert!(gemv_into(&xt, &packed, None, Epilogue::default(), &xt, 0, 8).is_err());
}

#[test]
fn winograd_and_fused_norm_refuse_operands_that_do_not_fit() {
    use kernels::conv2d::{conv2d_after_norm_swish, fuses_norm_swish};
    use kernels::winograd;
    let (_, xt) = rand(&[2, 8, 5, 16], 1);
    let (_, wtt) = rand(&[7, 8, 3, 3], 2);
    if winograd::applies(&xt, &wtt, ConvSpec::same(1, 1)) {
        let out = Tensor::zeros(&gpu(), &[2, 7, 5, 16]).unwrap();
        let (_, wrong) = rand(&[2, 7, 5, 17], 4);
        assert!(winograd::conv3x3_in_pieces(&xt, None, &wtt, None, Some(&wrong), &out, 5).is_err());
        let out = Tensor::zeros(&gpu(), &[2, 8, 5, 16]).unwrap();
        assert!(winograd::conv3x3_in_pieces(&xt, None, &wtt, None, None, &out, 5).is_err());
    }
    // Statistics of the wrong size, and a stride-2 convolution (im2col), are errors.
    let (_, xt) = rand(&[1, 8, 4, 8], 1);
    let (_, gt) = rand(&[8], 2);
    let (_, wtt) = rand(&[4, 8, 3, 3], 3);
    let stats = kernels::norm::statistics(&xt, NormKind::Group { groups: 4 }, 1e-6).unwrap();
    let pre = NormSwish { stats: &stats, gamma: &gt, beta: &gt, groups: 2 };
    assert!(conv2d_after_norm_swish(&xt, &pre, &wtt, None, ConvSpec::same(1, 1)).is_err());
    let pre = NormSwish { stats: &stats, gamma: &gt, beta: &gt, groups: 4 };
    assert!(!fuses_norm_swish(&xt, &wtt, ConvSpec::downsample()));
    assert!(conv2d_after_norm_swish(&xt, &pre, &wtt, None, ConvSpec::downsample()).is_err());
}

#[test]
fn bad_input_is_an_error() {
    let g = gpu();
    assert!(Tensor::from_f32(&g, &[1.0, 2.0], &[3]).is_err());
    let empty = Tensor::from_f32(&g, &[], &[0, 4]).unwrap();
    assert!(kernels::reduce::reduce(&empty, Reduce::Sum).is_err());
    assert!(kernels::softmax::softmax(&empty, 1.0).is_err());
    // A tensor bigger than the whole device buffer limit.
    let huge = Tensor::empty(&g, &[1 << 20, 1 << 20], DType::F32);
    assert!(huge.is_err());
}

#[test]
fn tensors_larger_than_one_binding_are_split_or_refused() {
    let g = gpu();
    let max = g.max_binding() as usize / 4;
    let n = max + max / 4 + 3;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.01 - 5.0).collect();
    let xt = Tensor::from_f32(&g, &x, &[n]).unwrap();
    // Elementwise ops split the work at binding boundaries.
    let y = kernels::elementwise::unary(&xt, kernels::elementwise::Unary::Affine(2.0, 1.0)).unwrap();
    let got = y.to_vec().unwrap();
    for i in [0, max - 1, max, max + 1, n - 1] {
        assert_eq!(got[i], 2.0 * x[i] + 1.0, "element {i}");
    }
    // Row kernels take runs of rows: softmax over rows of one value is 1 everywhere.
    let y = kernels::softmax::softmax(&xt.reshape(&[n, 1]).unwrap(), 1.0).unwrap().to_vec().unwrap();
    assert!(y.iter().all(|&v| v == 1.0), "softmax split into runs of rows");
    // Kernels that cannot split refuse with a clear error naming themselves.
    let one = Tensor::from_f32(&g, &[1.0], &[1, 1]).unwrap();
    let e = kernels::elementwise::binary_mid(&xt, &one, kernels::elementwise::Binary::Mul, n, 1).unwrap_err();
    assert!(format!("{e}").contains("storage binding") && format!("{e}").contains("binary_mid"), "{e}");
}

#[test]
fn quantizer_is_exact_on_the_fixture() {
    let Some(dir) = common::fixtures_dir() else { return };
    let read = |f: &str| std::fs::read(dir.join("vqgan").join(f)).unwrap();
    let (model, reference) = (read("model.safetensors"), read("reference.safetensors"));
    let model = safetensors::SafeTensors::deserialize(&model).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let f32s = |t: safetensors::tensor::TensorView| -> (Vec<f32>, Vec<usize>) {
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        (bytemuck::pod_collect_to_vec::<u8, f32>(t.data()), t.shape().to_vec())
    };
    let (z, zs) = f32s(reference.tensor("quant_conv_out").unwrap());
    let (cb, cbs) = f32s(model.tensor("quantize.embedding.weight").unwrap());
    let idx = reference.tensor("indices").unwrap();
    let want: Vec<u32> = bytemuck::pod_collect_to_vec::<u8, i64>(idx.data()).iter().map(|&v| v as u32).collect();
    let g = gpu();
    let (got, zq) =
        kernels::quantize::nearest(&Tensor::from_f32(&g, &z, &zs).unwrap(), &Tensor::from_f32(&g, &cb, &cbs).unwrap())
            .unwrap();
    assert_eq!(got.to_u32_vec().unwrap(), want, "indices differ from the PyTorch reference");
    let (wzq, _) = f32s(reference.tensor("z_q").unwrap());
    assert_close("z_q vs fixture", &zq.to_vec().unwrap(), &wzq, 1e-6);
}

/// An image's convolution does not depend on the batch it runs in (every
/// path: Winograd where the device takes it at 32x32, implicit GEMM for 8
/// channels, im2col for 5).
#[test]
fn conv2d_is_the_same_in_any_batch() {
    for (cin, cout, h, w) in [(8, 64, 8, 8), (4, 3, 8, 16), (5, 7, 6, 6), (8, 5, 32, 32)] {
        let x = random_vec(3 * cin * h * w, 11, 1.0);
        let (_, wtt) = rand(&[cout, cin, 3, 3], 12);
        let per = cout * h * w;
        let mut first: Option<Vec<f32>> = None;
        for b in [1, 2, 3] {
            let xt = Tensor::from_f32(&gpu(), &x[..b * cin * h * w], &[b, cin, h, w]).unwrap();
            let y = kernels::conv2d::conv2d(&xt, &wtt, None, ConvSpec::same(1, 1)).unwrap().to_vec().unwrap();
            match &first {
                None => first = Some(y[..per].to_vec()),
                Some(f) => assert!(f[..] == y[..per], "conv {cin}->{cout} {h}x{w}: image 0 differs in a batch of {b}"),
            }
        }
    }
}

/// The device counts the commands it records (`bench train` reports them a step): a kernel is
/// dispatches and no other command, a buffer copy one command and no dispatch.
#[test]
fn device_counts_its_commands() {
    // A device of its own: the shared one records the other tests' commands meanwhile.
    let gpu = Gpu::new(&DeviceRequest::from_env()).unwrap();
    let x = Tensor::from_f32(&gpu, &random_vec(12, 1, 1.0), &[3, 4]).unwrap();
    let (d0, c0) = gpu.command_counts();
    let y = kernels::copy::transpose(&x).unwrap();
    let (d1, c1) = gpu.command_counts();
    assert!(d1 > d0 && c1 == c0, "transpose: dispatches {d0} -> {d1}, other commands {c0} -> {c1}");
    gpu.copy(x.buffer(), 0, y.buffer(), 0, 48);
    assert_eq!(gpu.command_counts(), (d1, c1 + 1), "one buffer copy");
    gpu.sync().unwrap();
}
