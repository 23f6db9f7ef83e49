// Nearest-codebook lookup of VectorQuantizer2: for each position of z
// ([B, D, h*w]) the index of the closest codebook row (squared L2 written as
// |z|² + |e|² - 2 z·e, as the reference computes it; first index on ties, as
// torch.argmin), and z_q gathered back into [B, D, h*w].

struct Params {
    b: u32, d: u32, hw: u32, n_e: u32,
    // nearest_scored: positions p0 .. p0 + np of images i0 .. i0 + b of the bound windows, whose
    // scores it reads.
    p0: u32, np: u32, i0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read> codebook: array<f32>;
@group(0) @binding(3) var<storage, read_write> indices: array<u32>;
@group(0) @binding(4) var<storage, read_write> zq: array<f32>;

// |z|² of the position whose first value is z[zbase] (channels p.hw apart).
fn z_norm(zbase: u32) -> f32 {
    var zz = 0.0;
    for (var c = 0u; c < p.d; c++) {
        let v = z[zbase + c * p.hw];
        zz += v * v;
    }
    return zz;
}

// The chosen code's index and its vector as z_q.
fn write_nearest(t: u32, zbase: u32, best: u32) {
    indices[t] = best;
    for (var c = 0u; c < p.d; c++) {
        zq[zbase + c * p.hw] = codebook[best * p.d + c];
    }
}

@compute @workgroup_size(64)
fn nearest(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.b * p.hw) { return; }
    let b = t / p.hw;
    let pos = t % p.hw;
    let zbase = b * p.d * p.hw + pos;
    let zz = z_norm(zbase);
    var best = 0u;
    var best_d = 3.4e38;
    for (var e = 0u; e < p.n_e; e++) {
        var ee = 0.0;
        var ze = 0.0;
        for (var c = 0u; c < p.d; c++) {
            let w = codebook[e * p.d + c];
            ee += w * w;
            ze += z[zbase + c * p.hw] * w;
        }
        let dist = zz + ee - 2.0 * ze;
        if (dist < best_d) {
            best_d = dist;
            best = e;
        }
    }
    write_nearest(t, zbase, best);
}

// The same search from precomputed pieces (`nearest_scored`): scores[b, e, pos]
// = z·e from the matmul's product (its multiply-adds run over the D channels
// in order, as the loop above does, so every distance is the same number)
// and norms[e] = |e|² (`code_norms`). Each position then reads n_e scores
// instead of recomputing n_e dot products from the codebook, which ran lane
// by lane on CPU devices (190 ms for a 16x16 code grid of 1024 codes).
@group(0) @binding(1) var<storage, read> rows: array<f32>;
@group(0) @binding(2) var<storage, read_write> row_norms: array<f32>;

@compute @workgroup_size(64)
fn code_norms(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * 64u;
    if (e >= p.n_e) { return; }
    var ee = 0.0;
    for (var c = 0u; c < p.d; c++) {
        let w = rows[e * p.d + c];
        ee += w * w;
    }
    row_norms[e] = ee;
}

@group(0) @binding(5) var<storage, read> scores: array<f32>;
@group(0) @binding(6) var<storage, read> norms: array<f32>;

@compute @workgroup_size(64)
fn nearest_scored(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.b * p.np) { return; }
    let b = p.i0 + t / p.np;
    let s = t % p.np;
    let pos = p.p0 + s;
    let zbase = b * p.d * p.hw + pos;
    let zz = z_norm(zbase);
    var best = 0u;
    var best_d = 3.4e38;
    // scores [b, n_e, np]: this dispatch's positions only.
    let sbase = (b - p.i0) * p.n_e * p.np + s;
    for (var e = 0u; e < p.n_e; e++) {
        let dist = zz + norms[e] - 2.0 * scores[sbase + e * p.np];
        if (dist < best_d) {
            best_d = dist;
            best = e;
        }
    }
    write_nearest(b * p.hw + pos, zbase, best);
}

// Categorical channels. `argmax`: the index of the largest of the n_e
// channels of each position of logits [B, n_e, h*w] (GumbelQuantize's hard
// choice without its noise; first index on ties, as torch.argmax).
@group(0) @binding(2) var<storage, read_write> best_channel: array<u32>;

@compute @workgroup_size(64)
fn argmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.b * p.hw) { return; }
    let base = (t / p.hw) * p.n_e * p.hw + t % p.hw;
    var best = 0u;
    var best_v = z[base];
    for (var e = 1u; e < p.n_e; e++) {
        let v = z[base + e * p.hw];
        if (v > best_v) {
            best_v = v;
            best = e;
        }
    }
    best_channel[t] = best;
}

// `one_hot`: label ids [B, h*w] -> [B, n_e, h*w] with 1 at the id's channel
// (a segmentation map as VQSegmentationModel reads it; ids were range-checked).
@group(0) @binding(1) var<storage, read> labels: array<u32>;

@compute @workgroup_size(64)
fn one_hot(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.b * p.n_e * p.hw) { return; }
    let pos = i % p.hw;
    let e = (i / p.hw) % p.n_e;
    let b = i / (p.hw * p.n_e);
    row_norms[i] = select(0.0, 1.0, labels[b * p.hw + pos] == e);
}
