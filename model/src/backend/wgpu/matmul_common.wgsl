// Declarations shared by the matrix kernels (matmul.wgsl, matmul_rows.wgsl, matmul_gemm.wgsl,
// matmul_coop.wgsl), which the backend prepends to each, after the compile-time switches NORM,
// SWIGLU, SPLIT (the tiled kernels only: see matmul_reduce.wgsl) and PACKED (weights of 4 to 6
// bits; false: 8): the parameters, the bindings, the token tile TT, the reduction buffers, and
// the decoding of the weights' storage formats (weights.rs `Format`) into one form: 16 weights
// as four words of four unsigned bytes, and their (scale, min) pair, W = scale * u - min.
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
    // The weights' format: bits a weight (4, 5, 6 or 8), bit 8 set for a (scale, min) pair per
    // 32 weights instead of 16, bit 9 for pairs as two f16 instead of two f32.
    fmt: u32,
    // Columns a workgroup sums when the kernel is compiled with SPLIT (matmul_reduce.wgsl).
    k_split: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> wsm: array<vec2<u32>>;
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

// Four nibbles (bits 0..16) as the low halves of four bytes.
fn spread4(n: u32) -> u32 {
    return (n & 0xfu) | ((n & 0xf0u) << 4u) | ((n & 0xf00u) << 8u) | ((n & 0xf000u) << 12u);
}

// Four bits (0..4) as bit 0 of four bytes.
fn spread1(b: u32) -> u32 {
    return (b & 1u) | ((b & 2u) << 7u) | ((b & 4u) << 14u) | ((b & 8u) << 21u);
}

// Group g (16 weights) of row r of the chunk: weight j in byte j % 4 of word j / 4.
fn wgroup(r: u32, g: u32) -> vec4<u32> {
    let groups = p.cols / 16u;
    if (!PACKED) {
        return wq[r * groups + g];
    }
    let bits = p.fmt & 0xffu;
    // A 32-weight unit: its low nibbles in one 16-byte word, then bits - 4 bit planes.
    let unit = r * (groups / 2u) + g / 2u;
    let n = wq[unit];
    let half = g % 2u;
    let lo = select(n.xy, n.zw, half == 1u);
    var w = vec4<u32>(
        spread4(lo.x & 0xffffu),
        spread4(lo.x >> 16u),
        spread4(lo.y & 0xffffu),
        spread4(lo.y >> 16u),
    );
    let extra = bits - 4u;
    let planes = p.rows * (groups / 2u) * 4u;
    for (var k = 0u; k < extra; k++) {
        let at = planes + unit * extra + k;
        let h = wq[at / 4u][at % 4u] >> (half * 16u);
        let b = vec4<u32>(spread1(h), spread1(h >> 4u), spread1(h >> 8u), spread1(h >> 12u));
        w |= b << vec4<u32>(4u + k);
    }
    return w;
}

// The f16 in the low 16 bits of h, exactly (any finite value); by hand, since WGSL's
// unpack2x16float needs a capability some adapters lack.
fn half_to_f32(h: u32) -> f32 {
    let e = (h >> 10u) & 0x1fu;
    let m = f32((h & 0x3ffu) | select(0u, 0x400u, e != 0u));
    // m * 2^(max(e, 1) - 25): an 11-bit integer times a power of two, exact in f32.
    let v = m * bitcast<f32>((max(e, 1u) + 102u) << 23u);
    return select(v, -v, (h & 0x8000u) != 0u);
}

// The (scale, min) pair of group g of row r of the chunk.
fn wscale(r: u32, g: u32) -> vec2<f32> {
    let groups = p.cols / 16u;
    var e = r * groups + g;
    if ((p.fmt & 0x100u) != 0u) {
        e = r * (groups / 2u) + g / 2u;
    }
    if ((p.fmt & 0x200u) != 0u) {
        let two = wsm[e / 2u];
        let h = select(two.x, two.y, e % 2u == 1u);
        return vec2<f32>(half_to_f32(h & 0xffffu), half_to_f32(h >> 16u));
    }
    return bitcast<vec2<f32>>(wsm[e]);
}

// Group g's 16 norm weights with NORM (ones without), read once for every token of a tile.
fn gam_group(g: u32) -> array<vec4<f32>, 4> {
    if (NORM) {
        return array<vec4<f32>, 4>(gam[g * 4u], gam[g * 4u + 1u], gam[g * 4u + 2u], gam[g * 4u + 3u]);
    }
    return array<vec4<f32>, 4>(vec4<f32>(1.0), vec4<f32>(1.0), vec4<f32>(1.0), vec4<f32>(1.0));
}

// Token tk's 16 activations of group g as the matrix-vector kernels read them: `v`, x (with
// NORM, times the norm weights `gm`); `sum`, the sum of `v`, which the groups' minimums
// multiply; `sq`, the sum of x's squares (NORM only), of which the token's RMS is taken.
struct Acts {
    v: array<vec4<f32>, 4>,
    sum: f32,
    sq: f32,
}

fn acts(tk: u32, g: u32, gm: array<vec4<f32>, 4>) -> Acts {
    let xb = tk * (p.cols / 4u) + g * 4u;
    var a: Acts;
    a.sq = 0.0;
    for (var j = 0u; j < 4u; j++) {
        var v = x[xb + j];
        if (NORM) {
            a.sq += dot(v, v);
            v *= gm[j];
        }
        a.v[j] = v;
    }
    a.sum = dot(a.v[0] + a.v[1] + a.v[2] + a.v[3], vec4<f32>(1.0));
    return a;
}

// A group's 16 weights (`wgroup`'s bytes) as floats, decoded once for every token of a tile.
fn unpack16(w: vec4<u32>) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(bytes(w.x), bytes(w.y), bytes(w.z), bytes(w.w));
}

// The group's share of a row's sum for one token: scale * sum(u * v) - min * sum(v).
fn group_dot(u: array<vec4<f32>, 4>, sm: vec2<f32>, a: Acts) -> f32 {
    let d = dot(u[0], a.v[0]) + dot(u[1], a.v[1]) + dot(u[2], a.v[2]) + dot(u[3], a.v[3]);
    return sm.x * d - sm.y * a.sum;
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
