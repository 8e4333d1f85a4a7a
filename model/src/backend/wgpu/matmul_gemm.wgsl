// A tiled matrix-matrix kernel for large passes (prefill, wide batches): a workgroup computes
// a BM-row by BN-token tile of y, stepping through the columns BK at a time. Each step stages
// the tile's weights (unpacked to f32) and activations in workgroup memory, then every thread
// accumulates its own TR x TN block of outputs in registers. Unlike matmul.wgsl and
// matmul_rows.wgsl, no partial sums cross threads, so there is no reduction per output: the
// work per weight is one multiply-add per token.
//
// W[r, c] = scale * u - min, read through matmul_common.wgsl's `wgroup` and `wscale`. Never used
// with NORM (larger passes run rms_norm.wgsl first); SWIGLU pairs stay within a thread's TR rows.
// With SPLIT, workgroup z sums only columns [z * k_split, (z + 1) * k_split) and writes its raw
// partial sums for matmul_reduce.wgsl to add up and finish.

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

// A thread's share of step k0's tile, read from memory: one weight group (raw) if it is one
// of the first 128 threads and the group exists, and one vec4 of activations (zeros past the
// ends).
struct Tile {
    sm: vec2<f32>,
    w: vec4<u32>,
    valid: bool,
    x: vec4<f32>,
}

fn read_tile(k0: u32, lid: u32, r0: u32, t0: u32) -> Tile {
    var t = Tile(vec2<f32>(0.0), vec4<u32>(0u), false, vec4<f32>(0.0));
    let g = k0 / 16u + lid % (BK / 16u);
    t.valid = lid < BM * (BK / 16u) && g < p.cols / 16u;
    if (t.valid) {
        let src = min(r0 + lid / (BK / 16u), p.rows - 1u);
        t.sm = wscale(src, g);
        t.w = wgroup(src, g);
    }
    let tx = lid / K4;
    let c4 = lid % K4;
    if (t0 + tx < p.n_tok && k0 / 4u + c4 < p.cols / 4u) {
        t.x = x[(t0 + tx) * (p.cols / 4u) + k0 / 4u + c4];
    }
    return t;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let tr = lid % (BM / TR);
    let tn = lid / (BM / TR);
    let r0 = wid.x * BM;
    let t0 = wid.y * BN;
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
    let kb = select(0u, wid.z * p.k_split, SPLIT);
    let ke = select(p.cols, min(kb + p.k_split, p.cols), SPLIT);
    var nt = read_tile(kb, lid, r0, t0);
    for (var k0 = kb; k0 < ke; k0 += BK) {
        if (loads_w) {
            let base = gl * 4u * BM + wrow;
            if (nt.valid) {
                ws[base] = nt.sm.x * bytes(nt.w.x) - vec4<f32>(nt.sm.y);
                ws[base + BM] = nt.sm.x * bytes(nt.w.y) - vec4<f32>(nt.sm.y);
                ws[base + 2u * BM] = nt.sm.x * bytes(nt.w.z) - vec4<f32>(nt.sm.y);
                ws[base + 3u * BM] = nt.sm.x * bytes(nt.w.w) - vec4<f32>(nt.sm.y);
            } else {
                ws[base] = vec4<f32>(0.0);
                ws[base + BM] = vec4<f32>(0.0);
                ws[base + 2u * BM] = vec4<f32>(0.0);
                ws[base + 3u * BM] = vec4<f32>(0.0);
            }
        }
        xs[lid] = nt.x;
        workgroupBarrier();
        // The next step's tile, in flight during this step's arithmetic.
        if (k0 + BK < ke) {
            nt = read_tile(k0 + BK, lid, r0, t0);
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
            if (SPLIT) {
                y[(wid.z * p.n_tok + t) * p.rows + r] = acc[i * TN + j];
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
