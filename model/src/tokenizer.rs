//! Byte-level BPE tokenizer (the `tokenizers` crate) and chat templates (`minijinja`).

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` split pattern (digits one at a time).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` split pattern (digits in runs of up to three).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split pattern.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Names of end-of-turn tokens that end generation in the families Arbor runs.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
];

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with a role.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Text ↔ token ids, plus the model's chat template.
pub struct Tokenizer {
    /// Parses special tokens (`<|im_start|>`) in text into their ids.
    with_special: tokenizers::Tokenizer,
    /// Treats special-token text as ordinary text (for untrusted user input).
    plain: Option<tokenizers::Tokenizer>,
    eos: HashSet<u32>,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.with_special.get_vocab_size(true))
            .field("eos", &self.eos)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata: `tokenizer.ggml.{model,pre,tokens,merges,token_type}`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::metadata(
                "tokenizer.ggml.model",
                format!("`{model}` tokenizers are not supported (supported: gpt2 byte-level BPE)"),
            ));
        }
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let pattern = match pre {
            "qwen2" | "deepseek-r1-qwen" => QWEN2_PATTERN,
            "llama3" | "llama-bpe" | "smaug-bpe" => LLAMA3_PATTERN,
            "default" | "gpt2" => GPT2_PATTERN,
            other => {
                return Err(ModelError::metadata(
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer `{other}` is not supported"),
                ))
            }
        };
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| {
                ModelError::metadata("tokenizer.ggml.tokens", "missing or not an array")
            })?;
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        let mut names = Vec::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let s = t.as_str().ok_or_else(|| {
                ModelError::metadata("tokenizer.ggml.tokens", format!("item {i} is not a string"))
            })?;
            vocab.insert(s.to_string(), i as u32);
            names.push(s);
        }
        let merges_meta = g
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.as_array())
            .ok_or_else(|| {
                ModelError::metadata("tokenizer.ggml.merges", "missing or not an array")
            })?;
        let mut merges = Vec::with_capacity(merges_meta.len());
        for (i, m) in merges_meta.iter().enumerate() {
            let (a, b) = m.as_str().and_then(|s| s.split_once(' ')).ok_or_else(|| {
                ModelError::metadata(
                    "tokenizer.ggml.merges",
                    format!("item {i} is not `left right`"),
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let specials: Vec<AddedToken> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(_, n)| AddedToken::from(n.to_string(), true))
            .collect();
        let build = |with_specials: bool| -> Result<tokenizers::Tokenizer> {
            let bpe = BPE::builder()
                .vocab_and_merges(vocab.clone(), merges.clone())
                .build()
                .map_err(tk_err)?;
            let mut tk = tokenizers::Tokenizer::new(bpe);
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tk_err)?;
            let pre = Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
            ]);
            tk.with_pre_tokenizer(Some(pre));
            tk.with_decoder(Some(ByteLevelDecoder::default()));
            if with_specials {
                tk.add_special_tokens(&specials);
            }
            Ok(tk)
        };
        let mut eos = HashSet::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = g.get(key).and_then(|v| v.as_u64()) {
                eos.insert(id as u32);
            }
        }
        for (i, n) in names.iter().enumerate() {
            if END_TOKENS.contains(n) && matches!(types.get(i), Some(3) | None) {
                eos.insert(i as u32);
            }
        }
        let token_name = |key: &str| {
            g.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| names.get(id as usize))
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        Ok(Tokenizer {
            with_special: build(true)?,
            plain: Some(build(false)?),
            eos,
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            bos_token: token_name("tokenizer.ggml.bos_token_id"),
            eos_token: token_name("tokenizer.ggml.eos_token_id"),
        })
    }

    /// Loads `tokenizer.json` (and the chat template from `tokenizer_config.json`) from a folder.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tk = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::Format {
                path: cfg_path.clone(),
                reason: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let tok_str = |v: &serde_json::Value| -> Option<String> {
            v.as_str().map(str::to_string).or_else(|| {
                v.get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
        };
        let eos_token = tok_str(&cfg["eos_token"]).unwrap_or_default();
        let bos_token = tok_str(&cfg["bos_token"]).unwrap_or_default();
        let mut eos = HashSet::new();
        for name in END_TOKENS
            .iter()
            .copied()
            .chain(std::iter::once(eos_token.as_str()))
        {
            if let Some(id) = tk.token_to_id(name) {
                eos.insert(id);
            }
        }
        Ok(Tokenizer {
            with_special: tk,
            plain: None,
            eos,
            chat_template: cfg["chat_template"].as_str().map(str::to_string),
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`. With `parse_special`, text such as `<|im_start|>` becomes its
    /// special token; without, it is tokenized as the characters it is made of.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special {
            &self.with_special
        } else {
            self.plain.as_ref().unwrap_or(&self.with_special)
        };
        Ok(tk
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of token ids (special tokens included verbatim; invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.with_special.decode(ids, false).map_err(tk_err)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// A digest of what the token ids mean: every token's text, in id order, and the
    /// end-of-sequence ids (SHA-256, first 16 bytes as hex). Tokenizers with equal fingerprints
    /// turn the same ids into the same text, so a coordinator can check that its workers speak
    /// its own ids before it sends them any.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut vocab: Vec<(u32, String)> = self
            .with_special
            .get_vocab(true)
            .into_iter()
            .map(|(text, id)| (id, text))
            .collect();
        vocab.sort_unstable();
        let mut h = Sha256::new();
        for (id, text) in &vocab {
            h.update(id.to_le_bytes());
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        let mut eos: Vec<u32> = self.eos.iter().copied().collect();
        eos.sort_unstable();
        for id in eos {
            h.update(b"eos");
            h.update(id.to_le_bytes());
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.with_special.get_vocab_size(true)
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the model's chat template (a real Jinja engine, so the
    /// template's own logic, such as a default system prompt, applies).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}
