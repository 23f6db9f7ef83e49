// Convolution = im2col straight into the matmul's B-operand texture, then
// the texture-fed matmul (weights [Cout, Cin*kh*kw] as A, bias per row).
// Texel (x, k) of layer l holds patch row k = (ci, ky, kx) for output pixels
// n0 + 4x .. n0 + 4x + 3 of image b0 + l; taps outside the (padded) input are 0.
// Padding is given per side so that the reference's Downsample (pad right and
// bottom by one, then a 3x3 stride-2 conv) needs no separate pad pass.

struct Params {
    cin: u32, h: u32, w: u32, wo: u32,
    kh: u32, kw: u32, stride: u32, pad_t: u32,
    pad_l: u32, k: u32, n: u32, n0: u32,                      // k: patch rows (Cin kh kw); this piece's pixels n0 .. n
    b0: u32, norm: u32, group_size: u32, image_pixels: u32,   // first image; shifted_pack: norm + swish on, channels per group
    piece: u32, out_rows: u32, cout: u32, images: u32,        // col2im: pixels in the piece, output rows, images; weights_by_tap: Cout
    z0: u32, x_first: u32, out_first: u32, flip: u32,         // shifted_pack: first layer; x (or dw_slices) is bound from element x_first; dw_from_slices: dw from out_first; weights_by_tap: read W [Cin, Cout, kh, kw] as flip_transpose(W)
    has_bias: u32, dilation: u32, c0: u32, channels: u32,     // conv_wg: add bias per output channel; the input's dilation (> 1: zeros between its rows and columns); col2im: only channels c0 .. c0 + channels of image b0 where channels > 0
    pack_ld: u32, pack_rows: u32, slice_ld: u32, dbias_col: u32,   // channel_pack_buf, shifted_pack_buf: texels per row and rows per layer of its buffer (channel_pack_buf: p.n texels, p.wo per row); dw_from_slices: the slices' row length, the bias gradient's column
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var dst: texture_storage_2d_array<rgba32float, write>;

// The invocation's index in a dispatch of 64-wide workgroups laid out by `grid_for` (rows of
// nwg.x workgroups).
fn flat64(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// Stride-1 convolutions on devices with the subgroup matmul skip im2col:
// conv_ms_32x8 (shaders/matmul_subgroup.wgsl) reads its B operand from this
// texture array, whose texel (x, y) of layer image * Cin + c holds the
// zero-padded input P[c, y, x .. x+3], P[c, y, x] = input[c, y - pad_t, x - pad_l].
// Four output pixels of one tap are then one texel fetch. The texels of a
// row are stored by x mod 4: texel x at column (x % 4) * q + x / 4, q = width / 4,
// so the texels the 8 lanes fetch together (x = ox + kx and ox + kx + 4 for
// ox = 0, 8, 16, ..) are neighbours in memory: whole cache lines instead of
// 16 bytes of each. Each invocation writes 8 texels from the 11 values they share.
//
// In inference the group norm and swish before a convolution happen here
// (shifted_pack's p.norm = 1, p.group_size = channels per group): the input is then the
// un-normalised x, normalised per value exactly as norm.wgsl's apply4 does,
// and the norm's own output pass (a read and a write of the whole tensor) is
// skipped. Padding stays zero, as it pads the normalised tensor.
@group(0) @binding(3) var<storage, read> pre_stats: array<vec2<f32>>;   // (mean, 1/std) per (image, group)
@group(0) @binding(4) var<storage, read> pre_gamma: array<f32>;
@group(0) @binding(5) var<storage, read> pre_beta: array<f32>;

fn padded(plane: u32, y: i32, xi: i32, pre: vec4<f32>) -> f32 {
    if (y < 0 || y >= i32(p.h) || xi < 0 || xi >= i32(p.w)) {
        return 0.0;
    }
    let v = x[plane + u32(y) * p.w + u32(xi)];
    if (p.norm == 0u) {
        return v;
    }
    let a = (v - pre.x) * pre.y * pre.z + pre.w;
    return a / (1.0 + exp(-a));
}

// The 8 texels shifted_pack's invocation gid writes (texel j at column (j % 4) * q + x0 / 4 +
// j / 4 of row gid.y, x0 = 8 gid.x, where x0 + j < wp), from the 11 values they share.
fn shifted_texels(gid: vec3<u32>) -> array<vec4<f32>, 8> {
    let x0 = 8u * gid.x;
    let image_channel = p.b0 * p.cin + p.z0 + gid.z;
    let plane = image_channel * p.h * p.w - p.x_first;
    let y = i32(gid.y) - i32(p.pad_t);
    let xs = i32(x0) - i32(p.pad_l);
    // The norm's (mean, 1/std, gamma, beta) of this plane's channel.
    var pre = vec4<f32>(0.0);
    if (p.norm != 0u) {
        let m = pre_stats[image_channel / p.group_size];
        let ch = image_channel % p.cin;
        pre = vec4<f32>(m.x, m.y, pre_gamma[ch], pre_beta[ch]);
    }
    var v: array<f32, 11>;
    for (var i = 0; i < 11; i++) {
        v[i] = padded(plane, y, xs + i, pre);
    }
    var t: array<vec4<f32>, 8>;
    for (var j = 0; j < 8; j++) {
        t[j] = vec4<f32>(v[j], v[j + 1], v[j + 2], v[j + 3]);
    }
    return t;
}

@compute @workgroup_size(8, 8, 1)
fn shifted_pack(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    let wp = p.wo + p.kw - 1u;   // texels per row (stride 1)
    let q = dims.x / 4u;
    let x0 = 8u * gid.x;
    if (x0 >= wp || gid.y >= dims.y) {
        return;
    }
    let t = shifted_texels(gid);
    for (var j = 0u; j < 8u; j++) {
        if (x0 + j < wp) {
            textureStore(dst, vec2<u32>((j % 4u) * q + x0 / 4u + j / 4u, gid.y), p.z0 + gid.z, t[j]);
        }
    }
}

// shifted_pack into a buffer laid out as the texture's copy (`packed`, below: texel (x, y) of
// layer z at (z * pack_rows + y) * pack_ld + x), copied into the texture afterwards (layered
// storage-texture stores are slow on lavapipe; `Tuning::textures_via_buffer`).
// One invocation per 8 texels of a row as shifted_pack, but numbered flat (rows' chunks, then
// rows, then layers: p.n of them) so that narrow planes leave no lanes idle.
@compute @workgroup_size(64)
fn shifted_pack_buf(@builtin(global_invocation_id) flat_id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(flat_id, nwg);
    let wp = p.wo + p.kw - 1u;
    let q = (wp + 3u) / 4u;
    let chunks = (wp + 7u) / 8u;
    if (i >= p.n) {
        return;
    }
    let gid = vec3<u32>(i % chunks, (i / chunks) % p.pack_rows, i / (chunks * p.pack_rows));
    let x0 = 8u * gid.x;
    let t = shifted_texels(gid);
    let row = ((p.z0 + gid.z) * p.pack_rows + gid.y) * p.pack_ld;
    for (var j = 0u; j < 8u; j++) {
        if (x0 + j < wp) {
            packed[row + (j % 4u) * q + x0 / 4u + j / 4u] = t[j];
        }
    }
}

// A flat r32float texture (src/engine/kernels/copy.rs: values in rows of 64,
// 4096 rows per layer), filled by a memcpy: on devices where texture fetches
// are vectorised and buffer loads are not (lavapipe), im2col reads the input
// planes' 9x more taps from there, and the implicit GEMM its weights.
// Read-only storage: no mip level, which llvmpipe would look up lane by lane.
@group(0) @binding(1) var planes: texture_storage_2d_array<r32float, read>;

// The implicit-GEMM convolution's weights as its A operand, K ordered (tap,
// channel): texel (x, o) = W[o, c .. c+3, tap] for K = tap * Cin + c = 4x ..
// 4x + 3 (p.cout: Cout; Cin % 4 == 0). The weights come through `planes` as a
// flat texture (filled by a memcpy): gathering them with buffer loads ran
// lane by lane, 23 ms for a 512 x 512 x 3 x 3 weight on lavapipe.
fn flat_at(f: u32) -> f32 {
    return textureLoad(planes, vec2<u32>(f & 63u, (f >> 6u) & 4095u), f >> 18u).x;
}

// Weight (o, c, tap), zero past Cout or K.
fn weight_by_tap(o: u32, c: u32, t: u32) -> f32 {
    return weight_by_tap_flipped(o, c, t, p.flip);
}

// `weight_by_tap` with the flip given (0: W as it is, else flipped and transposed).
fn weight_by_tap_flipped(o: u32, c: u32, t: u32, flip: u32) -> f32 {
    if (o >= p.cout || t * p.cin + c >= p.k) {
        return 0.0;
    }
    let taps = p.kh * p.kw;
    if (flip != 0u) {
        // W'[o, c, t] = W[c, o, taps - 1 - t] (the input gradient's convolution, no flipped copy).
        return flat_at((c * p.cout + o) * taps + taps - 1u - t);
    }
    return flat_at((o * p.cin + c) * taps + t);
}

@compute @workgroup_size(8, 8, 1)
fn weights_by_tap(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    // Cin % 4 == 0 (implicit GEMM): the texel's four K share one tap.
    let t = 4u * gid.x / p.cin;
    let c = 4u * gid.x - t * p.cin;
    let o = gid.y;
    textureStore(dst, gid.xy, 0u, vec4<f32>(weight_by_tap(o, c, t), weight_by_tap(o, c + 1u, t), weight_by_tap(o, c + 2u, t),
                                             weight_by_tap(o, c + 3u, t)));
}

// im2col from the input planes in `planes` (layer = image in the piece * Cin + channel).
@compute @workgroup_size(8, 8, 1)
fn im2col_tex(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    var v = vec4<f32>(0.0);
    let row = gid.y;
    let n = p.n0 + 4u * gid.x;
    if (row < p.k && n < p.n) {
        // Divisions are scalar per lane on CPU devices: decompose once per
        // texel. When the output width is a multiple of 4, the texel's four
        // pixels are neighbours in one output row.
        let layer = gid.z * p.cin + row / (p.kw * p.kh);
        if (p.wo % 4u == 0u) {
            let kx = row % p.kw;
            let ky = (row / p.kw) % p.kh;
            let iy = i32((n / p.wo) * p.stride + ky) - i32(p.pad_t);
            if (iy >= 0 && iy < i32(p.h)) {
                let ix0 = i32((n % p.wo) * p.stride + kx) - i32(p.pad_l);
                for (var i = 0u; i < 4u; i++) {
                    let ix = ix0 + i32(i * p.stride);
                    if (ix >= 0 && ix < i32(p.w)) {
                        v[i] = flat_at(layer * p.h * p.w + u32(iy) * p.w + u32(ix));
                    }
                }
            }
        } else {
            for (var i = 0u; i < 4u; i++) {
                let t = tap(row, n + i);
                if (n + i < p.n && inside(t)) {
                    v[i] = flat_at(layer * p.h * p.w + u32(t.x) * p.w + u32(t.y));
                }
            }
        }
    }
    textureStore(dst, vec2<u32>(gid.xy), gid.z, v);
}

// Input position (iy, ix) and channel of patch row `row` for output pixel n;
// positions outside the input mean a zero tap.
fn tap(row: u32, n: u32) -> vec3<i32> {
    let kx = row % p.kw;
    let ky = (row / p.kw) % p.kh;
    let iy = i32((n / p.wo) * p.stride + ky) - i32(p.pad_t);
    let ix = i32((n % p.wo) * p.stride + kx) - i32(p.pad_l);
    return vec3<i32>(iy, ix, i32(row / (p.kw * p.kh)));
}

fn inside(t: vec3<i32>) -> bool {
    return t.x >= 0 && t.x < i32(p.h) && t.y >= 0 && t.y < i32(p.w);
}

@compute @workgroup_size(8, 8, 1)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    var v = vec4<f32>(0.0);
    let row = gid.y;
    if (row < p.k) {
        for (var i = 0u; i < 4u; i++) {
            let n = p.n0 + 4u * gid.x + i;
            let t = tap(row, n);
            if (n < p.n && inside(t)) {
                // (x is bound from element x_first: a tensor larger than one binding, a run of images at a time.)
                v[i] = x[(((p.b0 + gid.z) * p.cin + u32(t.z)) * p.h + u32(t.x)) * p.w + u32(t.y) - p.x_first];
            }
        }
    }
    textureStore(dst, vec2<u32>(gid.xy), gid.z, v);
}

// Implicit GEMM on workgroup tiles (GPU-shaped; Tuning::conv_workgroup): a workgroup computes
// 64 output channels x 64 output pixels of one image, 4 x 4 per invocation, over K = Cin kh kw
// in slices of 16. Each slice's weights (A, packed by the matmul's pack: texel (k/4, cout)) and
// patch values (B, gathered from the input as im2col would write them, one texel of 4 pixels per
// invocation) are staged in workgroup memory behind barriers: no im2col texture.
@group(0) @binding(2) var wa: texture_2d_array<f32>;
@group(0) @binding(3) var<storage, read_write> y_out: array<f32>;   // [images, Cout, pixels]
@group(0) @binding(4) var<storage, read> cbias: array<f32>;
var<workgroup> wg_a: array<vec4<f32>, 256>;   // [64 output channels][4 texels of K]
var<workgroup> wg_b: array<vec4<f32>, 256>;   // [16 patch rows][16 texels of 4 pixels]

// One staged K slice of 16 into this invocation's 4 x 4 block: rows lid.y * 4 .. of wg_a,
// columns (texels) lid.x of wg_b (conv_wg and dw_wg).
fn fold_slice(lid: vec2<u32>, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var kk = 0u; kk < 4u; kk++) {
        let b0 = wg_b[(4u * kk) * 16u + lid.x];
        let b1 = wg_b[(4u * kk + 1u) * 16u + lid.x];
        let b2 = wg_b[(4u * kk + 2u) * 16u + lid.x];
        let b3 = wg_b[(4u * kk + 3u) * 16u + lid.x];
        for (var i = 0u; i < 4u; i++) {
            let a = wg_a[(lid.y * 4u + i) * 4u + kk];
            (*acc)[i] = fma(vec4<f32>(a.w), b3, fma(vec4<f32>(a.z), b2, fma(vec4<f32>(a.y), b1, fma(vec4<f32>(a.x), b0, (*acc)[i]))));
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn conv_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    // No early return: every invocation reaches the barriers.
    let tid = lid.y * 16u + lid.x;
    let img = p.b0 + wid.z;
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let k4 = (p.k + 3u) / 4u;
    let a_row = row0 + tid / 4u;
    let a_k = tid % 4u;
    let b_n = col0 + 4u * (tid % 16u);
    let b_k = tid / 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < k4; k0 += 4u) {
        let ka = k0 + a_k;
        wg_a[tid] = select(vec4<f32>(0.0), textureLoad(wa, vec2<u32>(ka, a_row), 0, 0), ka < k4);
        let row = 4u * k0 + b_k;
        var v = vec4<f32>(0.0);
        if (row < p.k) {
            for (var i = 0u; i < 4u; i++) {
                var t = tap(row, b_n + i);
                var on_grid = true;
                if (p.dilation > 1u) {
                    // A tap of the dilated input: a value where both coordinates fall on its grid.
                    let d = i32(p.dilation);
                    on_grid = t.x >= 0 && t.y >= 0 && t.x % d == 0 && t.y % d == 0;
                    t = vec3<i32>(t.x / d, t.y / d, t.z);
                }
                if (b_n + i < p.n && on_grid && inside(t)) {
                    v[i] = x[((img * p.cin + u32(t.z)) * p.h + u32(t.x)) * p.w + u32(t.y) - p.x_first];
                }
            }
        }
        wg_b[tid] = v;
        workgroupBarrier();
        fold_slice(lid.xy, &acc);
        workgroupBarrier();
    }
    let m0 = row0 + lid.y * 4u;
    let n0 = col0 + lid.x * 4u;
    let rows = acc;
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + i;
        if (m < p.cout) {
            let bias = select(0.0, cbias[m], p.has_bias == 1u);
            for (var j = 0u; j < 4u; j++) {
                if (n0 + j < p.n) {
                    y_out[(wid.z * p.cout + m) * p.n + n0 + j] = rows[i][j] + bias;
                }
            }
        }
    }
}

// ---- Backward ----------------------------------------------------------------

// The weight gradient as one implicit GEMM on workgroup tiles (GPU-shaped; Tuning::conv_workgroup):
// dW[o, r] = sum over the batch's pixels g of dY[o, g] col[r, g], r = (ci, ky, kx) as W lays it
// out. A workgroup computes 64 output channels x 64 patch rows, 4 x 4 per invocation, over its
// split of the pixels (p.piece of them, split wid.z) in slices of 16: the slice's dY values and
// patch values (gathered from the input as im2col would write them) are staged in workgroup
// memory behind barriers. Split s writes its partial dW at y_out[s * Cout * K ..]: no im2col
// texture, no transposed copy of dY. p.images images of p.image_pixels output pixels each.
@group(0) @binding(2) var<storage, read> dw_dy: array<f32>;   // [images, Cout, pixels]

@compute @workgroup_size(16, 16, 1)
fn dw_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    // No early return: every invocation reaches the barriers.
    let tid = lid.y * 16u + lid.x;
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let pixels = p.image_pixels;
    let g_begin = wid.z * p.piece;
    let g_end = min(p.images * pixels, g_begin + p.piece);
    // This invocation's loads in each slice: 4 pixels of dY for output channel a_row, and
    // patch rows b_r .. b_r + 3 of pixel b_g.
    let a_row = row0 + tid / 4u;
    let a_g = 4u * (tid % 4u);
    let b_r = col0 + 4u * (tid % 16u);
    let b_g = tid / 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var g0 = g_begin; g0 < g_end; g0 += 16u) {
        var a = vec4<f32>(0.0);
        if (a_row < p.cout) {
            for (var i = 0u; i < 4u; i++) {
                let g = g0 + a_g + i;
                if (g < g_end) {
                    a[i] = dw_dy[((g / pixels) * p.cout + a_row) * pixels + g % pixels];
                }
            }
        }
        wg_a[tid] = a;
        var v = vec4<f32>(0.0);
        let g = g0 + b_g;
        if (g < g_end) {
            let img = g / pixels;
            for (var i = 0u; i < 4u; i++) {
                let t = tap(b_r + i, g % pixels);
                if (b_r + i < p.k && inside(t)) {
                    v[i] = x[((img * p.cin + u32(t.z)) * p.h + u32(t.x)) * p.w + u32(t.y)];
                }
            }
        }
        wg_b[tid] = v;
        workgroupBarrier();
        fold_slice(lid.xy, &acc);
        workgroupBarrier();
    }
    let m0 = row0 + lid.y * 4u;
    let n0 = col0 + lid.x * 4u;
    let rows = acc;
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + i;
        if (m < p.cout) {
            for (var j = 0u; j < 4u; j++) {
                if (n0 + j < p.k) {
                    y_out[(wid.z * p.cout + m) * p.k + n0 + j] = rows[i][j];
                }
            }
        }
    }
}

// Patch rows as B operand of dW = dY · colᵀ, over the batch's pixels laid
// end to end (global pixel g = image * _c + pixel, _c = pixels per image; x is bound from
// element x_first, a window of the images the piece touches):
// texel (x, y) = col[4x .. 4x+3, n0 + y] (K along texels, pixels along rows).
@compute @workgroup_size(8, 8, 1)
fn im2col_t(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let e = im2col_t_element(gid.xy, i);
        if (e >= 0) {
            v[i] = x[u32(e)];
        }
    }
    textureStore(dst, vec2<u32>(gid.xy), 0u, v);
}

// im2col_t reading x through a flat texture of the piece's images (from element x_first), where
// one image is larger than a storage binding.
@compute @workgroup_size(8, 8, 1)
fn im2col_t_tex(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let e = im2col_t_element(gid.xy, i);
        if (e >= 0) {
            v[i] = flat_at(u32(e));
        }
    }
    textureStore(dst, vec2<u32>(gid.xy), 0u, v);
}

// The element of x (from x_first) in lane i of im2col_t's texel t, or -1 for a zero.
fn im2col_t_element(t: vec2<u32>, i: u32) -> i32 {
    let g = p.n0 + t.y;
    let row = 4u * t.x + i;
    if (g >= p.n || row >= p.k) {
        return -1;
    }
    let img = g / p.image_pixels;
    let tp = tap(row, g % p.image_pixels);
    if (!inside(tp)) {
        return -1;
    }
    return i32(((img * p.cin + u32(tp.z)) * p.h + u32(tp.x)) * p.w + u32(tp.y) - p.x_first);
}

@group(0) @binding(1) var<storage, read> dcol: array<f32>;        // [K, _a] for global pixels n0 .. n0 + _a
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;    // [B, Cin, H, W], accumulated

// dx[b, ci, iy, ix] += sum over taps (ky, kx) hitting an output pixel whose
// global index (b * _c + pixel) lies in [n0, n0 + _a), of dcol[(ci, ky, kx), g - n0];
// _b = output rows. One invocation per input element of images b0, b0 + 1, ...
@compute @workgroup_size(64)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(gid, nwg);
    let per = p.cin * p.h * p.w;
    var b = p.b0 + i / per;
    var e = i % per;
    if (p.channels != 0u) {
        // Channels c0 .. c0 + channels of image b0 (one image is larger than a storage binding).
        if (i >= p.channels * p.h * p.w) { return; }
        b = p.b0;
        e = p.c0 * p.h * p.w + i;
    } else if (i >= p.images * per) {
        return;
    }
    let ix = e % p.w;
    let iy = (e / p.w) % p.h;
    let ci = e / (p.w * p.h);
    let width = p.piece;
    let ho = p.out_rows;
    var s = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let ty = i32(iy + p.pad_t) - i32(ky);
        if (ty < 0 || ty % i32(p.stride) != 0) { continue; }
        let oy = u32(ty) / p.stride;
        if (oy >= ho) { continue; }
        for (var kx = 0u; kx < p.kw; kx++) {
            let tx = i32(ix + p.pad_l) - i32(kx);
            if (tx < 0 || tx % i32(p.stride) != 0) { continue; }
            let ox = u32(tx) / p.stride;
            if (ox >= p.wo) { continue; }
            let g = b * p.image_pixels + oy * p.wo + ox;
            if (g >= p.n0 && g < p.n0 + width) {
                let row = (ci * p.kh + ky) * p.kw + kx;
                s += dcol[row * width + (g - p.n0)];
            }
        }
    }
    dx[b * per + e - p.x_first] += s;   // dx is bound from element x_first (a window of the images)
}

// The weights of dx = conv(dy, W') for a stride-1 convolution whose padding is kh-1-pad_t on
// the far side too ("same"): W'[ci, co, ky, kx] = W[co, ci, kh-1-ky, kw-1-kx]. One invocation
// per element of W' ([cin, cout, kh, kw]; p.cout is Cout).
@group(0) @binding(1) var<storage, read> w_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> w_flipped: array<f32>;

@compute @workgroup_size(64)
fn flip_transpose_weights(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(gid, nwg);
    let taps = p.kh * p.kw;
    if (i >= p.cin * p.cout * taps) { return; }
    w_flipped[i] = w_src[flipped_source(i, i / (taps * p.cout))];
}

// The element of W that element i of W' (input channel ci) comes from.
fn flipped_source(i: u32, ci: u32) -> u32 {
    let taps = p.kh * p.kw;
    let t = i % taps;
    let co = (i / taps) % p.cout;
    let ky = p.kh - 1u - t / p.kw;
    let kx = p.kw - 1u - t % p.kw;
    return ((co * p.cin + ci) * p.kh + ky) * p.kw + kx;
}

// flip_transpose_weights where W is larger than one storage binding: W read through a flat
// texture, W' written by runs of input channels c0 .. c0 + channels (bound from c0).
@compute @workgroup_size(64)
fn flip_transpose_weights_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(gid, nwg);
    let per_channel = p.kh * p.kw * p.cout;
    if (i >= p.channels * per_channel) { return; }
    w_flipped[i] = flat_at(flipped_source(i, p.c0 + i / per_channel));
}

// The weight gradient's product (dw_ms_32x8_v4 in shaders/matmul_subgroup.wgsl) reads the input
// with four channels per texel: texel (x, y) of layer image * Cin/4 + c4 holds
// P[4 c4 .. 4 c4 + 3, y, x], P[c, y, x] = input[c, y - pad_t, x - pad_l] (zero outside), for
// the piece's images b0, b0 + 1, .. (x bound from element x_first). One invocation per texel:
// four loads and one store, where im2col_t wrote kh kw values per input value.
@compute @workgroup_size(8, 8, 1)
fn channel_pack(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    textureStore(dst, gid.xy, gid.z, channel_texel(gid));
}

// channel_pack's options as constants of its pipeline where the launcher knows them
// (engine::shaders::specialize): lavapipe (Mesa 22.3) runs both sides of a branch under a mask
// even when its condition is uniform, and divides vectors lane by lane. SPACING: the spacing of
// the input's rows and columns in the planes (0: p.stride decides); WHOLE_TEXELS: Cin % 4 == 0;
// CIN4, PLANE_W, PLANE_H: texels of channels, and the planes' width and height (0: the
// parameters decide), so that the divisions are by constants.
const SPACING: u32 = 0u;
const WHOLE_TEXELS: bool = false;
const CIN4: u32 = 0u;
const PLANE_W: u32 = 0u;
const PLANE_H: u32 = 0u;

// Where texel gid of channel_pack's planes reads the input: (index of its first channel's value,
// from x_first; the plane's size; how many channels it holds: 4, fewer in the last texel of a
// Cin % 4 != 0 input (the weight gradient's first convolution), 0 in the padding, whose texels
// and channels past Cin are zeros).
fn channel_source(gid: vec3<u32>) -> vec3<u32> {
    let cin4 = select((p.cin + 3u) / 4u, CIN4, CIN4 != 0u);
    let img = gid.z / cin4;
    let c = 4u * (gid.z - img * cin4);
    // p.stride (at least 1) spaces the input's rows and columns in the plane, zeros between:
    // the output gradient of a strided convolution, for its input gradient.
    let d = i32(select(max(p.stride, 1u), SPACING, SPACING != 0u));
    let yd = i32(gid.y) - i32(p.pad_t);
    let xd = i32(gid.x) - i32(p.pad_l);
    let y = yd / d;
    let xi = xd / d;
    if (yd >= 0 && xd >= 0 && yd % d == 0 && xd % d == 0 && y < i32(p.h) && xi < i32(p.w)) {
        let plane = p.h * p.w;
        let at = ((p.b0 + img) * p.cin + c) * plane + u32(y) * p.w + u32(xi) - p.x_first;
        return vec3<u32>(at, plane, select(min(p.cin - c, 4u), 4u, WHOLE_TEXELS));
    }
    return vec3<u32>(0u);
}

// Texel gid of channel_pack's planes, the input read from the buffer x.
fn channel_texel(gid: vec3<u32>) -> vec4<f32> {
    let s = channel_source(gid);
    var v = vec4<f32>(0.0);
    if (s.z == 4u) {
        v = vec4<f32>(x[s.x], x[s.x + s.y], x[s.x + 2u * s.y], x[s.x + 3u * s.y]);
    } else if (s.z != 0u) {
        v.x = x[s.x];
        if (s.z > 1u) { v.y = x[s.x + s.y]; }
        if (s.z > 2u) { v.z = x[s.x + 2u * s.y]; }
    }
    return v;
}

// The same texel, the input read from a flat texture of it (`planes`, filled by a memcpy):
// four vectorised fetches where the buffer's four loads run lane by lane on lavapipe.
fn channel_texel_flat(gid: vec3<u32>) -> vec4<f32> {
    let s = channel_source(gid);
    var v = vec4<f32>(0.0);
    if (s.z == 4u) {
        v = vec4<f32>(flat_at(s.x), flat_at(s.x + s.y), flat_at(s.x + 2u * s.y), flat_at(s.x + 3u * s.y));
    } else if (s.z != 0u) {
        v.x = flat_at(s.x);
        if (s.z > 1u) { v.y = flat_at(s.x + s.y); }
        if (s.z > 2u) { v.z = flat_at(s.x + 2u * s.y); }
    }
    return v;
}

// channel_pack into a buffer laid out as the texture's copy (texel (x, y) of layer z at
// (z * pack_rows + y) * pack_ld + x), copied into the texture afterwards (storage-texture stores
// are slow on lavapipe; `Tuning::textures_via_buffer`).
@group(0) @binding(2) var<storage, read_write> packed: array<vec4<f32>>;

// Texel i of the planes counted flat: (x, y, layer, its index in the staging buffer).
fn staged_texel(i: u32) -> vec4<u32> {
    let wo = select(p.wo, PLANE_W, PLANE_W != 0u);
    let rows = select(p.pack_rows, PLANE_H, PLANE_H != 0u);
    let gid = vec3<u32>(i % wo, (i / wo) % rows, i / (wo * rows));
    return vec4<u32>(gid, (gid.z * rows + gid.y) * p.pack_ld + gid.x);
}

// One invocation per texel of the planes (p.n: p.wo texels per row, p.pack_rows rows per layer),
// numbered flat so that narrow planes leave no lanes idle.
@compute @workgroup_size(64)
fn channel_pack_buf(@builtin(global_invocation_id) flat_id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(flat_id, nwg);
    if (i >= p.n) {
        return;
    }
    let t = staged_texel(i);
    packed[t.w] = channel_texel(t.xyz);
}

// channel_pack_buf reading the input from a flat texture (`Tuning::reads_via_texture`).
@compute @workgroup_size(64)
fn channel_pack_flat_buf(@builtin(global_invocation_id) flat_id: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(flat_id, nwg);
    if (i >= p.n) {
        return;
    }
    let t = staged_texel(i);
    packed[t.w] = channel_texel_flat(t.xyz);
}

// dW[co, ci, tap] = the sum over split slices s of dw_ms's C[co, s, tap * Cp + ci] (p.images:
// slices, p.cout: Cout, p.channels: Cp, Cin rounded up to a multiple of 4, p.slice_ld: the
// slices' row length), for output channels b0 .. b0 + n / Cin: the slices bound from element
// x_first, dW from out_first. One invocation per (output channel, input channel) pair, its TAPS
// weights (a pipeline constant: kh * kw) summed side by side, so the pair's divisions are made
// once for all its taps and the tap loops have constant trips; the slices are added in order,
// so the sum does not depend on the device. With SUM_DBIAS (a pipeline constant) the run's
// output channels' bias gradients too, from column p.dbias_col of the slices (dw_ms's DBIAS
// column group), one invocation each after the pairs'.
@group(0) @binding(1) var<storage, read> dw_slices: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;
@group(0) @binding(3) var<storage, read_write> dbias_out: array<f32>;
const SUM_DBIAS: bool = false;
const TAPS: u32 = 9u;

// Pair i of the run: its first tap's value in the first slice (counted from the slices' first
// bound value; tap t is t * Cp further, slice z z * slice_ld further) and its first weight's index
// in dw's window (tap t is t further). Past the run's pairs with SUM_DBIAS, output channel
// i - n's bias column (out: its index in dbias_out, which is bound whole).
struct SliceWalk {
    row: u32, out: u32,
}

fn slice_walk(i: u32) -> SliceWalk {
    if (SUM_DBIAS && i >= p.n) {
        let co = p.b0 + i - p.n;
        return SliceWalk(co * p.images * p.slice_ld + p.dbias_col - p.x_first, co);
    }
    let pair = p.b0 * p.cin + i;
    let co = pair / p.cin;
    let ci = pair - co * p.cin;
    return SliceWalk(co * p.images * p.slice_ld + ci - p.x_first, pair * TAPS - p.out_first);
}

// How many invocations the sums take: the run's pairs, and its bias gradients with SUM_DBIAS.
fn slice_sums() -> u32 {
    return select(p.n, p.n + p.n / p.cin, SUM_DBIAS);
}

@compute @workgroup_size(64)
fn dw_from_slices(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(gid, nwg);
    if (i >= slice_sums()) {
        return;
    }
    let w = slice_walk(i);
    if (SUM_DBIAS && i >= p.n) {
        var s = 0.0;
        for (var z = 0u; z < p.images; z++) {
            s += dw_slices[w.row + z * p.slice_ld];
        }
        dbias_out[w.out] = s;
        return;
    }
    var s: array<f32, TAPS>;
    for (var z = 0u; z < p.images; z++) {
        let row = w.row + z * p.slice_ld;
        for (var t = 0u; t < TAPS; t++) {
            s[t] += dw_slices[row + t * p.channels];
        }
    }
    for (var t = 0u; t < TAPS; t++) {
        dw[w.out + t] = s[t];
    }
}

// `dw_from_slices` reading the slices from a flat r32float copy (`flat_at`, x_first 0): on
// lavapipe each storage-buffer load is a loop over the lanes (`Tuning::reads_via_texture`).
@compute @workgroup_size(64)
fn dw_from_slices_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat64(gid, nwg);
    if (i >= slice_sums()) {
        return;
    }
    let w = slice_walk(i);
    if (SUM_DBIAS && i >= p.n) {
        var s = 0.0;
        for (var z = 0u; z < p.images; z++) {
            s += flat_at(w.row + z * p.slice_ld);
        }
        dbias_out[w.out] = s;
        return;
    }
    var s: array<f32, TAPS>;
    for (var z = 0u; z < p.images; z++) {
        let row = w.row + z * p.slice_ld;
        for (var t = 0u; t < TAPS; t++) {
            s[t] += flat_at(row + t * p.channels);
        }
    }
    for (var t = 0u; t < TAPS; t++) {
        dw[w.out + t] = s[t];
    }
}

// The transposed-output convolution's weights as its B operand (convt_ms_32x8 in
// shaders/matmul_subgroup.wgsl): texel (x, k) = W[4x .. 4x + 3, c, t] for K row k = t * Cin + c,
// zero past Cout (from `planes` as a flat texture, flipped with p.flip as weights_by_tap reads it).
@compute @workgroup_size(8, 8, 1)
fn weights_by_tap_t(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    textureStore(dst, gid.xy, 0u, weights_texel_t(gid.xy));
}

// Texel (x, y) of `weights_by_tap_t`'s texture: output channels 4x .. 4x + 3 of K row y.
fn weights_texel_t(xy: vec2<u32>) -> vec4<f32> {
    return weights_texel_t_flipped(xy, p.flip);
}

fn weights_texel_t_flipped(xy: vec2<u32>, flip: u32) -> vec4<f32> {
    let t = xy.y / p.cin;
    let c = xy.y - t * p.cin;
    let o = 4u * xy.x;
    return vec4<f32>(weight_by_tap_flipped(o, c, t, flip), weight_by_tap_flipped(o + 1u, c, t, flip),
                     weight_by_tap_flipped(o + 2u, c, t, flip), weight_by_tap_flipped(o + 3u, c, t, flip));
}

// `weights_by_tap_t` into a buffer laid out as the texture's copy (texel (x, y) at
// y * pack_ld + x; p.wo texels a row, p.pack_rows rows), copied into the texture afterwards
// (`Tuning::textures_via_buffer`, as `channel_pack_buf`).
@compute @workgroup_size(8, 8, 1)
fn weights_by_tap_t_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.wo || gid.y >= p.pack_rows) {
        return;
    }
    packed[gid.y * p.pack_ld + gid.x] = weights_texel_t(gid.xy);
}

// `weights_by_tap_t_buf` of a training convolution with Cin = Cout for its forward (gid.z = 0) and
// for its input gradient's convolution (gid.z = 1: flipped and transposed, the same extent), the
// second `p.pack_rows * p.pack_ld` texels after the first: one dispatch where two were made, the
// second in the backward.
@compute @workgroup_size(8, 8, 1)
fn weights_by_tap_t_pair_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.wo || gid.y >= p.pack_rows) {
        return;
    }
    packed[(gid.z * p.pack_rows + gid.y) * p.pack_ld + gid.x] = weights_texel_t_flipped(gid.xy, gid.z);
}
