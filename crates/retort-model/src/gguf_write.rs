//! Writing a checkpoint as a GGUF file llama.cpp runs (`retort export-gguf`): the student a run
//! produced, in a format that `llama-cli`, `llama-server`, Ollama and LM Studio load.
//!
//! What llama.cpp's own converter (`convert_hf_to_gguf.py`) writes, for the two architectures
//! retort trains:
//! - tensors under llama.cpp's names (the inverse of [`crate::gguf::hf_name`]); for `llama`, the
//!   rows of `attn_q`/`attn_k` permuted for its interleaved RoPE (`qwen2` is not permuted);
//!   matrices in the chosen type (a matrix whose rows are not whole blocks falls back to F16),
//!   norms and biases in F32; no `output.weight` when the head is tied to the embeddings;
//! - the architecture's hyperparameters (`{arch}.block_count`, …, `rope.freq_base`);
//! - the tokenizer as llama.cpp's `gpt2` (byte-level BPE) model: every token by id (ids the
//!   tokenizer lacks below the embedding's rows become `[PAD{id}]`, type unused), token types
//!   (special added tokens are control tokens), merges, BOS/EOS, and `tokenizer.ggml.pre`, the
//!   name under which llama.cpp finds the pre-tokenizer's splitting rules. retort recognises the
//!   pre-tokenizers of the families it supports by their rules (not by the model's name):
//!   Qwen2's, Llama 3's, SmolLM's and GPT-2's; any other is an error rather than a file that
//!   llama.cpp would tokenize differently from the model's own tokenizer;
//! - the chat template.
//!
//! The file is written next to its destination and renamed into place, so an interrupted export
//! leaves no half-written file under the final name.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};

use crate::checkpoint::Checkpoint;
use crate::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The type the matrices are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl std::str::FromStr for GgufType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_0" | "q4" => Ok(Self::Q4_0),
            _ => Err(format!(
                "unknown GGUF type `{s}` (expected q8_0, q4_0, f16 or f32)"
            )),
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        })
    }
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
        }
    }
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub path: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
    /// `tokenizer.ggml.pre`.
    pub pre_tokenizer: &'static str,
    /// Matrices stored as F16 because their rows are not whole blocks of the chosen type.
    pub f16_fallback: Vec<String>,
}

/// Hugging Face tensor name → llama.cpp's (the inverse of [`crate::gguf::hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Write `ck` (any checkpoint retort reads; a LoRA run's `model/` is already merged) as a GGUF
/// file at `out` with matrices in `ty`. `name` goes to `general.name`.
pub fn write_gguf(ck: &Checkpoint, ty: GgufType, out: &Path, name: &str) -> Result<Exported> {
    let cfg = &ck.config;
    let (tokenizer_meta, pre) = tokenizer_metadata(&ck.tokenizer, cfg, &ck.path)?;
    let mut meta = model_metadata(cfg, ty, name);
    meta.extend(tokenizer_meta);

    let weights = &ck.weights;
    let mut names: Vec<&String> = weights.names().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut f16_fallback = Vec::new();
    for hf in names {
        if hf == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        let Some(g) = gguf_name(hf) else {
            tracing::debug!("export-gguf: skipping `{hf}` (not a tensor llama.cpp reads)");
            continue;
        };
        let dims = weights.tensors()[hf].dims();
        let t = to_gguf_layout(cfg, hf, weights.dense(hf, &dims)?)?;
        let dtype = if dims.len() < 2 {
            GgmlDType::F32
        } else if dims[dims.len() - 1].is_multiple_of(ty.ggml().block_size()) {
            ty.ggml()
        } else {
            f16_fallback.push(g.clone());
            GgmlDType::F16
        };
        tensors.push((g, QTensor::quantize(&t, dtype)?));
    }
    for required in ["token_embd.weight", "output_norm.weight"] {
        if !tensors.iter().any(|(n, _)| n == required) {
            return Err(Error::Weights {
                path: ck.path.clone(),
                name: required.into(),
                problem: "is missing, so llama.cpp could not load the export".into(),
            });
        }
    }

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs_err::create_dir_all(parent)?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model.gguf".into());
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = (|| -> Result<u64> {
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut w = BufWriter::new(fs_err::File::create(&tmp)?);
        candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    })();
    let bytes = match written {
        Ok(b) => b,
        Err(e) => {
            let _ = fs_err::remove_file(&tmp);
            return Err(e);
        }
    };
    fs_err::rename(&tmp, out)?;
    Ok(Exported {
        path: out.to_path_buf(),
        tensors: tensors.len(),
        bytes,
        pre_tokenizer: pre,
        f16_fallback,
    })
}

/// A weight in llama.cpp's row order: for `llama`, the rows of `q_proj`/`k_proj` permuted as its
/// converter does for interleaved RoPE (`w.reshape(H, 2, D/2, C).swapaxes(1, 2)`; the inverse of
/// what [`crate::gguf`] undoes on load); every other tensor as it is.
pub fn to_gguf_layout(cfg: &Config, hf: &str, t: Tensor) -> Result<Tensor> {
    let heads = if hf.ends_with("self_attn.q_proj.weight") {
        cfg.num_attention_heads
    } else if hf.ends_with("self_attn.k_proj.weight") {
        cfg.num_key_value_heads
    } else {
        return Ok(t);
    };
    if cfg.arch != Arch::Llama {
        return Ok(t);
    }
    let (rows, cols) = t.dims2()?;
    Ok(t.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn model_metadata(cfg: &Config, ty: GgufType, name: &str) -> Vec<(String, Value)> {
    let a = cfg.arch.name();
    let u = |x: usize| Value::U32(x as u32);
    let mut meta = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        (
            "general.quantization_version".into(),
            Value::U32(2), // GGML_QNT_VERSION
        ),
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(cfg.hidden_size)),
        (format!("{a}.feed_forward_length"), u(cfg.intermediate_size)),
        (format!("{a}.block_count"), u(cfg.num_hidden_layers)),
        (
            format!("{a}.attention.head_count"),
            u(cfg.num_attention_heads),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            u(cfg.num_key_value_heads),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (format!("{a}.rope.dimension_count"), u(cfg.head_dim)),
        (format!("{a}.vocab_size"), u(cfg.vocab_size)),
    ];
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        meta.push((format!("{a}.attention.key_length"), u(cfg.head_dim)));
        meta.push((format!("{a}.attention.value_length"), u(cfg.head_dim)));
    }
    meta
}

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The tokenizer as llama.cpp's `gpt2` model, and the `tokenizer.ggml.pre` name.
fn tokenizer_metadata(
    tok: &Tokenizer,
    cfg: &Config,
    source: &Path,
) -> Result<(Vec<(String, Value)>, &'static str)> {
    let bad = |problem: String, hint: &str| {
        Error::invalid(
            format!(
                "cannot export the tokenizer of `{}`: {problem}",
                source.display()
            ),
            hint,
        )
    };
    let text = tok.inner().to_string(false).map_err(|e| {
        bad(
            format!("it does not serialize: {e}"),
            "this is a bug in retort",
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        bad(
            format!("it does not serialize: {e}"),
            "this is a bug in retort",
        )
    })?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(
            format!("its model is {}, not byte-level BPE", model["type"]),
            "llama.cpp's `gpt2` tokenizer needs a byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM and GPT-2 families have one)",
        ));
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).ok_or_else(|| {
        bad(
            format!(
                "its pre-tokenizer is not one llama.cpp knows by name: {}",
                json["pre_tokenizer"]
            ),
            "retort exports the pre-tokenizers of Qwen2, Llama 3, SmolLM and GPT-2; convert other models with llama.cpp's convert_hf_to_gguf.py from the saved Hugging Face directory",
        )
    })?;
    let vocab = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; vocab];
    let mut types = vec![NORMAL; vocab];
    let mut put = |id: u64, token: &str, ty: i32| -> Result<()> {
        let i = usize::try_from(id).unwrap_or(usize::MAX);
        if i >= vocab {
            return Err(bad(
                format!("token `{token}` has id {id}, beyond the model's {vocab} embedding rows"),
                "the tokenizer does not belong to this model; save the model with its own tokenizer",
            ));
        }
        tokens[i] = Some(token.to_string());
        types[i] = ty;
        Ok(())
    };
    let Some(model_vocab) = model["vocab"].as_object() else {
        return Err(bad(
            "it has no vocabulary".into(),
            "this is a bug in retort",
        ));
    };
    for (token, id) in model_vocab {
        put(id.as_u64().unwrap_or(u64::MAX), token, NORMAL)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let ty = if added["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(
            added["id"].as_u64().unwrap_or(u64::MAX),
            added["content"].as_str().unwrap_or_default(),
            ty,
        )?;
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    let mut meta = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(tok.add_bos()),
        ),
    ];
    if let Some(b) = tok.bos_token_id().or(cfg.bos_token_id) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_id.first().or(tok.stop_ids().first()) {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = tok.template() {
        meta.push((
            "tokenizer.chat_template".into(),
            Value::String(t.source().to_string()),
        ));
    }
    Ok((meta, pre))
}

/// Qwen2's split rule (also Qwen2.5's and Qwen3's), as `tokenizer.json` writes it.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's: Qwen2's with digits in runs of up to three.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The case-insensitive contractions as some converters spell them out.
const CONTRACTIONS_SPELLED: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
const CONTRACTIONS: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)";

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer, by its rules.
pub fn pre_tokenizer_name(pre: &serde_json::Value) -> Option<&'static str> {
    let is_byte_level = |v: &serde_json::Value| v["type"] == "ByteLevel";
    match pre["type"].as_str()? {
        "ByteLevel" if pre["use_regex"].as_bool() != Some(false) => Some("gpt-2"),
        "Sequence" => {
            let parts = pre["pretokenizers"].as_array()?;
            match parts.as_slice() {
                [digits, bl]
                    if digits["type"] == "Digits"
                        && digits["individual_digits"].as_bool() == Some(true)
                        && is_byte_level(bl)
                        && bl["use_regex"].as_bool() != Some(false) =>
                {
                    Some("smollm")
                }
                [split, bl]
                    if split["type"] == "Split"
                        && is_byte_level(bl)
                        && bl["use_regex"].as_bool() == Some(false) =>
                {
                    let rule = split["pattern"]["Regex"]
                        .as_str()?
                        .replace(CONTRACTIONS_SPELLED, CONTRACTIONS);
                    let known: HashMap<&str, &'static str> =
                        [(QWEN2, "qwen2"), (LLAMA3, "llama-bpe")].into();
                    known.get(rule.as_str()).copied()
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_invert_the_reader() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.7.self_attn.k_proj.bias",
            "model.layers.23.mlp.down_proj.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(crate::gguf::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_name("model.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn pre_tokenizers_are_named_by_their_rules() {
        let split = |rule: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": rule}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
        };
        assert_eq!(pre_tokenizer_name(&split(QWEN2)), Some("qwen2"));
        assert_eq!(pre_tokenizer_name(&split(LLAMA3)), Some("llama-bpe"));
        // The spelled-out contractions a GGUF-built tokenizer writes.
        let spelled = QWEN2.replace(CONTRACTIONS, CONTRACTIONS_SPELLED);
        assert_eq!(pre_tokenizer_name(&split(&spelled)), Some("qwen2"));
        // One character off is not Qwen2's rule.
        assert_eq!(
            pre_tokenizer_name(&split(&QWEN2.replace(r"\p{N}|", r"\p{N}+|"))),
            None
        );
        let smollm = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
        assert_eq!(pre_tokenizer_name(&smollm), Some("smollm"));
        let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&gpt2), Some("gpt-2"));
        assert_eq!(pre_tokenizer_name(&json!({"type": "Whitespace"})), None);
        assert_eq!(pre_tokenizer_name(&serde_json::Value::Null), None);
    }

    #[test]
    fn types_parse_and_print() {
        for s in ["q8_0", "q4_0", "f16", "f32"] {
            assert_eq!(s.parse::<GgufType>().unwrap().to_string(), s);
        }
        assert!("q5_k".parse::<GgufType>().unwrap_err().contains("expected"));
    }
}
