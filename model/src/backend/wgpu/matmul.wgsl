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
    let xrow = p.cols / 4u;
    if (r < p.rows) {
        for (var g = lane; g < groups; g += LANES) {
            let sm = wscale(r, g);
            let w = wgroup(r, g);
            let w0 = bytes(w.x);
            let w1 = bytes(w.y);
            let w2 = bytes(w.z);
            let w3 = bytes(w.w);
            var g0 = vec4<f32>(1.0);
            var g1 = g0;
            var g2 = g0;
            var g3 = g0;
            if (NORM) {
                g0 = gam[g * 4u];
                g1 = gam[g * 4u + 1u];
                g2 = gam[g * 4u + 2u];
                g3 = gam[g * 4u + 3u];
            }
            for (var t = 0u; t < TT; t++) {
                if (t0 + t < p.n_tok) {
                    let xb = (t0 + t) * xrow + g * 4u;
                    var x0 = x[xb];
                    var x1 = x[xb + 1u];
                    var x2 = x[xb + 2u];
                    var x3 = x[xb + 3u];
                    if (NORM) {
                        ss[t] += dot(x0, x0) + dot(x1, x1) + dot(x2, x2) + dot(x3, x3);
                        x0 *= g0;
                        x1 *= g1;
                        x2 *= g2;
                        x3 *= g3;
                    }
                    let d = dot(w0, x0) + dot(w1, x1) + dot(w2, x2) + dot(w3, x3);
                    let s = dot(x0 + x1 + x2 + x3, vec4<f32>(1.0));
                    acc[t] += sm.x * d - sm.y * s;
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
