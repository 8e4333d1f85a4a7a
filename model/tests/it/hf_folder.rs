//! A Hugging Face folder (config.json, safetensors, tokenizer.json) made here with a tiny qwen2
//! model, checked against a plain f32 reference implementation written out below.

use std::collections::HashMap;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{Engine, EngineOptions, Model, ModelError};
use safetensors::tensor::{Dtype, TensorView};

const D: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = D / HEADS;
const FFN: usize = 128;
const LAYERS: usize = 2;
const VOCAB: usize = 288;
const THETA: f32 = 10_000.0;
const EPS: f32 = 1e-6;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn weights_all() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut r = Rng(42);
    let mut w = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![VOCAB, D],
        r.vec(VOCAB * D),
    )];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let ones_ish: Vec<f32> = (0..D).map(|i| 1.0 + 0.01 * i as f32).collect();
        w.push((p("input_layernorm.weight"), vec![D], ones_ish.clone()));
        w.push((p("post_attention_layernorm.weight"), vec![D], ones_ish));
        w.push((p("self_attn.q_proj.weight"), vec![D, D], r.vec(D * D)));
        w.push((p("self_attn.q_proj.bias"), vec![D], r.vec(D)));
        w.push((
            p("self_attn.k_proj.weight"),
            vec![KV_HEADS * HD, D],
            r.vec(KV_HEADS * HD * D),
        ));
        w.push((
            p("self_attn.k_proj.bias"),
            vec![KV_HEADS * HD],
            r.vec(KV_HEADS * HD),
        ));
        w.push((
            p("self_attn.v_proj.weight"),
            vec![KV_HEADS * HD, D],
            r.vec(KV_HEADS * HD * D),
        ));
        w.push((
            p("self_attn.v_proj.bias"),
            vec![KV_HEADS * HD],
            r.vec(KV_HEADS * HD),
        ));
        w.push((p("self_attn.o_proj.weight"), vec![D, D], r.vec(D * D)));
        w.push((p("mlp.gate_proj.weight"), vec![FFN, D], r.vec(FFN * D)));
        w.push((p("mlp.up_proj.weight"), vec![FFN, D], r.vec(FFN * D)));
        w.push((p("mlp.down_proj.weight"), vec![D, FFN], r.vec(D * FFN)));
    }
    w.push(("model.norm.weight".to_string(), vec![D], vec![1.0; D]));
    w.push((
        "lm_head.weight".to_string(),
        vec![VOCAB, D],
        r.vec(VOCAB * D),
    ));
    w
}

/// The tiny model's tensors; llama has no Q/K/V biases.
fn weights_for(arch: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    weights_all()
        .into_iter()
        .filter(|(n, _, _)| arch == "qwen2" || !n.ends_with(".bias"))
        .collect()
}

fn weights() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    weights_for("qwen2")
}

fn write_folder(dir: &std::path::Path) {
    write_folder_for(dir, "qwen2");
}

fn write_folder_for(dir: &std::path::Path, arch: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let w = weights_for(arch);
    let bytes: Vec<Vec<u8>> = w
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = w
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": arch, "hidden_size": D, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB, "rope_theta": THETA, "rms_norm_eps": EPS, "max_position_embeddings": 256,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // A byte-level BPE over the 256 byte symbols and one merge, plus an end-of-text token.
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut vocab: HashMap<String, u32> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    vocab.insert("ab".into(), 256);
    let tokenizer_json = serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": 257, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": ["a b"]}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>"}"#,
    )
    .unwrap();
}

/// y = W x for a row-major `[rows, cols]` W.
fn matvec(w: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let cols = x.len();
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

fn rms(x: &[f32], w: &[f32]) -> Vec<f32> {
    let s = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + EPS).sqrt();
    x.iter().zip(w).map(|(v, g)| v / s * g).collect()
}

/// Rotates each head's halves (Hugging Face's `rotate_half`).
fn rope(v: &mut [f32], pos: usize) {
    for head in v.chunks_mut(HD) {
        for i in 0..HD / 2 {
            let theta = pos as f32 * THETA.powf(-2.0 * i as f32 / HD as f32);
            let (c, s) = (theta.cos(), theta.sin());
            let (a, b) = (head[i], head[i + HD / 2]);
            head[i] = a * c - b * s;
            head[i + HD / 2] = a * s + b * c;
        }
    }
}

/// Logits after every token, computed the plain way.
fn reference_logits(tokens: &[u32], arch: &str) -> Vec<Vec<f32>> {
    let w: HashMap<String, Vec<f32>> = weights_for(arch)
        .into_iter()
        .map(|(n, _, v)| (n, v))
        .collect();
    let zeros = vec![0f32; D];
    // A missing bias (llama) is a zero bias.
    let g = |n: &str| w.get(n).unwrap_or(&zeros);
    let mut xs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| g("model.embed_tokens.weight")[t as usize * D..(t as usize + 1) * D].to_vec())
        .collect();
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let add = |mut v: Vec<f32>, b: &[f32]| {
            v.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            v
        };
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, g(&p("input_layernorm.weight")));
            let mut q = add(
                matvec(g(&p("self_attn.q_proj.weight")), &h, D),
                g(&p("self_attn.q_proj.bias")),
            );
            let mut k = add(
                matvec(g(&p("self_attn.k_proj.weight")), &h, KV_HEADS * HD),
                g(&p("self_attn.k_proj.bias")),
            );
            let v = add(
                matvec(g(&p("self_attn.v_proj.weight")), &h, KV_HEADS * HD),
                g(&p("self_attn.v_proj.bias")),
            );
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f32; D];
            for h in 0..HEADS {
                let kvh = h / (HEADS / KV_HEADS);
                let q = &qs[pos][h * HD..(h + 1) * HD];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * HD..(kvh + 1) * HD])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (HD as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..HD {
                        att[h * HD + d] += ej / z * vs[j][kvh * HD + d];
                    }
                }
            }
            let o = matvec(g(&p("self_attn.o_proj.weight")), &att, D);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms(x, g(&p("post_attention_layernorm.weight")));
            let gate = matvec(g(&p("mlp.gate_proj.weight")), &h, FFN);
            let up = matvec(g(&p("mlp.up_proj.weight")), &h, FFN);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            let down = matvec(g(&p("mlp.down_proj.weight")), &act, D);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .map(|x| matvec(g("lm_head.weight"), &rms(x, g("model.norm.weight")), VOCAB))
        .collect()
}

#[test]
fn a_hugging_face_folder_loads_and_matches_a_plain_reference() {
    for arch in ["qwen2", "llama"] {
        check_folder(arch);
    }
}

fn check_folder(arch: &str) {
    let dir = std::env::temp_dir().join(format!("arbor-hf-test-{arch}-{}", std::process::id()));
    write_folder_for(&dir, arch);
    let model = Model::load(&dir).unwrap();
    assert_eq!(model.config.architecture, arch);
    assert_eq!(model.config.n_kv_heads, KV_HEADS);
    let tokens = model.tokenizer.encode("abc ab!", false).unwrap();
    assert!(tokens.contains(&256), "the merge `a b` applies: {tokens:?}");
    assert_eq!(model.tokenizer.decode(&tokens).unwrap(), "abc ab!");
    assert!(model.tokenizer.is_eos(257));
    let mut e = Engine::new(
        Box::new(CpuBackend::new(model.config.clone(), model.weights.clone())),
        EngineOptions::default(),
    );
    let s = e.new_sequence();
    let ours = e.forward_all_logits(&[(s, &tokens)]).unwrap().to_vec();
    let reference = reference_logits(&tokens, arch);
    let scale = reference.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut sum = 0f32;
    for (pos, row) in reference.iter().enumerate() {
        for (t, r) in row.iter().enumerate() {
            let o = ours[pos * VOCAB + t];
            sum += (o - r).abs();
            // Weights and activations are both quantized to 8 bits: errors of about 1% of the
            // logit scale, a few percent at worst; a wrong rotation or a swapped tensor moves
            // logits by the whole scale.
            assert!(
                (o - r).abs() <= 0.05 * scale,
                "{arch} position {pos} token {t}: {o} vs reference {r} (scale {scale})"
            );
        }
    }
    let mean = sum / (reference.len() * VOCAB) as f32;
    eprintln!("{arch}: mean |error| {mean:.4}, logit scale {scale:.2}");
    assert!(
        mean <= 0.01 * scale,
        "{arch}: mean error {mean} against scale {scale}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn broken_hugging_face_folders_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("arbor-hf-broken-{}", std::process::id()));
    write_folder(&dir);
    // A missing tensor is named.
    let w = weights();
    let bytes: Vec<Vec<u8>> = w
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = w
        .iter()
        .zip(&bytes)
        .filter(|((n, _, _), _)| n != "model.layers.1.mlp.up_proj.weight")
        .map(|((n, shape, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let err = Model::load(&dir).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor(n) if n == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    // A truncated safetensors file is rejected with its path.
    let full = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    let err = Model::load(&dir).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // An unsupported architecture is named.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 288}"#).unwrap();
    let err = Model::load(&dir).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedArchitecture(a) if a == "mamba"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
