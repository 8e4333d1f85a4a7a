// Several rows per thread: matmul.wgsl's batched kernel with register tiling over rows, for
// batches with enough rows to fill the GPU (the backend picks it by workgroup count).
//
// W[r, c] = scale * u - min, every GGUF block format exactly, read a 16-weight group at a time
// through matmul_common.wgsl's `wgroup` and `wscale`. A workgroup computes 4 * RT rows for TT
// tokens: four sets of LANES threads, each set on RT rows, split the rows' 16-weight groups; every
// thread keeps RT * TT partial sums, and a tree reduction in workgroup memory adds them, row by
// row. Reading a weight group once for TT tokens is what makes batched decoding cheaper per token
// than one token at a time; reading a token's activations once for RT rows keeps the loads of
// activations (TT of them per weight group) from dominating the batched kernel. RT is even, so a
// thread's rows hold whole (gate, up) pairs.

const RT: u32 = __RT__u;
const ROWS_PER_WG: u32 = 4u * RT;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = lid % LANES;
    let rsub = lid / LANES;
    let r0 = wid.x * ROWS_PER_WG + rsub * RT;
    let t0 = wid.y * TT;
    var acc: array<f32, __ACC__>;
    for (var i = 0u; i < RT * TT; i++) {
        acc[i] = 0.0;
    }
    var ss: array<f32, TT>;
    for (var t = 0u; t < TT; t++) {
        ss[t] = 0.0;
    }
    let groups = p.cols / 16u;
    // Rows past the end (in the last workgroup) read the last row and are never written, which
    // keeps every loop's bounds constant, so they unroll and the sums stay in registers.
    let last = p.rows - 1u;
    for (var g = lane; g < groups; g += LANES) {
        var sm: array<vec2<f32>, RT>;
        var w: array<vec4<u32>, RT>;
        for (var i = 0u; i < RT; i++) {
            let row = min(r0 + i, last);
            sm[i] = wscale(row, g);
            w[i] = wgroup(row, g);
        }
        let gm = gam_group(g);
        for (var t = 0u; t < TT; t++) {
            if (t0 + t < p.n_tok) {
                let a = acts(t0 + t, g, gm);
                ss[t] += a.sq;
                // Each row's weights decoded where they are used, not held for every token.
                for (var i = 0u; i < RT; i++) {
                    acc[i * TT + t] += group_dot(unpack16(w[i]), sm[i], a);
                }
            }
        }
    }
    if (NORM) {
        if (rsub == 0u) {
            for (var t = 0u; t < TT; t++) {
                rss[t * LANES + lane] = ss[t];
            }
        }
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s >>= 1u) {
            if (rsub == 0u && lane < s) {
                for (var t = 0u; t < TT; t++) {
                    rss[t * LANES + lane] += rss[t * LANES + lane + s];
                }
            }
            workgroupBarrier();
        }
    }
    var gate: array<f32, TT>;
    for (var i = 0u; i < RT; i++) {
        for (var t = 0u; t < TT; t++) {
            red[t * WG + lid] = acc[i * TT + t];
        }
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s >>= 1u) {
            if (lane < s) {
                for (var t = 0u; t < TT; t++) {
                    red[t * WG + lid] += red[t * WG + lid + s];
                }
            }
            workgroupBarrier();
        }
        if (lane == 0u && r0 + i < p.rows) {
            let row = p.row_offset + r0 + i;
            for (var t = 0u; t < TT; t++) {
                if (t0 + t < p.n_tok) {
                    let v = finish(red[t * WG + lid], t, row);
                    if (!SWIGLU) {
                        store(t0 + t, row, v);
                    } else if (i % 2u == 0u) {
                        gate[t] = v;
                    } else {
                        y[(t0 + t) * p.y_stride + row / 2u] = silu_mul(gate[t], v);
                    }
                }
            }
        }
        workgroupBarrier();
    }
}
