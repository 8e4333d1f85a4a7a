//! A tiny random model, written as a Hugging Face folder, with a plain f32 reference of its
//! forward pass: for tests, here and in the crates above, that need a model whose every number
//! is known (the engine against the reference; a reward head on top of it).
//!
//! The model is a 2-layer qwen2 (or llama: no Q/K/V biases) decoder of width 64 with grouped
//! query attention, over a byte-level BPE of the 256 byte symbols, one merge (`ab`) and four
//! special tokens (`<|endoftext|>`, `<extra_0>`, `<|im_start|>`, `<|im_end|>`) with a ChatML
//! chat template.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

/// Width of the residual stream.
pub const D: usize = 64;
/// Query heads.
pub const HEADS: usize = 4;
/// Key/value heads.
pub const KV_HEADS: usize = 2;
/// Dimension of one head.
pub const HD: usize = D / HEADS;
/// Hidden width of the MLP.
pub const FFN: usize = 128;
/// Decoder blocks.
pub const LAYERS: usize = 2;
/// Vocabulary size (rows of the embedding and output matrices).
pub const VOCAB: usize = 288;
/// RoPE base.
pub const THETA: f32 = 10_000.0;
/// RMSNorm epsilon.
pub const EPS: f32 = 1e-6;
/// Id of `<extra_0>`, the step separator of Qwen2.5-Math-PRM.
pub const EXTRA_0: u32 = 258;

/// A named tensor: name (Hugging Face naming), shape, row-major values.
pub type Tensor = (String, Vec<usize>, Vec<f32>);

/// Deterministic values in [-0.25, 0.25), so tests need no random-number crate.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
    }

    /// `n` values.
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

/// A tiny model's tensors, in f32.
#[derive(Debug, Clone)]
pub struct TinyModel {
    /// `qwen2` or `llama`.
    pub arch: String,
    /// Every tensor, decoder weights first; [`TinyModel::push`] adds more (a reward head).
    pub tensors: Vec<Tensor>,
}

impl TinyModel {
    /// The decoder's weights for `arch` (`qwen2` or `llama`), the same for every call.
    pub fn new(arch: &str) -> Self {
        let mut r = Rng(42);
        let mut w: Vec<Tensor> = vec![(
            "model.embed_tokens.weight".into(),
            vec![VOCAB, D],
            r.vec(VOCAB * D),
        )];
        let kv = KV_HEADS * HD;
        for l in 0..LAYERS {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let ones_ish: Vec<f32> = (0..D).map(|i| 1.0 + 0.01 * i as f32).collect();
            w.push((p("input_layernorm.weight"), vec![D], ones_ish.clone()));
            w.push((p("post_attention_layernorm.weight"), vec![D], ones_ish));
            w.push((p("self_attn.q_proj.weight"), vec![D, D], r.vec(D * D)));
            w.push((p("self_attn.q_proj.bias"), vec![D], r.vec(D)));
            w.push((p("self_attn.k_proj.weight"), vec![kv, D], r.vec(kv * D)));
            w.push((p("self_attn.k_proj.bias"), vec![kv], r.vec(kv)));
            w.push((p("self_attn.v_proj.weight"), vec![kv, D], r.vec(kv * D)));
            w.push((p("self_attn.v_proj.bias"), vec![kv], r.vec(kv)));
            w.push((p("self_attn.o_proj.weight"), vec![D, D], r.vec(D * D)));
            w.push((p("mlp.gate_proj.weight"), vec![FFN, D], r.vec(FFN * D)));
            w.push((p("mlp.up_proj.weight"), vec![FFN, D], r.vec(FFN * D)));
            w.push((p("mlp.down_proj.weight"), vec![D, FFN], r.vec(D * FFN)));
        }
        // A norm gain that is not all ones, so a hidden state read before the final norm
        // differs from one read after it.
        let gain: Vec<f32> = (0..D).map(|i| 0.5 + 0.02 * i as f32).collect();
        w.push(("model.norm.weight".into(), vec![D], gain));
        w.push(("lm_head.weight".into(), vec![VOCAB, D], r.vec(VOCAB * D)));
        // llama has no Q/K/V biases.
        w.retain(|(n, _, _)| arch == "qwen2" || !n.ends_with(".bias"));
        TinyModel {
            arch: arch.into(),
            tensors: w,
        }
    }

    /// Adds a tensor (written with the others).
    pub fn push(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        self.tensors.push((name.into(), shape, values));
    }

    /// Removes a tensor (to make a broken folder).
    pub fn remove(&mut self, name: &str) {
        self.tensors.retain(|(n, _, _)| n != name);
    }

    /// The values of a tensor, or an empty slice when it does not exist.
    pub fn get(&self, name: &str) -> &[f32] {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or(&[][..], |(_, _, v)| &v[..])
    }

    /// Writes `config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        self.write_safetensors(&dir.join("model.safetensors"))?;
        let config = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": self.arch, "hidden_size": D,
            "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "rope_theta": THETA,
            "rms_norm_eps": EPS, "max_position_embeddings": 512, "tie_word_embeddings": false
        });
        std::fs::write(dir.join("config.json"), config.to_string())?;
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string())?;
        let chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let tokenizer_config = serde_json::json!({
            "eos_token": "<|endoftext|>", "chat_template": chat_template
        });
        std::fs::write(
            dir.join("tokenizer_config.json"),
            tokenizer_config.to_string(),
        )
    }

    /// Writes every tensor, as f32, to one safetensors file.
    pub fn write_safetensors(&self, path: &Path) -> std::io::Result<()> {
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .zip(&bytes)
            .map(|((n, shape, _), b)| {
                let view = TensorView::new(Dtype::F32, shape.clone(), b).expect("sizes match");
                (n.clone(), view)
            })
            .collect();
        let data = safetensors::serialize(views, None).map_err(std::io::Error::other)?;
        std::fs::write(path, data)
    }

    /// The final hidden state (after the last block and the final norm) at every token,
    /// computed the plain way in f32.
    pub fn reference_hidden(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        self.reference_hidden_at(tokens, crate::HiddenLayer::Final)
    }

    /// The hidden state at `layer` (see [`crate::HiddenLayer`]) at every token, computed the
    /// plain way in f32.
    pub fn reference_hidden_at(&self, tokens: &[u32], layer: crate::HiddenLayer) -> Vec<Vec<f32>> {
        let blocks = match layer {
            crate::HiddenLayer::Final => LAYERS,
            crate::HiddenLayer::Block(b) => b + 1,
        };
        let w: HashMap<&str, &[f32]> = self
            .tensors
            .iter()
            .map(|(n, _, v)| (n.as_str(), &v[..]))
            .collect();
        let zeros = vec![0f32; D];
        // A missing bias (llama) is a zero bias.
        let g = |n: &str| -> &[f32] { w.get(n).copied().unwrap_or(&zeros) };
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| g("model.embed_tokens.weight")[t as usize * D..(t as usize + 1) * D].to_vec())
            .collect();
        let kv = KV_HEADS * HD;
        for l in 0..blocks {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let add = |mut v: Vec<f32>, b: &[f32]| {
                v.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                v
            };
            let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
            for (pos, x) in xs.iter().enumerate() {
                let h = rms(x, g(&p("input_layernorm.weight")));
                let q = matvec(g(&p("self_attn.q_proj.weight")), &h, D);
                let mut q = add(q, g(&p("self_attn.q_proj.bias")));
                let k = matvec(g(&p("self_attn.k_proj.weight")), &h, kv);
                let mut k = add(k, g(&p("self_attn.k_proj.bias")));
                let v = matvec(g(&p("self_attn.v_proj.weight")), &h, kv);
                let v = add(v, g(&p("self_attn.v_proj.bias")));
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
                            let k = &ks[j][kvh * HD..(kvh + 1) * HD];
                            let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                            dot / (HD as f32).sqrt()
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
        let ones = vec![1f32; D];
        let weight = match layer {
            crate::HiddenLayer::Final => g("model.norm.weight"),
            crate::HiddenLayer::Block(_) => &ones,
        };
        xs.iter().map(|x| rms(x, weight)).collect()
    }

    /// The logits after every token, computed the plain way in f32.
    pub fn reference_logits(&self, tokens: &[u32]) -> Vec<Vec<f32>> {
        let head = self.get("lm_head.weight");
        self.reference_hidden(tokens)
            .iter()
            .map(|h| matvec(head, h, VOCAB))
            .collect()
    }
}

/// A byte-level BPE over the 256 byte symbols and one merge, plus four special tokens.
fn tokenizer_json() -> serde_json::Value {
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
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [special(257, "<|endoftext|>"), special(EXTRA_0, "<extra_0>"),
                         special(259, "<|im_start|>"), special(260, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": ["a b"]}
    })
}

/// y = W x for a row-major `[rows, cols]` W.
pub fn matvec(w: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
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
