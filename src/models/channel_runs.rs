//! Activations larger than one device buffer, held as runs of channels (inference only).
//!
//! A 2048² image through the ImageNet f16 VQGAN has 128-channel activations of 2 GiB at full
//! resolution, one byte over lavapipe's largest buffer (2047 MiB); real GPUs cap buffers too. The
//! kernels already bind a tensor larger than one storage binding a window at a time, but a tensor
//! must still live in one buffer. So where a module's output would not fit one, the Encoder and
//! Decoder hold it as several tensors, each a run of whole channels (`Runs`), and run the module
//! run by run:
//!
//! - 3×3 convolutions (where Winograd applies) read every input run into each piece's band and
//!   write each output run a window at a time (`winograd::conv3x3_runs`): the numbers of whole
//!   tensors. Elsewhere a convolution's output channels are independent, so each output run is its
//!   own convolution with those rows of the weight; over an input held in runs, each input run
//!   adds its part, `y = Σ_i conv(x_i, W[o, i]) (+ bias once)`, the previous sum passed as the
//!   next's residual. That sum's order differs from one convolution's, so results agree within
//!   the convolutions' tolerance, not bit for bit;
//! - GroupNorm(32)'s groups are runs of C/32 channels, and the runs here are whole groups (their
//!   count divides 32), so each run's statistics are its own groups': the same numbers;
//! - nearest upsampling is per channel.
//!
//! The global attention of the mid-level never meets such tensors in the reference's configs (it
//! runs on the latent grid); an attention block whose input needs runs is refused with an error.
//! Training at such sizes is refused too (the tape records whole tensors).

use anyhow::{bail, Result};

use crate::engine::kernels::conv2d::{self, ConvSpec, NormSwish};
use crate::engine::kernels::norm::{self, NormKind};
use crate::engine::kernels::{copy, elementwise, resample, winograd};
use crate::engine::pool::size_class;
use crate::engine::{DType, Gpu, Tensor};

/// GroupNorm's group count (`Normalize`) and epsilon.
const GROUPS: usize = 32;
const EPS: f32 = 1e-6;

/// An NCHW activation as runs of channels: (first channel, tensor [B, run, H, W]) in order.
pub struct Runs {
    pub runs: Vec<(usize, Tensor)>,
}

impl Runs {
    /// A tensor that fits one buffer: one run.
    pub fn whole(t: Tensor) -> Runs {
        Runs { runs: vec![(0, t)] }
    }

    /// [B, C, H, W] of the whole activation.
    pub fn shape(&self) -> [usize; 4] {
        let t = &self.runs[0].1;
        [t.dim(0), self.runs.iter().map(|(_, r)| r.dim(1)).sum(), t.dim(2), t.dim(3)]
    }

    /// The one tensor, where the activation is one run.
    pub fn into_whole(mut self) -> Option<Tensor> {
        (self.runs.len() == 1).then(|| self.runs.pop().expect("one run").1)
    }

    /// Channels first .. first + count, which must lie within one run (the runs of a larger
    /// tensor nest in those of a smaller one: both counts are powers of two).
    fn channel_slice(&self, first: usize, count: usize) -> Result<Tensor> {
        let Some((c0, t)) = self.runs.iter().rev().find(|(c0, _)| *c0 <= first) else {
            bail!("channels {first}.. are outside the activation's runs");
        };
        let (b, run, h, w) = (t.dim(0), t.dim(1), t.dim(2), t.dim(3));
        if first + count > c0 + run {
            bail!("channels {first}..{} cross a run boundary ({c0}..{})", first + count, c0 + run);
        }
        if count == run {
            return Ok(t.clone());
        }
        channel_slice(t, first - c0, count, [b, run, h, w])
    }
}

/// Channels first .. first + count of x [B, C, H, W], by buffer copies (one per image), which
/// have no binding limit.
fn channel_slice(x: &Tensor, first: usize, count: usize, [b, c, h, w]: [usize; 4]) -> Result<Tensor> {
    let out = Tensor::empty(&x.gpu, &[b, count, h, w], DType::F32)?;
    let plane = (h * w * 4) as u64;
    for i in 0..b {
        let src = ((i * c + first) as u64) * plane;
        let dst = ((i * count) as u64) * plane;
        x.gpu.copy(x.buffer(), src, out.buffer(), dst, count as u64 * plane);
    }
    Ok(out)
}

/// Whether a [b, c, h, w] f32 activation fits one buffer of this device.
pub fn fits(gpu: &Gpu, [b, c, h, w]: [usize; 4]) -> bool {
    size_class((b * c * h * w * 4) as u64) <= gpu.max_buffer()
}

/// The runs (first, count) a [b, c, h, w] activation is held in: the fewest equal runs that each
/// fit one buffer, their count a power of two that divides `c` (and 32, so each run is whole
/// norm groups, where c is a multiple of 32).
pub fn runs_for(gpu: &Gpu, [b, c, h, w]: [usize; 4]) -> Result<Vec<(usize, usize)>> {
    let mut n = 1;
    while !fits(gpu, [b, c / n, h, w]) {
        n *= 2;
        if !c.is_multiple_of(n) || (c.is_multiple_of(GROUPS) && n > GROUPS) {
            bail!(
                "a [{b}, {c}, {h}, {w}] activation ({} bytes) cannot be split into runs of channels that each fit this \
                 device's largest buffer ({} bytes)",
                b * c * h * w * 4,
                gpu.max_buffer()
            );
        }
    }
    Ok((0..n).map(|i| (i * c / n, c / n)).collect())
}

/// A GroupNorm(32) + swish applied to a convolution's input: its weight and bias [C].
pub struct Norm<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
}

/// `conv(swish(norm(x)))` or `conv(x)` (+ bias) (+ residual) over x held in runs, the output in
/// the runs its size needs (a residual must be held in those runs).
pub fn conv(
    x: &Runs,
    norm: Option<Norm>,
    weight: &Tensor,
    bias: &Tensor,
    spec: ConvSpec,
    residual: Option<&Runs>,
) -> Result<Runs> {
    let [b, cin, h, w] = x.shape();
    let (cout, kh, kw) = (weight.dim(0), weight.dim(2), weight.dim(3));
    if weight.dim(1) != cin {
        bail!("conv2d: weight {:?} does not fit an input of {cin} channels", weight.shape());
    }
    let Some((ho, wo)) = spec.out_size(h, w, kh, kw) else {
        bail!("conv2d: a {kh}x{kw} kernel does not fit a {h}x{w} input");
    };
    let gpu = &x.runs[0].1.gpu;
    let out_runs = runs_for(gpu, [b, cout, ho, wo])?;
    if let Some(r) = residual {
        let theirs: Vec<(usize, usize)> = r.runs.iter().map(|(c0, t)| (*c0, t.dim(1))).collect();
        if theirs != out_runs || r.shape() != [b, cout, ho, wo] {
            bail!("conv2d: a residual {:?} in runs {theirs:?} does not fit the output's runs {out_runs:?}", r.shape());
        }
    }
    if winograd::applies_to(gpu, [b, cin, h, w], weight, spec) && winograd::pays_off_at(h, w) {
        return conv_by_winograd(x, norm, weight, bias, residual, [b, cout, ho, wo], &out_runs);
    }
    // Each input run's statistics, norm parameters and groups, computed once for all output runs.
    let mut inputs = Vec::new();
    for (c0, xi) in &x.runs {
        let ci = xi.dim(1);
        let pre = match &norm {
            Some(n) => {
                let (_, groups, stats) = run_statistics(cin, *c0, xi)?;
                Some((stats, slice_rows(n.gamma, *c0, ci)?, slice_rows(n.beta, *c0, ci)?, groups))
            }
            None => None,
        };
        inputs.push((*c0, xi, pre));
    }
    let mut out = Vec::new();
    for (o0, oc) in out_runs {
        let w_o = slice_rows(weight, o0, oc)?;
        let b_o = slice_rows(bias, o0, oc)?;
        let mut acc = residual.map(|r| r.runs.iter().find(|(c0, _)| *c0 == o0).expect("matching runs").1.clone());
        for (i, (c0, xi, pre)) in inputs.iter().enumerate() {
            let wi = if xi.dim(1) == cin { w_o.clone() } else { copy::slice(&w_o, 1, *c0, xi.dim(1))? };
            let bi = (i == 0).then_some(&b_o);
            let y = match pre {
                Some((stats, gamma, beta, groups)) => {
                    let pre = NormSwish { stats, gamma, beta, groups: *groups };
                    if conv2d::fuses_norm_swish(xi, &wi, spec) {
                        match &acc {
                            Some(r) => conv2d::conv2d_after_norm_swish_add(xi, &pre, &wi, bi, spec, r)?,
                            None => conv2d::conv2d_after_norm_swish(xi, &pre, &wi, bi, spec)?,
                        }
                    } else {
                        let kind = NormKind::Group { groups: *groups };
                        let hi = norm::norm(xi, kind, gamma, beta, EPS, true)?.y;
                        add_to(acc.as_ref(), conv2d::conv2d(&hi, &wi, bi, spec)?)?
                    }
                }
                None => add_to(acc.as_ref(), conv2d::conv2d(xi, &wi, bi, spec)?)?,
            };
            acc = Some(y);
        }
        out.push((o0, acc.expect("at least one input run")));
    }
    Ok(Runs { runs: out })
}

/// `conv` by Winograd over all the runs at once (`winograd::conv3x3_runs`): the products see every
/// input channel, so the numbers are those of whole tensors, and K stays the whole channel count
/// (on lavapipe the products' cost per multiply-add grows as K shrinks; 2048² reconstruct took
/// 2,915 s with every convolution summing its runs' parts, 1,804 s with this).
fn conv_by_winograd(
    x: &Runs,
    norm: Option<Norm>,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Runs>,
    [b, _, ho, wo]: [usize; 4],
    out_runs: &[(usize, usize)],
) -> Result<Runs> {
    let gpu = &x.runs[0].1.gpu;
    let outs =
        out_runs.iter().map(|&(_, n)| Tensor::empty(gpu, &[b, n, ho, wo], DType::F32)).collect::<Result<Vec<_>>>()?;
    let stats = norm.as_ref().map(|_| statistics(x)).transpose()?;
    let pre =
        norm.zip(stats.as_ref()).map(|(n, stats)| NormSwish { stats, gamma: n.gamma, beta: n.beta, groups: GROUPS });
    let xs: Vec<&Tensor> = x.runs.iter().map(|(_, t)| t).collect();
    let residuals: Option<Vec<&Tensor>> = residual.map(|r| r.runs.iter().map(|(_, t)| t).collect());
    let out_refs: Vec<&Tensor> = outs.iter().collect();
    winograd::conv3x3_runs(&xs, pre.as_ref(), weight, Some(bias), residuals.as_deref(), &out_refs)?;
    Ok(Runs { runs: out_runs.iter().map(|r| r.0).zip(outs).collect() })
}

/// GroupNorm(32)'s statistics of an activation held in runs, as those of the whole tensor
/// ([B * 32, 2], image by image): each run's own groups' statistics, gathered by buffer copies.
fn statistics(x: &Runs) -> Result<Tensor> {
    let [b, c, _, _] = x.shape();
    let gpu = &x.runs[0].1.gpu;
    let all = Tensor::empty(gpu, &[b * GROUPS, 2], DType::F32)?;
    for (c0, t) in &x.runs {
        let (g0, groups, stats) = run_statistics(c, *c0, t)?;
        for i in 0..b {
            let (src, dst) = ((i * groups * 8) as u64, ((i * GROUPS + g0) * 8) as u64);
            gpu.copy(stats.buffer(), src, all.buffer(), dst, (groups * 8) as u64);
        }
    }
    Ok(all)
}

/// GroupNorm(32)'s statistics of the run `t` (from channel `c0`) of a `c`-channel activation: its
/// own groups' (first group, groups, [B * groups, 2]).
fn run_statistics(c: usize, c0: usize, t: &Tensor) -> Result<(usize, usize, Tensor)> {
    let ci = t.dim(1);
    if !c.is_multiple_of(GROUPS) || !ci.is_multiple_of(c / GROUPS) || !c0.is_multiple_of(c / GROUPS) {
        bail!("group norm: {c} channels in runs of {ci} are not whole groups of {}", c / GROUPS);
    }
    let groups = ci / (c / GROUPS);
    Ok((c0 / (c / GROUPS), groups, norm::statistics(t, NormKind::Group { groups }, EPS)?))
}

/// `acc + y`, or y where there is nothing to add to.
fn add_to(acc: Option<&Tensor>, y: Tensor) -> Result<Tensor> {
    match acc {
        Some(r) => elementwise::add(r, &y),
        None => Ok(y),
    }
}

/// Rows first .. first + count of a weight [C, ...] or bias [C] (the whole tensor where they are all).
fn slice_rows(t: &Tensor, first: usize, count: usize) -> Result<Tensor> {
    if first == 0 && count == t.dim(0) {
        Ok(t.clone())
    } else {
        copy::slice(t, 0, first, count)
    }
}

/// Nearest ×2 upsampling of an activation held in runs, into the runs its output needs.
pub fn upsample2x(x: &Runs) -> Result<Runs> {
    let [b, c, h, w] = x.shape();
    let gpu = &x.runs[0].1.gpu;
    let mut out = Vec::new();
    for (o0, oc) in runs_for(gpu, [b, c, 2 * h, 2 * w])? {
        out.push((o0, resample::upsample2x(&x.channel_slice(o0, oc)?)?));
    }
    Ok(Runs { runs: out })
}
