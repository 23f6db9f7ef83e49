// Embedding gather: out[n, :] = table[ids[n], :]. Ids were range-checked by the launcher.
struct Params {
    n: u32, d: u32, rows: u32, _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n * p.d) { return; }
    let id = min(ids[i / p.d], p.rows - 1u);
    out[i] = table[id * p.d + i % p.d];
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
        let id = min(ids[n], p.rows - 1u);
        dtable[id * p.d + col] += dout[n * p.d + col];
    }
}
