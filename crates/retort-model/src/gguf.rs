//! Reading GGUF files (llama.cpp's format): configuration, weights under Hugging Face names, the
//! tokenizer and the chat template, all from one file.
//!
//! Two GGUF facts matter here:
//! - For the `llama` architecture, llama.cpp's converter permutes the rows of `attn_q`/`attn_k` so
//!   that its interleaved RoPE applies. We undo that permutation on load (row-wise, which works on
//!   quantized blocks too, since blocks run along rows), so the model uses Hugging Face's
//!   half-split RoPE and saved checkpoints load in `transformers` unchanged. `qwen2` is not permuted.
//! - Without `output.weight` the LM head is tied to `token_embd.weight`.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};

use crate::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::weights::{Stored, Weights};

/// An open GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    file: fs_err::File,
    content: Content,
}

impl GgufFile {
    /// Open and validate: the header parses and every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = fs_err::File::open(path)?;
        let corrupt = |reason: String| Error::CorruptWeights {
            path: path.to_path_buf(),
            format: "GGUF",
            reason,
        };
        let content = Content::read(&mut file).map_err(|e| corrupt(e.to_string()))?;
        let file_len = file.seek(SeekFrom::End(0))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bytes = (elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(corrupt(format!(
                    "tensor `{name}` ends at byte {end} but the file has {file_len} bytes"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        self.metadata(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.metadata(key).ok_or_else(|| self.missing(key))?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(Error::Config {
                    path: self.path.clone(),
                    field: key.to_string(),
                    problem: format!("is {other:?}, expected a non-negative integer"),
                    hint: "the GGUF metadata is damaged; convert the model again".into(),
                });
            }
        };
        Ok(n as usize)
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.metadata(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::Config {
            path: self.path.clone(),
            field: key.to_string(),
            problem: "is missing from the GGUF metadata".into(),
            hint: "the file was not written by llama.cpp's converter or is damaged".into(),
        }
    }

    /// `general.architecture`, mapped to ours.
    pub fn arch(&self) -> Result<Arch> {
        let name = self
            .meta_str("general.architecture")
            .ok_or_else(|| self.missing("general.architecture"))?;
        Arch::parse(name).ok_or_else(|| Error::UnsupportedArchitecture {
            path: self.path.clone(),
            arch: name.to_string(),
        })
    }

    /// The model configuration implied by the metadata and tensor shapes.
    pub fn config(&self) -> Result<Config> {
        let arch = self.arch()?;
        let a = self
            .meta_str("general.architecture")
            .ok_or_else(|| self.missing("general.architecture"))?
            .to_string();
        let hidden_size = self.meta_usize(&format!("{a}.embedding_length"))?;
        let num_attention_heads = self.meta_usize(&format!("{a}.attention.head_count"))?;
        let num_key_value_heads = self
            .meta_usize(&format!("{a}.attention.head_count_kv"))
            .unwrap_or(num_attention_heads);
        let head_dim = self
            .meta_usize(&format!("{a}.attention.key_length"))
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::Weights {
                path: self.path.clone(),
                name: "token_embd.weight".into(),
                problem: "is missing".into(),
            })?;
        let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
        let tok_u32 = |k: &str| self.meta_usize(k).ok().map(|v| v as u32);
        let cfg = Config {
            arch,
            hidden_size,
            intermediate_size: self.meta_usize(&format!("{a}.feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&format!("{a}.block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))
                .ok_or_else(|| self.missing(&format!("{a}.attention.layer_norm_rms_epsilon")))?,
            rope_theta: self
                .meta_f64(&format!("{a}.rope.freq_base"))
                .unwrap_or(10_000.0),
            max_position_embeddings: self
                .meta_usize(&format!("{a}.context_length"))
                .unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
            eos_token_id: tok_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// Read every tensor, named as in Hugging Face checkpoints. Quantized tensors stay quantized
    /// here; the model decides whether to dequantize.
    pub fn weights(&mut self, device: &Device) -> Result<Weights> {
        let cfg = self.config()?;
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut tensors = HashMap::with_capacity(names.len());
        for gguf_name in names {
            let Some(hf_name) = hf_name(&gguf_name) else {
                tracing::debug!("ignoring GGUF tensor `{gguf_name}`");
                continue;
            };
            let q = self
                .content
                .tensor(&mut self.file, &gguf_name, device)
                .map_err(|e| Error::CorruptWeights {
                    path: self.path.clone(),
                    format: "GGUF",
                    reason: e.to_string(),
                })?;
            let q = if cfg.arch == Arch::Llama {
                if hf_name.ends_with("q_proj.weight") {
                    unpermute_rows(q, cfg.num_attention_heads, device)?
                } else if hf_name.ends_with("k_proj.weight") {
                    unpermute_rows(q, cfg.num_key_value_heads, device)?
                } else {
                    q
                }
            } else {
                q
            };
            let stored = match q.dtype() {
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                    Stored::Dense(q.dequantize(device)?)
                }
                _ => Stored::Quantized(Arc::new(q)),
            };
            tensors.insert(hf_name, stored);
        }
        Ok(Weights::new(&self.path, tensors, device))
    }

    /// `tokenizer.chat_template`, if the file carries one.
    pub fn chat_template(&self) -> Option<String> {
        self.meta_str("tokenizer.chat_template").map(str::to_string)
    }
}

/// GGUF tensor name → Hugging Face name; `None` for tensors we do not use (e.g. `rope_freqs`).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{kind}"))
}

/// Undo llama.cpp's Q/K row permutation: GGUF rows are ordered, per head, as
/// `(D/2, 2)` (interleaved pairs); Hugging Face orders them `(2, D/2)` (halves).
/// Works on raw blocks because quantization blocks run along a row.
fn unpermute_rows(q: QTensor, n_heads: usize, device: &Device) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let [rows, cols] = dims[..] else {
        return Err(Error::invalid(
            format!("expected a 2-D Q/K weight, got {dims:?}"),
            "convert the model again",
        ));
    };
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) holds HF row (h, j, i).
                let src = h * head_dim + i * 2 + j;
                let dst = h * head_dim + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's converter: w.reshape(H, 2, D/2, C).swapaxes(1, 2).reshape(H*D, C).
        let (h, d, c) = (2usize, 4usize, 32usize);
        let hf: Vec<f32> = (0..h * d * c).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for hh in 0..h {
            for two in 0..2 {
                for i in 0..d / 2 {
                    let src_row = hh * d + two * (d / 2) + i; // (H, 2, D/2)
                    let dst_row = hh * d + i * 2 + two; // (H, D/2, 2)
                    gguf[dst_row * c..(dst_row + 1) * c]
                        .copy_from_slice(&hf[src_row * c..(src_row + 1) * c]);
                }
            }
        }
        let dev = Device::Cpu;
        let t = candle_core::Tensor::from_vec(gguf, (h * d, c), &dev).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let back = unpermute_rows(q, h, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
    }
}
