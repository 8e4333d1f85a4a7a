// Causal attention over the paged KV cache, one workgroup of TILE threads per (key head,
// token) covering all G query heads that share the key head (grouped-query attention): each
// key and value is loaded once for the G heads instead of once per head, and a tile's
// reductions run for the G heads together. Otherwise attention.wgsl's algorithm step for
// step (the same tiles, online softmax, summation order and position groups), so the two
// agree to rounding; without its fused RoPE: rope_kv.wgsl runs first and has written every
// token's rotated query into the QKV row and its key and value into the cache.
//
// The head dimension and G are constants of the compiled kernel (the backend substitutes
// them). Requires head_dim % 4 == 0 and head_dim <= 4 * TILE; the backend takes this kernel
// for G <= 8 (its workgroup memory grows with G).

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
@group(0) @binding(4) var<storage, read> kv: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const TILE: u32 = 256u;
const COLS: u32 = __HD__u / 4u;
const G: u32 = __G__u;
const GROUPS: u32 = TILE / COLS;
// Positions each group sums per tile.
const PER_GROUP: u32 = (TILE + GROUPS - 1u) / GROUPS;
const NEG: f32 = -3.0e38;

// The G query heads, then per head a tile's scores or weights (`sc`) and reduction buffer.
var<workgroup> qs: array<vec4<f32>, __QS__>;
var<workgroup> sc: array<f32, __GT__>;
var<workgroup> red: array<f32, __GT__>;
var<workgroup> vaddr: array<u32, TILE>;
var<workgroup> part: array<vec4<f32>, TILE>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let kvh = wid.x;
    let i = wid.y;
    let c = lid % COLS;
    let grp = lid / COLS;
    let kv4 = p.kv_dim / 4u;
    let t = tok[i];
    let ctx = t.x + 1u;
    let hd = COLS * 4u;
    let row = i * p.qkv_stride;
    for (var e = lid; e < G * COLS; e += TILE) {
        let b = row + (kvh * G + e / COLS) * hd + (e % COLS) * 4u;
        qs[e] = vec4<f32>(qkv[b], qkv[b + 1u], qkv[b + 2u], qkv[b + 3u]);
    }
    workgroupBarrier();
    var m: array<f32, G>;
    var l: array<f32, G>;
    var acc: array<vec4<f32>, G>;
    for (var g = 0u; g < G; g++) {
        m[g] = NEG;
        l[g] = 0.0;
        acc[g] = vec4<f32>(0.0);
    }
    for (var t0 = 0u; t0 < ctx; t0 += TILE) {
        let pos = t0 + lid;
        var s: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            s[g] = NEG;
        }
        var va = 0u;
        if (pos < ctx) {
            let blk = tables[t.y + pos / p.block_tokens];
            let slot = pos % p.block_tokens;
            let base = ((blk * 2u) * p.block_tokens + slot) * kv4 + kvh * COLS;
            var dt: array<f32, G>;
            for (var g = 0u; g < G; g++) {
                dt[g] = 0.0;
            }
            for (var d = 0u; d < COLS; d++) {
                let k = kv[base + d];
                for (var g = 0u; g < G; g++) {
                    dt[g] += dot(qs[g * COLS + d], k);
                }
            }
            for (var g = 0u; g < G; g++) {
                s[g] = dt[g] * p.scale;
            }
            va = ((blk * 2u + 1u) * p.block_tokens + slot) * kv4 + kvh * COLS;
        }
        vaddr[lid] = va;
        for (var g = 0u; g < G; g++) {
            red[g * TILE + lid] = s[g];
        }
        workgroupBarrier();
        for (var st = TILE / 2u; st > 0u; st >>= 1u) {
            if (lid < st) {
                for (var g = 0u; g < G; g++) {
                    red[g * TILE + lid] = max(red[g * TILE + lid], red[g * TILE + lid + st]);
                }
            }
            workgroupBarrier();
        }
        var m_new: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            m_new[g] = max(m[g], red[g * TILE]);
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            var e = 0.0;
            if (pos < ctx) {
                e = exp(s[g] - m_new[g]);
            }
            sc[g * TILE + lid] = e;
            red[g * TILE + lid] = e;
        }
        workgroupBarrier();
        for (var st = TILE / 2u; st > 0u; st >>= 1u) {
            if (lid < st) {
                for (var g = 0u; g < G; g++) {
                    red[g * TILE + lid] += red[g * TILE + lid + st];
                }
            }
            workgroupBarrier();
        }
        for (var g = 0u; g < G; g++) {
            let corr = exp(m[g] - m_new[g]);
            l[g] = l[g] * corr + red[g * TILE];
            acc[g] = acc[g] * corr;
            m[g] = m_new[g];
        }
        let n = min(TILE, ctx - t0);
        if (grp < GROUPS) {
            for (var k = 0u; k < PER_GROUP; k++) {
                let j = grp + k * GROUPS;
                if (j < n) {
                    let v = kv[vaddr[j] + c];
                    for (var g = 0u; g < G; g++) {
                        acc[g] += sc[g * TILE + j] * v;
                    }
                }
            }
        }
        workgroupBarrier();
    }
    // Each head's partial sums over the position groups, one head at a time.
    for (var g = 0u; g < G; g++) {
        part[lid] = acc[g];
        workgroupBarrier();
        if (lid < COLS) {
            var sum = vec4<f32>(0.0);
            for (var k = 0u; k < GROUPS; k++) {
                sum += part[k * COLS + lid];
            }
            let o = sum / l[g];
            let ob = i * p.n_heads * hd + (kvh * G + g) * hd + lid * 4u;
            out[ob] = o.x;
            out[ob + 1u] = o.y;
            out[ob + 2u] = o.z;
            out[ob + 3u] = o.w;
        }
        workgroupBarrier();
    }
}
