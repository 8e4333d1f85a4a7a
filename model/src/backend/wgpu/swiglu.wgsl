// act[t, r] = silu(gu[t, r]) * gu[t, ffn + r], from the fused gate|up product.

struct Params {
    n: u32,
    ffn: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> act: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = p.n * p.ffn;
    for (var e = gid.x; e < total; e += nwg.x * 256u) {
        let t = e / p.ffn;
        let r = e % p.ffn;
        let g = gu[t * 2u * p.ffn + r];
        let u = gu[t * 2u * p.ffn + p.ffn + r];
        act[e] = g / (1.0 + exp(-g)) * u;
    }
}
