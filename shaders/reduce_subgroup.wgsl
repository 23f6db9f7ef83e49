
// ---- Appended to shaders/reduce.wgsl: the module `reduce_subgroup` --------------
// (reduce's parameters and bindings, plus the entry below, which needs subgroup operations.)

// sum_axis by a workgroup of 64 per output element (Tuning::reduce_subgroup, long reduced axes:
// a bias gradient sums B x H x W values per channel, which one invocation per output walks
// alone): the lanes take every 64th value, subgroupAdd folds a subgroup's sums and one slot per
// subgroup in workgroup memory the rest. Any subgroup size.
var<workgroup> sg_sums: array<f32, 64>;

@compute @workgroup_size(64)
fn sum_axis_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let i = wid.x + wid.y * nwg.x;
    let live = i < p.outer * p.inner;
    let o = i / max(p.inner, 1u);
    let j = i % max(p.inner, 1u);
    var s = 0.0;
    if (live) {
        for (var k = li; k < p.r; k += 64u) {
            s += x[p.x0 + (o * p.r + k) * p.inner + j];
        }
    }
    let t = subgroupAdd(s);
    if (lane == 0u) {
        sg_sums[sg] = t;
    }
    workgroupBarrier();
    if (li == 0u && live) {
        var total = 0.0;
        for (var q = 0u; q < nsg; q++) {
            total += sg_sums[q];
        }
        out[p.out0 + i] = total;
    }
}
