// Declarations shared by the matrix kernels (matmul.wgsl, matmul_rows.wgsl), which the backend
// prepends to each, after the compile-time switches NORM and SWIGLU: the parameters, the
// bindings, the token tile TT, the reduction buffers and the unpacking of four weight bytes.
//
// What the kernels compute, for each token t of the tile and each row r:
//   v = sum_c W[r, c] * x'[t, c] (+ bias[row_offset + r])
// where x' is x, or with NORM, x's RMS norm times `gam` (the layer's norm weight): the
// norm is fused into the product, the sum of squares taken from the activations the kernel
// reads anyway, and 1 / rms applied to the finished sum. Then
//   y[t, row_offset + r] (+)= v
// or with SWIGLU, where rows come in (gate, up) pairs (the backend interleaves the two
// matrices at upload): y[t, (row_offset + r) / 2] = silu(v_gate) * v_up.

struct Params {
    rows: u32,
    cols: u32,
    n_tok: u32,
    y_stride: u32,
    row_offset: u32,
    accumulate: u32,
    has_bias: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> wsm: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> gam: array<vec4<f32>>;

const TT: u32 = __TT__u;
// Threads sharing a row: 64, or for the single-token kernel [`WgpuOptions::matvec_lanes`].
const LANES: u32 = __LANES__u;
const WG: u32 = 256u;

var<workgroup> red: array<f32, __RED__>;
// Sums of squares of the tile's tokens, reduced over the first row set's lanes.
var<workgroup> rss: array<f32, __RSS__>;

fn bytes(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(0xffu));
}

fn silu_mul(g: f32, u: f32) -> f32 {
    return g / (1.0 + exp(-g)) * u;
}

// 1 / rms of token t of the tile (after the sum-of-squares reduction).
fn inv_rms(t: u32) -> f32 {
    return 1.0 / sqrt(rss[t * LANES] / f32(p.cols) + p.eps);
}

// The finished value of a row for token t: norm scale, then bias.
fn finish(v: f32, t: u32, row: u32) -> f32 {
    var o = v;
    if (NORM) {
        o *= inv_rms(t);
    }
    if (p.has_bias != 0u) {
        o += bias[row];
    }
    return o;
}

// Writes (or adds) a finished value; not used for SwiGLU pairs.
fn store(t: u32, row: u32, v: f32) {
    let i = t * p.y_stride + row;
    if (p.accumulate != 0u) {
        y[i] = y[i] + v;
    } else {
        y[i] = v;
    }
}
