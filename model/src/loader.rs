//! Opening a model: a GGUF file or a Hugging Face folder, into config + weights + tokenizer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::arch::{config_from_gguf, DecoderWeights, ModelConfig, WeightSource};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::{dequantize_row, QMatrix, Storage};
use crate::safetensors_folder::SafetensorsFolder;
use crate::tokenizer::Tokenizer;

/// What a model was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    HfFolder(PathBuf),
}

/// A loaded model: hyper-parameters, weights (shared, read-only) and tokenizer.
pub struct Model {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Weights, shared by every backend instance and engine built from this model.
    pub weights: Arc<DecoderWeights>,
    /// Tokenizer and chat template.
    pub tokenizer: Arc<Tokenizer>,
    /// Where it came from.
    pub source: ModelSource,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("source", &self.source)
            .finish()
    }
}

impl Model {
    /// Loads a GGUF file, or a folder holding `config.json` and `*.safetensors`.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if meta.is_dir() {
            Self::load_hf_folder(path)
        } else {
            Self::load_gguf(path)
        }
    }

    /// Loads only the tokenizer (and chat template) of a GGUF file or Hugging Face folder: what a
    /// coordinator needs to build prompts, without the cost of the weights.
    pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if meta.is_dir() {
            Tokenizer::from_hf_folder(path)
        } else {
            Tokenizer::from_gguf(&GgufFile::open(path)?)
        }
    }

    /// Loads a GGUF file through a memory map; quantized weights stay quantized.
    pub fn load_gguf(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = config_from_gguf(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let weights = DecoderWeights::load(&config, &g)?;
        tracing::info!(path = %path.display(), arch = %config.architecture, layers = config.n_layers, "loaded GGUF model");
        Ok(Model {
            config,
            weights: Arc::new(weights),
            tokenizer: Arc::new(tokenizer),
            source: ModelSource::Gguf(path.into()),
        })
    }

    /// Loads a Hugging Face folder. Float weights are re-stored as Q8_0 for the CPU kernels.
    pub fn load_hf_folder(dir: &Path) -> Result<Self> {
        let folder = SafetensorsFolder::open(dir)?;
        let config = folder.hf_config.to_config()?;
        let tokenizer = Tokenizer::from_hf_folder(dir)?;
        let weights = DecoderWeights::load(&config, &folder)?;
        Ok(Model {
            config,
            weights: Arc::new(weights),
            tokenizer: Arc::new(tokenizer),
            source: ModelSource::HfFolder(dir.into()),
        })
    }
}

impl WeightSource for GgufFile {
    fn has(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let info = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if info.dims != [cols as u64, rows as u64] {
            return Err(ModelError::tensor(
                name,
                format!(
                    "shape {:?} (GGML order), expected [{cols}, {rows}]",
                    info.dims
                ),
            ));
        }
        let storage = Storage::Mapped {
            mmap: self.mmap.clone(),
            offset: info.offset as usize,
            len: info.size as usize,
        };
        QMatrix::new(name, info.ty, rows, cols, storage)?.into_matmul_ready(name)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let info = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if info.n_elements() != len as u64 || info.dims.iter().filter(|&&d| d != 1).count() > 1 {
            return Err(ModelError::tensor(
                name,
                format!("shape {:?}, expected a vector of {len}", info.dims),
            ));
        }
        let mut out = vec![0f32; len];
        dequantize_row(info.ty, self.tensor_bytes(info), &mut out);
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::tensor(
                name,
                format!("element {i} is not finite ({})", out[i]),
            ));
        }
        Ok(out)
    }
}
