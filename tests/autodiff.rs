//! Backward passes: every differentiable op of the tape against its CPU
//! backward and central finite differences (the library's checks); several
//! gradients from one forward; stop-gradient; Adam/AdamW against PyTorch's
//! update rule and their state; small networks that learn.

mod common;
use common::gpu;

use taming::engine::check::{self, Checker};
use taming::engine::kernels::elementwise::Unary;
use taming::engine::kernels::norm::NormKind;
use taming::engine::kernels::reduce::Reduce;
use taming::engine::kernels::{self, random_vec};
use taming::engine::optim::{self, Adam, AdamConfig};
use taming::engine::{Tape, Tensor, Var};

/// Every differentiable op of the tape: the GPU backward against the op's CPU
/// backward reference and against central differences of its CPU forward
/// (the library's checks, as `taming check` runs them).
#[test]
fn every_op_backward_matches_cpu_and_finite_differences() {
    let mut c = Checker::new(gpu(), "default", false);
    c.run(check::family("backward").unwrap());
    eprintln!("{} gradient checks", c.outcomes().len());
    assert!(c.outcomes().len() > 100);
    c.assert_passed();
}

#[test]
fn conv2d_backward_matches_cpu() {
    let mut c = Checker::new(gpu(), "default", false);
    c.run(check::family("conv2d_backward").unwrap());
    c.assert_passed();
}

/// norm_swish is recorded as norm then swish, so it differentiates; with
/// nothing to differentiate it is one fused kernel with the same values.
#[test]
fn fused_norm_swish_equals_recorded_norm_then_swish() {
    let (kind, sh) = (NormKind::Group { groups: 32 }, vec![2, 64, 2, 4]);
    let input = |shape: &[usize], seed: u64| (random_vec(shape.iter().product(), seed, 1.0), shape.to_vec());
    let inputs = [input(&sh, 14), input(&[64], 15), input(&[64], 16)];
    let [recorded, fused] = [Tape::new(), Tape::inference()].map(|t| {
        let v: Vec<Var> = inputs.iter().map(|(x, s)| t.leaf(Tensor::from_f32(&gpu(), x, s).unwrap())).collect();
        t.norm_swish(&v[0], kind, &v[1], &v[2], 1e-6).unwrap().value.to_vec().unwrap()
    });
    let worst = recorded.iter().zip(&fused).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "fused group norm + swish differs from norm then swish by {worst}");
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
fn adam_matches_pytorch_and_its_state_round_trips() {
    let mut c = Checker::new(gpu(), "default", false);
    c.run(check::family("optimizer").unwrap());
    c.assert_passed();
    let g = gpu();
    let cfg = AdamConfig::adamw(3e-3, 0.9, 0.95);
    let param = Tensor::from_f32(&g, &random_vec(40, 1, 1.0), &[40]).unwrap();
    let mut opt = Adam::new(cfg, &[(param.clone(), 0.01)]).unwrap();
    for step in 1..=4 {
        opt.update(&[&Tensor::from_f32(&g, &random_vec(40, 10 + step, 0.5), &[40]).unwrap()]).unwrap();
    }
    let (step, st) = opt.state().unwrap();
    assert_eq!(step, 4);
    let mut again = Adam::new(cfg, &[(param.clone(), 0.01)]).unwrap();
    again.load_state(step, &st).unwrap();
    assert!(again.load_state(step, &[]).is_err());
    let mut grads = vec![Tensor::from_f32(&g, &[3.0, 4.0], &[2]).unwrap()];
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
    let mk = |shape: &[usize], seed: u64, s: f32| {
        Tensor::from_f32(&g, &random_vec(shape.iter().product(), seed, s), shape).unwrap()
    };
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

fn train<F: Fn(&Tape, &[Var]) -> anyhow::Result<Var>>(
    params: Vec<(Tensor, f32)>,
    lr: f32,
    steps: usize,
    forward: F,
) -> Vec<f32> {
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
    let mk = |shape: &[usize], seed: u64, s: f32| {
        Tensor::from_f32(&g, &random_vec(shape.iter().product(), seed, s), shape).unwrap()
    };
    let x = mk(&[4, 3, 8, 8], 1, 1.0);
    let teacher = kernels::conv2d::conv2d(&x, &mk(&[3, 3, 3, 3], 2, 0.3), None, ConvSpec::same(1, 1)).unwrap();
    let params = vec![
        (mk(&[8, 3, 3, 3], 3, 0.3), 0.0),
        (Tensor::zeros(&g, &[8]).unwrap(), 0.0),
        (Tensor::from_f32(&g, &[1.0; 8], &[8]).unwrap(), 0.0),
        (Tensor::zeros(&g, &[8]).unwrap(), 0.0),
        (mk(&[3, 8, 3, 3], 4, 0.2), 0.0),
        (Tensor::zeros(&g, &[3]).unwrap(), 0.0),
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
    let mk = |shape: &[usize], seed: u64, s: f32| {
        Tensor::from_f32(&g, &random_vec(shape.iter().product(), seed, s), shape).unwrap()
    };
    let ones = |n: usize| Tensor::from_f32(&g, &vec![1.0; n], &[n]).unwrap();
    let zeros = |n: usize| Tensor::zeros(&g, &[n]).unwrap();
    let params = vec![
        (mk(&[v, c], 1, 0.3), 0.0),
        (mk(&[t_len, c], 2, 0.1), 0.0),
        (ones(c), 0.0),
        (zeros(c), 0.0),
        (mk(&[3 * c, c], 3, 0.15), 0.01),
        (zeros(3 * c), 0.0),
        (mk(&[c, c], 4, 0.15), 0.01),
        (zeros(c), 0.0),
        (ones(c), 0.0),
        (zeros(c), 0.0),
        (mk(&[4 * c, c], 5, 0.15), 0.01),
        (zeros(4 * c), 0.0),
        (mk(&[c, 4 * c], 6, 0.1), 0.01),
        (zeros(c), 0.0),
        (ones(c), 0.0),
        (zeros(c), 0.0),
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
