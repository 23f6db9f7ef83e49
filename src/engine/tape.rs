//! Reverse-mode automatic differentiation on the GPU.
//!
//! A [`Tape`] records each operation of a forward pass as a node: which
//! nodes it read, and a closure that maps the gradient of its output to the
//! gradients of its inputs (the closure owns what backward needs, e.g. the
//! input activations). [`Tape::grad`] walks the nodes in reverse, summing
//! gradients on the GPU. Because closures are kept, `grad` may be called
//! several times on one forward pass, for any recorded tensors (the VQGAN's
//! adaptive weight needs two gradients at one layer); [`Tape::backward`]
//! instead frees each node's saved tensors as soon as it has run.
//! A tape with recording off ([`Tape::inference`]) saves nothing; `var.detach()` stops gradients
//! (the straight-through estimator).
//!
//! # Backward kernels
//!
//! matmul (transposes, shared weights, bias), conv2d (all variants; dW from a transposed im2col
//! texture, dX by col2im gathering), group/layer/batch norm, softmax, fused attention (two
//! atomic-free passes) and its matmul form, activations, reductions, cross-entropy, embedding
//! (scatter-add by column), upsample, pad, reshape/transpose/slice/concat. Each backward kernel has
//! a CPU reference (`kernels::*::cpu::*_backward`, f64 accumulation).
//!
//! # Tests
//!
//! `tests/autodiff.rs` checks the GPU backward and the CPU reference against central finite
//! differences of the CPU forward, and the GPU backward against the CPU reference on every element.
//! It also runs Adam/AdamW against PyTorch's update rule (1e-6 relative), and trains a conv net and
//! a one-block transformer on fixed synthetic tasks.

use std::cell::{Cell, RefCell};

use anyhow::{bail, Result};

use super::kernels::conv2d::{self, ConvSpec};
use super::kernels::elementwise::{self, Binary, Unary};
use super::kernels::norm::{self, NormKind};
use super::kernels::reduce::{self, Reduce};
use super::kernels::{attention, copy, cross_entropy, embedding, matmul, resample, softmax};
use super::tensor::Tensor;

/// Maps the output's gradient to the inputs' gradients. The second argument holds, for ops
/// recorded with [`Tape::record_folding`], each input's gradient summed so far (None elsewhere);
/// the op may `take` one and return it with its own contribution added (in its storage, sparing
/// the tape's separate add pass); what it leaves is added by the tape.
type Backward = Box<dyn Fn(&Tensor, &mut [Option<Tensor>]) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    inputs: Vec<Option<usize>>,
    backward: Option<Backward>,
    /// The backward folds the gradient summed so far into its own (see `Backward`).
    folds: bool,
}

/// A value in a computation: its tensor and, when recorded, its node.
#[derive(Clone, Debug)]
pub struct Var {
    pub value: Tensor,
    id: Option<usize>,
}

impl Var {
    /// The same value cut from the graph (stop-gradient).
    pub fn detach(&self) -> Var {
        Var { value: self.value.clone(), id: None }
    }
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    pub fn requires_grad(&self) -> bool {
        self.id.is_some()
    }
}

pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    recording: Cell<bool>,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    pub fn new() -> Tape {
        Tape { nodes: RefCell::new(Vec::new()), recording: Cell::new(true) }
    }

    /// A tape that records nothing: forward passes only, no saved activations.
    pub fn inference() -> Tape {
        let t = Tape::new();
        t.recording.set(false);
        t
    }

    pub fn is_recording(&self) -> bool {
        self.recording.get()
    }

    /// A tensor we want gradients for (a parameter or an input).
    pub fn leaf(&self, value: Tensor) -> Var {
        if !self.is_recording() {
            return Var { value, id: None };
        }
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node { inputs: Vec::new(), backward: None, folds: false });
        Var { value, id: Some(nodes.len() - 1) }
    }

    /// A tensor that is not differentiated.
    pub fn constant(&self, value: Tensor) -> Var {
        Var { value, id: None }
    }

    /// Whether an op on `inputs` would be recorded (some input is differentiated).
    pub fn records(&self, inputs: &[&Var]) -> bool {
        self.is_recording() && inputs.iter().any(|v| v.id.is_some())
    }

    fn record(
        &self,
        inputs: &[&Var],
        value: Tensor,
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        self.push_node(inputs, value, Box::new(move |g, _| backward(g)), false)
    }

    /// `record` for an op whose backward may add its input gradients to the ones summed so far
    /// (see `Backward`): a tensor read by several ops (a ResnetBlock's input, by its norm and its
    /// shortcut) gets its gradient without a separate add pass.
    fn record_folding(
        &self,
        inputs: &[&Var],
        value: Tensor,
        backward: impl Fn(&Tensor, &mut [Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        self.push_node(inputs, value, Box::new(backward), true)
    }

    fn push_node(&self, inputs: &[&Var], value: Tensor, backward: Backward, folds: bool) -> Var {
        if !self.records(inputs) {
            return Var { value, id: None };
        }
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node { inputs: inputs.iter().map(|v| v.id).collect(), backward: Some(backward), folds });
        Var { value, id: Some(nodes.len() - 1) }
    }

    /// Gradients of the scalar `loss` with respect to each of `wrt` (None
    /// where `wrt` does not influence the loss). The tape stays usable.
    pub fn grad(&self, loss: &Var, wrt: &[&Var]) -> Result<Vec<Option<Tensor>>> {
        // Only nodes that depend on a `wrt` tensor need their backward run:
        // e.g. the gradient at the decoder's last layer stops there, instead
        // of going back through the whole autoencoder.
        let needed = {
            let nodes = self.nodes.borrow();
            let mut needed = vec![false; nodes.len()];
            for v in wrt {
                if let Some(i) = v.id {
                    needed[i] = true;
                }
            }
            // Inputs have lower ids than the nodes that read them.
            for (i, node) in nodes.iter().enumerate() {
                if !needed[i] && node.inputs.iter().any(|x| x.is_some_and(|j| needed[j])) {
                    needed[i] = true;
                }
            }
            needed
        };
        let grads = self.run_backward(loss, false, Some(&needed))?;
        Ok(wrt.iter().map(|v| v.id.and_then(|i| grads[i].clone())).collect())
    }

    /// Gradients for every node, freeing saved activations as it goes; the
    /// tape cannot be differentiated again afterwards.
    pub fn backward(&self, loss: &Var) -> Result<Gradients> {
        Ok(Gradients { grads: self.run_backward(loss, true, None)? })
    }

    /// Reverse pass from `loss`; with `needed`, only through the nodes marked there.
    fn run_backward(&self, loss: &Var, free: bool, needed: Option<&[bool]>) -> Result<Vec<Option<Tensor>>> {
        let Some(root) = loss.id else { bail!("backward: the loss does not depend on any recorded tensor") };
        if loss.value.numel() != 1 {
            bail!("backward: the loss must be a scalar, got shape {:?}", loss.shape());
        }
        let n = self.nodes.borrow().len();
        let mut grads: Vec<Option<Tensor>> = vec![None; n];
        grads[root] = Some(Tensor::from_f32(&loss.value.gpu, &[1.0], loss.shape())?);
        let skip = |i: usize| needed.is_some_and(|n| !n[i]);
        for id in (0..=root).rev() {
            if skip(id) {
                continue;
            }
            let Some(g) = grads[id].clone() else { continue };
            let (inputs, input_grads, mut prior) = {
                let mut nodes = self.nodes.borrow_mut();
                let node = &mut nodes[id];
                let taken;
                let bw: &Backward = match free {
                    // Dropping the closure (after it runs) frees what it saved for backward.
                    true => match node.backward.take() {
                        Some(bw) => {
                            taken = bw;
                            &taken
                        }
                        None => continue,
                    },
                    false => match node.backward.as_ref() {
                        Some(bw) => bw,
                        None => continue,
                    },
                };
                // A folding op gets each input's gradient so far (once per input, however often
                // it reads it); the rest see none.
                let mut prior: Vec<Option<Tensor>> = vec![None; node.inputs.len()];
                if node.folds {
                    for (j, input) in node.inputs.iter().enumerate() {
                        if let Some(i) = *input {
                            if !skip(i) && !node.inputs[..j].contains(input) {
                                prior[j] = grads[i].take();
                            }
                        }
                    }
                }
                let input_grads = bw(&g, &mut prior)?;
                (node.inputs.clone(), input_grads, prior)
            };
            if free {
                // Only leaves' gradients are wanted from `backward`.
                grads[id] = None;
            }
            if input_grads.len() != inputs.len() {
                bail!("internal: node {id} returned {} gradients for {} inputs", input_grads.len(), inputs.len());
            }
            for (j, (input, ig)) in inputs.into_iter().zip(input_grads).enumerate() {
                let Some(i) = input else { continue };
                if skip(i) {
                    continue;
                }
                // What the op left of the gradient so far goes back before its own is added.
                if let Some(p) = prior[j].take() {
                    grads[i] = Some(p);
                }
                let Some(ig) = ig else { continue };
                grads[i] = Some(match grads[i].take() {
                    None => ig,
                    Some(prev) => elementwise::add(&prev, &ig)?,
                });
            }
        }
        Ok(grads)
    }
}

/// The backward of a convolution of x by weight (+ bias): (dx, dweight, dbias), no dx for an
/// input that needs no gradient (the images into the first convolution); given x's gradient so
/// far (`acc`), dx is added to it (`conv2d::conv2d_backward_adding`).
fn conv_backward(
    x: &Var,
    weight: &Var,
    has_bias: bool,
    spec: ConvSpec,
    saved: Option<conv2d::SavedPlanes>,
) -> impl Fn(&Tensor, Option<Tensor>) -> Result<Vec<Option<Tensor>>> + 'static {
    let (xv, wv, want_dx) = (x.value.clone(), weight.value.clone(), x.requires_grad());
    move |g, acc| {
        let saved = saved.as_ref();
        let (dx, dw, db) = match acc {
            Some(acc) => {
                let (dx, dw, db) = conv2d::conv2d_backward_adding(&xv, &wv, g, spec, acc, saved)?;
                (Some(dx), dw, db)
            }
            None if want_dx => {
                let (dx, dw, db) = conv2d::conv2d_backward(&xv, &wv, g, spec, saved)?;
                (Some(dx), dw, db)
            }
            None => {
                let (dw, db) = conv2d::conv2d_weight_backward(&xv, &wv, g, spec, saved)?;
                (None, dw, db)
            }
        };
        let mut grads = vec![dx, Some(dw)];
        if has_bias {
            grads.push(Some(db));
        }
        Ok(grads)
    }
}

/// The result of [`Tape::backward`].
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        v.id.and_then(|i| self.grads[i].as_ref())
    }
}

/// The differentiable operations. Each computes its forward with the
/// engine's kernels and records how to send gradients back.
impl Tape {
    /// `op(a) · op(b) (+ bias per column)`; see `kernels::matmul::matmul`.
    pub fn matmul(&self, a: &Var, b: &Var, trans_a: bool, trans_b: bool, bias: Option<&Var>) -> Result<Var> {
        let out = matmul::matmul(&a.value, &b.value, trans_a, trans_b, bias.map(|b| &b.value))?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        let b_shared = bv.rank() == 2 && av.rank() == 3;
        let has_bias = bias.is_some();
        let mut inputs = vec![a, b];
        if let Some(bias) = bias {
            inputs.push(bias);
        }
        Ok(self.record(&inputs, out, move |g| {
            // C = op(A) op(B): dop(A) = G op(B)ᵀ, dop(B) = op(A)ᵀ G.
            let dop_a = matmul::matmul(g, &bv, false, !trans_b, None)?;
            let da = if trans_a { copy::transpose(&dop_a)? } else { dop_a };
            let db = if b_shared {
                // One B for the whole batch: per-batch gradients summed over the batch.
                let per = if trans_b {
                    matmul::matmul(g, &av, true, trans_a, None)?
                } else {
                    matmul::matmul(&av, g, !trans_a, false, None)?
                };
                reduce::sum_dim(&per, 0)?
            } else if trans_b {
                matmul::matmul(g, &av, true, trans_a, None)?
            } else {
                matmul::matmul(&av, g, !trans_a, false, None)?
            };
            let mut out = vec![Some(da), Some(db)];
            if has_bias {
                let n = g.dim(-1);
                out.push(Some(reduce::sum_dim(&g.reshape(&[g.numel() / n, n])?, 0)?));
            }
            Ok(out)
        }))
    }

    /// 2-D convolution (+ bias); see `kernels::conv2d`.
    pub fn conv2d(&self, x: &Var, weight: &Var, bias: Option<&Var>, spec: ConvSpec) -> Result<Var> {
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        // The input's planes, where the forward packs them, are the weight gradient's too.
        let mut saved = None;
        let keep = self.records(&inputs).then_some(&mut saved);
        let path = self.conv_path(&inputs);
        let out = conv2d::conv2d_saving(&x.value, &weight.value, bias.map(|b| &b.value), spec, path, keep)?;
        let backward = conv_backward(x, weight, bias.is_some(), spec, saved);
        // x's gradient so far (other ops read x) folds into dx where the backward can add it.
        Ok(self.record_folding(&inputs, out, move |g, prior| backward(g, prior[0].take())))
    }

    /// `conv2d(x) + residual` (a ResnetBlock's x + conv2(h)): the add made as the convolution's
    /// output is written where its path allows (`conv2d::conv2d_add_with`), sparing an add pass;
    /// the residual's gradient is the output's.
    pub fn conv2d_add(&self, x: &Var, weight: &Var, bias: Option<&Var>, spec: ConvSpec, residual: &Var) -> Result<Var> {
        let mut inputs = vec![x, weight];
        inputs.extend(bias);
        let path = self.conv_path(&inputs);
        inputs.push(residual);
        let mut saved = None;
        let keep = self.records(&inputs).then_some(&mut saved);
        let (xv, wv, bv) = (&x.value, &weight.value, bias.map(|b| &b.value));
        let out = conv2d::conv2d_add_with(xv, wv, bv, spec, path, &residual.value, keep)?;
        let backward = conv_backward(x, weight, bias.is_some(), spec, saved);
        Ok(self.record(&inputs, out, move |g| {
            let mut grads = backward(g, None)?;
            grads.push(Some(g.clone()));
            Ok(grads)
        }))
    }

    /// The path of a convolution on `inputs`: training's take the channel-packed path where
    /// the tuning says so (see `Tuning::conv_channel_packed`); inference keeps the paths
    /// measured for it.
    fn conv_path(&self, inputs: &[&Var]) -> conv2d::ConvPath {
        match self.records(inputs) && inputs[0].value.gpu.tuning.conv_channel_packed {
            true => conv2d::ConvPath::ChannelPacked,
            false => conv2d::ConvPath::Best,
        }
    }

    /// Fused multi-head attention over [B, T, C] (see `kernels::attention::multi_head`).
    pub fn attention(&self, q: &Var, k: &Var, v: &Var, heads: usize, causal: bool) -> Result<Var> {
        let out = attention::multi_head(&q.value, &k.value, &v.value, heads, causal)?;
        let y = out.out.clone();
        let (qv, kv, vv) = (q.value.clone(), k.value.clone(), v.value.clone());
        Ok(self.record(&[q, k, v], y, move |g| {
            let (dq, dk, dv) = attention::multi_head_backward(&qv, &kv, &vv, &out, g, heads, causal)?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        }))
    }

    /// The AttnBlock's single-head attention over positions, from q, k and v of `channels`
    /// each stacked in one [B, 3C, N] (see `kernels::attention::spatial_qkv`); out [B, C, N].
    pub fn spatial_attention(&self, qkv: &Var, channels: usize) -> Result<Var> {
        let (out, w) = attention::spatial_qkv(&qkv.value, channels)?;
        let x = qkv.value.clone();
        Ok(self.record(&[qkv], out, move |g| Ok(vec![Some(attention::spatial_qkv_backward(&x, &w, g, channels)?)])))
    }

    /// Nearest x2 upsampling of [B, C, H, W].
    pub fn upsample2x(&self, x: &Var) -> Result<Var> {
        let out = resample::upsample2x(&x.value)?;
        Ok(self.record(&[x], out, move |g| Ok(vec![Some(resample::upsample2x_backward(g)?)])))
    }

    /// Zero padding (top, left, bottom, right) of [B, C, H, W].
    pub fn pad(&self, x: &Var, p: [usize; 4]) -> Result<Var> {
        let out = resample::pad(&x.value, p)?;
        let (h, w) = (x.value.dim(2), x.value.dim(3));
        Ok(self.record(&[x], out, move |g| Ok(vec![Some(resample::pad_backward(g, p, h, w)?)])))
    }

    /// 2x2 max pooling, stride 2.
    pub fn maxpool2x2(&self, x: &Var) -> Result<Var> {
        let out = resample::maxpool2x2(&x.value)?;
        let xv = x.value.clone();
        Ok(self.record(&[x], out, move |g| Ok(vec![Some(resample::maxpool2x2_backward(&xv, g)?)])))
    }

    /// a [outer, mid, inner] * b [outer, inner], b broadcast over the middle dimension.
    pub fn mul_mid(&self, a: &Var, b: &Var, mid: usize, inner: usize) -> Result<Var> {
        let out = elementwise::binary_mid(&a.value, &b.value, Binary::Mul, mid, inner)?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        Ok(self.record(&[a, b], out, move |g| {
            let da = elementwise::binary_mid(g, &bv, Binary::Mul, mid, inner)?;
            let outer = av.numel() / (mid * inner);
            let ga = elementwise::mul(g, &av)?.reshape(&[outer, mid, inner])?;
            let db = reduce::sum_dim(&ga, 1)?.reshape(bv.shape())?;
            Ok(vec![Some(da), Some(db)])
        }))
    }

    /// a [outer, C, inner] * b [C], per channel.
    pub fn mul_channel(&self, a: &Var, b: &Var, inner: usize) -> Result<Var> {
        let out = elementwise::binary_broadcast(&a.value, &b.value, Binary::Mul, inner)?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        let c = bv.numel();
        Ok(self.record(&[a, b], out, move |g| {
            let da = elementwise::binary_broadcast(g, &bv, Binary::Mul, inner)?;
            let outer = av.numel() / (c * inner);
            let per = reduce::sum_dim(&elementwise::mul(g, &av)?.reshape(&[outer, c, inner])?, 2)?;
            Ok(vec![Some(da), Some(reduce::sum_dim(&per, 0)?)])
        }))
    }

    /// Sum over dimension `dim` (removed from the shape).
    pub fn sum_dim(&self, x: &Var, dim: usize) -> Result<Var> {
        let out = reduce::sum_dim(&x.value, dim)?;
        let shape = x.value.shape().to_vec();
        Ok(self.record(&[x], out, move |g| {
            let (_, mid, inner) = copy::around(&shape, dim);
            Ok(vec![Some(elementwise::broadcast_mid(g, &shape, mid, inner)?)])
        }))
    }

    /// alpha * a + beta * b (same shapes).
    pub fn add_scaled(&self, a: &Var, b: &Var, alpha: f32, beta: f32) -> Result<Var> {
        let out = elementwise::binary(&a.value, &b.value, Binary::AddScaled(alpha, beta))?;
        Ok(self.record(&[a, b], out, move |g| {
            // A coefficient of 1 passes g on as it is (a residual add's two branches share it):
            // no pass over the tensor.
            let times = |s: f32| if s == 1.0 { Ok(g.clone()) } else { elementwise::scale(g, s) };
            Ok(vec![Some(times(alpha)?), Some(times(beta)?)])
        }))
    }

    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        self.add_scaled(a, b, 1.0, 1.0)
    }

    /// a + b broadcast per channel: b [C] over a [outer, C, inner].
    pub fn add_channel(&self, a: &Var, b: &Var, inner: usize) -> Result<Var> {
        let out = elementwise::binary_broadcast(&a.value, &b.value, Binary::AddScaled(1.0, 1.0), inner)?;
        let c = b.value.numel();
        Ok(self.record(&[a, b], out, move |g| Ok(vec![Some(g.clone()), Some(reduce::channel_sums(g, c, inner)?)])))
    }

    /// Elementwise product (same shapes).
    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        let out = elementwise::mul(&a.value, &b.value)?;
        let (av, bv) = (a.value.clone(), b.value.clone());
        Ok(self
            .record(&[a, b], out, move |g| Ok(vec![Some(elementwise::mul(g, &bv)?), Some(elementwise::mul(g, &av)?)])))
    }

    pub fn scale(&self, a: &Var, s: f32) -> Result<Var> {
        self.unary(a, Unary::Affine(s, 0.0))
    }

    /// Activations and other elementwise maps.
    pub fn unary(&self, x: &Var, op: Unary) -> Result<Var> {
        let out = elementwise::unary(&x.value, op)?;
        let xv = x.value.clone();
        Ok(self.record(&[x], out, move |g| Ok(vec![Some(elementwise::unary_backward(&xv, g, op)?)])))
    }

    /// Sum, mean or mean |x| of the whole tensor, as a one-element tensor.
    pub fn reduce(&self, x: &Var, what: Reduce) -> Result<Var> {
        let out = reduce::reduce(&x.value, what)?;
        let xv = x.value.clone();
        let n = xv.numel() as f32;
        Ok(self.record(&[x], out, move |g| {
            let dx = match what {
                Reduce::Sum => elementwise::fill_like(xv.shape(), g, 1.0)?,
                Reduce::Mean => elementwise::fill_like(xv.shape(), g, 1.0 / n)?,
                Reduce::MeanAbs => {
                    elementwise::unary_backward(&xv, &elementwise::fill_like(xv.shape(), g, 1.0 / n)?, Unary::Abs)?
                }
                Reduce::SumSquares => elementwise::mul(&elementwise::fill_like(xv.shape(), g, 2.0)?, &xv)?,
                Reduce::L2Norm => bail!("backward of the L2 norm is not implemented; use SumSquares"),
            };
            Ok(vec![Some(dx)])
        }))
    }

    /// Inverted dropout: each element zeroed with probability p, the others scaled by 1/(1-p);
    /// the mask drawn on the host from `rng` (one number per element, in order), so a run with
    /// the same generator drops the same elements. p = 0 is the identity.
    pub fn dropout(&self, x: &Var, p: f32, rng: &mut crate::engine::Rng) -> Result<Var> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        if p >= 1.0 {
            anyhow::bail!("dropout probability {p} must be below 1");
        }
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.value.numel()).map(|_| if rng.next_f64() < p as f64 { 0.0 } else { keep }).collect();
        self.mul(x, &self.constant(Tensor::from_f32(&x.value.gpu, &mask, x.shape())?))
    }

    /// softmax(scale * x) over the last dimension.
    pub fn softmax(&self, x: &Var, scale: f32) -> Result<Var> {
        let y = softmax::softmax(&x.value, scale)?;
        let yv = y.clone();
        Ok(self.record(&[x], y, move |g| Ok(vec![Some(softmax::softmax_backward(&yv, g, scale)?)])))
    }

    /// VectorQuantizer2's codebook loss, mean((sg(zq) - z)^2) + beta mean((zq - sg(z))^2), as one
    /// op: the two means are of the same values, so the forward takes one difference, square and
    /// mean (loss = m + beta m, the reference's sum), and the backward two scaled copies of the
    /// difference, where the composed ops took eleven dispatches forward and about as many back.
    pub fn codebook_loss(&self, z: &Var, zq: &Var, beta: f32) -> Result<Var> {
        zq.value.expect_shape("codebook loss z_q (the shape of z)", z.value.shape())?;
        let d = elementwise::binary(&zq.value, &z.value, Binary::AddScaled(1.0, -1.0))?;
        let m = reduce::reduce(&elementwise::mul(&d, &d)?, Reduce::Mean)?;
        let loss = elementwise::binary(&m, &m, Binary::AddScaled(1.0, beta))?;
        let n = d.numel() as f32;
        Ok(self.record(&[z, zq], loss, move |g| {
            // d/dz of the first mean (zq held): -2 (zq - z) / n; d/dzq of the second: 2 beta (zq - z) / n.
            let dz = elementwise::mul(&elementwise::fill_like(d.shape(), g, -2.0 / n)?, &d)?;
            let dzq = elementwise::mul(&elementwise::fill_like(d.shape(), g, 2.0 * beta / n)?, &d)?;
            Ok(vec![Some(dz), Some(dzq)])
        }))
    }

    /// Each row (last dimension) over its l2 norm (see `kernels::softmax::l2_normalize_rows`).
    pub fn l2_normalize_rows(&self, x: &Var) -> Result<Var> {
        let y = softmax::l2_normalize_rows(&x.value)?;
        let xv = x.value.clone();
        Ok(self.record(&[x], y, move |g| Ok(vec![Some(softmax::l2_normalize_rows_backward(&xv, g)?)])))
    }

    /// Mean cross-entropy over the rows whose target is not `IGNORE`.
    pub fn cross_entropy(&self, logits: &Var, targets: &[u32]) -> Result<Var> {
        let gpu = logits.value.gpu.clone();
        let tt = Tensor::from_u32(&gpu, targets, &[targets.len()])?;
        let ce = cross_entropy::cross_entropy(&logits.value, &tt)?;
        let counted = targets.iter().filter(|&&t| t != cross_entropy::IGNORE).count().max(1) as f32;
        let loss = elementwise::scale(&reduce::reduce(&ce.loss, Reduce::Sum)?, 1.0 / counted)?;
        let (lv, lse) = (logits.value.clone(), ce.lse);
        Ok(self.record(&[logits], loss, move |g| {
            let dloss = elementwise::fill_like(&[tt.numel()], g, 1.0 / counted)?;
            Ok(vec![Some(cross_entropy::cross_entropy_backward(&lv, &tt, &lse, &dloss)?)])
        }))
    }

    /// Group, layer or batch norm with batch statistics and affine weights.
    pub fn norm(&self, x: &Var, kind: NormKind, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        let out = norm::norm(&x.value, kind, &gamma.value, &beta.value, eps, false)?;
        let (xv, gv, st, xf) = (x.value.clone(), gamma.value.clone(), out.stats, out.x_flat);
        Ok(self.record_folding(&[x, gamma, beta], out.y, move |g, prior| {
            let (dx, dg, db) = match prior[0].take() {
                Some(acc) => norm::backward_adding(&xv, g, &st, &gv, None, kind, acc, xf.as_ref())?,
                None => norm::norm_backward(&xv, g, &st, &gv, kind, xf.as_ref())?,
            };
            Ok(vec![Some(dx), Some(dg), Some(db)])
        }))
    }

    /// `norm` then swish in one kernel; the backward recomputes the pre-activation from x and
    /// the statistics (`norm::norm_swish_backward`), so no tensor before the swish is kept.
    pub fn norm_swish(&self, x: &Var, kind: NormKind, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        let out = norm::norm(&x.value, kind, &gamma.value, &beta.value, eps, true)?;
        if !self.records(&[x, gamma, beta]) {
            return Ok(self.constant(out.y));
        }
        let (xv, gv, bv, st, xf) = (x.value.clone(), gamma.value.clone(), beta.value.clone(), out.stats, out.x_flat);
        Ok(self.record_folding(&[x, gamma, beta], out.y, move |g, prior| {
            let (dx, dg, db) = match prior[0].take() {
                Some(acc) => norm::backward_adding(&xv, g, &st, &gv, Some((&bv, eps)), kind, acc, xf.as_ref())?,
                None => norm::norm_swish_backward(&xv, g, &st, &gv, &bv, kind, eps, xf.as_ref())?,
            };
            Ok(vec![Some(dx), Some(dg), Some(db)])
        }))
    }

    /// Rows of `table` picked by `ids`.
    pub fn embedding(&self, table: &Var, ids: &[u32]) -> Result<Var> {
        self.embedding_of(table, &embedding::ids_on_device(&table.value, ids)?)
    }

    /// `embedding` by ids [N] already on the device (a quantizer's picks, in range by
    /// construction), which are not read back.
    pub fn embedding_of(&self, table: &Var, ids: &Tensor) -> Result<Var> {
        let out = embedding::embedding_gpu(&table.value, ids)?;
        let (rows, idt) = (table.value.dim(0), ids.clone());
        Ok(self.record(&[table], out, move |g| Ok(vec![Some(embedding::embedding_backward(&idt, g, rows)?)])))
    }

    /// Same data, another shape.
    pub fn reshape(&self, x: &Var, shape: &[usize]) -> Result<Var> {
        let out = x.value.reshape(shape)?;
        let orig = x.value.shape().to_vec();
        Ok(self.record(&[x], out, move |g| Ok(vec![Some(g.reshape(&orig)?)])))
    }

    /// Swap the last two dimensions.
    pub fn transpose(&self, x: &Var) -> Result<Var> {
        let out = copy::transpose(&x.value)?;
        Ok(self.record(&[x], out, move |g| Ok(vec![Some(copy::transpose(g)?)])))
    }

    /// `x[.., start..start+len, ..]` along `dim`.
    pub fn slice(&self, x: &Var, dim: usize, start: usize, len: usize) -> Result<Var> {
        let out = copy::slice(&x.value, dim, start, len)?;
        let shape = x.value.shape().to_vec();
        Ok(self.record(&[x], out, move |g| {
            // Gradient: g placed back at its offset, zeros elsewhere.
            let gpu = &g.gpu;
            let mut parts = Vec::new();
            let mut before = shape.clone();
            before[dim] = start;
            let mut after = shape.clone();
            after[dim] = shape[dim] - start - len;
            let zb = Tensor::zeros(gpu, &before)?;
            let za = Tensor::zeros(gpu, &after)?;
            if start > 0 {
                parts.push(&zb);
            }
            parts.push(g);
            if after[dim] > 0 {
                parts.push(&za);
            }
            Ok(vec![Some(copy::concat(&parts, dim)?)])
        }))
    }

    /// Concatenation along `dim`.
    pub fn concat(&self, parts: &[&Var], dim: usize) -> Result<Var> {
        let values: Vec<&Tensor> = parts.iter().map(|v| &v.value).collect();
        let out = copy::concat(&values, dim)?;
        let sizes: Vec<usize> = values.iter().map(|t| t.dim(dim as isize)).collect();
        Ok(self.record(parts, out, move |g| {
            let mut at = 0;
            let mut grads = Vec::new();
            for &s in &sizes {
                grads.push(Some(copy::slice(g, dim, at, s)?));
                at += s;
            }
            Ok(grads)
        }))
    }
}
