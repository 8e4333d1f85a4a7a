// Picks the next token of sampled rows on the device, one workgroup a row, so a decode step
// reads back 8 bytes a sequence (token, log-probability) instead of a row of logits.
// `sampling::pick` is the reference (in f64; the test allows rounding-level differences),
// computed the same way:
// - the log-probability is under the model's own distribution: max, then sum of exp;
// - temperature 0 takes the first largest logit;
// - top-k and top-p are thresholds found by a bitwise search over the values' bits (32 counting
//   passes for top-k, 31 mass passes for top-p), not by a sort; ties at a threshold are kept;
// - the pick is the first token, in token order, whose cumulative weight reaches
//   `uniform × total`: each thread sums a contiguous chunk, an inclusive scan orders the chunks,
//   and the one thread whose interval holds the target walks its chunk. Consecutive intervals
//   share their bounds exactly (one thread's inclusive sum is the next one's exclusive sum), so
//   exactly one thread claims.

struct Params {
    vocab: u32,
    // Row of `logits` that holds workgroup 0's row.
    first_row: u32,
    pad0: u32,
    pad1: u32,
}

struct Draw {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    uniform: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> draws: array<Draw>;
@group(0) @binding(3) var<storage, read_write> picks: array<vec2<u32>>;

// Threads of the workgroup: 1024, or the device's most if fewer (a power of two).
const WG: u32 = __WG__u;
var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;
var<workgroup> wg_draw: Draw;
var<workgroup> found: atomic<u32>;

// Maps f32 to u32 preserving order (negative values below positive ones).
fn key(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

fn sum_f(lid: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_f[lid] += red_f[lid + s];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&red_f[0]);
    return r;
}

fn sum_u(lid: u32, v: u32) -> u32 {
    red_u[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_u[lid] += red_u[lid + s];
        }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&red_u[0]);
    return r;
}

// A strided pass over a row takes it in blocks of 16 logits a thread: the quads (four
// consecutive logits) q0, q0 + WG, q0 + 2 WG and q0 + 3 WG. The sixteen loads are independent,
// so a thread has them all in flight: a decode step samples each row with one workgroup, and
// with a single sequence that one workgroup streams the whole row several times. A thread
// still visits its indices in increasing order (ties go to the first index).
//
// Index of element e (0..16) of the block starting at quad q0.
fn at(q0: u32, e: u32) -> u32 {
    return 4u * (q0 + (e / 4u) * WG) + e % 4u;
}

// The block's logits (past the row's end: the last logit, which callers skip).
fn block(base: u32, vocab: u32, q0: u32) -> array<f32, 16> {
    var v: array<f32, 16>;
    for (var e = 0u; e < 16u; e++) {
        v[e] = logits[base + min(at(q0, e), vocab - 1u)];
    }
    return v;
}

// Weight of a token after the thresholds (0 when cut): exp(logit / T - max / T).
fn weight(v: f32, inv_t: f32, max_s: f32, min_key: u32, min_w: f32) -> f32 {
    let s = v * inv_t;
    if (key(s) < min_key) {
        return 0.0;
    }
    let w = exp(s - max_s);
    if (w < min_w) {
        return 0.0;
    }
    return w;
}

@compute @workgroup_size(__WG__)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let vocab = p.vocab;
    let base = (p.first_row + wid.x) * vocab;
    if (lid == 0u) {
        wg_draw = draws[wid.x];
        atomicStore(&found, 0xffffffffu);
    }
    let d = workgroupUniformLoad(&wg_draw);

    // Largest logit (the first on ties) and the log-sum-exp.
    var best = -3.4e38;
    var best_i = 0xffffffffu;
    for (var q0 = lid; 4u * q0 < vocab; q0 += 4u * WG) {
        let v = block(base, vocab, q0);
        for (var e = 0u; e < 16u; e++) {
            let i = at(q0, e);
            if (i < vocab && v[e] > best) {
                best = v[e];
                best_i = i;
            }
        }
    }
    red_f[lid] = best;
    red_u[lid] = best_i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let ov = red_f[lid + s];
            let oi = red_u[lid + s];
            if (ov > red_f[lid] || (ov == red_f[lid] && oi < red_u[lid])) {
                red_f[lid] = ov;
                red_u[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    let mx = workgroupUniformLoad(&red_f[0]);
    let argmax = workgroupUniformLoad(&red_u[0]);
    var se = 0.0;
    for (var q0 = lid; 4u * q0 < vocab; q0 += 4u * WG) {
        let v = block(base, vocab, q0);
        for (var e = 0u; e < 16u; e++) {
            if (at(q0, e) < vocab) {
                se += exp(v[e] - mx);
            }
        }
    }
    let log_z = mx + log(sum_f(lid, se));

    if (d.temperature == 0.0) {
        if (lid == 0u) {
            picks[wid.x] = vec2<u32>(argmax, bitcast<u32>(logits[base + argmax] - log_z));
        }
        return;
    }
    let inv_t = 1.0 / d.temperature;
    let max_s = mx * inv_t;

    // Top-k: the largest key that at least `top_k` scaled logits reach.
    var min_key = 0u;
    if (d.top_k > 0u && d.top_k < vocab) {
        for (var bit = 31i; bit >= 0i; bit--) {
            let cand = min_key | (1u << u32(bit));
            var c = 0u;
            for (var q0 = lid; 4u * q0 < vocab; q0 += 4u * WG) {
                let v = block(base, vocab, q0);
                for (var e = 0u; e < 16u; e++) {
                    if (at(q0, e) < vocab && key(v[e] * inv_t) >= cand) {
                        c += 1u;
                    }
                }
            }
            if (sum_u(lid, c) >= d.top_k) {
                min_key = cand;
            }
        }
    }
    // Top-p: the largest weight w such that the weights of at least w hold `top_p` of the mass
    // (weights are never negative, so their bits order them).
    var min_w = 0.0;
    if (d.top_p < 1.0) {
        var m = 0.0;
        for (var q0 = lid; 4u * q0 < vocab; q0 += 4u * WG) {
            let v = block(base, vocab, q0);
            for (var e = 0u; e < 16u; e++) {
                if (at(q0, e) < vocab) {
                    m += weight(v[e], inv_t, max_s, min_key, 0.0);
                }
            }
        }
        let goal = d.top_p * sum_f(lid, m);
        var bits = 0u;
        for (var bit = 30i; bit >= 0i; bit--) {
            let cand = bits | (1u << u32(bit));
            let cw = bitcast<f32>(cand);
            var mass = 0.0;
            for (var q0 = lid; 4u * q0 < vocab; q0 += 4u * WG) {
                let v = block(base, vocab, q0);
                for (var e = 0u; e < 16u; e++) {
                    let w = weight(v[e], inv_t, max_s, min_key, 0.0);
                    if (at(q0, e) < vocab && w >= cw) {
                        mass += w;
                    }
                }
            }
            if (sum_f(lid, mass) >= goal) {
                bits = cand;
            }
        }
        min_w = bitcast<f32>(bits);
    }

    // The pick: contiguous chunks, an inclusive scan of their sums, one walk.
    let chunk = (vocab + WG - 1u) / WG;
    let start = min(lid * chunk, vocab);
    let end = min(start + chunk, vocab);
    var cs = 0.0;
    // Four loads in flight, added in index order.
    for (var i0 = start; i0 < end; i0 += 4u) {
        var v: array<f32, 4>;
        for (var k = 0u; k < 4u; k++) {
            v[k] = logits[base + min(i0 + k, vocab - 1u)];
        }
        for (var k = 0u; k < 4u; k++) {
            if (i0 + k < end) {
                cs += weight(v[k], inv_t, max_s, min_key, min_w);
            }
        }
    }
    red_f[lid] = cs;
    workgroupBarrier();
    for (var off = 1u; off < WG; off <<= 1u) {
        var add = 0.0;
        if (lid >= off) {
            add = red_f[lid - off];
        }
        workgroupBarrier();
        red_f[lid] += add;
        workgroupBarrier();
    }
    let incl = red_f[lid];
    var excl = 0.0;
    if (lid > 0u) {
        excl = red_f[lid - 1u];
    }
    let total = workgroupUniformLoad(&red_f[WG - 1u]);
    let r = d.uniform * total;
    if (cs > 0.0 && r <= incl && (excl < r || excl == 0.0)) {
        var acc = excl;
        var pick = 0xffffffffu;
        for (var i = start; i < end; i++) {
            let w = weight(logits[base + i], inv_t, max_s, min_key, min_w);
            if (w > 0.0) {
                acc += w;
                pick = i;
                if (acc >= r) {
                    break;
                }
            }
        }
        atomicMin(&found, pick);
    }
    workgroupBarrier();
    if (lid == 0u) {
        var tok = atomicLoad(&found);
        if (tok == 0xffffffffu) {
            tok = argmax;
        }
        picks[wid.x] = vec2<u32>(tok, bitcast<u32>(logits[base + tok] - log_z));
    }
}
