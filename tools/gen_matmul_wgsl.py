#!/usr/bin/env python3
"""Writes shaders/matmul.wgsl: the texture-fed, register-tiled matmul.

The tile loops are unrolled here because private arrays indexed in loops are
lowered to per-lane memory on software devices (lavapipe), which made the
kernel 5x slower than the same code with named registers. Run this after
editing, from the repository root:  python3 tools/gen_matmul_wgsl.py
It also writes src/engine/tiles.rs, the engine's list of the tiles, so the
list has one source. `python3 tools/gen_matmul_wgsl.py DIR` writes under DIR
instead (tests/shaders.rs regenerates into a temporary folder and compares).
"""
import os
import sys

PARAMS = """struct Params {
    m: u32, n: u32, k4: u32, bias_mode: u32,   // k4: K in texels; bias_mode: 0 none, 1 per row of C, 2 per column; +4: GELU
    a_shared: u32, b_shared: u32, alpha: f32, beta: f32,
    c_off: u32, c_bs: u32, ldc: u32, bias_off: u32,
    cin4: u32, kw: u32, taps: u32, wo: u32,    // convolutions read straight from the input (conv_* entries)
    m_first: u32, b_first: u32, stride: u32, ho: u32,   // this dispatch: rows m_first .. m of C, batch entries b_first ..; dw_*: stride, output rows
    rows: u32, rows_per_split: u32, diag: u32, causal: u32,   // dw_*: output rows of all images, and of one split of K; causal, diag: see causal_k_range
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var ta: texture_2d_array<f32>;
@group(0) @binding(2) var tb: texture_2d_array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
"""

STORE = """fn store(bt: u32, m: u32, n: u32, acc: f32) {
    if (m < p.m && n < p.n) {
        var v = p.alpha * acc;
        if ((p.bias_mode & 3u) == 1u) {
            v += bias[p.bias_off + m];
        } else if ((p.bias_mode & 3u) == 2u) {
            v += bias[p.bias_off + n];
        }
        if ((p.bias_mode & 4u) != 0u) {
            v = 0.5 * v * (1.0 + gemv_erf(v * 0.70710678118654752));
        }
        let idx = p.c_off + bt * p.c_bs + m * p.ldc + n;
        if (p.beta != 0.0) {
            v += p.beta * c[idx];
        }
        c[idx] = v;
    }
}

"""

ERF = """// erf with |error| < 1.2e-7 (as shaders/elementwise.wgsl), so GELU matches
// PyTorch's exact form.
fn gemv_erf(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, x >= 0.0);
}

"""

ERF_AND_STORE = "\n" + ERF + STORE

# (entry name, rows per invocation, columns per invocation, workgroup x, workgroup y)
TILES = [("mm_16x16", 16, 16, 8, 1), ("mm_8x8", 8, 8, 8, 8), ("mm_4x4", 4, 4, 16, 8), ("mm_1x16", 1, 16, 8, 1)]
C = "xyzw"

# The vec4 packs' loads, as read from the buffer (`src4`); their `_tex` twins read the same
# vec4s from a texture copy of the operand's memory rows (texel (x, y) of layer l = the vec4 at
# off + l*bs + y*stride + 4x).
ROWS4_TEXEL = """fn rows4_texel(t: vec3<u32>) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (t.y < pp.rows && 4u * t.x < pp.cols) {
        v = src4[(pp.off + t.z * pp.bs + t.y * pp.rs) / 4u + t.x];
        v = select(vec4<f32>(0.0), v, 4u * t.x + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(pp.cols));
    }
    return v;
}

"""

COLS4_TEXELS = """fn cols4_texels(x: u32, y: u32, layer: u32) -> Texels4 {
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    if (y < pp.rows) {
        let base = pp.off + layer * pp.bs + y;
        let col = 4u * x;
        if (col < pp.cols) { c0 = src4[(base + col * pp.cs) / 4u]; }
        if (col + 1u < pp.cols) { c1 = src4[(base + (col + 1u) * pp.cs) / 4u]; }
        if (col + 2u < pp.cols) { c2 = src4[(base + (col + 2u) * pp.cs) / 4u]; }
        if (col + 3u < pp.cols) { c3 = src4[(base + (col + 3u) * pp.cs) / 4u]; }
        let inside = y + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(pp.rows);
        c0 = select(vec4<f32>(0.0), c0, inside);
        c1 = select(vec4<f32>(0.0), c1, inside);
        c2 = select(vec4<f32>(0.0), c2, inside);
        c3 = select(vec4<f32>(0.0), c3, inside);
    }
    return Texels4(vec4<f32>(c0.x, c1.x, c2.x, c3.x), vec4<f32>(c0.y, c1.y, c2.y, c3.y),
                   vec4<f32>(c0.z, c1.z, c2.z, c3.z), vec4<f32>(c0.w, c1.w, c2.w, c3.w));
}

"""


def tex_twin(fn_text, name, loads):
    """fn_text with its function renamed name + "_tex" and each (buffer load, texture load) swapped."""
    out = fn_text.replace(f"fn {name}(", f"fn {name}_tex(", 1)
    for old, new in loads:
        assert old in out, old
        out = out.replace(old, new)
    return out


TEX_TEXEL_FNS = tex_twin(ROWS4_TEXEL, "rows4_texel", [
    ("src4[(pp.off + t.z * pp.bs + t.y * pp.rs) / 4u + t.x]",
     "textureLoad(src_t, vec2<u32>(t.x + t.z * pp.src_lx, t.y), t.z * pp.src_lz)"),
]) + tex_twin(COLS4_TEXELS, "cols4_texels", [
    ("        let base = pp.off + layer * pp.bs + y;\n", ""),
] + [
    (f"src4[(base + {c} * pp.cs) / 4u]",
     f"textureLoad(src_t, vec2<u32>(y / 4u + layer * pp.src_lx, {c}), layer * pp.src_lz)")
    for c in ["col", "(col + 1u)", "(col + 2u)", "(col + 3u)"]
]).replace("vec2<u32>(y / 4u + layer * pp.src_lx, (col + 1u))", "vec2<u32>(y / 4u + layer * pp.src_lx, col + 1u)").replace(
    "vec2<u32>(y / 4u + layer * pp.src_lx, (col + 2u))", "vec2<u32>(y / 4u + layer * pp.src_lx, col + 2u)").replace(
    "vec2<u32>(y / 4u + layer * pp.src_lx, (col + 3u))", "vec2<u32>(y / 4u + layer * pp.src_lx, col + 3u)")

# The vec4 packs' entries that store through a buffer (`_buf`), and their `_tex` twins: the same
# entries calling the `_tex` loads.
BUF_PACK_ENTRIES = """@compute @workgroup_size(8, 8, 1)
fn pack_rows4_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid + vec3<u32>(pp.x0, pp.row0, pp.layer0);
    if (t.x < pp.dst_w && t.y < pp.dst_h) {
        staged[(t.z * pp.dst_h + t.y) * pp.dst_ld + t.x] = rows4_texel(t);
    }
}

@compute @workgroup_size(8, 8, 1)
fn pack_cols4_buf(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x + pp.x0;
    let y = 4u * gid.y + pp.row0;
    let layer = gid.z + pp.layer0;
    if (x >= pp.dst_w || y >= pp.dst_h) {
        return;
    }
    let v = cols4_texels(x, y, layer);
    let at = (layer * pp.dst_h + y) * pp.dst_ld + x;
    staged[at] = v.t0;
    staged[at + pp.dst_ld] = v.t1;
    staged[at + 2u * pp.dst_ld] = v.t2;
    staged[at + 3u * pp.dst_ld] = v.t3;
}

"""

TEX_PACK_ENTRIES = BUF_PACK_ENTRIES.replace("fn pack_rows4_buf(", "fn pack_rows4_tex(").replace(
    "fn pack_cols4_buf(", "fn pack_cols4_tex(").replace("rows4_texel(t)", "rows4_texel_tex(t)").replace(
    "cols4_texels(x, y, layer)", "cols4_texels_tex(x, y, layer)")

HEADER = """// GENERATED by tools/gen_matmul_wgsl.py -- edit that file, not this one.
//
// Batched matrix product  C = act(alpha * A B + bias) + beta * C  (A: M x K, B: K x N).
//
// Operands are first packed (entry `pack`) into rgba32float texture arrays:
// A as texel (k/4, m) = A[m, k..k+3], B as texel (n/4, k) = B[k, n..n+3], zero
// padded to whole tiles. Transposes, strides and ragged sizes are all handled
// by the pack, so the product kernels never branch on layout. Texture fetches
// are vectorised on software devices, where storage-buffer loads run lane by
// lane (measured on lavapipe: 6x faster for the same tile), and go through the
// texture cache on GPUs. Each invocation owns a TM x TN block of C in
// registers; there are no barriers. The layer of an operand is the batch
// index, or 0 when that operand is shared by the batch.

""" + PARAMS + """
""" + STORE + """struct PackParams {
    rows: u32, cols: u32, off: u32, bs: u32,
    rs: u32, cs: u32, matrix_cols: u32, block_cols: u32,
    x0: u32, row0: u32, layer0: u32, src_lx: u32,   // this dispatch's first texel column, row and layer; _tex: texels between layers side by side
    dst_w: u32, dst_h: u32, dst_ld: u32, src_lz: u32,   // *_buf, *_tex: the texture's extent, texels per staged row; _tex: 1 if layers are layers
}

@group(0) @binding(0) var<uniform> pp: PackParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var dst: texture_storage_2d_array<rgba32float, write>;

// Texel (x, y) of layer l = src[off + l*bs + y*rs + (4x + i)*cs], i = 0..3; zero outside rows x cols.
fn pack_texel(gid: vec3<u32>) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (gid.y < pp.rows) {
        let base = pp.off + gid.z * pp.bs + gid.y * pp.rs;
        for (var i = 0u; i < 4u; i++) {
            let col = 4u * gid.x + i;
            // Row-product weights are packed in blocks of columns, one per
            // layer (block_cols columns each), of a matrix of matrix_cols columns.
            if (col < pp.cols && (pp.matrix_cols == 0u || gid.z * pp.block_cols + col < pp.matrix_cols)) {
                v[i] = src[base + col * pp.cs];
            }
        }
    }
    return v;
}

// A source larger than one storage binding is packed a window at a time: src is then bound
// from an aligned start before the window, and off (wrapping) counts from there.
@compute @workgroup_size(8, 8, 1)
fn pack(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    let t = gid + vec3<u32>(pp.x0, pp.row0, pp.layer0);
    if (t.x < dims.x && t.y < dims.y) {
        textureStore(dst, vec2<u32>(t.xy), t.z, pack_texel(t));
    }
}

// Operands whose layout allows it are read a vec4 at a time: on devices whose storage-buffer
// loads run lane by lane (lavapipe) one vector load costs about what one scalar load does.
@group(0) @binding(1) var<storage, read> src4: array<vec4<f32>>;

// Rows that start on whole vec4s (cs = 1; off, rs and bs multiples of 4): each texel is one
// load, its values past the last column zeroed. (A binding's window ends on a whole vec4, so the
// last texel's load stays inside it.)
""" + ROWS4_TEXEL + """@compute @workgroup_size(8, 8, 1)
fn pack_rows4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    let t = gid + vec3<u32>(pp.x0, pp.row0, pp.layer0);
    if (t.x < dims.x && t.y < dims.y) {
        textureStore(dst, vec2<u32>(t.xy), t.z, rows4_texel(t));
    }
}

// Columns that start on whole vec4s (a transposed operand: rs = 1; off, cs and bs multiples of
// 4): an invocation loads 4 rows of 4 columns, one vec4 per column, and returns them transposed
// as the texels (x, 4y .. 4y + 3), values past the last row zeroed.
struct Texels4 {
    t0: vec4<f32>, t1: vec4<f32>, t2: vec4<f32>, t3: vec4<f32>,
}

""" + COLS4_TEXELS + """@compute @workgroup_size(8, 8, 1)
fn pack_cols4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst);
    let x = gid.x + pp.x0;
    let y = 4u * gid.y + pp.row0;
    let layer = gid.z + pp.layer0;
    if (x >= dims.x || y >= dims.y) {
        return;
    }
    let v = cols4_texels(x, y, layer);
    textureStore(dst, vec2<u32>(x, y), layer, v.t0);
    textureStore(dst, vec2<u32>(x, y + 1u), layer, v.t1);
    textureStore(dst, vec2<u32>(x, y + 2u), layer, v.t2);
    textureStore(dst, vec2<u32>(x, y + 3u), layer, v.t3);
}

// The same packs into a buffer laid out as the texture's copy (texel (x, y) of layer l at
// (l * dst_h + y) * dst_ld + x), copied into the texture afterwards: on lavapipe storage-texture
// stores cost more than buffer stores (`Tuning::textures_via_buffer`).
@group(0) @binding(2) var<storage, read_write> staged: array<vec4<f32>>;

""" + BUF_PACK_ENTRIES + """// The same packs reading the operand from a texture copy of its memory rows (`_tex`: texel
// (x + l*src_lx, y) of layer l*src_lz = the vec4 at off + l*bs + y*stride + 4x, stride = rs for
// rows4, cs for cols4: layers as layers, or side by side where a batch lies within each row
// (attention's heads); copied by copy_buffer_to_texture, a memcpy on lavapipe): texture fetches are gathers on
// CPU devices, where a buffer load runs a loop over the lanes (`Tuning::reads_via_texture`).
@group(0) @binding(1) var src_t: texture_storage_2d_array<rgba32float, read>;

""" + TEX_TEXEL_FNS + TEX_PACK_ENTRIES + """// Weights kept for many products (token-by-token decoding) may be packed in
// half precision, 8 per rgba32uint texel: texel (x, y) holds row y, columns
// 8x .. 8x+7. Texture fetches, not bytes, are what costs on software devices,
// so this halves the time of a row product there.
@group(0) @binding(2) var dst_half: texture_storage_2d_array<rgba32uint, write>;

@compute @workgroup_size(8, 8, 1)
fn pack_half(@builtin(global_invocation_id) gid: vec3<u32>) {
    let dims = textureDimensions(dst_half);
    // (A window's first texel, as `pack`: x0 counts half-precision texels.)
    let t = gid + vec3<u32>(pp.x0, pp.row0, pp.layer0);
    if (t.x < dims.x && t.y < dims.y) {
        let lo = pack_texel(vec3<u32>(2u * t.x, t.y, t.z));
        let hi = pack_texel(vec3<u32>(2u * t.x + 1u, t.y, t.z));
        let v = vec4<u32>(pack2x16float(lo.xy), pack2x16float(lo.zw), pack2x16float(hi.xy), pack2x16float(hi.zw));
        textureStore(dst_half, vec2<u32>(t.xy), t.z, v);
    }
}
"""


def accumulate(acc, a, b):
    """acc += a.x * b(0) + a.y * b(1) + a.z * b(2) + a.w * b(3), as one fma chain."""
    return accumulate_steps(acc, [(a, b)])


def accumulate_steps(acc, steps):
    """`accumulate` over several K steps (a, b) in one fma chain."""
    e = acc
    for a, b in steps:
        for kk in range(4):
            e = f"fma(vec4<f32>({a}.{C[kk]}), {b(kk)}, {e})"
    return f"        {acc} = {e};\n"


def declare_tile(tm, tn4):
    """The tile's accumulators c{row}_{texel}, one vec4 per 4 columns."""
    return "".join("    " + " ".join(f"var c{i}_{j} = vec4<f32>(0.0);" for j in range(tn4)) + "\n" for i in range(tm))


def store_tile(tm, tn4, vec4=False):
    """Store every accumulator of the tile at rows m0.., columns n0.. and
    close the entry: one value at a time, or with `vec4` four (store4)."""
    if vec4:
        return "".join(f"    store4(p.b_first + wid.z, m0 + {i}u, n0 + {4 * j}u, c{i}_{j});\n"
                       for i in range(tm) for j in range(tn4)) + "}\n"
    return "".join(f"    store(p.b_first + wid.z, m0 + {i}u, n0 + {4 * j + cc}u, c{i}_{j}.{C[cc]});\n"
                   for i in range(tm) for j in range(tn4) for cc in range(4)) + "}\n"


def tile(name, tm, tn, wgx, wgy):
    tn4 = tn // 4
    out = [f"""
@compute @workgroup_size({wgx}, {wgy}, 1)
fn {name}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {{
    let n0 = (wid.x * {wgx}u + lid.x) * {tn}u;
    let m0 = p.m_first + (wid.y * {wgy}u + lid.y) * {tm}u;
    if (n0 >= p.n || m0 >= p.m) {{
        return;
    }}
    let la = select(p.b_first + wid.z, 0u, p.a_shared == 1u);
    let lb = select(p.b_first + wid.z, 0u, p.b_shared == 1u);
    let nb = n0 / 4u;
"""]
    out.append(declare_tile(tm, tn4))
    out.append("    for (var k = 0u; k < p.k4; k++) {\n")
    for i in range(tm):
        out.append(f"        let a{i} = textureLoad(ta, vec2<u32>(k, m0 + {i}u), la, 0);\n")
    for kk in range(4):
        for j in range(tn4):
            out.append(f"        let b{kk}_{j} = textureLoad(tb, vec2<u32>(nb + {j}u, 4u * k + {kk}u), lb, 0);\n")
    for i in range(tm):
        for j in range(tn4):
            out.append(accumulate(f"c{i}_{j}", f"a{i}", lambda kk: f"b{kk}_{j}"))
    out.append("    }\n")
    out.append(store_tile(tm, tn4))
    return "".join(out)


# Workgroup tiles (GPU-shaped): the workgroup's block of A and B is staged through workgroup
# memory a K slice at a time, each invocation loading one texel of each, behind barriers; the
# invocations then read their rows and columns from there. Real GPUs share loads this way (their
# caches are small and per-unit); on lavapipe a barrier is expensive, so it is one candidate among
# the tiles, chosen by measurement (`taming tune`).
# `mw_64x64_db` double-buffers: two slices of workgroup memory used in turn, the next slice
# loaded into one while the invocations multiply from the other, so one barrier per slice instead
# of two and the loads' latency hidden behind the arithmetic (the CUTLASS / llm.c pattern).
WG_TILES = [("mw_64x64", 4, 4, 16, 16), ("mw_64x64_db", 4, 4, 16, 16)]


def tile_wg(name, tm, tn, wgx, wgy):
    """A (tm*wgy) x (tn*wgx) block of C per workgroup, tm x tn per invocation, K in slices of
    KS texels. Loads: one A texel and one B texel per invocation per slice (so the workgroup's
    invocation count must equal both slices' texels). Names ending in `_db` double-buffer."""
    if name.endswith("_db"):
        return tile_wg_double(name, tm, tn, wgx, wgy)
    assert tn == 4, "one B texel column per invocation"
    bm, bn4 = tm * wgy, tn * wgx // 4          # block rows, block columns in texels
    inv = wgx * wgy
    ks = inv // bm                              # K texels per slice: A slice is bm x ks texels
    assert ks * bm == inv and 4 * ks * bn4 == inv, "loads must cover the slices exactly"
    out = [f"""
var<workgroup> {name}_a: array<vec4<f32>, {inv}>;   // [{bm} rows][{ks} texels of K]
var<workgroup> {name}_b: array<vec4<f32>, {inv}>;   // [{4 * ks} rows of K][{bn4} texels]

@compute @workgroup_size({wgx}, {wgy}, 1)
fn {name}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {{
    // No early return: every invocation reaches the barriers (rows and columns past C's are
    // computed on padding and not stored).
    let tid = lid.y * {wgx}u + lid.x;
    let row0 = p.m_first + wid.y * {bm}u;
    let col0 = wid.x * {bn4 * 4}u;
    let m0 = row0 + lid.y * {tm}u;
    let n0 = col0 + lid.x * 4u;
    let la = select(p.b_first + wid.z, 0u, p.a_shared == 1u);
    let lb = select(p.b_first + wid.z, 0u, p.b_shared == 1u);
    // This invocation's loads in each slice: A's texel k0 + a_k of block row a_row, and B's
    // texel column b_col at K row 4 k0 + b_k.
    let a_row = row0 + tid / {ks}u;
    let a_k = tid % {ks}u;
    let b_col = col0 / 4u + tid % {bn4}u;
    let b_k = tid / {bn4}u;
"""]
    out.append(declare_tile(tm, 1))
    out.append(f"""    for (var k0 = 0u; k0 < p.k4; k0 += {ks}u) {{
        // K past the operand is zero: texels beyond the texture's width are not read as data.
        let ka = k0 + a_k;
        {name}_a[tid] = select(vec4<f32>(0.0), textureLoad(ta, vec2<u32>(ka, a_row), la, 0), ka < p.k4);
        let kb = 4u * k0 + b_k;
        {name}_b[tid] = select(vec4<f32>(0.0), textureLoad(tb, vec2<u32>(b_col, kb), lb, 0), kb < 4u * p.k4);
        workgroupBarrier();
""")
    for kk in range(ks):
        for i in range(tm):
            out.append(f"        let a{i}_{kk} = {name}_a[(lid.y * {tm}u + {i}u) * {ks}u + {kk}u];\n")
        for q in range(4):
            out.append(f"        let b{kk}_{q} = {name}_b[({4 * kk + q}u) * {bn4}u + lid.x];\n")
        for i in range(tm):
            out.append(accumulate(f"c{i}_0", f"a{i}_{kk}", lambda q, kk=kk: f"b{kk}_{q}"))
    out.append("        workgroupBarrier();\n    }\n")
    out.append(store_tile(tm, 1))
    return "".join(out)


def tile_wg_double(name, tm, tn, wgx, wgy):
    """`tile_wg` with two slice buffers: iteration i multiplies from buffer i % 2 while loading
    slice i + 1 into the other; the one barrier at its end makes that slice visible, and orders
    the reads of buffer i % 2 before iteration i + 1 overwrites it."""
    single = tile_wg(name[:-3], tm, tn, wgx, wgy).replace(name[:-3], name)
    inv = wgx * wgy
    head, rest = single.split("    for (var k0 = 0u;", 1)
    body, tail = rest.split("        workgroupBarrier();\n    }\n", 1)
    head = head.replace(f"array<vec4<f32>, {inv}>;   // [", f"array<vec4<f32>, {2 * inv}>;   // 2 x [")
    loads = [l for l in body.splitlines() if "ka" in l or "kb" in l]
    ka, store_a, kb, store_b = loads
    reads = body.split("        workgroupBarrier();\n", 1)[1]
    reads = reads.replace(f"{name}_a[", f"{name}_a[cur + ").replace(f"{name}_b[", f"{name}_b[cur + ")

    def load_slice(k0, into, indent):
        return "".join(indent + l.strip().replace("k0", k0).replace("[tid]", f"[{into}tid]") + "\n"
                       for l in (ka, store_a, kb, store_b))

    return (head
            + "    // Slice 0 into buffer 0; then each iteration loads the next slice into the other.\n"
            + "    {\n" + load_slice("0u", "", "        ") + "    }\n"
            + "    workgroupBarrier();\n"
            + "    var cur = 0u;\n"
            + "    for (var k0 = 0u; k0 < p.k4; k0 += " + body.split("k0 += ", 1)[1].split(")", 1)[0] + ") {\n"
            + f"        let next = {inv}u - cur;\n"
            + "        {\n" + load_slice("(k0 + " + body.split("k0 += ", 1)[1].split(")", 1)[0] + ")", "next + ", "            ") + "        }\n"
            + reads
            + "        workgroupBarrier();\n"
            + "        cur = next;\n"
            + "    }\n" + tail)


# f16 arithmetic (opt-in, `Tuning::f16_products`, devices with shader-f16): the workgroup tile
# with its A and B slices staged in workgroup memory as f16 and each K slice of 16 multiplied
# and summed in f16, the slices' sums added in f32. Half the workgroup memory and, on GPUs with
# fast f16, up to twice the arithmetic rate; values round to 11 bits, so results differ from f32
# by about 1e-3 of their scale (checked at 2e-2).
F16_HEADER = "enable f16;\n\n"


def tile_wg_h(name, tm, tn, wgx, wgy):
    """`tile_wg` in f16 (see above)."""
    f32 = tile_wg(name, tm, tn, wgx, wgy)
    out = []
    for line in f32.splitlines(keepends=True):
        if "array<vec4<f32>" in line and "var<workgroup>" in line:
            line = line.replace("array<vec4<f32>", "array<vec4<f16>")
        elif "_a[tid] = select(" in line or "_b[tid] = select(" in line:
            line = line.replace("select(vec4<f32>(0.0), textureLoad", "vec4<f16>(select(vec4<f32>(0.0), textureLoad").replace(");\n", "));\n")
        out.append(line)
    text = "".join(out)
    # Sums of a slice in f16, added to the f32 accumulators after it.
    text = text.replace("        workgroupBarrier();\n        let a0_0", "        workgroupBarrier();\n" + "".join(
        f"        var s{i} = vec4<f16>(0.0);\n" for i in range(tm)) + "        let a0_0", 1)
    for i in range(tm):
        text = text.replace(f"        c{i}_0 = fma(", f"        s{i} = fma(")
        text = text.replace(f", c{i}_0))));", f", s{i}))));")
        text = text.replace(f"vec4<f32>(a{i}_", f"vec4<f16>(a{i}_")
    text = text.replace("        workgroupBarrier();\n    }\n", "".join(
        f"        c{i}_0 += vec4<f32>(s{i});\n" for i in range(tm)) + "        workgroupBarrier();\n    }\n", 1)
    return text.replace(f"fn {name}(", f"fn {name}_h(").replace(f"{name}_a", f"{name}_ha").replace(f"{name}_b", f"{name}_hb")


# Products of a few rows (token-by-token decoding) with a packed weight:
# (entry name, rows per invocation, texels (4 columns each) per invocation).
# (entry name, rows per invocation, texels per invocation, f16 weights): an
# f32 texel holds 4 columns of W, an f16 (rgba32uint) texel 8.
GEMVS = [("gemv_r1_t1", 1, 1, False), ("gemv_r1_t2", 1, 2, False), ("gemv_r1_t4", 1, 4, False),
         ("gemv_r4_t2", 4, 2, False), ("gemv_h_r1_t1", 1, 1, True), ("gemv_h_r1_t2", 1, 2, True), ("gemv_h_r1_t4", 1, 4, True),
         ("gemv_h_r4_t1", 4, 1, True)]

GEMV_HEADER = """
// Row products  C[m, :] (+)= act(x[m, :] W + bias)  for a few rows m, with W
// packed once (entry `pack` or `pack_half`) as texel (n/4, k) = W[k, n..n+3].
// x [M, K] is read straight from its buffer (vec4 along K, so K % 4 == 0), which
// saves packing it for every product; the epilogue adds the bias, applies
// GELU and accumulates into C (a residual stream), so a transformer layer
// needs no separate elementwise kernels. C rows are c_off + m * c_ld, so a
// product can write straight into a KV cache. Each invocation owns RxT texels
// of C in registers; no barriers.

struct GemvParams {
    m: u32, n: u32, k4: u32, flags: u32,          // flags: 1 bias, 2 GELU, 4 accumulate into C
    c_off: u32, c_ld: u32, block: u32, _pad0: u32,   // C in floats; block: texels per layer of W
}

@group(0) @binding(0) var<uniform> g: GemvParams;
@group(0) @binding(1) var<storage, read> gx: array<vec4<f32>>;
@group(0) @binding(2) var gw: texture_2d_array<f32>;
@group(0) @binding(2) var gwh: texture_2d_array<u32>;    // f16 weights, 8 per texel

"""

GEMV_STORAGE = """// The same weights bound as read-only storage textures: no mip level, so
// llvmpipe skips its per-lane level lookups (most of a texel fetch there).
@group(0) @binding(2) var gws: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(2) var gwhs: texture_storage_2d_array<rgba32uint, read>;

"""

GEMV_STORE = """fn gemv_store(m: u32, n: u32, acc: f32) {
    if (m < g.m && n < g.n) {
        var v = acc;
        if ((g.flags & 1u) != 0u) {
            v += bias[n];
        }
        if ((g.flags & 2u) != 0u) {
            v = 0.5 * v * (1.0 + gemv_erf(v * 0.70710678118654752));
        }
        let idx = g.c_off + m * g.c_ld + n;
        if ((g.flags & 4u) != 0u) {
            v += c[idx];
        }
        c[idx] = v;
    }
}
"""


def weight_loads(k, texels, half, wf32="gw", wf16="gwh", level=", 0"):
    """The row products' loads of W for K step `k`: texel columns nb .. nb + texels of its 4
    rows, as b{row}_{texel}_{quad} (two quads of 4 columns per f16 texel, unpacked from u*)."""
    lines = []
    for kk in range(4):
        for j in range(texels):
            if half:
                lines.append(f"let u{kk}_{j} = textureLoad({wf16}, vec2<u32>(nb + {j}u, 4u * {k} + {kk}u), layer{level});\n")
                lines.append(f"let b{kk}_{j}_0 = vec4<f32>(unpack2x16float(u{kk}_{j}.x), unpack2x16float(u{kk}_{j}.y));\n")
                lines.append(f"let b{kk}_{j}_1 = vec4<f32>(unpack2x16float(u{kk}_{j}.z), unpack2x16float(u{kk}_{j}.w));\n")
            else:
                lines.append(f"let b{kk}_{j}_0 = textureLoad({wf32}, vec2<u32>(nb + {j}u, 4u * {k} + {kk}u), layer{level});\n")
    return lines


def gemv(name, rows, texels, half, sg=False):
    """A row-product entry. With `sg` (the subgroup module), each lane loads
    the x texel of one of 8 consecutive K steps and broadcasts hand them
    round: llvmpipe loads storage buffers lane by lane (32 scalar loads per
    texel), which was a fifth of a decoding step when every lane loaded the
    same x texel itself. Needs K % 32 == 0."""
    cols = 8 * texels if half else 4 * texels
    if sg:
        out = [f"""
@compute @workgroup_size({SG}, 1, 1)
fn {name}(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{
    let m0 = gid.y * {rows}u;
    if (m0 >= g.m) {{
        return;
    }}
    // Every lane stays active (the broadcasts need them all): lanes past the
    // last column read the last columns again and store nothing.
    let col = min(gid.x, (g.n - 1u) / {cols}u);
    let layer = col * {texels}u / g.block;
    let nb = col * {texels}u - layer * g.block;
"""]
    else:
        out = [f"""
@compute @workgroup_size(8, 1, 1)
fn {name}(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let m0 = gid.y * {rows}u;
    if ({cols}u * gid.x >= g.n || m0 >= g.m) {{
        return;
    }}
    // W is stored in layers of `block` texel columns, so that each workgroup
    // streams one contiguous block of memory.
    let layer = gid.x * {texels}u / g.block;
    let nb = gid.x * {texels}u - layer * g.block;
"""]
    for i in range(rows):
        # Rows past the end re-read the last row; their results are not stored.
        out.append(f"    let x{i} = min(m0 + {i}u, g.m - 1u) * g.k4;\n")
    # Accumulators: one vec4 per 4 columns.
    quads = [(j, h) for j in range(texels) for h in (range(2) if half else range(1))]
    for i in range(rows):
        out.append("    " + " ".join(f"var c{i}_{j}_{h} = vec4<f32>(0.0);" for j, h in quads) + "\n")

    # The subgroup module binds W as a storage texture (no mip level argument).
    wf32, wf16, level = ("gws", "gwhs", "") if sg else ("gw", "gwh", ", 0")

    def step(indent, k):
        body = [indent + line for line in weight_loads(k, texels, half, wf32, wf16, level)]
        for i in range(rows):
            for j, h in quads:
                body.append(indent[8:] + accumulate(f"c{i}_{j}_{h}", f"a{i}", lambda kk: f"b{kk}_{j}_{h}"))
        return body

    if sg:
        out.append(f"    for (var k8 = 0u; k8 < g.k4; k8 += {SG}u) {{\n")
        for i in range(rows):
            out.append(f"        let own{i} = gx[x{i} + k8 + lane];\n")
        for s in range(SG):
            out.append("        {\n")
            for i in range(rows):
                out.append(f"            let a{i} = subgroupBroadcast(own{i}, {s}u);\n")
            out.extend(step("            ", f"(k8 + {s}u)"))
            out.append("        }\n")
    else:
        out.append("    for (var k = 0u; k < g.k4; k++) {\n")
        for i in range(rows):
            out.append(f"        let a{i} = gx[x{i} + k];\n")
        out.extend(step("        ", "k"))
    out.append("    }\n")
    for i in range(rows):
        for q, (j, h) in enumerate(quads):
            for cc in range(4):
                out.append(f"    gemv_store(m0 + {i}u, {cols}u * gid.x + {4 * q + cc}u, c{i}_{j}_{h}.{C[cc]});\n")
    out.append("}\n")
    return "".join(out)



# Row products split along K for GPUs (Tuning::gemv_split_k): (entry name, f16 weights).
GEMV_KS = [("gemv_ks_r1", False), ("gemv_ks_h_r1", True)]
KS_COLS, KS_SLICES = 8, 32


def gemv_ks(name, half):
    """A row-product entry shaped for GPUs: a workgroup of KS_COLS x KS_SLICES invocations owns
    KS_COLS texel columns of one row of C; each of its KS_SLICES slices walks every
    KS_SLICES-th K step of those columns, then slice 0 adds the slices' sums in order through
    workgroup memory. The one-invocation-per-column entries above leave a GPU nearly idle (48
    workgroups of 8 invocations for a 512 x 1536 weight: 15 GB/s on an H200), and lavapipe
    pays for the barrier, so this is chosen by measurement."""
    per_texel = 8 if half else 4
    quads = 2 if half else 1
    out = [f"""
@compute @workgroup_size({KS_COLS * KS_SLICES}, 1, 1)
fn {name}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {{
    let m0 = wid.y;
    let col = li % {KS_COLS}u;
    let slice = li / {KS_COLS}u;
    // W's texel column (in layers of `block` texel columns) and whether it holds columns of C.
    let t = wid.x * {KS_COLS}u + col;
    let live = m0 < g.m && {per_texel}u * t < g.n;
    let layer = t / g.block;
    let nb = t - layer * g.block;
    let x0 = min(m0, g.m - 1u) * g.k4;
"""]
    out.append("    " + " ".join(f"var c{h} = vec4<f32>(0.0);" for h in range(quads)) + "\n")
    out.append("    if (live) {\n")
    out.append(f"        for (var k = slice; k < g.k4; k += {KS_SLICES}u) {{\n")
    out.append("            let a0 = gx[x0 + k];\n")
    out.extend("            " + line for line in weight_loads("k", 1, half))
    for h in range(quads):
        out.append("    " + accumulate(f"c{h}", "a0", lambda kk, h=h: f"b{kk}_0_{h}"))
    out.append("        }\n    }\n")
    for h in range(quads):
        out.append(f"    ks_part[{h * KS_COLS * KS_SLICES}u + li] = c{h};\n")
    out.append("    workgroupBarrier();\n")
    out.append("    if (slice == 0u && live) {\n")
    for h in range(quads):
        out.append(f"        var s{h} = ks_part[{h * KS_COLS * KS_SLICES}u + col];\n")
    out.append(f"        for (var q = 1u; q < {KS_SLICES}u; q++) {{\n")
    for h in range(quads):
        out.append(f"            s{h} += ks_part[{h * KS_COLS * KS_SLICES}u + q * {KS_COLS}u + col];\n")
    out.append("        }\n")
    for h in range(quads):
        for cc in range(4):
            out.append(f"        gemv_store(m0, {per_texel}u * t + {4 * h + cc}u, s{h}.{C[cc]});\n")
    out.append("    }\n}\n")
    return "".join(out)


GEMV_KS_HEADER = f"""
// The K-split entries' partial sums: KS_COLS x KS_SLICES invocations, two vec4s each with f16
// weights (8 columns a texel).
var<workgroup> ks_part: array<vec4<f32>, {2 * KS_COLS * KS_SLICES}>;
"""

# Subgroup tiles (entry name, rows, columns per invocation): the 8 lanes of a
# subgroup own the same TM rows of C and different columns, so each lane
# fetches TM/8 of the A texels and subgroupBroadcast (two instructions on
# lavapipe) hands them to the others: 32x8 fetches 12 texels per 1024
# multiply-adds where mm_16x16 fetches 32. Measured on lavapipe and dropped:
# 16x16 and 64x4 (no faster, 3-4x longer to compile), 16x8 (slower: 10.8 vs
# 13.0 GFLOP/s). Two K steps per loop iteration were within noise while
# sampled-texture fetches dominated; with storage-texture fetches they gave
# matmul 1024^3 17.5-21 GFLOP/s against 16.2-17 (paired runs), so sg_steps
# takes two.
SG_TILES = [("ms_32x8", 32, 8)]
SG = 8

# The `_v4` entries store C four columns at a time (C's offset, batch stride
# and row length multiples of 4): on lavapipe every store to a buffer runs
# lane by lane, and storing one value at a time cost as much as a product
# of K = 128 (measured: ~90 cycles per value).
STORE4 = """
@group(0) @binding(3) var<storage, read_write> c_vec4: array<vec4<f32>>;

// The epilogue's options are constants, one pipeline per combination the engine uses
// (engine::shaders::specialize), not parameters: lavapipe (Mesa 22.3) runs both sides of a
// branch under a mask even when its condition is uniform, so a GELU, bias loads and C's old
// values cost every store whether they applied or not (measured: a product of K = 8 and
// N = 8192 took 90-103 ms with them, 37-54 ms without).
const BIAS_MODE: u32 = 0u;   // 0 none, 1 per row of C, 2 per column
const GELU: bool = false;   // GELU after the bias
const READ_C: bool = false;   // beta != 0 (C = ... + beta * C), or N % 4 != 0 (a row's last texel keeps its values past N)
const DBIAS: bool = false;   // dw_* only: the last column group reads ones for B (the bias gradient; see dw_sg)
const DW_DIRECT: bool = false;   // dw_* only: C is dW itself, then the bias gradient (store4_dw)
// Causal attention's zeros (ms_* entries; `matmul::Causal`), p.causal: 0 none; 1 C[r][c] past
// the diagonal (c > r + diag) is unwanted; 2 A[r][k] is zero where k > r + diag; 3 A[r][k] is zero
// where k < r - diag. A tile skips the K texels that are zeros for all its rows (1: all of them
// where every value of the tile is unwanted, which it then writes as zeros). A parameter, not a
// pipeline constant: it only sets the loop's bounds, once a workgroup (selects, no branches), and
// constants would compile each large product kernel again per mode.
// The K texels [x, y) a tile of C's rows m0 .. m0 + rows - 1, from column n_first on, needs.
fn causal_k_range(m0: u32, rows: u32, n_first: u32) -> vec2<u32> {
    let diag = bitcast<i32>(p.diag);   // (u32 in Params: an i32 member there made llvmpipe take 15 s over mm_16x16)
    let last_row = i32(m0 + rows) - 1;
    let k_values = 4 * i32(p.k4);
    let end = select(p.k4, (u32(clamp(last_row + diag + 1, 0, k_values)) + 3u) / 4u, p.causal == 2u);
    let start = select(0u, u32(clamp(i32(m0) - diag, 0, k_values)) / 4u, p.causal == 3u);
    let unwanted = p.causal == 1u && i32(n_first) > last_row + diag;
    return select(vec2<u32>(start, end), vec2<u32>(0u), unwanted);
}

fn gelu4(v: vec4<f32>) -> vec4<f32> {
    let e = vec4<f32>(gemv_erf(v.x * 0.70710678118654752), gemv_erf(v.y * 0.70710678118654752),
                      gemv_erf(v.z * 0.70710678118654752), gemv_erf(v.w * 0.70710678118654752));
    return 0.5 * v * (1.0 + e);
}

// `store` of columns n .. n+3. Columns past N keep their old values: C's
// rows are whole texels (ldc % 4 == 0), so those are padding of this row or
// another matrix's columns, never written by this product.
fn store4(bt: u32, m: u32, n: u32, acc: vec4<f32>) {
    if (m < p.m && n < p.n) {
        var v = p.alpha * acc;
        if (BIAS_MODE == 1u) {
            v += bias[p.bias_off + m];
        } else if (BIAS_MODE == 2u) {
            let b = p.bias_off + n;
            v += vec4<f32>(bias[b], bias[min(b + 1u, p.bias_off + p.n - 1u)], bias[min(b + 2u, p.bias_off + p.n - 1u)],
                           bias[min(b + 3u, p.bias_off + p.n - 1u)]);
        }
        if (GELU) {
            v = gelu4(v);
        }
        let idx = (p.c_off + bt * p.c_bs + m * p.ldc + n) / 4u;
        if (READ_C) {
            // Selects, not branches (see above); old values past N may be any bits.
            let old = c_vec4[idx];
            v = select(v, v + p.beta * old, p.beta != 0.0);
            v = select(old, v, vec4<u32>(n, n + 1u, n + 2u, n + 3u) < vec4<u32>(p.n));
        }
        c_vec4[idx] = v;
    }
}
"""

SG_HEADER = """// GENERATED by tools/gen_matmul_wgsl.py -- edit that file, not this one.
//
// The matmul family's product (see shaders/matmul.wgsl, same operands, same
// parameters) with the A operand shared across a subgroup of 8 lanes. Its own
// module because subgroup operations fail validation on devices without them.
// The operands are bound as read-only storage textures: a sampled texture's
// fetch takes a mip level, which llvmpipe looks up lane by lane (row stride,
// image stride and offset per level: most of the cost of a fetch there).

""" + (PARAMS.replace("var ta: texture_2d_array<f32>", "var ta: texture_storage_2d_array<rgba32float, read>")
             .replace("var tb: texture_2d_array<f32>", "var tb: texture_storage_2d_array<rgba32float, read>")) + "\n" + ERF \
    + (STORE.replace("(p.bias_mode & 3u) == ", "BIAS_MODE == ").replace("(p.bias_mode & 4u) != 0u", "GELU")
       .replace("if (p.beta != 0.0) {", "if (READ_C && p.beta != 0.0) {"))


def sg_steps(tm, tn4, indent, steps, a_at, b_at, guard=None, b_load=lambda e: e):
    """`steps` K steps (4 values of k each) of a subgroup tile, `indent`
    deeper than a plain loop body: each lane fetches TM/8 A texels per step,
    at a_at(r, s) (coordinates and layer), and the broadcasts hand them
    round; B texel (kk, j) of step s is fetched at b_at(kk, j, s). Each
    accumulator takes all the steps in one chain: on llvmpipe an update costs
    a load and a masked store besides its multiply-adds. `guard`: a 0.0/1.0
    value the A texels of every step but the first are multiplied by (see
    `two_step_loop`). `b_load`: wraps each B fetch's expression (dw_*: ones for the bias
    gradient's column group)."""
    out = []
    for st in range(steps):
        for r in range(tm // SG):
            scale = f" * {guard}" if guard and st > 0 else ""
            out.append(f"        let own{r}_{st} = textureLoad(ta, {a_at(r, st)}){scale};\n")
        for kk in range(4):
            for j in range(tn4):
                out.append(f"        let b{kk}_{j}_{st} = {b_load(f'textureLoad(tb, {b_at(kk, j, st)})')};\n")
    for i in range(tm):
        for st in range(steps):
            out.append(f"        let a{i}_{st} = subgroupBroadcast(own{i // SG}_{st}, {i % SG}u);\n")
        for j in range(tn4):
            out.append(accumulate_steps(f"c{i}_{j}", [(f"a{i}_{st}", lambda kk, j=j, st=st: f"b{kk}_{j}_{st}")
                                                        for st in range(steps)]))
    return "".join(indent + line for line in out)


def two_step_loop(var, count, tm, tn4, indent, a_at, b_at, start="0u"):
    """A loop over `var` = `start`, `start` + 2 .. < `count` taking two K steps an iteration; a_at
    and b_at get the step's value of `var` (`var` or `var`1). Where the steps are odd the last iteration's
    second step re-reads the first's texels (`var`1 clamped) with its A texels multiplied by 0,
    instead of a one-step tail after the loop, which every entry carried (a second copy of the
    step's code; lavapipe runs a skipped branch masked). Without the tails the generated file is
    ~1,100 lines shorter and compiles faster; their run time was within noise at K = 8 and 64."""
    body = indent + f"for (var {var} = {start}; {var} < {count}; {var} += 2u) {{\n"
    body += indent + f"    let {var}1 = min({var} + 1u, {count} - 1u);\n"
    body += indent + f"    let z = select(0.0, 1.0, {var} + 1u < {count});\n"
    steps = [var, var + "1"]
    body += sg_steps(tm, tn4, indent[4:], 2, lambda r, st: a_at(r, steps[st]),
                     lambda kk, j, st: b_at(kk, j, steps[st]), guard="z")
    body += indent + "}\n"
    return body


def sg_entry(name, tm, tn):
    """Opening of a subgroup entry: the tile's rows m0 and columns n0, and
    nc, the first column it reads (n0, clamped to the last tile)."""
    return f"""
@compute @workgroup_size({SG}, 1, 1)
fn {name}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{
    let m0 = p.m_first + wid.x * {tm}u;   // x walks M first (see launch_product)
    if (m0 >= p.m) {{
        return;
    }}
    // Every lane stays active (the broadcasts need them all): lanes past the
    // last column read the last tile again and store nothing.
    let n0 = (wid.y * {SG}u + lane) * {tn}u;
    let nc = min(n0, (p.n - 1u) / {tn}u * {tn}u);
"""


def tile_sg(name, tm, tn, vec4=False):
    tn4 = tn // 4
    out = [sg_entry(name, tm, tn) + """    let nb = nc / 4u;
    let la = select(p.b_first + wid.z, 0u, p.a_shared == 1u);
    let lb = select(p.b_first + wid.z, 0u, p.b_shared == 1u);
"""]
    out.append(declare_tile(tm, tn4))
    # Two K steps per iteration: each accumulator update (a load, a masked
    # store on llvmpipe) then carries 8 multiply-adds instead of 4.
    a_at = lambda r, k: f"vec2<u32>({k}, m0 + {SG * r}u + lane), la"
    b_at = lambda kk, j, k: f"vec2<u32>(nb + {j}u, 4u * {k} + {kk}u), lb"
    out.append(f"    let kr = causal_k_range(m0, {tm}u, wid.y * {SG * tn}u);   // [0, K) but for p.causal\n")
    out.append(two_step_loop("k", "kr.y", tm, tn4, "    ", a_at, b_at, start="kr.x"))
    out.append(store_tile(tm, tn4, vec4))
    return "".join(out)


def conv_sg(name, tm, tn, vec4=False):
    """Implicit-GEMM stride-1 convolution: the B operand is read straight
    from the input planes instead of an im2col copy (which cost as much as the
    product itself on lavapipe). B is an rgba32float texture array whose
    texel (x, y) of layer image * Cin + c holds the zero-padded input
    P[c, y, x .. x+3], so the B texel of four output pixels (ox .. ox+3) and
    tap (ky, kx) is the texel x = ox + kx of row oy + ky (stored by x mod 4,
    see shaders/conv2d.wgsl): one fetch, as from im2col.
    K runs over taps, then channels (the weights are packed in that order),
    so the loops need no division per step. Needs Cin % 4 == 0 and an output
    width that is a multiple of the tile's columns."""
    tn4 = tn // 4
    out = [sg_entry(name, tm, tn) + """    let oy = nc / p.wo;
    let ox = nc - oy * p.wo;
    let layer0 = (p.b_first + wid.z) * 4u * p.cin4;
"""]
    out.append(declare_tile(tm, tn4))
    out.append("    // B texel x of a row sits at column (x % 4) * q + x / 4 (see shaders/conv2d.wgsl).\n"
               "    let q = textureDimensions(tb).x / 4u;\n")
    a_at = lambda r, st: f"vec2<u32>(k_{st}, m0 + {SG * r}u + lane), 0u"
    b_at = lambda kk, j, st: f"vec2<u32>(ix_{st} + {j}u, iy_{st}), layer0 + 4u * kc_{st} + {kk}u"
    per_step = lambda st: (f"        let ix_{st} = (kx_{st} % 4u) * q + (ox + kx_{st}) / 4u;\n"
                           f"        let iy_{st} = oy + ky_{st};\n")
    out.append(taps_then_channels(tm, tn4, a_at, b_at, per_step))
    out.append(store_tile(tm, tn4, vec4))
    return "".join(out)


def taps_then_channels(tm, tn4, a_at, b_at, per_step=lambda st: ""):
    """The K loop of the convolution products: taps, then channels four at a time (kc), walked
    as one loop of two K steps an iteration (step k = tap * Cin/4 + kc), each step's position
    (kc, kx, ky) advanced by compares, with no division. a_at and b_at get the step (0 or 1)
    whose kc_{st}, kx_{st}, ky_{st} and k_{st} they read; `per_step(st)` gives lines after the
    positions. A loop per tap cost lavapipe a loop entry and exit each tap: with 32 or 64
    channels (four or eight K steps a tap) the 16x16 channel-packed forward ran 5-7% slower
    nested. Where the steps are odd the last iteration's second step re-reads the first's (its
    A texels multiplied by 0, as in `two_step_loop`)."""
    out = """    let k_steps = p.taps * p.cin4;
    var at_0 = vec3<u32>(0u);   // (kc, kx, ky)
    for (var k_0 = 0u; k_0 < k_steps; k_0 += 2u) {
        let last = k_0 + 1u >= k_steps;
        let z = select(1.0, 0.0, last);
        let k_1 = select(k_0 + 1u, k_0, last);
        let at_1 = select(next_tap_step(at_0), at_0, last);
"""
    for st in range(2):
        out += f"        let kc_{st} = at_{st}.x;\n        let kx_{st} = at_{st}.y;\n        let ky_{st} = at_{st}.z;\n"
    out += per_step(0) + per_step(1)
    out += sg_steps(tm, tn4, "", 2, a_at, b_at, guard="z")
    out += "        at_0 = next_tap_step(at_1);\n    }\n"
    return out


def dw_sg(name, tm, tn):
    """The weight gradient of a convolution as one product over the output
    pixels, reading the input directly (no transposed im2col copy, which took
    a fifth of a demo training step on lavapipe):
    C[split, co, (tap, ci)] = sum over the split's pixels of dY[co, pixel] *
    X[ci, tap's input position of pixel]. A (tm rows of Cout) is dY packed as
    texel (pixel / 4, co) of layer image; B is the zero-padded input with four
    channels per texel: texel (x, y) of layer image * Cin/4 + c4 holds
    P[4 c4 .. 4 c4 + 3, y, x] (shaders/conv2d.wgsl, `channel_pack`). K walks
    output rows (image, oy), then groups of four pixels of a row, so a step's
    B texels are fetched at (ox + kk) * stride + kx, oy * stride + ky. One
    loop walks a split's groups of four pixels (two an iteration), its
    position (image, oy, group) advanced by compares, with no division: a loop
    per row cost lavapipe a loop entry and exit each row, and on rows of 8 or
    16 pixels (one or two iterations) the demo's 8x8 and 16x16 weight
    gradients ran 30-45% slower nested. Each z slice of the dispatch sums its
    own run of output rows into its own C (split K, so small layers still fill
    the device); the caller adds the slices. Needs Wo % 4 == 0 (Cin % 4 != 0:
    the packed input's last texel is zero-padded, its extra columns dropped by
    the caller).
    With the pipeline constant DBIAS the last column group (columns N - tn .. N - 1) reads ones
    for B, so its columns hold each row of dY summed over the split: the bias gradient, from
    the product's own A fetches instead of a pass (and a copy of dY) of its own. The caller
    takes it where the last workgroup has lanes to spare."""
    tn4 = tn // 4
    out = [sg_entry(name, tm, tn)]
    out.append(f"    let ones = DBIAS && n0 + {tn}u >= p.n;   // the bias gradient's column group\n")
    # Each of the lane's texel columns is one (tap, four channels).
    for j in range(tn4):
        out.append(f"""    let t{j} = (nc / 4u + {j}u) / p.cin4;
    let ch{j} = nc / 4u + {j}u - t{j} * p.cin4;
    let ky{j} = t{j} / p.kw;
    let kx{j} = t{j} - ky{j} * p.kw;
""")
    out.append(declare_tile(tm, tn4))
    out.append("""    let wo4 = p.wo / 4u;
    let split = p.b_first + wid.z;
    let r_first = split * p.rows_per_split;
    let r_end = min(p.rows, r_first + p.rows_per_split);
    let groups = select(0u, (r_end - r_first) * wo4, r_end > r_first);
    let img_first = r_first / p.ho;
    var at_0 = vec3<u32>(0u, r_first - img_first * p.ho, img_first);   // (group, oy, image)
    for (var s = 0u; s < groups; s += 2u) {
        let last = s + 1u >= groups;
        let z = select(1.0, 0.0, last);
        let at_1 = select(next_pixels(at_0), at_0, last);
""")
    for st in range(2):
        out.append(f"        let pg{st} = at_{st}.y * wo4 + at_{st}.x;\n")
        for j in range(tn4):
            out.append(f"        let y{j}_{st} = at_{st}.y * p.stride + ky{j};\n"
                       f"        let l{j}_{st} = at_{st}.z * p.cin4 + ch{j};\n")
    a_at = lambda r, st: f"vec2<u32>(pg{st}, m0 + {SG * r}u + lane), at_{st}.z"
    b_at = lambda kk, j, st: f"vec2<u32>((4u * at_{st}.x + {kk}u) * p.stride + kx{j}, y{j}_{st}), l{j}_{st}"
    ones = lambda e: f"select({e}, vec4<f32>(1.0), ones)"
    out.append(sg_steps(tm, tn4, "", 2, a_at, b_at, guard="z", b_load=ones))
    out.append("        at_0 = next_pixels(at_1);\n    }\n")
    out.append(store_tile(tm, tn4, True).replace("    store4(", "    store4_dw("))
    return "".join(out)


# The convolution products' K walks (`taps_then_channels`, `dw_sg`): each step's position follows
# from the last by compares, with no division; each loop iteration takes two steps.
CONV_WALKS = """
// The K step after (kc, kx, ky) of the convolution products' walk: the next four channels, the
// next tap past the last.
fn next_tap_step(at: vec3<u32>) -> vec3<u32> {
    let tap_end = at.x + 1u == p.cin4;
    let row_end = tap_end && at.y + 1u == p.kw;
    return vec3<u32>(select(at.x + 1u, 0u, tap_end), select(at.y + select(0u, 1u, tap_end), 0u, row_end),
                     at.z + select(0u, 1u, row_end));
}

// The group of four pixels after (group, oy, image) of dw_*'s walk: the next group, on the next
// row past the row's last, in the next image past its last row.
fn next_pixels(at: vec3<u32>) -> vec3<u32> {
    let row_end = at.x + 1u == p.wo / 4u;
    let oy = select(at.y, at.y + 1u, row_end);
    let image_end = oy == p.ho;
    return vec3<u32>(select(at.x + 1u, 0u, row_end), select(oy, 0u, image_end), select(at.z, at.z + 1u, image_end));
}
"""


STORE4_DW = """
// `store4` of dw_* entries, or with DW_DIRECT (K in one split: no slices to add) dW itself in
// [Cout, Cin, taps] order (column n = tap * 4 cin4 + channel; Cin = 4 p.cin4) from C's start,
// and column 4 p.cin4 p.taps (DBIAS's) as the bias gradient after it: the slices' summing pass
// (conv2d.wgsl's dw_from_slices) is skipped. Values one at a time: on lavapipe a vec4 store
// runs component by component anyway.
fn store4_dw(bt: u32, m: u32, n: u32, acc: vec4<f32>) {
    if (!DW_DIRECT) {
        store4(bt, m, n, acc);
        return;
    }
    store_dw(m, n, acc.x);
    store_dw(m, n + 1u, acc.y);
    store_dw(m, n + 2u, acc.z);
    store_dw(m, n + 3u, acc.w);
}

fn store_dw(m: u32, col: u32, v: f32) {
    let cp = 4u * p.cin4;
    let k = cp * p.taps;
    if (m >= p.m || col > k || (col == k && !DBIAS)) {
        return;
    }
    let tap = col / cp;
    let at = select(m * k + (col - tap * cp) * p.taps + tap, p.m * k + m, col == k);
    c_vec4[at / 4u][at % 4u] = v;
}
"""


STORE4T = """
// RESID (a pipeline constant, convt_* only): the residual, C's shape, bound at 5, is added as C
// is written (a ResnetBlock's x + conv2(h) in training), sparing an add pass.
const RESID: bool = false;
@group(0) @binding(5) var<storage, read> resid4: array<vec4<f32>>;

// `store` of rows m .. m+3 of column n, for products whose C is stored transposed (convt_*: rows
// are output pixels, columns output channels, C[n][m] at c_off + bt * c_bs + n * ldc + m). The
// rows are whole texels (M, c_off, c_bs and ldc multiples of 4); bias per column (mode 2).
fn store4t(bt: u32, m: u32, n: u32, acc: vec4<f32>) {
    if (m < p.m && n < p.n) {
        var v = p.alpha * acc;
        if (BIAS_MODE == 2u) {
            v += bias[p.bias_off + n];
        }
        let idx = (p.c_off + bt * p.c_bs + n * p.ldc + m) / 4u;
        if (RESID) {
            v = resid4[idx] + v;
        }
        c_vec4[idx] = v;
    }
}
"""


def convt_sg(name, tm, tn):
    """A convolution with the output pixels as the product's rows and the output channels as
    its columns, reading the input four channels per texel (conv2d.wgsl's `channel_pack`: texel
    (x, y) of layer image * Cin/4 + c4 holds the zero-padded P[4 c4 .. 4 c4 + 3, y, x]), so the
    A texel of a pixel and a K step (one tap, four channels) is one fetch, and the input is
    packed once (a quarter of the texels the shifted planes of `conv_sg` write). B holds the
    weights, texel (co / 4, t * Cin + c) = W[co .. co + 3, c, t]. C is stored transposed,
    four pixels of one channel per store (`store4t`). Any stride and padding; needs Cin % 4 == 0
    and Ho * Wo % 4 == 0."""
    tn4 = tn // 4
    out = [sg_entry(name, tm, tn)]
    out.append("    let nb = nc / 4u;\n    let img = p.b_first + wid.z;\n    let layer0 = img * p.cin4;\n")
    for r in range(tm // SG):
        out.append(f"""    let p{r} = min(m0 + {SG * r}u + lane, p.m - 1u);
    let oy{r} = p{r} / p.wo;
    let x{r} = (p{r} - oy{r} * p.wo) * p.stride;
    let y{r} = oy{r} * p.stride;
""")
    out.append(declare_tile(tm, tn4))
    a_at = lambda r, st: f"vec2<u32>(x{r} + kx_{st}, y{r} + ky_{st}), layer0 + kc_{st}"
    b_at = lambda kk, j, st: f"vec2<u32>(nb + {j}u, 4u * k_{st} + {kk}u), 0u"
    out.append(taps_then_channels(tm, tn4, a_at, b_at))
    for i4 in range(tm // 4):
        for j in range(tn4):
            for cc in range(4):
                parts = ", ".join(f"c{4 * i4 + q}_{j}.{C[cc]}" for q in range(4))
                out.append(f"    store4t(img, m0 + {4 * i4}u, n0 + {4 * j + cc}u, vec4<f32>({parts}));\n")
    out.append("}\n")
    return "".join(out)


def tiles_rs():
    """src/engine/tiles.rs: every product tile the engine can choose (mm_1x16,
    for products of a few rows, is chosen per call and not listed)."""
    rows = [f'    MmTile {{ family: "matmul", entry: "{n}", rows: {tm}, cols: {tn}, wg: ({wx}, {wy}) }},\n'
            for n, tm, tn, wx, wy in TILES + WG_TILES if n != "mm_1x16"]
    rows += [f'    MmTile {{ family: "matmul_subgroup", entry: "{n}", rows: {tm}, cols: {tn}, wg: ({SG}, 1) }},\n'
             for n, tm, tn in SG_TILES]
    return ("// GENERATED by tools/gen_matmul_wgsl.py -- edit that file, not this one.\n"
            "//! The product tiles of shaders/matmul.wgsl and shaders/matmul_subgroup.wgsl.\n\n"
            "use super::device::MmTile;\n\n"
            "/// Every product tile. (`mm_1x16`, for products of a few rows, is chosen per call.)\n"
            f"pub const MM_TILES: [MmTile; {len(rows)}] = [\n" + "".join(rows) + "];\n")


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(os.path.join(root, "shaders"), exist_ok=True)
    os.makedirs(os.path.join(root, "src", "engine"), exist_ok=True)
    with open(os.path.join(root, "src", "engine", "tiles.rs"), "w") as f:
        f.write(tiles_rs())
    text = HEADER + "".join(tile(*t) for t in TILES) + "".join(tile_wg(*t) for t in WG_TILES) + GEMV_HEADER + ERF + GEMV_STORE + "".join(gemv(*t) for t in GEMVS)
    text += GEMV_KS_HEADER + "".join(gemv_ks(*t) for t in GEMV_KS)
    with open(os.path.join(root, "shaders", "matmul.wgsl"), "w") as f:
        f.write(text)
    with open(os.path.join(root, "shaders", "matmul_f16.wgsl"), "w") as f:
        # The products' parameters, bindings and store only (the pack entries live in matmul.wgsl).
        products = HEADER[:HEADER.index("struct PackParams")]
        f.write(F16_HEADER + products + ERF + "".join(tile_wg_h(*t) for t in WG_TILES if not t[0].endswith("_db")))
    with open(os.path.join(root, "shaders", "matmul_subgroup.wgsl"), "w") as f:
        f.write(SG_HEADER + STORE4 + STORE4_DW + STORE4T + CONV_WALKS + "".join(tile_sg(*t) + conv_sg("conv_" + t[0], t[1], t[2]) + tile_sg(t[0] + "_v4", t[1], t[2], True)
                                             + conv_sg("conv_" + t[0] + "_v4", t[1], t[2], True) + dw_sg("dw_" + t[0] + "_v4", t[1], t[2]) + convt_sg("convt_" + t[0], t[1], t[2])
                                             # Half as many columns per lane (Tuning::convt_narrow): half the spilled
                                             # accumulators, and no idle upper lanes for 32 output channels.
                                             + (convt_sg("convt_" + t[0] + "_narrow", t[1], t[2] // 2) if t[2] >= 8 else "")
                                             for t in SG_TILES)
                + GEMV_HEADER + GEMV_STORAGE + GEMV_STORE + "".join(gemv(name.replace("gemv", "gemv_sg"), *rest, sg=True) for name, *rest in GEMVS))
