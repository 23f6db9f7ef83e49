// Adam / AdamW step with PyTorch's semantics (torch.optim.Adam / AdamW,
// amsgrad off): bias-corrected moments, eps added after the square root
// of the corrected second moment, weight decay either coupled (added to
// the gradient, Adam) or decoupled (p *= 1 - lr*wd, AdamW).

struct Params {
    n: u32, decoupled: u32, _pad0: u32, _pad1: u32,
    lr: f32, beta1: f32, beta2: f32, eps: f32,
    weight_decay: f32, bc1: f32, bc2_sqrt: f32, _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

struct Step {
    w: vec4<f32>,
    m: vec4<f32>,
    v: vec4<f32>,
}

// One step for four parameters (the scalar entry uses lane x): new weight and moments.
fn step4(w0: vec4<f32>, g0: vec4<f32>, m0: vec4<f32>, v0: vec4<f32>) -> Step {
    var w = w0;
    var g = g0;
    if (p.weight_decay != 0.0) {
        if (p.decoupled == 1u) {
            w = w * (1.0 - p.lr * p.weight_decay);
        } else {
            g = g + p.weight_decay * w;
        }
    }
    let mi = m0 + (1.0 - p.beta1) * (g - m0);   // torch: exp_avg.lerp_(grad, 1 - beta1)
    let vi = p.beta2 * v0 + (1.0 - p.beta2) * g * g;
    let denom = sqrt(vi) / p.bc2_sqrt + p.eps;
    return Step(w - (p.lr / p.bc1) * mi / denom, mi, vi);
}

@compute @workgroup_size(256)
fn adam(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    let s = step4(vec4<f32>(param[i]), vec4<f32>(grad[i]), vec4<f32>(m[i]), vec4<f32>(v[i]));
    m[i] = s.m.x;
    v[i] = s.v.x;
    param[i] = s.w.x;
}

// Four parameters per invocation (n % 4 == 0; p.n counts vec4s): a per-lane
// buffer access runs lane by lane on lavapipe, so a vec4 costs about one float.
@group(0) @binding(1) var<storage, read_write> param4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> m4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> v4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn adam4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    let s = step4(param4[i], grad4[i], m4[i], v4[i]);
    m4[i] = s.m;
    v4[i] = s.v;
    param4[i] = s.w;
}

// `adam4` reading the weights, gradients and moments through flat rgba32float textures of the
// dispatch's window (`kernels::copy::flat_texture_vec4_range`: 16 texels a row, 4096 rows a
// layer) and writing the buffers: on CPU devices texture fetches are gathers, where a buffer load
// runs a loop over the lanes (`Tuning::reads_via_texture`).
@group(0) @binding(2) var grad_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(5) var param_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(6) var m_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(7) var v_flat: texture_storage_2d_array<rgba32float, read>;

// (One reader per texture: GLSL takes no storage image as a function parameter.)
fn grad_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(grad_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn param_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(param_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn m_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(m_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn v_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(v_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

@compute @workgroup_size(256)
fn adam4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    let s = step4(param_flat_at(i), grad_flat_at(i), m_flat_at(i), v_flat_at(i));
    m4[i] = s.m;
    v4[i] = s.v;
    param4[i] = s.w;
}
