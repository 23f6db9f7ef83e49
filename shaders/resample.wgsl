// Nearest x2 upsampling and zero padding of [planes, H, W] images.

struct Params {
    n: u32, h: u32, w: u32, ho: u32,
    wo: u32, pad_t: u32, pad_l: u32, _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn upsample2x(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ox = i % p.wo;
    let oy = (i / p.wo) % p.ho;
    let plane = i / (p.wo * p.ho);
    out[i] = x[(plane * p.h + oy / 2u) * p.w + ox / 2u];
}

// upsample2x for widths % 4 == 0: each invocation reads one vec4 of an input
// row and writes the four vec4s it becomes in two output rows (buffer
// accesses run lane by lane on CPU devices: 1 load + 4 stores per 16 outputs
// instead of 16 + 16). p.n counts input vec4s.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn upsample2x4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    let w4 = p.w / 4u;
    let row = q / w4;   // plane * h + iy
    let o = (2u * row * p.wo) / 4u + 2u * (q % w4);   // output row 2 * iy, vec4 column 2s
    let v = x4[q];
    let lo = v.xxyy;
    let hi = v.zzww;
    out4[o] = lo;
    out4[o + 1u] = hi;
    out4[o + p.wo / 4u] = lo;
    out4[o + p.wo / 4u + 1u] = hi;
}

@compute @workgroup_size(256)
fn pad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ox = i32(i % p.wo) - i32(p.pad_l);
    let oy = i32((i / p.wo) % p.ho) - i32(p.pad_t);
    let plane = i / (p.wo * p.ho);
    var v = 0.0;
    if (ox >= 0 && ox < i32(p.w) && oy >= 0 && oy < i32(p.h)) {
        v = x[(plane * p.h + u32(oy)) * p.w + u32(ox)];
    }
    out[i] = v;
}

// Backward of upsample2x: each input pixel gathers its 2x2 block.
// Here x is the gradient [planes, ho, wo] and out is [planes, h, w].
@compute @workgroup_size(256)
fn upsample2x_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let plane = i / (p.w * p.h);
    let base = (plane * p.ho + 2u * iy) * p.wo + 2u * ix;
    out[i] = x[base] + x[base + 1u] + x[base + p.wo] + x[base + p.wo + 1u];
}

// Backward of pad: the gradient [planes, ho, wo] cropped back to [planes, h, w].
@compute @workgroup_size(256)
fn crop(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let plane = i / (p.w * p.h);
    out[i] = x[(plane * p.ho + iy + p.pad_t) * p.wo + ix + p.pad_l];
}

// 2x2 max pooling, stride 2 (floor): x [planes, h, w] -> out [planes, ho, wo].
@compute @workgroup_size(256)
fn maxpool2x2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ox = i % p.wo;
    let oy = (i / p.wo) % p.ho;
    let plane = i / (p.wo * p.ho);
    let base = (plane * p.h + 2u * oy) * p.w + 2u * ox;
    out[i] = max(max(x[base], x[base + 1u]), max(x[base + p.w], x[base + p.w + 1u]));
}

@group(0) @binding(3) var<storage, read> pool_in: array<f32>;

// Backward of maxpool2x2: each input pixel takes its window's gradient if it
// is the window's first maximum in scan order (as PyTorch), else 0.
// Here x is the gradient [planes, ho, wo], pool_in the forward input, out [planes, h, w].
@compute @workgroup_size(256)
fn maxpool2x2_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let plane = i / (p.w * p.h);
    let ox = ix / 2u;
    let oy = iy / 2u;
    var g = 0.0;
    if (ox < p.wo && oy < p.ho) {
        let base = (plane * p.h + 2u * oy) * p.w + 2u * ox;
        let c = array<u32, 4>(base, base + 1u, base + p.w, base + p.w + 1u);
        var best = 0u;
        for (var k = 1u; k < 4u; k++) {
            if (pool_in[c[k]] > pool_in[c[best]]) { best = k; }
        }
        if (c[best] == (plane * p.h + iy) * p.w + ix) {
            g = x[(plane * p.ho + oy) * p.wo + ox];
        }
    }
    out[i] = g;
}
