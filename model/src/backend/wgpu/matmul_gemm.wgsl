// A tiled matrix-matrix kernel for large passes (prefill, wide batches): a workgroup computes
// a BM-row by BN-token tile of y, stepping through the columns BK at a time. Each step stages
// the tile's weights (unpacked to f32) and activations in workgroup memory, then every thread
// accumulates its own TR x TN block of outputs in registers. Unlike matmul.wgsl and
// matmul_rows.wgsl, no partial sums cross threads, so there is no reduction per output: the
// work per weight is one multiply-add per token.
//
// W[r, c] = scale * u - min, read through matmul_common.wgsl's `wgroup` and `wscale`. Never used
// with NORM (larger passes run rms_norm.wgsl first); SWIGLU pairs stay within a thread's TR rows.

// No token-tile sums of squares here: the backend never fuses the norm into this kernel.
const_assert !NORM;

const BM: u32 = 64u;
const BN: u32 = 32u;
const BK: u32 = 32u;
const TR: u32 = 4u;
const TN: u32 = 2u;
// vec4s per staged row of BK columns.
const K4: u32 = BK / 4u;

// Weights column-major by vec4 (ws[k4 * BM + row]), so the threads of a warp, which own
// neighbouring row pairs, read neighbouring vec4s; activations token-major (xs[t * K4 + k4]),
// which a warp reads as two broadcasts.
var<workgroup> ws: array<vec4<f32>, 512>; // BM * K4
var<workgroup> xs: array<vec4<f32>, 256>; // BN * K4

// The block row of a thread's i-th row (i = 2h + e): rows come in pairs (2tr, 2tr + 1), the
// two pairs 32 apart, so a (gate, up) pair stays in one thread.
fn local_row(tr: u32, i: u32) -> u32 {
    return 2u * tr + 32u * (i / 2u) + i % 2u;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let tr = lid % (BM / TR);
    let tn = lid / (BM / TR);
    let r0 = wid.x * BM;
    let t0 = wid.y * BN;
    let groups = p.cols / 16u;
    let xrow = p.cols / 4u;
    let last = p.rows - 1u;
    var acc: array<f32, 8>; // TR * TN
    for (var i = 0u; i < TR * TN; i++) {
        acc[i] = 0.0;
    }
    // Software pipelining: step k0's tile is read from memory into registers during step
    // k0 - BK's arithmetic, then staged in workgroup memory, so the loads' latency overlaps
    // the multiply-adds instead of following them. Weights: BM rows x BK/16 groups, one
    // (row, group) per thread of the first 128; activations: BN tokens x K4 vec4s, one per
    // thread.
    let wrow = lid / (BK / 16u);
    let gl = lid % (BK / 16u);
    let loads_w = lid < BM * (BK / 16u);
    let tx = lid / K4;
    let c4 = lid % K4;
    var nsm = vec2<f32>(0.0);
    var nw = vec4<u32>(0u);
    var nvalid = false;
    var nx = vec4<f32>(0.0);
    // Step 0's tile.
    {
        let g = gl;
        nvalid = loads_w && g < groups;
        if (nvalid) {
            let src = min(r0 + wrow, last);
            nsm = wscale(src, g);
            nw = wgroup(src, g);
        }
        nx = vec4<f32>(0.0);
        if (t0 + tx < p.n_tok && c4 < xrow) {
            nx = x[(t0 + tx) * xrow + c4];
        }
    }
    for (var k0 = 0u; k0 < p.cols; k0 += BK) {
        if (loads_w) {
            let base = gl * 4u * BM + wrow;
            if (nvalid) {
                ws[base] = nsm.x * bytes(nw.x) - vec4<f32>(nsm.y);
                ws[base + BM] = nsm.x * bytes(nw.y) - vec4<f32>(nsm.y);
                ws[base + 2u * BM] = nsm.x * bytes(nw.z) - vec4<f32>(nsm.y);
                ws[base + 3u * BM] = nsm.x * bytes(nw.w) - vec4<f32>(nsm.y);
            } else {
                ws[base] = vec4<f32>(0.0);
                ws[base + BM] = vec4<f32>(0.0);
                ws[base + 2u * BM] = vec4<f32>(0.0);
                ws[base + 3u * BM] = vec4<f32>(0.0);
            }
        }
        xs[lid] = nx;
        workgroupBarrier();
        // The next step's tile, in flight during this step's arithmetic.
        let k1 = k0 + BK;
        if (k1 < p.cols) {
            let g = k1 / 16u + gl;
            nvalid = loads_w && g < groups;
            if (nvalid) {
                let src = min(r0 + wrow, last);
                nsm = wscale(src, g);
                nw = wgroup(src, g);
            }
            nx = vec4<f32>(0.0);
            if (t0 + tx < p.n_tok && k1 / 4u + c4 < xrow) {
                nx = x[(t0 + tx) * xrow + k1 / 4u + c4];
            }
        }
        for (var k = 0u; k < K4; k++) {
            let w0 = ws[k * BM + local_row(tr, 0u)];
            let w1 = ws[k * BM + local_row(tr, 1u)];
            let w2 = ws[k * BM + local_row(tr, 2u)];
            let w3 = ws[k * BM + local_row(tr, 3u)];
            for (var j = 0u; j < TN; j++) {
                let xv = xs[(tn * TN + j) * K4 + k];
                acc[j] += dot(w0, xv);
                acc[TN + j] += dot(w1, xv);
                acc[2u * TN + j] += dot(w2, xv);
                acc[3u * TN + j] += dot(w3, xv);
            }
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < TN; j++) {
        let t = t0 + tn * TN + j;
        if (t >= p.n_tok) {
            continue;
        }
        for (var i = 0u; i < TR; i++) {
            let r = r0 + local_row(tr, i);
            if (r >= p.rows) {
                continue;
            }
            let row = p.row_offset + r;
            let v = finish(acc[i * TN + j], t, row);
            if (!SWIGLU) {
                store(t, row, v);
            } else if (i % 2u == 1u) {
                let g = finish(acc[(i - 1u) * TN + j], t, row - 1u);
                y[t * p.y_stride + row / 2u] = silu_mul(g, v);
            }
        }
    }
}
