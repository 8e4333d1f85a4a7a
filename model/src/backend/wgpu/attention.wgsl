// Causal attention over the paged KV cache: one workgroup per (token, query head). The token
// attends to positions 0..=pos of its sequence, read through its block table; positions are
// taken 64 at a time with an online softmax (running max and sum), so any context length fits
// in fixed workgroup memory.

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
@group(0) @binding(4) var<storage, read> kv: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const TILE: u32 = 64u;
const NEG: f32 = -3.0e38;

var<workgroup> qs: array<f32, 256>;
var<workgroup> sc: array<f32, TILE>;
var<workgroup> red: array<f32, TILE>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.x;
    let h = wid.y;
    let hd = p.head_dim;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let t = tok[i];
    let ctx = t.x + 1u;
    for (var d = lid; d < hd; d += TILE) {
        qs[d] = qkv[i * p.qkv_stride + h * hd + d];
    }
    workgroupBarrier();
    var m = NEG;
    var l = 0.0;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var t0 = 0u; t0 < ctx; t0 += TILE) {
        let pos = t0 + lid;
        var s = NEG;
        if (pos < ctx) {
            let blk = tables[t.y + pos / p.block_tokens];
            let base = ((blk * 2u) * p.block_tokens + pos % p.block_tokens) * p.kv_dim + kvh * hd;
            var dt = 0.0;
            for (var d = 0u; d < hd; d++) {
                dt += qs[d] * kv[base + d];
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
        for (var k = 0u; k < 4u; k++) {
            let d = lid + k * TILE;
            if (d < hd) {
                var a = acc[k] * corr;
                for (var j = 0u; j < n; j++) {
                    let pj = t0 + j;
                    let blk = tables[t.y + pj / p.block_tokens];
                    let vb = ((blk * 2u + 1u) * p.block_tokens + pj % p.block_tokens) * p.kv_dim + kvh * hd;
                    a += sc[j] * kv[vb + d];
                }
                acc[k] = a;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    let q_dim = p.n_heads * hd;
    for (var k = 0u; k < 4u; k++) {
        let d = lid + k * TILE;
        if (d < hd) {
            out[i * q_dim + h * hd + d] = acc[k] / l;
        }
    }
}
