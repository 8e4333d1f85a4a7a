// Declarations shared by the matrix kernels (matmul.wgsl, matmul_rows.wgsl), which the backend
// prepends to each: the parameters, the bindings, the token tile TT, the reduction buffer and
// the unpacking of four weight bytes.

struct Params {
    rows: u32,
    cols: u32,
    n_tok: u32,
    y_stride: u32,
    row_offset: u32,
    accumulate: u32,
    has_bias: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> wsm: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;

const TT: u32 = __TT__u;
const LANES: u32 = 64u;
const WG: u32 = 256u;

var<workgroup> red: array<f32, __RED__>;

fn bytes(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(0xffu));
}
