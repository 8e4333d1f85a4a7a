// y[t, row_offset + r] (+)= sum_c W[r, c] * x[t, c] (+ bias[row_offset + r])
//
// W is stored as one unsigned byte per weight (`wq`, four to a word) and a (scale, min) pair per
// 16 weights (`wsm`), so that W[r, c] = scale * u - min; every GGUF block format unpacks to this
// exactly. A workgroup computes ROWS_PER_WG rows for TT tokens: LANES threads split a row's
// 16-weight groups, each keeps TT partial sums, and a tree reduction in workgroup memory adds
// them. Reading a weight group once for TT tokens is what makes batched decoding cheaper per
// token than one token at a time.

const ROWS_PER_WG: u32 = 4u;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let lane = lid % LANES;
    let rsub = lid / LANES;
    let r = wid.x * ROWS_PER_WG + rsub;
    let t0 = wid.y * TT;
    var acc: array<f32, TT>;
    for (var t = 0u; t < TT; t++) {
        acc[t] = 0.0;
    }
    let groups = p.cols / 16u;
    let xrow = p.cols / 4u;
    if (r < p.rows) {
        let gbase = r * groups;
        for (var g = lane; g < groups; g += LANES) {
            let sm = wsm[gbase + g];
            let w = wq[gbase + g];
            let w0 = bytes(w.x);
            let w1 = bytes(w.y);
            let w2 = bytes(w.z);
            let w3 = bytes(w.w);
            for (var t = 0u; t < TT; t++) {
                if (t0 + t < p.n_tok) {
                    let xb = (t0 + t) * xrow + g * 4u;
                    let x0 = x[xb];
                    let x1 = x[xb + 1u];
                    let x2 = x[xb + 2u];
                    let x3 = x[xb + 3u];
                    let d = dot(w0, x0) + dot(w1, x1) + dot(w2, x2) + dot(w3, x3);
                    let s = dot(x0 + x1 + x2 + x3, vec4<f32>(1.0));
                    acc[t] += sm.x * d - sm.y * s;
                }
            }
        }
    }
    for (var t = 0u; t < TT; t++) {
        red[t * WG + lid] = acc[t];
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
    if (lane == 0u && r < p.rows) {
        let row = p.row_offset + r;
        var b = 0.0;
        if (p.has_bias != 0u) {
            b = bias[row];
        }
        for (var t = 0u; t < TT; t++) {
            if (t0 + t < p.n_tok) {
                let i = (t0 + t) * p.y_stride + row;
                let v = red[t * WG + lid] + b;
                if (p.accumulate != 0u) {
                    y[i] = y[i] + v;
                } else {
                    y[i] = v;
                }
            }
        }
    }
}
