//! Every forward kernel against its CPU reference, on random shapes that are
//! not multiples of the tile or workgroup sizes.

mod common;
use common::{assert_close, gpu};

use taming::engine::kernels::{self, random_vec};
use taming::engine::kernels::conv2d::{ConvPath, ConvSpec};
use taming::engine::kernels::elementwise::{Binary, Unary};
use taming::engine::kernels::norm::NormKind;
use taming::engine::kernels::reduce::Reduce;
use taming::engine::{DType, DeviceRequest, Gpu, Tensor};

fn rand(shape: &[usize], seed: u64) -> (Vec<f32>, Tensor) {
    let v = random_vec(shape.iter().product(), seed, 1.0);
    let t = Tensor::from_f32(&gpu(), &v, shape).unwrap();
    (v, t)
}

#[test]
fn matmul_matches_cpu_on_ragged_shapes_and_transposes() {
    // The last case's untransposed operands are packed by a buffer-to-texture
    // copy (rows of whole 256-byte multiples exactly covering the texture).
    let cases = [(1, 1, 1, 1), (1, 17, 33, 7), (3, 5, 70, 130), (2, 65, 19, 37), (1, 40, 24, 1), (2, 64, 128, 64)];
    for (ci, &(batch, m, n, k)) in cases.iter().enumerate() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let seed = ci as u64 * 10;
            let ash = if ta { [batch, k, m] } else { [batch, m, k] };
            let bsh = if tb { [n, k] } else { [k, n] };
            let (a, at) = rand(&ash, seed + 1);
            let (b, bt) = rand(&bsh, seed + 2);
            let (bias, biast) = rand(&[n], seed + 3);
            let got = kernels::matmul::matmul(&at, &bt, ta, tb, Some(&biast)).unwrap();
            assert_eq!(got.shape(), &[batch, m, n]);
            let want = kernels::matmul::cpu::matmul(&a, &b, batch, m, n, k, ta, tb, false, true, Some(&bias));
            assert_close(&format!("matmul b{batch} {m}x{n}x{k} ta={ta} tb={tb}"), &got.to_vec().unwrap(), &want, 1e-5);
        }
    }
    // Both operands batched, rank 2 without bias.
    let (a, at) = rand(&[2, 9, 13], 7);
    let (b, bt) = rand(&[2, 13, 6], 8);
    let got = kernels::matmul::matmul(&at, &bt, false, false, None).unwrap();
    let want = kernels::matmul::cpu::matmul(&a, &b, 2, 9, 6, 13, false, false, false, false, None);
    assert_close("batched matmul", &got.to_vec().unwrap(), &want, 1e-5);
    // Both batched with copy-packed layers.
    let (a, at) = rand(&[2, 32, 64], 9);
    let (b, bt) = rand(&[2, 64, 64], 10);
    let got = kernels::matmul::matmul(&at, &bt, false, false, None).unwrap();
    let want = kernels::matmul::cpu::matmul(&a, &b, 2, 32, 64, 64, false, false, false, false, None);
    assert_close("batched matmul, copied layers", &got.to_vec().unwrap(), &want, 1e-5);
}

/// Every register tile the device can run (the adapter's default is covered
/// by the other tests): products with ragged sizes, batches, transposes,
/// bias, alpha and beta, and a convolution, against the CPU reference.
#[test]
fn every_matmul_tile_matches_cpu() {
    use taming::engine::device::MM_TILES;
    use taming::engine::kernels::matmul::{gemm, Bias, Gemm, Operand, Out};
    let mut ran = Vec::new();
    for tile in MM_TILES.iter() {
        let started = std::time::Instant::now();
        let req = DeviceRequest { mm_tile: Some(tile.entry.to_string()), ..DeviceRequest::from_env() };
        let g = match Gpu::new(&req) {
            Ok(g) => g,
            // Subgroup tiles on a device without 8-lane subgroups: said, not run.
            Err(e) if tile.family == "matmul_subgroup" => {
                eprintln!("{}: not run on this device ({e})", tile.entry);
                continue;
            }
            Err(e) => panic!("{}: {e:#}", tile.entry),
        };
        let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(&g, v, shape).unwrap();
        for (ci, &(batch, m, n, k)) in [(1, 70, 67, 9), (2, 33, 130, 21), (1, 5, 9, 4)].iter().enumerate() {
            for (ta, tb) in [(false, false), (true, true)] {
                let s = 100 + 10 * ci as u64;
                let a = random_vec(batch * m * k, s, 1.0);
                let b = random_vec(batch * k * n, s + 1, 1.0);
                let bias = random_vec(n, s + 2, 1.0);
                let ashape = if ta { [batch, k, m] } else { [batch, m, k] };
                let bshape = if tb { [batch, n, k] } else { [batch, k, n] };
                let got = kernels::matmul::matmul(&t(&a, &ashape), &t(&b, &bshape), ta, tb, Some(&t(&bias, &[n]))).unwrap();
                let want = kernels::matmul::cpu::matmul(&a, &b, batch, m, n, k, ta, tb, false, false, Some(&bias));
                let what = format!("{} b{batch} {m}x{n}x{k} ta={ta} tb={tb}", tile.entry);
                assert_close(&what, &got.to_vec().unwrap(), &want, 1e-5);
            }
        }
        // Alpha and beta (C += alpha * A B + bias), bias per row.
        let (m, n, k) = (37, 45, 12);
        let a = random_vec(m * k, 1, 1.0);
        let b = random_vec(k * n, 2, 1.0);
        let c0 = random_vec(m * n, 3, 1.0);
        let bias = random_vec(m, 4, 1.0);
        let (at, bt, ct, biast) = (t(&a, &[m, k]), t(&b, &[k, n]), t(&c0, &[m, n]), t(&bias, &[m]));
        let gm = Gemm { m, n, k, batch: 1, alpha: 0.5, beta: 1.0 };
        gemm(gm, Operand::rows(&at, 0, k, 0, false), Operand::rows(&bt, 0, n, 0, false),
             Out { t: &ct, off: 0, ld: n, bs: 0 }, Bias::Row(&biast, 0)).unwrap();
        let ab = kernels::matmul::cpu::matmul(&a, &b, 1, m, n, k, false, false, false, false, None);
        let want: Vec<f32> = (0..m * n).map(|i| c0[i] + 0.5 * ab[i] + bias[i / n]).collect();
        assert_close(&format!("{} alpha/beta/row bias", tile.entry), &ct.to_vec().unwrap(), &want, 1e-5);
        // 3x3 convolutions: im2col + this product (5 channels), and on
        // subgroup tiles the implicit-GEMM entry (8 channels, width 16).
        for (bn, cin, cout, h, w) in [(2, 5, 11, 9, 7), (2, 8, 35, 5, 16)] {
            let x = random_vec(bn * cin * h * w, 5, 1.0);
            let wt = random_vec(cout * cin * 9, 6, 1.0);
            let bias = random_vec(cout, 7, 1.0);
            let spec = ConvSpec::same(1, 1);
            let got = kernels::conv2d::conv2d(&t(&x, &[bn, cin, h, w]), &t(&wt, &[cout, cin, 3, 3]), Some(&t(&bias, &[cout])),
                                              spec).unwrap();
            let (want, _, _) = kernels::conv2d::cpu::conv2d(&x, bn, cin, h, w, &wt, cout, 3, 3, Some(&bias), spec);
            assert_close(&format!("{} conv 3x3 {cin}->{cout}", tile.entry), &got.to_vec().unwrap(), &want, 1e-5);
        }
        eprintln!("{}: checked in {:.1} s", tile.entry, started.elapsed().as_secs_f32());
        ran.push(tile.entry);
    }
    assert!(ran.len() >= 4, "only {ran:?} ran");
    eprintln!("tiles checked: {ran:?}");
    let bad = DeviceRequest { mm_tile: Some("17x3".into()), ..DeviceRequest::from_env() };
    let e = Gpu::new(&bad).err().expect("an unknown tile is an error");
    assert!(format!("{e:#}").contains("unknown matmul tile '17x3'"), "{e:#}");
}

/// Products into a column block of a wider matrix whose rows are whole
/// texels (the four-column stores of the subgroup tiles): a ragged N leaves
/// the columns past it as they were, with column bias and beta, in a batch.
#[test]
fn matmul_into_column_block_keeps_other_columns() {
    use taming::engine::kernels::matmul::{gemm, Bias, Gemm, Operand, Out};
    let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(&gpu(), v, shape).unwrap();
    for (m, n, k, ld) in [(9usize, 7usize, 13usize, 12usize), (33, 5, 8, 8), (40, 70, 20, 76)] {
        let batch = 2;
        let a = random_vec(batch * m * k, 31, 1.0);
        let b = random_vec(batch * k * n, 32, 1.0);
        let c0 = random_vec(batch * m * ld, 33, 1.0);
        let bias = random_vec(n, 34, 1.0);
        let ct = t(&c0, &[batch * m * ld]);
        let g = Gemm { m, n, k, batch, alpha: 1.0, beta: 0.5 };
        gemm(g, Operand::rows(&t(&a, &[batch * m * k]), 0, k, m * k, false), Operand::rows(&t(&b, &[batch * k * n]), 0, n, k * n, false),
             Out { t: &ct, off: 0, ld, bs: m * ld }, Bias::Col(&t(&bias, &[n]))).unwrap();
        let ab = kernels::matmul::cpu::matmul(&a, &b, batch, m, n, k, false, false, false, false, None);
        let mut want = c0.clone();
        for bi in 0..batch {
            for r in 0..m {
                for col in 0..n {
                    let i = bi * m * ld + r * ld + col;
                    want[i] = ab[(bi * m + r) * n + col] + bias[col] + 0.5 * c0[i];
                }
            }
        }
        assert_close(&format!("{m}x{n}x{k} into columns of {ld}"), &ct.to_vec().unwrap(), &want, 1e-5);
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let (_, a) = rand(&[3, 4], 1);
    let (_, b) = rand(&[5, 6], 2);
    let e = kernels::matmul::matmul(&a, &b, false, false, None).unwrap_err();
    assert!(format!("{e}").contains("inner dimensions"), "{e}");
    let (_, bias) = rand(&[7], 3);
    let (_, b) = rand(&[4, 6], 4);
    assert!(kernels::matmul::matmul(&a, &b, false, false, Some(&bias)).is_err());
    let (_, v) = rand(&[4], 5);
    assert!(kernels::matmul::matmul(&v, &b, false, false, None).is_err());
}

const CONV_PATHS: [ConvPath; 5] =
    [ConvPath::Best, ConvPath::Winograd, ConvPath::Implicit, ConvPath::Im2colTexture, ConvPath::Im2colBuffer];

#[test]
fn conv2d_variants_match_cpu() {
    // (batch, cin, cout, h, w, kernel, spec) — the variants VQGAN and the PatchGAN use.
    let cases = [
        (2, 3, 5, 9, 13, 3, ConvSpec::same(1, 1)),
        (1, 6, 4, 11, 7, 3, ConvSpec::downsample()),
        (2, 5, 7, 6, 5, 1, ConvSpec::same(1, 0)),
        (2, 3, 8, 10, 9, 4, ConvSpec::same(2, 1)),
        (1, 4, 1, 7, 6, 4, ConvSpec::same(1, 1)),
        (3, 33, 9, 4, 6, 3, ConvSpec::same(1, 1)),
        // Channels % 4 == 0 and output widths % 8 == 0: the implicit-GEMM
        // path where the device has it (two row tiles, ragged pixel tiles).
        (2, 8, 37, 9, 16, 3, ConvSpec::same(1, 1)),
        (1, 4, 3, 5, 24, 3, ConvSpec::same(1, 1)),
        (2, 12, 5, 7, 9, 4, ConvSpec::same(1, 1)),
        (1, 16, 6, 3, 6, 1, ConvSpec::same(1, 1)),
        // Several 8-texel pieces per row of the shifted planes; left pad 0.
        (1, 4, 5, 3, 40, 3, ConvSpec::same(1, 1)),
        (2, 8, 5, 3, 8, 1, ConvSpec::same(1, 0)),
    ];
    for (i, &(b, cin, cout, h, w, kk, spec)) in cases.iter().enumerate() {
        let s = i as u64 * 10;
        let (x, xt) = rand(&[b, cin, h, w], s + 1);
        let (wt, wtt) = rand(&[cout, cin, kk, kk], s + 2);
        let (bias, biast) = rand(&[cout], s + 3);
        let (want, ho, wo) = kernels::conv2d::cpu::conv2d(&x, b, cin, h, w, &wt, cout, kk, kk, Some(&bias), spec);
        // Every path: Winograd, implicit GEMM, im2col with the input planes
        // read from a texture and from the buffer (each where it applies).
        for path in CONV_PATHS {
            let got = kernels::conv2d::conv2d_with(&xt, &wtt, Some(&biast), spec, path).unwrap();
            assert_eq!(got.shape(), &[b, cout, ho, wo]);
            let what = format!("conv {kk}x{kk} {spec:?} {b}x{cin}x{h}x{w}->{cout} ({path:?})");
            // Winograd's transforms round differently from a direct sum.
            let winograd = matches!(path, ConvPath::Best | ConvPath::Winograd);
            assert_close(&what, &got.to_vec().unwrap(), &want, if winograd { 1e-4 } else { 1e-5 });
        }
    }
    // Channel mismatch is an error, not a panic.
    let (_, x) = rand(&[1, 3, 8, 8], 1);
    let (_, w) = rand(&[4, 5, 3, 3], 2);
    assert!(kernels::conv2d::conv2d(&x, &w, None, ConvSpec::same(1, 1)).is_err());
}

/// Winograd F(4x4, 3x3): its CPU reference against the direct convolution,
/// and the kernels against both, on sizes that are not whole 4x4 tiles,
/// channels that are not whole texels, batches, and in pieces of tiles that
/// split images and quads of tiles.
#[test]
fn winograd_conv3x3_matches_direct() {
    use kernels::winograd;
    let same = ConvSpec::same(1, 1);
    for (i, &(b, cin, cout, h, w)) in [(2usize, 3usize, 5usize, 9usize, 13usize), (1, 8, 37, 5, 16), (3, 5, 7, 4, 4),
                                        (1, 33, 9, 7, 6), (2, 16, 12, 12, 11), (1, 4, 3, 1, 2), (2, 5, 7, 9, 16)]
        .iter().enumerate() {
        let s = 900 + 10 * i as u64;
        let (x, xt) = rand(&[b, cin, h, w], s);
        let (wt, wtt) = rand(&[cout, cin, 3, 3], s + 1);
        let (bias, biast) = rand(&[cout], s + 2);
        let (want, _, _) = kernels::conv2d::cpu::conv2d(&x, b, cin, h, w, &wt, cout, 3, 3, Some(&bias), same);
        let what = format!("winograd {b}x{cin}x{h}x{w} -> {cout}");
        let reference = winograd::cpu::conv3x3(&x, b, cin, h, w, &wt, cout, Some(&bias));
        assert_close(&format!("{what}: CPU reference"), &reference, &want, 1e-5);
        if !winograd::applies(&xt, &wtt, same) {
            eprintln!("{what}: this device does not take Winograd convolutions; only the CPU reference checked");
            continue;
        }
        let tiles = b * h.div_ceil(4) * w.div_ceil(4);
        for piece in [tiles, 5, 1] {
            let out = Tensor::zeros(&gpu(), &[b, cout, h, w]).unwrap();
            winograd::conv3x3_in_pieces(&xt, None, &wtt, Some(&biast), None, &out, piece).unwrap();
            assert_close(&format!("{what}, pieces of {piece} tiles"), &out.to_vec().unwrap(), &reference, 1e-5);
        }
        // A residual added as the output is written (a ResnetBlock's x + h).
        let (r, rt) = rand(&[b, cout, h, w], s + 3);
        let out = Tensor::zeros(&gpu(), &[b, cout, h, w]).unwrap();
        winograd::conv3x3_in_pieces(&xt, None, &wtt, None, Some(&rt), &out, 5).unwrap();
        let plain = winograd::cpu::conv3x3(&x, b, cin, h, w, &wt, cout, None);
        let with_residual: Vec<f32> = plain.iter().zip(&r).map(|(a, b)| a + b).collect();
        assert_close(&format!("{what} + residual"), &out.to_vec().unwrap(), &with_residual, 1e-5);
        let (_, wrong) = rand(&[b, cout, h, w + 1], s + 4);
        assert!(winograd::conv3x3_in_pieces(&xt, None, &wtt, None, Some(&wrong), &out, 5).is_err());
        // The flat input and weight textures filled by the pack kernel instead of copies.
        {
            let _env = common::env_lock();
            std::env::set_var("TAMING_PACK_KERNEL", "1");
            let out = Tensor::zeros(&gpu(), &[b, cout, h, w]).unwrap();
            let done = winograd::conv3x3_in_pieces(&xt, None, &wtt, Some(&biast), None, &out, 5);
            std::env::remove_var("TAMING_PACK_KERNEL");
            done.unwrap();
            assert_close(&format!("{what}, flat textures by kernel"), &out.to_vec().unwrap(), &reference, 1e-5);
        }
        // Shapes that do not fit are errors.
        let out = Tensor::zeros(&gpu(), &[b, cout + 1, h, w]).unwrap();
        assert!(winograd::conv3x3_in_pieces(&xt, None, &wtt, None, None, &out, 5).is_err());
    }
}

#[test]
fn norms_match_cpu() {
    // Odd spans take the scalar entries; spans that are multiples of 4 the
    // vec4 ones, with statistics split into ragged chunks of 1,024 (the second
    // batch-norm case's chunk boundary falls inside a segment).
    let cases: [(&[usize], NormKind, bool); 8] = [
        (&[2, 64, 5, 7], NormKind::Group { groups: 32 }, true),
        (&[1, 96, 3, 3], NormKind::Group { groups: 32 }, false),
        (&[7, 37], NormKind::Layer, false),
        (&[3, 5, 4, 6], NormKind::Batch, false),
        (&[2, 64, 36, 36], NormKind::Group { groups: 32 }, true),
        (&[5, 64], NormKind::Layer, true),
        (&[5, 3, 16, 20], NormKind::Batch, false),
        (&[1, 96, 4, 5], NormKind::Group { groups: 32 }, false),
    ];
    for (i, (shape, kind, swish)) in cases.iter().enumerate() {
        let (x, xt) = rand(shape, i as u64 + 100);
        let c = if *kind == NormKind::Layer { *shape.last().unwrap() } else { shape[1] };
        let (g, gt) = rand(&[c], i as u64 + 200);
        let (bb, bt) = rand(&[c], i as u64 + 300);
        // Offset the data so a one-pass variance would lose precision.
        let x: Vec<f32> = x.iter().map(|v| v * 3.0 + 10.0).collect();
        let xt2 = Tensor::from_f32(&gpu(), &x, shape).unwrap();
        drop(xt);
        let eps = if matches!(kind, NormKind::Group { .. }) { 1e-6 } else { 1e-5 };
        let want = kernels::norm::cpu::norm(&x, shape, *kind, &g, &bb, eps, *swish);
        // The vec4 statistics read x through a texture copy on CPU devices;
        // TAMING_PACK_KERNEL sends them through buffer loads instead.
        for buffer_loads in [false, true] {
            let _env = common::env_lock();
            if buffer_loads {
                std::env::set_var("TAMING_PACK_KERNEL", "1");
            }
            let got = kernels::norm::norm(&xt2, *kind, &gt, &bt, eps, *swish);
            std::env::remove_var("TAMING_PACK_KERNEL");
            assert_close(&format!("{kind:?} {shape:?} (buffer loads: {buffer_loads})"), &got.unwrap().y.to_vec().unwrap(), &want, 1e-4);
        }
    }
}

#[test]
fn softmax_and_cross_entropy_match_cpu() {
    let (x, xt) = rand(&[13, 37], 5);
    let got = kernels::softmax::softmax(&xt, 0.7).unwrap();
    assert_close("softmax", &got.to_vec().unwrap(), &kernels::softmax::cpu::softmax(&x, 37, 0.7), 1e-5);
    let mut targets: Vec<u32> = (0..13).map(|i| (i * 5 % 37) as u32).collect();
    targets[3] = kernels::cross_entropy::IGNORE;
    let tt = Tensor::from_u32(&gpu(), &targets, &[13]).unwrap();
    let ce = kernels::cross_entropy::cross_entropy(&xt, &tt).unwrap();
    assert_close("cross-entropy", &ce.loss.to_vec().unwrap(), &kernels::cross_entropy::cpu::cross_entropy(&x, 37, &targets), 1e-5);
}

#[test]
fn attention_matches_cpu() {
    for (b, tq, tk, c, heads, causal) in [(2, 19, 19, 32, 4, true), (1, 7, 7, 24, 2, false), (2, 3, 11, 16, 2, true), (1, 1, 9, 128, 1, true)] {
        let (q, qt) = rand(&[b, tq, c], 1);
        let (k, kt) = rand(&[b, tk, c], 2);
        let (v, vt) = rand(&[b, tk, c], 3);
        let want = kernels::attention::cpu::multi_head(&q, &k, &v, b, tq, tk, c, heads, causal);
        for (path, got) in [("fused", kernels::attention::multi_head_fused(&qt, &kt, &vt, heads, causal).unwrap()),
                            ("matmul", kernels::attention::multi_head_via_matmul(&qt, &kt, &vt, heads, causal).unwrap())] {
            assert_close(&format!("attention ({path}) b{b} tq{tq} tk{tk} c{c} h{heads}"), &got.out.to_vec().unwrap(), &want, 1e-5);
        }
    }
    // The fused kernels and the matmul path agree, forward and backward.
    let (_, qt) = rand(&[2, 6, 16], 21);
    let (_, kt) = rand(&[2, 9, 16], 22);
    let (_, vt) = rand(&[2, 9, 16], 23);
    let (_, dot) = rand(&[2, 6, 16], 24);
    for causal in [true, false] {
        let a = kernels::attention::multi_head_fused(&qt, &kt, &vt, 2, causal).unwrap();
        let b = kernels::attention::multi_head_via_matmul(&qt, &kt, &vt, 2, causal).unwrap();
        assert_close("attention fused vs matmul", &a.out.to_vec().unwrap(), &b.out.to_vec().unwrap(), 1e-5);
        assert_close("attention lse", &a.lse.to_vec().unwrap(), &b.lse.to_vec().unwrap(), 1e-5);
        let ga = kernels::attention::multi_head_backward_fused(&qt, &kt, &vt, &a, &dot, 2, causal).unwrap();
        let gb = kernels::attention::multi_head_backward_via_matmul(&qt, &kt, &vt, &dot, 2, causal).unwrap();
        for (name, x, y) in [("dq", &ga.0, &gb.0), ("dk", &ga.1, &gb.1), ("dv", &ga.2, &gb.2)] {
            assert_close(&format!("attention backward {name} fused vs matmul"), &x.to_vec().unwrap(), &y.to_vec().unwrap(), 1e-4);
        }
    }
    // Decoding against a KV cache: row pos of a [B, T_max, 3C] cache of
    // (q, k, v) attends to rows 0..=pos (split-key path above 16 keys),
    // matching the CPU reference on the same rows; with the cache read from
    // the buffer and from its texture copy (rows committed one by one).
    let (cache, cache_t) = rand(&[2, 128, 96], 30);
    for texture in [false, true] {
        let kv = kernels::attention::KvCache::from_rows(cache_t.clone(), texture).unwrap();
        for pos in 0..100 {
            kv.commit(pos);
        }
        for pos in [0usize, 4, 15, 16, 33, 99] {
            let got = kv.attend(4, pos).unwrap();
            let part = |part: usize, rows: std::ops::Range<usize>| -> Vec<f32> {
                (0..2).flat_map(|b| rows.clone().flat_map(move |t| (0..32).map(move |i| (b, t, i))))
                    .map(|(b, t, i)| cache[(b * 128 + t) * 96 + part * 32 + i]).collect()
            };
            let want = kernels::attention::cpu::multi_head(&part(0, pos..pos + 1), &part(1, 0..pos + 1), &part(2, 0..pos + 1),
                2, 1, pos + 1, 32, 4, true);
            assert_close(&format!("cached attention pos={pos} texture {texture}"), &got.to_vec().unwrap(), &want, 1e-5);
        }
        assert!(kv.attend(4, 128).is_err());
        assert!(kv.attend(5, 3).is_err());
    }
    let (q, qt) = rand(&[2, 24, 35], 4);
    let (k, kt) = rand(&[2, 24, 35], 5);
    let (v, vt) = rand(&[2, 24, 35], 6);
    let (got, _) = kernels::attention::spatial(&qt, &kt, &vt).unwrap();
    assert_close("spatial attention", &got.to_vec().unwrap(), &kernels::attention::cpu::spatial(&q, &k, &v, 2, 24, 35), 1e-5);
    // Head size that does not divide.
    assert!(kernels::attention::multi_head(&qt, &kt, &vt, 7, true).is_err());
}

#[test]
fn quantizer_matches_cpu() {
    let (z, zt) = rand(&[2, 16, 5, 3], 9);
    let (cb, cbt) = rand(&[37, 16], 10);
    let (widx, wzq) = kernels::quantize::cpu::nearest(&z, 2, 16, 15, &cb);
    // Scores from the product, and every distance in one kernel: the same numbers.
    for (idx, zq) in [kernels::quantize::nearest(&zt, &cbt).unwrap(), kernels::quantize::nearest_direct(&zt, &cbt).unwrap()] {
        assert_eq!(idx.to_u32_vec().unwrap(), widx);
        assert_eq!(idx.shape(), &[2, 5, 3]);
        assert_close("z_q", &zq.to_vec().unwrap(), &wzq, 0.0);
    }
}

#[test]
fn activations_and_arithmetic_match_cpu() {
    let (x, xt) = rand(&[3, 333], 11);
    let x4: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
    let xt = { drop(xt); Tensor::from_f32(&gpu(), &x4, &[3, 333]).unwrap() };
    // 999 elements take the scalar entry, 100 the vec4 one.
    let (z, _) = rand(&[4, 25], 15);
    let z: Vec<f32> = z.iter().map(|v| v * 4.0).collect();
    let zt = Tensor::from_f32(&gpu(), &z, &[4, 25]).unwrap();
    for op in [Unary::Swish, Unary::Gelu, Unary::LeakyRelu(0.2), Unary::Sigmoid, Unary::Affine(0.5, -1.0),
               Unary::Relu, Unary::Exp, Unary::Abs, Unary::Softplus] {
        for (v, t) in [(&x4, &xt), (&z, &zt)] {
            let got = kernels::elementwise::unary(t, op).unwrap();
            assert_close(&format!("{op:?} of {}", v.len()), &got.to_vec().unwrap(), &kernels::elementwise::cpu::unary(v, op), 1e-6);
        }
    }
    let (y, yt) = rand(&[3, 333], 12);
    for op in [Binary::AddScaled(1.0, 1.0), Binary::AddScaled(2.0, -0.5), Binary::Mul, Binary::Max] {
        let got = kernels::elementwise::binary(&xt, &yt, op).unwrap();
        assert_close(&format!("{op:?}"), &got.to_vec().unwrap(), &kernels::elementwise::cpu::binary_broadcast(&x4, &y, op, 1), 1e-6);
    }
    // Per-channel broadcast over [B, C, H, W].
    let (a, at) = rand(&[2, 3, 4, 5], 13);
    let (c, ct) = rand(&[3], 14);
    let got = kernels::elementwise::binary_broadcast(&at, &ct, Binary::AddScaled(1.0, 1.0), 20).unwrap();
    assert_close("broadcast add", &got.to_vec().unwrap(), &kernels::elementwise::cpu::binary_broadcast(&a, &c, Binary::AddScaled(1.0, 1.0), 20), 1e-6);
    assert!(kernels::elementwise::add(&xt, &at).is_err());
    // Whole vec4s (binary4): same shape, per channel (runs of 20), a row repeated (runs of 1).
    let (p, pt) = rand(&[4, 100], 15);
    let (q, qt) = rand(&[4, 100], 16);
    for op in [Binary::AddScaled(2.0, -0.5), Binary::Mul, Binary::Div, Binary::Max] {
        let got = kernels::elementwise::binary(&pt, &qt, op).unwrap();
        assert_close(&format!("{op:?} by vec4"), &got.to_vec().unwrap(), &kernels::elementwise::cpu::binary_broadcast(&p, &q, op, 1), 1e-6);
    }
    let (a, at) = rand(&[2, 8, 4, 5], 17);
    let (c, ct) = rand(&[8], 18);
    for inner in [20, 1] {
        let got = kernels::elementwise::binary_broadcast(&at, &ct, Binary::Mul, inner).unwrap();
        let want = kernels::elementwise::cpu::binary_broadcast(&a, &c, Binary::Mul, inner);
        assert_close(&format!("broadcast mul by vec4, runs of {inner}"), &got.to_vec().unwrap(), &want, 1e-6);
    }
}

#[test]
fn upsample_pad_reduce_embed_copy_match_cpu() {
    let (x, xt) = rand(&[2, 3, 5, 7], 15);
    let up = kernels::resample::upsample2x(&xt).unwrap();
    assert_eq!(up.shape(), &[2, 3, 10, 14]);
    assert_close("upsample", &up.to_vec().unwrap(), &kernels::resample::cpu::upsample2x(&x, 6, 5, 7), 0.0);
    // Widths % 4 == 0 go four input pixels at a time.
    let (x8, x8t) = rand(&[2, 3, 5, 8], 19);
    let up = kernels::resample::upsample2x(&x8t).unwrap();
    assert_eq!(up.shape(), &[2, 3, 10, 16]);
    assert_close("upsample by vec4", &up.to_vec().unwrap(), &kernels::resample::cpu::upsample2x(&x8, 6, 5, 8), 0.0);
    let p = kernels::resample::pad(&xt, [0, 2, 1, 3]).unwrap();
    assert_close("pad", &p.to_vec().unwrap(), &kernels::resample::cpu::pad(&x, 6, 5, 7, [0, 2, 1, 3]), 0.0);

    let (r, rt) = rand(&[100_003], 16);
    for what in [Reduce::Sum, Reduce::Mean, Reduce::MeanAbs, Reduce::L2Norm, Reduce::SumSquares] {
        let got = kernels::reduce::reduce(&rt, what).unwrap().to_scalar().unwrap();
        let want = kernels::reduce::cpu::reduce(&r, what);
        assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{what:?}: {got} vs {want}");
    }
    for dim in 0..4 {
        let got = kernels::reduce::sum_dim(&xt, dim).unwrap();
        assert_close(&format!("sum_dim {dim}"), &got.to_vec().unwrap(), &kernels::reduce::cpu::sum_dim(&x, &[2, 3, 5, 7], dim), 1e-6);
    }

    let (table, tt) = rand(&[11, 6], 17);
    let ids = [3u32, 0, 10, 3, 7];
    let got = kernels::embedding::embedding(&tt, &ids).unwrap();
    assert_close("embedding", &got.to_vec().unwrap(), &kernels::embedding::cpu::embedding(&table, 6, &ids), 0.0);
    assert!(kernels::embedding::embedding(&tt, &[11]).is_err());

    let s = kernels::copy::slice(&xt, 1, 1, 2).unwrap();
    assert_eq!(s.shape(), &[2, 2, 5, 7]);
    assert_close("slice", &s.to_vec().unwrap(), &kernels::copy::cpu::slice(&x, &[2, 3, 5, 7], 1, 1, 2), 0.0);
    let (y, yt) = rand(&[2, 4, 5, 7], 18);
    let cat = kernels::copy::concat(&[&xt, &yt], 1).unwrap();
    assert_eq!(cat.shape(), &[2, 7, 5, 7]);
    let want = kernels::copy::cpu::concat(&[(&x, &[2, 3, 5, 7]), (&y, &[2, 4, 5, 7])], 1);
    assert_close("concat", &cat.to_vec().unwrap(), &want, 0.0);
    assert!(kernels::copy::concat(&[&xt, &yt], 2).is_err());
    let tr = kernels::copy::transpose(&xt).unwrap();
    assert_close("transpose", &tr.to_vec().unwrap(), &kernels::copy::cpu::transpose(&x, 6, 5, 7), 0.0);
    let sw = kernels::copy::swap_dims(&xt, 2, 3, 5, 7).unwrap();
    assert_eq!(sw.shape(), &[2, 5, 3, 7]);
    assert_close("swap_dims", &sw.to_vec().unwrap(), &kernels::copy::cpu::swap_dims(&x, 2, 3, 5, 7), 0.0);
    assert!(kernels::copy::swap_dims(&xt, 2, 3, 5, 8).is_err());
    // Single-element blocks with a % 4 == 0 (a convolution's weights): four per invocation.
    let (w, wt) = rand(&[7, 12, 9], 44);
    let sw = kernels::copy::swap_dims(&wt, 7, 12, 9, 1).unwrap();
    assert_eq!(sw.shape(), &[7, 9, 12, 1]);
    assert_close("swap_dims, blocks of 1", &sw.to_vec().unwrap(), &kernels::copy::cpu::swap_dims(&w, 7, 12, 9, 1), 0.0);

    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let ht = Tensor::from_f16(&gpu(), &h, &[2, 3, 5, 7]).unwrap();
    let wide = kernels::copy::to_f32(&ht).unwrap();
    assert_eq!(wide.dtype(), DType::F32);
    let want: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    assert_close("f16 widen", &wide.to_vec().unwrap(), &want, 0.0);
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
    let y = kernels::elementwise::unary(&xt, Unary::Affine(2.0, 1.0)).unwrap();
    let got = y.to_vec().unwrap();
    for i in [0, max - 1, max, max + 1, n - 1] {
        assert_eq!(got[i], 2.0 * x[i] + 1.0, "element {i}");
    }
    // Kernels that cannot split refuse with a clear error.
    let e = kernels::softmax::softmax(&xt.reshape(&[n, 1]).unwrap(), 1.0).unwrap_err();
    assert!(format!("{e}").contains("storage binding"), "{e}");
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
    let (got, zq) = kernels::quantize::nearest(&Tensor::from_f32(&g, &z, &zs).unwrap(), &Tensor::from_f32(&g, &cb, &cbs).unwrap()).unwrap();
    assert_eq!(got.to_u32_vec().unwrap(), want, "indices differ from the PyTorch reference");
    let (wzq, _) = f32s(reference.tensor("z_q").unwrap());
    assert_close("z_q vs fixture", &zq.to_vec().unwrap(), &wzq, 1e-6);
}

#[test]
fn conv2d_backward_pieces_that_split_images_match_cpu() {
    // A small im2col budget makes the forward run in pieces of pixels and the
    // backward's pixel pieces straddle image boundaries (the batch's pixels
    // run end to end through one product).
    // Any budget gives the same result, so other tests are unaffected.
    let _budget = common::env_lock();
    std::env::set_var("TAMING_IM2COL_BUDGET", "4096");
    let (b, cin, cout, h, w) = (3, 5, 6, 7, 9);
    for (kk, spec) in [(3, ConvSpec::same(1, 1)), (3, ConvSpec::downsample()), (4, ConvSpec::same(2, 1))] {
        let (x, xt) = rand(&[b, cin, h, w], 71);
        let (wt, wtt) = rand(&[cout, cin, kk, kk], 72);
        let (ho, wo) = spec.out_size(h, w, kk, kk).unwrap();
        let (g, gt) = rand(&[b, cout, ho, wo], 73);
        let (bias, bt) = rand(&[cout], 74);
        let (want, _, _) = kernels::conv2d::cpu::conv2d(&x, b, cin, h, w, &wt, cout, kk, kk, Some(&bias), spec);
        for path in CONV_PATHS {
            let y = kernels::conv2d::conv2d_with(&xt, &wtt, Some(&bt), spec, path).unwrap();
            assert_close(&format!("conv {spec:?} forward in pieces"), &y.to_vec().unwrap(), &want, 1e-4);
        }
        let (dx, dw, db) = kernels::conv2d::conv2d_backward(&xt, &wtt, &gt, spec).unwrap();
        let (rdx, rdw, rdb) = kernels::conv2d::cpu::conv2d_backward(&x, b, cin, h, w, &wt, cout, kk, kk, &g, spec);
        assert_close(&format!("conv {spec:?} dx"), &dx.to_vec().unwrap(), &rdx, 1e-4);
        assert_close(&format!("conv {spec:?} dw"), &dw.to_vec().unwrap(), &rdw, 1e-4);
        assert_close(&format!("conv {spec:?} db"), &db.to_vec().unwrap(), &rdb, 1e-4);
    }
    std::env::remove_var("TAMING_IM2COL_BUDGET");
}

/// Row products (token-by-token decoding): x [M, K] times a packed Linear
/// weight [N, K], with bias, GELU and accumulation into rows of a larger
/// output at an offset and stride; f32 and f16 weights, packed in blocks of
/// columns (N = 300 spans several) or whole for the tiled matmul; M from 1 to
/// 9 covers the one-row, four-row and register-tiled paths; N not a multiple
/// of the 16 columns an invocation owns.
#[test]
fn row_products_match_cpu() {
    // K % 32 == 0 takes the subgroup entries where the device has them (lavapipe).
    use kernels::matmul::{gemv_into, pack_row_weight, Epilogue};
    let gpu = gpu();
    for (i, &(m, n, k)) in [(1usize, 5usize, 4usize), (1, 37, 12), (3, 300, 260), (5, 17, 32), (9, 37, 68), (1, 300, 96), (2, 37, 64), (6, 129, 32)].iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let (x, xt) = rand(&[m, k], seed);
        let (w, wt) = rand(&[n, k], seed + 1);
        let (bias, bt) = rand(&[n], seed + 2);
        let (c0, _) = rand(&[m * (n + 3) + 2], seed + 3);
        for (half, tiled) in [(false, false), (true, false), (false, true)] {
            let packed = if tiled { kernels::matmul::pack_row_weight_tiled(&wt, true) } else { pack_row_weight(&wt, true, half) }.unwrap();
            // The reference multiplies by the weights the GPU holds.
            let wq: Vec<f32> = if half { w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() } else { w.clone() };
            for (gelu, accumulate, with_bias) in [(false, false, false), (true, false, true), (false, true, true)] {
                let out = Tensor::from_f32(&gpu, &c0, &[c0.len()]).unwrap();
                let ep = Epilogue { gelu, accumulate };
                gemv_into(&xt, &packed, with_bias.then_some(&bt), ep, &out, 2, n + 3).unwrap();
                let mut want = kernels::matmul::cpu::matmul(&x, &wq, 1, m, n, k, false, true, true, true,
                    with_bias.then_some(&bias[..]));
                if gelu {
                    want = kernels::elementwise::cpu::unary(&want, Unary::Gelu);
                }
                let mut expect = c0.clone();
                for r in 0..m {
                    for j in 0..n {
                        let at = 2 + r * (n + 3) + j;
                        expect[at] = if accumulate { c0[at] + want[r * n + j] } else { want[r * n + j] };
                    }
                }
                assert_close(&format!("row product m{m} n{n} k{k} half {half} tiled {tiled} gelu {gelu} acc {accumulate}"),
                    &out.to_vec().unwrap(), &expect, 1e-5);
            }
        }
    }
    // Bad input: K not a multiple of 4, an output too small, the input as output.
    let (_, wt) = rand(&[8, 6], 1);
    let (_, xt) = rand(&[1, 6], 2);
    let packed = pack_row_weight(&wt, true, false).unwrap();
    let out = Tensor::zeros(&gpu, &[8]).unwrap();
    assert!(gemv_into(&xt, &packed, None, Epilogue::default(), &out, 0, 8).is_err());
    let (_, wt) = rand(&[8, 4], 3);
    let (_, xt) = rand(&[2, 4], 4);
    let packed = pack_row_weight(&wt, true, false).unwrap();
    assert!(gemv_into(&xt, &packed, None, Epilogue::default(), &out, 0, 8).is_err());
    assert!(gemv_into(&xt, &packed, None, Epilogue::default(), &xt, 0, 8).is_err());
}

#[test]
fn layer_norm_rows_matches_cpu() {
    for (rows, c) in [(1usize, 5usize), (3, 512), (11, 33)] {
        let (x, xt) = rand(&[rows, c], 40 + c as u64);
        let (g, gt) = rand(&[c], 41);
        let (b, bt) = rand(&[c], 42);
        let got = kernels::norm::layer_norm_rows(&xt, &gt, &bt, 1e-5).unwrap();
        let want = kernels::norm::cpu::norm(&x, &[rows, c], NormKind::Layer, &g, &b, 1e-5, false);
        assert_close(&format!("layer norm rows {rows}x{c}"), &got.to_vec().unwrap(), &want, 1e-5);
    }
    let (_, xt) = rand(&[2, 6], 43);
    let (_, gt) = rand(&[5], 44);
    assert!(kernels::norm::layer_norm_rows(&xt, &gt, &gt, 1e-5).is_err());
}

/// In inference a group norm + swish feeding a convolution is applied while
/// the convolution packs its input: the same values as normalising first.
#[test]
fn conv2d_after_norm_swish_matches_norm_then_conv() {
    use kernels::conv2d::{conv2d_after_norm_swish, conv2d_after_norm_swish_with, fuses_norm_swish, NormSwish};
    let _budget = common::env_lock();
    // (batch, cin, cout, h, w, groups): two images, ragged heights, 1 and several channels per group;
    // 32x32 is large enough for Winograd where the device takes it.
    for (i, &(b, cin, cout, h, w, groups)) in [(2usize, 8usize, 5usize, 7usize, 16usize, 2usize), (1, 32, 9, 5, 8, 32), (2, 64, 3, 3, 24, 32),
                                               (1, 8, 6, 32, 32, 4)]
        .iter().enumerate() {
        let s = 700 + 10 * i as u64;
        let (x, xt) = rand(&[b, cin, h, w], s);
        let (g, gt) = rand(&[cin], s + 1);
        let (be, bet) = rand(&[cin], s + 2);
        let (wt, wtt) = rand(&[cout, cin, 3, 3], s + 3);
        let (bias, biast) = rand(&[cout], s + 4);
        let kind = NormKind::Group { groups };
        let normed = kernels::norm::cpu::norm(&x, &[b, cin, h, w], kind, &g, &be, 1e-6, true);
        let (want, _, _) = kernels::conv2d::cpu::conv2d(&normed, b, cin, h, w, &wt, cout, 3, 3, Some(&bias), ConvSpec::same(1, 1));
        let what = format!("norm + swish + conv {b}x{cin}x{h}x{w}, {groups} groups -> {cout}");
        if !fuses_norm_swish(&xt, &wtt, ConvSpec::same(1, 1)) {
            eprintln!("{what}: this device has no implicit-GEMM convolution; nothing to compare");
            continue;
        }
        let stats = kernels::norm::statistics(&xt, kind, 1e-6).unwrap();
        let pre = NormSwish { stats: &stats, gamma: &gt, beta: &bet, groups };
        // Winograd where the device takes it, and implicit GEMM.
        for path in [ConvPath::Best, ConvPath::Winograd, ConvPath::Implicit] {
            let got = conv2d_after_norm_swish_with(&xt, &pre, &wtt, Some(&biast), ConvSpec::same(1, 1), path).unwrap();
            assert_close(&format!("{what} ({path:?})"), &got.to_vec().unwrap(), &want, 1e-4);
        }
        // The same through the tape: fused in inference, two recorded ops when training.
        for record in [false, true] {
            let tape = if record { taming::engine::Tape::new() } else { taming::engine::Tape::inference() };
            let v = |t: &Tensor| tape.leaf(t.clone());
            let y = tape.group_norm_swish_conv2d(&v(&xt), groups, &v(&gt), &v(&bet), 1e-6, &v(&wtt), Some(&v(&biast)),
                ConvSpec::same(1, 1)).unwrap();
            assert_close(&format!("{what} (tape, recording {record})"), &y.value.to_vec().unwrap(), &want, 1e-4);
            // With a residual added (fused into the Winograd output where it applies).
            let (r, rt) = rand(&[b, cout, h, w], s + 5);
            let y = tape.group_norm_swish_conv2d_add(&v(&xt), groups, &v(&gt), &v(&bet), 1e-6, &v(&wtt), Some(&v(&biast)),
                ConvSpec::same(1, 1), &v(&rt)).unwrap();
            let want_r: Vec<f32> = want.iter().zip(&r).map(|(a, b)| a + b).collect();
            assert_close(&format!("{what} + residual (tape, recording {record})"), &y.value.to_vec().unwrap(), &want_r, 1e-4);
        }
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

/// An image's convolution does not depend on the batch it runs in (every
/// path: Winograd where the device takes it at 32x32, implicit GEMM for 8
/// channels, im2col for 5).
#[test]
fn conv2d_is_the_same_in_any_batch() {
    let _budget = common::env_lock();
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
