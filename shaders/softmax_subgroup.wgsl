// Row softmax (shaders/softmax.wgsl: the same parameters, bindings and results) by a workgroup
// of 64 invocations per row instead of one invocation per row: each folds a strided share of the
// columns, then subgroup reductions (subgroupMax, subgroupAdd) and one slot per subgroup in
// workgroup memory give the row's max and sum. GPU-shaped (Tuning::reduce_subgroup): a row per
// invocation leaves a GPU mostly idle when rows are few and long (the VQGAN's attention: 256 rows
// of 256 at 16x16). Its own module because subgroup operations fail validation on devices
// without them. Any subgroup size works (the partials are indexed by subgroup_id).
struct Params {
    rows: u32, cols: u32, scale: f32, causal: u32,
    tq: u32, q_start: u32, r0: u32, valid: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> partials: array<f32, 64>;

// The row's max of every invocation's v (called by the whole workgroup).
fn row_max(v: f32, sg: u32, lane: u32, nsg: u32) -> f32 {
    let s = subgroupMax(v);
    if (lane == 0u) {
        partials[sg] = s;
    }
    workgroupBarrier();
    var r = partials[0];
    for (var i = 1u; i < nsg; i++) {
        r = max(r, partials[i]);
    }
    workgroupBarrier();
    return r;
}

// The row's sum of every invocation's v (called by the whole workgroup).
fn row_sum(v: f32, sg: u32, lane: u32, nsg: u32) -> f32 {
    let s = subgroupAdd(v);
    if (lane == 0u) {
        partials[sg] = s;
    }
    workgroupBarrier();
    var r = 0.0;
    for (var i = 0u; i < nsg; i++) {
        r += partials[i];
    }
    workgroupBarrier();
    return r;
}

// Row of workgroup w, and its column count (0 past the last row, so that every invocation still
// reaches the barriers).
fn row_cols(w: u32) -> u32 {
    return select(0u, p.cols, w < p.rows);
}

// y = softmax(scale * x) over the `n` values of the row at `base` (called by the whole
// workgroup); returns the row's (max, sum of exponentials).
fn softmax_row(base: u32, n: u32, li: u32, sg: u32, lane: u32, nsg: u32) -> vec2<f32> {
    var m = -3.4e38;
    for (var j = li; j < n; j += WG) {
        m = max(m, p.scale * x[base + j]);
    }
    m = row_max(m, sg, lane, nsg);
    var s = 0.0;
    for (var j = li; j < n; j += WG) {
        let e = exp(p.scale * x[base + j] - m);
        y[base + j] = e;
        s += e;
    }
    s = row_sum(s, sg, lane, nsg);
    let inv = 1.0 / s;
    for (var j = li; j < n; j += WG) {
        y[base + j] *= inv;
    }
    return vec2<f32>(m, s);
}

@compute @workgroup_size(64)
fn softmax_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
              @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let r = wid.x + wid.y * nwg.x;
    softmax_row(r * p.cols, row_cols(r), li, sg, lane, nsg);
}

// dx = scale * y * (dy - sum_j dy_j y_j) per row; binding 1 is y, 3 is dy.
@group(0) @binding(3) var<storage, read> dy: array<f32>;

@compute @workgroup_size(64)
fn softmax_backward_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                       @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let r = wid.x + wid.y * nwg.x;
    let cols = row_cols(r);
    let valid = min(cols, p.valid);
    let base = r * p.cols;
    var d = 0.0;
    for (var j = li; j < valid; j += WG) {
        d += dy[base + j] * x[base + j];
    }
    d = row_sum(d, sg, lane, nsg);
    for (var j = li; j < valid; j += WG) {
        y[base + j] = p.scale * x[base + j] * (dy[base + j] - d);
    }
    for (var j = valid + li; j < cols; j += WG) {
        y[base + j] = 0.0;
    }
}

// Attention probabilities with the causal limit and each row's log-sum-exp, as
// softmax.wgsl's softmax_masked.
@group(0) @binding(3) var<storage, read_write> row_lse: array<f32>;

@compute @workgroup_size(64)
fn softmax_masked_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
                     @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let r = wid.x + wid.y * nwg.x;
    let cols = row_cols(r);
    let base = r * p.cols;
    var last = min(cols, p.valid);
    if (p.causal == 1u && cols > 0u) {
        last = min(last, p.q_start + (p.r0 + r) % p.tq + 1u);
    }
    let ms = softmax_row(base, last, li, sg, lane, nsg);
    for (var j = last + li; j < cols; j += WG) {
        y[base + j] = 0.0;
    }
    if (li == 0u && cols > 0u) {
        row_lse[p.r0 + r] = ms.x + log(ms.y);
    }
}
