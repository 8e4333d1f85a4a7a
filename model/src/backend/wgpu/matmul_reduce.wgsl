// The second half of a product split over its columns (`WgpuOptions::split_k_workgroups`):
// `matmul_gemm.wgsl` or `matmul_coop.wgsl` compiled with SPLIT wrote one partial sum per
// column range s, token t and row r at part[(s * n_tok + t) * rows + r]; this adds them in
// order of s and finishes each output as the unsplit kernel would have (matmul_common.wgsl):
//   y[t, row_offset + r] (+)= sum_s part[s, t, r] (+ bias[row_offset + r])
// or with `swiglu`, rows in (gate, up) pairs: y[t, (row_offset + r) / 2] = silu(gate) * up.
// One thread an output.

struct Params {
    rows: u32,
    n_tok: u32,
    splits: u32,
    y_stride: u32,
    row_offset: u32,
    accumulate: u32,
    has_bias: u32,
    swiglu: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

fn total(t: u32, r: u32) -> f32 {
    var v = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        v += part[(s * p.n_tok + t) * p.rows + r];
    }
    if (p.has_bias != 0u) {
        v += bias[p.row_offset + r];
    }
    return v;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let per_token = select(p.rows, p.rows / 2u, p.swiglu != 0u);
    let i = gid.x;
    if (i >= p.n_tok * per_token) {
        return;
    }
    let t = i / per_token;
    let j = i % per_token;
    if (p.swiglu != 0u) {
        let g = total(t, 2u * j);
        let u = total(t, 2u * j + 1u);
        y[t * p.y_stride + (p.row_offset + 2u * j) / 2u] = g / (1.0 + exp(-g)) * u;
        return;
    }
    let at = t * p.y_stride + p.row_offset + j;
    let v = total(t, j);
    if (p.accumulate != 0u) {
        y[at] = y[at] + v;
    } else {
        y[at] = v;
    }
}
