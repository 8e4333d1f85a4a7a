// out[o] = x[src] / sqrt(mean(x[src]^2) + eps) * w, one workgroup per output row j; src and o
// are j, or, when `use_sel` is set, sel[sel_from + j] and out_from + j (the norms of the rows
// whose logits or hidden states are wanted).

struct Params {
    n_rows: u32,
    d: u32,
    eps: f32,
    use_sel: u32,
    sel_from: u32,
    out_from: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> sel: array<u32>;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let j = wid.x;
    var src = j;
    var o = j;
    if (p.use_sel != 0u) {
        src = sel[p.sel_from + j];
        o = p.out_from + j;
    }
    let xb = src * p.d;
    var ss = 0.0;
    for (var i = lid; i < p.d; i += 256u) {
        let v = x[xb + i];
        ss += v * v;
    }
    red[lid] = ss;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(red[0] / f32(p.d) + p.eps);
    let ob = o * p.d;
    for (var i = lid; i < p.d; i += 256u) {
        out[ob + i] = x[xb + i] * scale * w[i];
    }
}
