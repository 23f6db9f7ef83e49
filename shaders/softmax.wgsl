// Row softmax of scale * x over the last dimension; one invocation per row.
struct Params {
    rows: u32, cols: u32, scale: f32, causal: u32,
    tq: u32, q_start: u32, r0: u32, valid: u32,   // causal: row r sees columns j <= q_start + (r0 + r) % tq (r0: this piece's first row)
}
// valid: the columns softmax_masked and softmax_backward read; the rest of a row (padding, so
// that rows start on whole vec4s) they set to zero, whatever it held. `softmax` reads all.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var m = -3.4e38;
    for (var j = 0u; j < p.cols; j++) {
        m = max(m, p.scale * x[base + j]);
    }
    var s = 0.0;
    for (var j = 0u; j < p.cols; j++) {
        let e = exp(p.scale * x[base + j] - m);
        y[base + j] = e;
        s += e;
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < p.cols; j++) {
        y[base + j] *= inv;
    }
}

// dx = scale * y * (dy - sum_j dy_j y_j) per row; binding 1 is y, 3 is dy.
@group(0) @binding(3) var<storage, read> dy: array<f32>;

@compute @workgroup_size(64)
fn softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var dot_ = 0.0;
    for (var j = 0u; j < p.valid; j++) {
        dot_ += dy[base + j] * x[base + j];
    }
    for (var j = 0u; j < p.valid; j++) {
        y[base + j] = p.scale * x[base + j] * (dy[base + j] - dot_);
    }
    for (var j = p.valid; j < p.cols; j++) {
        y[base + j] = 0.0;
    }
}

// Each row over its l2 norm, sqrt(sum x^2 + 1e-24) (the codebook lookup's F.normalize; it differs
// from torch's max(norm, 1e-12) only for rows of norm below ~1e-12); y: binding 2.
@compute @workgroup_size(64)
fn l2_normalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var s = 0.0;
    for (var j = 0u; j < p.cols; j++) {
        s += x[base + j] * x[base + j];
    }
    let inv = 1.0 / sqrt(s + 1e-24);
    for (var j = 0u; j < p.cols; j++) {
        y[base + j] = x[base + j] * inv;
    }
}

// Its gradient: dx = (dy - y (y . dy)) / sqrt(sum x^2 + 1e-24), y = x's row normalised; binding 1
// is x, 3 dy, 2 dx.
@compute @workgroup_size(64)
fn l2_normalize_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var s = 0.0;
    var xdy = 0.0;
    for (var j = 0u; j < p.cols; j++) {
        s += x[base + j] * x[base + j];
        xdy += x[base + j] * dy[base + j];
    }
    let inv = 1.0 / sqrt(s + 1e-24);
    let ydy = xdy * inv;
    for (var j = 0u; j < p.cols; j++) {
        y[base + j] = (dy[base + j] - x[base + j] * inv * ydy) * inv;
    }
}

// Attention probabilities: masked softmax of scale * scores per row, zeros
// past the causal limit, and each row's log-sum-exp (of the scaled scores),
// as the fused attention kernel writes it for backward.
@group(0) @binding(3) var<storage, read_write> row_lse: array<f32>;

// The columns row r of this run sees: the first `valid`, and with the causal mask those up to its
// query's position.
fn visible_columns(r: u32) -> u32 {
    if (p.causal == 1u) {
        return min(p.valid, p.q_start + (p.r0 + r) % p.tq + 1u);
    }
    return p.valid;
}

@compute @workgroup_size(64)
fn softmax_masked(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    let last = visible_columns(r);
    var m = -3.4e38;
    for (var j = 0u; j < last; j++) {
        m = max(m, p.scale * x[base + j]);
    }
    var s = 0.0;
    for (var j = 0u; j < last; j++) {
        let e = exp(p.scale * x[base + j] - m);
        y[base + j] = e;
        s += e;
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < last; j++) {
        y[base + j] *= inv;
    }
    for (var j = last; j < p.cols; j++) {
        y[base + j] = 0.0;
    }
    row_lse[p.r0 + r] = m + log(s);
}

// The same two kernels on rows of whole vec4s (cols % 4 == 0, as attention's padded rows): a
// vector load or store per four values, the sums still taken value by value in column order, so
// the numbers are those of the scalar kernels.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> dy4: array<vec4<f32>>;

// Which of the four columns from `first` on lie below `last`.
fn before(first: u32, last: u32) -> vec4<bool> {
    return first + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(last);
}

@compute @workgroup_size(64)
fn softmax_masked4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols / 4u;
    let last = visible_columns(r);
    let n4 = (last + 3u) / 4u;
    let lowest = vec4<f32>(-3.4e38);
    var m = -3.4e38;
    for (var j = 0u; j < n4; j++) {
        let v = select(lowest, p.scale * x4[base + j], before(4u * j, last));
        m = max(m, max(max(v.x, v.y), max(v.z, v.w)));
    }
    var s = 0.0;
    for (var j = 0u; j < n4; j++) {
        let e = select(vec4<f32>(0.0), exp(p.scale * x4[base + j] - m), before(4u * j, last));
        y4[base + j] = e;
        s += e.x;
        s += e.y;
        s += e.z;
        s += e.w;
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < n4; j++) {
        y4[base + j] *= inv;
    }
    for (var j = n4; j < p.cols / 4u; j++) {
        y4[base + j] = vec4<f32>(0.0);
    }
    row_lse[p.r0 + r] = m + log(s);
}

@compute @workgroup_size(64)
fn softmax_backward4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols / 4u;
    let n4 = (p.valid + 3u) / 4u;
    var dot_ = 0.0;
    for (var j = 0u; j < n4; j++) {
        let d = select(vec4<f32>(0.0), dy4[base + j] * x4[base + j], before(4u * j, p.valid));
        dot_ += d.x;
        dot_ += d.y;
        dot_ += d.z;
        dot_ += d.w;
    }
    for (var j = 0u; j < n4; j++) {
        let g = p.scale * x4[base + j] * (dy4[base + j] - dot_);
        y4[base + j] = select(vec4<f32>(0.0), g, before(4u * j, p.valid));
    }
    for (var j = n4; j < p.cols / 4u; j++) {
        y4[base + j] = vec4<f32>(0.0);
    }
}

// `softmax_masked4` and `softmax_backward4` reading x (and dy) through flat rgba32float textures
// of the whole tensor (`kernels::copy::flat_texture_vec4`: 16 texels a row, 4096 rows a layer;
// row r of this run is row r0 + r there): on CPU devices texture fetches are gathers, where a
// buffer load runs a loop over the lanes (`Tuning::reads_via_texture`). The masked softmax's
// last pass recomputes each exp (the same value) instead of reading back what it stored.
@group(0) @binding(1) var x_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(3) var dy_flat: texture_storage_2d_array<rgba32float, read>;

// (One reader per texture: GLSL takes no storage image as a function parameter.)
fn x_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(x_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn dy_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(dy_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

@compute @workgroup_size(64)
fn softmax_masked4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols / 4u;
    let at = (p.r0 + r) * p.cols / 4u;
    let last = visible_columns(r);
    let n4 = (last + 3u) / 4u;
    let lowest = vec4<f32>(-3.4e38);
    var m = -3.4e38;
    for (var j = 0u; j < n4; j++) {
        let v = select(lowest, p.scale * x_flat_at(at + j), before(4u * j, last));
        m = max(m, max(max(v.x, v.y), max(v.z, v.w)));
    }
    var s = 0.0;
    for (var j = 0u; j < n4; j++) {
        let e = select(vec4<f32>(0.0), exp(p.scale * x_flat_at(at + j) - m), before(4u * j, last));
        s += e.x;
        s += e.y;
        s += e.z;
        s += e.w;
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < n4; j++) {
        let e = select(vec4<f32>(0.0), exp(p.scale * x_flat_at(at + j) - m), before(4u * j, last));
        y4[base + j] = e * inv;
    }
    for (var j = n4; j < p.cols / 4u; j++) {
        y4[base + j] = vec4<f32>(0.0);
    }
    row_lse[p.r0 + r] = m + log(s);
}

@compute @workgroup_size(64)
fn softmax_backward4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols / 4u;
    let at = (p.r0 + r) * p.cols / 4u;
    let n4 = (p.valid + 3u) / 4u;
    var dot_ = 0.0;
    for (var j = 0u; j < n4; j++) {
        let d = select(vec4<f32>(0.0), dy_flat_at(at + j) * x_flat_at(at + j), before(4u * j, p.valid));
        dot_ += d.x;
        dot_ += d.y;
        dot_ += d.z;
        dot_ += d.w;
    }
    for (var j = 0u; j < n4; j++) {
        let g = p.scale * x_flat_at(at + j) * (dy_flat_at(at + j) - dot_);
        y4[base + j] = select(vec4<f32>(0.0), g, before(4u * j, p.valid));
    }
    for (var j = n4; j < p.cols / 4u; j++) {
        y4[base + j] = vec4<f32>(0.0);
    }
}
