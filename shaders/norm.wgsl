// Group norm, layer norm and batch norm (batch statistics) in three passes
// without barriers: partial (count, mean, M2) over chunks, Chan's parallel
// combination per statistic, then normalise + affine (+ optional swish).
//
// Element i of a [outer, C, inner] tensor belongs to statistic s(i) and
// channel c(i) = (i / inner) % C; mode picks s:
//   0 group norm: s = i / (C/G * inner)        (b, g), contiguous
//   1 layer norm: s = i / C, channel = i % C    (rows of the last dim; inner = 1)
//   2 batch norm: s = c(i)                      (over batch and space)
// Statistic s covers per_stat / seglen segments of `seglen` contiguous elements, the
// j-th at base(s) + j * segstride.

struct Params {
    n: u32, mode: u32, c: u32, inner: u32,
    stats: u32, seglen: u32, block0: u32, segstride: u32,
    per_stat: u32, chunk: u32, chunks: u32, act: u32,   // act: 0 none, 1 swish
    eps: f32, group_size: u32, i0: u32, s0: u32,   // i0: apply's first element (x and y are bound from there), partial_stats and the group backward: the run's first value in the bindings of x (dy, dx); s0: the first statistic of a run (partial_stats: written from there; the group backward: x, dy, dx are bound from at or before it)
}

@group(0) @binding(0) var<uniform> p: Params;

// The layout mode and activation, fixed per pipeline where the launcher makes one for them
// (engine::shaders::specialize; ALL: the parameters decide): lavapipe (Mesa 22.3) runs both
// sides of a branch and every case of a switch under masks, even when the condition is uniform.
const ALL: u32 = 0xffffffffu;
const MODE: u32 = ALL;
const ACT: u32 = ALL;

fn mode() -> u32 {
    if (MODE == ALL) {
        return p.mode;
    }
    return MODE;
}

fn act() -> u32 {
    if (ACT == ALL) {
        return p.act;
    }
    return ACT;
}

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

fn channel_of(i: u32) -> u32 {
    if (mode() == 1u) {
        return i % p.c;
    }
    return (i / p.inner) % p.c;
}

// The statistic element i belongs to.
fn stat_of(i: u32) -> u32 {
    switch mode() {
        case 0u: { return i / (p.group_size * p.inner); }
        case 1u: { return i / p.c; }
        default: { return channel_of(i); }
    }
}

fn stat_base(s: u32) -> u32 {
    if (mode() == 2u) {
        return s * p.seglen;   // channel plane of batch 0; segments step by C*inner
    }
    return s * p.per_stat;
}

// Element `e` (0..per_stat) of statistic s.
fn stat_elem(s: u32, e: u32) -> u32 {
    return stat_base(s) + (e / p.seglen) * p.segstride + e % p.seglen;
}

// (statistic, first element, end) of partial-sum chunk t.
fn chunk_of(t: u32) -> vec3<u32> {
    let start = (t % p.chunks) * p.chunk;
    return vec3<u32>(t / p.chunks, start, min(start + p.chunk, p.per_stat));
}

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<vec4<f32>>;   // (count, mean, M2, 0)

@compute @workgroup_size(256)
fn partial_stats(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= p.stats * p.chunks) { return; }
    let c = chunk_of(t);
    let s = c.x;
    let start = c.y;
    let end = c.z;
    var sum = 0.0;
    for (var e = start; e < end; e++) {
        sum += x[p.i0 + stat_elem(s, e)];
    }
    let cnt = f32(end - start);
    let mean = sum / max(cnt, 1.0);
    var m2 = 0.0;
    for (var e = start; e < end; e++) {
        let d = x[p.i0 + stat_elem(s, e)] - mean;
        m2 += d * d;
    }
    partial[p.s0 * p.chunks + t] = vec4<f32>(cnt, mean, m2, 0.0);
}

@group(0) @binding(1) var<storage, read> parts: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> stats: array<vec2<f32>>;      // (mean, 1/sqrt(var + eps))

@compute @workgroup_size(256)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let s = flat(gid, nwg);
    if (s >= p.stats) { return; }
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var c = 0u; c < p.chunks; c++) {
        let q = parts[s * p.chunks + c];
        if (q.x > 0.0) {
            let tot = n + q.x;
            let d = q.y - mean;
            mean += d * q.x / tot;
            m2 += q.z + d * d * n * q.x / tot;
            n = tot;
        }
    }
    let var_ = m2 / max(n, 1.0);   // biased, as PyTorch normalises
    stats[s] = vec2<f32>(mean, inverseSqrt(var_ + p.eps));
}

@group(0) @binding(1) var<storage, read> xin: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> st: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> gamma: array<f32>;
@group(0) @binding(5) var<storage, read> beta: array<f32>;

@compute @workgroup_size(256)
fn apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ch = channel_of(p.i0 + i);
    let m = st[stat_of(p.i0 + i)];
    var v = (xin[i] - m.x) * m.y * gamma[ch] + beta[ch];
    if (act() == 1u) {
        v = v / (1.0 + exp(-v));
    }
    y[i] = v;
}

// The same two passes four elements at a time, where every run of a
// statistic and every channel span is a multiple of 4 (inner % 4 == 0, or
// C % 4 == 0 for layer norm). On CPU devices a buffer load with a per-lane
// address runs lane by lane, so one vec4 load costs little more than one
// f32 load: these read 4x the data per load.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;

// From element e of statistic s: (first texel, texels) of the contiguous
// run of its segment before `end` (spans are multiples of 4).
fn texel_run(s: u32, e: u32, end: u32) -> vec2<u32> {
    let off = e % p.seglen;
    let run = min(end - e, p.seglen - off);
    return vec2<u32>((stat_base(s) + (e / p.seglen) * p.segstride + off) / 4u, run / 4u);
}

// A chunk's partial (count, mean, M2) from its sums of d = x - shift and
// of d²: M2 = sum d² - (sum d)² / n.
fn chunk_partial(cnt: f32, shift: f32, sums: vec2<f32>) -> vec4<f32> {
    let mean_d = sums.x / max(cnt, 1.0);
    return vec4<f32>(cnt, shift + mean_d, max(sums.y - sums.x * mean_d, 0.0), 0.0);
}

// Sums of (x - shift) and of its squares over elements [start, end) of
// statistic s, walking whole segment runs so the loop body divides nothing.
// One pass: each load costs a lane-by-lane loop on CPU devices, and the
// shift (an element of the same chunk, so within a few standard deviations
// of its mean) keeps the sum of squares from cancelling.
fn run_sums4(s: u32, start: u32, end: u32, shift: f32) -> vec2<f32> {
    var acc = vec4<f32>(0.0);
    var sq = vec4<f32>(0.0);
    var e = start;
    while (e < end) {
        let r = texel_run(s, e, end);
        for (var j = 0u; j < r.y; j++) {
            let d = x4[p.i0 / 4u + r.x + j] - shift;
            acc += d;
            sq = fma(d, d, sq);
        }
        e += 4u * r.y;
    }
    return vec2<f32>(acc.x + acc.y + acc.z + acc.w, sq.x + sq.y + sq.z + sq.w);
}

@compute @workgroup_size(256)
fn partial_stats4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= p.stats * p.chunks) { return; }
    let c = chunk_of(t);
    let s = c.x;
    let start = c.y;
    let end = c.z;
    let cnt = f32(end - start);
    let shift = x4[(p.i0 + stat_elem(s, start)) / 4u].x;
    partial[p.s0 * p.chunks + t] = chunk_partial(cnt, shift, run_sums4(s, start, end, shift));
}

// (count, sum of x - shift, sum of its squares) over every 256th texel of statistic s from
// texel `lane` (a workgroup of 256 walking one statistic: stats_wg4, stats_sg4).
fn strided_sums(s: u32, lane: u32, shift: f32) -> vec3<f32> {
    var acc = vec4<f32>(0.0);
    var sq = vec4<f32>(0.0);
    var cnt = 0u;
    for (var e = 4u * lane; e < p.per_stat; e += 1024u) {
        let d = x4[stat_elem(s, e) / 4u] - shift;
        acc += d;
        sq = fma(d, d, sq);
        cnt += 4u;
    }
    return vec3<f32>(f32(cnt), acc.x + acc.y + acc.z + acc.w, sq.x + sq.y + sq.z + sq.w);
}

// Both passes in one, GPU-shaped: one workgroup per statistic, its 256 invocations taking every
// 256th texel of it, then Chan's combination of their (count, mean, M2) as a tree in workgroup
// memory behind barriers (Tuning::stats_workgroup; on lavapipe barriers are expensive).
var<workgroup> wg_n: array<f32, 256>;
var<workgroup> wg_mean: array<f32, 256>;
var<workgroup> wg_m2: array<f32, 256>;

@compute @workgroup_size(256)
fn stats_wg4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let s = wid.x + wid.y * nwg.x;
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    if (s < p.stats) {
        let shift = x4[stat_elem(s, 0u) / 4u].x;
        let sums = strided_sums(s, li, shift);
        let q = chunk_partial(sums.x, shift, sums.yz);
        n = q.x;
        mean = q.y;
        m2 = q.z;
    }
    wg_n[li] = n;
    wg_mean[li] = mean;
    wg_m2[li] = m2;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (li < half) {
            let nb = wg_n[li + half];
            let na = wg_n[li];
            let tot = na + nb;
            if (nb > 0.0) {
                let d = wg_mean[li + half] - wg_mean[li];
                wg_mean[li] += d * nb / tot;
                wg_m2[li] += wg_m2[li + half] + d * d * na * nb / tot;
                wg_n[li] = tot;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u && s < p.stats) {
        stats[s] = vec2<f32>(wg_mean[0], inverseSqrt(wg_m2[0] / max(wg_n[0], 1.0) + p.eps));
    }
}

// partial_stats4 reading x through a flat rgba32float texture (values in
// rows of 64, 4096 rows per layer: src/engine/kernels/copy.rs, 16 texels a row),
// filled by a memcpy: on CPU devices a buffer load runs lane by lane.
@group(0) @binding(1) var x_flat: texture_storage_2d_array<rgba32float, read>;

fn x_texel(q: u32) -> vec4<f32> {
    return textureLoad(x_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn run_sums_flat(s: u32, start: u32, end: u32, shift: f32) -> vec2<f32> {
    var acc = vec4<f32>(0.0);
    var sq = vec4<f32>(0.0);
    var e = start;
    while (e < end) {
        let r = texel_run(s, e, end);
        for (var j = 0u; j < r.y; j++) {
            let d = x_texel(r.x + j) - shift;
            acc += d;
            sq = fma(d, d, sq);
        }
        e += 4u * r.y;
    }
    return vec2<f32>(acc.x + acc.y + acc.z + acc.w, sq.x + sq.y + sq.z + sq.w);
}

@compute @workgroup_size(256)
fn partial_stats_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= p.stats * p.chunks) { return; }
    let c = chunk_of(t);
    let cnt = f32(c.z - c.y);
    let shift = x_texel(stat_elem(c.x, c.y) / 4u).x;
    partial[t] = chunk_partial(cnt, shift, run_sums_flat(c.x, c.y, c.z, shift));
}

@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;

// PER vec4s of one plane per invocation (a pipeline constant; 1 where planes are not whole
// runs of 4 texels, and for layer norm's rows): the statistic, gamma and beta are loaded once
// for all of them (on lavapipe every buffer load runs lane by lane, a scalar as dear as a vec4).
const PER: u32 = 1u;

// The statistic (mean, 1/std), gamma and beta of the four values from element i.
struct Affine4 {
    m: vec2<f32>,
    g: vec4<f32>,
    b: vec4<f32>,
}

fn affine4_at(i: u32) -> Affine4 {
    let m = st[stat_of(i)];
    if (mode() == 1u) {
        let ch = i % p.c;   // four channels of one row
        return Affine4(m, vec4<f32>(gamma[ch], gamma[ch + 1u], gamma[ch + 2u], gamma[ch + 3u]),
                       vec4<f32>(beta[ch], beta[ch + 1u], beta[ch + 2u], beta[ch + 3u]));
    }
    let ch = channel_of(i);   // one channel: inner % (4 PER) == 0
    return Affine4(m, vec4<f32>(gamma[ch]), vec4<f32>(beta[ch]));
}

fn normalized4(x: vec4<f32>, a: Affine4) -> vec4<f32> {
    var v = (x - a.m.x) * a.m.y * a.g + a.b;
    if (act() == 1u) {
        v = v / (1.0 + exp(-v));
    }
    return v;
}

@compute @workgroup_size(256)
fn apply4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q0 = PER * flat(gid, nwg);
    let i = p.i0 + 4u * q0;
    if (4u * q0 >= p.n) { return; }
    let a = affine4_at(i);
    for (var j = 0u; j < PER; j++) {
        y4[q0 + j] = normalized4(x4[q0 + j], a);
    }
}

// apply4 reading x through the flat texture the statistics were taken from (x_flat, all of x),
// and gamma and beta through flat textures too (a buffer load runs a loop over the lanes on CPU
// devices: four of them per texel of a layer norm's row).
@group(0) @binding(4) var gamma_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(5) var beta_flat: texture_storage_2d_array<rgba32float, read>;

fn gamma_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(gamma_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn beta_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(beta_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn affine4_flat_at(i: u32) -> Affine4 {
    let m = st[stat_of(i)];
    if (mode() == 1u) {
        let ch = i % p.c;   // four channels of one row (c % 4 == 0)
        return Affine4(m, gamma_flat_at(ch / 4u), beta_flat_at(ch / 4u));
    }
    let ch = channel_of(i);
    return Affine4(m, vec4<f32>(gamma_flat_at(ch / 4u)[ch % 4u]), vec4<f32>(beta_flat_at(ch / 4u)[ch % 4u]));
}

@compute @workgroup_size(256)
fn apply4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q0 = PER * flat(gid, nwg);
    let i = p.i0 + 4u * q0;
    if (4u * q0 >= p.n) { return; }
    let a = affine4_flat_at(i);
    for (var j = 0u; j < PER; j++) {
        y4[q0 + j] = normalized4(x_texel(i / 4u + j), a);
    }
}

// Layer norm of a few short rows (token-by-token decoding) in one dispatch:
// one invocation per row, mean then variance then the affine output, so a
// decoder step pays one dispatch instead of three. Rows of c (a multiple of
// 4) floats, read as vec4s. Uses n (rows x c), c, eps.
@group(0) @binding(1) var<storage, read> row_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> row_y: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> row_gamma: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> row_beta: array<vec4<f32>>;

@compute @workgroup_size(8)
fn layer_norm_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r * p.c >= p.n) { return; }
    let c4 = p.c / 4u;
    let base = r * c4;
    var sum = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        sum += row_x[base + i];
    }
    let mean = (sum.x + sum.y + sum.z + sum.w) / f32(p.c);
    var m2 = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let d = row_x[base + i] - mean;
        m2 += d * d;
    }
    let rstd = inverseSqrt((m2.x + m2.y + m2.z + m2.w) / f32(p.c) + p.eps);
    for (var i = 0u; i < c4; i++) {
        row_y[base + i] = (row_x[base + i] - mean) * rstd * row_gamma[i] + row_beta[i];
    }
}

// ---- Backward --------------------------------------------------------------
// With xhat = (x - mean) * rstd and g = dy * gamma[c]:
//   dx = rstd * (g - mean_s(g) - xhat * mean_s(g * xhat))     (per statistic s)
//   dgamma[c] = sum dy * xhat,  dbeta[c] = sum dy              (per channel c)
// Partial sums per chunk, combined per statistic, then the elementwise pass.

@group(0) @binding(1) var<storage, read> bx: array<f32>;
@group(0) @binding(2) var<storage, read> bdy: array<f32>;
@group(0) @binding(3) var<storage, read> bst: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> bgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> bpartial: array<vec2<f32>>;   // (sum g, sum g*xhat)

@compute @workgroup_size(256)
// Statistics s0 .. s0 + stats (x and dy bound from element i0, at or before the first of statistic s0: group
// and layer norms, whose statistics are contiguous, split so; batch norms bind all, s0 = i0 = 0).
fn backward_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    if (flat(gid, nwg) >= p.stats * p.chunks) { return; }
    let t = p.s0 * p.chunks + flat(gid, nwg);
    let c = chunk_of(t);
    let s = c.x;
    let start = c.y;
    let end = c.z;
    let m = bst[s];
    var sg = 0.0;
    var sgx = 0.0;
    for (var e = start; e < end; e++) {
        let i = stat_elem(s, e);
        let g = bdy[i - p.i0] * bgamma[channel_of(i)];
        sg += g;
        sgx += g * (bx[i - p.i0] - m.x) * m.y;
    }
    bpartial[t] = vec2<f32>(sg, sgx);
}

@group(0) @binding(1) var<storage, read> cpart: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> cmeans: array<vec2<f32>>;

@compute @workgroup_size(256)
fn backward_combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    if (flat(gid, nwg) >= p.stats) { return; }
    let s = p.s0 + flat(gid, nwg);
    var acc = vec2<f32>(0.0);
    for (var c = 0u; c < p.chunks; c++) {
        acc += cpart[s * p.chunks + c];
    }
    cmeans[s] = acc / f32(p.per_stat);
}

@group(0) @binding(5) var<storage, read> dmeans: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(256)
// Elements i0 .. i0 + n (x, dy and dx bound from i0).
fn backward_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = flat(gid, nwg);
    if (j >= p.n) { return; }
    let i = p.i0 + j;
    let ch = channel_of(i);
    let s = stat_of(i);
    let m = bst[s];
    let xhat = (bx[j] - m.x) * m.y;
    let g = bdy[j] * bgamma[ch];
    let mm = dmeans[s];
    dx[j] = m.y * (g - mm.x - xhat * mm.y);
}

@group(0) @binding(4) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> dbeta: array<f32>;

// One invocation per channel, over `outer` blocks of [outer, C, inner] (p.n elements) from block
// block0 of those bound from element i0 (x and dy bound from there): a run of blocks adds to the
// sums of the runs before it. (Runs keep an invocation's loops within the launcher's budget.)
@compute @workgroup_size(64)
fn backward_affine(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    if (ch >= p.c) { return; }
    let outer = p.n / (p.c * p.inner);
    var sg = 0.0;
    var sb = 0.0;
    for (var o = 0u; o < outer; o++) {
        for (var j = 0u; j < p.inner; j++) {
            let k = ((p.block0 + o) * p.c + ch) * p.inner + j;
            let s = stat_of(p.i0 + k);
            let m = bst[s];
            let d = bdy[k];
            sg += d * (bx[k] - m.x) * m.y;
            sb += d;
        }
    }
    if (p.i0 == 0u && p.block0 == 0u) {
        dgamma[ch] = sg;
        dbeta[ch] = sb;
    } else {
        dgamma[ch] += sg;
        dbeta[ch] += sb;
    }
}

// ---- Backward of a group norm whose planes are whole texels (inner % 4 == 0) ----
// Two passes over the tensor instead of three: per (image, channel) plane the sums
// (sum dy, sum dy * xhat) by chunks of p.chunk texels (p.chunks per plane), read as vec4s; from
// those the per-group means (gamma folded in per channel: g = dy * gamma[c]) and dgamma, dbeta;
// then dx in vec4s.
// With p.act = 1 the norm was followed by swish (norm_swish in training): dy is the gradient of
// swish(a), a = xhat * gamma + beta, and both passes take da = dy * swish'(a) in its place,
// recomputing a from x (so the forward keeps no pre-activation tensor).
@group(0) @binding(1) var<storage, read> gx4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gdy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> gst: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> gsums: array<vec2<f32>>;   // (sum dy, sum dy * xhat)
@group(0) @binding(5) var<storage, read> sgamma: array<f32>;   // act = 1: the norm's gamma and beta
@group(0) @binding(6) var<storage, read> sbeta: array<f32>;

// The gradient reaching the norm's output: dy, or through swish at a = xhat * gamma + beta.
fn through_swish(dy: vec4<f32>, xhat: vec4<f32>, gamma: f32, beta: f32) -> vec4<f32> {
    if (act() == 0u) {
        return dy;
    }
    let a = xhat * gamma + beta;
    let s = 1.0 / (1.0 + exp(-a));
    return dy * s * (1.0 + a * (1.0 - s));
}

// Chunk t of backward_plane_sums: its texels (first, end), the plane's statistic, and the
// norm's gamma and beta where a swish followed it.
struct PlaneChunk {
    first: u32, end: u32, m: vec2<f32>, gamma: f32, beta: f32,
}

fn plane_chunk(t: u32) -> PlaneChunk {
    let inner4 = p.inner / 4u;
    let plane = t / p.chunks;
    let start = (t % p.chunks) * p.chunk;
    let end = min(start + p.chunk, inner4);
    let ch = (p.s0 * p.group_size + plane) % p.c;
    var gamma = 0.0;
    var beta = 0.0;
    if (act() != 0u) {
        gamma = sgamma[ch];
        beta = sbeta[ch];
    }
    return PlaneChunk(plane * inner4 + start, plane * inner4 + end, gst[p.s0 + plane / p.group_size], gamma, beta);
}

// What texel (x, dy) of a chunk adds to its (sum dy, sum dy * xhat), as the matrix's columns.
fn plane_terms(x: vec4<f32>, dy: vec4<f32>, c: PlaneChunk) -> mat2x4<f32> {
    let xhat = (x - c.m.x) * c.m.y;
    let d = through_swish(dy, xhat, c.gamma, c.beta);
    return mat2x4<f32>(d, d * xhat);
}

fn store_plane_sums(t: u32, s: mat2x4<f32>) {
    let sd = s[0];
    let sdx = s[1];
    gsums[p.s0 * p.group_size * p.chunks + t] = vec2<f32>(sd.x + sd.y + sd.z + sd.w, sdx.x + sdx.y + sdx.z + sdx.w);
}

@compute @workgroup_size(256)
fn backward_plane_sums4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= p.n / p.inner * p.chunks) { return; }
    let c = plane_chunk(t);
    var s = mat2x4<f32>();
    let o = p.i0 / 4u;
    for (var e = c.first; e < c.end; e++) {
        s += plane_terms(gx4[o + e], gdy4[o + e], c);
    }
    store_plane_sums(t, s);
}

// backward_plane_sums4 reading x (x_flat) and dy through flat rgba32float textures of the run
// (filled by a memcpy: vectorised fetches where buffer loads run lane by lane on lavapipe;
// `Tuning::reads_via_texture`). The same sums.
@group(0) @binding(2) var dy_flat: texture_storage_2d_array<rgba32float, read>;

fn dy_texel(q: u32) -> vec4<f32> {
    return textureLoad(dy_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

@compute @workgroup_size(256)
fn backward_plane_sums_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= p.n / p.inner * p.chunks) { return; }
    let c = plane_chunk(t);
    var s = mat2x4<f32>();
    for (var e = c.first; e < c.end; e++) {
        s += plane_terms(x_texel(e), dy_texel(e), c);
    }
    store_plane_sums(t, s);
}

@group(0) @binding(1) var<storage, read> psums: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read> pgamma: array<f32>;
@group(0) @binding(3) var<storage, read_write> pmeans: array<vec2<f32>>;

// mean over the statistic s = (image, group) of (g, g * xhat), g = dy * gamma[c].
fn group_means(s: u32) -> vec2<f32> {
    var acc = vec2<f32>(0.0);
    for (var j = 0u; j < p.group_size; j++) {
        let plane = s * p.group_size + j;
        var sum = vec2<f32>(0.0);
        for (var k = 0u; k < p.chunks; k++) {
            sum += psums[plane * p.chunks + k];
        }
        acc += sum * pgamma[plane % p.c];
    }
    return acc / f32(p.per_stat);
}

@compute @workgroup_size(256)
fn backward_group_means(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    if (flat(gid, nwg) >= p.stats) { return; }
    let s = p.s0 + flat(gid, nwg);
    pmeans[s] = group_means(s);
}

@group(0) @binding(2) var<storage, read_write> pdgamma: array<f32>;
@group(0) @binding(3) var<storage, read_write> pdbeta: array<f32>;

// (dbeta[c], dgamma[c]) = the sums of (dy, dy * xhat) over the images' planes of channel c.
fn affine_sums(ch: u32) -> vec2<f32> {
    let images = p.n / (p.c * p.inner);
    var sum = vec2<f32>(0.0);
    for (var b = 0u; b < images; b++) {
        for (var k = 0u; k < p.chunks; k++) {
            sum += psums[(b * p.c + ch) * p.chunks + k];
        }
    }
    return sum;
}

@compute @workgroup_size(64)
fn backward_affine_from_sums(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    if (ch >= p.c) { return; }
    let sum = affine_sums(ch);
    pdgamma[ch] = sum.y;
    pdbeta[ch] = sum.x;
}

@group(0) @binding(4) var<storage, read_write> both_dgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> both_dbeta: array<f32>;

// Both of the above in one dispatch where the statistics are one run (s0 = 0): invocations
// 0 .. stats - 1 the group means, the next c ones dgamma and dbeta. (Two one-workgroup passes
// were two dispatches of overhead each on CPU devices.)
@compute @workgroup_size(256)
fn backward_means_and_affine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i < p.stats) {
        pmeans[i] = group_means(i);
    } else if (i < p.stats + p.c) {
        let sum = affine_sums(i - p.stats);
        both_dgamma[i - p.stats] = sum.y;
        both_dbeta[i - p.stats] = sum.x;
    }
}

@group(0) @binding(3) var<storage, read> dst4: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> dgamma4: array<f32>;
@group(0) @binding(5) var<storage, read> dmeans4: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> dx4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> dbeta4: array<f32>;   // act = 1

// The affine terms backward_dx's texels of one plane share, from the first one's index i0:
// (mean, 1/std, gamma, beta) and the group's means of g and g * xhat.
struct DxTerms {
    m: vec2<f32>, gamma: f32, beta: f32, mm: vec2<f32>,
}

fn dx_terms(i0: u32) -> DxTerms {
    let plane = 4u * i0 / p.inner;
    let s = p.s0 + plane / p.group_size;
    let ch = (p.s0 * p.group_size + plane) % p.c;
    var beta = 0.0;
    if (act() != 0u) {
        beta = dbeta4[ch];
    }
    return DxTerms(dst4[s], dgamma4[ch], beta, dmeans4[s]);
}

// ACC (a pipeline constant): dx is added to the values already in dx4 (the input's gradient
// from the other ops that read it), sparing a separate add pass.
const ACC: bool = false;

fn dx_of(x: vec4<f32>, dy: vec4<f32>, k: DxTerms) -> vec4<f32> {
    let xhat = (x - k.m.x) * k.m.y;
    let g = through_swish(dy, xhat, k.gamma, k.beta) * k.gamma;
    return k.m.y * (g - k.mm.x - xhat * k.mm.y);
}

// PER (see apply4) vec4s of one plane per invocation.
@compute @workgroup_size(256)
fn backward_dx4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = PER * flat(gid, nwg);
    if (i0 >= p.n / 4u) { return; }
    let k = dx_terms(i0);
    let o = p.i0 / 4u + i0;
    for (var j = 0u; j < PER; j++) {
        var v = dx_of(gx4[o + j], gdy4[o + j], k);
        if (ACC) {
            v = dx4[o + j] + v;
        }
        dx4[o + j] = v;
    }
}

// backward_dx4 reading x and dy through the flat textures backward_plane_sums_flat reads.
@compute @workgroup_size(256)
fn backward_dx_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = PER * flat(gid, nwg);
    if (i0 >= p.n / 4u) { return; }
    let k = dx_terms(i0);
    let o = p.i0 / 4u + i0;   // (the textures hold the run alone; dx is bound as x and dy are)
    for (var j = 0u; j < PER; j++) {
        var v = dx_of(x_texel(i0 + j), dy_texel(i0 + j), k);
        if (ACC) {
            v = dx4[o + j] + v;
        }
        dx4[o + j] = v;
    }
}

// ---- Backward of a layer norm whose rows are whole texels (C % 4 == 0) ----
// One invocation per row: the row's means of g = dy * gamma and g * xhat, then its dx (the row
// read again from cache); dgamma, dbeta by chunks of p.chunk rows per channel texel, then summed
// over the chunks. vec4 loads throughout.
@group(0) @binding(1) var<storage, read> lx4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ldy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> lst: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> lgamma4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> ldx4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn backward_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.stats) { return; }
    let c4 = p.c / 4u;
    let m = lst[p.s0 + r];   // (x, dy, dx bound from row s0)
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let e = r * c4 + i;
        let g = ldy4[e] * lgamma4[i];
        sg += g;
        sgx += g * (lx4[e] - m.x) * m.y;
    }
    let mg = (sg.x + sg.y + sg.z + sg.w) / f32(p.c);
    let mgx = (sgx.x + sgx.y + sgx.z + sgx.w) / f32(p.c);
    for (var i = 0u; i < c4; i++) {
        let e = r * c4 + i;
        let xhat = (lx4[e] - m.x) * m.y;
        ldx4[e] = m.y * (ldy4[e] * lgamma4[i] - mg - xhat * mgx);
    }
}

@group(0) @binding(4) var<storage, read_write> lpart4: array<vec4<f32>>;   // [chunks, 2, C/4]: sum dy * xhat, sum dy

@compute @workgroup_size(64)
fn backward_affine_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    let c4 = p.c / 4u;
    if (t >= p.chunks * c4) { return; }
    let chunk = t / c4;
    let i = t % c4;
    let r_end = min((chunk + 1u) * p.chunk, p.stats);
    var sgx = vec4<f32>(0.0);
    var sd = vec4<f32>(0.0);
    for (var r = chunk * p.chunk; r < r_end; r++) {
        let m = lst[p.s0 + r];
        let e = r * c4 + i;
        let d = ldy4[e];
        sd += d;
        sgx += d * (lx4[e] - m.x) * m.y;
    }
    // (Runs of rows start on a chunk: s0 is a multiple of p.chunk.)
    let part = p.s0 / p.chunk + chunk;
    lpart4[2u * part * c4 + i] = sgx;
    lpart4[(2u * part + 1u) * c4 + i] = sd;
}

// backward_rows4 and backward_affine_rows4 reading x, dy and gamma through flat rgba32float
// textures of all of them (row s0 + r of this run is row s0 + r there): on CPU devices texture
// fetches are gathers, where a buffer load runs a loop over the lanes (`Tuning::reads_via_texture`).
@group(0) @binding(1) var lx_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(2) var ldy_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(4) var lgamma_flat: texture_storage_2d_array<rgba32float, read>;

// (One reader per texture: GLSL takes no storage image as a function parameter.)
fn lx_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(lx_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn ldy_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(ldy_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn lgamma_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(lgamma_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

@compute @workgroup_size(64)
fn backward_rows4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.stats) { return; }
    let c4 = p.c / 4u;
    let m = lst[p.s0 + r];
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let e = (p.s0 + r) * c4 + i;
        let g = ldy_flat_at(e) * lgamma_flat_at(i);
        sg += g;
        sgx += g * (lx_flat_at(e) - m.x) * m.y;
    }
    let mg = (sg.x + sg.y + sg.z + sg.w) / f32(p.c);
    let mgx = (sgx.x + sgx.y + sgx.z + sgx.w) / f32(p.c);
    for (var i = 0u; i < c4; i++) {
        let e = (p.s0 + r) * c4 + i;
        let xhat = (lx_flat_at(e) - m.x) * m.y;
        ldx4[r * c4 + i] = m.y * (ldy_flat_at(e) * lgamma_flat_at(i) - mg - xhat * mgx);
    }
}

@compute @workgroup_size(64)
fn backward_affine_rows4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    let c4 = p.c / 4u;
    if (t >= p.chunks * c4) { return; }
    let chunk = t / c4;
    let i = t % c4;
    let r_end = min((chunk + 1u) * p.chunk, p.stats);
    var sgx = vec4<f32>(0.0);
    var sd = vec4<f32>(0.0);
    for (var r = chunk * p.chunk; r < r_end; r++) {
        let m = lst[p.s0 + r];
        let e = (p.s0 + r) * c4 + i;
        let d = ldy_flat_at(e);
        sd += d;
        sgx += d * (lx_flat_at(e) - m.x) * m.y;
    }
    let part = p.s0 / p.chunk + chunk;
    lpart4[2u * part * c4 + i] = sgx;
    lpart4[(2u * part + 1u) * c4 + i] = sd;
}

@group(0) @binding(1) var<storage, read> lparts4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> ldgamma4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ldbeta4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn backward_affine_combine4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let c4 = p.c / 4u;
    if (i >= c4) { return; }
    var sgx = vec4<f32>(0.0);
    var sd = vec4<f32>(0.0);
    for (var k = 0u; k < p.chunks; k++) {
        sgx += lparts4[2u * k * c4 + i];
        sd += lparts4[(2u * k + 1u) * c4 + i];
    }
    ldgamma4[i] = sgx;
    ldbeta4[i] = sd;
}
