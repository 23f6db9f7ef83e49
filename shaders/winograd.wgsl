// 3x3 stride-1 pad-1 convolutions by Winograd's minimal filtering F(4x4, 3x3)
// (Lavin & Gray 2016): each 4x4 block of output pixels ("tile") comes from a
// 6x6 input patch d as  Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A, so the 36 positions
// ξ of the transformed tile are 36 independent products over channels:
//   M[ξ] (Cout x tiles) = U[ξ] (Cout x Cin) · V[ξ] (Cin x tiles).
// That is 4x fewer multiply-adds than the direct convolution (36 per 16
// outputs per channel pair instead of 144). The products run on the matmul
// family's kernels, batched over ξ (texture layer ξ); these entries transform
// the weights into their A operand (U), the input into their B operand (V) and
// the products' output M back into pixels.
//
// Every transform works on four independent lanes at once (vec4): four input
// channels of one weight, or four consecutive tiles of one channel, which is
// one rgba32float texel of the product's operands.

struct Params {
    cin: u32, cout: u32, h: u32, w: u32,
    tiles_x: u32, tiles_y: u32, t0: u32, nt: u32,   // tiles per row / column of an image; this piece: tiles t0 .. t0 + nt
    flags: u32, group_size: u32, image0: u32, plane_stride: u32, // flags: 1 norm + swish on the input, 2 bias, 4 residual (8: in y); image0: first image in `flat`
    // The output pass writes output channels o0 .. o0 + cout of images out_image0 .. into `y`, a
    // window of a tensor with out_channels channels that starts at (out_image0, o0): a tensor
    // larger than one storage binding is written a window at a time.
    out_channels: u32, out_image0: u32, o0: u32, y0: u32,
    flip: u32, v_ld: u32, v_rows: u32, res_y0: u32,   // weights: `flat` holds W [Cin, Cout, 3, 3], read as flip_transpose(W) (input gradients); input_buf: V's texels per row and rows per layer; output4_band: the residual band's first row
}
// `flat` holds each input channel's rows y0 .. from a multiple of plane_stride values on: whole
// planes (y0 = 0, plane_stride = h * w), or, for large images, the band of rows a piece of tiles
// reads, so the input is never copied whole.

@group(0) @binding(0) var<uniform> p: Params;

// Six lanes of one row or column of a transformed tile.
struct Six {
    v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, v4: vec4<f32>, v5: vec4<f32>,
}

struct Four {
    v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>,
}

// G g: the filter's three taps to six points (0, 1, -1, 2, -2, infinity).
fn filter_g(g0: vec4<f32>, g1: vec4<f32>, g2: vec4<f32>) -> Six {
    return Six(g0 / 4.0, -(g0 + g1 + g2) / 6.0, -(g0 - g1 + g2) / 6.0,
               g0 / 24.0 + g1 / 12.0 + g2 / 6.0, g0 / 24.0 - g1 / 12.0 + g2 / 6.0, g2);
}

// Bᵀ d: six input values to the six points.
fn input_bt(d: Six) -> Six {
    return Six(4.0 * d.v0 - 5.0 * d.v2 + d.v4,
               -4.0 * (d.v1 + d.v2) + d.v3 + d.v4,
               4.0 * (d.v1 - d.v2) - d.v3 + d.v4,
               2.0 * (d.v3 - d.v1) + d.v4 - d.v2,
               2.0 * (d.v1 - d.v3) + d.v4 - d.v2,
               4.0 * d.v1 - 5.0 * d.v3 + d.v5);
}

// Aᵀ m: six points back to four outputs.
fn output_at(m: Six) -> Four {
    let s12 = m.v1 + m.v2;
    let d12 = m.v1 - m.v2;
    let s34 = m.v3 + m.v4;
    let d34 = m.v3 - m.v4;
    return Four(m.v0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m.v5);
}

// Tensors are read through `flat`, a flat texture (src/engine/kernels/copy.rs:
// values in rows of 64, 4096 rows per layer, filled by a memcpy): on lavapipe
// a storage-buffer load runs lane by lane through the stack, 20x slower than
// this texture fetch.
@group(0) @binding(1) var flat: texture_storage_2d_array<r32float, read>;

fn flat_at(f: u32) -> f32 {
    return textureLoad(flat, vec2<u32>(f & 63u, (f >> 6u) & 4095u), f >> 18u).x;
}

// The transformed weights U or input V: the products' operand, layer ξ.
@group(0) @binding(2) var transformed: texture_storage_2d_array<rgba32float, write>;

// Row i of a transformed tile (positions 6i .. 6i + 5) into layers 6i .. 6i + 5.
fn store_row6(xy: vec2<u32>, i: u32, row: Six) {
    textureStore(transformed, xy, 6u * i, row.v0);
    textureStore(transformed, xy, 6u * i + 1u, row.v1);
    textureStore(transformed, xy, 6u * i + 2u, row.v2);
    textureStore(transformed, xy, 6u * i + 3u, row.v3);
    textureStore(transformed, xy, 6u * i + 4u, row.v4);
    textureStore(transformed, xy, 6u * i + 5u, row.v5);
}

// ---- weights [Cout, Cin, 3, 3] (in `flat`) -> U: layer ξ, texel (c/4, o) = U[ξ][o][c .. c+3] ----

fn weight_at(o: u32, c: u32, t: u32, flip: bool) -> f32 {
    if (o < p.cout && c < p.cin) {
        if (flip) {
            // W'[o0 + o, c, t] = W[c, o0 + o, 8 - t], W holding all out_channels of the convolution.
            return flat_at((c * p.out_channels + p.o0 + o) * 9u + 8u - t);
        }
        return flat_at((o * p.cin + c) * 9u + t);
    }
    return 0.0;
}

// Tap t of four consecutive input channels c4 .. c4 + 3 of output channel o.
fn tap(o: u32, c4: u32, t: u32, flip: bool) -> vec4<f32> {
    return vec4<f32>(weight_at(o, c4, t, flip), weight_at(o, c4 + 1u, t, flip), weight_at(o, c4 + 2u, t, flip),
                     weight_at(o, c4 + 3u, t, flip));
}

// The transformed kernels of invocation (c/4, o): four input channels of output channel o, of W
// or (`flip`) of W flipped and transposed.
fn weight_patches(xy: vec2<u32>, flip: bool) -> Patch6 {
    let o = xy.y;
    let c4 = 4u * xy.x;
    // Columns of G g (one per filter column), then G applied along each row.
    let col0 = filter_g(tap(o, c4, 0u, flip), tap(o, c4, 3u, flip), tap(o, c4, 6u, flip));
    let col1 = filter_g(tap(o, c4, 1u, flip), tap(o, c4, 4u, flip), tap(o, c4, 7u, flip));
    let col2 = filter_g(tap(o, c4, 2u, flip), tap(o, c4, 5u, flip), tap(o, c4, 8u, flip));
    return Patch6(filter_g(col0.v0, col1.v0, col2.v0), filter_g(col0.v1, col1.v1, col2.v1),
                  filter_g(col0.v2, col1.v2, col2.v2), filter_g(col0.v3, col1.v3, col2.v3),
                  filter_g(col0.v4, col1.v4, col2.v4), filter_g(col0.v5, col1.v5, col2.v5));
}

@compute @workgroup_size(8, 8, 1)
fn weights(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(transformed);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    store_patches(gid.xy, weight_patches(gid.xy, p.flip != 0u));
}

// `weights` into a buffer laid out as the texture's copy (see `input_buf`).
@compute @workgroup_size(8, 8, 1)
fn weights_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.v_ld || gid.y >= p.v_rows) {
        return;
    }
    store_patches_buf(gid.xy, weight_patches(gid.xy, p.flip != 0u), 0u);
}

// `weights_buf` of W (layers 0 .. 35) and of W flipped and transposed (layers 36 .. 71) in one
// pass, for a square convolution (Cin = Cout, all output channels): training's forward keeps the
// second for its input gradient, which then transforms no weights.
@compute @workgroup_size(8, 8, 1)
fn weights_pair_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.v_ld || gid.y >= p.v_rows) {
        return;
    }
    store_patches_buf(gid.xy, weight_patches(gid.xy, false), 0u);
    store_patches_buf(gid.xy, weight_patches(gid.xy, true), 36u * p.v_rows * p.v_ld);
}

// The calls' options (p.flags bits) as a constant of the pipeline, made per combination
// (engine::shaders::specialize): lavapipe (Mesa 22.3) runs both sides of a branch under a mask
// even when its condition is uniform, so an unused norm + swish, bias or residual cost every call.
// Unspecialised (ALL), the parameters decide.
const ALL: u32 = 0xffffffffu;
const FLAGS: u32 = ALL;

fn has(flag: u32) -> bool {
    if (FLAGS == ALL) {
        return (p.flags & flag) != 0u;
    }
    return (FLAGS & flag) != 0u;
}

// ---- input [B, Cin, H, W] -> V: layer ξ, texel (q, c) = V[ξ][c][tiles t0 + 4q .. +3] ----
// Tiles are numbered across the batch: t = (image * tiles_y + ty) * tiles_x + tx.
// The input is read from `flat`, from image `image0` on.
// With flags & 1 the input is normalised (group norm, then swish) as it is
// read, exactly as norm.wgsl's apply4 does (see conv2d.wgsl's shifted_pack).
@group(0) @binding(3) var<storage, read> pre_stats: array<vec2<f32>>;   // (mean, 1/std) per (image, group)
@group(0) @binding(4) var<storage, read> pre_gamma: array<f32>;
@group(0) @binding(5) var<storage, read> pre_beta: array<f32>;

// Where one tile's 6x6 patch starts: (its plane's first value in `flat`, top
// row, left column, image), or row = -100 for a tile past the end. Once per
// tile: integer divisions run lane by lane on CPU devices.
fn patch_origin(t: u32, c: u32) -> vec4<i32> {
    let per_image = p.tiles_x * p.tiles_y;
    if (t >= p.t0 + p.nt || c >= p.cin) {
        return vec4<i32>(0, -100, 0, -1);
    }
    let image = t / per_image;
    let r = t - image * per_image;
    let ty = r / p.tiles_x;
    let tx = r - ty * p.tiles_x;
    let plane = i32(((image - p.image0) * p.cin + c) * p.plane_stride) - i32(p.y0 * p.w);
    return vec4<i32>(plane, 4 * i32(ty) - 1, 4 * i32(tx) - 1, i32(image));
}

fn input_at(o: vec4<i32>, dy: i32, dx: i32, pre: vec4<f32>) -> f32 {
    let y = o.y + dy;
    let xi = o.z + dx;
    if (y < 0 || y >= i32(p.h) || xi < 0 || xi >= i32(p.w)) {
        return 0.0;
    }
    return pre1(flat_at(u32(o.x) + u32(y) * p.w + u32(xi)), pre);
}

// The norm's (mean, 1/std) for channel c of a tile's image (origin.w, -1
// past the end), with (gamma, beta).
fn norm_of(origin: vec4<i32>, c: u32, gamma_beta: vec2<f32>) -> vec4<f32> {
    if (!has(1u) || origin.w < 0) {
        return vec4<f32>(0.0);
    }
    let m = pre_stats[(u32(origin.w) * p.cin + c) / p.group_size];
    return vec4<f32>(m.x, m.y, gamma_beta);
}

// Value (dy, dx) of the four tiles' patches, one lane per tile.
fn patch4(o0: vec4<i32>, o1: vec4<i32>, o2: vec4<i32>, o3: vec4<i32>, dy: i32, dx: i32,
          n0: vec4<f32>, n1: vec4<f32>, n2: vec4<f32>, n3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(input_at(o0, dy, dx, n0), input_at(o1, dy, dx, n1), input_at(o2, dy, dx, n2), input_at(o3, dy, dx, n3));
}

// Column dx of the four tiles' patches.
fn patch_column(o0: vec4<i32>, o1: vec4<i32>, o2: vec4<i32>, o3: vec4<i32>, dx: i32,
                n0: vec4<f32>, n1: vec4<f32>, n2: vec4<f32>, n3: vec4<f32>) -> Six {
    return Six(patch4(o0, o1, o2, o3, 0, dx, n0, n1, n2, n3), patch4(o0, o1, o2, o3, 1, dx, n0, n1, n2, n3),
               patch4(o0, o1, o2, o3, 2, dx, n0, n1, n2, n3), patch4(o0, o1, o2, o3, 3, dx, n0, n1, n2, n3),
               patch4(o0, o1, o2, o3, 4, dx, n0, n1, n2, n3), patch4(o0, o1, o2, o3, 5, dx, n0, n1, n2, n3));
}

// Six rows of a transformed 6x6 patch, four lanes each: the weights' (four input channels) or the
// input's (four tiles of one channel).
struct Patch6 {
    r0: Six, r1: Six, r2: Six, r3: Six, r4: Six, r5: Six,
}

fn input_patches(xy: vec2<u32>) -> Patch6 {
    let c = xy.y;
    let t = p.t0 + 4u * xy.x;
    let o0 = patch_origin(t, c);
    let o1 = patch_origin(t + 1u, c);
    let o2 = patch_origin(t + 2u, c);
    let o3 = patch_origin(t + 3u, c);
    var gamma_beta = vec2<f32>(0.0);
    if (has(1u) && c < p.cin) {
        gamma_beta = vec2<f32>(pre_gamma[c], pre_beta[c]);
    }
    let n0 = norm_of(o0, c, gamma_beta);
    let n1 = norm_of(o1, c, gamma_beta);
    let n2 = norm_of(o2, c, gamma_beta);
    let n3 = norm_of(o3, c, gamma_beta);
    return input_transform(patch_column(o0, o1, o2, o3, 0, n0, n1, n2, n3), patch_column(o0, o1, o2, o3, 1, n0, n1, n2, n3),
                           patch_column(o0, o1, o2, o3, 2, n0, n1, n2, n3), patch_column(o0, o1, o2, o3, 3, n0, n1, n2, n3),
                           patch_column(o0, o1, o2, o3, 4, n0, n1, n2, n3), patch_column(o0, o1, o2, o3, 5, n0, n1, n2, n3));
}

// Bᵀ d B of four patches from their six columns d[.][dx]: Bᵀ down each column, then along each row.
fn input_transform(d0: Six, d1: Six, d2: Six, d3: Six, d4: Six, d5: Six) -> Patch6 {
    let col0 = input_bt(d0);
    let col1 = input_bt(d1);
    let col2 = input_bt(d2);
    let col3 = input_bt(d3);
    let col4 = input_bt(d4);
    let col5 = input_bt(d5);
    return Patch6(input_bt(Six(col0.v0, col1.v0, col2.v0, col3.v0, col4.v0, col5.v0)),
                  input_bt(Six(col0.v1, col1.v1, col2.v1, col3.v1, col4.v1, col5.v1)),
                  input_bt(Six(col0.v2, col1.v2, col2.v2, col3.v2, col4.v2, col5.v2)),
                  input_bt(Six(col0.v3, col1.v3, col2.v3, col3.v3, col4.v3, col5.v3)),
                  input_bt(Six(col0.v4, col1.v4, col2.v4, col3.v4, col4.v4, col5.v4)),
                  input_bt(Six(col0.v5, col1.v5, col2.v5, col3.v5, col4.v5, col5.v5)));
}

@compute @workgroup_size(8, 8, 1)
fn input(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(transformed);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    store_patches(gid.xy, input_patches(gid.xy));
}

// ---- The same for four tiles of one tile row (W % 16 == 0, pieces of whole groups of four) ----
// Their patches are one 6 x 18 strip of the input, read as aligned vec4s from `flat4` (the flat
// input as rgba32float: the same layout, 16 texels a row): 36 fetches instead of 144, and the norm
// + swish computed once per value instead of once per patch that holds it. The same arithmetic,
// so the same numbers as `input`.
@group(0) @binding(1) var flat4: texture_storage_2d_array<rgba32float, read>;

// Values 4q .. 4q + 3 of the flat input.
fn flat4_at(q: u32) -> vec4<f32> {
    return textureLoad(flat4, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

// The norm + swish of read values (flags & 1; n: `norm_of`), else the values.
fn pre4(v: vec4<f32>, n: vec4<f32>) -> vec4<f32> {
    if (!has(1u)) {
        return v;
    }
    let a = (v - n.x) * n.y * n.z + n.w;
    return a / (1.0 + exp(-a));
}

fn pre1(v: f32, n: vec4<f32>) -> f32 {
    return pre4(vec4<f32>(v), n).x;
}

// Row dy of the four patches that start at `o` (`patch_origin` of the first tile): entry dx holds
// the four tiles' values at column dx, lane j being tile j (strip columns 4j + dx).
fn strip_row(o: vec4<i32>, dy: i32, n: vec4<f32>) -> Six {
    let y = o.y + dy;
    if (y < 0 || y >= i32(p.h)) {
        return Six(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    }
    let x0 = u32(o.z + 1);   // the first tile's left column: a multiple of 16
    let q = (u32(o.x) + u32(y) * p.w + x0) / 4u;
    let v0 = pre4(flat4_at(q), n);
    let v1 = pre4(flat4_at(q + 1u), n);
    let v2 = pre4(flat4_at(q + 2u), n);
    let v3 = pre4(flat4_at(q + 3u), n);
    var left = 0.0;
    if (x0 > 0u) {
        left = pre1(flat4_at(q - 1u).w, n);
    }
    var right = 0.0;
    if (x0 + 16u < p.w) {
        right = pre1(flat4_at(q + 4u).x, n);
    }
    return Six(vec4<f32>(left, v0.w, v1.w, v2.w), vec4<f32>(v0.x, v1.x, v2.x, v3.x), vec4<f32>(v0.y, v1.y, v2.y, v3.y),
               vec4<f32>(v0.z, v1.z, v2.z, v3.z), vec4<f32>(v0.w, v1.w, v2.w, v3.w), vec4<f32>(v1.x, v2.x, v3.x, right));
}

fn input4_patches(xy: vec2<u32>) -> Patch6 {
    let c = xy.y;
    // Row -100 (all zeros) for a group past the piece or a channel past cin.
    let o = patch_origin(p.t0 + 4u * xy.x, c);
    var gamma_beta = vec2<f32>(0.0);
    if (has(1u) && c < p.cin) {
        gamma_beta = vec2<f32>(pre_gamma[c], pre_beta[c]);
    }
    let n = norm_of(o, c, gamma_beta);
    let r0 = strip_row(o, 0, n);
    let r1 = strip_row(o, 1, n);
    let r2 = strip_row(o, 2, n);
    let r3 = strip_row(o, 3, n);
    let r4 = strip_row(o, 4, n);
    let r5 = strip_row(o, 5, n);
    return input_transform(Six(r0.v0, r1.v0, r2.v0, r3.v0, r4.v0, r5.v0), Six(r0.v1, r1.v1, r2.v1, r3.v1, r4.v1, r5.v1),
                           Six(r0.v2, r1.v2, r2.v2, r3.v2, r4.v2, r5.v2), Six(r0.v3, r1.v3, r2.v3, r3.v3, r4.v3, r5.v3),
                           Six(r0.v4, r1.v4, r2.v4, r3.v4, r4.v4, r5.v4), Six(r0.v5, r1.v5, r2.v5, r3.v5, r4.v5, r5.v5));
}

@compute @workgroup_size(8, 8, 1)
fn input4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(transformed);
    if (gid.x >= dims.x || gid.y >= dims.y) {
        return;
    }
    store_patches(gid.xy, input4_patches(gid.xy));
}

fn store_patches(xy: vec2<u32>, v: Patch6) {
    store_row6(xy, 0u, v.r0);
    store_row6(xy, 1u, v.r1);
    store_row6(xy, 2u, v.r2);
    store_row6(xy, 3u, v.r3);
    store_row6(xy, 4u, v.r4);
    store_row6(xy, 5u, v.r5);
}

// `input` into a buffer laid out as the texture's copy (texel (q, c) of layer ξ at
// (ξ * v_rows + c) * v_ld + q), copied into the products' texture afterwards: on lavapipe 36
// layered storage-texture stores per invocation cost four times the rest of the pass
// (`Tuning::textures_via_buffer`).
@group(0) @binding(2) var<storage, read_write> transformed_buf: array<vec4<f32>>;

fn store_row6_buf(xy: vec2<u32>, i: u32, row: Six, first: u32) {
    let layer = p.v_rows * p.v_ld;
    let at = first + (6u * i * p.v_rows + xy.y) * p.v_ld + xy.x;
    transformed_buf[at] = row.v0;
    transformed_buf[at + layer] = row.v1;
    transformed_buf[at + 2u * layer] = row.v2;
    transformed_buf[at + 3u * layer] = row.v3;
    transformed_buf[at + 4u * layer] = row.v4;
    transformed_buf[at + 5u * layer] = row.v5;
}

@compute @workgroup_size(8, 8, 1)
fn input_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.v_ld || gid.y >= p.v_rows) {
        return;
    }
    store_patches_buf(gid.xy, input_patches(gid.xy), 0u);
}

@compute @workgroup_size(8, 8, 1)
fn input4_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.v_ld || gid.y >= p.v_rows) {
        return;
    }
    store_patches_buf(gid.xy, input4_patches(gid.xy), 0u);
}

// (From element `first` of the buffer on: the second set of `weights_pair_buf`.)
fn store_patches_buf(xy: vec2<u32>, v: Patch6, first: u32) {
    store_row6_buf(xy, 0u, v.r0, first);
    store_row6_buf(xy, 1u, v.r1, first);
    store_row6_buf(xy, 2u, v.r2, first);
    store_row6_buf(xy, 3u, v.r3, first);
    store_row6_buf(xy, 4u, v.r4, first);
    store_row6_buf(xy, 5u, v.r5, first);
}

// ---- M (the products' output, copied into a texture: layer ξ, texel (q, o) =
// M[ξ][o][tiles t0 + 4q .. +3]) -> y [B, Cout, H, W] (+ bias) ----
@group(0) @binding(1) var m: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
// With flags & 4 a residual of y's shape is added (a ResnetBlock's x + h),
// which saves the separate add's pass over both tensors.
@group(0) @binding(4) var<storage, read> res: array<f32>;
@group(0) @binding(4) var<storage, read> res4: array<vec4<f32>>;
// With flags & 8 as well, y already holds the residual (written in place: a ResnetBlock's x, which
// nothing reads afterwards, becomes x + h without a third tensor at the peak); binding 4 unused.

fn residual_at(i: u32) -> f32 {
    if (has(8u)) {
        return y[i];
    }
    return res[i];
}

// Column l of the transformed tile: M[6i + l] for i = 0..5. M holds the products of every output
// channel; this pass writes channels o0 .. o0 + cout.
fn m_column(l: u32, o: u32, q: u32) -> Six {
    let xy = vec2<u32>(q, p.o0 + o);
    return Six(textureLoad(m, xy, l), textureLoad(m, xy, 6u + l), textureLoad(m, xy, 12u + l), textureLoad(m, xy, 18u + l),
               textureLoad(m, xy, 24u + l), textureLoad(m, xy, 30u + l));
}

// Where tile t's output starts in y: (index of its top-left value, its top
// row, its left column), or x = -1 past the end. Once per tile: integer
// divisions run lane by lane on CPU devices.
fn tile_origin(t: u32, o: u32) -> vec3<i32> {
    if (t >= p.t0 + p.nt) {
        return vec3<i32>(-1, 0, 0);
    }
    let per_image = p.tiles_x * p.tiles_y;
    let image = t / per_image;
    let rem = t - image * per_image;
    let ty = rem / p.tiles_x;
    let ox = 4u * (rem - ty * p.tiles_x);
    let oy = 4u * ty;
    return vec3<i32>(i32((((image - p.out_image0) * p.out_channels + o) * p.h + oy) * p.w + ox), i32(oy), i32(ox));
}

// Row `ry` (0..3) of a tile: its first index in y, or -1 outside the image.
fn row_start(origin: vec3<i32>, ry: u32) -> i32 {
    if (origin.x < 0 || u32(origin.y) + ry >= p.h) {
        return -1;
    }
    return origin.x + i32(ry * p.w);
}

// Four columns of an output row, those inside the image (its last tile column may be partial).
fn store_tile_row(origin: vec3<i32>, ry: u32, v: vec4<f32>) {
    let start = row_start(origin, ry);
    if (start < 0) {
        return;
    }
    let base = u32(start);
    let ox = u32(origin.z);
    let add = has(4u);
    y[base] = select(v.x, v.x + residual_at(base), add);
    if (ox + 1u < p.w) {
        y[base + 1u] = select(v.y, v.y + residual_at(base + 1u), add);
    }
    if (ox + 2u < p.w) {
        y[base + 2u] = select(v.z, v.z + residual_at(base + 2u), add);
    }
    if (ox + 3u < p.w) {
        y[base + 3u] = select(v.w, v.w + residual_at(base + 3u), add);
    }
}

// The same as one vec4 store (W % 4 == 0: every tile row is whole and aligned).
fn store_tile_row4(origin: vec3<i32>, ry: u32, v: vec4<f32>) {
    let start = row_start(origin, ry);
    if (start >= 0) {
        let i = u32(start) / 4u;
        if (has(8u)) {
            y4[i] = v + y4[i];
        } else if (has(4u)) {
            y4[i] = v + res4[i];
        } else {
            y4[i] = v;
        }
    }
}

// `store_tile_row4` adding the residual from `res_band` (rgba32float layers, `copy::flat_band_layers`:
// channel o of this window in layer o, from row res_y0 of its plane on), fetched as one texel
// instead of lane by lane from a buffer.
@group(0) @binding(4) var res_band: texture_storage_2d_array<rgba32float, read>;

fn store_tile_row4_band(origin: vec3<i32>, ry: u32, v: vec4<f32>, o: u32) {
    let start = row_start(origin, ry);
    if (start >= 0) {
        let q = ((u32(origin.y) + ry - p.res_y0) * p.w + u32(origin.z)) / 4u;
        y4[u32(start) / 4u] = v + textureLoad(res_band, vec2<u32>(q & 15u, (q >> 4u) & 4095u), o);
    }
}

// The four tiles' transformed columns c_l (rows 0..3 of Aᵀ M), after Aᵀ down each column of M.
struct Columns {
    c0: Four, c1: Four, c2: Four, c3: Four, c4: Four, c5: Four,
}

fn output_columns(o: u32, q: u32) -> Columns {
    return Columns(output_at(m_column(0u, o, q)), output_at(m_column(1u, o, q)), output_at(m_column(2u, o, q)),
                   output_at(m_column(3u, o, q)), output_at(m_column(4u, o, q)), output_at(m_column(5u, o, q)));
}

// Output row r of the four tiles (Aᵀ along row r), lane = tile, transposed to one vec4 per tile.
fn output_row(c: Columns, r: u32, b: f32) -> Four {
    var s: Six;
    switch (r) {
        case 0u: { s = Six(c.c0.v0, c.c1.v0, c.c2.v0, c.c3.v0, c.c4.v0, c.c5.v0); }
        case 1u: { s = Six(c.c0.v1, c.c1.v1, c.c2.v1, c.c3.v1, c.c4.v1, c.c5.v1); }
        case 2u: { s = Six(c.c0.v2, c.c1.v2, c.c2.v2, c.c3.v2, c.c4.v2, c.c5.v2); }
        default: { s = Six(c.c0.v3, c.c1.v3, c.c2.v3, c.c3.v3, c.c4.v3, c.c5.v3); }
    }
    let v = output_at(s);
    return Four(vec4<f32>(v.v0.x, v.v1.x, v.v2.x, v.v3.x) + b, vec4<f32>(v.v0.y, v.v1.y, v.v2.y, v.v3.y) + b,
                vec4<f32>(v.v0.z, v.v1.z, v.v2.z, v.v3.z) + b, vec4<f32>(v.v0.w, v.v1.w, v.v2.w, v.v3.w) + b);
}

fn bias_of(o: u32) -> f32 {
    if (has(2u)) {
        return bias[p.o0 + o];
    }
    return 0.0;
}

// One invocation's four tiles of output channel o: its transformed columns,
// bias and where each tile starts in y.
struct OutTiles {
    c: Columns, b: f32, o0: vec3<i32>, o1: vec3<i32>, o2: vec3<i32>, o3: vec3<i32>,
}

fn out_tiles(q: u32, o: u32) -> OutTiles {
    let t = p.t0 + 4u * q;
    return OutTiles(output_columns(o, q), bias_of(o), tile_origin(t, o), tile_origin(t + 1u, o), tile_origin(t + 2u, o),
                    tile_origin(t + 3u, o));
}

@compute @workgroup_size(8, 8, 1)
fn output(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (4u * gid.x >= p.nt || gid.y >= p.cout) {
        return;
    }
    let u = out_tiles(gid.x, gid.y);
    for (var r = 0u; r < 4u; r++) {
        let v = output_row(u.c, r, u.b);
        store_tile_row(u.o0, r, v.v0);
        store_tile_row(u.o1, r, v.v1);
        store_tile_row(u.o2, r, v.v2);
        store_tile_row(u.o3, r, v.v3);
    }
}

// The same with one vec4 store per tile row (W % 4 == 0).
@compute @workgroup_size(8, 8, 1)
fn output4(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (4u * gid.x >= p.nt || gid.y >= p.cout) {
        return;
    }
    let u = out_tiles(gid.x, gid.y);
    for (var r = 0u; r < 4u; r++) {
        let v = output_row(u.c, r, u.b);
        store_tile_row4(u.o0, r, v.v0);
        store_tile_row4(u.o1, r, v.v1);
        store_tile_row4(u.o2, r, v.v2);
        store_tile_row4(u.o3, r, v.v3);
    }
}

// `output4` with the residual from `res_band` (flags & 4; the piece's tiles in one image).
@compute @workgroup_size(8, 8, 1)
fn output4_band(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (4u * gid.x >= p.nt || gid.y >= p.cout) {
        return;
    }
    let u = out_tiles(gid.x, gid.y);
    for (var r = 0u; r < 4u; r++) {
        let v = output_row(u.c, r, u.b);
        store_tile_row4_band(u.o0, r, v.v0, gid.y);
        store_tile_row4_band(u.o1, r, v.v1, gid.y);
        store_tile_row4_band(u.o2, r, v.v2, gid.y);
        store_tile_row4_band(u.o3, r, v.v3, gid.y);
    }
}
