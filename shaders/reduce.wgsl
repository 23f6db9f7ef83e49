// Reductions without barriers: each invocation folds a contiguous chunk, and
// the launcher repeats the pass on the partial sums until one value is left.
// Sums are accumulated in chunks (pairwise across passes), which keeps float32
// rounding error far below a plain running sum.

struct Params {
    n: u32, chunk: u32, op: u32, out0: u32,        // op: 0 x, 1 |x|, 2 x*x (applied on the first pass only); out0: first partial (sum_axis: first output)
    outer: u32, r: u32, inner: u32, x0: u32,        // reduce_axis: [outer, r, inner] -> [outer, inner]; x0: sum_axis's first value of x in its binding
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn sum_chunks(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat(gid, nwg);
    let start = c * p.chunk;
    if (start >= p.n) { return; }
    let end = min(start + p.chunk, p.n);
    var s = 0.0;
    for (var i = start; i < end; i++) {
        let v = x[i];
        switch p.op {
            case 1u: { s += abs(v); }
            case 2u: { s += v * v; }
            default: { s += v; }
        }
    }
    out[p.out0 + c] = s;
}

// The part of the reduced axis sum_axis and sum_axis4 add: all of it, or p.chunk values from
// p.n where a long axis is summed by parts (kernels::LOOP_ITERATIONS: lavapipe silently ends an
// invocation's loops after 65,535 iterations).
fn axis_span() -> vec2<u32> {
    if (p.chunk == 0u) {
        return vec2<u32>(0u, p.r);
    }
    return vec2<u32>(p.n, min(p.n + p.chunk, p.r));
}

@compute @workgroup_size(256)
fn sum_axis(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.outer * p.inner) { return; }
    let o = i / p.inner;
    let j = i % p.inner;
    var s = 0.0;
    let span = axis_span();
    for (var k = span.x; k < span.y; k++) {
        s += x[p.x0 + (o * p.r + k) * p.inner + j];
    }
    out[p.out0 + i] = s;
}

// sum_axis where inner is whole vec4s: an invocation sums four columns with vector loads, each
// in the same order as sum_axis (the same numbers), in workgroups of one subgroup so that a few
// hundred columns still give every thread of a CPU device work. out0 is a multiple of 4.
@group(0) @binding(2) var<storage, read_write> out4: array<vec4<f32>>;

@compute @workgroup_size(8)
fn sum_axis4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 8u;
    let inner4 = p.inner / 4u;
    if (i >= p.outer * inner4) { return; }
    let o = i / inner4;
    let j = i % inner4;
    var s = vec4<f32>(0.0);
    let span = axis_span();
    for (var k = span.x; k < span.y; k++) {
        s += x4[p.x0 / 4u + (o * p.r + k) * inner4 + j];
    }
    out4[p.out0 / 4u + i] = s;
}

// Per-channel sums of x [outer, C, plane] (p.outer images, p.inner channels, p.r vec4s per
// plane): a bias gradient, in two passes. First the sums of chunks of p.chunk vec4s of each plane
// (p.n chunks a plane; channel_chunks4, or channel_chunks_flat reading x through a flat texture),
// then per channel its chunks image by image, in order (channel_sums_of_chunks), so the sums do not
// depend on the device. Chunks keep every invocation's loops short (lavapipe ends an invocation's
// loops after 65,535 iterations in all: one loop over every plane of a channel summed wrong from
// 70 planes of 1,000 vec4s) and give a CPU device's threads work when channels are few.
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;

fn flat64(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// (plane, first vec4, end) of chunk t.
fn plane_chunk(t: u32) -> vec3<u32> {
    let k0 = (t % p.n) * p.chunk;
    return vec3<u32>(t / p.n, k0, min(k0 + p.chunk, p.r));
}

@compute @workgroup_size(64)
fn channel_chunks4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat64(gid, nwg);
    if (t >= p.outer * p.inner * p.n) { return; }
    let c = plane_chunk(t);
    var s = vec4<f32>(0.0);
    for (var k = c.y; k < c.z; k++) {
        s += x4[c.x * p.r + k];
    }
    out[t] = (s.x + s.y) + (s.z + s.w);
}

// channel_chunks4 reading x through a flat rgba32float texture of it (values in rows of 64, 4096
// rows per layer: src/engine/kernels/copy.rs), filled by a memcpy: vectorised fetches where the
// buffer's loads run lane by lane on lavapipe (`Tuning::reads_via_texture`). The same sums.
@group(0) @binding(1) var x_flat: texture_storage_2d_array<rgba32float, read>;

fn x_texel(q: u32) -> vec4<f32> {
    return textureLoad(x_flat, vec2<u32>(q & 15u, (q >> 4u) & 4095u), q >> 16u);
}

@compute @workgroup_size(64)
fn channel_chunks_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat64(gid, nwg);
    if (t >= p.outer * p.inner * p.n) { return; }
    let c = plane_chunk(t);
    var s = vec4<f32>(0.0);
    for (var k = c.y; k < c.z; k++) {
        s += x_texel(c.x * p.r + k);
    }
    out[t] = (s.x + s.y) + (s.z + s.w);
}

// sum_axis4 reading x through a flat texture of all of it (x0 then counts from x's start).
@compute @workgroup_size(8)
fn sum_axis4_flat(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 8u;
    let inner4 = p.inner / 4u;
    if (i >= p.outer * inner4) { return; }
    let o = i / inner4;
    let j = i % inner4;
    var s = vec4<f32>(0.0);
    let span = axis_span();
    for (var k = span.x; k < span.y; k++) {
        s += x_texel(p.x0 / 4u + (o * p.r + k) * inner4 + j);
    }
    out4[p.out0 / 4u + i] = s;
}

// The chunks' sums (bound as x) per channel; workgroups of one subgroup.
@compute @workgroup_size(8)
fn channel_sums_of_chunks(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    if (ch >= p.inner) { return; }
    var s = 0.0;
    for (var b = 0u; b < p.outer; b++) {
        let base = (b * p.inner + ch) * p.n;
        for (var k = 0u; k < p.n; k++) {
            s += x[base + k];
        }
    }
    out[ch] = s;
}

// The device's loop budget (`kernels::LOOP_ITERATIONS`): one invocation counts p.outer x p.r
// iterations of two nested loops (lavapipe ends all of an invocation's loops once 65,535
// iterations have run in them together) and stores the count.
@group(0) @binding(1) var<storage, read_write> probe_count: array<f32>;

@compute @workgroup_size(1)
fn loop_probe() {
    var count = 0.0;
    for (var b = 0u; b < p.outer; b++) {
        for (var k = 0u; k < p.r; k++) {
            count += 1.0;
        }
    }
    probe_count[0] = count;
}
