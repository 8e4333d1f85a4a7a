//! Arbor's transformer engine.
//!
//! - [`fetch`] downloads and verifies the default model; [`Model::load`] opens a GGUF file or a
//!   Hugging Face folder.
//! - [`Tokenizer`] wraps the `tokenizers` crate (byte-level BPE built from GGUF metadata or
//!   `tokenizer.json`) and renders chat templates with `minijinja`.
//! - [`Engine`] runs batched, forkable decoding over a paged KV cache on a [`Backend`]; the
//!   native CPU backend lives in [`backend::cpu`].
//! - [`generate`] samples many sequences at once with stop strings and per-token log-probs.
//!
//! **Architecture Invariant:** this crate knows nothing of trees, search or gRPC.

pub mod arch;
pub mod backend;
mod engine;
mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
mod kv;
mod loader;
pub mod quant;
pub mod safetensors_folder;
pub mod sampling;
pub mod tiny;
mod tokenizer;

pub use arch::{ModelConfig, RopeStyle};
pub use backend::{Backend, ForwardBatch, HiddenLayer};
pub use engine::{Engine, EngineOptions, ForwardEntry, ForwardOutputs, SeqId};
pub use error::{ModelError, Result};
pub use generate::{GenOutput, GenRequest, StopReason};
pub use kv::KV_BLOCK_TOKENS;
pub use loader::{Model, ModelSource};
pub use sampling::SamplingParams;
pub use tokenizer::{ChatMessage, Tokenizer};
