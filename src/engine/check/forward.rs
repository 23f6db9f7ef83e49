//! Forward kernels against their CPU references, on shapes that are not
//! multiples of the tile or workgroup sizes.

use anyhow::Result;

use super::Checker;
use crate::engine::kernels::conv2d::{self, ConvPath, ConvSpec, NormSwish};
use crate::engine::kernels::elementwise::{self, Binary, Unary};
use crate::engine::kernels::matmul::{self, gemm, gemv_into, pack_row_weight, Bias, Epilogue, Gemm, Operand, Out};
use crate::engine::kernels::norm::{self, NormKind};
use crate::engine::kernels::reduce::{self, Reduce};
use crate::engine::kernels::{
    attention, copy, cross_entropy, embedding, quantize, random_vec, resample, softmax, winograd,
};
use crate::engine::tensor::Tensor;

/// The first `quick` cases at the quick level, all of them otherwise.
fn pick<'a, T>(c: &Checker, cases: &'a [T], quick: usize) -> &'a [T] {
    if c.quick {
        &cases[..quick.min(cases.len())]
    } else {
        cases
    }
}

/// Products: ragged sizes, transposes, batches, bias, alpha/beta, row bias,
/// copy-packed operands, and products into a column block of a wider matrix.
/// Products that take causal attention's zeros for granted (`matmul::Causal`): A's values past
/// (or before) each row's diagonal zero, or C's values past it unwanted, against the CPU product,
/// over sizes that are not multiples of the tiles, diagonals off the corner (a query offset, a
/// negative one) and a batch; the small-binding variant splits them into pieces, whose bounds
/// move with each piece's first row, column and K index.
fn causal_products(c: &mut Checker) -> Result<()> {
    use matmul::{Assume, Causal};
    let cases = [(2usize, 70usize, 75usize, 45usize, 0i64), (1, 37, 66, 130, 5), (2, 64, 33, 70, -3)];
    for &(batch, m, n, k, d) in pick(c, &cases, 2) {
        for mode in 0..3 {
            // A zero where the relation says so (modes 1, 2), C's unwanted values (mode 0).
            let zero = |r: usize, kk: usize| match mode {
                1 => kk as i64 > r as i64 + d,
                2 => (kk as i64) < r as i64 - d,
                _ => false,
            };
            let (mut a, _) = c.rand(&[batch, m, k], 70 + mode)?;
            for (i, v) in a.iter_mut().enumerate() {
                if zero(i / k % m, i % k) {
                    *v = 0.0;
                }
            }
            let at = c.tensor(&a, &[batch, m, k])?;
            let (b, bt) = c.rand(&[batch, k, n], 80 + mode)?;
            let causal = [Causal::Columns(d), Causal::KUpTo(d), Causal::KFrom(d)][mode as usize];
            let out = Tensor::empty(&c.gpu, &[batch, m, n], crate::engine::tensor::DType::F32)?;
            let got = matmul::gemm_with(
                Gemm { m, n, k, batch, alpha: 1.0, beta: 0.0 },
                Operand { t: &at, off: 0, rs: k, cs: 1, bs: m * k },
                Operand { t: &bt, off: 0, rs: n, cs: 1, bs: k * n },
                Out { t: &out, off: 0, ld: n, bs: m * n },
                Bias::None,
                Assume { causal, ..Default::default() },
            )
            .and_then(|_| out.to_vec());
            let product = matmul::cpu::matmul(&a, &b, batch, m, n, k, false, false, false, false, None);
            // Unwanted values: the product's, or zero where the kernel skipped their tile.
            let want: Vec<f32> = (0..batch * m * n)
                .map(|i| {
                    let unwanted = mode == 0 && (i % n) as i64 > (i / n % m) as i64 + d;
                    match got.as_ref().map(|g| g[i]) {
                        Ok(v) if unwanted && v == 0.0 => 0.0,
                        _ => product[i],
                    }
                })
                .collect();
            c.close("matmul, causal zeros", format!("b{batch} {m}x{n}x{k} {causal:?}"), got, &want, 1e-5);
        }
    }
    Ok(())
}

pub fn matmul(c: &mut Checker) -> Result<()> {
    let cases = [
        (1, 1, 1, 1),
        (2, 33, 70, 21),
        (1, 17, 33, 7),
        (3, 5, 70, 130),
        (2, 65, 19, 37),
        (1, 40, 24, 1),
        (2, 64, 128, 64),
    ];
    for (ci, &(batch, m, n, k)) in pick(c, &cases, 2).iter().enumerate() {
        let transposes = [(false, false), (true, false), (false, true), (true, true)];
        for &(ta, tb) in pick(c, &transposes, 2) {
            let seed = ci as u64 * 10;
            let ash = if ta { [batch, k, m] } else { [batch, m, k] };
            let bsh = if tb { [n, k] } else { [k, n] };
            let (a, at) = c.rand(&ash, seed + 1)?;
            let (b, bt) = c.rand(&bsh, seed + 2)?;
            let (bias, biast) = c.rand(&[n], seed + 3)?;
            let got = matmul::matmul(&at, &bt, ta, tb, Some(&biast)).and_then(|t| t.to_vec());
            let want = matmul::cpu::matmul(&a, &b, batch, m, n, k, ta, tb, false, true, Some(&bias));
            c.close("matmul", format!("b{batch} {m}x{n}x{k} ta={ta} tb={tb}"), got, &want, 1e-5);
        }
    }
    // Both operands batched; then layers packed by buffer-to-texture copies.
    for (m, n, k, seed) in [(9, 6, 13, 7), (32, 64, 64, 9)] {
        let (a, at) = c.rand(&[2, m, k], seed)?;
        let (b, bt) = c.rand(&[2, k, n], seed + 1)?;
        let got = matmul::matmul(&at, &bt, false, false, None).and_then(|t| t.to_vec());
        let want = matmul::cpu::matmul(&a, &b, 2, m, n, k, false, false, false, false, None);
        c.close("matmul batched", format!("2x{m}x{n}x{k}"), got, &want, 1e-5);
    }
    // Strided operands as attention takes them: one head's [T, d] block of a [T, C] row
    // (heads as the batch, hs apart) times another head block transposed. Where C, hs and the
    // offset are multiples of 4 the packs read whole vec4s (`pack_rows4`; `pack_cols4` for the
    // transposed one), with d = 7 their last texel ragged; else one value at a time (`pack`).
    // Rows of whole 256-byte multiples (C = 128, 192) go through a texture copy of the rows on
    // CPU devices, the heads side by side in it (`pack_rows4_tex`, `pack_cols4_tex`).
    let heads_cases = [
        (37usize, 128usize, 32usize, 32usize, 0usize),
        (37, 32, 8, 8, 4),
        (21, 192, 30, 32, 64),
        (9, 32, 7, 8, 0),
        (9, 30, 6, 6, 0),
        (12, 16, 4, 4, 3),
    ];
    for &(t_len, c_len, d, hs, off) in pick(c, &heads_cases, 2) {
        let heads = c_len / hs;
        let total = off + t_len * c_len;
        let (x, xt) = c.rand(&[total], 50 + t_len as u64)?;
        let (y, yt) = c.rand(&[total], 60 + t_len as u64)?;
        let out = Tensor::empty(&c.gpu, &[heads, t_len, t_len], crate::engine::tensor::DType::F32)?;
        let got = gemm(
            Gemm { m: t_len, n: t_len, k: d, batch: heads, alpha: 1.0, beta: 0.0 },
            Operand { t: &xt, off, rs: c_len, cs: 1, bs: hs },
            Operand { t: &yt, off, rs: 1, cs: c_len, bs: hs },
            Out { t: &out, off: 0, ld: t_len, bs: t_len * t_len },
            Bias::None,
        )
        .and_then(|_| out.to_vec());
        let want: Vec<f32> = (0..heads * t_len * t_len)
            .map(|i| {
                let (h, r, col) = (i / (t_len * t_len), i / t_len % t_len, i % t_len);
                let at = |v: &[f32], row: usize, j: usize| v[off + row * c_len + h * hs + j] as f64;
                (0..d).map(|j| at(&x, r, j) * at(&y, col, j)).sum::<f64>() as f32
            })
            .collect();
        let shape = format!("{heads} heads of {t_len}x{d} in rows of {c_len} at {off}");
        c.close("matmul strided heads", shape, got, &want, 1e-5);
    }
    // A's texture rows past M are left as they were when A is copied in (`matmul::Stale`): a
    // product on a NaN operand of the same texture size first, so the pooled texture holds NaN
    // there; C must not see it.
    {
        let nan = c.tensor(&vec![f32::NAN; 64 * 64], &[64, 64])?;
        let (b, bt) = c.rand(&[64, 64], 40)?;
        drop(matmul::matmul(&nan, &bt, false, false, None)?);
        let (a, at) = c.rand(&[40, 64], 41)?;
        let got = matmul::matmul(&at, &bt, false, false, None).and_then(|t| t.to_vec());
        let want = matmul::cpu::matmul(&a, &b, 1, 40, 64, 64, false, false, false, false, None);
        c.close("matmul, stale padding rows", "40x64x64 after a NaN operand", got, &want, 1e-5);
    }
    // C's rows padded to whole texels that C owns (attention's score rows, `Padding::Own`): the
    // product may write zeros past N instead of reading C back, never B's stale padding (a
    // product on a NaN B of the same texture size runs first) nor anything else.
    for &(m, n, k) in pick(c, &[(37usize, 7usize, 64usize), (9, 30, 13)], 1) {
        let ld = n.next_multiple_of(4);
        let nan = c.tensor(&vec![f32::NAN; k * ld], &[k, ld])?;
        let (a, at) = c.rand(&[m, k], 42)?;
        drop(matmul::matmul(&at, &nan, false, false, None)?);
        let (b, bt) = c.rand(&[k, n], 43)?;
        let old = 5.0f32;
        let out = c.tensor(&vec![old; m * ld], &[m, ld])?;
        let got = matmul::gemm_with(
            Gemm { m, n, k, batch: 1, alpha: 1.0, beta: 0.0 },
            Operand { t: &at, off: 0, rs: k, cs: 1, bs: 0 },
            Operand { t: &bt, off: 0, rs: n, cs: 1, bs: 0 },
            Out { t: &out, off: 0, ld, bs: 0 },
            Bias::None,
            matmul::Assume { padding: matmul::Padding::Own, ..Default::default() },
        )
        .and_then(|_| out.to_vec());
        let product = matmul::cpu::matmul(&a, &b, 1, m, n, k, false, false, false, false, None);
        // Past N: zeros, or the old values where the kernel keeps them (scalar-store tiles).
        let want: Vec<f32> = (0..m * ld)
            .map(|i| match (i / ld, i % ld) {
                (r, j) if j < n => product[r * n + j],
                _ => match got.as_ref().map(|g| g[i]) {
                    Ok(v) if v == old => old,
                    _ => 0.0,
                },
            })
            .collect();
        c.close("matmul, owned row padding", format!("{m}x{n}x{k} in rows of {ld}"), got, &want, 1e-5);
    }
    causal_products(c)?;
    // C = beta C + alpha A B + row bias.
    let (m, n, k) = (37, 45, 12);
    let (a, at) = c.rand(&[m, k], 1)?;
    let (b, bt) = c.rand(&[k, n], 2)?;
    let (c0, ct) = c.rand(&[m, n], 3)?;
    let (bias, biast) = c.rand(&[m], 4)?;
    let gm = Gemm { m, n, k, batch: 1, alpha: 0.5, beta: 1.0 };
    let got = gemm(
        gm,
        Operand::rows(&at, 0, k, 0, false),
        Operand::rows(&bt, 0, n, 0, false),
        Out { t: &ct, off: 0, ld: n, bs: 0 },
        Bias::Row(&biast, 0),
    )
    .and_then(|_| ct.to_vec());
    let ab = matmul::cpu::matmul(&a, &b, 1, m, n, k, false, false, false, false, None);
    let want: Vec<f32> = (0..m * n).map(|i| c0[i] + 0.5 * ab[i] + bias[i / n]).collect();
    c.close("matmul alpha/beta/row bias", format!("{m}x{n}x{k}"), got, &want, 1e-5);
    // Into a column block of a wider matrix (the four-column stores): a
    // ragged N leaves the columns past it as they were.
    let blocks = [(9usize, 7usize, 13usize, 12usize), (33, 5, 8, 8), (40, 70, 20, 76)];
    for &(m, n, k, ld) in pick(c, &blocks, 1) {
        let batch = 2;
        let (a, at) = c.rand(&[batch * m * k], 31)?;
        let (b, bt) = c.rand(&[batch * k * n], 32)?;
        let (c0, ct) = c.rand(&[batch * m * ld], 33)?;
        let (bias, biast) = c.rand(&[n], 34)?;
        let g = Gemm { m, n, k, batch, alpha: 1.0, beta: 0.5 };
        let got = gemm(
            g,
            Operand::rows(&at, 0, k, m * k, false),
            Operand::rows(&bt, 0, n, k * n, false),
            Out { t: &ct, off: 0, ld, bs: m * ld },
            Bias::Col(&biast),
        )
        .and_then(|_| ct.to_vec());
        let ab = matmul::cpu::matmul(&a, &b, batch, m, n, k, false, false, false, false, None);
        let mut want = c0.clone();
        for bi in 0..batch {
            for r in 0..m {
                for col in 0..n {
                    let i = bi * m * ld + r * ld + col;
                    want[i] = ab[(bi * m + r) * n + col] + bias[col] + 0.5 * c0[i];
                }
            }
        }
        c.close("matmul into column block", format!("2x{m}x{n}x{k} of {ld}"), got, &want, 1e-5);
    }
    Ok(())
}

const CONV_PATHS: [ConvPath; 7] = [
    ConvPath::Best,
    ConvPath::Winograd,
    ConvPath::Implicit,
    ConvPath::Workgroup,
    ConvPath::ChannelPacked,
    ConvPath::Im2colTexture,
    ConvPath::Im2colBuffer,
];

/// Every convolution the VQGAN and the PatchGAN use, by every path
/// (Winograd, implicit GEMM, im2col from a texture and from the buffer,
/// each where it applies on this device).
pub fn conv2d(c: &mut Checker) -> Result<()> {
    let cases = [
        (2, 3, 5, 9, 13, 3, ConvSpec::same(1, 1)),
        (1, 6, 4, 11, 7, 3, ConvSpec::downsample()),
        (2, 8, 37, 9, 16, 3, ConvSpec::same(1, 1)),
        (2, 5, 7, 6, 5, 1, ConvSpec::same(1, 0)),
        (2, 3, 8, 10, 9, 4, ConvSpec::same(2, 1)),
        (1, 4, 1, 7, 6, 4, ConvSpec::same(1, 1)),
        (3, 33, 9, 4, 6, 3, ConvSpec::same(1, 1)),
        // Channels % 4 == 0 and output widths % 8 == 0: the implicit GEMM
        // where the device has it (two row tiles, ragged pixel tiles).
        (1, 4, 3, 5, 24, 3, ConvSpec::same(1, 1)),
        (2, 12, 5, 7, 9, 4, ConvSpec::same(1, 1)),
        (1, 16, 6, 3, 6, 1, ConvSpec::same(1, 1)),
        // Several 8-texel pieces per row of the shifted planes; left pad 0.
        (1, 4, 5, 3, 40, 3, ConvSpec::same(1, 1)),
        (2, 8, 5, 3, 8, 1, ConvSpec::same(1, 0)),
        // 32x32: Winograd where the device takes it.
        (1, 8, 5, 32, 32, 3, ConvSpec::same(1, 1)),
        // Strided convolutions the channel-packed path takes (Cin % 4 == 0, Ho·Wo % 4 == 0).
        (2, 8, 6, 12, 16, 3, ConvSpec::downsample()),
        (2, 4, 3, 8, 16, 4, ConvSpec::same(2, 1)),
    ];
    for (i, &(b, cin, cout, h, w, kk, spec)) in pick(c, &cases, 3).iter().enumerate() {
        let s = i as u64 * 10;
        let (x, xt) = c.rand(&[b, cin, h, w], s + 1)?;
        let (wt, wtt) = c.rand(&[cout, cin, kk, kk], s + 2)?;
        let (bias, biast) = c.rand(&[cout], s + 3)?;
        let (want, ho, wo) = conv2d::cpu::conv2d(&x, b, cin, h, w, &wt, cout, kk, kk, Some(&bias), spec);
        let paths = if c.quick { &CONV_PATHS[..1] } else { &CONV_PATHS[..] };
        for &path in paths {
            // im2col from the buffer reads whole images: one larger than a binding is refused by
            // that path (with an error saying so); the flat-texture paths take such images.
            if path == ConvPath::Im2colBuffer && (cin * h * w * 4) as u64 + 256 > xt.gpu.max_binding() {
                continue;
            }
            let got = conv2d::conv2d_with(&xt, &wtt, Some(&biast), spec, path).and_then(|y| {
                y.expect_shape("convolution output", &[b, cout, ho, wo])?;
                y.to_vec()
            });
            // Winograd's transforms round differently from a direct sum.
            let tol = if matches!(path, ConvPath::Best | ConvPath::Winograd) { 1e-4 } else { 1e-5 };
            c.close(
                &format!("conv2d {kk}x{kk} {path:?}"),
                format!("{spec:?} {b}x{cin}x{h}x{w}->{cout}"),
                got,
                &want,
                tol,
            );
            // + a residual, added as the output is written where the path allows (training's
            // ResnetBlocks), else by an add.
            if matches!(path, ConvPath::Best | ConvPath::ChannelPacked) {
                let (r, rt) = c.rand(&[b, cout, ho, wo], s + 4)?;
                let want_r: Vec<f32> = want.iter().zip(&r).map(|(y, r)| r + y).collect();
                let got =
                    conv2d::conv2d_add_with(&xt, &wtt, Some(&biast), spec, path, &rt, None).and_then(|y| y.to_vec());
                c.close(
                    &format!("conv2d {kk}x{kk} {path:?} + residual"),
                    format!("{spec:?} {b}x{cin}x{h}x{w}->{cout}"),
                    got,
                    &want_r,
                    tol,
                );
            }
        }
    }
    Ok(())
}

/// Winograd F(4x4, 3x3): the CPU reference against the direct convolution,
/// the kernels against both, in pieces of tiles that split images, with a
/// residual added as the output is written.
pub fn winograd(c: &mut Checker) -> Result<()> {
    let same = ConvSpec::same(1, 1);
    let cases = [
        (2usize, 3usize, 5usize, 9usize, 13usize),
        (1, 8, 37, 5, 16),
        (3, 5, 7, 4, 4),
        (1, 33, 9, 7, 6),
        (2, 16, 12, 12, 11),
        (1, 4, 3, 1, 2),
        (2, 5, 7, 9, 16),
        // Planes of whole texture rows: the input's runs read as a band of rgba32float layers
        // (`input4` over a `flat_band_layers` copy).
        (1, 4, 6, 16, 64),
    ];
    for (i, &(b, cin, cout, h, w)) in pick(c, &cases, 1).iter().enumerate() {
        let s = 900 + 10 * i as u64;
        let (x, xt) = c.rand(&[b, cin, h, w], s)?;
        let (wt, wtt) = c.rand(&[cout, cin, 3, 3], s + 1)?;
        let (bias, biast) = c.rand(&[cout], s + 2)?;
        let (want, _, _) = conv2d::cpu::conv2d(&x, b, cin, h, w, &wt, cout, 3, 3, Some(&bias), same);
        let shape = format!("{b}x{cin}x{h}x{w}->{cout}");
        let reference = winograd::cpu::conv3x3(&x, b, cin, h, w, &wt, cout, Some(&bias));
        c.close("winograd CPU reference", shape.clone(), Ok(reference.clone()), &want, 1e-5);
        if !winograd::applies(&xt, &wtt, same) {
            continue; // not taken on this device's tuning (another variant checks it)
        }
        let tiles = b * h.div_ceil(4) * w.div_ceil(4);
        for piece in [tiles, 16, 5, 1] {
            let out = Tensor::zeros(&c.gpu, &[b, cout, h, w])?;
            let got = winograd::conv3x3_in_pieces(&xt, None, &wtt, Some(&biast), None, &out, piece)
                .and_then(|_| out.to_vec());
            c.close("winograd", format!("{shape}, pieces of {piece} tiles"), got, &reference, 1e-5);
        }
        let (r, rt) = c.rand(&[b, cout, h, w], s + 3)?;
        let out = Tensor::zeros(&c.gpu, &[b, cout, h, w])?;
        let got = winograd::conv3x3_in_pieces(&xt, None, &wtt, None, Some(&rt), &out, 5).and_then(|_| out.to_vec());
        let plain = winograd::cpu::conv3x3(&x, b, cin, h, w, &wt, cout, None);
        let with_residual: Vec<f32> = plain.iter().zip(&r).map(|(a, b)| a + b).collect();
        c.close("winograd + residual", shape.clone(), got, &with_residual, 1e-5);
        // The residual as the output itself (added in place, flags & 8): through the residual's
        // band where the pieces' reads go through textures, else from the output's own buffer.
        let got = Tensor::from_f32(&c.gpu, &r, &[b, cout, h, w]).and_then(|inout| {
            winograd::conv3x3_in_pieces(&xt, None, &wtt, None, Some(&inout), &inout, 5)?;
            inout.to_vec()
        });
        c.close("winograd + residual in place", shape.clone(), got, &with_residual, 1e-5);
        // The input, output and residual as runs of channels (`models::channel_runs`): the input
        // in two unequal runs, the output and residual in two equal ones where cout is even.
        let (ins, outs) = ([cin / 2, cin - cin / 2], if cout % 2 == 0 { vec![cout / 2; 2] } else { vec![cout] });
        let ins: Vec<usize> = ins.into_iter().filter(|&n| n > 0).collect();
        let to_runs = |v: &[f32], c: usize, runs: &[usize]| -> Result<Vec<Tensor>> {
            let plane = h * w;
            let mut c0 = 0;
            let mut out = Vec::new();
            for &n in runs {
                let part: Vec<f32> =
                    (0..b).flat_map(|i| v[(i * c + c0) * plane..(i * c + c0 + n) * plane].to_vec()).collect();
                out.push(Tensor::from_f32(&xt.gpu, &part, &[b, n, h, w])?);
                c0 += n;
            }
            Ok(out)
        };
        let got = (|| {
            let (xs, rs) = (to_runs(&x, cin, &ins)?, to_runs(&r, cout, &outs)?);
            let ys = outs.iter().map(|&n| Tensor::zeros(&xt.gpu, &[b, n, h, w])).collect::<Result<Vec<_>>>()?;
            let (xs, rs, ys): (Vec<&Tensor>, Vec<&Tensor>, Vec<&Tensor>) =
                (xs.iter().collect(), rs.iter().collect(), ys.iter().collect());
            winograd::conv3x3_runs(&xs, None, &wtt, Some(&biast), Some(&rs), &ys)?;
            let parts = ys.iter().map(|y| y.to_vec()).collect::<Result<Vec<_>>>()?;
            let plane = h * w;
            Ok((0..b)
                .flat_map(|i| {
                    parts.iter().zip(&outs).flat_map(move |(p, &n)| p[i * n * plane..(i + 1) * n * plane].to_vec())
                })
                .collect())
        })();
        let want_runs: Vec<f32> = reference.iter().zip(&r).map(|(a, b)| a + b).collect();
        c.close(
            "winograd over runs of channels + residual",
            format!("{shape}, runs {ins:?} -> {outs:?}"),
            got,
            &want_runs,
            1e-5,
        );
    }
    Ok(())
}

/// Group norm + swish applied while the convolution reads its input
/// (inference): the same values as normalising first, by every path that
/// applies, with and without the residual.
pub fn norm_conv2d(c: &mut Checker) -> Result<()> {
    let cases = [
        (2usize, 8usize, 5usize, 7usize, 16usize, 2usize),
        (1, 32, 9, 5, 8, 32),
        (2, 64, 3, 3, 24, 32),
        (1, 8, 6, 32, 32, 4),
    ];
    for (i, &(b, cin, cout, h, w, groups)) in pick(c, &cases, 1).iter().enumerate() {
        let s = 700 + 10 * i as u64;
        let (x, xt) = c.rand(&[b, cin, h, w], s)?;
        let (g, gt) = c.rand(&[cin], s + 1)?;
        let (be, bet) = c.rand(&[cin], s + 2)?;
        let (wt, wtt) = c.rand(&[cout, cin, 3, 3], s + 3)?;
        let (bias, biast) = c.rand(&[cout], s + 4)?;
        let (r, rt) = c.rand(&[b, cout, h, w], s + 5)?;
        let kind = NormKind::Group { groups };
        let normed = norm::cpu::norm(&x, &[b, cin, h, w], kind, &g, &be, 1e-6, true);
        let same = ConvSpec::same(1, 1);
        let (want, _, _) = conv2d::cpu::conv2d(&normed, b, cin, h, w, &wt, cout, 3, 3, Some(&bias), same);
        let want_r: Vec<f32> = want.iter().zip(&r).map(|(a, b)| a + b).collect();
        let shape = format!("{b}x{cin}x{h}x{w}/{groups}->{cout}");
        if conv2d::fuses_norm_swish(&xt, &wtt, same) {
            let stats = norm::statistics(&xt, kind, 1e-6)?;
            let pre = NormSwish { stats: &stats, gamma: &gt, beta: &bet, groups };
            let winograd = winograd::applies(&xt, &wtt, same);
            let implicit = conv2d::takes_implicit(&xt, &wtt, same);
            for (path, applies) in
                [(ConvPath::Best, true), (ConvPath::Winograd, winograd), (ConvPath::Implicit, implicit)]
            {
                if !applies {
                    continue;
                }
                let got = conv2d::conv2d_after_norm_swish_with(&xt, &pre, &wtt, Some(&biast), same, path)
                    .and_then(|y| y.to_vec());
                c.close(&format!("group norm+swish+conv {path:?}"), shape.clone(), got, &want, 1e-4);
            }
            // A ResnetBlock's x + h: added as the Winograd output is written, else after.
            let got =
                conv2d::conv2d_after_norm_swish_add(&xt, &pre, &wtt, Some(&biast), same, &rt).and_then(|y| y.to_vec());
            c.close("group norm+swish+conv+residual", shape.clone(), got, &want_r, 1e-4);
        }
    }
    Ok(())
}

/// Group, layer and batch norms (optionally + swish), scalar and vec4 entries,
/// statistics in ragged chunks, data offset so a naive one-pass variance fails;
/// and the one-dispatch layer norm of short rows.
pub fn norms(c: &mut Checker) -> Result<()> {
    let cases: [(&[usize], NormKind, bool); 9] = [
        (&[2, 64, 5, 7], NormKind::Group { groups: 32 }, true),
        (&[7, 37], NormKind::Layer, false),
        (&[2, 64, 36, 36], NormKind::Group { groups: 32 }, true),
        (&[1, 96, 3, 3], NormKind::Group { groups: 32 }, false),
        (&[3, 5, 4, 6], NormKind::Batch, false),
        (&[5, 64], NormKind::Layer, true),
        (&[5, 3, 16, 20], NormKind::Batch, false),
        (&[1, 96, 4, 5], NormKind::Group { groups: 32 }, false),
        // The demo VQGAN's 8x8 norm + swish: statistics and output in one dispatch on lavapipe.
        (&[2, 64, 8, 8], NormKind::Group { groups: 32 }, true),
    ];
    for (i, &(shape, kind, swish)) in pick(c, &cases, 3).iter().enumerate() {
        let x: Vec<f32> =
            random_vec(shape.iter().product(), i as u64 + 100, 1.0).iter().map(|v| v * 3.0 + 10.0).collect();
        let xt = c.tensor(&x, shape)?;
        let ch = if kind == NormKind::Layer { *shape.last().unwrap() } else { shape[1] };
        let (g, gt) = c.rand(&[ch], i as u64 + 200)?;
        let (bb, bt) = c.rand(&[ch], i as u64 + 300)?;
        let eps = if matches!(kind, NormKind::Group { .. }) { 1e-6 } else { 1e-5 };
        let want = norm::cpu::norm(&x, shape, kind, &g, &bb, eps, swish);
        let got = norm::norm(&xt, kind, &gt, &bt, eps, swish).and_then(|o| o.y.to_vec());
        c.close(
            &format!("norm {kind:?}{}", if swish { " + swish" } else { "" }),
            format!("{shape:?}"),
            got,
            &want,
            1e-4,
        );
    }
    // (600 x 8: larger than the `max_binding` variant's bindings, runs of rows.)
    for (rows, ch) in [(3usize, 512usize), (1, 5), (11, 33), (600, 8)] {
        let (x, xt) = c.rand(&[rows, ch], 40 + ch as u64)?;
        let (g, gt) = c.rand(&[ch], 41)?;
        let (b, bt) = c.rand(&[ch], 42)?;
        let got = norm::layer_norm_rows(&xt, &gt, &bt, 1e-5).and_then(|t| t.to_vec());
        let want = norm::cpu::norm(&x, &[rows, ch], NormKind::Layer, &g, &b, 1e-5, false);
        c.close("layer norm rows", format!("{rows}x{ch}"), got, &want, 1e-5);
    }
    // A batch norm whose affine gradients walk 16 images of 4,096 values a channel (65,552 loop
    // iterations in one invocation, past lavapipe's limit): runs of images within the budget.
    // (Not on the small-binding variant, whose channel-major copy's planes would exceed a binding.)
    let shape = [16usize, 2, 64, 64];
    if !c.quick && ((shape.iter().product::<usize>() * 4) as u64) <= c.gpu.max_binding() {
        let (x, xt) = c.rand(&shape, 50)?;
        let (dy, dyt) = c.rand(&shape, 51)?;
        let (g, gt) = c.rand(&[2], 52)?;
        let (_, bt) = c.rand(&[2], 53)?;
        let (dx, dg, db) = norm::cpu::norm_backward(&x, &shape, NormKind::Batch, &g, 1e-5, &dy);
        let got = norm::norm(&xt, NormKind::Batch, &gt, &bt, 1e-5, false)
            .and_then(|o| norm::norm_backward(&xt, &dyt, &o.stats, &gt, NormKind::Batch, None));
        let what = format!("{shape:?}");
        match got {
            Ok((gdx, gdg, gdb)) => {
                c.close("batch norm backward dx", what.clone(), gdx.to_vec(), &dx, 1e-4);
                // Sums of 65,536 terms each.
                c.close("batch norm backward dgamma", what.clone(), gdg.to_vec(), &dg, 1e-3);
                c.close("batch norm backward dbeta", what, gdb.to_vec(), &db, 1e-3);
            }
            Err(e) => c.close("batch norm backward", what, Err(e), &dg, 1e-3),
        }
    }
    Ok(())
}

pub fn softmax_cross_entropy(c: &mut Checker) -> Result<()> {
    // Rows shorter than, longer than and not a multiple of a workgroup (the subgroup kernels).
    for (i, &(rows, cols)) in [(5, 300), (70, 1), (3, 64)].iter().enumerate() {
        if c.quick && i > 0 {
            break;
        }
        let shape = format!("{rows}x{cols}");
        let (x, xt) = c.rand(&[rows, cols], 7 + i as u64)?;
        let got = softmax::softmax(&xt, 0.7).and_then(|t| t.to_vec());
        c.close("softmax", shape.clone(), got, &softmax::cpu::softmax(&x, cols, 0.7), 1e-5);
        let (g, gt) = c.rand(&[rows, cols], 17 + i as u64)?;
        let want = softmax::cpu::softmax_backward(&x, cols, 0.7, &g);
        let got = softmax::softmax(&xt, 0.7).and_then(|y| softmax::softmax_backward(&y, &gt, 0.7)?.to_vec());
        c.close("softmax backward", shape.clone(), got, &want, 1e-5);
        let got = softmax::l2_normalize_rows(&xt).and_then(|t| t.to_vec());
        c.close("l2 normalised rows", shape.clone(), got, &softmax::cpu::l2_normalize_rows(&x, cols), 1e-6);
        // Causal rows (blocks of 4 queries, the first seeing cols - 4 + 1 columns), and lse.
        let (tq, q_start) = (4.min(rows), cols.saturating_sub(4.min(rows)));
        let mut want = vec![0.0; rows * cols];
        let mut want_lse = vec![0.0; rows];
        for r in 0..rows {
            let last = cols.min(q_start + r % tq + 1);
            let row = &x[r * cols..r * cols + last];
            want[r * cols..r * cols + last].copy_from_slice(&softmax::cpu::softmax(row, last, 0.7));
            let m = row.iter().map(|&v| (0.7 * v) as f64).fold(f64::NEG_INFINITY, f64::max);
            want_lse[r] = (m + row.iter().map(|&v| ((0.7 * v) as f64 - m).exp()).sum::<f64>().ln()) as f32;
        }
        let got = softmax::softmax_masked(&xt, 0.7, true, tq, q_start, cols);
        let (got, got_lse) = match got {
            Ok((y, lse)) => (y.to_vec(), lse.to_vec()),
            Err(e) => (Err(anyhow::anyhow!("{e:#}")), Err(e)),
        };
        c.close("softmax causal", shape.clone(), got, &want, 1e-5);
        c.close("softmax causal lse", shape.clone(), got_lse, &want_lse, 1e-5);
        // The same rows padded with NaN, by 3 columns and to whole vec4s (attention's rows; the
        // kernels' `4` twins): the padding is never read, and set to zero, forward and backward.
        let y = softmax::cpu::softmax(&x, cols, 0.7);
        let want_dx = softmax::cpu::softmax_backward(&x, cols, 0.7, &g);
        for ld in [cols + 3, (cols + 1).next_multiple_of(4)] {
            let pad = |v: &[f32], fill: f32| -> Vec<f32> {
                v.chunks(cols).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(fill, ld - cols))).collect()
            };
            let (xp, gp) = (c.tensor(&pad(&x, f32::NAN), &[rows, ld])?, c.tensor(&pad(&g, f32::NAN), &[rows, ld])?);
            let got = softmax::softmax_masked(&xp, 0.7, true, tq, q_start, cols).and_then(|(y, _)| y.to_vec());
            let padded = format!("{shape} in rows of {ld}");
            c.close("softmax causal, padded rows", padded.clone(), got, &pad(&want, 0.0), 1e-5);
            let got = c
                .tensor(&pad(&y, 0.0), &[rows, ld])
                .and_then(|yp| softmax::softmax_backward_padded(&yp, &gp, 0.7, cols)?.to_vec());
            c.close("softmax backward, padded rows", padded, got, &pad(&want_dx, 0.0), 1e-5);
        }
    }
    let (x, xt) = c.rand(&[13, 37], 5)?;
    let got = softmax::softmax(&xt, 0.7).and_then(|t| t.to_vec());
    c.close("softmax", "13x37", got, &softmax::cpu::softmax(&x, 37, 0.7), 1e-5);
    let mut targets: Vec<u32> = (0..13).map(|i| (i * 5 % 37) as u32).collect();
    targets[3] = cross_entropy::IGNORE;
    let tt = Tensor::from_u32(&c.gpu, &targets, &[13])?;
    let got = cross_entropy::cross_entropy(&xt, &tt).and_then(|o| o.loss.to_vec());
    c.close("cross-entropy", "13x37", got, &cross_entropy::cpu::cross_entropy(&x, 37, &targets), 1e-5);
    // Logits larger than the `max_binding` variant's bindings (19 KB): runs of rows.
    let (x, xt) = c.rand(&[130, 37], 6)?;
    let targets: Vec<u32> =
        (0..130).map(|i| if i % 11 == 3 { cross_entropy::IGNORE } else { (i * 5 % 37) as u32 }).collect();
    let tt = Tensor::from_u32(&c.gpu, &targets, &[130])?;
    let got = cross_entropy::cross_entropy(&xt, &tt).and_then(|o| o.loss.to_vec());
    c.close("cross-entropy", "130x37", got, &cross_entropy::cpu::cross_entropy(&x, 37, &targets), 1e-5);
    // Rows whose passes loop past lavapipe's limit on an invocation's loops (65,535 iterations):
    // right, or refused where the device would end the loops early; never a wrong number.
    // (Rows larger than one binding are refused anyway: not under small bindings.)
    if (40_000 * 4 + c.gpu.binding_alignment()) as u64 <= c.gpu.max_binding() {
        let refused =
            |r: &Result<Vec<f32>>| r.as_ref().is_err_and(|e| format!("{e:#}").contains("ends an invocation's loops"));
        let (x, xt) = c.rand(&[2, 40_000], 7)?;
        let targets = [5u32, 39_999];
        let tt = Tensor::from_u32(&c.gpu, &targets, &[2])?;
        let got = cross_entropy::cross_entropy(&xt, &tt).and_then(|o| o.loss.to_vec());
        match refused(&got) {
            true => c.equal("cross-entropy past the loop limit: refused", "2x40000", Ok(vec![1]), &[1]),
            false => {
                c.close("cross-entropy", "2x40000", got, &cross_entropy::cpu::cross_entropy(&x, 40_000, &targets), 1e-5)
            }
        }
        let (x, xt) = c.rand(&[2, 30_001], 8)?;
        let got = softmax::softmax(&xt, 0.7).and_then(|t| t.to_vec());
        match refused(&got) {
            true => c.equal("softmax past the loop limit: refused", "2x30001", Ok(vec![1]), &[1]),
            false => c.close("softmax", "2x30001", got, &softmax::cpu::softmax(&x, 30_001, 0.7), 1e-5),
        }
    }
    Ok(())
}

/// Multi-head attention (fused kernel and by matmuls), their backward passes
/// against each other, decoding against a KV cache (from the buffer and from
/// its texture copy), and the AttnBlock's spatial attention.
pub fn attention(c: &mut Checker) -> Result<()> {
    let cases = [
        (2, 19, 19, 32, 4, true),
        (1, 7, 7, 24, 2, false),
        (2, 3, 11, 16, 2, true),
        (1, 1, 9, 128, 1, true),
        (1, 70, 75, 16, 2, true),
        // 20 KB a tensor: runs of sequences on the `max_binding` variant's bindings.
        (4, 40, 40, 32, 4, false),
    ];
    for &(b, tq, tk, ch, heads, causal) in pick(c, &cases, 2) {
        let (q, qt) = c.rand(&[b, tq, ch], 1)?;
        let (k, kt) = c.rand(&[b, tk, ch], 2)?;
        let (v, vt) = c.rand(&[b, tk, ch], 3)?;
        let want = attention::cpu::multi_head(&q, &k, &v, b, tq, tk, ch, heads, causal);
        let shape = format!("b{b} tq{tq} tk{tk} c{ch} h{heads} causal={causal}");
        let got = attention::multi_head_fused(&qt, &kt, &vt, heads, causal).and_then(|o| o.out.to_vec());
        c.close("attention fused", shape.clone(), got, &want, 1e-5);
        let got = attention::multi_head_via_matmul(&qt, &kt, &vt, heads, causal).and_then(|o| o.out.to_vec());
        c.close("attention by matmuls", shape.clone(), got, &want, 1e-5);
        // The tiled kernel: its output, and its lse against the fused kernel's (the backward reads it).
        let tiled = attention::multi_head_tiled(&qt, &kt, &vt, heads, causal);
        let fused_lse = attention::multi_head_fused(&qt, &kt, &vt, heads, causal)?.lse.to_vec()?;
        match tiled {
            Ok(t) => {
                c.close("attention tiled", shape.clone(), t.out.to_vec(), &want, 1e-5);
                c.close("attention tiled lse", shape, t.lse.to_vec(), &fused_lse, 1e-5);
            }
            Err(e) => c.close("attention tiled", shape, Err(e), &want, 1e-5),
        }
    }
    // Backward: fused kernels and the matmul path against the CPU reference.
    // (The second: 20 KB a tensor, runs of sequences on the `max_binding` variant's bindings.)
    let shapes = [(2, 6, 9, 16, 2), (4, 40, 40, 32, 4)];
    for &(b, tq, tk, ch, heads) in pick(c, &shapes, 1) {
        let (q, qt) = c.rand(&[b, tq, ch], 21)?;
        let (k, kt) = c.rand(&[b, tk, ch], 22)?;
        let (v, vt) = c.rand(&[b, tk, ch], 23)?;
        let (d, dot) = c.rand(&[b, tq, ch], 24)?;
        for causal in [true, false] {
            let (rq, rk, rv) = attention::cpu::multi_head_backward(&q, &k, &v, &d, b, tq, tk, ch, heads, causal);
            let shape = format!("b{b} tq{tq} tk{tk} c{ch} h{heads} causal={causal}");
            let fwd = attention::multi_head_fused(&qt, &kt, &vt, heads, causal)?;
            let fused = attention::multi_head_backward_fused(&qt, &kt, &vt, &fwd, &dot, heads, causal);
            let by_matmul = attention::multi_head_backward_via_matmul(&qt, &kt, &vt, &dot, heads, causal);
            for (path, grads) in [("fused", fused), ("by matmuls", by_matmul)] {
                match grads {
                    Ok((dq, dk, dv)) => {
                        for (name, t, want) in [("dq", dq, &rq), ("dk", dk, &rk), ("dv", dv, &rv)] {
                            c.close(
                                &format!("attention backward {path} {name}"),
                                shape.clone(),
                                t.to_vec(),
                                want,
                                1e-4,
                            );
                        }
                    }
                    Err(e) => c.close(&format!("attention backward {path}"), shape.clone(), Err(e), &rq, 1e-4),
                }
            }
        }
    }
    long_key_rows(c)?;
    decoding(c)
}

/// Attention and its backward over key rows past the fused kernels' loop budget.
fn long_key_rows(c: &mut Checker) -> Result<()> {
    // Keys past the fused kernels' loop budget on a device that ends an invocation's loops early
    // (lavapipe: a query over ~1,900 keys of 64 values): too few queries for the matmul path's
    // threshold, so `multi_head` and its backward must take it for the loops; the fused kernels
    // must either compute the whole rows or refuse, never return rows cut short.
    // (Not at the quick level, nor on the small-binding variant, whose 16 KiB bindings the
    // softmax cannot split into runs of rows this long.)
    let (b, tq, tk, ch, heads) = (1, 4, 2500, 64, 1);
    if c.quick || ((64 * tk * 4) as u64) > c.gpu.max_binding() {
        return Ok(());
    }
    let (q, qt) = c.rand(&[b, tq, ch], 41)?;
    let (k, kt) = c.rand(&[b, tk, ch], 42)?;
    let (v, vt) = c.rand(&[b, tk, ch], 43)?;
    let (d, dot) = c.rand(&[b, tq, ch], 44)?;
    let shape = format!("b{b} tq{tq} tk{tk} c{ch} h{heads}");
    let want = attention::cpu::multi_head(&q, &k, &v, b, tq, tk, ch, heads, false);
    let got = attention::multi_head(&qt, &kt, &vt, heads, false);
    if let Ok(fused) = attention::multi_head_fused(&qt, &kt, &vt, heads, false) {
        c.close("attention fused, long key rows", shape.clone(), fused.out.to_vec(), &want, 1e-5);
    }
    match got {
        Ok(fwd) => {
            c.close("attention, long key rows", shape.clone(), fwd.out.to_vec(), &want, 1e-5);
            let (rq, rk, rv) = attention::cpu::multi_head_backward(&q, &k, &v, &d, b, tq, tk, ch, heads, false);
            match attention::multi_head_backward(&qt, &kt, &vt, &fwd, &dot, heads, false) {
                Ok((dq, dk, dv)) => {
                    for (name, t, want) in [("dq", dq, &rq), ("dk", dk, &rk), ("dv", dv, &rv)] {
                        let what = format!("attention backward, long key rows, {name}");
                        c.close(&what, shape.clone(), t.to_vec(), want, 1e-4);
                    }
                }
                Err(e) => c.close("attention backward, long key rows", shape.clone(), Err(e), &rq, 1e-4),
            }
        }
        Err(e) => c.close("attention, long key rows", shape.clone(), Err(e), &want, 1e-5),
    }
    Ok(())
}

/// Decoding against a key/value cache (`attention::KvCache`).
fn decoding(c: &mut Checker) -> Result<()> {
    // Decoding against a [B, T_max, 3C] cache of (q, k, v): row pos attends
    // to rows 0..=pos (the split-key path above 16 keys).
    let (cache, cache_t) = c.rand(&[2, 128, 96], 30)?;
    for texture in [false, true] {
        let kv = attention::KvCache::from_rows(cache_t.clone(), texture)?;
        for pos in 0..100 {
            kv.commit(pos);
        }
        let positions = [0usize, 4, 15, 16, 33, 99];
        for &pos in pick(c, &positions, 3) {
            let got = kv.attend(4, pos).and_then(|t| t.to_vec());
            let part = |part: usize, rows: std::ops::Range<usize>| -> Vec<f32> {
                (0..2)
                    .flat_map(|b| rows.clone().flat_map(move |t| (0..32).map(move |i| (b, t, i))))
                    .map(|(b, t, i)| cache[(b * 128 + t) * 96 + part * 32 + i])
                    .collect()
            };
            let want = attention::cpu::multi_head(
                &part(0, pos..pos + 1),
                &part(1, 0..pos + 1),
                &part(2, 0..pos + 1),
                2,
                1,
                pos + 1,
                32,
                4,
                true,
            );
            c.close(
                &format!("KV-cache attention (texture {texture})"),
                format!("pos {pos} of 2x128x96"),
                got,
                &want,
                1e-5,
            );
        }
    }
    let (q, qt) = c.rand(&[2, 24, 35], 4)?;
    let (k, kt) = c.rand(&[2, 24, 35], 5)?;
    let (v, vt) = c.rand(&[2, 24, 35], 6)?;
    let got = attention::spatial(&qt, &kt, &vt).and_then(|(o, _)| o.to_vec());
    c.close("spatial attention", "2x24x35", got, &attention::cpu::spatial(&q, &k, &v, 2, 24, 35), 1e-5);
    for (b, ch, n) in [(2, 24, 35), (3, 5, 70)] {
        let (x, xt) = c.rand(&[b, 3 * ch, n], 48)?;
        let got = attention::spatial_qkv(&xt, ch).and_then(|(o, _)| o.to_vec());
        let want = attention::cpu::spatial_qkv(&x, b, ch, n);
        c.close("spatial attention qkv", format!("{b}x3*{ch}x{n}"), got, &want, 1e-5);
    }
    Ok(())
}

/// Nearest codebook entry: scores from the product and the direct kernel; exact indices.
pub fn quantize(c: &mut Checker) -> Result<()> {
    let (z, zt) = c.rand(&[2, 16, 5, 3], 9)?;
    let (cb, cbt) = c.rand(&[37, 16], 10)?;
    let (widx, wzq) = quantize::cpu::nearest(&z, 2, 16, 15, &cb);
    for (path, r) in [("by product", quantize::nearest(&zt, &cbt)), ("direct", quantize::nearest_direct(&zt, &cbt))] {
        match r {
            Ok((idx, zq)) => {
                c.equal(&format!("quantize indices {path}"), "2x16x5x3 of 37", idx.to_u32_vec(), &widx);
                c.close(&format!("quantize z_q {path}"), "2x16x5x3 of 37", zq.to_vec(), &wzq, 0.0);
            }
            Err(e) => c.close(&format!("quantize {path}"), "2x16x5x3 of 37", Err(e), &wzq, 0.0),
        }
    }
    // Codebooks whose direct search would loop past lavapipe's limit (2,000 codes of 64 values:
    // 130,000 iterations a position), and scores split into runs of positions (on the small-binding
    // variant): the search by product gives the exact indices, the direct kernel those or an error.
    for (shape, codes) in [([1usize, 64, 2, 3], 2000usize), ([2, 8, 9, 13], 300)] {
        let [b, d, h, w] = shape;
        if ((codes * d * 4) as u64) > c.gpu.max_binding() {
            continue; // a codebook larger than one binding (the small-binding variant) is not split
        }
        let (z, zt) = c.rand(&shape, 12)?;
        let (cb, cbt) = c.rand(&[codes, d], 13)?;
        let (widx, wzq) = quantize::cpu::nearest(&z, b, d, h * w, &cb);
        let what = format!("{b}x{d}x{h}x{w} of {codes}");
        match quantize::nearest(&zt, &cbt) {
            Ok((idx, zq)) => {
                c.equal("quantize indices by product", &what, idx.to_u32_vec(), &widx);
                c.close("quantize z_q by product", &what, zq.to_vec(), &wzq, 0.0);
            }
            Err(e) => c.close("quantize by product", &what, Err(e), &wzq, 0.0),
        }
        if let Ok((idx, _)) = quantize::nearest_direct(&zt, &cbt) {
            c.equal("quantize indices direct", &what, idx.to_u32_vec(), &widx);
        }
    }
    // Gumbel's hard choice (argmax over channels, with a tie) and label maps as one-hot channels.
    let (mut logits, _) = c.rand(&[3, 37, 7, 5], 11)?;
    (logits[(37 + 4) * 35 + 2], logits[(37 + 9) * 35 + 2]) = (10.0, 10.0);
    let lt = c.tensor(&logits, &[3, 37, 7, 5])?;
    let got = quantize::argmax_channels(&lt).and_then(|t| t.to_u32_vec());
    c.equal("argmax channels", "3x37x7x5", got, &quantize::cpu::argmax_channels(&logits, 3, 37, 35));
    let labels: Vec<u32> = (0..2 * 9 * 7).map(|i| (i * 7919 % 23) as u32).collect();
    let got = quantize::one_hot(&labels, 2, 9, 7, 23, &c.gpu).and_then(|t| t.to_vec());
    c.close("one-hot labels", "2x23x9x7", got, &quantize::cpu::one_hot(&labels, 2, 23, 63), 0.0);
    Ok(())
}

/// Activations and arithmetic, scalar and vec4 entries, with broadcasting.
pub fn elementwise(c: &mut Checker) -> Result<()> {
    // 999 elements take the scalar entry, 100 the vec4 one.
    let x4: Vec<f32> = random_vec(999, 11, 4.0);
    let xt = c.tensor(&x4, &[3, 333])?;
    let z: Vec<f32> = random_vec(100, 15, 4.0);
    let zt = c.tensor(&z, &[4, 25])?;
    for op in [
        Unary::Swish,
        Unary::Gelu,
        Unary::LeakyRelu(0.2),
        Unary::Sigmoid,
        Unary::Affine(0.5, -1.0),
        Unary::Relu,
        Unary::Exp,
        Unary::Abs,
        Unary::Softplus,
    ] {
        for (v, t) in [(&x4, &xt), (&z, &zt)] {
            let got = elementwise::unary(t, op).and_then(|t| t.to_vec());
            c.close(&format!("unary {op:?}"), format!("{}", v.len()), got, &elementwise::cpu::unary(v, op), 1e-6);
        }
    }
    // The maps defined for positive inputs, on |x| + 0.1.
    let (xp, zp): (Vec<f32>, Vec<f32>) =
        (x4.iter().map(|v| v.abs() + 0.1).collect(), z.iter().map(|v| v.abs() + 0.1).collect());
    let (xpt, zpt) = (c.tensor(&xp, &[3, 333])?, c.tensor(&zp, &[4, 25])?);
    for op in [Unary::Sqrt, Unary::Recip, Unary::Log] {
        for (v, t) in [(&xp, &xpt), (&zp, &zpt)] {
            let got = elementwise::unary(t, op).and_then(|t| t.to_vec());
            c.close(&format!("unary {op:?}"), format!("{}", v.len()), got, &elementwise::cpu::unary(v, op), 1e-6);
        }
    }
    let (y, yt) = c.rand(&[3, 333], 12)?;
    for op in [Binary::AddScaled(1.0, 1.0), Binary::AddScaled(2.0, -0.5), Binary::Mul, Binary::Max] {
        let got = elementwise::binary(&xt, &yt, op).and_then(|t| t.to_vec());
        c.close(&format!("binary {op:?}"), "3x333", got, &elementwise::cpu::binary_broadcast(&x4, &y, op, 1), 1e-6);
    }
    let (p, pt) = c.rand(&[4, 100], 15)?;
    let (q, qt) = c.rand(&[4, 100], 16)?;
    for op in [Binary::AddScaled(2.0, -0.5), Binary::Mul, Binary::Div, Binary::Max] {
        let got = elementwise::binary(&pt, &qt, op).and_then(|t| t.to_vec());
        c.close(
            &format!("binary {op:?} by vec4"),
            "4x100",
            got,
            &elementwise::cpu::binary_broadcast(&p, &q, op, 1),
            1e-6,
        );
    }
    // Per-channel broadcast over [B, C, H, W]: scalar (3 channels) and vec4 (runs of 20, and of 1).
    let (a, at) = c.rand(&[2, 3, 4, 5], 13)?;
    let (ch, cht) = c.rand(&[3], 14)?;
    let op = Binary::AddScaled(1.0, 1.0);
    let got = elementwise::binary_broadcast(&at, &cht, op, 20).and_then(|t| t.to_vec());
    c.close("broadcast add", "2x3x4x5 + 3", got, &elementwise::cpu::binary_broadcast(&a, &ch, op, 20), 1e-6);
    let (a, at) = c.rand(&[2, 8, 4, 5], 17)?;
    let (ch, cht) = c.rand(&[8], 18)?;
    for inner in [20, 1] {
        let got = elementwise::binary_broadcast(&at, &cht, Binary::Mul, inner).and_then(|t| t.to_vec());
        let want = elementwise::cpu::binary_broadcast(&a, &ch, Binary::Mul, inner);
        c.close("broadcast mul by vec4", format!("2x8x4x5, runs of {inner}"), got, &want, 1e-6);
    }
    Ok(())
}

/// Upsample, pad, reductions, sums along a dimension, embedding gather,
/// slice, concat, transposes and f16 widening.
pub fn data_movement(c: &mut Checker) -> Result<()> {
    // The loop budget kernels keep within (lavapipe cuts every loop of an invocation short after
    // 65,535 iterations in all): 16 x LOOP_ITERATIONS / 16 nested iterations all run.
    let budget = crate::engine::kernels::LOOP_ITERATIONS;
    let got = reduce::loop_probe(&c.gpu, 16, budget / 16).map(|n| vec![n]);
    c.equal("loop iterations", format!("16x{}", budget / 16), got, &[budget]);
    let (x, xt) = c.rand(&[2, 3, 5, 7], 15)?;
    let got = resample::upsample2x(&xt).and_then(|t| t.to_vec());
    c.close("upsample2x", "2x3x5x7", got, &resample::cpu::upsample2x(&x, 6, 5, 7), 0.0);
    let (x8, x8t) = c.rand(&[2, 3, 5, 8], 19)?;
    let got = resample::upsample2x(&x8t).and_then(|t| t.to_vec());
    c.close("upsample2x by vec4", "2x3x5x8", got, &resample::cpu::upsample2x(&x8, 6, 5, 8), 0.0);
    let got = resample::pad(&xt, [0, 2, 1, 3]).and_then(|t| t.to_vec());
    c.close("pad", "2x3x5x7 by [0, 2, 1, 3]", got, &resample::cpu::pad(&x, 6, 5, 7, [0, 2, 1, 3]), 0.0);
    let (p, pt) = c.rand(&[2, 3, 4, 6], 20)?;
    let got = resample::maxpool2x2(&pt).and_then(|t| t.to_vec());
    c.close("maxpool2x2", "2x3x4x6", got, &resample::cpu::maxpool2x2(&p, 6, 4, 6), 0.0);

    let n = if c.quick { 10_007 } else { 100_003 };
    let (r, rt) = c.rand(&[n], 16)?;
    for what in [Reduce::Sum, Reduce::Mean, Reduce::MeanAbs, Reduce::L2Norm, Reduce::SumSquares] {
        let got = reduce::reduce(&rt, what).and_then(|t| t.to_vec());
        let want = reduce::cpu::reduce(&r, what);
        // Relative to the result itself (sums of many values).
        let got = got.map(|g| g.iter().map(|v| v / want.abs().max(1.0)).collect());
        c.close(&format!("reduce {what:?}"), format!("{n}"), got, &[want / want.abs().max(1.0)], 1e-4);
    }
    for dim in 0..4 {
        let got = reduce::sum_dim(&xt, dim).and_then(|t| t.to_vec());
        c.close("sum_dim", format!("2x3x5x7 dim {dim}"), got, &reduce::cpu::sum_dim(&x, &[2, 3, 5, 7], dim), 1e-6);
    }
    // Long reduced axes (the subgroup kernel's), with and without an inner stride; inner strides
    // of whole vec4s (`sum_axis4`: a linear layer's bias gradient).
    let long_axes =
        [([3usize, 200, 5], 1usize), ([130, 1, 1], 0), ([2, 3, 97], 2), ([2, 100, 36], 1), ([2, 130, 20], 1)];
    for (shape, dim) in long_axes {
        let (v, vt) = c.rand(&shape, 19)?;
        let got = reduce::sum_dim(&vt, dim).and_then(|t| t.to_vec());
        c.close("sum_dim", format!("{shape:?} dim {dim}"), got, &reduce::cpu::sum_dim(&v, &shape, dim), 1e-5);
    }
    // Axes longer than one invocation's loop budget (LOOP_ITERATIONS): summed by parts; scalar
    // and vec4 columns. (Rows larger than one binding are refused: not under small bindings.)
    for (shape, dim) in [([2usize, 70_000, 1], 1usize), ([3, 17_000, 4], 1)] {
        if (shape[1] * shape[2] * 4 + c.gpu.binding_alignment()) as u64 > c.gpu.max_binding() {
            continue;
        }
        let (v, vt) = c.rand(&shape, 24)?;
        let got = reduce::sum_dim(&vt, dim).and_then(|t| t.to_vec());
        c.close("sum_dim", format!("{shape:?} dim {dim}"), got, &reduce::cpu::sum_dim(&v, &shape, dim), 1e-4);
    }
    // Layouts of whole texels.
    let (x4, x4t) = c.rand(&[3, 8, 6, 12], 18)?;
    for dim in 0..4 {
        let got = reduce::sum_dim(&x4t, dim).and_then(|t| t.to_vec());
        c.close("sum_dim", format!("3x8x6x12 dim {dim}"), got, &reduce::cpu::sum_dim(&x4, &[3, 8, 6, 12], dim), 1e-5);
    }
    // Bias gradients: planes of whole vec4s or not, a few channels or more than a workgroup;
    // 70,000 vec4s a channel (more than one layer of a flat texture, and more loop iterations
    // than lavapipe lets one invocation run: one loop over them summed wrong), 280,000 terms
    // summed in f32, so a looser tolerance.
    let sums =
        [(2usize, 3usize, 5usize, 1e-5), (3, 8, 12, 1e-5), (1, 13, 64, 1e-5), (5, 37, 9, 1e-5), (70, 1, 4000, 1e-4)];
    for (outer, ch, inner, tolerance) in sums {
        let (v, vt) = c.rand(&[outer, ch, inner], 21)?;
        let got = reduce::channel_sums(&vt, ch, inner).and_then(|t| t.to_vec());
        let what = format!("{outer}x{ch}x{inner}");
        c.close("channel_sums", what, got, &reduce::cpu::channel_sums(&v, ch, inner), tolerance);
    }
    // The embedding gradient of 70,000 ids (each invocation loops over its dispatch's ids:
    // runs within the loop budget; 23,000 terms a sum in f32).
    let ids: Vec<u32> = (0..70_000u32).map(|i| i * 7919 % 3).collect();
    let (g, gt) = c.rand(&[ids.len(), 4], 23)?;
    let got = Tensor::from_u32(&c.gpu, &ids, &[ids.len()])
        .and_then(|it| embedding::embedding_backward(&it, &gt, 3))
        .and_then(|t| t.to_vec());
    c.close("embedding backward", "70000 ids x 4", got, &embedding::cpu::embedding_backward(&ids, &g, 3, 4), 1e-4);
    let (table, tt) = c.rand(&[11, 6], 17)?;
    let ids = [3u32, 0, 10, 3, 7];
    let got = embedding::embedding(&tt, &ids).and_then(|t| t.to_vec());
    c.close("embedding", "5 of 11x6", got, &embedding::cpu::embedding(&table, 6, &ids), 0.0);
    // A table and an output larger than the `max_binding` variant's bindings (22 and 19 KB).
    let (table, tt) = c.rand(&[700, 8], 19)?;
    let ids: Vec<u32> = (0..600u32).map(|i| i * 7919 % 700).collect();
    let got = embedding::embedding(&tt, &ids).and_then(|t| t.to_vec());
    c.close("embedding", "600 of 700x8", got, &embedding::cpu::embedding(&table, 8, &ids), 0.0);

    // Up to `BLOCK_COPIES_MAX` outer blocks (dims 0 and 1 here) take buffer copies, more (dim 2)
    // the `block_copy` kernel.
    for (dim, start, len) in [(0, 1, 1), (1, 1, 2), (2, 2, 3)] {
        let got = copy::slice(&xt, dim, start, len).and_then(|t| t.to_vec());
        let want = copy::cpu::slice(&x, &[2, 3, 5, 7], dim, start, len);
        c.close("slice", format!("2x3x5x7 dim {dim} [{start}, {})", start + len), got, &want, 0.0);
    }
    let (y, yt) = c.rand(&[2, 4, 5, 7], 18)?;
    let got = copy::concat(&[&xt, &yt], 1).and_then(|t| t.to_vec());
    let want = copy::cpu::concat(&[(&x, &[2, 3, 5, 7]), (&y, &[2, 4, 5, 7])], 1);
    c.close("concat", "2x3x5x7 + 2x4x5x7 dim 1", got, &want, 0.0);
    let (y, yt) = c.rand(&[1, 3, 5, 7], 46)?;
    let got = copy::concat(&[&yt, &xt], 0).and_then(|t| t.to_vec());
    let want = copy::cpu::concat(&[(&y, &[1, 3, 5, 7]), (&x, &[2, 3, 5, 7])], 0);
    c.close("concat", "1x3x5x7 + 2x3x5x7 dim 0", got, &want, 0.0);
    let (y, yt) = c.rand(&[2, 3, 2, 7], 47)?;
    let got = copy::concat(&[&xt, &yt], 2).and_then(|t| t.to_vec());
    let want = copy::cpu::concat(&[(&x, &[2, 3, 5, 7]), (&y, &[2, 3, 2, 7])], 2);
    c.close("concat", "2x3x5x7 + 2x3x2x7 dim 2", got, &want, 0.0);
    let got = copy::transpose(&xt).and_then(|t| t.to_vec());
    c.close("transpose", "2x3x5x7", got, &copy::cpu::transpose(&x, 6, 5, 7), 0.0);
    let got = copy::swap_dims(&xt, 2, 3, 5, 7).and_then(|t| t.to_vec());
    c.close("swap_dims", "2x(3,5)x7", got, &copy::cpu::swap_dims(&x, 2, 3, 5, 7), 0.0);
    // Single-element blocks with a % 4 == 0 (a convolution's weights): four per invocation.
    let (w, wt) = c.rand(&[7, 12, 9], 44)?;
    let got = copy::swap_dims(&wt, 7, 12, 9, 1).and_then(|t| t.to_vec());
    c.close("swap_dims by vec4", "7x(12,9)x1", got, &copy::cpu::swap_dims(&w, 7, 12, 9, 1), 0.0);
    // 18 KB: larger than the `max_binding` variant's bindings (runs moved by buffer copies).
    let (v, vt) = c.rand(&[4, 8, 144], 20)?;
    let got = copy::swap_dims(&vt, 1, 4, 8, 144).and_then(|t| t.to_vec());
    c.close("swap_dims", "1x(4,8)x144", got, &copy::cpu::swap_dims(&v, 1, 4, 8, 144), 0.0);
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let ht = Tensor::from_f16(&c.gpu, &h, &[2, 3, 5, 7])?;
    let got = copy::to_f32(&ht).and_then(|t| t.to_vec());
    let want: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
    c.close("f16 to f32", "2x3x5x7", got, &want, 0.0);
    Ok(())
}

/// Row products (token-by-token decoding): x [M, K] times a packed Linear
/// weight [N, K] with bias, GELU and accumulation into rows of a larger
/// output at an offset and stride; f32 and f16 weights; M from 1 to 9 covers
/// the one-row, four-row and register-tiled paths.
pub fn row_products(c: &mut Checker) -> Result<()> {
    let cases = [
        (1usize, 37usize, 12usize),
        (3, 300, 260),
        (1, 300, 96),
        (1, 5, 4),
        (5, 17, 32),
        (9, 37, 68),
        (2, 37, 64),
        (6, 129, 32),
    ];
    for (i, &(m, n, k)) in pick(c, &cases, 3).iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let (x, xt) = c.rand(&[m, k], seed)?;
        let (w, wt) = c.rand(&[n, k], seed + 1)?;
        let (bias, bt) = c.rand(&[n], seed + 2)?;
        let (c0, _) = c.rand(&[m * (n + 3) + 2], seed + 3)?;
        for (half, tiled) in [(false, false), (true, false), (false, true)] {
            let packed =
                if tiled { matmul::pack_row_weight_tiled(&wt, true) } else { pack_row_weight(&wt, true, half) }?;
            // The reference multiplies by the weights the GPU holds.
            let wq: Vec<f32> =
                if half { w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() } else { w.clone() };
            for (gelu, accumulate, with_bias) in [(false, false, false), (true, false, true), (false, true, true)] {
                let out = c.tensor(&c0, &[c0.len()])?;
                let ep = Epilogue { gelu, accumulate };
                let got =
                    gemv_into(&xt, &packed, with_bias.then_some(&bt), ep, &out, 2, n + 3).and_then(|_| out.to_vec());
                let mut want =
                    matmul::cpu::matmul(&x, &wq, 1, m, n, k, false, true, true, true, with_bias.then_some(&bias[..]));
                if gelu {
                    want = elementwise::cpu::unary(&want, Unary::Gelu);
                }
                let mut expect = c0.clone();
                for r in 0..m {
                    for j in 0..n {
                        let at = 2 + r * (n + 3) + j;
                        expect[at] = if accumulate { c0[at] + want[r * n + j] } else { want[r * n + j] };
                    }
                }
                let kernel = format!(
                    "row product{}{}",
                    if half {
                        " f16"
                    } else if tiled {
                        " tiled"
                    } else {
                        ""
                    },
                    if gelu {
                        " +gelu"
                    } else if accumulate {
                        " +="
                    } else {
                        ""
                    }
                );
                c.close(&kernel, format!("{m}x{n}x{k}"), got, &expect, 1e-5);
            }
        }
    }
    Ok(())
}
