//! Hugging Face folders: `config.json`, one or more `*.safetensors`, `tokenizer.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::Dtype;

use crate::arch::{HfConfig, WeightSource};
use crate::error::{ModelError, Result};
use crate::quant::{dequantize_row, GgmlType, QMatrix, Storage};

struct Entry {
    file: usize,
    dtype: GgmlType,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// The tensors of every `*.safetensors` file in a folder, memory-mapped, plus its `config.json`.
pub struct SafetensorsFolder {
    pub(crate) hf_config: HfConfig,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, Entry>,
}

/// Maps a GGUF tensor name to the Hugging Face name of the same tensor.
pub fn hf_name(gguf: &str) -> String {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return t.to_string();
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return gguf.to_string();
    };
    let (stem, kind) = tail.rsplit_once('.').unwrap_or((tail, ""));
    let mapped = match stem {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => other,
    };
    format!("model.layers.{layer}.{mapped}.{kind}")
}

impl SafetensorsFolder {
    /// Opens `dir`, reading `config.json` and the headers of every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let hf_config: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: cfg_path.clone(),
            reason: format!("config.json: {e}"),
        })?;
        // Reject an unsupported or inconsistent config before touching gigabytes of weights.
        hf_config.to_config()?;
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::Format {
                path: dir.into(),
                reason: "no *.safetensors file in the folder".into(),
            });
        }
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: read-only map of a file Arbor does not modify; all reads are bounds-checked.
            let mmap = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?);
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&mmap[..]).map_err(|e| {
                    ModelError::Format {
                        path: path.clone(),
                        reason: format!("safetensors header: {e}"),
                    }
                })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedType {
                            name: name.clone(),
                            ty: format!("safetensors {other:?}"),
                        })
                    }
                };
                let (start, end) = info.data_offsets;
                if data_start + end > mmap.len() || start > end {
                    return Err(ModelError::tensor(
                        &name,
                        format!(
                            "data range {start}..{end} beyond the end of {}",
                            path.display()
                        ),
                    ));
                }
                tensors.insert(
                    name.clone(),
                    Entry {
                        file: files.len(),
                        dtype,
                        shape: info.shape.clone(),
                        offset: data_start + start,
                        len: end - start,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(SafetensorsFolder {
            hf_config,
            files,
            tensors,
        })
    }

    /// [`crate::loader::weights_fingerprint`] of the folder's tensors.
    pub(crate) fn weights_fingerprint(&self) -> String {
        let shapes: Vec<(&str, &Entry, Vec<u64>)> = self
            .tensors
            .iter()
            .map(|(n, e)| (n.as_str(), e, e.shape.iter().map(|&d| d as u64).collect()))
            .collect();
        crate::loader::weights_fingerprint(shapes.iter().map(|(n, e, dims)| {
            let bytes = &self.files[e.file].1[e.offset..e.offset + e.len];
            (*n, e.dtype, &dims[..], bytes)
        }))
    }

    /// Whether the folder holds a tensor of this (Hugging Face) name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor by its Hugging Face name, as f32 (from f32, f16 or bf16), with its shape: for
    /// tensors outside the decoder, such as a reward model's head.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let n: usize = e.shape.iter().product();
        let mut out = vec![0f32; n];
        let storage = self.storage(e);
        let bytes = storage.bytes();
        if bytes.len() != e.dtype.row_bytes(n) {
            return Err(ModelError::tensor(
                name,
                format!("{} bytes for shape {:?}", bytes.len(), e.shape),
            ));
        }
        dequantize_row(e.dtype, bytes, &mut out);
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::tensor(
                name,
                format!("element {i} is not finite ({})", out[i]),
            ));
        }
        Ok((e.shape.clone(), out))
    }

    fn entry(&self, gguf_name: &str) -> Result<(&Entry, String)> {
        let name = hf_name(gguf_name);
        let e = self
            .tensors
            .get(&name)
            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
        Ok((e, name))
    }

    fn storage(&self, e: &Entry) -> Storage {
        Storage::Mapped {
            mmap: self.files[e.file].1.clone(),
            offset: e.offset,
            len: e.len,
        }
    }
}

impl WeightSource for SafetensorsFolder {
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(&hf_name(name))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let (e, hf) = self.entry(name)?;
        if e.shape != [rows, cols] {
            return Err(ModelError::tensor(
                &hf,
                format!("shape {:?}, expected [{rows}, {cols}]", e.shape),
            ));
        }
        QMatrix::new(&hf, e.dtype, rows, cols, self.storage(e))?.into_matmul_ready(&hf)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (e, hf) = self.entry(name)?;
        if e.shape != [len] {
            return Err(ModelError::tensor(
                &hf,
                format!("shape {:?}, expected [{len}]", e.shape),
            ));
        }
        let mut out = vec![0f32; len];
        dequantize_row(e.dtype, self.storage(e).bytes(), &mut out);
        Ok(out)
    }
}
