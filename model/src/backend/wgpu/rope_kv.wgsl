// Rotary position embedding of each token's query and key heads (in place in the fused QKV
// rows), and the write of its rotated key and its value into the paged KV cache of this layer.
// One workgroup per token. `tok[i]` = (position, block-table offset, KV block, slot).
// KV layout per layer: [block][K=0 / V=1][slot][kv_dim].

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    qkv_stride: u32,
    kv_dim: u32,
    interleaved: u32,
    block_tokens: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> tok: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> kv: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.x;
    let half = p.head_dim / 2u;
    let t = tok[i];
    let q_dim = p.n_heads * p.head_dim;
    let row = i * p.qkv_stride;
    let kbase = ((t.z * 2u) * p.block_tokens + t.w) * p.kv_dim;
    let vbase = ((t.z * 2u + 1u) * p.block_tokens + t.w) * p.kv_dim;
    let pairs = (p.n_heads + p.n_kv_heads) * half;
    for (var idx = lid; idx < pairs; idx += 64u) {
        let head = idx / half;
        let j = idx % half;
        var a = j;
        var b = j + half;
        if (p.interleaved != 0u) {
            a = 2u * j;
            b = 2u * j + 1u;
        }
        // Key heads follow the query heads in the fused row, so one index covers both.
        let base = row + head * p.head_dim;
        let c = cs[i * half + j];
        let x0 = qkv[base + a];
        let x1 = qkv[base + b];
        let y0 = x0 * c.x - x1 * c.y;
        let y1 = x0 * c.y + x1 * c.x;
        qkv[base + a] = y0;
        qkv[base + b] = y1;
        if (head >= p.n_heads) {
            let kb = kbase + (head - p.n_heads) * p.head_dim;
            kv[kb + a] = y0;
            kv[kb + b] = y1;
        }
    }
    for (var e = lid; e < p.kv_dim; e += 64u) {
        kv[vbase + e] = qkv[row + q_dim + p.kv_dim + e];
    }
}
