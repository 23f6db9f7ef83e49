// Adam / AdamW step with PyTorch's semantics (torch.optim.Adam / AdamW,
// amsgrad off): bias-corrected moments, eps added after the square root
// of the corrected second moment, weight decay either coupled (added to
// the gradient, Adam) or decoupled (p *= 1 - lr*wd, AdamW).

struct Params {
    n: u32, decoupled: u32, _a: u32, _b: u32,
    lr: f32, beta1: f32, beta2: f32, eps: f32,
    weight_decay: f32, bc1: f32, bc2_sqrt: f32, _c: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn adam(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    var w = param[i];
    var g = grad[i];
    if (p.weight_decay != 0.0) {
        if (p.decoupled == 1u) {
            w = w * (1.0 - p.lr * p.weight_decay);
        } else {
            g = g + p.weight_decay * w;
        }
    }
    let mi = m[i] + (1.0 - p.beta1) * (g - m[i]);   // torch: exp_avg.lerp_(grad, 1 - beta1)
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    param[i] = w - (p.lr / p.bc1) * mi / denom;
}
