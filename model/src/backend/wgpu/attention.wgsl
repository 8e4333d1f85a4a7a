// Causal attention over the paged KV cache: one workgroup of TILE threads per (query head,
// token). The token attends to positions 0..=pos of its sequence, read through its block table,
// TILE positions at a time with an online softmax (running max and sum), so any context length
// fits in fixed workgroup memory.
//
// Per tile, each thread scores one position (a dot product over vec4 loads) and keeps that
// position's value address in workgroup memory; then the threads split the weighted sum of
// values as (position group g, vec4 column c): with COLS = head_dim/4 columns there are
// TILE / COLS groups, each summing every GROUPS-th position of the tile, and the groups'
// partial sums are added once at the end.
//
// The head dimension is a constant of the compiled kernel (the backend substitutes it), so
// every loop has a constant trip count and unrolls: a thread's loads are issued together
// instead of one after another, which is what bounds a decode step's attention (few
// workgroups, each waiting on memory). Requires head_dim % 4 == 0 and head_dim <= 4 * TILE.
//
// With `rope` set (1: pairs (j, j + hd/2), 2: pairs (2j, 2j + 1)) the kernel also does
// rope_kv.wgsl's work, for passes where every token is the only one of its sequence (decode
// steps): it rotates its query head and its key head itself, takes the token's own key and
// value from the QKV row rather than from the cache (where they are being written), and the
// first query head of each key head writes them to the cache. A pass with several tokens of
// one sequence needs their keys in the cache before any attends, so it runs rope_kv first.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    qkv_stride: u32,
    kv_dim: u32,
    scale: f32,
    block_tokens: u32,
    rope: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tok: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> tables: array<u32>;
@group(0) @binding(4) var<storage, read_write> kv: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> cs: array<vec2<f32>>;

const TILE: u32 = 256u;
const COLS: u32 = __HD__u / 4u;
const GROUPS: u32 = TILE / COLS;
// Positions each group sums per tile.
const PER_GROUP: u32 = (TILE + GROUPS - 1u) / GROUPS;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<vec4<f32>, COLS>;
// The token's own rotated key and its value (with `rope`), and the rotation's scratch.
var<workgroup> ks: array<vec4<f32>, COLS>;
var<workgroup> vs: array<vec4<f32>, COLS>;
var<workgroup> qf: array<f32, __HD__u>;
var<workgroup> kf: array<f32, __HD__u>;
var<workgroup> sc: array<f32, TILE>;
var<workgroup> vaddr: array<u32, TILE>;
var<workgroup> red: array<f32, TILE>;
var<workgroup> part: array<vec4<f32>, TILE>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    // Heads fastest: the query heads that share a key head run as neighbouring workgroups, so
    // the keys and values one of them reads from memory the others find in the L2 cache.
    let i = wid.y;
    let h = wid.x;
    let c = lid % COLS;
    let g = lid / COLS;
    let kv4 = p.kv_dim / 4u;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let t = tok[i];
    let ctx = t.x + 1u;
    let hd = COLS * 4u;
    let row = i * p.qkv_stride;
    let qb = row + h * hd;
    if (p.rope == 0u) {
        if (lid < COLS) {
            let b = qb + lid * 4u;
            qs[lid] = vec4<f32>(qkv[b], qkv[b + 1u], qkv[b + 2u], qkv[b + 3u]);
        }
    } else {
        let half = hd / 2u;
        if (lid < half) {
            var a = lid;
            var b = lid + half;
            if (p.rope == 2u) {
                a = 2u * lid;
                b = a + 1u;
            }
            let c = cs[i * half + lid];
            let kb = row + p.n_heads * hd + kvh * hd;
            let q0 = qkv[qb + a];
            let q1 = qkv[qb + b];
            qf[a] = q0 * c.x - q1 * c.y;
            qf[b] = q0 * c.y + q1 * c.x;
            let k0 = qkv[kb + a];
            let k1 = qkv[kb + b];
            kf[a] = k0 * c.x - k1 * c.y;
            kf[b] = k0 * c.y + k1 * c.x;
        }
        workgroupBarrier();
        if (lid < COLS) {
            let e = lid * 4u;
            qs[lid] = vec4<f32>(qf[e], qf[e + 1u], qf[e + 2u], qf[e + 3u]);
            ks[lid] = vec4<f32>(kf[e], kf[e + 1u], kf[e + 2u], kf[e + 3u]);
            let vb = row + p.n_heads * hd + p.kv_dim + kvh * hd + e;
            vs[lid] = vec4<f32>(qkv[vb], qkv[vb + 1u], qkv[vb + 2u], qkv[vb + 3u]);
            // The first query head of each key head stores the key and value.
            if (h % (p.n_heads / p.n_kv_heads) == 0u) {
                let kbase = ((t.z * 2u) * p.block_tokens + t.w) * kv4 + kvh * COLS;
                let vbase = ((t.z * 2u + 1u) * p.block_tokens + t.w) * kv4 + kvh * COLS;
                kv[kbase + lid] = ks[lid];
                kv[vbase + lid] = vs[lid];
            }
        }
    }
    workgroupBarrier();
    // The position whose key and value come from ks / vs instead of the cache.
    var own = ctx;
    if (p.rope != 0u) {
        own = ctx - 1u;
    }
    var m = NEG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var t0 = 0u; t0 < ctx; t0 += TILE) {
        let pos = t0 + lid;
        var s = NEG;
        var va = 0u;
        if (pos < ctx) {
            let blk = tables[t.y + pos / p.block_tokens];
            let slot = pos % p.block_tokens;
            let base = ((blk * 2u) * p.block_tokens + slot) * kv4 + kvh * COLS;
            var dt = 0.0;
            if (pos == own) {
                for (var d = 0u; d < COLS; d++) {
                    dt += dot(qs[d], ks[d]);
                }
            } else {
                for (var d = 0u; d < COLS; d++) {
                    dt += dot(qs[d], kv[base + d]);
                }
            }
            s = dt * p.scale;
            va = ((blk * 2u + 1u) * p.block_tokens + slot) * kv4 + kvh * COLS;
        }
        vaddr[lid] = va;
        red[lid] = s;
        workgroupBarrier();
        for (var st = TILE / 2u; st > 0u; st >>= 1u) {
            if (lid < st) {
                red[lid] = max(red[lid], red[lid + st]);
            }
            workgroupBarrier();
        }
        let m_new = max(m, red[0]);
        workgroupBarrier();
        var e = 0.0;
        if (pos < ctx) {
            e = exp(s - m_new);
        }
        sc[lid] = e;
        red[lid] = e;
        workgroupBarrier();
        for (var st = TILE / 2u; st > 0u; st >>= 1u) {
            if (lid < st) {
                red[lid] += red[lid + st];
            }
            workgroupBarrier();
        }
        let corr = exp(m - m_new);
        l = l * corr + red[0];
        let n = min(TILE, ctx - t0);
        var a = acc * corr;
        if (g < GROUPS) {
            for (var k = 0u; k < PER_GROUP; k++) {
                let j = g + k * GROUPS;
                if (j < n) {
                    if (t0 + j == own) {
                        a += sc[j] * vs[c];
                    } else {
                        a += sc[j] * kv[vaddr[j] + c];
                    }
                }
            }
        }
        acc = a;
        m = m_new;
        workgroupBarrier();
    }
    part[lid] = acc;
    workgroupBarrier();
    if (lid < COLS) {
        var sum = vec4<f32>(0.0);
        for (var k = 0u; k < GROUPS; k++) {
            sum += part[k * COLS + lid];
        }
        let o = sum / l;
        let ob = i * p.n_heads * COLS * 4u + h * COLS * 4u + lid * 4u;
        out[ob] = o.x;
        out[ob + 1u] = o.y;
        out[ob + 2u] = o.z;
        out[ob + 3u] = o.w;
    }
}
