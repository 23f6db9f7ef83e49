//! Attention: the fused multi-head kernel of the GPT (`shaders/attention.wgsl`)
//! and the single-head spatial attention of the VQGAN's AttnBlock, built
//! from the strided matmul and the row softmax.
//!
//! Multi-head attention is the fused kernel (online softmax, KV-cache-ready query offset; backward
//! in two atomic-free passes) or, where `Tuning::attention_via_matmul` says so (CPU devices:
//! `TAMING_ATTENTION_MATMUL=0|1` overrides), batched matmuls and a masked softmax. Token-by-token
//! decoding uses `KvCache`: split-key attention of one query over a cache of (q, k, v) rows, read on
//! CPU devices through a texture copy (`Tuning::kv_cache_texture`; buffer loads in loops run lane by
//! lane there: attention 2.5 → 1.0 s per 255 tokens on lavapipe; see `models::gpt`).
//!
//! Measured (`bench kernels`, lavapipe: llvmpipe, Mesa 22.3.6, 2 cores; date not recorded): causal
//! attention, 8 heads × 256 tokens × 64: 2.8–3.3 GFLOP/s (20.4–24.4 ms).

use anyhow::{bail, Result};

use crate::engine::device::{Gpu, Res};

use super::matmul::{gemm, gemm_with, Assume, Bias, Causal, Gemm, Operand, Out, Padding};
use super::{grid_for, plane_window, u32_of};
use crate::engine::tensor::{DType, Tensor};

pub struct AttentionOut {
    /// [B, Tq, C]
    pub out: Tensor,
    /// [B, heads, Tq] log-sum-exp of each query's scores (for backward).
    pub lse: Tensor,
}

crate::kernel_params!(
    /// `shaders/attention.wgsl`'s `Params`: strides and offsets in vec4s.
    AttentionParams in "attention" as "Params" {
        b: u32, heads: u32, tq: u32, tk: u32,
        d: u32, causal: u32, scale: f32, q_start: u32,
        q_ld: u32, k_ld: u32, v_ld: u32, o_ld: u32,
        kv_bs: u32, chunks: u32, t0: u32, tasks: u32,
        q_off: u32, k_off: u32, v_off: u32, _pad2: u32,
    }
);

/// Uniform parameters of the attention kernels ([B, T, C] rows; k/v batch
/// stride = `kv_rows` rows, which exceeds tk for a KV cache).
fn kernel_params(
    b: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    c: usize,
    causal: bool,
    kv_rows: usize,
) -> Result<AttentionParams> {
    let d = c / heads;
    let c4 = (c / 4) as u32;
    Ok(AttentionParams {
        b: b as u32,
        heads: heads as u32,
        tq: u32_of("queries", tq)?,
        tk: u32_of("keys", tk)?,
        d: d as u32,
        causal: causal as u32,
        scale: 1.0 / (d as f32).sqrt(),
        q_start: (tk - tq) as u32,
        q_ld: c4,
        k_ld: c4,
        v_ld: c4,
        o_ld: c4,
        kv_bs: u32_of("cache rows", kv_rows)? * c4,
        ..Default::default()
    })
}

/// Multi-head attention over [B, T, C] tensors (heads split along C as in
/// minGPT). `q` has Tq rows, `k`/`v` Tk rows; the queries are the last Tq of
/// the Tk positions (`q_start = Tk - Tq`), so a KV cache works unchanged.
/// Scale 1/sqrt(head_dim); causal mask when `causal`.
pub fn multi_head(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<AttentionOut> {
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        t.expect_dtype(&format!("attention {n}"), DType::F32)?;
        super::expect_rank(&format!("attention {n}"), t, 3)?;
    }
    let (b, tq, c) = (q.dim(0), q.dim(1), q.dim(2));
    let tk = k.dim(1);
    if k.shape() != v.shape() || k.dim(0) != b || k.dim(2) != c {
        bail!("attention: q {:?}, k {:?}, v {:?} do not agree", q.shape(), k.shape(), v.shape());
    }
    if heads == 0 || c % heads != 0 {
        bail!("attention: {heads} heads do not divide {c} channels");
    }
    let d = c / heads;
    if !d.is_multiple_of(4) || d > 128 {
        bail!("attention: head size {d} must be a multiple of 4 and at most 128");
    }
    if tq > tk {
        bail!("attention: {tq} queries but only {tk} keys");
    }
    if use_matmul_path(q, heads, tq, tk)? {
        return multi_head_via_matmul(q, k, v, heads, causal);
    }
    if q.gpu.tuning.attention_tiled {
        return multi_head_tiled(q, k, v, heads, causal);
    }
    multi_head_fused(q, k, v, heads, causal)
}

/// The tiled kernel (`attention_tiled`): a workgroup of 64 queries of one (batch, head) stages
/// each tile of 8 key and value rows in workgroup memory. The same outputs as `multi_head_fused`.
pub fn multi_head_tiled(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<AttentionOut> {
    expect_fused_loops(q, k, heads, "tiled")?;
    let (b, tq, c) = (q.dim(0), q.dim(1), q.dim(2));
    let tk = k.dim(1);
    let gpu = &q.gpu;
    let out = Tensor::empty(gpu, &[b, tq, c], DType::F32)?;
    let lse = Tensor::empty(gpu, &[b, heads, tq], DType::F32)?;
    let pipe = gpu.pipeline("attention", "attention_tiled", &[])?;
    for run @ (_, count) in sequence_runs(gpu, b, &[tq * c, tk * c, heads * tq])? {
        let params = kernel_params(count, heads, tq, tk, c, causal, tk)?;
        let (qs, ks, os) =
            (|t| plane_window(t, tq * c, run), |t| plane_window(t, tk * c, run), |t| plane_window(t, heads * tq, run));
        let workgroups = count * heads * tq.div_ceil(64);
        let bindings = [qs(q), ks(k), ks(v), qs(&out), os(&lse)];
        gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, workgroups * 64, 64)?)?;
    }
    Ok(AttentionOut { out, lse })
}

/// The matmul path pays off for long sequences; short ones (a few queries,
/// or incremental decoding) go faster through the fused kernel (measured on
/// lavapipe: greedy decoding of 64 tokens took 27 s one way, 2.6 s the other).
/// Sequences whose fused loops would pass the device's loop limit (lavapipe ends an invocation's
/// loops after 65,535 iterations, silently: a query over ~2,000 keys of 64 values) take the
/// matmul path whatever the tuning says.
fn use_matmul_path(q: &Tensor, heads: usize, tq: usize, tk: usize) -> Result<bool> {
    let gpu = &q.gpu;
    let d = q.dim(2) / heads;
    Ok((gpu.tuning.attention_via_matmul && tq * tk >= 128 * 128) || !super::loops_fit(gpu, fused_loops(d, tq, tk))?)
}

/// Loop iterations one invocation of the fused and tiled kernels (forward and backward) may run:
/// a walk over every key (or query) row with two loops over the head's vec4s in each, and a few
/// loops over them around it.
fn fused_loops(d: usize, tq: usize, tk: usize) -> usize {
    let d4 = d / 4;
    tq.max(tk) * (2 * d4 + 2) + 4 * d4
}

/// That the fused and tiled kernels' loops stay within this device's limit (an error naming
/// `kernel` otherwise, never results cut short).
fn expect_fused_loops(q: &Tensor, k: &Tensor, heads: usize, kernel: &str) -> Result<()> {
    let (tq, tk, d) = (q.dim(1), k.dim(1), q.dim(2) / heads.max(1));
    super::expect_loops(&q.gpu, || format!("attention ({kernel}, {tq} queries over {tk} keys)"), fused_loops(d, tq, tk))
}

/// Heads per score matrix of the matmul path: as many as keep it within one storage binding
/// (at least one: a single head's larger matrix is left to the products' and the softmax's own
/// windows, which no check case reaches yet), so long sequences stay there instead of taking the
/// fused kernels.
fn heads_per_group(gpu: &Gpu, heads: usize, tq: usize, ld: usize) -> usize {
    ((gpu.max_binding() as usize) / (tq * ld * 4).max(1)).clamp(1, heads)
}

/// Keys per invocation when a single query is decoded (KEY_CHUNK in attention.wgsl, a pipeline
/// constant): `Tuning::decode_key_chunk`.
fn decode_key_chunk(gpu: &Gpu) -> usize {
    gpu.tuning.decode_key_chunk.max(1) as usize
}

/// The key/value cache of token-by-token decoding: `rows` is [B, T_max, 3C]
/// and row t holds the query, key and value of token t side by side (a
/// product writes them there). On devices where buffer loads in loops are
/// slow (CPU devices) the rows are also copied into a texture, which the
/// attention step reads instead.
pub struct KvCache {
    pub rows: Tensor,
    texture: Option<(wgpu::Texture, wgpu::TextureView)>,
}

impl KvCache {
    pub fn new(gpu: &std::sync::Arc<crate::engine::Gpu>, batch: usize, max_rows: usize, c: usize) -> Result<KvCache> {
        KvCache::from_rows(Tensor::zeros(gpu, &[batch, max_rows, 3 * c])?, gpu.tuning.kv_cache_texture)
    }

    /// A cache over existing rows [B, T_max, 3C], with a texture copy when
    /// `texture` (and the device's texture limits allow it).
    pub fn from_rows(rows: Tensor, texture: bool) -> Result<KvCache> {
        if rows.rank() != 3 || !rows.dim(2).is_multiple_of(3) {
            bail!("KV cache: rows must be [B, T, 3C], got {:?}", rows.shape());
        }
        let (batch, max_rows, c) = (rows.dim(0), rows.dim(1), rows.dim(2) / 3);
        let gpu = rows.gpu.clone();
        let d = gpu.limits.max_texture_dimension_2d as usize;
        let fits =
            c % 4 == 0 && 3 * c / 4 <= d && max_rows <= d && batch <= gpu.limits.max_texture_array_layers as usize;
        let texture = (texture && fits).then(|| {
            let t = gpu.device.create_texture(&wgpu::TextureDescriptor {
                label: Some("kv cache"),
                size: wgpu::Extent3d {
                    width: (3 * c / 4) as u32,
                    height: max_rows as u32,
                    depth_or_array_layers: batch as u32,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::Rgba32Float,
                usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            let view = t.create_view(&wgpu::TextureViewDescriptor {
                dimension: Some(wgpu::TextureViewDimension::D2Array),
                ..Default::default()
            });
            (t, view)
        });
        Ok(KvCache { rows, texture })
    }

    /// After row `pos` of every sequence is written: copy it to the texture.
    pub fn commit(&self, pos: usize) {
        let Some((tex, _)) = &self.texture else { return };
        let (b, t, w) = (self.rows.dim(0), self.rows.dim(1), self.rows.dim(2));
        let row_bytes = (w * 4) as u64;
        self.rows.gpu.record(|enc| {
            for s in 0..b {
                enc.copy_buffer_to_texture(
                    wgpu::TexelCopyBufferInfo {
                        buffer: self.rows.buffer(),
                        layout: wgpu::TexelCopyBufferLayout {
                            offset: ((s * t + pos) as u64) * row_bytes,
                            bytes_per_row: None,
                            rows_per_image: None,
                        },
                    },
                    wgpu::TexelCopyTextureInfo {
                        texture: tex,
                        mip_level: 0,
                        origin: wgpu::Origin3d { x: 0, y: pos as u32, z: s as u32 },
                        aspect: wgpu::TextureAspect::All,
                    },
                    wgpu::Extent3d { width: (w / 4) as u32, height: 1, depth_or_array_layers: 1 },
                );
            }
        });
    }

    /// Causal multi-head attention of the query in row `pos` over rows
    /// 0..=pos (committed): the keys are split in chunks across invocations,
    /// then the chunks are combined. Returns [B, C].
    pub fn attend(&self, heads: usize, pos: usize) -> Result<Tensor> {
        let cache = &self.rows;
        if pos >= cache.dim(1) {
            bail!("cached attention: cache {:?} has no row {pos} of (q, k, v)", cache.shape());
        }
        let (b, rows, c) = (cache.dim(0), cache.dim(1), cache.dim(2) / 3);
        let d = c.checked_div(heads).unwrap_or(0);
        if heads == 0 || c % heads != 0 || d % 4 != 0 || d > 128 {
            bail!("cached attention: head size {c}/{heads} must be a multiple of 4 and at most 128");
        }
        let gpu = &cache.gpu;
        let tk = pos + 1;
        let key_chunk = decode_key_chunk(gpu);
        let chunks = tk.div_ceil(key_chunk);
        let (c4, row4) = (c / 4, 3 * c / 4);
        // Strides and offsets in vec4: q of sequence b at row pos (one query
        // per sequence, so its row stride is the cache's batch stride), k and v in all rows.
        let batch_stride = u32_of("cache batch stride", rows * row4)?;
        let params = AttentionParams {
            q_ld: batch_stride,
            k_ld: row4 as u32,
            v_ld: row4 as u32,
            kv_bs: batch_stride,
            chunks: chunks as u32,
            q_off: u32_of("cache row", pos * row4)?,
            k_off: c4 as u32,
            v_off: 2 * c4 as u32,
            ..kernel_params(b, heads, 1, tk, c, true, rows)?
        };
        let out = Tensor::empty(gpu, &[b, c], DType::F32)?;
        let part = Tensor::empty(gpu, &[b * heads * chunks * (d / 4 + 1), 4], DType::F32)?;
        let consts = [("DECODE_D4", format!("{}u", d / 4)), ("KEY_CHUNK", format!("{key_chunk}u"))];
        let pipe = match &self.texture {
            Some(_) => gpu.pipeline("attention", "decode_partial_tex", &consts)?,
            None => gpu.pipeline("attention", "decode_partial", &consts)?,
        };
        let (row_values, seq_values) = (3 * c, rows * 3 * c);
        for piece in decode_pieces(gpu, b, rows, row_values, tk)? {
            // The cache's rows this piece reads, bound from an aligned start; the kernels' offsets
            // (in vec4) wrap in u32 arithmetic to that start.
            let (kv_first, kv_count) = match piece.chunks {
                None => (piece.s0 * seq_values, piece.n * seq_values),
                Some((c0, m)) => {
                    let r0 = c0 * key_chunk;
                    (
                        piece.s0 * seq_values + r0 * row_values,
                        ((c0 + m) * key_chunk).min(tk).saturating_sub(r0) * row_values,
                    )
                }
            };
            let (kv, kv_start) = super::aligned_window(cache, kv_first, kv_count);
            // The query row: inside the window when it holds whole sequences, else its own window.
            let (q, q_start) = match piece.chunks {
                None => (kv, kv_start),
                Some(_) => super::aligned_window(cache, piece.s0 * seq_values + pos * row_values, c),
            };
            let (kv_start4, q_start4) = ((kv_start / 4) as u32, (q_start / 4) as u32);
            let (t0, tasks) = match piece.chunks {
                None => (piece.s0 * heads * chunks, piece.n * heads * chunks),
                Some((c0, m)) => ((piece.s0 * chunks + c0) * heads, m * heads),
            };
            let p = AttentionParams {
                q_off: params.q_off.wrapping_sub(q_start4),
                k_off: params.k_off.wrapping_sub(kv_start4),
                v_off: params.v_off.wrapping_sub(kv_start4),
                t0: u32_of("decode task", t0)?,
                tasks: u32_of("decode tasks", tasks)?,
                ..params
            };
            let grid = grid_for(gpu, tasks, 8)?;
            match &self.texture {
                // Keys and values from the texture (no binding limit): the query row from the buffer.
                Some((_, view)) => {
                    let p = AttentionParams { k_off: params.k_off, v_off: params.v_off, ..p };
                    gpu.dispatch_res(&pipe, &p, &[Res::Buf(q), Res::Tex(view), Res::Buf(part.binding())], grid)?
                }
                None => gpu.dispatch(&pipe, &p, &[q, kv, kv, part.binding()], grid)?,
            }
        }
        let pipe = gpu.pipeline("attention", "decode_combine", &[])?;
        gpu.dispatch(&pipe, &params, &[part.binding(), out.binding()], grid_for(gpu, b * heads * (d / 4), 8)?)?;
        Ok(out)
    }
}

/// A decode dispatch's share of a KV cache larger than one storage binding: sequences
/// `s0 .. s0 + n`, all their key chunks, or (`chunks: Some((c0, m))`) key chunks `c0 .. c0 + m` of
/// sequence `s0` alone where one sequence's rows exceed a binding.
struct DecodePiece {
    s0: usize,
    n: usize,
    chunks: Option<(usize, usize)>,
}

/// The pieces of a decode step over `b` sequences of `rows` cached rows of `row_values` floats,
/// `tk` keys attended: one piece where the cache fits one binding.
fn decode_pieces(gpu: &Gpu, b: usize, rows: usize, row_values: usize, tk: usize) -> Result<Vec<DecodePiece>> {
    let max = gpu.max_binding() as usize;
    let seq_bytes = rows * row_values * 4;
    if b * seq_bytes <= max {
        return Ok(vec![DecodePiece { s0: 0, n: b, chunks: None }]);
    }
    // (Less one alignment: windows are bound from the aligned start before them.)
    let room = max.saturating_sub(gpu.binding_alignment());
    if seq_bytes <= room {
        let n = room / seq_bytes;
        return Ok((0..b).step_by(n).map(|s0| DecodePiece { s0, n: n.min(b - s0), chunks: None }).collect());
    }
    let key_chunk = decode_key_chunk(gpu);
    let m = room / (key_chunk * row_values * 4);
    if m == 0 {
        bail!(
            "cached attention: {key_chunk} cache rows of {row_values} values exceed one storage binding ({max} bytes)"
        );
    }
    let chunks = tk.div_ceil(key_chunk);
    Ok((0..b)
        .flat_map(|s0| {
            (0..chunks).step_by(m).map(move |c0| DecodePiece { s0, n: 1, chunks: Some((c0, m.min(chunks - c0))) })
        })
        .collect())
}

/// The fused kernel (online softmax, no score matrix in memory).
pub fn multi_head_fused(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<AttentionOut> {
    expect_fused_loops(q, k, heads, "fused")?;
    let (b, tq, c) = (q.dim(0), q.dim(1), q.dim(2));
    let tk = k.dim(1);
    let gpu = &q.gpu;
    let out = Tensor::empty(&q.gpu, &[b, tq, c], DType::F32)?;
    let lse = Tensor::empty(&q.gpu, &[b, heads, tq], DType::F32)?;
    let pipe = gpu.pipeline("attention", "attention", &[])?;
    for run @ (_, count) in sequence_runs(gpu, b, &[tq * c, tk * c, heads * tq])? {
        let params = kernel_params(count, heads, tq, tk, c, causal, tk)?;
        let (qs, ks, os) =
            (|t| plane_window(t, tq * c, run), |t| plane_window(t, tk * c, run), |t| plane_window(t, heads * tq, run));
        let bindings = [qs(q), ks(k), ks(v), qs(&out), os(&lse)];
        gpu.dispatch(&pipe, &params, &bindings, grid_for(gpu, count * heads * tq, 64)?)?;
    }
    Ok(AttentionOut { out, lse })
}

/// Runs of sequences (first, count) for the fused and tiled kernels, whose [B, ..] tensors are
/// bound from a run's first sequence (they index from it): `per` the values per sequence of each.
/// One run unless a tensor is larger than one storage binding.
fn sequence_runs(gpu: &Gpu, b: usize, per: &[usize]) -> Result<Vec<(usize, usize)>> {
    super::plane_runs(gpu, b, per, 1)
        .map_err(|e| anyhow::anyhow!("attention: one sequence's tensors exceed a storage binding: {e:#}"))
}

/// The row length of attention's score, probability and gradient matrices: the keys rounded up
/// to whole vec4s, so that the products store their rows four columns at a time and pack them
/// with vector loads (`matmul::pack_entry`); the softmax kernels zero the padding and never read
/// it. GPT training step, 255 tokens (profiled against the same binary without it, alternating,
/// 2026-12-03): the score products 0.15 -> 0.10 and the packs 0.33 -> 0.28 of the other
/// products' time, about 4% of the step.
fn padded_keys(tk: usize) -> usize {
    tk.next_multiple_of(4)
}

/// What the matmul path's products take for granted (`matmul::Assume`): the score matrices' rows
/// own their padding, and with the causal mask (query i sees keys up to i + tk - tq) the scores
/// and dP past it are not wanted, P and dS are zeros there (the softmax and its backward write
/// zeros), so products by them and by their transposes skip those terms.
struct CausalProducts {
    /// QKᵀ and dO Vᵀ into the score matrix.
    scores: Assume,
    /// P·V and dS·K: A's columns (keys) past each row's (query's) last visible key are zeros.
    probs_times: Assume,
    /// Pᵀ·dO and dSᵀ·Q: A's columns (queries) before the first query that sees each row's key.
    transposed_times: Assume,
}

impl CausalProducts {
    fn new(causal: bool, tq: usize, tk: usize) -> CausalProducts {
        let offset = tk as i64 - tq as i64;
        let masked = |relation: fn(i64) -> Causal| if causal { relation(offset) } else { Causal::None };
        CausalProducts {
            scores: Assume { padding: Padding::Own, causal: masked(Causal::Columns) },
            probs_times: Assume { causal: masked(Causal::KUpTo), ..Assume::default() },
            transposed_times: Assume { causal: masked(Causal::KFrom), ..Assume::default() },
        }
    }
}

/// `multi_head` through the texture-fed matmul: per image, scores for all
/// heads at once (heads are a batch with stride head_dim), masked softmax
/// (which also writes the lse the backward pass needs), then P·V. On devices
/// where the fused kernel's per-lane buffer loads are slow (lavapipe) this
/// is much faster.
pub fn multi_head_via_matmul(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<AttentionOut> {
    let (b, tq, c) = (q.dim(0), q.dim(1), q.dim(2));
    let tk = k.dim(1);
    let d = c / heads;
    let gpu = &q.gpu;
    let out = Tensor::empty(gpu, &[b, tq, c], DType::F32)?;
    let lse = Tensor::empty(gpu, &[b, heads, tq], DType::F32)?;
    let ld = padded_keys(tk);
    let group = heads_per_group(gpu, heads, tq, ld);
    let mask = CausalProducts::new(causal, tq, tk);
    for (bi, h0) in (0..b).flat_map(|bi| (0..heads).step_by(group).map(move |h0| (bi, h0))) {
        let hg = group.min(heads - h0);
        let scores = Tensor::empty(gpu, &[hg, tq, ld], DType::F32)?;
        // scores[h, i, j] = q[bi, i, h*d..] · k[bi, j, h*d..] for heads h0 .. h0 + hg
        gemm_with(
            Gemm { m: tq, n: tk, k: d, batch: hg, alpha: 1.0, beta: 0.0 },
            Operand { t: q, off: bi * tq * c + h0 * d, rs: c, cs: 1, bs: d },
            Operand { t: k, off: bi * tk * c + h0 * d, rs: 1, cs: c, bs: d },
            Out { t: &scores, off: 0, ld, bs: tq * ld },
            Bias::None,
            mask.scores,
        )?;
        let scale = 1.0 / (d as f32).sqrt();
        let (probs, row_lse) = super::softmax::softmax_masked(&scores, scale, causal, tq, tk - tq, tk)?;
        drop(scores);
        gpu.copy(row_lse.buffer(), 0, lse.buffer(), ((bi * heads + h0) * tq * 4) as u64, (hg * tq * 4) as u64);
        // out[bi, i, h*d + x] = sum_j probs[h, i, j] v[bi, j, h*d + x]
        gemm_with(
            Gemm { m: tq, n: d, k: tk, batch: hg, alpha: 1.0, beta: 0.0 },
            Operand { t: &probs, off: 0, rs: ld, cs: 1, bs: tq * ld },
            Operand { t: v, off: bi * tk * c + h0 * d, rs: c, cs: 1, bs: d },
            Out { t: &out, off: bi * tq * c + h0 * d, ld: c, bs: d },
            Bias::None,
            mask.probs_times,
        )?;
    }
    Ok(AttentionOut { out, lse })
}

/// Gradients (dq, dk, dv) of `multi_head` given its inputs, output and lse.
pub fn multi_head_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &AttentionOut,
    dout: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    if use_matmul_path(q, heads, q.dim(1), k.dim(1))? {
        return multi_head_backward_via_matmul(q, k, v, dout, heads, causal);
    }
    multi_head_backward_fused(q, k, v, out, dout, heads, causal)
}

/// Backward through matmuls: P rebuilt per image, dV = Pᵀ dO, dP = dO Vᵀ,
/// dS = softmax backward, dQ = dS K · scale, dK = dSᵀ Q · scale.
pub fn multi_head_backward_via_matmul(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, tq, c) = (q.dim(0), q.dim(1), q.dim(2));
    let tk = k.dim(1);
    let d = c / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let gpu = &q.gpu;
    let (dq, dk, dv) = (
        Tensor::empty(gpu, q.shape(), DType::F32)?,
        Tensor::empty(gpu, k.shape(), DType::F32)?,
        Tensor::empty(gpu, v.shape(), DType::F32)?,
    );
    // One head's [T, d] block of a [B, T, C] tensor as an operand (heads are the batch), or its transpose.
    fn head_rows(t: &Tensor, off: usize, ld: usize, d: usize) -> Operand<'_> {
        Operand { t, off, rs: ld, cs: 1, bs: d }
    }
    fn head_cols(t: &Tensor, off: usize, ld: usize, d: usize) -> Operand<'_> {
        Operand { t, off, rs: 1, cs: ld, bs: d }
    }
    let ld = padded_keys(tk);
    let group = heads_per_group(gpu, heads, tq, ld);
    let mask = CausalProducts::new(causal, tq, tk);
    for (bi, h0) in (0..b).flat_map(|bi| (0..heads).step_by(group).map(move |h0| (bi, h0))) {
        let hg = group.min(heads - h0);
        // Heads h0 .. h0 + hg of image bi.
        let (qo, ko) = (bi * tq * c + h0 * d, bi * tk * c + h0 * d);
        let scores = Tensor::empty(gpu, &[hg, tq, ld], DType::F32)?;
        gemm_with(
            Gemm { m: tq, n: tk, k: d, batch: hg, alpha: 1.0, beta: 0.0 },
            head_rows(q, qo, c, d),
            head_cols(k, ko, c, d),
            Out { t: &scores, off: 0, ld, bs: tq * ld },
            Bias::None,
            mask.scores,
        )?;
        let (probs, _) = super::softmax::softmax_masked(&scores, scale, causal, tq, tk - tq, tk)?;
        // dV[j] = sum_i P[i, j] dO[i]
        gemm_with(
            Gemm { m: tk, n: d, k: tq, batch: hg, alpha: 1.0, beta: 0.0 },
            Operand { t: &probs, off: 0, rs: 1, cs: ld, bs: tq * ld },
            head_rows(dout, qo, c, d),
            Out { t: &dv, off: ko, ld: c, bs: d },
            Bias::None,
            mask.transposed_times,
        )?;
        // dP[i, j] = dO[i] · V[j] (where P is not zero: it multiplies P in the softmax backward)
        gemm_with(
            Gemm { m: tq, n: tk, k: d, batch: hg, alpha: 1.0, beta: 0.0 },
            head_rows(dout, qo, c, d),
            head_cols(v, ko, c, d),
            Out { t: &scores, off: 0, ld, bs: tq * ld },
            Bias::None,
            mask.scores,
        )?;
        let ds = super::softmax::softmax_backward_padded(&probs, &scores, scale, tk)?;
        // dQ = dS K, dK = dSᵀ Q (scale already applied by the softmax backward)
        gemm_with(
            Gemm { m: tq, n: d, k: tk, batch: hg, alpha: 1.0, beta: 0.0 },
            Operand { t: &ds, off: 0, rs: ld, cs: 1, bs: tq * ld },
            head_rows(k, ko, c, d),
            Out { t: &dq, off: qo, ld: c, bs: d },
            Bias::None,
            mask.probs_times,
        )?;
        gemm_with(
            Gemm { m: tk, n: d, k: tq, batch: hg, alpha: 1.0, beta: 0.0 },
            Operand { t: &ds, off: 0, rs: 1, cs: ld, bs: tq * ld },
            head_rows(q, qo, c, d),
            Out { t: &dk, off: ko, ld: c, bs: d },
            Bias::None,
            mask.transposed_times,
        )?;
    }
    Ok((dq, dk, dv))
}

/// Backward of the fused (or tiled) kernel: two atomic-free passes.
#[allow(clippy::too_many_arguments)]
pub fn multi_head_backward_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &AttentionOut,
    dout: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    dout.expect_shape("attention output gradient", out.out.shape())?;
    expect_fused_loops(q, k, heads, "backward")?;
    let (b, tq, c) = (q.dim(0), q.dim(1), q.dim(2));
    let tk = k.dim(1);
    let gpu = &q.gpu;
    let dq = Tensor::empty(gpu, q.shape(), DType::F32)?;
    let dsum = Tensor::empty(gpu, &[b, heads, tq], DType::F32)?;
    let dk = Tensor::empty(gpu, k.shape(), DType::F32)?;
    let dv = Tensor::empty(gpu, v.shape(), DType::F32)?;
    // The tiled passes: a workgroup per 64 queries (keys) of one (batch, head) stages the other
    // side's rows in workgroup memory; the plain ones: an invocation per query (key).
    let tiled = gpu.tuning.attention_tiled;
    let dq_pipe = gpu.pipeline("attention", if tiled { "backward_dq_tiled" } else { "backward_dq" }, &[])?;
    let dkv_pipe = gpu.pipeline("attention", if tiled { "backward_dkv_tiled" } else { "backward_dkv" }, &[])?;
    for run @ (_, count) in sequence_runs(gpu, b, &[tq * c, tk * c, heads * tq])? {
        let params = kernel_params(count, heads, tq, tk, c, causal, tk)?;
        let threads = |rows: usize| if tiled { count * heads * rows.div_ceil(64) * 64 } else { count * heads * rows };
        let (qs, ks, os) =
            (|t| plane_window(t, tq * c, run), |t| plane_window(t, tk * c, run), |t| plane_window(t, heads * tq, run));
        let bindings = [qs(q), ks(k), ks(v), qs(&out.out), os(&out.lse), qs(dout), qs(&dq), os(&dsum)];
        gpu.dispatch(&dq_pipe, &params, &bindings, grid_for(gpu, threads(tq), 64)?)?;
        let bindings = [qs(q), ks(k), ks(v), os(&dsum), os(&out.lse), qs(dout), ks(&dk), ks(&dv)];
        gpu.dispatch(&dkv_pipe, &params, &bindings, grid_for(gpu, threads(tk), 64)?)?;
    }
    Ok((dq, dk, dv))
}

/// The AttnBlock's attention on [B, C, N] (N = h*w positions, one head):
/// w = softmax(qᵀk · C^-½) over keys, out = v wᵀ. Returns (out [B, C, N], w [B, N, N]).
pub fn spatial(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        t.expect_dtype(&format!("attention {n}"), DType::F32)?;
        super::expect_rank(&format!("attention {n}"), t, 3)?;
    }
    if q.shape() != k.shape() || q.shape() != v.shape() {
        bail!("attention: q {:?}, k {:?}, v {:?} differ", q.shape(), k.shape(), v.shape());
    }
    let (c, n) = (q.dim(1), q.dim(2));
    spatial_of(Qkv { q: (q, 0), k: (k, 0), v: (v, 0), bs: c * n }, q.dim(0), c, n)
}

/// `spatial` of q, k and v stacked by channel in one tensor [B, 3C, N] (as one 1x1 convolution
/// of 3C output channels makes them: the AttnBlock's q, k and v in one product).
pub fn spatial_qkv(qkv: &Tensor, c: usize) -> Result<(Tensor, Tensor)> {
    let (b, n) = qkv_shape(qkv, c)?;
    spatial_of(Qkv::stacked(qkv, c, n), b, c, n)
}

/// Where the spatial attention's q, k and v lie: [C, N] blocks at these offsets, images `bs` apart.
#[derive(Clone, Copy)]
struct Qkv<'a> {
    q: (&'a Tensor, usize),
    k: (&'a Tensor, usize),
    v: (&'a Tensor, usize),
    bs: usize,
}

impl<'a> Qkv<'a> {
    fn stacked(qkv: &'a Tensor, c: usize, n: usize) -> Qkv<'a> {
        Qkv { q: (qkv, 0), k: (qkv, c * n), v: (qkv, 2 * c * n), bs: 3 * c * n }
    }
    /// One of them as a product operand: as it lies ([C, N], rows of N) or transposed.
    fn operand(&self, (t, off): (&'a Tensor, usize), n: usize, transposed: bool) -> Operand<'a> {
        rows_of(t, off, n, self.bs, transposed)
    }
}

/// A matrix of rows of `n` values from `off`, matrices `bs` apart, as a product operand as it
/// lies or transposed.
fn rows_of(t: &Tensor, off: usize, n: usize, bs: usize, transposed: bool) -> Operand<'_> {
    match transposed {
        false => Operand { t, off, rs: n, cs: 1, bs },
        true => Operand { t, off, rs: 1, cs: n, bs },
    }
}

/// (B, N) of a stacked [B, 3C, N] q, k, v.
fn qkv_shape(qkv: &Tensor, c: usize) -> Result<(usize, usize)> {
    qkv.expect_dtype("attention qkv", DType::F32)?;
    super::expect_rank("attention qkv", qkv, 3)?;
    if c == 0 || qkv.dim(1) != 3 * c {
        bail!("attention: qkv {:?} is not q, k and v of {c} channels stacked", qkv.shape());
    }
    Ok((qkv.dim(0), qkv.dim(2)))
}

fn spatial_of(x: Qkv, b: usize, c: usize, n: usize) -> Result<(Tensor, Tensor)> {
    let gpu = &x.q.0.gpu;
    let scores = Tensor::empty(gpu, &[b, n, n], DType::F32)?;
    // scores[i, j] = sum_c q[c, i] k[c, j]
    let g = Gemm { m: n, n, k: c, batch: b, alpha: (c as f32).powf(-0.5), beta: 0.0 };
    let into_scores = Out { t: &scores, off: 0, ld: n, bs: n * n };
    gemm(g, x.operand(x.q, n, true), x.operand(x.k, n, false), into_scores, Bias::None)?;
    let w = super::softmax::softmax(&scores, 1.0)?;
    drop(scores);
    // out[c, i] = sum_j v[c, j] w[i, j]
    let out = Tensor::empty(gpu, &[b, c, n], DType::F32)?;
    let g = Gemm { m: c, n, k: n, batch: b, alpha: 1.0, beta: 0.0 };
    let w_t = rows_of(&w, 0, n, n * n, true);
    gemm(g, x.operand(x.v, n, false), w_t, Out { t: &out, off: 0, ld: n, bs: c * n }, Bias::None)?;
    Ok((out, w))
}

/// The gradient [B, 3C, N] of `spatial_qkv`'s input, given the input, its weights w and the
/// output's gradient dout [B, C, N]: dv = dout w, dw = doutᵀ v, ds = softmax backward of dw,
/// dq = C^-½ k dsᵀ, dk = C^-½ q ds, written into their blocks of one tensor (the 1x1
/// convolution that made q, k and v takes it whole).
pub fn spatial_qkv_backward(qkv: &Tensor, w: &Tensor, dout: &Tensor, c: usize) -> Result<Tensor> {
    let (b, n) = qkv_shape(qkv, c)?;
    w.expect_shape("attention weights", &[b, n, n])?;
    dout.expect_shape("attention output gradient", &[b, c, n])?;
    let gpu = &qkv.gpu;
    let x = Qkv::stacked(qkv, c, n);
    let dqkv = Tensor::empty(gpu, qkv.shape(), DType::F32)?;
    let into = |block: usize| Out { t: &dqkv, off: block * c * n, ld: n, bs: 3 * c * n };
    // w and ds: [N, N] per image; dout: [C, N].
    let square = |t, transposed| rows_of(t, 0, n, n * n, transposed);
    let d_out = |transposed| rows_of(dout, 0, n, c * n, transposed);
    // dv[c, j] = sum_i dout[c, i] w[i, j]
    let g = Gemm { m: c, n, k: n, batch: b, alpha: 1.0, beta: 0.0 };
    gemm(g, d_out(false), square(w, false), into(2), Bias::None)?;
    // dw[i, j] = sum_c dout[c, i] v[c, j]
    let dw = Tensor::empty(gpu, &[b, n, n], DType::F32)?;
    let g = Gemm { m: n, n, k: c, batch: b, alpha: 1.0, beta: 0.0 };
    gemm(g, d_out(true), x.operand(x.v, n, false), Out { t: &dw, off: 0, ld: n, bs: n * n }, Bias::None)?;
    let ds = super::softmax::softmax_backward(w, &dw, 1.0)?;
    drop(dw);
    let scale = (c as f32).powf(-0.5);
    // dq[c, i] = scale sum_j k[c, j] ds[i, j]; dk[c, j] = scale sum_i q[c, i] ds[i, j]
    let g = Gemm { m: c, n, k: n, batch: b, alpha: scale, beta: 0.0 };
    gemm(g, x.operand(x.k, n, false), square(&ds, true), into(0), Bias::None)?;
    gemm(g, x.operand(x.q, n, false), square(&ds, false), into(1), Bias::None)?;
    Ok(dqkv)
}

pub mod cpu {
    /// Gradients (dq, dk, dv) of multi-head attention on [B, T, C].
    #[allow(clippy::too_many_arguments)]
    pub fn multi_head_backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &[f32],
        b: usize,
        tq: usize,
        tk: usize,
        c: usize,
        heads: usize,
        causal: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = c / heads;
        let scale = 1.0 / (d as f64).sqrt();
        let (mut dq, mut dk, mut dv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..tq {
                    let last = if causal { (tk - tq + i + 1).min(tk) } else { tk };
                    let qa = |x: usize| q[(bi * tq + i) * c + h * d + x] as f64;
                    let ka = |j: usize, x: usize| k[(bi * tk + j) * c + h * d + x] as f64;
                    let va = |j: usize, x: usize| v[(bi * tk + j) * c + h * d + x] as f64;
                    let ga = |x: usize| g[(bi * tq + i) * c + h * d + x] as f64;
                    let s: Vec<f64> =
                        (0..last).map(|j| (0..d).map(|x| qa(x) * ka(j, x)).sum::<f64>() * scale).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                    let dp: Vec<f64> = (0..last).map(|j| (0..d).map(|x| ga(x) * va(j, x)).sum()).collect();
                    let dd: f64 = (0..last).map(|j| p[j] * dp[j]).sum();
                    for j in 0..last {
                        let ds = p[j] * (dp[j] - dd) * scale;
                        for x in 0..d {
                            dq[(bi * tq + i) * c + h * d + x] += ds * ka(j, x);
                            dk[(bi * tk + j) * c + h * d + x] += ds * qa(x);
                            dv[(bi * tk + j) * c + h * d + x] += p[j] * ga(x);
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        (f(dq), f(dk), f(dv))
    }

    /// Multi-head attention on [B, T, C] (f64 softmax).
    #[allow(clippy::too_many_arguments)]
    pub fn multi_head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        tq: usize,
        tk: usize,
        c: usize,
        heads: usize,
        causal: bool,
    ) -> Vec<f32> {
        let d = c / heads;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f32; b * tq * c];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..tq {
                    let last = if causal { (tk - tq + i + 1).min(tk) } else { tk };
                    let s: Vec<f64> = (0..last)
                        .map(|j| {
                            (0..d)
                                .map(|x| {
                                    q[(bi * tq + i) * c + h * d + x] as f64 * k[(bi * tk + j) * c + h * d + x] as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..d {
                        out[(bi * tq + i) * c + h * d + x] =
                            (0..last).map(|j| e[j] / z * v[(bi * tk + j) * c + h * d + x] as f64).sum::<f64>() as f32;
                    }
                }
            }
        }
        out
    }

    /// `spatial` of q, k and v stacked by channel in one [B, 3C, N].
    pub fn spatial_qkv(qkv: &[f32], b: usize, c: usize, n: usize) -> Vec<f32> {
        let part = |which: usize| -> Vec<f32> {
            (0..b).flat_map(|bi| qkv[(bi * 3 + which) * c * n..(bi * 3 + which + 1) * c * n].to_vec()).collect()
        };
        spatial(&part(0), &part(1), &part(2), b, c, n)
    }

    /// Spatial single-head attention on [B, C, N].
    pub fn spatial(q: &[f32], k: &[f32], v: &[f32], b: usize, c: usize, n: usize) -> Vec<f32> {
        let scale = (c as f64).powf(-0.5);
        let mut out = vec![0f32; b * c * n];
        for bi in 0..b {
            let at = |t: &[f32], ch: usize, p: usize| t[(bi * c + ch) * n + p] as f64;
            for i in 0..n {
                let s: Vec<f64> =
                    (0..n).map(|j| (0..c).map(|ch| at(q, ch, i) * at(k, ch, j)).sum::<f64>() * scale).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for ch in 0..c {
                    out[(bi * c + ch) * n + i] = (0..n).map(|j| e[j] / z * at(v, ch, j)).sum::<f64>() as f32;
                }
            }
        }
        out
    }
}
