// Causal attention over the paged KV cache: one workgroup of 64 threads per (token, query
// head). The token attends to positions 0..=pos of its sequence, read through its block table,
// 64 positions at a time with an online softmax (running max and sum), so any context length
// fits in fixed workgroup memory.
//
// Per tile, each thread scores one position (a dot product over vec4 loads); then the 64
// threads split the weighted sum of values as (position group g, vec4 column c): with
// hd/4 columns there are 64 / (hd/4) groups, each summing every G-th position of the tile, and
// the groups' partial sums are added once at the end. Requires head_dim % 4 == 0 and
// head_dim <= 256.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    qkv_stride: u32,
    kv_dim: u32,
    scale: f32,
    block_tokens: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tok: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> tables: array<u32>;
@group(0) @binding(4) var<storage, read> kv: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const TILE: u32 = 64u;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<vec4<f32>, 64>;
var<workgroup> sc: array<f32, TILE>;
var<workgroup> red: array<f32, TILE>;
var<workgroup> part: array<vec4<f32>, TILE>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.x;
    let h = wid.y;
    let hd = p.head_dim;
    let cols = hd / 4u;
    let groups = TILE / cols;
    let c = lid % cols;
    let g = lid / cols;
    let kv4 = p.kv_dim / 4u;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let t = tok[i];
    let ctx = t.x + 1u;
    if (lid < cols) {
        let qb = i * p.qkv_stride + h * hd + lid * 4u;
        qs[lid] = vec4<f32>(qkv[qb], qkv[qb + 1u], qkv[qb + 2u], qkv[qb + 3u]);
    }
    workgroupBarrier();
    var m = NEG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var t0 = 0u; t0 < ctx; t0 += TILE) {
        let pos = t0 + lid;
        var s = NEG;
        if (pos < ctx) {
            let blk = tables[t.y + pos / p.block_tokens];
            let base = ((blk * 2u) * p.block_tokens + pos % p.block_tokens) * kv4 + kvh * cols;
            var dt = 0.0;
            for (var d = 0u; d < cols; d++) {
                dt += dot(qs[d], kv[base + d]);
            }
            s = dt * p.scale;
        }
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
        if (g < groups) {
            for (var j = g; j < n; j += groups) {
                let pj = t0 + j;
                let blk = tables[t.y + pj / p.block_tokens];
                let vb = ((blk * 2u + 1u) * p.block_tokens + pj % p.block_tokens) * kv4 + kvh * cols;
                a += sc[j] * kv[vb + c];
            }
        }
        acc = a;
        m = m_new;
        workgroupBarrier();
    }
    part[lid] = acc;
    workgroupBarrier();
    if (lid < cols) {
        var sum = vec4<f32>(0.0);
        for (var k = 0u; k < groups; k++) {
            sum += part[k * cols + lid];
        }
        let o = sum / l;
        let ob = i * p.n_heads * hd + h * hd + lid * 4u;
        out[ob] = o.x;
        out[ob + 1u] = o.y;
        out[ob + 2u] = o.z;
        out[ob + 3u] = o.w;
    }
}
