//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while fetching, loading or running a model.
///
/// Variants carry the structured facts a user needs to fix the input: the file, the byte
/// offset, the tensor name, the limit that was crossed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An operating-system error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The GGUF file is malformed at a known byte offset.
    #[error("GGUF parse error at byte offset {offset}: {reason}")]
    GgufParse {
        /// Byte offset in the file where parsing failed.
        offset: u64,
        /// What was wrong there.
        reason: String,
    },
    /// A tensor is present but unusable (bad shape, out of bounds data, wrong type).
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// Tensor name as stored in the file.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is not in the file.
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    /// A metadata key the architecture needs is missing or has the wrong type.
    #[error("metadata key `{key}`: {reason}")]
    Metadata {
        /// The key, e.g. `qwen2.block_count`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tensor type is not supported by this engine.
    #[error("tensor `{name}` has type {ty}, which Arbor does not support (supported: F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q4_K, Q6_K)")]
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// The type's name or numeric id.
        ty: String,
    },
    /// The architecture is not one this engine runs.
    #[error("architecture `{0}` is not supported (supported: qwen2, llama)")]
    UnsupportedArchitecture(String),
    /// A Hugging Face folder or safetensors file is malformed.
    #[error("{path}: {reason}")]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// Downloading or verifying the default model failed.
    #[error("model fetch: {0}")]
    Fetch(String),
    /// A request to the engine broke one of its limits or referred to something unknown.
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The request field at fault, e.g. `tokens` or `max_tokens`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The KV cache has no free block left under its configured limit.
    #[error("KV cache is full: {needed} more blocks needed, limit is {limit} blocks of {block_size} tokens")]
    KvCacheFull {
        /// Blocks the request would need.
        needed: usize,
        /// Configured block limit.
        limit: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// The GPU backend failed: no adapter, a device limit, an allocation, or a lost device.
    #[error("GPU backend: {0}")]
    Device(String),
}

impl Clone for ModelError {
    /// A copy of the error; an I/O error keeps its kind and message (`std::io::Error` is not
    /// `Clone`). Continuous batching needs it: one failed forward pass fails every job in it.
    fn clone(&self) -> Self {
        use ModelError::*;
        match self {
            Io { path, source } => Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            GgufParse { offset, reason } => GgufParse {
                offset: *offset,
                reason: reason.clone(),
            },
            Tensor { name, reason } => Tensor {
                name: name.clone(),
                reason: reason.clone(),
            },
            MissingTensor(n) => MissingTensor(n.clone()),
            Metadata { key, reason } => Metadata {
                key: key.clone(),
                reason: reason.clone(),
            },
            UnsupportedType { name, ty } => UnsupportedType {
                name: name.clone(),
                ty: ty.clone(),
            },
            UnsupportedArchitecture(a) => UnsupportedArchitecture(a.clone()),
            Format { path, reason } => Format {
                path: path.clone(),
                reason: reason.clone(),
            },
            Tokenizer(m) => Tokenizer(m.clone()),
            Template(m) => Template(m.clone()),
            Fetch(m) => Fetch(m.clone()),
            Device(m) => Device(m.clone()),
            InvalidRequest { field, reason } => InvalidRequest {
                field,
                reason: reason.clone(),
            },
            KvCacheFull {
                needed,
                limit,
                block_size,
            } => KvCacheFull {
                needed: *needed,
                limit: *limit,
                block_size: *block_size,
            },
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn tensor(name: &str, reason: impl Into<String>) -> Self {
        ModelError::Tensor {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
    pub(crate) fn metadata(key: &str, reason: impl Into<String>) -> Self {
        ModelError::Metadata {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ModelError::InvalidRequest {
            field,
            reason: reason.into(),
        }
    }
}
