// Cross-entropy with log-softmax, per row: loss = logsumexp(x) - x[target].
// Rows whose target is `ignore` (0xffffffff) give 0. Also writes logsumexp for backward.
// Logits larger than one storage binding are dispatched by runs of rows: logits (and dlogits)
// bound from row r0, the per-row tensors whole.
struct Params {
    rows: u32, cols: u32, r0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(64)
fn cross_entropy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    var m = -3.4e38;
    for (var j = 0u; j < p.cols; j++) {
        m = max(m, logits[base + j]);
    }
    var s = 0.0;
    for (var j = 0u; j < p.cols; j++) {
        s += exp(logits[base + j] - m);
    }
    let l = m + log(s);
    lse[p.r0 + r] = l;
    let t = targets[p.r0 + r];
    if (t >= p.cols) {
        loss[p.r0 + r] = 0.0;
    } else {
        loss[p.r0 + r] = l - logits[base + t];
    }
}

// dlogits = (softmax(x) - onehot(target)) * g, g = the gradient of the row's
// loss; softmax is rebuilt from the saved logsumexp.
@group(0) @binding(3) var<storage, read> dloss: array<f32>;
@group(0) @binding(4) var<storage, read> lse_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> dlogits: array<f32>;

@compute @workgroup_size(64)
fn cross_entropy_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) { return; }
    let base = r * p.cols;
    let t = targets[p.r0 + r];
    var g = dloss[p.r0 + r];
    if (t >= p.cols) { g = 0.0; }
    let l = lse_in[p.r0 + r];
    for (var j = 0u; j < p.cols; j++) {
        var d = exp(logits[base + j] - l);
        if (j == t) { d -= 1.0; }
        dlogits[base + j] = g * d;
    }
}
