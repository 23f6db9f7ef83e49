// Data movement: padded repacking of matrices, block copies along one
// dimension (concat / slice), batched transpose, and f16 -> f32 widening.
// One invocation per output element; 2-D dispatch grids for large tensors.

// Each entry reads the fields it names; the others are 0.
struct Params {
    n: u32,                                        // invocations (output elements, vec4s for swap_dims4, values for pack_flat)
    rows: u32, cols: u32, inner: u32,              // a matrix's (or the output's) rows and columns; elements kept together
    src_rows: u32, src_cols: u32, src_off: u32, src_bs: u32,   // pad2d: the source's rows and columns, offset and batch stride
    src_ld: u32, src_dim: u32, dst_dim: u32, len: u32,         // pad2d: source row stride; block_copy: dimension sizes, rows copied
    src_start: u32, dst_start: u32, _pad0: u32, _pad1: u32,    // block_copy: first row in the source and the destination
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// dst[bt, r, c] (shape [batch, rows, cols]) = src[src_off + bt*src_bs + r*src_ld + c]
// when r < src_rows and c < src_cols, else 0.
@compute @workgroup_size(256)
fn pad2d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let col = i % p.cols;
    let row = (i / p.cols) % p.rows;
    let bt = i / (p.rows * p.cols);
    var v = 0.0;
    if (row < p.src_rows && col < p.src_cols) {
        v = src[p.src_off + bt * p.src_bs + row * p.src_ld + col];
    }
    dst[i] = v;
}

// View src as [outer, src_dim, inner] and dst as [outer, dst_dim, inner];
// copy `len` rows: dst[o, dst_start + i, j] = src[o, src_start + i, j].  n = outer*len*inner.
@compute @workgroup_size(256)
fn block_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let j = i % p.inner;
    let r = (i / p.inner) % p.len;
    let o = i / (p.inner * p.len);
    dst[(o * p.dst_dim + p.dst_start + r) * p.inner + j] = src[(o * p.src_dim + p.src_start + r) * p.inner + j];
}

// [batch, rows, cols] -> [batch, cols, rows]
@compute @workgroup_size(256)
fn transpose(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let r = i % p.rows;
    let col = (i / p.rows) % p.cols;
    let bt = i / (p.rows * p.cols);
    dst[i] = src[(bt * p.rows + r) * p.cols + col];
}

// [batch, rows, cols, inner] -> [batch, cols, rows, inner]: swap two middle dimensions, blocks of inner kept whole.
@compute @workgroup_size(256)
fn swap_dims(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n) { return; }
    let j = i % p.inner;
    let r = (i / p.inner) % p.rows;
    let col = (i / (p.inner * p.rows)) % p.cols;
    let bt = i / (p.inner * p.rows * p.cols);
    dst[i] = src[((bt * p.rows + r) * p.cols + col) * p.inner + j];
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
    let r = i % p.rows;
    let col = (i / p.rows) % p.cols;
    let at = (i / (p.rows * p.cols) * p.rows + r) * p.cols + col;
    dst4[q] = vec4<f32>(src[at], src[at + p.cols], src[at + 2u * p.cols], src[at + 3u * p.cols]);
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
// without room for whole rows): values p.src_off .. p.src_off + p.n of src.
@group(0) @binding(2) var flat_out: texture_storage_2d_array<r32float, write>;

@compute @workgroup_size(8, 8, 1)
fn pack_flat(@builtin(global_invocation_id) gid: vec3<u32>) {
    // Row g of the texture (64 values each; layers of 4096 rows): rows dst_start + gid.y of a
    // piece (p.len rows, gid.z = 0), or of layer gid.z when the whole tensor is one dispatch.
    if (gid.x >= 64u || gid.y >= p.len) {
        return;
    }
    let g = p.dst_start + gid.z * 4096u + gid.y;
    let f = g * 64u + gid.x;
    var v = 0.0;
    if (f < p.n) {
        v = src[p.src_off + f - 64u * p.dst_start];
    }
    textureStore(flat_out, vec2<u32>(gid.x, g % 4096u), g / 4096u, vec4<f32>(v, 0.0, 0.0, 0.0));
}
