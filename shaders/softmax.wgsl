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

// Attention probabilities: masked softmax of scale * scores per row, zeros
// past the causal limit, and each row's log-sum-exp (of the scaled scores),
// as the fused attention kernel writes it for backward.
@group(0) @binding(3) var<storage, read_write> row_lse: array<f32>;

@compute @workgroup_size(64)
fn softmax_masked(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var last = p.valid;
    if (p.causal == 1u) {
        last = min(p.valid, p.q_start + (p.r0 + r) % p.tq + 1u);
    }
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
    row_lse[r] = m + log(s);
}
