// The tensor-core form of matmul_gemm.wgsl, for adapters with cooperative matrices (16x16x16,
// f16 x f16 -> f32): a workgroup of four 32-wide subgroups computes a BM-row by BN-token tile
// of y, stepping through the columns BK at a time. Each step dequantizes the tile's weights to
// f16 and converts its activations to f16 in workgroup memory; each subgroup then multiplies
// its 16 rows by the tile's BN tokens with cooperative multiply-adds, accumulating in f32.
// The finished tile goes through workgroup memory to the same epilogue as the other kernels
// (bias, accumulate, SwiGLU pairs). With SPLIT, workgroup z sums only columns
// [z * k_split, (z + 1) * k_split) and writes its raw partial sums for matmul_reduce.wgsl.
//
// f16 overflow: activations are clamped to +-65504 before the conversion (as llama.cpp does);
// weights (scale * u - min) are far inside the range. Never used with NORM (larger passes run
// rms_norm.wgsl first). The backend prepends `enable f16; enable wgpu_cooperative_matrix;`.

const_assert !NORM;

const BM: u32 = 64u;
const BN: u32 = 32u;
const BK: u32 = 32u;
const F16_MAX: f32 = 65504.0;

// Weights row-major (ws[row * BK + k]), activations token-major (xs[t * BK + k], which is the
// product's B = x^T column-major), results column-major (cs[t * BM + row]).
var<workgroup> ws: array<f16, 2048>; // BM * BK
var<workgroup> xs: array<f16, 1024>; // BN * BK
var<workgroup> cs: array<f32, 2048>; // BM * BN

@compute @workgroup_size(128)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    // The backend takes this kernel only where subgroups are 32 wide.
    let sg = lid / 32u;
    let r0 = wid.x * BM;
    let t0 = wid.y * BN;
    let groups = p.cols / 16u;
    let xrow = p.cols / 4u;
    let last = p.rows - 1u;
    var c0 = coop_mat16x16<f32, C>();
    var c1 = coop_mat16x16<f32, C>();
    let kb = select(0u, wid.z * p.k_split, SPLIT);
    let ke = select(p.cols, min(kb + p.k_split, p.cols), SPLIT);
    for (var k0 = kb; k0 < ke; k0 += BK) {
        // Weights: BM rows x BK/16 groups of 16, one (row, group) per thread.
        {
            let row = lid / 2u;
            let gl = lid % 2u;
            let g = k0 / 16u + gl;
            let base = row * BK + gl * 16u;
            if (g < groups) {
                let src = min(r0 + row, last);
                let sm = wscale(src, g);
                let w = wgroup(src, g);
                let q = array<vec4<f32>, 4>(
                    sm.x * bytes(w.x) - vec4<f32>(sm.y),
                    sm.x * bytes(w.y) - vec4<f32>(sm.y),
                    sm.x * bytes(w.z) - vec4<f32>(sm.y),
                    sm.x * bytes(w.w) - vec4<f32>(sm.y),
                );
                for (var j = 0u; j < 4u; j++) {
                    let v = vec4<f16>(q[j]);
                    ws[base + 4u * j] = v.x;
                    ws[base + 4u * j + 1u] = v.y;
                    ws[base + 4u * j + 2u] = v.z;
                    ws[base + 4u * j + 3u] = v.w;
                }
            } else {
                for (var j = 0u; j < 16u; j++) {
                    ws[base + j] = f16(0.0);
                }
            }
        }
        // Activations: BN tokens x BK/4 vec4s, two per thread.
        for (var e = lid; e < BN * (BK / 4u); e += 128u) {
            let t = e / (BK / 4u);
            let c4 = e % (BK / 4u);
            var v = vec4<f32>(0.0);
            if (t0 + t < p.n_tok && k0 / 4u + c4 < xrow) {
                v = x[(t0 + t) * xrow + k0 / 4u + c4];
            }
            let h = vec4<f16>(clamp(v, vec4<f32>(-F16_MAX), vec4<f32>(F16_MAX)));
            let at = t * BK + c4 * 4u;
            xs[at] = h.x;
            xs[at + 1u] = h.y;
            xs[at + 2u] = h.z;
            xs[at + 3u] = h.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let ia = sg * 16u * BK + kk;
            let sa = BK;
            let a = coopLoadT<coop_mat16x16<f16, A>>(&ws[ia], sa);
            let ib0 = kk;
            let sb = BK;
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&xs[ib0], sb);
            c0 = coopMultiplyAdd(a, b0, c0);
            let ib1 = 16u * BK + kk;
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&xs[ib1], sb);
            c1 = coopMultiplyAdd(a, b1, c1);
        }
        workgroupBarrier();
    }
    {
        let ic0 = sg * 16u;
        let sc = BM;
        coopStore(c0, &cs[ic0], sc);
        let ic1 = 16u * BM + sg * 16u;
        coopStore(c1, &cs[ic1], sc);
    }
    workgroupBarrier();
    for (var e = lid; e < BM * BN; e += 128u) {
        let lt = e / BM;
        let lr = e % BM;
        let t = t0 + lt;
        let r = r0 + lr;
        if (t >= p.n_tok || r >= p.rows) {
            continue;
        }
        if (SPLIT) {
            y[(wid.z * p.n_tok + t) * p.rows + r] = cs[e];
            continue;
        }
        let row = p.row_offset + r;
        let v = finish(cs[e], t, row);
        if (!SWIGLU) {
            store(t, row, v);
        } else if (lr % 2u == 1u) {
            let g = finish(cs[e - 1u], t, row - 1u);
            y[t * p.y_stride + row / 2u] = silu_mul(g, v);
        }
    }
}
