// Elementwise maps: activations, scaling, binary arithmetic with broadcasting.
// One invocation per element; 2-D grids for large tensors.

struct Params {
    n: u32, op: u32, b_inner: u32, b_len: u32,   // b index = (i / b_inner) % b_len
    alpha: f32, beta: f32, i0: u32, _pad1: u32,   // i0: where this piece starts in a broadcast's index
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

// Fixed per pipeline where the launcher knows them (engine::shaders::specialize): lavapipe
// (Mesa 22.3) runs every case of a switch and both sides of a branch under masks, even when the
// condition is uniform, and divides vectors lane by lane.
const ALL: u32 = 0xffffffffu;
const OP: u32 = ALL;   // the op code (ALL: p.op decides)
const B_INNER: u32 = 0u;   // binary4: p.b_inner (0: the parameter decides)
const SAME: bool = false;   // binary4: b has a's shape and is walked with it

fn op() -> u32 {
    if (OP == ALL) {
        return p.op;
    }
    return OP;
}

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// Stable on both tails: exp of -|x| only.
fn sigmoid(x: vec4<f32>) -> vec4<f32> {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= vec4<f32>(0.0));
}

// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), so GELU
// matches PyTorch's exact (erf) form to float32 precision.
fn erf(x: vec4<f32>) -> vec4<f32> {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, x >= vec4<f32>(0.0));
}

// op: 0 swish x*sigmoid(x), 1 gelu, 2 leaky relu (slope alpha), 3 sigmoid,
//     4 alpha*x + beta, 5 relu, 6 exp, 7 abs, 8 sqrt, 9 1/x, 10 softplus, 11 ln x.
// Written for four values; the scalar entries use lane x.
fn unary4(x: vec4<f32>) -> vec4<f32> {
    switch op() {
        case 0u: { return x * sigmoid(x); }
        case 1u: { return 0.5 * x * (1.0 + erf(x * 0.70710678118654752)); }
        case 2u: { return select(p.alpha * x, x, x >= vec4<f32>(0.0)); }
        case 3u: { return sigmoid(x); }
        case 4u: { return p.alpha * x + p.beta; }
        case 5u: { return max(x, vec4<f32>(0.0)); }
        case 6u: { return exp(x); }
        case 7u: { return abs(x); }
        case 8u: { return sqrt(x); }
        case 10u: { return max(x, vec4<f32>(0.0)) + log(1.0 + exp(-abs(x))); }
        case 11u: { return log(x); }
        default: { return 1.0 / x; }
    }
}

// dy * f'(x) for the same op codes.
fn unary_backward4(x: vec4<f32>, dy: vec4<f32>) -> vec4<f32> {
    var d: vec4<f32>;
    switch op() {
        case 0u: { let s = sigmoid(x); d = s * (1.0 + x * (1.0 - s)); }
        case 1u: { d = 0.5 * (1.0 + erf(x * 0.70710678118654752)) + x * 0.39894228040143268 * exp(-0.5 * x * x); }
        case 2u: { d = select(vec4<f32>(p.alpha), vec4<f32>(1.0), x >= vec4<f32>(0.0)); }
        case 3u: { let s = sigmoid(x); d = s * (1.0 - s); }
        case 4u: { d = vec4<f32>(p.alpha); }
        case 5u: { d = select(vec4<f32>(0.0), vec4<f32>(1.0), x > vec4<f32>(0.0)); }
        case 6u: { d = exp(x); }
        case 7u: { d = sign(x); }
        case 8u: { d = 0.5 / sqrt(x); }
        case 10u: { d = sigmoid(x); }
        case 11u: { d = 1.0 / x; }
        default: { d = -1.0 / (x * x); }
    }
    return dy * d;
}

@compute @workgroup_size(256)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = unary4(vec4<f32>(a[i])).x;
}

// op: 0 alpha*a + beta*b, 1 a*b, 2 a/b, 3 max(a, b), 4 beta*b (broadcast b over a's shape)
fn combine4(x: vec4<f32>, y: vec4<f32>) -> vec4<f32> {
    switch op() {
        case 0u: { return p.alpha * x + p.beta * y; }
        case 1u: { return x * y; }
        case 2u: { return x / y; }
        case 3u: { return max(x, y); }
        default: { return p.beta * y; }
    }
}

// The scalar entries use lane x of the one definition above.
fn combine(x: f32, y: f32) -> f32 {
    return combine4(vec4<f32>(x), vec4<f32>(y)).x;
}

@compute @workgroup_size(256)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = combine(a[i], b[((i + p.i0) / p.b_inner) % p.b_len]);
}

// `binary` four elements at a time (p.n counts vec4s) where a, b and each
// run of b_inner are whole vec4s: one load of each and one store per four
// elements (buffer accesses run lane by lane on CPU devices). b is either
// a's shape walked in step (b_inner = 1) or one value per run of b_inner % 4 == 0.
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> b4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn binary4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    let i = 4u * q + p.i0;
    var y: vec4<f32>;
    let inner = select(p.b_inner, B_INNER, B_INNER != 0u);
    if (SAME) {
        y = b4[q];
    } else if (inner == 1u) {
        y = b4[(i % p.b_len) / 4u];
    } else {
        let k = (i / inner) % p.b_len;
        y = vec4<f32>(b4[k / 4u][k % 4u]);
    }
    out4[q] = combine4(a4[q], y);
}

// `binary4`, `unary_vec4` and `unary_backward_vec4` with a and b (of the same shape) read through
// flat rgba32float textures
// (`kernels::copy::flat_texture_vec4`: 16 texels a row, 4096 rows a layer; p.i0 is this
// dispatch's first vec4): on CPU devices texture fetches are gathers, where a buffer load runs a
// loop over the lanes (`Tuning::reads_via_texture`).
@group(0) @binding(1) var a_flat: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(3) var b_flat: texture_storage_2d_array<rgba32float, read>;

// (One reader per texture: GLSL takes no storage image as a function parameter.)
fn a_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(a_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

fn b_flat_at(q: u32) -> vec4<f32> {
    return textureLoad(b_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

@compute @workgroup_size(256)
fn binary4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    out4[q] = combine4(a_flat_at(p.i0 + q), b_flat_at(p.i0 + q));
}

@compute @workgroup_size(256)
fn unary4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    out4[q] = unary4(a_flat_at(p.i0 + q));
}

@compute @workgroup_size(256)
fn unary_backward4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    out4[q] = unary_backward4(a_flat_at(p.i0 + q), b_flat_at(p.i0 + q));
}

// dx = dy * f'(x) for the `unary` ops (same codes); `a` is x, `b` is dy.
@compute @workgroup_size(256)
fn unary_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = unary_backward4(vec4<f32>(a[i]), vec4<f32>(b[i])).x;
}

// Four elements per invocation (p.n counts vec4s), where the size is a multiple of 4.
@compute @workgroup_size(256)
fn unary_vec4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    out4[q] = unary4(a4[q]);
}

@compute @workgroup_size(256)
fn unary_backward_vec4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    out4[q] = unary_backward4(a4[q], b4[q]);
}

// `binary` with b broadcast over the middle dimension: a is [outer, mid, inner]
// (mid = p.b_len), b is [outer, inner] (inner = p.b_inner); same op codes.
@compute @workgroup_size(256)
fn binary_mid(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    out[i] = combine(a[i], b[(i / (p.b_len * p.b_inner)) * p.b_inner + i % p.b_inner]);
}
