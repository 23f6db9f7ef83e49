//! Backward passes: every differentiable op of the tape against central
//! finite differences of its CPU reference forward (f64 accumulation);
//! several gradients from one forward; stop-gradient; Adam/AdamW against
//! PyTorch's update rule; a small network that learns.

mod common;
use common::gpu;

use taming::engine::kernels::elementwise::{Binary, Unary};
use taming::engine::kernels::norm::NormKind;
use taming::engine::kernels::reduce::Reduce;
use taming::engine::kernels::{self, random_vec};
use taming::engine::optim::{self, Adam, AdamConfig};
use taming::engine::{Tape, Tensor, Var};

type GpuFn = dyn Fn(&Tape, &[Var]) -> anyhow::Result<Var>;
type CpuFn = dyn Fn(&[Vec<f32>]) -> Vec<f32>;

type CpuBwd = dyn Fn(&[Vec<f32>], &[f32]) -> Vec<Vec<f32>>;

/// Gradient of sum(f(inputs) * r) from the tape vs central differences of the CPU forward.
fn check(name: &str, inputs: &[(Vec<f32>, Vec<usize>)], gpu_fn: &GpuFn, cpu_fn: &CpuFn) {
    check_impl(name, inputs, gpu_fn, cpu_fn, None);
}

/// `check`, plus the op's CPU backward reference: it must match the finite
/// differences too, and the GPU backward must match it on every element.
fn check_bwd(name: &str, inputs: &[(Vec<f32>, Vec<usize>)], gpu_fn: &GpuFn, cpu_fn: &CpuFn, cpu_bwd: &CpuBwd) {
    check_impl(name, inputs, gpu_fn, cpu_fn, Some(cpu_bwd));
}

fn check_impl(name: &str, inputs: &[(Vec<f32>, Vec<usize>)], gpu_fn: &GpuFn, cpu_fn: &CpuFn, cpu_bwd: Option<&CpuBwd>) {
    let g = gpu();
    let tape = Tape::new();
    let leaves: Vec<Var> = inputs.iter().map(|(v, s)| tape.leaf(Tensor::from_f32(&g, v, s).unwrap())).collect();
    let out = gpu_fn(&tape, &leaves).unwrap();
    let r = random_vec(out.value.numel(), 99, 1.0);
    let rv = tape.constant(Tensor::from_f32(&g, &r, out.shape()).unwrap());
    let loss = tape.reduce(&tape.mul(&out, &rv).unwrap(), Reduce::Sum).unwrap();
    let refs: Vec<&Var> = leaves.iter().collect();
    let grads = tape.grad(&loss, &refs).unwrap();
    let xs0: Vec<Vec<f32>> = inputs.iter().map(|(v, _)| v.clone()).collect();
    let cpu_grads = cpu_bwd.map(|f| f(&xs0, &r));
    let objective = |xs: &[Vec<f32>]| -> f64 { cpu_fn(xs).iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum() };
    for (k, ((x, _), grad)) in inputs.iter().zip(&grads).enumerate() {
        let grad = grad.as_ref().unwrap_or_else(|| panic!("{name}: no gradient for input {k}")).to_vec().unwrap();
        let scale = grad.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
        if let Some(cg) = &cpu_grads {
            common::assert_close(&format!("{name}: GPU vs CPU backward, input {k}"), &grad, &cg[k], 1e-4);
        }
        let step = (x.len() / 16).max(1);
        for j in (0..x.len()).step_by(step) {
            let h = 1e-2f32;
            let mut xs = xs0.clone();
            xs[k][j] = x[j] + h;
            let up = objective(&xs);
            xs[k][j] = x[j] - h;
            let down = objective(&xs);
            let fd = ((up - down) / (2.0 * h as f64)) as f32;
            assert!((grad[j] - fd).abs() <= 1e-2 * scale, "{name}: d/dinput{k}[{j}]: backward {} vs finite difference {fd} (scale {scale})", grad[j]);
            if let Some(cg) = &cpu_grads {
                assert!((cg[k][j] - fd).abs() <= 1e-2 * scale, "{name}: CPU backward d/dinput{k}[{j}] {} vs finite difference {fd}", cg[k][j]);
            }
        }
    }
}

fn input(shape: &[usize], seed: u64) -> (Vec<f32>, Vec<usize>) {
    (random_vec(shape.iter().product(), seed, 1.0), shape.to_vec())
}

#[test]
fn matmul_backward() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, n, k) = (5, 6, 7);
        let ash = if ta { vec![2, k, m] } else { vec![2, m, k] };
        let bsh = if tb { vec![n, k] } else { vec![k, n] };
        check_bwd(&format!("matmul ta={ta} tb={tb}"), &[input(&ash, 1), input(&bsh, 2), input(&[n], 3)],
            &move |t, v| t.matmul(&v[0], &v[1], ta, tb, Some(&v[2])),
            &move |x| kernels::matmul::cpu::matmul(&x[0], &x[1], 2, m, n, k, ta, tb, false, true, Some(&x[2])),
            &move |x, g| {
                let (da, db, dbias) = kernels::matmul::cpu::matmul_backward(&x[0], &x[1], g, 2, m, n, k, ta, tb, false, true);
                vec![da, db, dbias]
            });
    }
}

#[test]
fn conv2d_backward() {
    use taming::engine::kernels::conv2d::ConvSpec;
    let cases = [
        (2, 3, 4, 6, 5, 3, ConvSpec::same(1, 1)),
        (1, 4, 3, 7, 6, 3, ConvSpec::downsample()),
        (2, 5, 3, 4, 3, 1, ConvSpec::same(1, 0)),
        (2, 2, 3, 8, 7, 4, ConvSpec::same(2, 1)),
        (1, 3, 1, 5, 6, 4, ConvSpec::same(1, 1)),
    ];
    for (b, cin, cout, h, w, kk, spec) in cases {
        check_bwd(&format!("conv {kk}x{kk} {spec:?}"), &[input(&[b, cin, h, w], 1), input(&[cout, cin, kk, kk], 2), input(&[cout], 3)],
            &move |t, v| t.conv2d(&v[0], &v[1], Some(&v[2]), spec),
            &move |x| kernels::conv2d::cpu::conv2d(&x[0], b, cin, h, w, &x[1], cout, kk, kk, Some(&x[2]), spec).0,
            &move |x, g| {
                let (dx, dw, db) = kernels::conv2d::cpu::conv2d_backward(&x[0], b, cin, h, w, &x[1], cout, kk, kk, g, spec);
                vec![dx, dw, db]
            });
    }
}

#[test]
fn attention_backward() {
    for (b, tq, tk, c, heads, causal) in [(2, 5, 5, 16, 2, true), (1, 4, 4, 8, 1, false), (1, 3, 6, 8, 2, true)] {
        check_bwd(&format!("attention tq{tq} tk{tk} causal={causal}"), &[input(&[b, tq, c], 1), input(&[b, tk, c], 2), input(&[b, tk, c], 3)],
            &move |t, v| t.attention(&v[0], &v[1], &v[2], heads, causal),
            &move |x| kernels::attention::cpu::multi_head(&x[0], &x[1], &x[2], b, tq, tk, c, heads, causal),
            &move |x, g| {
                let (dq, dk, dv) = kernels::attention::cpu::multi_head_backward(&x[0], &x[1], &x[2], g, b, tq, tk, c, heads, causal);
                vec![dq, dk, dv]
            });
    }
    // The AttnBlock's spatial attention, composed on the tape from matmuls and a softmax.
    let (b, c, n) = (2, 4, 6);
    check("spatial attention", &[input(&[b, c, n], 4), input(&[b, c, n], 5), input(&[b, c, n], 6)],
        &move |t, v| {
            let w = t.softmax(&t.matmul(&v[0], &v[1], true, false, None)?, (c as f32).powf(-0.5))?;
            t.matmul(&v[2], &w, false, true, None)
        },
        &move |x| kernels::attention::cpu::spatial(&x[0], &x[1], &x[2], b, c, n));
}

#[test]
fn elementwise_backward() {
    check("add_scaled", &[input(&[3, 7], 1), input(&[3, 7], 2)], &|t, v| t.add_scaled(&v[0], &v[1], 2.0, -0.5),
        &|x| kernels::elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::AddScaled(2.0, -0.5), 1));
    check("mul", &[input(&[3, 7], 3), input(&[3, 7], 4)], &|t, v| t.mul(&v[0], &v[1]),
        &|x| kernels::elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::Mul, 1));
    check("add_channel", &[input(&[2, 3, 5], 5), input(&[3], 6)], &|t, v| t.add_channel(&v[0], &v[1], 5),
        &|x| kernels::elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::AddScaled(1.0, 1.0), 5));
    // 36 elements take the vec4 entries, 21 the scalar ones.
    let cases = [Unary::Swish, Unary::Gelu, Unary::LeakyRelu(0.2), Unary::Sigmoid, Unary::Affine(1.5, 0.3), Unary::Exp, Unary::Recip, Unary::Softplus]
        .into_iter().flat_map(|op| [(op, [4usize, 9]), (op, [3, 7])]);
    for (op, shape) in cases {
        let mut x = input(&shape, 7);
        // Keep away from the kink of leaky ReLU where differences straddle it.
        x.0.iter_mut().for_each(|v| if v.abs() < 0.05 { *v += 0.1 });
        if op == Unary::Recip {
            // Away from the pole, where central differences are accurate.
            x.0.iter_mut().for_each(|v| *v = v.signum() * (v.abs() + 0.5));
        }
        check_bwd(&format!("{op:?} {shape:?}"), &[x], &move |t, v| t.unary(&v[0], op), &move |x| kernels::elementwise::cpu::unary(&x[0], op),
            &move |x, g| vec![kernels::elementwise::cpu::unary_backward(&x[0], g, op)]);
    }
}

#[test]
fn reductions_softmax_cross_entropy_backward() {
    for what in [Reduce::Sum, Reduce::Mean, Reduce::SumSquares, Reduce::MeanAbs] {
        let mut x = input(&[5, 7], 8);
        x.0.iter_mut().for_each(|v| if v.abs() < 0.05 { *v += 0.1 });
        check(&format!("{what:?}"), &[x], &move |t, v| t.reduce(&v[0], what), &move |x| vec![kernels::reduce::cpu::reduce(&x[0], what)]);
    }
    check_bwd("softmax", &[input(&[4, 11], 9)], &|t, v| t.softmax(&v[0], 0.8), &|x| kernels::softmax::cpu::softmax(&x[0], 11, 0.8),
        &|x, g| vec![kernels::softmax::cpu::softmax_backward(&x[0], 11, 0.8, g)]);
    let targets = [3u32, 0, kernels::cross_entropy::IGNORE, 10, 5];
    check_bwd("cross-entropy", &[input(&[5, 11], 10)], &move |t, v| t.cross_entropy(&v[0], &targets), &move |x| {
        let per = kernels::cross_entropy::cpu::cross_entropy(&x[0], 11, &targets);
        vec![per.iter().sum::<f32>() / 4.0]
    }, &move |x, g| vec![kernels::cross_entropy::cpu::cross_entropy_backward(&x[0], 11, &targets, &[g[0] / 4.0; 5])]);
}

#[test]
fn norm_backward() {
    let cases: [(&[usize], NormKind, f32); 3] = [
        (&[2, 64, 2, 3], NormKind::Group { groups: 32 }, 1e-6),
        (&[5, 12], NormKind::Layer, 1e-5),
        (&[3, 4, 2, 3], NormKind::Batch, 1e-5),
    ];
    for (shape, kind, eps) in cases {
        let c = if kind == NormKind::Layer { *shape.last().unwrap() } else { shape[1] };
        let sh = shape.to_vec();
        let sh2 = sh.clone();
        check_bwd(&format!("{kind:?}"), &[input(shape, 11), input(&[c], 12), input(&[c], 13)],
            &move |t, v| t.norm(&v[0], kind, &v[1], &v[2], eps),
            &move |x| kernels::norm::cpu::norm(&x[0], &sh, kind, &x[1], &x[2], eps, false),
            &move |x, g| {
                let (dx, dg, db) = kernels::norm::cpu::norm_backward(&x[0], &sh2, kind, &x[1], eps, g);
                vec![dx, dg, db]
            });
    }
    // norm_swish: recorded as norm then swish, so it differentiates; with
    // nothing to differentiate it is one fused kernel with the same values.
    let (kind, sh) = (NormKind::Group { groups: 32 }, vec![2, 64, 2, 4]);
    let sh2 = sh.clone();
    let inputs = [input(&sh, 14), input(&[64], 15), input(&[64], 16)];
    check("group norm + swish", &inputs,
        &move |t, v| t.norm_swish(&v[0], kind, &v[1], &v[2], 1e-6),
        &move |x| kernels::norm::cpu::norm(&x[0], &sh2, kind, &x[1], &x[2], 1e-6, true));
    let [recorded, fused] = [Tape::new(), Tape::inference()].map(|t| {
        let v: Vec<Var> = inputs.iter().map(|(x, s)| t.leaf(Tensor::from_f32(&gpu(), x, s).unwrap())).collect();
        t.norm_swish(&v[0], kind, &v[1], &v[2], 1e-6).unwrap().value.to_vec().unwrap()
    });
    let worst = recorded.iter().zip(&fused).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "fused group norm + swish differs from norm then swish by {worst}");
}

#[test]
fn embedding_and_data_movement_backward() {
    let ids = [4u32, 1, 4, 0, 6, 4];
    check_bwd("embedding", &[input(&[7, 5], 14)], &move |t, v| t.embedding(&v[0], &ids),
        &move |x| kernels::embedding::cpu::embedding(&x[0], 5, &ids),
        &move |_, g| vec![kernels::embedding::cpu::embedding_backward(&ids, g, 7, 5)]);
    check_bwd("upsample2x", &[input(&[2, 3, 3, 4], 19)], &|t, v| t.upsample2x(&v[0]), &|x| kernels::resample::cpu::upsample2x(&x[0], 6, 3, 4),
        &|_, g| vec![kernels::resample::cpu::upsample2x_backward(g, 6, 3, 4)]);
    check_bwd("pad", &[input(&[1, 2, 3, 4], 20)], &|t, v| t.pad(&v[0], [0, 1, 2, 1]), &|x| kernels::resample::cpu::pad(&x[0], 2, 3, 4, [0, 1, 2, 1]),
        &|_, g| vec![kernels::resample::cpu::pad_backward(g, 2, 3, 4, [0, 1, 2, 1])]);
    check_bwd("maxpool2x2", &[input(&[2, 3, 4, 6], 21)], &|t, v| t.maxpool2x2(&v[0]), &|x| kernels::resample::cpu::maxpool2x2(&x[0], 6, 4, 6),
        &|x, g| vec![kernels::resample::cpu::maxpool2x2_backward(&x[0], g, 6, 4, 6)]);
    check("mul_mid", &[input(&[2, 3, 5], 22), input(&[2, 5], 23)], &|t, v| t.mul_mid(&v[0], &v[1], 3, 5), &|x| {
        (0..30).map(|i| x[0][i] * x[1][(i / 15) * 5 + i % 5]).collect()
    });
    check("mul_channel", &[input(&[2, 3, 5], 24), input(&[3], 25)], &|t, v| t.mul_channel(&v[0], &v[1], 5),
        &|x| kernels::elementwise::cpu::binary_broadcast(&x[0], &x[1], Binary::Mul, 5));
    check("sum_dim", &[input(&[2, 3, 5], 26)], &|t, v| t.sum_dim(&v[0], 1), &|x| kernels::reduce::cpu::sum_dim(&x[0], &[2, 3, 5], 1));
    check("transpose", &[input(&[2, 3, 5], 15)], &|t, v| t.transpose(&v[0]), &|x| kernels::copy::cpu::transpose(&x[0], 2, 3, 5));
    check("slice", &[input(&[2, 6, 3], 16)], &|t, v| t.slice(&v[0], 1, 2, 3), &|x| kernels::copy::cpu::slice(&x[0], &[2, 6, 3], 1, 2, 3));
    check("concat", &[input(&[2, 2, 3], 17), input(&[2, 4, 3], 18)], &|t, v| t.concat(&[&v[0], &v[1]], 1),
        &|x| kernels::copy::cpu::concat(&[(&x[0], &[2, 2, 3]), (&x[1], &[2, 4, 3])], 1));
}

#[test]
fn several_gradients_from_one_forward_and_stop_gradient() {
    let g = gpu();
    let tape = Tape::new();
    let x = tape.leaf(Tensor::from_f32(&g, &[1.0, 2.0, 3.0], &[3]).unwrap());
    let y = tape.unary(&x, Unary::Affine(2.0, 0.0)).unwrap(); // y = 2x
    let a = tape.reduce(&tape.mul(&y, &y).unwrap(), Reduce::Sum).unwrap(); // a = sum 4x²
    let b = tape.reduce(&y, Reduce::Sum).unwrap(); // b = sum 2x
    let ga = tape.grad(&a, &[&x, &y]).unwrap();
    assert_eq!(ga[0].as_ref().unwrap().to_vec().unwrap(), vec![8.0, 16.0, 24.0]);
    assert_eq!(ga[1].as_ref().unwrap().to_vec().unwrap(), vec![4.0, 8.0, 12.0]);
    let gb = tape.grad(&b, &[&x]).unwrap();
    assert_eq!(gb[0].as_ref().unwrap().to_vec().unwrap(), vec![2.0, 2.0, 2.0]);
    // Straight-through: z + sg(q - z) has gradient 1 w.r.t. z.
    let q = tape.constant(Tensor::from_f32(&g, &[5.0, 5.0, 5.0], &[3]).unwrap());
    let st = tape.add(&x, &tape.add_scaled(&q, &x, 1.0, -1.0).unwrap().detach()).unwrap();
    assert_eq!(st.value.to_vec().unwrap(), vec![5.0, 5.0, 5.0]);
    let gs = tape.grad(&tape.reduce(&st, Reduce::Sum).unwrap(), &[&x]).unwrap();
    assert_eq!(gs[0].as_ref().unwrap().to_vec().unwrap(), vec![1.0, 1.0, 1.0]);
    // A gradient at a late layer runs only the nodes after it, with the same result as a full pass.
    let w1 = tape.leaf(Tensor::from_f32(&g, &[0.5, -1.0, 2.0], &[3]).unwrap());
    let w2 = tape.leaf(Tensor::from_f32(&g, &[1.5, 0.25, -0.5], &[3]).unwrap());
    let h = tape.unary(&tape.mul(&x, &w1).unwrap(), Unary::Swish).unwrap();
    let out = tape.reduce(&tape.mul(&tape.mul(&h, &w2).unwrap(), &h).unwrap(), Reduce::Sum).unwrap();
    let late = tape.grad(&out, &[&w2]).unwrap().remove(0).unwrap().to_vec().unwrap();
    let all = tape.grad(&out, &[&x, &w1, &w2]).unwrap();
    assert_eq!(late, all[2].as_ref().unwrap().to_vec().unwrap());
    assert_eq!(late, h.value.to_vec().unwrap().iter().map(|v| v * v).collect::<Vec<_>>());
    assert!(tape.grad(&b, &[&w2]).unwrap()[0].is_none(), "b does not depend on w2");
    // Inference mode records nothing.
    let inf = Tape::inference();
    let w = inf.leaf(Tensor::from_f32(&g, &[1.0], &[1]).unwrap());
    assert!(!inf.unary(&w, Unary::Exp).unwrap().requires_grad());
}

#[test]
fn adam_and_adamw_match_pytorch_rule() {
    let g = gpu();
    // 37 parameters take the scalar entry, 40 the vec4 one.
    let configs = [(AdamConfig::adam(0.01, 0.5, 0.9), 0.0), (AdamConfig::adam(0.01, 0.9, 0.999), 0.1), (AdamConfig::adamw(3e-3, 0.9, 0.95), 0.01)];
    for (n, (cfg, wd)) in [37usize, 40].into_iter().flat_map(|n| configs.map(move |c| (n, c))) {
        let p0 = random_vec(n, 1, 1.0);
        let param = Tensor::from_f32(&g, &p0, &[n]).unwrap();
        let mut opt = Adam::new(cfg, &[(param.clone(), wd)]).unwrap();
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        for step in 1..=4 {
            let grad = random_vec(n, 10 + step as u64, 0.5);
            opt.update(&[&Tensor::from_f32(&g, &grad, &[n]).unwrap()]).unwrap();
            optim::cpu::adam_step(&cfg, step, wd, &mut p, &grad, &mut m, &mut v);
        }
        let got = param.to_vec().unwrap();
        for (a, b) in got.iter().zip(&p) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{n} parameters, {cfg:?}: {a} vs {b}");
        }
        // State round trip.
        let (step, st) = opt.state().unwrap();
        assert_eq!(step, 4);
        let mut again = Adam::new(cfg, &[(param.clone(), wd)]).unwrap();
        again.load_state(step, &st).unwrap();
        assert!(again.load_state(step, &[]).is_err());
    }
    let grads = vec![Tensor::from_f32(&g, &[3.0, 4.0], &[2]).unwrap()];
    let mut grads = grads;
    let norm = optim::clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-5);
    let clipped = grads[0].to_vec().unwrap();
    assert!((clipped[0] - 0.6).abs() < 1e-4 && (clipped[1] - 0.8).abs() < 1e-4);
}

#[test]
fn a_small_network_learns_a_synthetic_task() {
    // Token -> embedding -> LayerNorm -> Linear + GELU -> Linear -> next token (3t + 1) mod 16.
    let g = gpu();
    let (v, d, h) = (16usize, 32usize, 64usize);
    let mk = |shape: &[usize], seed: u64, s: f32| Tensor::from_f32(&g, &random_vec(shape.iter().product(), seed, s), shape).unwrap();
    let params = vec![
        (mk(&[v, d], 1, 0.5), 0.0),
        (Tensor::from_f32(&g, &vec![1.0; d], &[d]).unwrap(), 0.0),
        (Tensor::zeros(&g, &[d]).unwrap(), 0.0),
        (mk(&[h, d], 2, 0.2), 0.01),
        (Tensor::zeros(&g, &[h]).unwrap(), 0.0),
        (mk(&[v, h], 3, 0.2), 0.01),
    ];
    let mut opt = Adam::new(AdamConfig::adamw(1e-2, 0.9, 0.95), &params).unwrap();
    let tokens: Vec<u32> = (0..48).map(|i| (i * 7 % 16) as u32).collect();
    let targets: Vec<u32> = tokens.iter().map(|t| (3 * t + 1) % 16).collect();
    let mut losses = Vec::new();
    for _ in 0..60 {
        let tape = Tape::new();
        let p: Vec<Var> = params.iter().map(|(t, _)| tape.leaf(t.clone())).collect();
        let x = tape.embedding(&p[0], &tokens).unwrap();
        let x = tape.norm(&x, NormKind::Layer, &p[1], &p[2], 1e-5).unwrap();
        let x = tape.unary(&tape.matmul(&x, &p[3], false, true, Some(&p[4])).unwrap(), Unary::Gelu).unwrap();
        let logits = tape.matmul(&x, &p[5], false, true, None).unwrap();
        let loss = tape.cross_entropy(&logits, &targets).unwrap();
        losses.push(loss.value.to_scalar().unwrap());
        let grads = tape.backward(&loss).unwrap();
        let gs: Vec<&Tensor> = p.iter().map(|v| grads.get(v).unwrap()).collect();
        opt.update(&gs).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 2.0 && last < 0.3 * first, "loss went from {first} to {last}: {losses:?}");
}

fn train<F: Fn(&Tape, &[Var]) -> anyhow::Result<Var>>(params: Vec<(Tensor, f32)>, lr: f32, steps: usize, forward: F) -> Vec<f32> {
    let mut opt = Adam::new(AdamConfig::adamw(lr, 0.9, 0.95), &params).unwrap();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let tape = Tape::new();
        let p: Vec<Var> = params.iter().map(|(t, _)| tape.leaf(t.clone())).collect();
        let loss = forward(&tape, &p).unwrap();
        losses.push(loss.value.to_scalar().unwrap());
        let grads = tape.backward(&loss).unwrap();
        opt.update(&p.iter().map(|v| grads.get(v).unwrap()).collect::<Vec<_>>()).unwrap();
    }
    losses
}

#[test]
fn a_small_conv_net_learns_a_fixed_filter() {
    use taming::engine::kernels::conv2d::ConvSpec;
    // Student conv -> GroupNorm -> swish -> conv regresses a fixed random 3x3 "teacher" conv.
    let g = gpu();
    let mk = |shape: &[usize], seed: u64, s: f32| Tensor::from_f32(&g, &random_vec(shape.iter().product(), seed, s), shape).unwrap();
    let x = mk(&[4, 3, 8, 8], 1, 1.0);
    let teacher = kernels::conv2d::conv2d(&x, &mk(&[3, 3, 3, 3], 2, 0.3), None, ConvSpec::same(1, 1)).unwrap();
    let params = vec![
        (mk(&[8, 3, 3, 3], 3, 0.3), 0.0), (Tensor::zeros(&g, &[8]).unwrap(), 0.0),
        (Tensor::from_f32(&g, &[1.0; 8], &[8]).unwrap(), 0.0), (Tensor::zeros(&g, &[8]).unwrap(), 0.0),
        (mk(&[3, 8, 3, 3], 4, 0.2), 0.0), (Tensor::zeros(&g, &[3]).unwrap(), 0.0),
    ];
    let losses = train(params, 2e-2, 40, |t, p| {
        let xv = t.constant(x.clone());
        let h = t.conv2d(&xv, &p[0], Some(&p[1]), ConvSpec::same(1, 1))?;
        let h = t.unary(&t.norm(&h, NormKind::Group { groups: 4 }, &p[2], &p[3], 1e-6)?, Unary::Swish)?;
        let y = t.conv2d(&h, &p[4], Some(&p[5]), ConvSpec::same(1, 1))?;
        let d = t.add_scaled(&y, &t.constant(teacher.clone()), 1.0, -1.0)?;
        t.reduce(&t.mul(&d, &d)?, Reduce::Mean)
    });
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.25 * first, "conv net loss went from {first} to {last}: {losses:?}");
}

#[test]
fn a_small_transformer_learns_a_sequence() {
    // One pre-LN block (causal attention + GELU MLP) predicting a periodic token sequence.
    let g = gpu();
    let (v, c, t_len, heads) = (12usize, 32usize, 24usize, 4usize);
    let mk = |shape: &[usize], seed: u64, s: f32| Tensor::from_f32(&g, &random_vec(shape.iter().product(), seed, s), shape).unwrap();
    let ones = |n: usize| Tensor::from_f32(&g, &vec![1.0; n], &[n]).unwrap();
    let zeros = |n: usize| Tensor::zeros(&g, &[n]).unwrap();
    let params = vec![
        (mk(&[v, c], 1, 0.3), 0.0), (mk(&[t_len, c], 2, 0.1), 0.0),
        (ones(c), 0.0), (zeros(c), 0.0),
        (mk(&[3 * c, c], 3, 0.15), 0.01), (zeros(3 * c), 0.0),
        (mk(&[c, c], 4, 0.15), 0.01), (zeros(c), 0.0),
        (ones(c), 0.0), (zeros(c), 0.0),
        (mk(&[4 * c, c], 5, 0.15), 0.01), (zeros(4 * c), 0.0),
        (mk(&[c, 4 * c], 6, 0.1), 0.01), (zeros(c), 0.0),
        (ones(c), 0.0), (zeros(c), 0.0),
        (mk(&[v, c], 7, 0.15), 0.01),
    ];
    let seq: Vec<u32> = (0..=t_len).map(|i| [3u32, 1, 4, 1, 5, 9, 2, 6][i % 8] % v as u32).collect();
    let (inputs, targets) = (seq[..t_len].to_vec(), seq[1..].to_vec());
    let positions: Vec<u32> = (0..t_len as u32).collect();
    let losses = train(params, 1e-2, 50, |t, p| {
        let x = t.add(&t.embedding(&p[0], &inputs)?, &t.embedding(&p[1], &positions)?)?;
        let h = t.norm(&x, NormKind::Layer, &p[2], &p[3], 1e-5)?;
        let qkv = t.matmul(&h, &p[4], false, true, Some(&p[5]))?;
        let (q, k, vv) = (t.slice(&qkv, 1, 0, c)?, t.slice(&qkv, 1, c, c)?, t.slice(&qkv, 1, 2 * c, c)?);
        let r = |a: &Var| t.reshape(a, &[1, t_len, c]);
        let a = t.reshape(&t.attention(&r(&q)?, &r(&k)?, &r(&vv)?, heads, true)?, &[t_len, c])?;
        let x = t.add(&x, &t.matmul(&a, &p[6], false, true, Some(&p[7]))?)?;
        let h = t.norm(&x, NormKind::Layer, &p[8], &p[9], 1e-5)?;
        let h = t.unary(&t.matmul(&h, &p[10], false, true, Some(&p[11]))?, Unary::Gelu)?;
        let x = t.add(&x, &t.matmul(&h, &p[12], false, true, Some(&p[13]))?)?;
        let h = t.norm(&x, NormKind::Layer, &p[14], &p[15], 1e-5)?;
        t.cross_entropy(&t.matmul(&h, &p[16], false, true, None)?, &targets)
    });
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.2 * first, "transformer loss went from {first} to {last}: {losses:?}");
}
