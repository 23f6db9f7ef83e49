
// ---- Appended to shaders/norm.wgsl: the module `norm_subgroup` ------------------
// (norm's parameters, bindings and helpers, plus the entries below, which need subgroup
// operations and so fail validation on devices without them.)

// Norm statistics in one dispatch, a workgroup of 256 per statistic (Tuning::stats_subgroup):
// each invocation sums x - shift and its squares over every 256th texel (shift: the statistic's
// first value, the same for all, so the sums add directly), subgroupAdd folds a subgroup's, and
// one slot per subgroup in workgroup memory the rest: one barrier, where stats_wg4's tree takes
// eight. Any subgroup size of 4 or more.
var<workgroup> sg_sums: array<vec3<f32>, 64>;   // (count, sum d, sum d²) per subgroup

@compute @workgroup_size(256)
fn stats_sg4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32,
             @builtin(subgroup_invocation_id) lane: u32, @builtin(num_subgroups) nsg: u32) {
    let s = wid.x + wid.y * nwg.x;
    var sums = vec3<f32>(0.0);
    var shift = 0.0;
    if (s < p.stats) {
        shift = x4[stat_elem(s, 0u) / 4u].x;
        sums = strided_sums(s, li, shift);
    }
    let t = subgroupAdd(sums);
    if (lane == 0u) {
        sg_sums[sg] = t;
    }
    workgroupBarrier();
    if (li == 0u && s < p.stats) {
        var tot = vec3<f32>(0.0);
        for (var i = 0u; i < nsg; i++) {
            tot += sg_sums[i];
        }
        let q = chunk_partial(tot.x, shift, tot.yz);
        stats[s] = vec2<f32>(q.y, inverseSqrt(q.z / max(q.x, 1.0) + p.eps));
    }
}

// One lane's share of a statistic (stats_lanes_flat, norm_lanes_flat): x - shift and its squares
// summed over every 8th texel of the run of `texels` from `first`, added to `s`.
struct LaneSums {
    acc: vec4<f32>, sq: vec4<f32>, cnt: u32,
}

fn add_lane_sums(s: LaneSums, first: u32, texels: u32, lane: u32, shift: f32) -> LaneSums {
    var r = s;
    for (var j = lane; j < texels; j += 8u) {
        let d = x_texel(first + j) - shift;
        r.acc += d;
        r.sq = fma(d, d, r.sq);
        r.cnt += 4u;
    }
    return r;
}

// The statistic (mean, 1/std) from every lane's sums (subgroupAdd: called by all of them).
fn lanes_statistic(s: LaneSums, shift: f32) -> vec2<f32> {
    let t = subgroupAdd(vec3<f32>(f32(s.cnt), s.acc.x + s.acc.y + s.acc.z + s.acc.w, s.sq.x + s.sq.y + s.sq.z + s.sq.w));
    let q = chunk_partial(t.x, shift, t.yz);
    return vec2<f32>(q.y, inverseSqrt(q.z / max(q.x, 1.0) + p.eps));
}

// Norm statistics in one dispatch and no barrier, for CPU devices whose subgroups are exactly 8
// lanes (Tuning::stats_lanes): a workgroup of one subgroup per statistic, each lane summing
// x - shift and its squares over every 8th texel of the statistic's runs, read through x's flat
// texture copy (shift: the statistic's first value, the same for all lanes, so the sums add
// directly), and subgroupAdd folding the lanes. Replaces partial_stats_flat + combine, whose few
// workgroups left most of lavapipe's threads idle at the demo's sizes.
@compute @workgroup_size(8)
fn stats_lanes_flat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) lane: u32) {
    let s = wid.x + wid.y * nwg.x;
    if (s >= p.stats) {
        return;   // the whole workgroup
    }
    let shift = x_texel(stat_elem(s, 0u) / 4u).x;
    var sums = LaneSums(vec4<f32>(0.0), vec4<f32>(0.0), 0u);
    var e = 0u;
    while (e < p.per_stat) {
        let r = texel_run(s, e, p.per_stat);
        sums = add_lane_sums(sums, r.x, r.y, lane, shift);
        e += 4u * r.y;
    }
    let m = lanes_statistic(sums, shift);
    if (lane == 0u) {
        stats[s] = m;
    }
}

// A group norm's backward in one dispatch and no barrier, for CPU devices whose subgroups are
// exactly 8 lanes (Tuning::norm_backward_lanes): a workgroup of one subgroup per group g walks
// every image's statistic of that group twice through the flat texture copies of x and dy (the
// bindings backward_plane_sums_flat reads). First each plane's sums of dz and dz * xhat (dz: dy,
// through the swish where one followed; subgroup sums), whose gamma-weighted sums are the
// statistic's means for dx, then dx itself; the planes' sums, added image after image, are dbeta
// and dgamma of the group's channels. Replaces backward_plane_sums_flat + backward_means_and_affine +
// backward_dx_flat: three dispatches per norm, the first with one or two workgroups at the
// demo's sizes. At most LANES_MAX_CHANNELS channels per group (the affine sums held per lane).
const LANES_MAX_CHANNELS: u32 = 16u;
@group(0) @binding(5) var<storage, read_write> lanes_dx4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> lanes_beta: array<f32>;   // act = 1
@group(0) @binding(7) var<storage, read_write> lanes_dgamma: array<f32>;
@group(0) @binding(8) var<storage, read_write> lanes_dbeta: array<f32>;

// Plane (image b, channel j of group g) of backward_lanes_flat: its first texel in the flat
// copies and dx, and its channel's gamma and (with the swish) beta.
struct LanesPlane {
    base: u32, gamma: f32, beta: f32,
}

fn lanes_plane(b: u32, g: u32, j: u32) -> LanesPlane {
    let ch = g * p.group_size + j;
    var beta = 0.0;
    if (act() != 0u) {
        beta = lanes_beta[ch];
    }
    return LanesPlane((b * p.c + ch) * (p.inner / 4u), dgamma4[ch], beta);
}

@compute @workgroup_size(8)
fn backward_lanes_flat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(subgroup_invocation_id) lane: u32) {
    let g = wid.x + wid.y * nwg.x;
    let groups = p.c / p.group_size;
    if (g >= groups) {
        return;   // the whole workgroup
    }
    let images = p.n / (p.c * p.inner);
    let inner4 = p.inner / 4u;
    var affine: array<vec2<f32>, LANES_MAX_CHANNELS>;   // (sum dz, sum dz * xhat) per channel
    for (var b = 0u; b < images; b++) {
        let m = dst4[b * groups + g];
        var weighted = vec2<f32>(0.0);
        for (var j = 0u; j < p.group_size; j++) {
            let pl = lanes_plane(b, g, j);
            var sd = vec4<f32>(0.0);
            var sdx = vec4<f32>(0.0);
            for (var q = lane; q < inner4; q += 8u) {
                let xhat = (x_texel(pl.base + q) - m.x) * m.y;
                let d = through_swish(dy_texel(pl.base + q), xhat, pl.gamma, pl.beta);
                sd += d;
                sdx = fma(d, xhat, sdx);
            }
            // The plane's sums, whole in every lane: each image's add to dgamma and dbeta is its
            // own, added image after image (so an image's numbers do not depend on its batch).
            let plane = subgroupAdd(vec2<f32>(sd.x + sd.y + sd.z + sd.w, sdx.x + sdx.y + sdx.z + sdx.w));
            affine[j] += plane;
            weighted += pl.gamma * plane;
        }
        let mm = weighted / f32(p.per_stat);   // the means of g and g * xhat, g = dz * gamma
        for (var j = 0u; j < p.group_size; j++) {
            let pl = lanes_plane(b, g, j);
            for (var q = lane; q < inner4; q += 8u) {
                let xhat = (x_texel(pl.base + q) - m.x) * m.y;
                let gz = through_swish(dy_texel(pl.base + q), xhat, pl.gamma, pl.beta) * pl.gamma;
                var v = m.y * (gz - mm.x - xhat * mm.y);
                if (ACC) {
                    v = lanes_dx4[pl.base + q] + v;
                }
                lanes_dx4[pl.base + q] = v;
            }
        }
    }
    if (lane == 0u) {
        for (var j = 0u; j < p.group_size; j++) {
            lanes_dgamma[g * p.group_size + j] = affine[j].y;
            lanes_dbeta[g * p.group_size + j] = affine[j].x;
        }
    }
}

// A group norm (+ swish) in one dispatch and no barrier where Tuning::stats_lanes holds: each
// subgroup of 8 lanes takes one statistic (image, group), sums it as stats_lanes_flat does (the
// same order, so the same statistics), writes them, then normalises its planes (apply4_flat's
// arithmetic, gamma and beta read once a plane). Replaces stats_lanes_flat + apply4_flat, and the
// flat copies of gamma and beta that apply4_flat reads.
@group(0) @binding(2) var<storage, read_write> lanes_y4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> lanes_stats: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> lanes_gamma: array<f32>;
@group(0) @binding(5) var<storage, read> lanes_affine_beta: array<f32>;

@compute @workgroup_size(8)
fn norm_lanes_flat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) lane: u32) {
    let s = wid.x + wid.y * nwg.x;
    if (s >= p.stats) {
        return;   // the whole workgroup
    }
    let first = s * (p.per_stat / 4u);   // a group norm's statistic is one run of whole texels
    let shift = x_texel(first).x;
    let sums = add_lane_sums(LaneSums(vec4<f32>(0.0), vec4<f32>(0.0), 0u), first, p.per_stat / 4u, lane, shift);
    let m = lanes_statistic(sums, shift);
    if (lane == 0u) {
        lanes_stats[s] = m;
    }
    let g = s % (p.c / p.group_size);
    let inner4 = p.inner / 4u;
    for (var j = 0u; j < p.group_size; j++) {
        let ch = g * p.group_size + j;
        let a = Affine4(m, vec4<f32>(lanes_gamma[ch]), vec4<f32>(lanes_affine_beta[ch]));
        let base = first + j * inner4;
        for (var q = lane; q < inner4; q += 8u) {
            lanes_y4[base + q] = normalized4(x_texel(base + q), a);
        }
    }
}
