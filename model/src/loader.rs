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
    /// A digest of its weights (every tensor's name, type and shape and a sample of its
    /// bytes; 32 hex digits), computed once at load: workers whose fingerprints differ run
    /// different models, even with the same tokenizer.
    pub weights_fingerprint: String,
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
        let weights_fingerprint = weights_fingerprint(
            g.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.ty, &t.dims[..], g.tensor_bytes(t))),
        );
        tracing::info!(path = %path.display(), arch = %config.architecture, layers = config.n_layers, "loaded GGUF model");
        Ok(Model {
            config,
            weights: Arc::new(weights),
            tokenizer: Arc::new(tokenizer),
            source: ModelSource::Gguf(path.into()),
            weights_fingerprint,
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
            weights_fingerprint: folder.weights_fingerprint(),
        })
    }
}

/// Bytes hashed from each sampled place of a tensor.
const SAMPLE_BYTES: usize = 256;

/// Places sampled in each tensor larger than `SAMPLE_BYTES * SAMPLES`.
const SAMPLES: usize = 16;

/// A digest of a model's weights: every tensor's name, storage type and shape, and a sample of
/// its bytes (all of a small tensor; 16 evenly spaced runs of 256 bytes, first and last
/// included, of a large one). SHA-256, first 16 bytes as hex. It reads a few pages per tensor,
/// not gigabytes, yet tells apart two quantizations, two fine-tunes or two sizes of a model:
/// any of those changes a type, a shape or nearly every byte. Tensors are taken in name order,
/// so the file's layout does not matter.
pub(crate) fn weights_fingerprint<'a>(
    tensors: impl IntoIterator<Item = (&'a str, crate::quant::GgmlType, &'a [u64], &'a [u8])>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, ty, dims, bytes) in tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{ty:?}").as_bytes());
        h.update((dims.len() as u64).to_le_bytes());
        for d in dims {
            h.update(d.to_le_bytes());
        }
        h.update((bytes.len() as u64).to_le_bytes());
        if bytes.len() <= SAMPLE_BYTES * SAMPLES {
            h.update(bytes);
        } else {
            let last = bytes.len() - SAMPLE_BYTES;
            for i in 0..SAMPLES {
                let at = last * i / (SAMPLES - 1);
                h.update(&bytes[at..at + SAMPLE_BYTES]);
            }
        }
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
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

#[cfg(test)]
mod tests {
    use super::weights_fingerprint;
    use crate::quant::GgmlType;

    #[test]
    fn weights_fingerprints_see_names_types_shapes_and_sampled_bytes() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let small = [7u8; 64];
        let fp = |big: &[u8], ty, dims: &[u64], name: &'static str| {
            weights_fingerprint([
                ("a.weight", GgmlType::F32, &[16u64][..], &small[..]),
                (name, ty, dims, big),
            ])
        };
        let base = fp(&big, GgmlType::Q8_0, &[100, 1000], "b.weight");
        assert_eq!(base.len(), 32);
        assert_eq!(base, fp(&big, GgmlType::Q8_0, &[100, 1000], "b.weight"));
        // Order of the tensors does not matter.
        assert_eq!(
            base,
            weights_fingerprint([
                ("b.weight", GgmlType::Q8_0, &[100u64, 1000][..], &big[..]),
                ("a.weight", GgmlType::F32, &[16u64][..], &small[..]),
            ])
        );
        assert_ne!(base, fp(&big, GgmlType::Q4K, &[100, 1000], "b.weight"));
        assert_ne!(base, fp(&big, GgmlType::Q8_0, &[1000, 100], "b.weight"));
        assert_ne!(base, fp(&big, GgmlType::Q8_0, &[100, 1000], "c.weight"));
        // The first and the last byte are always sampled.
        for at in [0, big.len() - 1] {
            let mut other = big.clone();
            other[at] ^= 1;
            assert_ne!(
                base,
                fp(&other, GgmlType::Q8_0, &[100, 1000], "b.weight"),
                "{at}"
            );
        }
    }
}
