// Fused multi-head attention  softmax(Q Kᵀ · scale + mask) V  over
// [B, T, C] activations (head h in columns h*D .. h*D + D - 1, as minGPT
// splits them), one invocation per (batch, head, query), online softmax so
// the T x T scores never exist in memory. Also writes the row's
// log-sum-exp, which the backward pass uses to rebuild the probabilities.
// The query block of a sliding window or KV cache starts at `q_start`
// within the keys (causal mask: key j visible to query i iff j <= q_start + i).

const MAX_D4: u32 = 32u;   // head_dim <= 128

struct Params {
    b: u32, heads: u32, tq: u32, tk: u32,
    d: u32, causal: u32, scale: f32, q_start: u32,
    q_ld: u32, k_ld: u32, v_ld: u32, o_ld: u32,   // row strides (in vec4) of q, k, v, out
    kv_bs: u32, chunks: u32, t0: u32, tasks: u32, // batch stride (in vec4) of k and v (a KV cache holds more rows than tk); decode: key chunks, the dispatch's first task and task count
    q_off: u32, k_off: u32, v_off: u32, _pad2: u32,  // first element (in vec4) of q, k, v (decode kernels: one cache holds all three)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

// One step of the online softmax: fold score s into the running max m and
// sum l; returns (the factor for the output so far, the weight of this key's
// value row).
fn online_softmax_step(m: ptr<function, f32>, l: ptr<function, f32>, s: f32) -> vec2<f32> {
    let m_new = max(*m, s);
    let corr = exp(*m - m_new);
    let w = exp(s - m_new);
    *l = *l * corr + w;
    *m = m_new;
    return vec2<f32>(corr, w);
}

// Online softmax: fold key/value row (krow, vrow) into the running max m,
// sum l and unnormalised output acc of a query qv (already scaled).
fn fold_key(qv: ptr<function, array<vec4<f32>, MAX_D4>>, acc: ptr<function, array<vec4<f32>, MAX_D4>>,
            m: ptr<function, f32>, l: ptr<function, f32>, krow: u32, vrow: u32, d4: u32) {
    var s = 0.0;
    for (var c = 0u; c < d4; c++) {
        s += dot((*qv)[c], k[krow + c]);
    }
    let cw = online_softmax_step(m, l, s);
    for (var c = 0u; c < d4; c++) {
        (*acc)[c] = (*acc)[c] * cw.x + cw.y * v[vrow + c];
    }
}

@compute @workgroup_size(64)
fn attention(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.b * p.heads * p.tq) { return; }
    let i = t % p.tq;
    let h = (t / p.tq) % p.heads;
    let b = t / (p.tq * p.heads);
    let d4 = p.d / 4u;
    let qrow = (b * p.tq + i) * p.q_ld + h * d4;
    var qv: array<vec4<f32>, MAX_D4>;
    var acc: array<vec4<f32>, MAX_D4>;
    for (var c = 0u; c < d4; c++) {
        qv[c] = q[qrow + c] * p.scale;
        acc[c] = vec4<f32>(0.0);
    }
    var m = -3.4e38;
    var l = 0.0;
    var last = p.tk;
    if (p.causal == 1u) {
        last = min(p.tk, p.q_start + i + 1u);
    }
    for (var j = 0u; j < last; j++) {
        fold_key(&qv, &acc, &m, &l, p.k_off + b * p.kv_bs + j * p.k_ld + h * d4, p.v_off + b * p.kv_bs + j * p.v_ld + h * d4, d4);
    }
    let orow = (b * p.tq + i) * p.o_ld + h * d4;
    let inv = 1.0 / l;
    for (var c = 0u; c < d4; c++) {
        o[orow + c] = acc[c] * inv;
    }
    lse[t] = m + log(l);
}

// Tiled (GPU-shaped): a workgroup takes 64 consecutive queries of one (batch, head) and walks
// the keys in tiles of KT rows; all 64 invocations load each tile of K and V into workgroup
// memory once (behind barriers) and every query folds it from there, instead of each invocation
// reading every key row from memory. Same output and lse as `attention`.
const KT: u32 = 8u;
var<workgroup> tile_k: array<vec4<f32>, 256>;   // KT x MAX_D4
var<workgroup> tile_v: array<vec4<f32>, 256>;

// Workgroup w of a tiled kernel over `rows` rows (queries or keys) per (batch, head), 64 a
// workgroup: (batch, head, first row). Past the last (batch, head) on grids rounded up.
fn tile_task(w: u32, rows: u32) -> vec3<u32> {
    let blocks = (rows + 63u) / 64u;
    let bh = w / blocks;
    return vec3<u32>(bh / p.heads, bh % p.heads, (w % blocks) * 64u);
}

// Key and value rows j0 .. j0 + KT (those before tk) into tile_k, tile_v, the workgroup's 64
// invocations sharing the loads (from `kbase` and `vbase`, vec4s; callers put the barriers).
fn stage_kv(j0: u32, kbase: u32, vbase: u32, li: u32, d4: u32) {
    for (var t = li; t < KT * d4; t += 64u) {
        let j = j0 + t / d4;
        if (j < p.tk) {
            tile_k[t] = k[kbase + j * p.k_ld + t % d4];
            tile_v[t] = v[vbase + j * p.v_ld + t % d4];
        }
    }
}

@compute @workgroup_size(64)
fn attention_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let task = tile_task(wid.x + wid.y * nwg.x, p.tq);
    let b = task.x;
    let h = task.y;
    let i0 = task.z;
    let bh = b * p.heads + h;
    let i = i0 + li;
    let live = bh < p.b * p.heads && i < p.tq;
    let d4 = p.d / 4u;
    var qv: array<vec4<f32>, MAX_D4>;
    var acc: array<vec4<f32>, MAX_D4>;
    let qrow = (b * p.tq + i) * p.q_ld + h * d4;
    for (var c = 0u; c < d4; c++) {
        qv[c] = select(vec4<f32>(0.0), q[qrow + c] * p.scale, live);
        acc[c] = vec4<f32>(0.0);
    }
    var m = -3.4e38;
    var l = 0.0;
    var last = p.tk;
    // The workgroup's last key: the same for all its invocations (they share the barriers).
    var wg_last = p.tk;
    if (p.causal == 1u) {
        last = min(p.tk, p.q_start + i + 1u);
        wg_last = min(p.tk, p.q_start + min(i0 + 64u, p.tq));
    }
    if (bh >= p.b * p.heads) {
        wg_last = 0u;
    }
    let kbase = p.k_off + b * p.kv_bs + h * d4;
    let vbase = p.v_off + b * p.kv_bs + h * d4;
    for (var j0 = 0u; j0 < wg_last; j0 += KT) {
        stage_kv(j0, kbase, vbase, li, d4);
        workgroupBarrier();
        if (live) {
            for (var jj = 0u; jj < KT; jj++) {
                if (j0 + jj < last) {
                    var s = 0.0;
                    for (var c = 0u; c < d4; c++) {
                        s += dot(qv[c], tile_k[jj * d4 + c]);
                    }
                    let cw = online_softmax_step(&m, &l, s);
                    for (var c = 0u; c < d4; c++) {
                        acc[c] = acc[c] * cw.x + cw.y * tile_v[jj * d4 + c];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let orow = (b * p.tq + i) * p.o_ld + h * d4;
        let inv = 1.0 / l;
        for (var c = 0u; c < d4; c++) {
            o[orow + c] = acc[c] * inv;
        }
        lse[(b * p.heads + h) * p.tq + i] = m + log(l);
    }
}

// ---- Backward ------------------------------------------------------------------
// With P = softmax(S), S = scale * Q Kᵀ (+ mask), rebuilt from the saved lse:
//   D_i = dO_i · O_i,  dS_ij = P_ij (dO_i · V_j - D_i)
//   dQ_i = scale Σ_j dS_ij K_j,  dK_j = scale Σ_i dS_ij Q_i,  dV_j = Σ_i P_ij dO_i
// Two passes without atomics: one invocation per query (dQ, and D for the
// next pass), then one per key (dK, dV).

@group(0) @binding(4) var<storage, read> fo: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> flse: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dsum: array<f32>;

@compute @workgroup_size(64)
fn backward_dq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.b * p.heads * p.tq) { return; }
    let i = t % p.tq;
    let h = (t / p.tq) % p.heads;
    let b = t / (p.tq * p.heads);
    let d4 = p.d / 4u;
    let qrow = (b * p.tq + i) * p.q_ld + h * d4;
    let orow = (b * p.tq + i) * p.o_ld + h * d4;
    var qv: array<vec4<f32>, MAX_D4>;
    var gv: array<vec4<f32>, MAX_D4>;
    var acc: array<vec4<f32>, MAX_D4>;
    var dd = 0.0;
    for (var c = 0u; c < d4; c++) {
        qv[c] = q[qrow + c];
        gv[c] = dout[orow + c];
        acc[c] = vec4<f32>(0.0);
        dd += dot(gv[c], fo[orow + c]);
    }
    dsum[t] = dd;
    let l = flse[t];
    var last = p.tk;
    if (p.causal == 1u) {
        last = min(p.tk, p.q_start + i + 1u);
    }
    for (var j = 0u; j < last; j++) {
        let krow = b * p.kv_bs + j * p.k_ld + h * d4;
        let vrow = b * p.kv_bs + j * p.v_ld + h * d4;
        var s = 0.0;
        var dp = 0.0;
        for (var c = 0u; c < d4; c++) {
            s += dot(qv[c], k[krow + c]);
            dp += dot(gv[c], v[vrow + c]);
        }
        let ds = exp(p.scale * s - l) * (dp - dd);
        for (var c = 0u; c < d4; c++) {
            acc[c] += ds * k[krow + c];
        }
    }
    for (var c = 0u; c < d4; c++) {
        dq[qrow + c] = p.scale * acc[c];
    }
}

@group(0) @binding(4) var<storage, read> dsum_in: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> dv: array<vec4<f32>>;

@compute @workgroup_size(64)
fn backward_dkv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.b * p.heads * p.tk) { return; }
    let j = t % p.tk;
    let h = (t / p.tk) % p.heads;
    let b = t / (p.tk * p.heads);
    let d4 = p.d / 4u;
    let krow = b * p.kv_bs + j * p.k_ld + h * d4;
    let vrow = b * p.kv_bs + j * p.v_ld + h * d4;
    var kv: array<vec4<f32>, MAX_D4>;
    var vv: array<vec4<f32>, MAX_D4>;
    var ak: array<vec4<f32>, MAX_D4>;
    var av: array<vec4<f32>, MAX_D4>;
    for (var c = 0u; c < d4; c++) {
        kv[c] = k[krow + c];
        vv[c] = v[vrow + c];
        ak[c] = vec4<f32>(0.0);
        av[c] = vec4<f32>(0.0);
    }
    var first = 0u;
    if (p.causal == 1u && j > p.q_start) {
        first = j - p.q_start;
    }
    for (var i = first; i < p.tq; i++) {
        let row = (b * p.heads + h) * p.tq + i;
        let qrow = (b * p.tq + i) * p.q_ld + h * d4;
        let orow = (b * p.tq + i) * p.o_ld + h * d4;
        var s = 0.0;
        var dp = 0.0;
        for (var c = 0u; c < d4; c++) {
            s += dot(q[qrow + c], kv[c]);
            dp += dot(dout[orow + c], vv[c]);
        }
        let pr = exp(p.scale * s - flse[row]);
        let ds = pr * (dp - dsum_in[row]);
        for (var c = 0u; c < d4; c++) {
            av[c] += pr * dout[orow + c];
            ak[c] += ds * q[qrow + c];
        }
    }
    for (var c = 0u; c < d4; c++) {
        dk[krow + c] = p.scale * ak[c];
        dv[vrow + c] = av[c];
    }
}

// Tiled backward (GPU-shaped, with `attention_tiled`): the same two passes, each workgroup taking
// 64 queries (dQ) or 64 keys (dK, dV) of one (batch, head) and staging the rows the other side
// walks over in tiles of KT in workgroup memory, as the tiled forward does.
var<workgroup> tile_lse: array<f32, KT>;
var<workgroup> tile_dsum: array<f32, KT>;

@compute @workgroup_size(64)
fn backward_dq_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let task = tile_task(wid.x + wid.y * nwg.x, p.tq);
    let b = task.x;
    let h = task.y;
    let i0 = task.z;
    let bh = b * p.heads + h;
    let i = i0 + li;
    let live = bh < p.b * p.heads && i < p.tq;
    let t = (b * p.heads + h) * p.tq + i;
    let d4 = p.d / 4u;
    let qrow = (b * p.tq + i) * p.q_ld + h * d4;
    let orow = (b * p.tq + i) * p.o_ld + h * d4;
    var qv: array<vec4<f32>, MAX_D4>;
    var gv: array<vec4<f32>, MAX_D4>;
    var acc: array<vec4<f32>, MAX_D4>;
    var dd = 0.0;
    var l = 0.0;
    if (live) {
        for (var c = 0u; c < d4; c++) {
            qv[c] = q[qrow + c];
            gv[c] = dout[orow + c];
            acc[c] = vec4<f32>(0.0);
            dd += dot(gv[c], fo[orow + c]);
        }
        dsum[t] = dd;
        l = flse[t];
    }
    var last = p.tk;
    var wg_last = p.tk;
    if (p.causal == 1u) {
        last = min(p.tk, p.q_start + i + 1u);
        wg_last = min(p.tk, p.q_start + min(i0 + 64u, p.tq));
    }
    if (bh >= p.b * p.heads) {
        wg_last = 0u;
    }
    let kbase = b * p.kv_bs + h * d4;
    for (var j0 = 0u; j0 < wg_last; j0 += KT) {
        stage_kv(j0, kbase, kbase, li, d4);
        workgroupBarrier();
        if (live) {
            for (var jj = 0u; jj < KT; jj++) {
                if (j0 + jj < last) {
                    var s = 0.0;
                    var dp = 0.0;
                    for (var c = 0u; c < d4; c++) {
                        s += dot(qv[c], tile_k[jj * d4 + c]);
                        dp += dot(gv[c], tile_v[jj * d4 + c]);
                    }
                    let ds = exp(p.scale * s - l) * (dp - dd);
                    for (var c = 0u; c < d4; c++) {
                        acc[c] += ds * tile_k[jj * d4 + c];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < d4; c++) {
            dq[qrow + c] = p.scale * acc[c];
        }
    }
}

// Query rows (into tile_k) and their output gradients (into tile_v) staged KT at a time, with
// their lse and D, for 64 keys.
@compute @workgroup_size(64)
fn backward_dkv_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let task = tile_task(wid.x + wid.y * nwg.x, p.tk);
    let b = task.x;
    let h = task.y;
    let j0 = task.z;
    let bh = b * p.heads + h;
    let j = j0 + li;
    let live = bh < p.b * p.heads && j < p.tk;
    let d4 = p.d / 4u;
    let krow = b * p.kv_bs + j * p.k_ld + h * d4;
    let vrow = b * p.kv_bs + j * p.v_ld + h * d4;
    var kv: array<vec4<f32>, MAX_D4>;
    var vv: array<vec4<f32>, MAX_D4>;
    var ak: array<vec4<f32>, MAX_D4>;
    var av: array<vec4<f32>, MAX_D4>;
    if (live) {
        for (var c = 0u; c < d4; c++) {
            kv[c] = k[krow + c];
            vv[c] = v[vrow + c];
            ak[c] = vec4<f32>(0.0);
            av[c] = vec4<f32>(0.0);
        }
    }
    // Causal: key j is seen by queries i >= j - q_start; the workgroup starts at its first key's.
    var first = 0u;
    var wg_first = 0u;
    if (p.causal == 1u) {
        if (j > p.q_start) { first = j - p.q_start; }
        if (j0 > p.q_start) { wg_first = j0 - p.q_start; }
    }
    var wg_end = p.tq;
    if (bh >= p.b * p.heads) {
        wg_end = 0u;
    }
    let row0 = (b * p.heads + h) * p.tq;
    for (var i0 = wg_first; i0 < wg_end; i0 += KT) {
        for (var e = li; e < KT * d4; e += 64u) {
            let i = i0 + e / d4;
            if (i < p.tq) {
                tile_k[e] = q[(b * p.tq + i) * p.q_ld + h * d4 + e % d4];
                tile_v[e] = dout[(b * p.tq + i) * p.o_ld + h * d4 + e % d4];
            }
        }
        if (li < KT && i0 + li < p.tq) {
            tile_lse[li] = flse[row0 + i0 + li];
            tile_dsum[li] = dsum_in[row0 + i0 + li];
        }
        workgroupBarrier();
        if (live) {
            for (var ii = 0u; ii < KT; ii++) {
                let i = i0 + ii;
                if (i >= first && i < p.tq) {
                    var s = 0.0;
                    var dp = 0.0;
                    for (var c = 0u; c < d4; c++) {
                        s += dot(tile_k[ii * d4 + c], kv[c]);
                        dp += dot(tile_v[ii * d4 + c], vv[c]);
                    }
                    let pr = exp(p.scale * s - tile_lse[ii]);
                    let ds = pr * (dp - tile_dsum[ii]);
                    for (var c = 0u; c < d4; c++) {
                        av[c] += pr * tile_v[ii * d4 + c];
                        ak[c] += ds * tile_k[ii * d4 + c];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < d4; c++) {
            dk[krow + c] = p.scale * ak[c];
            dv[vrow + c] = av[c];
        }
    }
}

// ---- One query per sequence (token-by-token decoding) ---------------------------
// The fused kernel has one invocation per (batch, head): with a single query
// that is too little parallelism. Split the keys into chunks of KEY_CHUNK:
// each invocation folds one chunk into (max, sum, unnormalised output), and a
// second pass combines the chunks. Here _a holds the number of chunks. KEY_CHUNK is a pipeline
// constant (Tuning::decode_key_chunk: 16 on CPU devices, 4 on GPUs).

const KEY_CHUNK: u32 = 16u;

@group(0) @binding(4) var<storage, read_write> part: array<vec4<f32>>;   // per (b, h, chunk): d/4 vec4 of output, then (max, sum, 0, 0)

// The head size in vec4s, fixed when the pipeline is made (the launcher
// specialises it): loops of constant length over arrays of that size unroll
// into registers, where a runtime-sized loop would keep them in per-lane
// memory on software devices.
const DECODE_D4: u32 = 16u;

// Task t of a decode step: (key chunk, head, sequence). Heads vary fastest, then chunks, so the
// tasks of a run of key chunks of one sequence are consecutive (a cache larger than one storage
// binding is dispatched a window of rows at a time, tasks t0 .. t0 + tasks).
fn decode_task(t: u32) -> vec3<u32> {
    return vec3<u32>((t / p.heads) % p.chunks, t % p.heads, t / (p.chunks * p.heads));
}

// The scaled query of sequence b, head h (from `q`, the cache's rows).
fn decode_query(b: u32, h: u32) -> array<vec4<f32>, DECODE_D4> {
    var qv: array<vec4<f32>, DECODE_D4>;
    let qrow = p.q_off + b * p.q_ld + h * DECODE_D4;
    for (var c = 0u; c < DECODE_D4; c++) {
        qv[c] = q[qrow + c] * p.scale;
    }
    return qv;
}

// Workgroups of 8 (one SIMD row on software devices), so that the few
// invocations of a single sequence spread over every CPU thread. Each
// invocation folds its chunk of keys into (unnormalised output, max, sum).
@compute @workgroup_size(8)
fn decode_partial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let local = gid.x + gid.y * nwg.x * 8u;
    if (local >= p.tasks) { return; }
    let t = p.t0 + local;
    let task = decode_task(t);
    let h = task.y;
    let b = task.z;
    let qv = decode_query(b, h);
    var acc: array<vec4<f32>, DECODE_D4>;
    var m = -3.4e38;
    var l = 0.0;
    for (var j = task.x * KEY_CHUNK; j < min(p.tk, (task.x + 1u) * KEY_CHUNK); j++) {
        let krow = p.k_off + b * p.kv_bs + j * p.k_ld + h * DECODE_D4;
        let vrow = p.v_off + b * p.kv_bs + j * p.v_ld + h * DECODE_D4;
        var s = 0.0;
        for (var c = 0u; c < DECODE_D4; c++) {
            s += dot(qv[c], k[krow + c]);
        }
        let cw = online_softmax_step(&m, &l, s);
        for (var c = 0u; c < DECODE_D4; c++) {
            acc[c] = acc[c] * cw.x + cw.y * v[vrow + c];
        }
    }
    let base = t * (DECODE_D4 + 1u);
    for (var c = 0u; c < DECODE_D4; c++) {
        part[base + c] = acc[c];
    }
    part[base + DECODE_D4] = vec4<f32>(m, l, 0.0, 0.0);
}

// decode_partial with keys and values fetched from a texture copy of the
// cache (texel (c4, t) of layer b = row t of sequence b): texture fetches are
// vectorised on software devices, where buffer loads in a loop run lane by
// lane (measured on lavapipe: ~600 cycles per 8-lane vec4 load). Bound as a
// read-only storage texture: no mip level to look up per lane.
@group(0) @binding(2) var kv_tex: texture_storage_2d_array<rgba32float, read>;
@group(0) @binding(3) var<storage, read_write> part_t: array<vec4<f32>>;

@compute @workgroup_size(8)
fn decode_partial_tex(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let local = gid.x + gid.y * nwg.x * 8u;
    if (local >= p.tasks) { return; }
    let t = p.t0 + local;
    let task = decode_task(t);
    let h = task.y;
    let b = task.z;
    let qv = decode_query(b, h);
    var acc: array<vec4<f32>, DECODE_D4>;
    var m = -3.4e38;
    var l = 0.0;
    let kx = p.k_off + h * DECODE_D4;
    let vx = p.v_off + h * DECODE_D4;
    for (var j = task.x * KEY_CHUNK; j < min(p.tk, (task.x + 1u) * KEY_CHUNK); j++) {
        var s = 0.0;
        for (var c = 0u; c < DECODE_D4; c++) {
            s += dot(qv[c], textureLoad(kv_tex, vec2<u32>(kx + c, j), b));
        }
        let cw = online_softmax_step(&m, &l, s);
        for (var c = 0u; c < DECODE_D4; c++) {
            acc[c] = acc[c] * cw.x + cw.y * textureLoad(kv_tex, vec2<u32>(vx + c, j), b);
        }
    }
    let base = t * (DECODE_D4 + 1u);
    for (var c = 0u; c < DECODE_D4; c++) {
        part_t[base + c] = acc[c];
    }
    part_t[base + DECODE_D4] = vec4<f32>(m, l, 0.0, 0.0);
}

@group(0) @binding(1) var<storage, read> parts: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dec_out: array<vec4<f32>>;

// One invocation per (b, h, vec4 of the head): combine the chunks.
@compute @workgroup_size(8)
fn decode_combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 8u;
    let d4 = p.d / 4u;
    if (t >= p.b * p.heads * d4) { return; }
    let c = t % d4;
    let bh = t / d4;
    let chunks = p.chunks;
    let b = bh / p.heads;
    let h = bh % p.heads;
    var mx = -3.4e38;
    for (var i = 0u; i < chunks; i++) {
        mx = max(mx, parts[((b * chunks + i) * p.heads + h) * (d4 + 1u) + d4].x);
    }
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < chunks; i++) {
        let base = ((b * chunks + i) * p.heads + h) * (d4 + 1u);
        let ml = parts[base + d4];
        let f = exp(ml.x - mx);
        l += ml.y * f;
        acc += parts[base + c] * f;
    }
    dec_out[b * p.o_ld + h * d4 + c] = acc / l;
}
