// Embedding gather: out[n, :] = table[ids[n], :]. Ids were range-checked by the launcher.
// Tables and outputs larger than one storage binding are dispatched by windows: ids n0 .. n0 + n
// (ids, out and dout bound from id n0) and table rows r0 .. r0 + r_count (table and dtable bound from
// row r0); each dispatch handles the ids of its run that fall in its table rows.
struct Params {
    n: u32, d: u32, rows: u32, r0: u32,
    r_count: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// The table row of id n of the run relative to the bound rows, or -1 outside them.
fn window_row(n: u32) -> i32 {
    let id = min(ids[n], p.rows - 1u);
    if (id < p.r0 || id >= p.r0 + p.r_count) { return -1; }
    return i32(id - p.r0);
}

@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n * p.d) { return; }
    let row = window_row(i / p.d);
    if (row >= 0) {
        out[i] = table[u32(row) * p.d + i % p.d];
    }
}

// Backward: dtable[ids[n], :] += dout[n, :], as a gather per column so no two
// invocations write the same element (WGSL has no float atomics). dtable
// starts zeroed.
@group(0) @binding(2) var<storage, read> dout: array<f32>;
@group(0) @binding(3) var<storage, read_write> dtable: array<f32>;

@compute @workgroup_size(64)
fn scatter_add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    if (col >= p.d) { return; }
    for (var n = 0u; n < p.n; n++) {
        let row = window_row(n);
        if (row >= 0) {
            dtable[u32(row) * p.d + col] += dout[n * p.d + col];
        }
    }
}
