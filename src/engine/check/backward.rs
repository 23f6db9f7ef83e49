//! Backward passes through the tape against the CPU backward references and
//! central finite differences of the CPU forward (f64 accumulation); the
//! convolution backward in pieces; Adam/AdamW against PyTorch's update rule.

use anyhow::{anyhow, Result};

use super::Checker;
use crate::engine::kernels::conv2d::{self, ConvSpec};
use crate::engine::kernels::elementwise::{self, Binary, Unary};
use crate::engine::kernels::norm::{self, NormKind};
use crate::engine::kernels::reduce::{self, Reduce};
use crate::engine::kernels::{attention, copy, cross_entropy, embedding, matmul, random_vec, resample, softmax};
use crate::engine::optim::{self, Adam, AdamConfig};
use crate::engine::{Tape, Var};

type GpuFn<'a> = &'a dyn Fn(&Tape, &[Var]) -> Result<Var>;
type CpuFn<'a> = &'a dyn Fn(&[Vec<f32>]) -> Vec<f32>;
type CpuBwd<'a> = &'a dyn Fn(&[Vec<f32>], &[f32]) -> Vec<Vec<f32>>;

/// d/dxs[k][j] of sum(f(xs) * r) by a central difference (h = 1e-2, f64 sums).
fn central_difference(f: CpuFn, xs: &[Vec<f32>], r: &[f32], k: usize, j: usize) -> f32 {
    let h = 1e-2f32;
    let objective = |xs: &[Vec<f32>]| -> f64 { f(xs).iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum() };
    let mut xs = xs.to_vec();
    let x = xs[k][j];
    xs[k][j] = x + h;
    let up = objective(&xs);
    xs[k][j] = x - h;
    let down = objective(&xs);
    ((up - down) / (2.0 * h as f64)) as f32
}

fn input(shape: &[usize], seed: u64) -> (Vec<f32>, Vec<usize>) {
    (random_vec(shape.iter().product(), seed, 1.0), shape.to_vec())
}

/// Gradient of sum(f(inputs) * r) from the tape against the op's CPU
/// backward reference (every element, where there is one) and against
/// central differences of its CPU forward (16 elements per input).
fn gradient(
    c: &mut Checker,
    name: &str,
    inputs: &[(Vec<f32>, Vec<usize>)],
    gpu_fn: GpuFn,
    cpu_fn: CpuFn,
    cpu_bwd: Option<CpuBwd>,
) -> Result<()> {
    let shape = inputs.iter().map(|(_, s)| format!("{s:?}")).collect::<Vec<_>>().join(" ");
    let tape = Tape::new();
    let leaves: Vec<Var> = inputs.iter().map(|(v, s)| c.tensor(v, s).map(|t| tape.leaf(t))).collect::<Result<_>>()?;
    let out = gpu_fn(&tape, &leaves)?;
    let r = random_vec(out.value.numel(), 99, 1.0);
    let rv = tape.constant(c.tensor(&r, out.shape())?);
    let loss = tape.reduce(&tape.mul(&out, &rv)?, Reduce::Sum)?;
    let grads = tape.grad(&loss, &leaves.iter().collect::<Vec<_>>())?;
    let xs0: Vec<Vec<f32>> = inputs.iter().map(|(v, _)| v.clone()).collect();
    let cpu_grads = cpu_bwd.map(|f| f(&xs0, &r));
    for (k, ((x, _), grad)) in inputs.iter().zip(&grads).enumerate() {
        let grad = grad.as_ref().ok_or_else(|| anyhow!("{name}: no gradient for input {k}")).and_then(|g| g.to_vec());
        let kernel = format!("{name} backward d{k}");
        if let Some(cg) = &cpu_grads {
            c.close(
                &kernel,
                shape.clone(),
                grad.as_ref().map(|g| g.clone()).map_err(|e| anyhow!("{e:#}")),
                &cg[k],
                1e-4,
            );
        }
        // Central differences at a sample of elements (h = 1e-2; the
        // objective is smooth there, so 1e-2 of the gradient's scale).
        let step = (x.len() / 16).max(1);
        let idx: Vec<usize> = (0..x.len()).step_by(step).collect();
        let fd: Vec<f32> = idx.iter().map(|&j| central_difference(cpu_fn, &xs0, &r, k, j)).collect();
        // |grad - fd| within 1e-2 of the gradient's scale (at least 1e-2).
        let (sampled, scale) = match grad {
            Ok(g) => {
                let scale = g.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
                (Ok(idx.iter().map(|&j| g[j] / scale).collect::<Vec<f32>>()), scale)
            }
            Err(e) => (Err(e), 1.0),
        };
        let fd: Vec<f32> = fd.iter().map(|v| v / scale).collect();
        c.close(&format!("{kernel} vs finite differences"), shape.clone(), sampled, &fd, 1e-2);
    }
    Ok(())
}

/// Every differentiable op of the tape.
pub fn ops(c: &mut Checker) -> Result<()> {
    let transposes =
        if c.quick { vec![(false, true)] } else { vec![(false, false), (true, false), (false, true), (true, true)] };
    for (ta, tb) in transposes {
        let (m, n, k) = (5, 6, 7);
        let ash = if ta { vec![2, k, m] } else { vec![2, m, k] };
        let bsh = if tb { vec![n, k] } else { vec![k, n] };
        gradient(
            c,
            &format!("matmul ta={ta} tb={tb}"),
            &[input(&ash, 1), input(&bsh, 2), input(&[n], 3)],
            &move |t, v| t.matmul(&v[0], &v[1], ta, tb, Some(&v[2])),
            &move |x| matmul::cpu::matmul(&x[0], &x[1], 2, m, n, k, ta, tb, false, true, Some(&x[2])),
            Some(&move |x, g| {
                let (da, db, dbias) = matmul::cpu::matmul_backward(&x[0], &x[1], g, 2, m, n, k, ta, tb, false, true);
                vec![da, db, dbias]
            }),
        )?;
    }
    let convs = [
        (2, 3, 4, 6, 5, 3, ConvSpec::same(1, 1)),
        (1, 4, 3, 7, 6, 3, ConvSpec::downsample()),
        (2, 5, 3, 4, 3, 1, ConvSpec::same(1, 0)),
        (2, 2, 3, 8, 7, 4, ConvSpec::same(2, 1)),
        (1, 3, 1, 5, 6, 4, ConvSpec::same(1, 1)),
        // Winograd (32x32, where it pays): square (the forward keeps dx's transformed weights,
        // made with its own in one pass) and not.
        (1, 4, 4, 32, 32, 3, ConvSpec::same(1, 1)),
        (1, 4, 8, 32, 32, 3, ConvSpec::same(1, 1)),
    ];
    for &(b, cin, cout, h, w, kk, spec) in if c.quick { &convs[..2] } else { &convs[..] } {
        gradient(
            c,
            &format!("conv2d {kk}x{kk} {spec:?}"),
            &[input(&[b, cin, h, w], 1), input(&[cout, cin, kk, kk], 2), input(&[cout], 3)],
            &move |t, v| t.conv2d(&v[0], &v[1], Some(&v[2]), spec),
            &move |x| conv2d::cpu::conv2d(&x[0], b, cin, h, w, &x[1], cout, kk, kk, Some(&x[2]), spec).0,
            Some(&move |x, g| {
                let (dx, dw, db) = conv2d::cpu::conv2d_backward(&x[0], b, cin, h, w, &x[1], cout, kk, kk, g, spec);
                vec![dx, dw, db]
            }),
        )?;
    }
    // conv2d + residual (training's ResnetBlocks): the channel-packed path (Cin % 4 == 0, whole
    // texels of pixels; with Cin = Cout the forward also packs dx's flipped weights), Winograd
    // (32x32: where it pays), and the add after a convolution neither takes (three channels).
    let residual_convs = [(2, 8, 4, 6, 8), (2, 8, 8, 4, 6), (1, 4, 4, 32, 32), (2, 3, 4, 5, 6)];
    for &(b, cin, cout, h, w) in if c.quick { &residual_convs[..1] } else { &residual_convs[..] } {
        let spec = ConvSpec::same(1, 1);
        gradient(
            c,
            "conv2d 3x3 + residual",
            &[input(&[b, cin, h, w], 1), input(&[cout, cin, 3, 3], 2), input(&[cout], 3), input(&[b, cout, h, w], 4)],
            &move |t, v| t.conv2d_add(&v[0], &v[1], Some(&v[2]), spec, &v[3]),
            &move |x| {
                let (y, _, _) = conv2d::cpu::conv2d(&x[0], b, cin, h, w, &x[1], cout, 3, 3, Some(&x[2]), spec);
                y.iter().zip(&x[3]).map(|(y, r)| r + y).collect()
            },
            Some(&move |x, g| {
                let (dx, dw, db) = conv2d::cpu::conv2d_backward(&x[0], b, cin, h, w, &x[1], cout, 3, 3, g, spec);
                vec![dx, dw, db, g.to_vec()]
            }),
        )?;
    }
    // x read by two 1x1 convolutions (an AttnBlock's q, k and v): the second backward's dx product
    // adds into the first's dx (beta = 1), or a 3x3 one's backward adds after (the fallback).
    for &(b, cin, cout, h, w, kk) in &[(2usize, 8usize, 5usize, 4usize, 6usize, 1usize), (1, 4, 3, 5, 4, 3)] {
        let spec = ConvSpec::same(1, (kk - 1) / 2);
        gradient(
            c,
            &format!("conv2d {kk}x{kk} of x, twice"),
            &[input(&[b, cin, h, w], 5), input(&[cout, cin, kk, kk], 6), input(&[cout, cin, kk, kk], 7)],
            &move |t, v| t.add(&t.conv2d(&v[0], &v[1], None, spec)?, &t.conv2d(&v[0], &v[2], None, spec)?),
            &move |x| {
                let conv = |wt: &[f32]| conv2d::cpu::conv2d(&x[0], b, cin, h, w, wt, cout, kk, kk, None, spec).0;
                conv(&x[1]).iter().zip(conv(&x[2])).map(|(p, q)| p + q).collect()
            },
            Some(&move |x, g| {
                let bw = |wt: &[f32]| conv2d::cpu::conv2d_backward(&x[0], b, cin, h, w, wt, cout, kk, kk, g, spec);
                let ((dx1, dw1, _), (dx2, dw2, _)) = (bw(&x[1]), bw(&x[2]));
                vec![dx1.iter().zip(&dx2).map(|(p, q)| p + q).collect(), dw1, dw2]
            }),
        )?;
    }
    // Past 64 queries and keys the tiled kernels take several workgroups and ragged key tiles.
    let attn = [
        (2, 5, 5, 16, 2, true),
        (1, 4, 4, 8, 1, false),
        (1, 3, 6, 8, 2, true),
        (1, 70, 75, 16, 2, true),
        (2, 66, 66, 8, 2, false),
    ];
    for &(b, tq, tk, ch, heads, causal) in if c.quick { &attn[..1] } else { &attn[..] } {
        gradient(
            c,
            &format!("attention tq{tq} tk{tk} causal={causal}"),
            &[input(&[b, tq, ch], 1), input(&[b, tk, ch], 2), input(&[b, tk, ch], 3)],
            &move |t, v| t.attention(&v[0], &v[1], &v[2], heads, causal),
            &move |x| attention::cpu::multi_head(&x[0], &x[1], &x[2], b, tq, tk, ch, heads, causal),
            Some(&move |x, g| {
                let (dq, dk, dv) =
                    attention::cpu::multi_head_backward(&x[0], &x[1], &x[2], g, b, tq, tk, ch, heads, causal);
                vec![dq, dk, dv]
            }),
        )?;
    }
    // The AttnBlock's spatial attention, composed on the tape from matmuls and a softmax.
    let (b, ch, n) = (2, 4, 6);
    gradient(
        c,
        "spatial attention",
        &[input(&[b, ch, n], 4), input(&[b, ch, n], 5), input(&[b, ch, n], 6)],
        &move |t, v| {
            let w = t.softmax(&t.matmul(&v[0], &v[1], true, false, None)?, (ch as f32).powf(-0.5))?;
            t.matmul(&v[2], &w, false, true, None)
        },
        &move |x| attention::cpu::spatial(&x[0], &x[1], &x[2], b, ch, n),
        None,
    )?;
    // The same from q, k and v stacked in one tensor (the AttnBlock's path), its own backward;
    // channels and positions off the product tiles' sizes.
    for (b, ch, n) in [(2, 4, 6), (1, 5, 9)] {
        gradient(
            c,
            &format!("spatial attention qkv {b}x{ch}x{n}"),
            &[input(&[b, 3 * ch, n], 7)],
            &move |t, v| t.spatial_attention(&v[0], ch),
            &move |x| attention::cpu::spatial_qkv(&x[0], b, ch, n),
            None,
        )?;
    }

    // The codebook loss's stop-gradients: the finite differences are of the loss with the other
    // input held at its value (sg), mean((zq0 - z)^2) + beta mean((zq - z0)^2).
    for (rows, cols) in [(6, 8), (3, 5)] {
        let (z0, zq0) = (input(&[rows, cols], 9).0, input(&[rows, cols], 10).0);
        gradient(
            c,
            &format!("codebook loss {rows}x{cols}"),
            &[input(&[rows, cols], 9), input(&[rows, cols], 10)],
            &|t, v| t.codebook_loss(&v[0], &v[1], 0.25),
            &move |x| {
                let mean_sq = |a: &[f32], b: &[f32]| {
                    a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f32>() / a.len() as f32
                };
                vec![mean_sq(&zq0, &x[0]) + 0.25 * mean_sq(&x[1], &z0)]
            },
            None,
        )?;
    }
    // Rows of the codebook lookup's length (8) and ragged ones.
    for (rows, cols) in [(6, 8), (3, 5)] {
        gradient(
            c,
            &format!("l2 normalised rows {rows}x{cols}"),
            &[input(&[rows, cols], 8)],
            &|t, v| t.l2_normalize_rows(&v[0]),
            &move |x| softmax::cpu::l2_normalize_rows(&x[0], cols),
            None,
        )?;
    }
    gradient(
        c,
        "add_scaled",
        &[input(&[3, 7], 1), input(&[3, 7], 2)],
        &|t, v| t.add_scaled(&v[0], &v[1], 2.0, -0.5),
        &|x| elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::AddScaled(2.0, -0.5), 1),
        None,
    )?;
    gradient(
        c,
        "mul",
        &[input(&[3, 7], 3), input(&[3, 7], 4)],
        &|t, v| t.mul(&v[0], &v[1]),
        &|x| elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::Mul, 1),
        None,
    )?;
    gradient(
        c,
        "add_channel",
        &[input(&[2, 3, 5], 5), input(&[3], 6)],
        &|t, v| t.add_channel(&v[0], &v[1], 5),
        &|x| elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::AddScaled(1.0, 1.0), 5),
        None,
    )?;
    // 36 elements take the vec4 entries, 21 the scalar ones.
    let unary = [
        Unary::Swish,
        Unary::Gelu,
        Unary::LeakyRelu(0.2),
        Unary::Sigmoid,
        Unary::Affine(1.5, 0.3),
        Unary::Exp,
        Unary::Recip,
        Unary::Softplus,
        Unary::Log,
    ];
    for op in unary {
        let shapes: &[[usize; 2]] = if c.quick { &[[4, 9]] } else { &[[4, 9], [3, 7]] };
        for shape in shapes {
            let mut x = input(shape, 7);
            // Keep away from the kink of leaky ReLU where differences straddle it.
            x.0.iter_mut().for_each(|v| {
                if v.abs() < 0.05 {
                    *v += 0.1
                }
            });
            if op == Unary::Recip {
                // Away from the pole, where central differences are accurate.
                x.0.iter_mut().for_each(|v| *v = v.signum() * (v.abs() + 0.5));
            }
            if op == Unary::Log {
                x.0.iter_mut().for_each(|v| *v = v.abs() + 0.5);
            }
            gradient(
                c,
                &format!("{op:?}"),
                &[x],
                &move |t, v| t.unary(&v[0], op),
                &move |x| elementwise::cpu::unary(&x[0], op),
                Some(&move |x, g| vec![elementwise::cpu::unary_backward(&x[0], g, op)]),
            )?;
        }
    }
    for what in [Reduce::Sum, Reduce::Mean, Reduce::SumSquares, Reduce::MeanAbs] {
        let mut x = input(&[5, 7], 8);
        x.0.iter_mut().for_each(|v| {
            if v.abs() < 0.05 {
                *v += 0.1
            }
        });
        gradient(
            c,
            &format!("{what:?}"),
            &[x],
            &move |t, v| t.reduce(&v[0], what),
            &move |x| vec![reduce::cpu::reduce(&x[0], what)],
            None,
        )?;
    }
    gradient(
        c,
        "softmax",
        &[input(&[4, 11], 9)],
        &|t, v| t.softmax(&v[0], 0.8),
        &|x| softmax::cpu::softmax(&x[0], 11, 0.8),
        Some(&|x, g| vec![softmax::cpu::softmax_backward(&x[0], 11, 0.8, g)]),
    )?;
    let targets = [3u32, 0, cross_entropy::IGNORE, 10, 5];
    gradient(
        c,
        "cross-entropy",
        &[input(&[5, 11], 10)],
        &move |t, v| t.cross_entropy(&v[0], &targets),
        &move |x| vec![cross_entropy::cpu::cross_entropy(&x[0], 11, &targets).iter().sum::<f32>() / 4.0],
        Some(&move |x, g| vec![cross_entropy::cpu::cross_entropy_backward(&x[0], 11, &targets, &[g[0] / 4.0; 5])]),
    )?;
    // Logits larger than the `max_binding` variant's bindings (19 KB): runs of rows.
    let targets: Vec<u32> =
        (0..130).map(|i| if i % 11 == 3 { cross_entropy::IGNORE } else { (i * 5 % 37) as u32 }).collect();
    let counted = targets.iter().filter(|&&t| t != cross_entropy::IGNORE).count() as f32;
    let (t2, t3) = (targets.clone(), targets.clone());
    gradient(
        c,
        "cross-entropy",
        &[input(&[130, 37], 17)],
        &move |t, v| t.cross_entropy(&v[0], &targets),
        &move |x| vec![cross_entropy::cpu::cross_entropy(&x[0], 37, &t2).iter().sum::<f32>() / counted],
        Some(&move |x, g| vec![cross_entropy::cpu::cross_entropy_backward(&x[0], 37, &t3, &[g[0] / counted; 130])]),
    )?;
    // Group norms whose planes are whole texels take the two-pass backward (one chunk per plane,
    // and several: 1,296 values), the others the general one.
    let norms: [(&[usize], NormKind, f32); 12] = [
        (&[2, 64, 2, 3], NormKind::Group { groups: 32 }, 1e-6),
        (&[2, 64, 2, 4], NormKind::Group { groups: 32 }, 1e-6),
        (&[3, 32, 4, 5], NormKind::Group { groups: 32 }, 1e-6),
        (&[1, 32, 36, 36], NormKind::Group { groups: 16 }, 1e-6),
        (&[5, 10], NormKind::Layer, 1e-5),
        // Rows of whole texels take the row-wise layer norm backward (one and several chunks).
        (&[2, 3, 20], NormKind::Layer, 1e-5),
        (&[150, 8], NormKind::Layer, 1e-5),
        // Larger than the `max_binding` variant's bindings (19 KB): runs of 64-row chunks. (The
        // 1x32x36x36 group norm above: runs of groups within one image.)
        (&[600, 8], NormKind::Layer, 1e-5),
        (&[3, 4, 2, 3], NormKind::Batch, 1e-5),
        // 18 KB: larger than the `max_binding` variant's bindings (channel-major copies).
        (&[4, 8, 12, 12], NormKind::Batch, 1e-5),
        // Larger than the `max_binding` variant's bindings on the general path (planes and rows
        // that are not whole texels): runs of statistics, elements and blocks.
        (&[2, 64, 5, 7], NormKind::Group { groups: 32 }, 1e-6),
        (&[100, 45], NormKind::Layer, 1e-5),
    ];
    for (shape, kind, eps) in norms {
        let ch = if kind == NormKind::Layer { *shape.last().unwrap() } else { shape[1] };
        let (sh, sh2) = (shape.to_vec(), shape.to_vec());
        gradient(
            c,
            &format!("norm {kind:?}"),
            &[input(shape, 11), input(&[ch], 12), input(&[ch], 13)],
            &move |t, v| t.norm(&v[0], kind, &v[1], &v[2], eps),
            &move |x| norm::cpu::norm(&x[0], &sh, kind, &x[1], &x[2], eps, false),
            Some(&move |x, g| {
                let (dx, dg, db) = norm::cpu::norm_backward(&x[0], &sh2, kind, &x[1], eps, g);
                vec![dx, dg, db]
            }),
        )?;
    }
    // Group norm + swish: the swish's derivative inside the norm's backward passes (planes of
    // whole texels; 16-value planes: four texels an invocation), and through a recomputed
    // pre-activation (planes of 9 values).
    let kind = NormKind::Group { groups: 32 };
    for shape in [[2usize, 64, 2, 4], [1, 32, 4, 4], [2, 32, 3, 3]] {
        let ch = shape[1];
        gradient(
            c,
            "group norm + swish",
            &[input(&shape, 14), input(&[ch], 15), input(&[ch], 16)],
            &move |t, v| t.norm_swish(&v[0], kind, &v[1], &v[2], 1e-6),
            &move |x| norm::cpu::norm(&x[0], &shape, kind, &x[1], &x[2], 1e-6, true),
            Some(&move |x, g| {
                // The CPU references composed: swish's backward at the pre-activation, then the norm's.
                let a = norm::cpu::norm(&x[0], &shape, kind, &x[1], &x[2], 1e-6, false);
                let da = elementwise::cpu::unary_backward(&a, g, Unary::Swish);
                let (dx, dg, db) = norm::cpu::norm_backward(&x[0], &shape, kind, &x[1], 1e-6, &da);
                vec![dx, dg, db]
            }),
        )?;
    }

    // x read by a norm and by another op (a ResnetBlock's input, by norm1 and the shortcut): the
    // norm's backward adds its dx to the gradient the other op gave, in that gradient's storage
    // where the plane passes take the layout (whole-texel planes), else by an add (planes of 9).
    for (shape, swish) in [([2usize, 64, 2, 4], true), ([2, 32, 4, 4], false), ([2, 32, 3, 3], true)] {
        let ch = shape[1];
        gradient(
            c,
            &format!("norm (swish {swish}) of x, + x * w"),
            &[input(&shape, 17), input(&[ch], 18), input(&[ch], 19), input(&shape, 20)],
            &move |t, v| {
                let n = match swish {
                    true => t.norm_swish(&v[0], kind, &v[1], &v[2], 1e-6)?,
                    false => t.norm(&v[0], kind, &v[1], &v[2], 1e-6)?,
                };
                t.add(&n, &t.mul(&v[0], &v[3])?)
            },
            &move |x| {
                let n = norm::cpu::norm(&x[0], &shape, kind, &x[1], &x[2], 1e-6, swish);
                n.iter().zip(x[0].iter().zip(&x[3])).map(|(n, (a, b))| n + a * b).collect()
            },
            Some(&move |x, g| {
                let da = match swish {
                    true => {
                        let a = norm::cpu::norm(&x[0], &shape, kind, &x[1], &x[2], 1e-6, false);
                        elementwise::cpu::unary_backward(&a, g, Unary::Swish)
                    }
                    false => g.to_vec(),
                };
                let (dx, dg, db) = norm::cpu::norm_backward(&x[0], &shape, kind, &x[1], 1e-6, &da);
                let dx = dx.iter().zip(g.iter().zip(&x[3])).map(|(d, (g, w))| d + g * w).collect();
                let dw = g.iter().zip(&x[0]).map(|(g, a)| g * a).collect();
                vec![dx, dg, db, dw]
            }),
        )?;
    }

    // (ids, table rows, width, seed); the second table and its gradients are larger than the
    // `max_binding` variant's bindings (22 and 19 KB).
    let embeddings = [
        (vec![4u32, 1, 4, 0, 6, 4], 7, 5, 14),
        ((0..600u32).map(|i| i * 7919 % 700).collect::<Vec<u32>>(), 700, 8, 15),
    ];
    for (ids, rows, width, seed) in embeddings {
        let (ids2, ids3) = (ids.clone(), ids.clone());
        gradient(
            c,
            "embedding",
            &[input(&[rows, width], seed)],
            &move |t, v| t.embedding(&v[0], &ids),
            &move |x| embedding::cpu::embedding(&x[0], width, &ids2),
            Some(&move |_, g| vec![embedding::cpu::embedding_backward(&ids3, g, rows, width)]),
        )?;
    }
    gradient(
        c,
        "upsample2x",
        &[input(&[2, 3, 3, 4], 19)],
        &|t, v| t.upsample2x(&v[0]),
        &|x| resample::cpu::upsample2x(&x[0], 6, 3, 4),
        Some(&|_, g| vec![resample::cpu::upsample2x_backward(g, 6, 3, 4)]),
    )?;
    gradient(
        c,
        "pad",
        &[input(&[1, 2, 3, 4], 20)],
        &|t, v| t.pad(&v[0], [0, 1, 2, 1]),
        &|x| resample::cpu::pad(&x[0], 2, 3, 4, [0, 1, 2, 1]),
        Some(&|_, g| vec![resample::cpu::pad_backward(g, 2, 3, 4, [0, 1, 2, 1])]),
    )?;
    gradient(
        c,
        "maxpool2x2",
        &[input(&[2, 3, 4, 6], 21)],
        &|t, v| t.maxpool2x2(&v[0]),
        &|x| resample::cpu::maxpool2x2(&x[0], 6, 4, 6),
        Some(&|x, g| vec![resample::cpu::maxpool2x2_backward(&x[0], g, 6, 4, 6)]),
    )?;
    gradient(
        c,
        "mul_mid",
        &[input(&[2, 3, 5], 22), input(&[2, 5], 23)],
        &|t, v| t.mul_mid(&v[0], &v[1], 3, 5),
        &|x| (0..30).map(|i| x[0][i] * x[1][(i / 15) * 5 + i % 5]).collect(),
        None,
    )?;
    gradient(
        c,
        "mul_channel",
        &[input(&[2, 3, 5], 24), input(&[3], 25)],
        &|t, v| t.mul_channel(&v[0], &v[1], 5),
        &|x| elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::Mul, 5),
        None,
    )?;
    gradient(
        c,
        "sum_dim",
        &[input(&[2, 3, 5], 26)],
        &|t, v| t.sum_dim(&v[0], 1),
        &|x| reduce::cpu::sum_dim(&x[0], &[2, 3, 5], 1),
        None,
    )?;
    gradient(
        c,
        "transpose",
        &[input(&[2, 3, 5], 15)],
        &|t, v| t.transpose(&v[0]),
        &|x| copy::cpu::transpose(&x[0], 2, 3, 5),
        None,
    )?;
    gradient(
        c,
        "slice",
        &[input(&[2, 6, 3], 16)],
        &|t, v| t.slice(&v[0], 1, 2, 3),
        &|x| copy::cpu::slice(&x[0], &[2, 6, 3], 1, 2, 3),
        None,
    )?;
    gradient(
        c,
        "concat",
        &[input(&[2, 2, 3], 17), input(&[2, 4, 3], 18)],
        &|t, v| t.concat(&[&v[0], &v[1]], 1),
        &|x| copy::cpu::concat(&[(&x[0], &[2, 2, 3]), (&x[1], &[2, 4, 3])], 1),
        None,
    )?;
    // More outer blocks than `slice` and `concat` copy with buffer copies: the kernel.
    gradient(
        c,
        "slice",
        &[input(&[2, 3, 6, 2], 19)],
        &|t, v| t.slice(&v[0], 2, 1, 4),
        &|x| copy::cpu::slice(&x[0], &[2, 3, 6, 2], 2, 1, 4),
        None,
    )?;
    gradient(
        c,
        "concat",
        &[input(&[2, 3, 2, 2], 20), input(&[2, 3, 1, 2], 21)],
        &|t, v| t.concat(&[&v[0], &v[1]], 2),
        &|x| copy::cpu::concat(&[(&x[0], &[2, 3, 2, 2]), (&x[1], &[2, 3, 1, 2])], 2),
        None,
    )?;
    Ok(())
}

/// The convolution's forward and backward where the work is split into
/// pieces (the `im2col_budget=4096` variant makes pieces straddle images); dx by the transposed
/// convolution (its flipped weights checked on their own; 32x32 takes Winograd where the device
/// does) and by col2im; dW by the direct product where the shape allows and the tuning takes it
/// (the `conv_dw_direct=false` variant checks the im2col path on the same shapes).
pub fn conv2d_pieces(c: &mut Checker) -> Result<()> {
    let (wt, wtt) = c.rand(&[6, 5, 3, 3], 70)?;
    let got = conv2d::flip_transpose_weights(&wtt).and_then(|t| t.to_vec());
    c.close("conv2d flipped weights", "6x5x3x3", got, &conv2d::cpu::flip_transpose_weights(&wt, 6, 5, 3, 3), 0.0);
    // 46 KB: larger than the `max_binding` variant's bindings (read through a flat texture).
    let (wt, wtt) = c.rand(&[40, 32, 3, 3], 74)?;
    let got = conv2d::flip_transpose_weights(&wtt).and_then(|t| t.to_vec());
    c.close("conv2d flipped weights", "40x32x3x3", got, &conv2d::cpu::flip_transpose_weights(&wt, 40, 32, 3, 3), 0.0);
    let cases = [
        (3, ConvSpec::same(1, 1), (3, 5, 6, 7, 9), true),
        (3, ConvSpec::same(1, 1), (3, 5, 6, 7, 9), false),
        (1, ConvSpec::same(1, 0), (2, 5, 6, 7, 9), true),
        (3, ConvSpec::same(1, 1), (1, 8, 6, 32, 32), true),
        // An image larger than the `max_binding` variant's bindings on the col2im path: dx by runs
        // of channels, dW's patches through a flat texture.
        (3, ConvSpec::downsample(), (1, 8, 6, 32, 32), false),
        (3, ConvSpec::downsample(), (3, 5, 6, 7, 9), false),
        (4, ConvSpec::same(2, 1), (3, 5, 6, 7, 9), false),
        // Shapes the direct weight gradient takes (Cin % 4 == 0, Wo % 4 == 0): ragged Cout,
        // several column groups, stride 2 with one-sided padding, 4x4 kernels.
        (3, ConvSpec::same(1, 1), (3, 8, 6, 7, 12), true),
        (1, ConvSpec::same(1, 0), (2, 12, 37, 5, 8), true),
        (3, ConvSpec::same(1, 1), (2, 32, 40, 8, 8), true),
        (3, ConvSpec::downsample(), (2, 8, 5, 9, 8), false),
        (4, ConvSpec::same(2, 1), (2, 4, 3, 8, 16), false),
        // Cin % 4 != 0 on the direct weight gradient (an image's three channels, zero-padded to a
        // texel; five channels: one whole texel and one padded), stride 1 and 2.
        (3, ConvSpec::same(1, 1), (2, 3, 6, 5, 8), false),
        (3, ConvSpec::same(1, 1), (3, 5, 33, 6, 12), true),
        // The bias gradient from the dW product's spare column group (above: N % 64 != 0), from
        // a column of workgroups more (N = 576: nine columns; N = 64 with a small column), and
        // from its own passes where the last workgroup has no lane to spare, the product fewer
        // than eight columns and a column more would exceed `DBIAS_COLUMN_FLOP` (N = 64, 1,152
        // pixels).
        (3, ConvSpec::same(1, 1), (2, 64, 6, 4, 8), true),
        (1, ConvSpec::same(1, 0), (2, 64, 6, 4, 8), true),
        (1, ConvSpec::same(1, 0), (2, 64, 64, 24, 24), true),
        (3, ConvSpec::downsample(), (2, 3, 8, 9, 8), false),
        // Strided convolutions' dx as the convolution of the dilated dY (channel-packed path,
        // Cout % 4 == 0, H·W % 4 == 0), with an odd height that needs extra padding.
        (3, ConvSpec::downsample(), (2, 8, 8, 12, 16), true),
        (3, ConvSpec::downsample(), (2, 8, 4, 13, 12), true),
        (4, ConvSpec::same(2, 1), (2, 4, 4, 8, 16), true),
        // More than 64 output channels (two rows of the workgroup tiles' dW).
        (3, ConvSpec::same(1, 1), (1, 4, 70, 6, 6), false),
        // Strided dx as a convolution of the dilated dY with shapes only the workgroup tiles take
        // (odd channel counts and widths; elsewhere col2im).
        (3, ConvSpec::downsample(), (2, 5, 6, 7, 9), true),
        (4, ConvSpec::same(2, 1), (1, 3, 5, 9, 11), true),
    ];
    for &(kk, spec, (b, cin, cout, h, w), by_conv) in if c.quick { &cases[..2] } else { &cases[..] } {
        let (x, xt) = c.rand(&[b, cin, h, w], 71)?;
        let (wt, wtt) = c.rand(&[cout, cin, kk, kk], 72)?;
        let (ho, wo) = spec.out_size(h, w, kk, kk).ok_or_else(|| anyhow!("bad case"))?;
        let (g, gt) = c.rand(&[b, cout, ho, wo], 73)?;
        let (rdx, rdw, rdb) = conv2d::cpu::conv2d_backward(&x, b, cin, h, w, &wt, cout, kk, kk, &g, spec);
        let shape = format!("{spec:?} {b}x{cin}x{h}x{w}->{cout}");
        let how = if by_conv { "dx by convolution" } else { "dx by col2im" };
        let paths =
            conv2d::BackwardPaths { dx: true, dx_by_convolution: by_conv, dw_direct: xt.gpu.tuning.conv_dw_direct };
        match conv2d::conv2d_backward_with(&xt, &wtt, &gt, spec, paths, None) {
            Ok((Some(dx), dw, db)) => {
                c.close(&format!("conv2d {kk}x{kk} backward dx ({how})"), shape.clone(), dx.to_vec(), &rdx, 1e-4);
                c.close(&format!("conv2d {kk}x{kk} backward dw"), shape.clone(), dw.to_vec(), &rdw, 1e-4);
                c.close(&format!("conv2d {kk}x{kk} backward db"), shape.clone(), db.to_vec(), &rdb, 1e-4);
            }
            Ok((None, ..)) => {
                c.close(&format!("conv2d {kk}x{kk} backward dx"), shape.clone(), Err(anyhow!("no dx")), &rdx, 1e-4)
            }
            Err(e) => c.close(&format!("conv2d {kk}x{kk} backward"), shape.clone(), Err(e), &rdx, 1e-4),
        }
        // Without dx (an input that needs no gradient): the same dW and db, and no dx.
        match conv2d::conv2d_backward_with(&xt, &wtt, &gt, spec, conv2d::BackwardPaths { dx: false, ..paths }, None) {
            Ok((dx, dw, db)) => {
                let none = if dx.is_none() { Ok(vec![]) } else { Err(anyhow!("a dx that was not asked for")) };
                c.close(&format!("conv2d {kk}x{kk} backward without dx"), shape.clone(), none, &[], 0.0);
                c.close(&format!("conv2d {kk}x{kk} backward dw without dx"), shape.clone(), dw.to_vec(), &rdw, 1e-4);
                c.close(&format!("conv2d {kk}x{kk} backward db without dx"), shape, db.to_vec(), &rdb, 1e-4);
            }
            Err(e) => c.close(&format!("conv2d {kk}x{kk} backward without dx"), shape, Err(e), &rdw, 1e-4),
        }
    }
    Ok(())
}

/// Adam and AdamW against PyTorch's update rule (scalar and vec4 entries).
pub fn optimizer(c: &mut Checker) -> Result<()> {
    let configs = [
        (AdamConfig::adam(0.01, 0.5, 0.9), 0.0),
        (AdamConfig::adam(0.01, 0.9, 0.999), 0.1),
        (AdamConfig::adamw(3e-3, 0.9, 0.95), 0.01),
    ];
    // (4,100 and 4,101 values: larger than the `max_binding` variant's bindings, so updated by windows.)
    for (n, staged) in
        [(37usize, true), (40, true), (37, false), (40, false), (4101, true), (4100, false), (4101, false)]
    {
        for (cfg, wd) in configs {
            let p0 = random_vec(n, 1, 1.0);
            let param = c.tensor(&p0, &[n])?;
            let mut opt = Adam::with_staging(cfg, &[(param.clone(), wd)], staged)?;
            let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
            let mut run = || -> Result<Vec<f32>> {
                for step in 1..=4 {
                    let grad = random_vec(n, 10 + step as u64, 0.5);
                    opt.update(&[&c.tensor(&grad, &[n])?])?;
                    optim::cpu::adam_step(&cfg, step, wd, &mut p, &grad, &mut m, &mut v);
                }
                param.to_vec()
            };
            let got = run();
            let kind = if cfg.decoupled { "AdamW" } else { "Adam" };
            let how = if staged { "staged" } else { "per parameter" };
            c.close(kind, format!("{n} parameters, 4 steps, decay {wd}, {how}"), got, &p, 1e-5);
        }
    }
    // Several parameters in two weight-decay groups (laid out by group, not in order), and the
    // moments read back per parameter.
    for staged in [true, false] {
        let (sizes, wds) = ([37usize, 64, 5], [0.01f32, 0.0, 0.01]);
        let cfg = AdamConfig::adamw(3e-3, 0.9, 0.95);
        let mut cpu: Vec<Vec<f32>> =
            sizes.iter().enumerate().map(|(i, &n)| random_vec(n, 20 + i as u64, 1.0)).collect();
        let tensors = cpu.iter().map(|p| c.tensor(p, &[p.len()])).collect::<Result<Vec<_>>>()?;
        let groups: Vec<(crate::engine::Tensor, f32)> = tensors.iter().cloned().zip(wds).collect();
        let mut opt = Adam::with_staging(cfg, &groups, staged)?;
        let mut moments: Vec<(Vec<f32>, Vec<f32>)> = sizes.iter().map(|&n| (vec![0f32; n], vec![0f32; n])).collect();
        let mut run = || -> Result<(Vec<f32>, Vec<f32>)> {
            for step in 1..=3u32 {
                let grads: Vec<Vec<f32>> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| random_vec(n, 30 + (step * 3) as u64 + i as u64, 0.5))
                    .collect();
                let gt = grads.iter().map(|g| c.tensor(g, &[g.len()])).collect::<Result<Vec<_>>>()?;
                opt.update(&gt.iter().collect::<Vec<_>>())?;
                for i in 0..sizes.len() {
                    let (m, v) = &mut moments[i];
                    optim::cpu::adam_step(&cfg, step, wds[i], &mut cpu[i], &grads[i], m, v);
                }
            }
            let mut got = Vec::new();
            for t in &tensors {
                got.extend(t.to_vec()?);
            }
            for (m, v) in opt.state()?.1 {
                got.extend(m);
                got.extend(v);
            }
            let mut want: Vec<f32> = cpu.concat();
            for (m, v) in &moments {
                want.extend(m);
                want.extend(v);
            }
            Ok((got, want))
        };
        let how = if staged { "staged" } else { "per parameter" };
        match run() {
            Ok((got, want)) => c.close("AdamW, 3 parameters, 2 decay groups", how, Ok(got), &want, 1e-5),
            Err(e) => c.close("AdamW, 3 parameters, 2 decay groups", how, Err(e), &[], 1e-5),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The CPU backward references against central differences of the CPU
    //! forward, with no device: the GPU is compared with these references.
    use super::*;

    fn fd_check(name: &str, xs: &[Vec<f32>], fwd: CpuFn, bwd: CpuBwd) {
        let out = fwd(xs);
        let r = random_vec(out.len(), 5, 1.0);
        let grads = bwd(xs, &r);
        for (k, g) in grads.iter().enumerate() {
            assert_eq!(g.len(), xs[k].len(), "{name}: gradient {k} has the wrong size");
            let scale = g.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
            for j in (0..g.len()).step_by((g.len() / 12).max(1)) {
                let fd = central_difference(fwd, xs, &r, k, j);
                assert!((g[j] - fd).abs() <= 1e-2 * scale, "{name}: d{k}[{j}] {} vs finite difference {fd}", g[j]);
            }
        }
    }

    #[test]
    fn cpu_backward_references_match_finite_differences() {
        let v = |n: usize, seed: u64| random_vec(n, seed, 1.0);
        let (m, n, k) = (3, 4, 5);
        fd_check(
            "matmul",
            &[v(2 * m * k, 1), v(k * n, 2), v(n, 3)],
            &|x| matmul::cpu::matmul(&x[0], &x[1], 2, m, n, k, false, false, false, true, Some(&x[2])),
            &|x, g| {
                let (da, db, dbias) =
                    matmul::cpu::matmul_backward(&x[0], &x[1], g, 2, m, n, k, false, false, false, true);
                vec![da, db, dbias]
            },
        );
        for (kk, spec) in [(3, ConvSpec::same(1, 1)), (3, ConvSpec::downsample()), (4, ConvSpec::same(2, 1))] {
            let (b, cin, cout, h, w) = (2, 3, 2, 6, 5);
            fd_check(
                "conv2d",
                &[v(b * cin * h * w, 4), v(cout * cin * kk * kk, 5)],
                &move |x| conv2d::cpu::conv2d(&x[0], b, cin, h, w, &x[1], cout, kk, kk, None, spec).0,
                &move |x, g| {
                    let (dx, dw, _) = conv2d::cpu::conv2d_backward(&x[0], b, cin, h, w, &x[1], cout, kk, kk, g, spec);
                    vec![dx, dw]
                },
            );
        }
        for (shape, kind) in [(vec![2usize, 64, 2, 2], NormKind::Group { groups: 32 }), (vec![3, 8], NormKind::Layer)] {
            let ch = if kind == NormKind::Layer { *shape.last().unwrap() } else { shape[1] };
            let (s1, s2) = (shape.clone(), shape.clone());
            fd_check(
                "norm",
                &[v(shape.iter().product(), 6), v(ch, 7), v(ch, 8)],
                &move |x| norm::cpu::norm(&x[0], &s1, kind, &x[1], &x[2], 1e-5, false),
                &move |x, g| {
                    let (dx, dg, db) = norm::cpu::norm_backward(&x[0], &s2, kind, &x[1], 1e-5, g);
                    vec![dx, dg, db]
                },
            );
        }
        fd_check(
            "attention",
            &[v(2 * 4 * 8, 9), v(2 * 4 * 8, 10), v(2 * 4 * 8, 11)],
            &|x| attention::cpu::multi_head(&x[0], &x[1], &x[2], 2, 4, 4, 8, 2, true),
            &|x, g| {
                let (dq, dk, dv) = attention::cpu::multi_head_backward(&x[0], &x[1], &x[2], g, 2, 4, 4, 8, 2, true);
                vec![dq, dk, dv]
            },
        );
        fd_check("softmax", &[v(3 * 7, 12)], &|x| softmax::cpu::softmax(&x[0], 7, 0.8), &|x, g| {
            vec![softmax::cpu::softmax_backward(&x[0], 7, 0.8, g)]
        });
    }
}
