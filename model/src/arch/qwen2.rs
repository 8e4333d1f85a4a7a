//! Qwen2 (and Qwen2.5): the llama decoder with biases on the Q, K and V projections, and RoPE
//! applied NeoX-style (llama.cpp's `LLAMA_ROPE_TYPE_NEOX` for this architecture).

use super::{common_gguf, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::gguf::GgufFile;

/// Reads a Qwen2 config from GGUF metadata (`qwen2.*` keys).
pub fn config_from_gguf(g: &GgufFile) -> Result<ModelConfig> {
    common_gguf(g, "qwen2", RopeStyle::Neox)
}
