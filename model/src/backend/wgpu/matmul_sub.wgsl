// The matrix-vector kernel on subgroups ([`WgpuOptions::matvec_subgroups`]), for one token
// (TT = 1) or a tile of TT tokens: one row per 32 threads, eight rows a workgroup, and no tree
// of barriers. Each lane sums its share of the row's 16-weight groups for every token of the
// tile, reading each group once for all of them (and, with NORM, the sums of the activations'
// squares: every row's lanes see all of x, so each row takes each token's RMS itself); a
// token's 32 partial sums meet by butterfly shuffles within a subgroup (blocks of
// min(subgroup size, 32) lanes) and, where subgroups are smaller than 32 lanes (lavapipe's are
// 8), through workgroup memory after one barrier. Lanes are assumed to fill subgroups in
// invocation order, as on every Vulkan driver in use.
//
// W[r, c] = scale * u - min through matmul_common.wgsl's `wgroup` and `wscale`, as matmul.wgsl.
// Subgroup built-ins need the device's SUBGROUP feature (naga takes them without `enable`).

const ROW_LANES: u32 = 32u;
const ROWS_PER_WG: u32 = WG / ROW_LANES;

// Each block's (sum, sum of squares), by token of the tile, then block; then each row's
// finished values (SwiGLU), by token, then row of the workgroup. At TT = 8 the blocks take
// 16 KiB (room for subgroups of a single lane).
var<workgroup> blocks: array<vec2<f32>, WG * TT>;
var<workgroup> rowv: array<f32, ROWS_PER_WG * TT>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_size) sg: u32,
) {
    let lane = lid % ROW_LANES;
    let rsub = lid / ROW_LANES;
    let r = wid.x * ROWS_PER_WG + rsub;
    let t0 = wid.y * TT;
    var acc: array<f32, TT>;
    var ss: array<f32, TT>;
    for (var t = 0u; t < TT; t++) {
        acc[t] = 0.0;
        ss[t] = 0.0;
    }
    let groups = p.cols / 16u;
    if (r < p.rows) {
        for (var g = lane; g < groups; g += ROW_LANES) {
            let sm = wscale(r, g);
            let u = unpack16(wgroup(r, g));
            let gm = gam_group(g);
            for (var t = 0u; t < TT; t++) {
                if (t0 + t < p.n_tok) {
                    let a = acts(t0 + t, g, gm);
                    ss[t] += a.sq;
                    acc[t] += group_dot(u, sm, a);
                }
            }
        }
    }
    // For each token of the tile (the test is the same in the whole workgroup): a butterfly
    // within blocks of b lanes (offsets past the subgroup are discarded), then the row's
    // 32 / b blocks through workgroup memory.
    let b = min(sg, ROW_LANES);
    for (var t = 0u; t < TT; t++) {
        if (t0 + t < p.n_tok) {
            var v = vec2<f32>(acc[t], ss[t]);
            for (var off = ROW_LANES / 2u; off > 0u; off >>= 1u) {
                let o = subgroupShuffleXor(v, off);
                v = select(v, v + o, off < b);
            }
            if (lid % b == 0u) {
                blocks[t * WG + lid / b] = v;
            }
        }
    }
    workgroupBarrier();
    let per_row = ROW_LANES / b;
    let row = p.row_offset + r;
    if (lane == 0u) {
        for (var t = 0u; t < TT; t++) {
            if (t0 + t < p.n_tok) {
                var tot = vec2<f32>(0.0);
                for (var i = 0u; i < per_row; i++) {
                    tot += blocks[t * WG + rsub * per_row + i];
                }
                var val = tot.x;
                if (NORM) {
                    val *= 1.0 / sqrt(tot.y / f32(p.cols) + p.eps);
                }
                if (p.has_bias != 0u && r < p.rows) {
                    val += bias[row];
                }
                if (SWIGLU) {
                    rowv[t * ROWS_PER_WG + rsub] = val;
                } else if (r < p.rows) {
                    store(t0 + t, row, val);
                }
            }
        }
    }
    if (SWIGLU) {
        // (gate, up) rows r and r + 1 are neighbouring row sets of one workgroup.
        workgroupBarrier();
        if (lane == 0u && r < p.rows && rsub % 2u == 0u) {
            for (var t = 0u; t < TT; t++) {
                if (t0 + t < p.n_tok) {
                    let at = t * ROWS_PER_WG + rsub;
                    y[(t0 + t) * p.y_stride + row / 2u] = silu_mul(rowv[at], rowv[at + 1u]);
                }
            }
        }
    }
}
