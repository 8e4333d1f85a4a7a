// One row per LANES threads (64; for single tokens, as the backend is told): the kernel for
// single tokens (TT = 1) and small batches.
//
// W[r, c] = scale * u - min, every GGUF block format exactly, read a 16-weight group at a time
// through matmul_common.wgsl's `wgroup` and `wscale`. A workgroup computes ROWS_PER_WG rows for TT
// tokens: LANES threads split a row's 16-weight groups, each keeps TT partial sums, and a tree
// reduction in workgroup memory adds them. Reading a weight group once for TT tokens is what makes
// batched decoding cheaper per token than one token at a time.

const ROWS_PER_WG: u32 = WG / LANES;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = lid % LANES;
    let rsub = lid / LANES;
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
        for (var g = lane; g < groups; g += LANES) {
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
    for (var t = 0u; t < TT; t++) {
        red[t * WG + lid] = acc[t];
        if (NORM && rsub == 0u) {
            rss[t * LANES + lane] = ss[t];
        }
    }
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            for (var t = 0u; t < TT; t++) {
                red[t * WG + lid] += red[t * WG + lid + s];
            }
            if (NORM && rsub == 0u) {
                for (var t = 0u; t < TT; t++) {
                    rss[t * LANES + lane] += rss[t * LANES + lane + s];
                }
            }
        }
        workgroupBarrier();
    }
    let row = p.row_offset + r;
    if (SWIGLU) {
        // Pairs of row sets: (gate, up) rows r and r + 1 meet in workgroup memory.
        if (lane == 0u && r < p.rows) {
            for (var t = 0u; t < TT; t++) {
                red[t * WG + lid] = finish(red[t * WG + lid], t, row);
            }
        }
        workgroupBarrier();
        if (lane == 0u && r < p.rows && rsub % 2u == 0u) {
            for (var t = 0u; t < TT; t++) {
                if (t0 + t < p.n_tok) {
                    let a = silu_mul(red[t * WG + lid], red[t * WG + lid + LANES]);
                    y[(t0 + t) * p.y_stride + row / 2u] = a;
                }
            }
        }
        return;
    }
    if (lane == 0u && r < p.rows) {
        for (var t = 0u; t < TT; t++) {
            if (t0 + t < p.n_tok) {
                store(t0 + t, row, finish(red[t * WG + lid], t, row));
            }
        }
    }
}
