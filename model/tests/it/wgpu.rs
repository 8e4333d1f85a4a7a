//! The wgpu backend against the CPU backend (real model) and against the plain f32 reference
//! (tiny model). Without a GPU these run on Mesa's lavapipe, a software Vulkan driver, which
//! `.ci/run` installs. On a machine with no Vulkan driver at all they skip and say so, except
//! under `CI=true`, where a missing adapter fails them: CI never mistakes a broken driver setup
//! for a pass.

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::backend::wgpu::{WgpuBackend, WgpuOptions};
use arbor_model::sampling::{kept_weights, log_prob, pick, Draw};
use arbor_model::tiny::{TinyModel, D, VOCAB};
use arbor_model::{Engine, EngineOptions, ForwardEntry, HiddenLayer, Model};

fn skip() -> bool {
    if !arbor_model::backend::wgpu::adapters().is_empty() {
        return false;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| v != "0" && v != "false");
    assert!(
        !ci,
        "CI: no wgpu adapter; .ci/run installs mesa-vulkan-drivers for a software Vulkan driver"
    );
    eprintln!(
        "SKIPPED: no wgpu adapter on this machine (apt-get install mesa-vulkan-drivers gives a \
         software Vulkan driver); the wgpu backend tests did not run"
    );
    true
}

/// Whether batched products run on cooperative matrices on this adapter (never on lavapipe).
fn coop() -> bool {
    arbor_model::backend::wgpu::cooperative_matrix_available()
}

fn gpu_engine(model: &Model) -> Engine {
    gpu_engine_with(model, None, None)
}

fn gpu_engine_with(
    model: &Model,
    max_chunk_bytes: Option<u64>,
    tiled_min_workgroups: Option<u32>,
) -> Engine {
    let backend = gpu_backend(
        model,
        WgpuOptions {
            max_chunk_bytes,
            tiled_min_workgroups,
            ..Default::default()
        },
    )
    .expect("opening the wgpu adapter");
    eprintln!("wgpu adapter: {:?}", backend.adapter());
    Engine::new(Box::new(backend), EngineOptions::default())
}

/// A wgpu backend for `model` with `options`, a software adapter allowed.
fn gpu_backend(model: &Model, options: WgpuOptions) -> arbor_model::Result<WgpuBackend> {
    WgpuBackend::new(
        model.config.clone(),
        model.weights.clone(),
        &WgpuOptions {
            allow_software: true,
            ..options
        },
    )
}

/// The largest absolute difference between two equally long slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn cpu_engine(model: &Model) -> Engine {
    Engine::new(
        Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
        EngineOptions::default(),
    )
}

#[test]
fn wgpu_backend_matches_the_f32_reference_on_the_tiny_model() {
    if skip() {
        return;
    }
    for arch in ["qwen2", "llama"] {
        let dir =
            std::env::temp_dir().join(format!("arbor-wgpu-tiny-{arch}-{}", std::process::id()));
        let tiny = TinyModel::new(arch);
        tiny.write(&dir).unwrap();
        let model = Model::load(&dir).unwrap();
        // Long enough to span several KV blocks and two attention tiles (of 256 positions).
        let tokens: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 256).collect();
        let mut e = gpu_engine(&model);
        let s = e.new_sequence();
        let ours = e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
        let reference = tiny.reference_logits(&tokens);
        let scale = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let mut ce = cpu_engine(&model);
        let cs = ce.new_sequence();
        let cpu = ce.forward_all_logits(&[(cs, &tokens)]).unwrap().to_vec();
        let mut worst = 0f32;
        for (pos, row) in reference.iter().enumerate() {
            for (t, r) in row.iter().enumerate() {
                let o = ours[pos * VOCAB + t];
                assert!(o.is_finite(), "{arch} position {pos} token {t}: {o}");
                worst = worst.max((o - r).abs());
            }
        }
        let cpu_worst = reference.iter().enumerate().fold(0f32, |m, (pos, row)| {
            row.iter()
                .enumerate()
                .fold(m, |m, (t, r)| m.max((cpu[pos * VOCAB + t] - r).abs()))
        });
        // Both backends hold the same 8-bit weights; the GPU keeps activations in f32 where
        // the CPU rounds them to 8 bits, so its error must be no larger than the CPU's (which
        // the CPU's own test bounds by 5% of the logit scale).
        eprintln!("{arch}: worst logit error {worst}, CPU backend {cpu_worst} (scale {scale})");
        // Weight matrices split into chunks of at most 8 KiB and the logits of a pass into
        // slices of 7 rows (as on a device with a small storage binding): the same logits.
        let logits_with = |chunk: Option<u64>, tiled: Option<u32>| {
            let mut e = gpu_engine_with(&model, chunk, tiled);
            let s = e.new_sequence();
            e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec()
        };
        let small_chunks = Some((7 * VOCAB * 4) as u64);
        // On cooperative matrices (an H200, not lavapipe) a product of more than 32 tokens
        // takes its inputs in f16, so paths that split it differently agree to f16 rounding.
        let tol = if coop() { 0.01 * scale } else { 1e-4 };
        let diff = max_diff(&logits_with(small_chunks, None), &ours);
        assert!(diff <= tol, "{arch}: split pass differs by {diff}");
        // Every batched product on the kernel with several rows a thread (which a model this
        // small never gets by default); with the same small chunks, whose row counts (124, 60)
        // end mid-workgroup.
        let diff = max_diff(&logits_with(small_chunks, Some(0)), &ours);
        assert!(diff <= tol, "{arch}: tiled matrix kernel differs by {diff}");
        // Without the small chunks the pass keeps all 300 tokens, so every product of more
        // than 8 tokens runs on the tiled matrix-matrix kernel (`matmul_gemm.wgsl`).
        let diff = max_diff(&logits_with(None, Some(0)), &ours);
        assert!(
            diff <= tol,
            "{arch}: matrix-matrix kernel differs by {diff}"
        );
        // Cooperative matrices with 64-token tiles (`WgpuOptions::coop_tokens`) for the
        // products of 300 tokens: the same logits to f16 rounding. Only an adapter with
        // cooperative matrices (an H200) runs them; elsewhere the option changes nothing.
        let wide = {
            let backend = gpu_backend(
                &model,
                WgpuOptions {
                    coop_tokens: Some(64),
                    ..Default::default()
                },
            )
            .unwrap();
            let mut e = Engine::new(Box::new(backend), EngineOptions::default());
            let s = e.new_sequence();
            e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec()
        };
        let diff = max_diff(&wide, &ours);
        assert!(
            diff <= tol,
            "{arch}: 64-token cooperative tiles differ by {diff}"
        );
        assert!(
            worst <= 0.05 * scale && worst <= 1.1 * cpu_worst,
            "{arch}: worst logit error {worst} against the f32 reference (CPU backend {cpu_worst}, scale {scale})"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn decode_steps_match_the_prefill_of_the_same_tokens() {
    // A decode step (one token per sequence) rotates its keys and writes them to the cache
    // inside the attention kernel, and fuses the RMS norms into the products; a prefill runs
    // the separate kernels first. The two paths must give the same logits, for both RoPE
    // layouts, one sequence and forked ones (which copy a partly filled block and cross a
    // block boundary while decoding), and every matrix kernel (the interleaved-RoPE runs use
    // the several-rows kernel and small weight chunks).
    if skip() {
        return;
    }
    for arch in ["qwen2", "llama"] {
        for style in [
            arbor_model::RopeStyle::Neox,
            arbor_model::RopeStyle::Interleaved,
        ] {
            let dir = std::env::temp_dir()
                .join(format!("arbor-wgpu-decode-{arch}-{}", std::process::id()));
            TinyModel::new(arch).write(&dir).unwrap();
            let mut model = Model::load(&dir).unwrap();
            std::fs::remove_dir_all(&dir).ok();
            model.config.rope_style = style;
            let tokens: Vec<u32> = (0..40u32).map(|i| (i * 53 + 5) % 256).collect();
            let mut whole = gpu_engine(&model);
            let s = whole.new_sequence();
            let want = whole.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));

            let mut e = match style {
                arbor_model::RopeStyle::Neox => gpu_engine(&model),
                arbor_model::RopeStyle::Interleaved => {
                    gpu_engine_with(&model, Some((7 * VOCAB * 4) as u64), Some(0))
                }
            };
            let a = e.new_sequence();
            let first = e.forward(&[(a, &tokens[..20])]).unwrap().to_vec();
            let mut worst = max_diff(&first, &want[19 * VOCAB..20 * VOCAB]);
            let mut seqs = vec![a];
            for pos in 20..40 {
                if pos == 24 {
                    seqs.push(e.fork(a).unwrap());
                }
                let t = [tokens[pos]];
                let batch: Vec<_> = seqs.iter().map(|&q| (q, &t[..])).collect();
                let got = e.forward(&batch).unwrap().to_vec();
                let row = &want[pos * VOCAB..(pos + 1) * VOCAB];
                for seq in 0..seqs.len() {
                    let d = max_diff(&got[seq * VOCAB..(seq + 1) * VOCAB], row);
                    // The prefill's products run on cooperative matrices (f16 inputs) where
                    // the adapter has them; the decode steps' never do.
                    let tol = if coop() { 3e-3 } else { 1e-4 };
                    assert!(
                        d <= tol * scale.max(1.0),
                        "{arch} {style:?}: position {pos}, sequence {seq} differs by {d} (scale {scale})"
                    );
                    worst = worst.max(d);
                }
            }
            eprintln!("{arch} {style:?}: decode against prefill, worst {worst} (scale {scale})");
        }
    }
}

#[test]
fn profiling_counts_every_pass_and_kernel_without_changing_the_logits() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-profile-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    let backend = WgpuBackend::new(
        model.config.clone(),
        model.weights.clone(),
        &WgpuOptions {
            allow_software: true,
            profile: true,
            ..Default::default()
        },
    )
    .expect("opening the wgpu adapter");
    let profile = backend.profile().expect("profiling was asked for");
    let mut profiled = Engine::new(Box::new(backend), EngineOptions::default());
    let mut plain = gpu_engine(&model);
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 256).collect();
    let (a, b) = (profiled.new_sequence(), plain.new_sequence());
    let mut tokens = prompt.clone();
    for step in 0..3 {
        let feed: &[u32] = if step == 0 {
            &tokens
        } else {
            &tokens[tokens.len() - 1..]
        };
        let x = profiled.forward(&[(a, feed)]).unwrap().to_vec();
        let y = plain.forward(&[(b, feed)]).unwrap().to_vec();
        assert_eq!(x, y, "step {step}: profiling changed the logits");
        tokens.push(arbor_model::sampling::argmax(&x));
    }
    let p = arbor_model::backend::wgpu::PassProfile::take(&profile);
    eprintln!("{p}");
    assert_eq!(p.passes, 3);
    assert!(p.wait > std::time::Duration::ZERO, "{p:?}");
    // Timestamps inside passes are optional in wgpu; where the device has them, every
    // dispatch is counted under its role.
    if !p.kernels.is_empty() {
        let layers = arbor_model::tiny::LAYERS as u64;
        for (role, per_pass) in [
            ("qkv", layers),
            ("attention", layers),
            ("gate_up", layers),
            ("final_norm", 1),
            ("output", 1),
        ] {
            let count = p.kernels.get(role).map_or(0, |k| k.0);
            assert_eq!(count, 3 * per_pass, "{role} dispatches in {p:?}");
        }
        assert!(p.gpu_span > std::time::Duration::ZERO, "{p:?}");
    } else {
        eprintln!("this adapter has no timestamp queries inside passes");
    }
    // Taken: the next read starts from zero.
    assert_eq!(
        arbor_model::backend::wgpu::PassProfile::take(&profile).passes,
        0
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wgpu_hidden_states_match_the_f32_reference_on_the_tiny_model() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-hidden-{}", std::process::id()));
    let tiny = TinyModel::new("qwen2");
    tiny.write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 53 + 5) % 256).collect();
    // A middle block's state, the final one, and the last block's without the norm's weight,
    // read in one pass.
    let layers = [
        HiddenLayer::Block(0),
        HiddenLayer::Final,
        HiddenLayer::Block(1),
    ];
    let references: Vec<Vec<Vec<f32>>> = layers
        .iter()
        .map(|&l| tiny.reference_hidden_at(&tokens, l))
        .collect();
    let at = [0u32, 17, 39];
    let rel = |e: &mut Engine| -> Vec<f32> {
        e.set_hidden_layers(&layers).unwrap();
        let s = e.new_sequence();
        let out = e
            .forward_at(&[ForwardEntry::hidden_at(s, &tokens, &at)])
            .unwrap()
            .hidden
            .to_vec();
        assert_eq!(out.len(), at.len() * layers.len() * D);
        let wanted = at
            .iter()
            .flat_map(|&p| references.iter().map(move |r| &r[p as usize]));
        wanted
            .zip(out.chunks(D))
            .map(|(want, got)| {
                let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
                let err = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                err / norm
            })
            .collect()
    };
    let gpu = rel(&mut gpu_engine(&model));
    let cpu = rel(&mut cpu_engine(&model));
    eprintln!("relative L2 error of hidden states: gpu {gpu:?}, cpu {cpu:?}");
    for (g, c) in gpu.iter().zip(&cpu) {
        // Only the weights are quantized on the GPU (2-3% here); the CPU also rounds its
        // activations, so the GPU is no further from the reference than the CPU.
        assert!(
            *g <= 0.05 && *g <= c * 1.1 + 1e-4,
            "gpu {gpu:?} cpu {cpu:?}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Largest |a - b| and the positions where the argmax differs beyond a near-tie.
fn compare(cpu: &[f32], gpu: &[f32], vocab: usize, tol: f32, what: &str) -> f32 {
    assert_eq!(cpu.len(), gpu.len(), "{what}: output sizes differ");
    let mut worst = 0f32;
    for (row, (c, g)) in cpu.chunks(vocab).zip(gpu.chunks(vocab)).enumerate() {
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        };
        let (ci, _) = argmax(c);
        let (gi, gv) = argmax(g);
        if ci != gi {
            // A near-tie may break either way: the GPU's logit for the CPU's choice must then
            // be within the tolerance of its own best.
            assert!(
                gv - g[ci] <= tol,
                "{what} row {row}: argmax {gi} on the GPU, {ci} on the CPU, gap {}",
                gv - g[ci]
            );
        }
        for (a, b) in c.iter().zip(g) {
            assert!(b.is_finite(), "{what} row {row}: non-finite logit");
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst <= tol,
        "{what}: worst logit difference {worst} > {tol}"
    );
    worst
}

#[test]
fn wgpu_backend_agrees_with_the_cpu_backend_on_the_real_model() {
    if skip() {
        return;
    }
    let model = super::model();
    let vocab = model.config.vocab_size;
    // The same tolerance the CPU backend meets against llama.cpp: both quantize differently
    // (the CPU backend rounds activations to 8 bits, the GPU keeps them in f32).
    const TOL: f32 = 0.75;
    let prompt = model
        .tokenizer
        .encode(
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
            false,
        )
        .unwrap();
    let mut cpu = cpu_engine(model);
    let mut gpu = gpu_engine(model);
    let (sc, sg) = (cpu.new_sequence(), gpu.new_sequence());
    let a = cpu.forward_all_logits(&[(sc, &prompt)]).unwrap().to_vec();
    let b = gpu.forward_all_logits(&[(sg, &prompt)]).unwrap().to_vec();
    let worst = compare(&a, &b, vocab, TOL, "prefill");
    eprintln!(
        "prefill of {} tokens: worst difference {worst}",
        prompt.len()
    );

    // Fork three children off the prompt (they share its KV blocks, and the partly filled last
    // block is copied on write) and decode them together, each with its own tokens.
    let kids_c: Vec<_> = (0..3).map(|_| cpu.fork(sc).unwrap()).collect();
    let kids_g: Vec<_> = (0..3).map(|_| gpu.fork(sg).unwrap()).collect();
    let steps: [[u32; 3]; 2] = [[576, 1156, 220], [16, 17, 18]];
    for (k, step) in steps.iter().enumerate() {
        let ec: Vec<(_, &[u32])> = kids_c
            .iter()
            .zip(step)
            .map(|(s, t)| (*s, std::slice::from_ref(t)))
            .collect();
        let eg: Vec<(_, &[u32])> = kids_g
            .iter()
            .zip(step)
            .map(|(s, t)| (*s, std::slice::from_ref(t)))
            .collect();
        let a = cpu.forward(&ec).unwrap().to_vec();
        let b = gpu.forward(&eg).unwrap().to_vec();
        let worst = compare(&a, &b, vocab, TOL, &format!("forked decode step {k}"));
        eprintln!("forked decode step {k}: worst difference {worst}");
    }
    // Hidden states at chosen offsets (the reward heads read these).
    let tail = [30u32, 31, 32];
    let at = [0u32, 2];
    let hc = cpu
        .forward_at(&[ForwardEntry::hidden_at(kids_c[0], &tail, &at)])
        .unwrap()
        .hidden
        .to_vec();
    let hg = gpu
        .forward_at(&[ForwardEntry::hidden_at(kids_g[0], &tail, &at)])
        .unwrap()
        .hidden
        .to_vec();
    assert_eq!(hc.len(), 2 * model.config.d_model);
    // Per row, the relative L2 error between the backends. Each is a few percent from exact
    // f32 (the tiny-model test above: GPU up to 2.9%, CPU up to 4.8%, the CPU rounding its
    // activations to 8 bits), in different directions, so the two differ by up to the sum
    // (7.7% measured here); a wrong row or a missing norm would differ by ~100%.
    for (row, (c, g)) in hc
        .chunks(model.config.d_model)
        .zip(hg.chunks(model.config.d_model))
        .enumerate()
    {
        let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt();
        let err = c
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        eprintln!("hidden row {row}: relative L2 error {}", err / norm);
        assert!(
            err <= 0.15 * norm,
            "hidden row {row}: relative L2 error {} (|cpu| {norm})",
            err / norm
        );
    }
}

/// Draws covering every branch of the device sampler: greedy, plain temperature, top-k (1, a
/// few, many), top-p (narrow and wide), both together, and the uniform's ends.
fn draws(n: usize) -> Vec<Draw> {
    let mut rng = arbor_model::tiny::Rng(0x5eed);
    let temps = [0.0, 0.3, 0.8, 1.0, 2.5];
    let top_ks = [0u32, 0, 1, 3, 40];
    let top_ps = [1.0f32, 1.0, 0.9, 0.3];
    (0..n)
        .map(|i| Draw {
            temperature: temps[i % temps.len()],
            top_k: top_ks[(i / 2) % top_ks.len()],
            top_p: top_ps[(i / 3) % top_ps.len()],
            uniform: match i % 11 {
                0 => 0.0,
                1 => 0.999_999,
                _ => (rng.next_f32() + 0.25) * 2.0,
            },
        })
        .collect()
}

/// Decodes one token after `prompt` in `1 + n` forks of one sequence, all in one pass: the
/// first returns its logits, the others are picked on the device with [`draws`]. The forks'
/// rows are the same computation, so each device pick must equal the host reference's pick on
/// the returned logits.
fn check_device_picks(e: &mut Engine, prompt: &[u32], next: u32, n: usize, what: &str) {
    let root = e.new_sequence();
    e.forward(&[(root, prompt)]).unwrap();
    let forks: Vec<_> = (0..=n + 1).map(|_| e.fork(root).unwrap()).collect();
    let ds = draws(n);
    let tok = [next];
    let at = [0u32];
    let mut entries = vec![ForwardEntry::logits_at(forks[0], &tok, &at)];
    entries.extend(
        forks[1..=n]
            .iter()
            .zip(&ds)
            .map(|(&s, d)| ForwardEntry::sampled(s, &tok, d)),
    );
    // The last fork draws all of them from its one row, as a prompt's samples do.
    entries.push(ForwardEntry::sampled_n(forks[n + 1], &tok, &ds));
    let out = e.forward_at(&entries).unwrap();
    let (logits, mut picks) = (out.logits.to_vec(), out.picks.to_vec());
    assert_eq!(picks.len(), 2 * n, "{what}: one pick per draw");
    let from_one_row = picks.split_off(n);
    assert_eq!(
        from_one_row, picks,
        "{what}: draws from one row pick as the same draws from rows of their own"
    );
    let mut distinct = std::collections::HashSet::new();
    let mut inexact = 0;
    for (j, (d, &(token, lp))) in ds.iter().zip(&picks).enumerate() {
        let (want, want_lp) = pick(&logits, d);
        if token != want {
            // Allowed only where the uniform falls within rounding of the boundary between
            // the two tokens: the device's token's cumulative interval, under the reference's
            // f64 sums, must reach the uniform within 1e-5 (the device sums in f32).
            let w = kept_weights(&logits, d);
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            let before: f64 = w[..token as usize].iter().map(|&x| x as f64).sum::<f64>() / total;
            let after = before + w[token as usize] as f64 / total;
            let u = d.uniform as f64;
            assert!(
                w[token as usize] > 0.0 && u >= before - 1e-5 && u <= after + 1e-5,
                "{what}: draw {j} {d:?} picked {token} (mass {before}..{after}) on the device, \
                 {want} on the host"
            );
            // The probes of the mass's ends (uniform 0 and 0.999999) sit where f32 rounding
            // of the total decides: they may differ, within rounding, without counting.
            if d.uniform > 0.0 && d.uniform < 0.999 {
                inexact += 1;
            }
        }
        let lp_want = if token == want {
            want_lp
        } else {
            log_prob(&logits, token)
        };
        assert!(
            (lp - lp_want).abs() <= 1e-4 * lp_want.abs().max(1.0),
            "{what}: draw {j}: log-prob {lp} on the device, {lp_want} on the host"
        );
        distinct.insert(token);
    }
    assert!(
        inexact * 10 <= n,
        "{what}: {inexact} of {n} picks inside the mass differ from the reference (each \
         within rounding)"
    );
    // The draws must exercise the sampler, not all land on the argmax.
    assert!(
        distinct.len() >= 4,
        "{what}: only {} distinct tokens picked",
        distinct.len()
    );
    for s in forks.into_iter().chain([root]) {
        e.free(s);
    }
}

/// The host's picks (the CPU backend): several draws from one entry's row, interleaved with
/// another row's, each equal to the reference pick on its own row's logits.
#[test]
fn host_picks_of_several_draws_from_one_row_equal_the_reference() {
    let dir = std::env::temp_dir().join(format!("arbor-host-pick-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let mut e = cpu_engine(&model);
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 256).collect();
    let root = e.new_sequence();
    e.forward(&[(root, &prompt)]).unwrap();
    let forks: Vec<_> = (0..4).map(|_| e.fork(root).unwrap()).collect();
    let ds = draws(12);
    let (seven, nine, at) = ([7u32], [9u32], [0u32]);
    let entries = [
        ForwardEntry::sampled_n(forks[0], &seven, &ds[..10]),
        ForwardEntry::sampled(forks[1], &nine, &ds[10]),
        ForwardEntry::logits_at(forks[2], &seven, &at),
        ForwardEntry::logits_at(forks[3], &nine, &at),
    ];
    let out = e.forward_at(&entries).unwrap();
    let vocab = model.config.vocab_size;
    let (row7, row9) = out.logits.split_at(vocab);
    assert_eq!(out.picks.len(), 11);
    for (j, d) in ds[..10].iter().enumerate() {
        assert_eq!(out.picks[j], pick(row7, d), "draw {j} from the first row");
    }
    assert_eq!(out.picks[10], pick(row9, &ds[10]), "the other row's draw");
}

#[test]
fn device_picks_equal_the_host_reference() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-pick-{}", std::process::id()));
    let tiny = TinyModel::new("qwen2");
    tiny.write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    let prompt: Vec<u32> = (0..20u32).map(|i| (i * 37 + 11) % 256).collect();
    check_device_picks(&mut gpu_engine(&model), &prompt, 7, 96, "tiny model");
    // Sampled rows split over several slices of a pass (a device with a small binding).
    let mut small = gpu_engine_with(&model, Some((5 * VOCAB * 4) as u64), None);
    check_device_picks(&mut small, &prompt, 7, 24, "tiny model, 5 rows a slice");
    std::fs::remove_dir_all(&dir).ok();
    // The real vocabulary (151,936 tokens, 594 a thread).
    let real = super::model();
    let prompt = real
        .tokenizer
        .encode("Natalia sold clips to 48 of her friends", false)
        .unwrap();
    check_device_picks(&mut gpu_engine(real), &prompt, 304, 16, "real model");
}

/// The wgpu backend drops its pass buffers (device memory and the host-visible read-back copy)
/// on `release_scratch` and makes them again for the next pass, which gives the same logits.
#[test]
fn wgpu_pass_buffers_are_given_back_and_made_again() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-release-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    let mut e = gpu_engine(&model);
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 256).collect();
    let run = |e: &mut Engine| {
        let s = e.new_sequence();
        let logits = e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
        e.free(s);
        logits
    };
    let first = run(&mut e);
    let grown = e.scratch_bytes();
    assert!(grown >= 2 * 40 * VOCAB * 4, "{grown} bytes of scratch");
    e.release_scratch(0);
    assert_eq!(e.scratch_bytes(), 0);
    let again = run(&mut e);
    assert!(
        first == again,
        "the logits changed after the buffers were made again"
    );
    assert!(e.scratch_bytes() >= grown / 2);
    std::fs::remove_dir_all(&dir).ok();
}

/// The dispatch-floor probe the backends bench prints: its chain of dependent dispatches
/// counts every one (the probe fails if two overlapped) and its costs are finite.
#[test]
fn the_dispatch_floor_chain_counts_every_dispatch() {
    if skip() {
        return;
    }
    let f = arbor_model::backend::wgpu::dispatch_floor(true, 64).unwrap();
    assert_eq!(f.dispatches, 64);
    assert!(
        f.us_per_dispatch.is_finite() && f.us_per_pass.is_finite() && f.us_per_round_trip > 0.0,
        "{f}"
    );
}

/// The single-token kernel with 8, 16 or 32 threads a row (`WgpuOptions::matvec_lanes`, a
/// tuning knob), and the rows kernel with 2, 4 or 8 rows a thread (`matvec_rows`), give the
/// 64-thread kernel's logits on decode steps, the fused norm and SwiGLU variants included, up
/// to f32 summation order; a count they cannot run is refused.
#[test]
fn the_single_token_kernel_agrees_at_every_lane_count() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-lanes-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let tokens: Vec<u32> = (0..24u32).map(|i| (i * 29 + 3) % 256).collect();
    // 16 tokens prefilled, then one decode step a token: every step's logits.
    let decode_on = |backend: WgpuBackend| {
        let mut e = Engine::new(Box::new(backend), EngineOptions::default());
        let s = e.new_sequence();
        e.forward(&[(s, &tokens[..16])]).unwrap();
        let mut out = Vec::new();
        for &t in &tokens[16..] {
            out.extend_from_slice(e.forward(&[(s, &[t][..])]).unwrap());
        }
        out
    };
    let decode = |lanes: u32, rows: u32| {
        let backend = WgpuBackend::new(
            model.config.clone(),
            model.weights.clone(),
            &WgpuOptions {
                allow_software: true,
                matvec_lanes: Some(lanes),
                matvec_rows: Some(rows),
                // The tiny model's matrices are small: take the rows kernel on every one.
                tiled_min_workgroups: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        decode_on(backend)
    };
    let want = decode(64, 1);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for lanes in [8, 16, 32] {
        let d = max_diff(&decode(lanes, 1), &want);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{lanes} lanes: differs by {d} (scale {scale})"
        );
    }
    // The rows kernel for single tokens, at each rows-a-thread count.
    for rows in [2, 4, 8] {
        let d = max_diff(&decode(64, rows), &want);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{rows} rows a thread: differs by {d} (scale {scale})"
        );
    }
    // The subgroup kernel (lavapipe's subgroups are 8 lanes, so its sums also cross
    // subgroups through workgroup memory).
    let sub = WgpuBackend::new(
        model.config.clone(),
        model.weights.clone(),
        &WgpuOptions {
            allow_software: true,
            matvec_subgroups: true,
            ..Default::default()
        },
    )
    .unwrap();
    if sub.matvec_subgroups() {
        let d = max_diff(&decode_on(sub), &want);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "subgroups: differs by {d} (scale {scale})"
        );
    } else {
        eprintln!("this adapter has no subgroups: the subgroup kernel did not run");
    }
    // Counts a kernel cannot run are refused, naming the option and what it takes (cooperative
    // products below a tile of tokens would need the fused norm they lack).
    for (options, field, takes) in [
        (
            WgpuOptions {
                matvec_lanes: Some(12),
                ..Default::default()
            },
            "matvec_lanes",
            "8, 16, 32 or 64",
        ),
        (
            WgpuOptions {
                matvec_rows: Some(3),
                ..Default::default()
            },
            "matvec_rows",
            "1, 2, 4 or 8",
        ),
        (
            WgpuOptions {
                coop_min_tokens: Some(0),
                ..Default::default()
            },
            "coop_min_tokens",
            "1 (cooperative from 2 tokens) to 4096",
        ),
    ] {
        let err = gpu_backend(&model, options)
            .err()
            .unwrap_or_else(|| panic!("{field}: refused"))
            .to_string();
        assert!(err.contains(field) && err.contains(takes), "{err}");
    }
    let refused = gpu_backend(
        &model,
        WgpuOptions {
            coop_tokens: Some(48),
            ..Default::default()
        },
    );
    let err = refused
        .err()
        .expect("48-token tiles are refused")
        .to_string();
    assert!(
        err.contains("coop_tokens") && err.contains("32 or 64"),
        "{err}"
    );
}

/// The subgroup kernels for small batches (`WgpuOptions::matvec_subgroups`: tiles of 8 tokens
/// up to 16) give the default kernels' logits on decode steps of 2, 5, 8, 12 and 16 sequences,
/// up to f32 summation order: one tile partly filled, one full, two; the norm fused (up to 8
/// tokens) and not. Every sequence has its own prompt length and its own token each step, so
/// a token read, normalised or written at another token's place changes the logits. The
/// prompts (1 to 4 tokens each) run on the same kernels.
#[test]
fn the_subgroup_kernels_agree_on_small_batches() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-sub-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    // Each sequence's prompt, then three decode steps of the whole batch: every step's logits.
    let decode = |backend: WgpuBackend, n: u32| {
        let mut e = Engine::new(Box::new(backend), EngineOptions::default());
        let seqs: Vec<_> = (0..n)
            .map(|i| {
                let s = e.new_sequence();
                let prompt: Vec<u32> = (0..1 + i % 4)
                    .map(|j| (i * 41 + j * 17 + 5) % 256)
                    .collect();
                e.forward(&[(s, &prompt)]).unwrap();
                s
            })
            .collect();
        let mut out = Vec::new();
        for step in 0..3u32 {
            let toks: Vec<[u32; 1]> = (0..n).map(|i| [(i * 29 + step * 53 + 7) % 256]).collect();
            let entries: Vec<_> = seqs.iter().zip(&toks).map(|(s, t)| (*s, &t[..])).collect();
            out.extend_from_slice(e.forward(&entries).unwrap());
        }
        out
    };
    let backend = |matvec_subgroups: bool| {
        gpu_backend(
            &model,
            WgpuOptions {
                matvec_subgroups,
                ..Default::default()
            },
        )
        .unwrap()
    };
    if !backend(true).matvec_subgroups() {
        eprintln!("this adapter has no subgroups: the subgroup kernels did not run");
        return;
    }
    for n in [2, 5, 8, 12, 16] {
        let want = decode(backend(false), n);
        let got = decode(backend(true), n);
        assert_eq!(got.len(), want.len());
        assert_eq!(want.len(), 3 * n as usize * VOCAB);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&got, &want);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{n} sequences: differs by {d} (scale {scale})"
        );
        // The sequences' logits differ from one another: a token's result in another's place
        // would not pass for it.
        assert!(
            max_diff(&want[..VOCAB], &want[VOCAB..2 * VOCAB]) > 1e-3 * scale,
            "{n} sequences: the first two sequences' logits agree"
        );
    }
}

/// The same on the real model, whose packed weights (4 to 6 bits) the tiny model's do not
/// reach: a 5-token prompt (one tile, the norm fused), then one step of 12 forked sequences
/// (two tiles), each fed its own token.
#[test]
fn the_subgroup_kernels_agree_on_the_real_models_packed_weights() {
    if skip() {
        return;
    }
    let model = super::model();
    let prompt: Vec<u32> = (0..5u32).map(|i| (i * 7919 + 13) % 150_000).collect();
    let step = |matvec_subgroups: bool| {
        let backend = gpu_backend(
            model,
            WgpuOptions {
                matvec_subgroups,
                ..Default::default()
            },
        )
        .unwrap();
        if matvec_subgroups && !backend.matvec_subgroups() {
            return None;
        }
        let mut e = Engine::new(Box::new(backend), EngineOptions::default());
        let root = e.new_sequence();
        e.forward(&[(root, &prompt)]).unwrap();
        let mut seqs = vec![root];
        for _ in 1..12 {
            seqs.push(e.fork(root).unwrap());
        }
        let toks: Vec<[u32; 1]> = (0..12u32).map(|i| [(i * 7919 + 101) % 150_000]).collect();
        let entries: Vec<_> = seqs.iter().zip(&toks).map(|(s, t)| (*s, &t[..])).collect();
        Some(e.forward(&entries).unwrap().to_vec())
    };
    let Some(got) = step(true) else {
        eprintln!("this adapter has no subgroups: the subgroup kernels did not run");
        return;
    };
    let want = step(false).unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&got, &want);
    assert!(d <= 1e-4 * scale.max(1.0), "differs by {d} (scale {scale})");
}

/// Weights packed into the fewest bits that hold them (4-bit Q4_K, 5-bit Q5_0, 6-bit Q6_K,
/// bytes for Q8_0, f16 scale pairs where exact) give the logits of the byte-a-weight form
/// bit for bit, in every matrix kernel a lavapipe pass takes: the one-token kernel (decode
/// steps), the several-rows kernel and the tiled matrix-matrix kernel (a prefill with
/// `tiled_min_workgroups` 0 and without). And they take much less memory.
#[test]
fn packed_weights_give_the_byte_forms_logits_bit_for_bit_on_the_real_model() {
    if skip() {
        return;
    }
    let model = super::model();
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 13) % 150_000).collect();
    let run = |byte_weights: bool, tiled_min_workgroups: Option<u32>| {
        let backend = gpu_backend(
            model,
            WgpuOptions {
                byte_weights,
                tiled_min_workgroups,
                ..Default::default()
            },
        )
        .unwrap();
        let bytes = backend.weight_bytes();
        let mut e = Engine::new(Box::new(backend), EngineOptions::default());
        let s = e.new_sequence();
        let mut out = e.forward(&[(s, &prompt[..32])]).unwrap().to_vec();
        for &t in &prompt[32..35] {
            out.extend_from_slice(e.forward(&[(s, &[t][..])]).unwrap());
        }
        (bytes, out)
    };
    for tiled in [None, Some(0)] {
        let (bytes, want) = run(true, tiled);
        let (packed, got) = run(false, tiled);
        assert_eq!(got.len(), want.len());
        let differing = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "tiled {tiled:?}: {differing} logits differ");
        let c = &model.config;
        let per_layer = (c.n_heads * c.head_dim + 2 * c.kv_dim()) * c.d_model
            + c.n_heads * c.head_dim * c.d_model
            + 3 * c.ffn_dim * c.d_model;
        let weights = (per_layer * c.n_layers + c.vocab_size * c.d_model) as u64;
        let (per_weight, packed_per_weight) = (
            bytes as f64 / weights as f64,
            packed as f64 / weights as f64,
        );
        eprintln!("bytes a weight: {per_weight:.3} as bytes, {packed_per_weight:.3} packed");
        assert!((per_weight - 1.5).abs() < 0.01, "{per_weight}");
        // 0.92: Q5_0 in 0.75 bytes a weight, Q8_0 (the output projection, half the V
        // matrices) in 1.125, Q6_K in 1.25, Q4_K in 0.75.
        assert!(packed_per_weight < 0.65 * per_weight, "{packed_per_weight}");
    }
}

/// Attention with one workgroup per key head covering its query heads
/// (`WgpuOptions::gqa_min_tokens`, `attention_gqa.wgsl`) gives the per-query-head kernel's
/// logits, on a prefill and on decode steps of forked sequences (where the default fuses RoPE
/// into attention and the grouped kernel runs it first), on the tiny model (2 query heads a
/// key head) and the real one (7).
#[test]
fn grouped_query_attention_agrees_with_the_per_head_kernel() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-gqa-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let tiny = Model::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    // The tiny model's prompt runs past one tile of 256 positions, so the online softmax
    // crosses tiles; the real model's is short (lavapipe is slow).
    for (what, model, len) in [("tiny", &tiny, 300), ("real", super::model(), 40)] {
        let vocab = model.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..len).map(|i| (i * 7919 + 13) % vocab).collect();
        let run = |gqa_min_tokens: Option<u32>| {
            let backend = gpu_backend(
                model,
                WgpuOptions {
                    gqa_min_tokens,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut e = Engine::new(Box::new(backend), EngineOptions::default());
            let s = e.new_sequence();
            let mut out = e.forward(&[(s, &prompt)]).unwrap().to_vec();
            let kids: Vec<_> = (0..3).map(|_| e.fork(s).unwrap()).collect();
            for step in 0..2u32 {
                let toks: Vec<[u32; 1]> =
                    (0..3u32).map(|k| [(step * 3 + k) * 101 % vocab]).collect();
                let entries: Vec<_> = kids.iter().zip(&toks).map(|(s, t)| (*s, &t[..])).collect();
                out.extend_from_slice(e.forward(&entries).unwrap());
            }
            out
        };
        let want = run(None);
        let got = run(Some(1));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_diff(&got, &want);
        // 0 on lavapipe: the same operations in the same order.
        eprintln!("{what}: grouped attention differs by {diff} (scale {scale})");
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{what}: differs by {diff} (scale {scale})"
        );
    }
}

/// Tiled products split over their columns (`WgpuOptions::split_k_workgroups`) give the
/// unsplit logits to f32 summation order: a 300-token prefill of every product on the tiled
/// matrix-matrix kernel (the qkv bias, the residual sums, the SwiGLU pairs and the output
/// projection all finished by the reduction), the same with weights in small chunks (rows
/// that start mid-matrix), and a batched decode step of 12 sequences, at the largest target
/// and at the default's. The profile shows the reductions ran. A target past the largest is
/// refused.
#[test]
fn split_products_give_the_unsplit_logits() {
    if skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("arbor-wgpu-split-{}", std::process::id()));
    TinyModel::new("qwen2").write(&dir).unwrap();
    let model = Model::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let tokens: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % 256).collect();
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|s| (0..5 + s).map(|i| (i * 13 + s * 7 + 1) % 256).collect())
        .collect();
    let run = |split: Option<u32>, chunk: Option<u64>| {
        let backend = gpu_backend(
            &model,
            WgpuOptions {
                split_k_workgroups: split,
                max_chunk_bytes: chunk,
                // Every product of more than 8 tokens on the tiled kernel, which splits.
                tiled_min_workgroups: Some(0),
                profile: true,
                ..Default::default()
            },
        )
        .unwrap();
        let profile = backend.profile().expect("profiling was asked for");
        let mut e = Engine::new(Box::new(backend), EngineOptions::default());
        let s = e.new_sequence();
        let mut out = e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
        let seqs: Vec<_> = prompts.iter().map(|_| e.new_sequence()).collect();
        let first: Vec<_> = seqs
            .iter()
            .zip(&prompts)
            .map(|(&s, p)| (s, &p[..p.len() - 1]))
            .collect();
        e.forward(&first).unwrap();
        let step: Vec<_> = seqs
            .iter()
            .zip(&prompts)
            .map(|(&s, p)| (s, &p[p.len() - 1..]))
            .collect();
        out.extend_from_slice(e.forward(&step).unwrap());
        let p = arbor_model::backend::wgpu::PassProfile::take(&profile);
        // Timestamps inside passes are optional in wgpu (lavapipe has them): without them,
        // no count of reductions.
        let timed = !p.kernels.is_empty();
        (
            out,
            timed.then(|| p.kernels.get("split_sum").map_or(0, |k| k.0)),
        )
    };
    let (whole, none) = run(Some(0), None);
    assert!(none.is_none_or(|n| n == 0), "nothing splits at 0");
    let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (target, chunk) in [
        (Some(2048), None),
        (Some(2048), Some((7 * VOCAB * 4) as u64)),
        (None, None),
    ] {
        let (split, reductions) = run(target, chunk);
        let d = max_diff(&split, &whole);
        eprintln!(
            "target {target:?}, chunks {chunk:?}: {reductions:?} reductions, differs by {d} \
             (scale {scale})"
        );
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "target {target:?}, chunks {chunk:?}: differs by {d}"
        );
        assert!(reductions.is_none_or(|n| n > 0), "no product split");
    }
    let err = gpu_backend(
        &model,
        WgpuOptions {
            split_k_workgroups: Some(4096),
            ..Default::default()
        },
    )
    .err()
    .expect("4096 is refused")
    .to_string();
    assert!(
        err.contains("split_k_workgroups") && err.contains("2048"),
        "{err}"
    );
}
