// Data movement: padded repacking of matrices, block copies along one
// dimension (concat / slice), batched transpose, and f16 -> f32 widening.
// One invocation per output element; 2-D dispatch grids for large tensors.

struct Params {
    n: u32,      // output elements
    a: u32, b: u32, c: u32,
    d: u32, e: u32, f: u32, g: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// dst[bt, r, c] (shape [batch, a=rows_out, b=cols_out]) = src[d + bt*e + r*f + c]
// when r < c_rows (p.c) and c < p.g, else 0.
@compute @workgroup_size(256)
fn pad2d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let col = i % p.b;
    let row = (i / p.b) % p.a;
    let bt = i / (p.a * p.b);
    var v = 0.0;
    if (row < p.c && col < p.g) {
        v = src[p.d + bt * p.e + row * p.f + col];
    }
    dst[i] = v;
}

// View src as [outer, a=src_dim, inner=c] and dst as [outer, b=dst_dim, inner];
// copy `len` (p.d) rows: dst[o, f + i, j] = src[o, e + i, j].  n = outer*len*inner.
@compute @workgroup_size(256)
fn block_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let j = i % p.c;
    let r = (i / p.c) % p.d;
    let o = i / (p.c * p.d);
    dst[(o * p.b + p.f + r) * p.c + j] = src[(o * p.a + p.e + r) * p.c + j];
}

// [batch, a=rows, b=cols] -> [batch, cols, rows]
@compute @workgroup_size(256)
fn transpose(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let r = i % p.a;
    let col = (i / p.a) % p.b;
    let bt = i / (p.a * p.b);
    dst[i] = src[(bt * p.a + r) * p.b + col];
}

// [batch, a, b, c] -> [batch, b, a, c]: swap two middle dimensions, blocks of c kept whole.
@compute @workgroup_size(256)
fn swap_dims(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let j = i % p.c;
    let r = (i / p.c) % p.a;
    let col = (i / (p.c * p.a)) % p.b;
    let bt = i / (p.c * p.a * p.b);
    dst[i] = src[((bt * p.a + r) * p.b + col) * p.c + j];
}

// swap_dims for single-element blocks (c == 1, a % 4 == 0), as in reordering
// convolution weights [Cout, Cin, taps] -> [Cout, taps, Cin]: four outputs
// per invocation, one vec4 store (stores, like loads, run lane by lane on
// CPU devices, so this halves them) and one index decomposition. p.n counts vec4s.
@group(0) @binding(2) var<storage, read_write> dst4: array<vec4<f32>>;

@compute @workgroup_size(256)
fn swap_dims4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = flat(gid, nwg);
    if (q >= p.n) { return; }
    let i = 4u * q;
    let r = i % p.a;
    let col = (i / p.a) % p.b;
    let at = (i / (p.a * p.b) * p.a + r) * p.b + col;
    dst4[q] = vec4<f32>(src[at], src[at + p.b], src[at + 2u * p.b], src[at + 3u * p.b]);
}

@group(0) @binding(1) var<storage, read> src_half: array<u32>;

// Packed f16 pairs -> f32.
@compute @workgroup_size(256)
fn widen_f16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let pair = unpack2x16float(src_half[i / 2u]);
    dst[i] = select(pair.x, pair.y, (i & 1u) == 1u);
}

// A flat texture (src/engine/kernels/copy.rs: values in rows of 64, 4096
// rows per layer) where a buffer-to-texture copy cannot fill it (a buffer
// without room for whole rows): values p.a .. p.a + p.n of src.
@group(0) @binding(2) var flat_out: texture_storage_2d_array<r32float, write>;

@compute @workgroup_size(8, 8, 1)
fn pack_flat(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(flat_out);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    let f = (gid.z * 4096u + gid.y) * 64u + gid.x;
    var v = 0.0;
    if (f < p.n) {
        v = src[p.a + f];
    }
    textureStore(flat_out, gid.xy, gid.z, vec4<f32>(v, 0.0, 0.0, 0.0));
}
