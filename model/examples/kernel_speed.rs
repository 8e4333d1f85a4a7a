//! Throughput of the quantized matmul kernels on random weights (a development aid).
//!
//! Shapes are those of Qwen2.5-0.5B's live matrices. Options (env): `KS_TOKENS` (comma list of
//! token counts, default `1,4,8,32,128`), `KS_TYPES` (substring filter on the type names, e.g.
//! `Q8_0,Q6K`), `KS_SECS` (seconds per measurement, default 0.3).
use arbor_model::quant::{matmul, GgmlType, QMatrix, QuantizedActs, Storage};
use std::time::Instant;

fn main() {
    let tokens: Vec<usize> = std::env::var("KS_TOKENS")
        .unwrap_or_else(|_| "1,4,8,32,128".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let types = std::env::var("KS_TYPES").unwrap_or_default();
    let secs: f64 = std::env::var("KS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.3);
    let shapes = [
        (GgmlType::Q8_0, 896, 896),
        (GgmlType::Q8_0, 4864, 896),
        (GgmlType::Q5_0, 4864, 896),
        (GgmlType::Q5x4, 896, 896),
        (GgmlType::Q5x4, 4864, 896),
        (GgmlType::Q5x4, 151936, 896),
        (GgmlType::Q8_0, 151936, 896),
        (GgmlType::Q4K, 896, 4864),
        (GgmlType::Q6K, 896, 4864),
    ];
    for (ty, rows, cols) in shapes {
        if !types.is_empty()
            && !types
                .split(',')
                .any(|f| format!("{ty:?}").contains(f.trim()))
        {
            continue;
        }
        let n = rows * ty.row_bytes(cols);
        let mut bytes = vec![0u8; n];
        let mut s = 1u64;
        for b in bytes.iter_mut() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (s >> 40) as u8;
        }
        let scale = half::f16::from_f32(0.01).to_le_bytes();
        for blk in bytes.chunks_exact_mut(ty.block_bytes()) {
            let o = if ty == GgmlType::Q6K { 208 } else { 0 };
            blk[o..o + 2].copy_from_slice(&scale);
            if ty == GgmlType::Q4K {
                blk[2..4].copy_from_slice(&scale);
            }
            if ty == GgmlType::Q5x4 {
                for k in 1..4 {
                    blk[2 * k..2 * k + 2].copy_from_slice(&scale);
                }
            }
        }
        let w = QMatrix::new("w", ty, rows, cols, Storage::Owned(bytes.into())).unwrap();
        for &nt in &tokens {
            let x: Vec<f32> = (0..nt * cols).map(|i| (i as f32 * 0.01).sin()).collect();
            let a = QuantizedActs::quantize_for_type(ty, &x, nt, cols);
            let mut out = vec![0f32; nt * rows];
            matmul(&w, &a, &mut out);
            // Calibrate on one run, then take the best of several batches.
            let t = Instant::now();
            matmul(&w, &a, &mut out);
            let one = t.elapsed().as_secs_f64().max(1e-6);
            let iters = ((secs / 5.0 / one) as usize).max(1);
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..iters {
                    matmul(&w, &a, &mut out);
                }
                best = best.min(t.elapsed().as_secs_f64() / iters as f64);
            }
            println!(
                "{ty:?} {rows}x{cols} tokens={nt}: {:.3} ms, {:.1} GB/s weights, {:.1} GMAC/s",
                best * 1e3,
                n as f64 / best / 1e9,
                (rows * cols * nt) as f64 / best / 1e9
            );
        }
    }
}
