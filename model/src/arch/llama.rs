//! Llama (2, 3.x): RMSNorm, grouped-query attention without biases, SwiGLU MLP. GGUF llama
//! files store Q and K rows permuted for interleaved RoPE, so they rotate pairs `(2i, 2i+1)`.

use super::{common_gguf, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::gguf::GgufFile;

/// Reads a Llama config from GGUF metadata (`llama.*` keys).
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    common_gguf(g, "llama", RopeStyle::Interleaved)
}
