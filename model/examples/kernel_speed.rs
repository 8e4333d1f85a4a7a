//! Throughput of the quantized matmul kernels on random weights (a development aid).
use arbor_model::quant::{matmul, GgmlType, QMatrix, QuantizedActs, Storage};
use std::time::Instant;

fn main() {
    for (ty, rows, cols) in [(GgmlType::Q5_0, 4864, 896), (GgmlType::Q8_0, 151936, 896), (GgmlType::Q4K, 4864, 1024), (GgmlType::Q6K, 896, 4864)] {
        let n = rows * ty.row_bytes(cols);
        let mut bytes = vec![0u8; n];
        let mut s = 1u64;
        for b in bytes.iter_mut() { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); *b = (s >> 40) as u8; }
        let bb = ty.block_bytes();
        for blk in bytes.chunks_exact_mut(bb) { let o = if ty == GgmlType::Q6K { 208 } else { 0 }; blk[o..o+2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes()); if ty == GgmlType::Q4K { blk[2..4].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes()); } }
        let w = QMatrix::new("w", ty, rows, cols, Storage::Owned(bytes.into())).unwrap();
        for nt in [1usize, 4, 32] {
            let x: Vec<f32> = (0..nt * cols).map(|i| (i as f32 * 0.01).sin()).collect();
            let a = QuantizedActs::quantize(&x, nt, cols);
            let mut out = vec![0f32; nt * rows];
            matmul(&w, &a, &mut out);
            let iters = (2_000_000_000 / (n * nt.min(8))).max(3);
            let t = Instant::now();
            for _ in 0..iters { matmul(&w, &a, &mut out); }
            let dt = t.elapsed().as_secs_f64() / iters as f64;
            println!("{ty:?} {rows}x{cols} tokens={nt}: {:.3} ms, {:.1} GB/s weights, {:.1} GMAC/s", dt * 1e3, n as f64 / dt / 1e9, (rows * cols * nt) as f64 / dt / 1e9);
        }
    }
}
