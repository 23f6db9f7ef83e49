//! Elementwise maps (`shaders/elementwise.wgsl`).
//!
//! Maps over tensors larger than one storage binding (128 MiB on lavapipe) split the work at
//! binding boundaries (a broadcast over such a tensor is an error). Where spans allow, same-shape
//! and per-channel arithmetic runs four values per invocation (`binary4`): a buffer load with a
//! per-lane address runs lane by lane on lavapipe, so a vec4 load costs about what one float does
//! (residual adds 2.5 → 1.9 ms on lavapipe, llvmpipe, Mesa 22.3.6, a 2-core VM; see `kernels::norm`
//! for the other vec4 entries).

use anyhow::{bail, Result};

use super::{grid_1d, u32_of};
use crate::engine::device::{Binding, Res};
use crate::engine::tensor::{DType, Tensor};

crate::kernel_params!(
    /// `shaders/elementwise.wgsl`'s `Params`: n invocations, the op code,
    /// b's index (i / b_inner) % b_len (for the `*_mid` entries b_len is the
    /// middle dimension), and the op's alpha and beta.
    ElementwiseParams in "elementwise" as "Params" {
        n: u32, op: u32, b_inner: u32, b_len: u32,
        alpha: f32, beta: f32, i0: u32, _pad1: u32,
    }
);

fn params(n: usize, op: u32, b_inner: usize, b_len: usize, alpha: f32, beta: f32) -> Result<ElementwiseParams> {
    Ok(ElementwiseParams {
        n: u32_of("elements", n)?,
        op,
        b_inner: u32_of("inner", b_inner)?,
        b_len: u32_of("broadcast length", b_len)?,
        alpha,
        beta,
        ..Default::default()
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Swish,
    /// Exact (erf) GELU, as `torch.nn.GELU()`.
    Gelu,
    LeakyRelu(f32),
    Sigmoid,
    /// alpha * x + beta
    Affine(f32, f32),
    Relu,
    Exp,
    Abs,
    Sqrt,
    /// 1 / x
    Recip,
    /// log(1 + e^x), computed as relu(x) + log(1 + e^-|x|) (no overflow)
    Softplus,
    /// ln x
    Log,
}

impl Unary {
    fn code(self) -> (u32, f32, f32) {
        match self {
            Unary::Swish => (0, 0.0, 0.0),
            Unary::Gelu => (1, 0.0, 0.0),
            Unary::LeakyRelu(s) => (2, s, 0.0),
            Unary::Sigmoid => (3, 0.0, 0.0),
            Unary::Affine(a, b) => (4, a, b),
            Unary::Relu => (5, 0.0, 0.0),
            Unary::Exp => (6, 0.0, 0.0),
            Unary::Abs => (7, 0.0, 0.0),
            Unary::Sqrt => (8, 0.0, 0.0),
            Unary::Recip => (9, 0.0, 0.0),
            Unary::Log => (11, 0.0, 0.0),
            Unary::Softplus => (10, 0.0, 0.0),
        }
    }
}

/// The largest element count one dispatch may bind (storage binding limit).
fn max_elems(t: &Tensor) -> usize {
    (t.gpu.max_binding() / 4) as usize / 256 * 256
}

/// Elements start .. start + len of `t` as a binding.
fn window(t: &Tensor, start: usize, len: usize) -> Binding<'_> {
    super::plane_window(t, 1, (start, len))
}

/// Call `f(start, len)` over `n` elements in pieces that fit one storage binding (multiples of
/// 256 elements, so every piece starts aligned): tensors larger than one binding are processed a
/// piece at a time.
fn in_pieces(t: &Tensor, n: usize, mut f: impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
    let piece = max_elems(t).max(256);
    for start in (0..n).step_by(piece) {
        f(start, piece.min(n - start))?;
    }
    Ok(())
}

/// An elementwise pipeline made for one op code (shaders/elementwise.wgsl: lavapipe would run
/// every case of the switch otherwise).
fn op_const(code: u32) -> [(&'static str, String); 1] {
    [("OP", format!("{code}u"))]
}

pub fn unary(x: &Tensor, op: Unary) -> Result<Tensor> {
    x.expect_dtype("elementwise input", DType::F32)?;
    let out = Tensor::empty(&x.gpu, x.shape(), DType::F32)?;
    let gpu = &x.gpu;
    let (code, a, b) = op.code();
    // Four elements per invocation where the size is a multiple of 4 (buffer accesses run lane
    // by lane on CPU devices).
    let n = x.numel();
    if through_textures("unary4_flat", code, (a, b), [x], &out)? {
        return Ok(out);
    }
    let by4 = n.is_multiple_of(4);
    let pipe = gpu.pipeline("elementwise", if by4 { "unary_vec4" } else { "unary" }, &op_const(code))?;
    in_pieces(x, n, |start, len| {
        let invocations = if by4 { len / 4 } else { len };
        let params = params(invocations, code, 1, 1, a, b)?;
        gpu.dispatch(&pipe, &params, &[window(x, start, len), window(&out, start, len)], grid_1d(gpu, invocations)?)
    })?;
    Ok(out)
}

/// dx = dy * op'(x).
pub fn unary_backward(x: &Tensor, dy: &Tensor, op: Unary) -> Result<Tensor> {
    dy.expect_shape("activation gradient", x.shape())?;
    x.expect_dtype("activation input", DType::F32)?;
    let out = Tensor::empty(&x.gpu, x.shape(), DType::F32)?;
    let gpu = &x.gpu;
    let by4 = x.numel().is_multiple_of(4);
    let (code, a, b) = op.code();
    if through_textures("unary_backward4_flat", code, (a, b), [x, dy], &out)? {
        return Ok(out);
    }
    let entry = if by4 { "unary_backward_vec4" } else { "unary_backward" };
    let pipe = gpu.pipeline("elementwise", entry, &op_const(code))?;
    in_pieces(x, x.numel(), |start, len| {
        let invocations = if by4 { len / 4 } else { len };
        let params = params(invocations, code, 1, 1, a, b)?;
        let bindings = [window(x, start, len), window(&out, start, len), window(dy, start, len)];
        gpu.dispatch(&pipe, &params, &bindings, grid_1d(gpu, invocations)?)
    })?;
    Ok(out)
}

/// A tensor of `shape` filled with `alpha * s[0]` (s has one element, on the GPU).
pub fn fill_like(shape: &[usize], s: &Tensor, alpha: f32) -> Result<Tensor> {
    if s.numel() != 1 {
        bail!("fill_like: expected a one-element tensor, got {:?}", s.shape());
    }
    let out = Tensor::empty(&s.gpu, shape, DType::F32)?;
    let n = out.numel();
    if n == 0 {
        return Ok(out);
    }
    let gpu = &s.gpu;
    let pipe = gpu.pipeline("elementwise", "binary", &[])?;
    // `a` is not read by op 4; bind the output's own storage there would alias, so bind s.
    in_pieces(&out, n, |start, len| {
        let params = params(len, 4, 1, 1, 0.0, alpha)?;
        gpu.dispatch(&pipe, &params, &[s.binding(), window(&out, start, len), s.binding()], grid_1d(gpu, len)?)
    })?;
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Binary {
    /// alpha * a + beta * b
    AddScaled(f32, f32),
    Mul,
    Div,
    Max,
}

impl Binary {
    /// (op code of shaders/elementwise.wgsl `combine`, alpha, beta)
    fn code(self) -> (u32, f32, f32) {
        match self {
            Binary::AddScaled(x, y) => (0, x, y),
            Binary::Mul => (1, 1.0, 1.0),
            Binary::Div => (2, 1.0, 1.0),
            Binary::Max => (3, 1.0, 1.0),
        }
    }
}

/// `a op b`, where b is either a's shape or broadcast: b has `b_len` elements
/// and element i of a pairs with b[(i / b_inner) % b_len] (e.g. a per-channel
/// vector over [B, C, H, W] has b_inner = H*W).
pub fn binary_broadcast(a: &Tensor, b: &Tensor, op: Binary, b_inner: usize) -> Result<Tensor> {
    a.expect_dtype("elementwise input", DType::F32)?;
    b.expect_dtype("elementwise input", DType::F32)?;
    if b.numel() == 0 || b_inner == 0 || !a.numel().is_multiple_of(b.numel() * b_inner) && b.numel() != a.numel() {
        bail!("elementwise: shape {:?} does not broadcast over {:?}", b.shape(), a.shape());
    }
    // b walked in step with a is windowed with it; a broadcast b is bound whole.
    let same = b.numel() == a.numel();
    if !same && b.numel() > max_elems(b) {
        bail!(
            "elementwise: broadcasting {:?}, itself larger than one storage binding, over {:?} is not supported",
            b.shape(),
            a.shape()
        );
    }
    let out = Tensor::empty(&a.gpu, a.shape(), DType::F32)?;
    let gpu = &a.gpu;
    let (code, al, be) = op.code();
    if same && b_inner == 1 && through_textures("binary4_flat", code, (al, be), [a, b], &out)? {
        return Ok(out);
    }
    // Four elements per invocation where a, b and b's runs are whole vec4s.
    let by4 = a.numel().is_multiple_of(4) && b.numel().is_multiple_of(4) && (b_inner == 1 || b_inner.is_multiple_of(4));
    let pipe = if by4 {
        // Made for this op and broadcast (shaders/elementwise.wgsl: no branches or divisions it
        // does not need).
        let consts = [
            ("OP", format!("{code}u")),
            ("B_INNER", format!("{b_inner}u")),
            ("SAME", (same && b_inner == 1).to_string()),
        ];
        gpu.pipeline("elementwise", "binary4", &consts)?
    } else {
        gpu.pipeline("elementwise", "binary", &op_const(code))?
    };
    in_pieces(a, a.numel(), |start, len| {
        let n = if by4 { len / 4 } else { len };
        let (b_len, b_binding) = if same { (len, window(b, start, len)) } else { (b.numel(), b.binding()) };
        let i0 = if same { 0 } else { start };
        let params = ElementwiseParams { i0: u32_of("offset", i0)?, ..params(n, code, b_inner, b_len, al, be)? };
        gpu.dispatch(&pipe, &params, &[window(a, start, len), window(&out, start, len), b_binding], grid_1d(gpu, n)?)
    })?;
    Ok(out)
}

/// `entry` (a `_flat` kernel of op `code` with constants `(alpha, beta)`) over `out`, four values
/// an invocation, its inputs (one or two, each `out`'s size) read through flat textures: copies,
/// then texture fetches, where on lavapipe a buffer load runs a loop over the lanes, each lane's
/// value written to the stack and the vector read back (`Tuning::reads_via_texture` and
/// `Tuning::elementwise_via_texture`; a + b on 4M floats 32.3 -> 11.0 ms on the twentieth
/// session's VM, but 9.8 against 5.5 ms for the buffer reads on the twenty-third's, so off by
/// default). False, doing nothing, where it does not apply.
fn through_textures<const N: usize>(
    entry: &str,
    code: u32,
    (al, be): (f32, f32),
    inputs: [&Tensor; N],
    out: &Tensor,
) -> Result<bool> {
    let gpu = &out.gpu;
    let n = out.numel();
    let tuning = &gpu.tuning;
    let applies = tuning.reads_via_texture && tuning.elementwise_via_texture && n.is_multiple_of(4);
    if !applies || inputs.iter().any(|t| t.numel() != n) {
        return Ok(false);
    }
    let Some(textures) = super::copy::flat_textures_vec4(inputs.map(|t| (t, 0, n)))? else {
        return Ok(false);
    };
    let pipe = gpu.pipeline("elementwise", entry, &op_const(code))?;
    in_pieces(out, n, |start, len| {
        let params = ElementwiseParams { i0: u32_of("offset", start / 4)?, ..params(len / 4, code, 1, len, al, be)? };
        let mut bindings = vec![Res::Tex(&textures[0].view), Res::Buf(window(out, start, len))];
        bindings.extend(textures.get(1).map(|t| Res::Tex(&t.view)));
        gpu.dispatch_res(&pipe, &params, &bindings, grid_1d(gpu, len / 4)?)
    })?;
    Ok(true)
}

/// `a op b` with a [outer, mid, inner] and b [outer, inner] broadcast over
/// the middle dimension (e.g. a per-pixel value over channels).
pub fn binary_mid(a: &Tensor, b: &Tensor, op: Binary, mid: usize, inner: usize) -> Result<Tensor> {
    a.expect_dtype("elementwise input", DType::F32)?;
    b.expect_dtype("elementwise input", DType::F32)?;
    if mid == 0 || inner == 0 || !a.numel().is_multiple_of(mid * inner) || b.numel() * mid != a.numel() {
        bail!("elementwise: {:?} does not broadcast over the middle dimension ({mid}) of {:?}", b.shape(), a.shape());
    }
    let out = Tensor::empty(&a.gpu, a.shape(), DType::F32)?;
    let gpu = &a.gpu;
    let (code, al, be) = op.code();
    let pipe = gpu.pipeline("elementwise", "binary_mid", &op_const(code))?;
    let params = params(a.numel(), code, inner, mid, al, be)?;
    gpu.dispatch(&pipe, &params, &[a.binding(), out.binding(), b.binding()], grid_1d(gpu, a.numel())?)?;
    Ok(out)
}

/// b [outer, inner] repeated `mid` times: [outer, mid, inner] (flattened to `shape`).
pub fn broadcast_mid(b: &Tensor, shape: &[usize], mid: usize, inner: usize) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    if b.numel() * mid != n {
        bail!("broadcast: {:?} repeated {mid} times does not make {:?}", b.shape(), shape);
    }
    let out = Tensor::empty(&b.gpu, shape, DType::F32)?;
    let gpu = &b.gpu;
    let pipe = gpu.pipeline("elementwise", "binary_mid", &[])?;
    let params = params(n, 4, inner, mid, 0.0, 1.0)?;
    gpu.dispatch(&pipe, &params, &[b.binding(), out.binding(), b.binding()], grid_1d(gpu, n)?)?;
    Ok(out)
}

/// Same-shape binary op.
pub fn binary(a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!("elementwise: shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    }
    binary_broadcast(a, b, op, 1)
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, Binary::AddScaled(1.0, 1.0))
}
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, Binary::Mul)
}
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    unary(a, Unary::Affine(s, 0.0))
}

pub mod cpu {
    /// dx = dy * op'(x).
    pub fn unary_backward(x: &[f32], dy: &[f32], op: Unary) -> Vec<f32> {
        x.iter()
            .zip(dy)
            .map(|(&v, &g)| {
                let v = v as f64;
                let sig = 1.0 / (1.0 + (-v).exp());
                let d = match op {
                    Unary::Swish => sig * (1.0 + v * (1.0 - sig)),
                    Unary::Gelu => {
                        0.5 * (1.0 + erf(v / std::f64::consts::SQRT_2))
                            + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()
                    }
                    Unary::LeakyRelu(s) => {
                        if v >= 0.0 {
                            1.0
                        } else {
                            s as f64
                        }
                    }
                    Unary::Sigmoid => sig * (1.0 - sig),
                    Unary::Affine(a, _) => a as f64,
                    Unary::Relu => {
                        if v > 0.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                    Unary::Exp => v.exp(),
                    Unary::Abs => v.signum(),
                    Unary::Sqrt => 0.5 / v.sqrt(),
                    Unary::Recip => -1.0 / (v * v),
                    Unary::Softplus => sig,
                    Unary::Log => 1.0 / v,
                };
                (g as f64 * d) as f32
            })
            .collect()
    }

    use super::{Binary, Unary};

    pub fn erf(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.26 is too coarse for a reference; use a series/continued fraction.
        if x.abs() < 2.5 {
            let mut sum = x;
            let mut term = x;
            let x2 = x * x;
            for n in 1..200 {
                term *= -x2 / n as f64;
                sum += term / (2 * n + 1) as f64;
                if term.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), accurate for |x| >= 2.5.
            let z = x.abs();
            let mut f = z;
            let mut c = z;
            let mut d = 0.0;
            for k in 1..200 {
                let a = k as f64 / 2.0;
                d = z + a * d;
                d = 1.0 / d;
                c = z + a / c;
                let delta = c * d;
                f *= delta;
                if (delta - 1.0).abs() < 1e-16 {
                    break;
                }
            }
            let erfc = (-z * z).exp() / f / std::f64::consts::PI.sqrt();
            x.signum() * (1.0 - erfc)
        }
    }

    pub fn unary(x: &[f32], op: Unary) -> Vec<f32> {
        x.iter()
            .map(|&v| {
                let v = v as f64;
                let sig = 1.0 / (1.0 + (-v).exp());
                (match op {
                    Unary::Swish => v * sig,
                    Unary::Gelu => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
                    Unary::LeakyRelu(s) => {
                        if v >= 0.0 {
                            v
                        } else {
                            s as f64 * v
                        }
                    }
                    Unary::Sigmoid => sig,
                    Unary::Affine(a, b) => a as f64 * v + b as f64,
                    Unary::Relu => v.max(0.0),
                    Unary::Exp => v.exp(),
                    Unary::Abs => v.abs(),
                    Unary::Sqrt => v.sqrt(),
                    Unary::Recip => 1.0 / v,
                    Unary::Softplus => v.max(0.0) + (-v.abs()).exp().ln_1p(),
                    Unary::Log => v.ln(),
                }) as f32
            })
            .collect()
    }

    pub fn binary_broadcast(a: &[f32], b: &[f32], op: Binary, b_inner: usize) -> Vec<f32> {
        a.iter()
            .enumerate()
            .map(|(i, &x)| {
                let y = b[(i / b_inner) % b.len()];
                match op {
                    Binary::AddScaled(al, be) => al * x + be * y,
                    Binary::Mul => x * y,
                    Binary::Div => x / y,
                    Binary::Max => x.max(y),
                }
            })
            .collect()
    }
}
