//! Model families. `qwen2` and `llama` share one decoder ([`DecoderWeights`]); each family's
//! file says how its hyper-parameters are named in GGUF metadata and in `config.json`.

pub mod llama;
pub mod qwen2;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::QMatrix;

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Dimension `i` rotates with `i + head_dim/2` (GPT-NeoX; Hugging Face's `rotate_half`).
    Neox,
    /// Dimension `2i` rotates with `2i + 1` (GGUF llama files, whose Q/K rows were permuted for it).
    Interleaved,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Family name (`qwen2` or `llama`).
    pub architecture: String,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Hidden width of the gated MLP.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the output matrix).
    pub vocab_size: usize,
    /// RoPE frequency base.
    pub rope_theta: f32,
    /// How RoPE pairs dimensions.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Longest context the model was trained for.
    pub context_length: usize,
}

impl ModelConfig {
    /// Width of the key (or value) vectors of one token in one layer.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Checks the shapes fit together, so kernels can rely on them.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(ModelError::metadata(key, why));
        if self.n_layers == 0 || self.d_model == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad("config", format!("zero-sized model: {self:?}"));
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(
                "n_kv_heads",
                format!(
                    "{} query heads is not a multiple of {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if self.head_dim % 2 != 0 {
            return bad(
                "head_dim",
                format!("{} must be even for RoPE", self.head_dim),
            );
        }
        if self.d_model % 32 != 0
            || self.ffn_dim % 32 != 0
            || (self.n_heads * self.head_dim) % 32 != 0
        {
            return bad(
                "d_model",
                "d_model, ffn_dim and n_heads*head_dim must be multiples of 32".into(),
            );
        }
        if !(self.rms_eps > 0.0 && self.rope_theta > 0.0) {
            return bad("rms_eps", "rms_eps and rope_theta must be positive".into());
        }
        Ok(())
    }
}

/// Reads a config from GGUF metadata, dispatching on `general.architecture`.
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    let arch = g.get_str("general.architecture")?;
    let cfg = match arch {
        "qwen2" => qwen2::config_from_gguf(g)?,
        "llama" => llama::config_from_gguf(g)?,
        other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Reads the hyper-parameters shared by the llama-style families from GGUF metadata.
pub(crate) fn common_gguf(g: &GgufFile, arch: &str, rope_style: RopeStyle) -> Result<ModelConfig> {
    let key = |k: &str| format!("{arch}.{k}");
    let d_model = g.get_u64(&key("embedding_length"))? as usize;
    let n_heads = g.get_u64(&key("attention.head_count"))? as usize;
    let n_kv_heads = match g.get(&key("attention.head_count_kv")) {
        Some(v) => v.as_u64().ok_or_else(|| {
            ModelError::metadata(&key("attention.head_count_kv"), "expected an integer")
        })? as usize,
        None => n_heads,
    };
    let head_dim = match g.get(&key("attention.key_length")) {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => d_model / n_heads.max(1),
    };
    let vocab_size = match g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        Some(t) => t.len(),
        None => g.get_u64(&key("vocab_size"))? as usize,
    };
    Ok(ModelConfig {
        architecture: arch.to_string(),
        n_layers: g.get_u64(&key("block_count"))? as usize,
        d_model,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim: g.get_u64(&key("feed_forward_length"))? as usize,
        vocab_size,
        rope_theta: g
            .get(&key("rope.freq_base"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10_000.0) as f32,
        rope_style,
        rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
        context_length: g
            .get(&key("context_length"))
            .and_then(|v| v.as_u64())
            .unwrap_or(4096) as usize,
    })
}

/// `config.json` fields of the llama-style families, named as Hugging Face names them.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    pub(crate) model_type: Option<String>,
    pub(crate) hidden_size: usize,
    pub(crate) intermediate_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) num_key_value_heads: Option<usize>,
    pub(crate) head_dim: Option<usize>,
    pub(crate) vocab_size: usize,
    pub(crate) rope_theta: Option<f32>,
    pub(crate) rms_norm_eps: Option<f32>,
    pub(crate) max_position_embeddings: Option<usize>,
}

impl HfConfig {
    pub(crate) fn to_config(&self) -> Result<ModelConfig> {
        let arch = match self.model_type.as_deref() {
            Some("qwen2") => "qwen2",
            Some("llama") => "llama",
            Some(other) => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
            None => {
                return Err(ModelError::metadata(
                    "model_type",
                    "missing from config.json",
                ))
            }
        };
        let cfg = ModelConfig {
            architecture: arch.to_string(),
            n_layers: self.num_hidden_layers,
            d_model: self.hidden_size,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            ffn_dim: self.intermediate_size,
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            // Hugging Face checkpoints keep the original Q/K row order, which rotates halves.
            rope_style: RopeStyle::Neox,
            rms_eps: self.rms_norm_eps.unwrap_or(1e-6),
            context_length: self.max_position_embeddings.unwrap_or(4096),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Where weights come from: a GGUF file or a safetensors folder, addressed by GGUF names.
pub trait WeightSource {
    /// Whether a tensor exists (GGUF naming).
    fn has(&self, name: &str) -> bool;
    /// A 2-D matrix `[rows, cols]`, ready for the matmul kernels.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix>;
    /// A 1-D vector of `len` values, as f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>>;
}

/// Weights of one decoder block.
#[derive(Debug)]
pub struct LayerWeights {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: QMatrix,
    pub(crate) wk: QMatrix,
    pub(crate) wv: QMatrix,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) wo: QMatrix,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: QMatrix,
    pub(crate) w_up: QMatrix,
    pub(crate) w_down: QMatrix,
}

/// All weights of a llama-style decoder (qwen2 adds the optional QKV biases).
#[derive(Debug)]
pub struct DecoderWeights {
    pub(crate) embed: QMatrix,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) out_norm: Vec<f32>,
    pub(crate) output: QMatrix,
}

impl DecoderWeights {
    /// Loads every tensor the decoder needs, checking each shape.
    pub fn load(cfg: &ModelConfig, src: &dyn WeightSource) -> Result<Self> {
        let d = cfg.d_model;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv = cfg.kv_dim();
        let bias = |name: String, len: usize| -> Result<Option<Vec<f32>>> {
            if src.has(&name) {
                src.vector(&name, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(LayerWeights {
                attn_norm: src.vector(&n("attn_norm.weight"), d)?,
                wq: src.matrix(&n("attn_q.weight"), q_dim, d)?,
                wk: src.matrix(&n("attn_k.weight"), kv, d)?,
                wv: src.matrix(&n("attn_v.weight"), kv, d)?,
                bq: bias(n("attn_q.bias"), q_dim)?,
                bk: bias(n("attn_k.bias"), kv)?,
                bv: bias(n("attn_v.bias"), kv)?,
                wo: src.matrix(&n("attn_output.weight"), d, q_dim)?,
                ffn_norm: src.vector(&n("ffn_norm.weight"), d)?,
                w_gate: src.matrix(&n("ffn_gate.weight"), cfg.ffn_dim, d)?,
                w_up: src.matrix(&n("ffn_up.weight"), cfg.ffn_dim, d)?,
                w_down: src.matrix(&n("ffn_down.weight"), d, cfg.ffn_dim)?,
            });
        }
        let embed = src.matrix("token_embd.weight", cfg.vocab_size, d)?;
        // Tied embeddings: the output projection reuses the embedding matrix.
        let output = if src.has("output.weight") {
            src.matrix("output.weight", cfg.vocab_size, d)?
        } else {
            embed.clone()
        };
        Ok(DecoderWeights {
            embed,
            layers,
            out_norm: src.vector("output_norm.weight", d)?,
            output,
        })
    }
}

/// Shapes of published models, for [`DecoderWeights::synthetic`] and speed measurements.
pub fn preset(name: &str) -> Option<ModelConfig> {
    let (n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size) = match name {
        "qwen2.5-0.5b" => (24, 896, 14, 2, 64, 4864, 151_936),
        "qwen2.5-1.5b" => (28, 1536, 12, 2, 128, 8960, 151_936),
        "qwen2.5-7b" => (28, 3584, 28, 4, 128, 18_944, 152_064),
        _ => return None,
    };
    Some(ModelConfig {
        architecture: "qwen2".into(),
        n_layers,
        d_model,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim,
        vocab_size,
        rope_theta: 1_000_000.0,
        rope_style: RopeStyle::Neox,
        rms_eps: 1e-6,
        context_length: 32_768,
    })
}

impl DecoderWeights {
    /// Weights in the shapes of `cfg` and the storage types of the default model's Q4_K_M file
    /// (Q5_0 projections; `attn_v` Q8_0 and Q5_0 and `ffn_down` Q6_K and Q4_K in alternate
    /// layers, where the widths allow; Q8_0 output and embeddings), prepared as the loader
    /// prepares a file's, filled with deterministic pseudo-random values.
    ///
    /// For speed measurements where the real file cannot go: a kernel takes the same time
    /// whatever the weights' values. The values are kept small so activations stay finite.
    pub fn synthetic(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        use crate::quant::{GgmlType, Storage};
        cfg.validate()?;
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut matrix = |name: &str, ty: GgmlType, rows: usize, cols: usize| -> Result<QMatrix> {
            let row_bytes = ty.row_bytes(cols);
            let mut bytes = vec![0u8; rows * row_bytes];
            for chunk in bytes.chunks_mut(8) {
                let v = next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
            // A small positive f16 scale (and min) in each block: 2^-10 to 2^-9 (Q6_K's, times
            // its 8-bit sub-block scales, 2^-4 of that).
            let scale = half::f16::from_f32(0.0015).to_le_bytes();
            for blk in bytes.chunks_mut(ty.block_bytes()) {
                match ty {
                    GgmlType::Q8_0 | GgmlType::Q5_0 => blk[0..2].copy_from_slice(&scale),
                    GgmlType::Q4K => {
                        blk[0..2].copy_from_slice(&scale);
                        blk[2..4].copy_from_slice(&scale);
                    }
                    GgmlType::Q6K => {
                        blk[208..210].copy_from_slice(&half::f16::from_f32(0.0001).to_le_bytes())
                    }
                    _ => unreachable!("synthetic weights use Q8_0, Q5_0, Q4_K and Q6_K"),
                }
            }
            QMatrix::new(name, ty, rows, cols, Storage::Owned(bytes.into()))?
                .into_matmul_ready(name)
        };
        let d = cfg.d_model;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv = cfg.kv_dim();
        let q8 = GgmlType::Q8_0;
        let q5 = |cols: usize| if cols % 32 == 0 { GgmlType::Q5_0 } else { q8 };
        let down_ty = |l: usize| match (cfg.ffn_dim % 256 == 0, l % 2) {
            (false, _) => q8,
            (true, 0) => GgmlType::Q6K,
            (true, _) => GgmlType::Q4K,
        };
        let ones = |n: usize| vec![1.0f32; n];
        let small = |n: usize| vec![0.01f32; n];
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let v_ty = if l % 2 == 0 { q8 } else { q5(d) };
            layers.push(LayerWeights {
                attn_norm: ones(d),
                wq: matrix("attn_q", q5(d), q_dim, d)?,
                wk: matrix("attn_k", q5(d), kv, d)?,
                wv: matrix("attn_v", v_ty, kv, d)?,
                bq: Some(small(q_dim)),
                bk: Some(small(kv)),
                bv: Some(small(kv)),
                wo: matrix("attn_output", q5(q_dim), d, q_dim)?,
                ffn_norm: ones(d),
                w_gate: matrix("ffn_gate", q5(d), cfg.ffn_dim, d)?,
                w_up: matrix("ffn_up", q5(d), cfg.ffn_dim, d)?,
                w_down: matrix("ffn_down", down_ty(l), d, cfg.ffn_dim)?,
            });
        }
        Ok(DecoderWeights {
            embed: matrix("token_embd", q8, cfg.vocab_size, d)?,
            layers,
            out_norm: ones(d),
            output: matrix("output", q8, cfg.vocab_size, d)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{preset, DecoderWeights, ModelConfig};
    use crate::backend::cpu::CpuBackend;
    use crate::quant::GgmlType;
    use crate::{Engine, EngineOptions};

    /// The benches' synthetic weights carry the default model's storage types (as the loader
    /// prepares them) and give finite logits through all of its layers.
    #[test]
    fn synthetic_weights_have_the_default_models_types_and_finite_logits() {
        let cfg = ModelConfig {
            d_model: 256,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 512,
            vocab_size: 1000,
            ..preset("qwen2.5-0.5b").unwrap()
        };
        let w = std::sync::Arc::new(DecoderWeights::synthetic(&cfg, 42).unwrap());
        let (l0, l1) = (&w.layers[0], &w.layers[1]);
        assert_eq!(l0.wq.ty, GgmlType::Q5x4);
        assert_eq!((l0.wv.ty, l1.wv.ty), (GgmlType::Q8_0, GgmlType::Q5x4));
        assert_eq!((l0.w_down.ty, l1.w_down.ty), (GgmlType::Q6K, GgmlType::Q4K));
        assert_eq!(w.output.ty, GgmlType::Q8_0);
        let mut e = Engine::new(
            Box::new(CpuBackend::new(cfg.clone(), w)),
            EngineOptions::default(),
        );
        let s = e.new_sequence();
        let tokens: Vec<u32> = (0..16).map(|i| i * 37 % 1000).collect();
        let logits = e.forward(&[(s, &tokens)]).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        assert!(logits.iter().any(|v| *v != 0.0));
    }
}
