// Convolution = im2col straight into the matmul's B-operand texture, then
// the texture-fed matmul (weights [Cout, Cin*kh*kw] as A, bias per row).
// Texel (x, k) of layer l holds patch row k = (ci, ky, kx) for output pixels
// n0 + 4x .. n0 + 4x + 3 of image b0 + l; taps outside the (padded) input are 0.
// Padding is given per side so that the reference's Downsample (pad right and
// bottom by one, then a 3x3 stride-2 conv) needs no separate pad pass.

struct Params {
    cin: u32, h: u32, w: u32, wo: u32,
    kh: u32, kw: u32, stride: u32, pad_t: u32,
    pad_l: u32, k: u32, n: u32, n0: u32,
    b0: u32, _a: u32, _b: u32, _c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var dst: texture_storage_2d_array<rgba32float, write>;

@compute @workgroup_size(8, 8, 1)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    var v = vec4<f32>(0.0);
    let row = gid.y;
    if (row < p.k) {
        let kx = row % p.kw;
        let ky = (row / p.kw) % p.kh;
        let ci = row / (p.kw * p.kh);
        let plane = ((p.b0 + gid.z) * p.cin + ci) * p.h * p.w;
        for (var i = 0u; i < 4u; i++) {
            let n = p.n0 + 4u * gid.x + i;
            if (n < p.n) {
                let oy = n / p.wo;
                let ox = n % p.wo;
                let iy = i32(oy * p.stride + ky) - i32(p.pad_t);
                let ix = i32(ox * p.stride + kx) - i32(p.pad_l);
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    v[i] = x[plane + u32(iy) * p.w + u32(ix)];
                }
            }
        }
    }
    textureStore(dst, vec2<u32>(gid.xy), gid.z, v);
}
