// The single-token kernel on subgroups ([`WgpuOptions::matvec_subgroups`]): one row per 32
// threads, eight rows a workgroup, and no tree of barriers. Each lane sums its share of the
// row's 16-weight groups (and, with NORM, of the activations' squares: every row's lanes see
// all of x, so each row takes its own RMS); the 32 partial sums meet by butterfly shuffles
// within a subgroup (blocks of min(subgroup size, 32) lanes) and, where subgroups are smaller
// than 32 lanes (lavapipe's are 8), through workgroup memory after one barrier. Lanes are
// assumed to fill subgroups in invocation order, as on every Vulkan driver in use.
//
// W[r, c] = scale * u - min through matmul_common.wgsl's `wgroup` and `wscale`, as matmul.wgsl.
// Subgroup built-ins need the device's SUBGROUP feature (naga takes them without `enable`).

const ROW_LANES: u32 = 32u;
const ROWS_PER_WG: u32 = WG / ROW_LANES;

// Each block's (sum, sum of squares), by block; then each row's finished value (SwiGLU).
var<workgroup> blocks: array<vec2<f32>, WG>;
var<workgroup> rowv: array<f32, ROWS_PER_WG>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_size) sg: u32,
) {
    let lane = lid % ROW_LANES;
    let rsub = lid / ROW_LANES;
    let r = wid.x * ROWS_PER_WG + rsub;
    var acc = 0.0;
    var ss = 0.0;
    let groups = p.cols / 16u;
    if (r < p.rows) {
        for (var g = lane; g < groups; g += ROW_LANES) {
            let sm = wscale(r, g);
            let w = wgroup(r, g);
            var x0 = x[g * 4u];
            var x1 = x[g * 4u + 1u];
            var x2 = x[g * 4u + 2u];
            var x3 = x[g * 4u + 3u];
            if (NORM) {
                ss += dot(x0, x0) + dot(x1, x1) + dot(x2, x2) + dot(x3, x3);
                x0 *= gam[g * 4u];
                x1 *= gam[g * 4u + 1u];
                x2 *= gam[g * 4u + 2u];
                x3 *= gam[g * 4u + 3u];
            }
            let d = dot(bytes(w.x), x0) + dot(bytes(w.y), x1) + dot(bytes(w.z), x2)
                + dot(bytes(w.w), x3);
            let s = dot(x0 + x1 + x2 + x3, vec4<f32>(1.0));
            acc += sm.x * d - sm.y * s;
        }
    }
    // Butterfly within blocks of b lanes (offsets past the subgroup are discarded), then the
    // row's 32 / b blocks through workgroup memory.
    let b = min(sg, ROW_LANES);
    var v = vec2<f32>(acc, ss);
    for (var off = ROW_LANES / 2u; off > 0u; off >>= 1u) {
        let o = subgroupShuffleXor(v, off);
        v = select(v, v + o, off < b);
    }
    if (lid % b == 0u) {
        blocks[lid / b] = v;
    }
    workgroupBarrier();
    let per_row = ROW_LANES / b;
    var tot = vec2<f32>(0.0);
    for (var i = 0u; i < per_row; i++) {
        tot += blocks[rsub * per_row + i];
    }
    let row = p.row_offset + r;
    var val = tot.x;
    if (NORM) {
        val *= 1.0 / sqrt(tot.y / f32(p.cols) + p.eps);
    }
    if (p.has_bias != 0u && r < p.rows) {
        val += bias[row];
    }
    if (SWIGLU) {
        // (gate, up) rows r and r + 1 are neighbouring row sets of one workgroup.
        if (lane == 0u) {
            rowv[rsub] = val;
        }
        workgroupBarrier();
        if (lane == 0u && r < p.rows && rsub % 2u == 0u) {
            y[row / 2u] = silu_mul(rowv[rsub], rowv[rsub + 1u]);
        }
        return;
    }
    if (lane == 0u && r < p.rows) {
        store(0u, row, val);
    }
}
