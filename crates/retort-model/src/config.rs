//! The model configuration, in Hugging Face `config.json` terms.
//!
//! One struct describes every llama-family model we run. It reads and writes `config.json`
//! (so checkpoints load in `transformers`) and is also built from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which member of the llama family. The only architectural difference we carry is Qwen2's
/// bias on the q/k/v projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    /// Hugging Face `architectures[0]` for this family.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// `model_type` / GGUF `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Parse `model_type` (HF) or `general.architecture` (GGUF). `mistral` and `smollm` are llama.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" | "mistral" | "smollm" | "smollm2" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }
}

/// Hyper-parameters of a llama-family decoder. Field names are those of `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    /// C: width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// H: query heads.
    pub num_attention_heads: usize,
    /// KVH: key/value heads (grouped-query attention when < H).
    pub num_key_value_heads: usize,
    /// D: per-head width, `hidden_size / num_attention_heads` unless given.
    pub head_dim: usize,
    /// V: vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

/// The subset of `config.json` we read; unknown keys are ignored because every HF model adds its own.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
}

impl Config {
    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Check the invariants the forward pass relies on; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, problem: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
            hint: "fix the value or use the config that came with the weights".to_string(),
        };
        for (f, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(f, "is 0".into()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "({}) does not divide num_attention_heads ({})",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("({}) must be even for RoPE", self.head_dim),
            ));
        }
        Ok(())
    }

    /// Read a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Config> {
        let text = fs_err::read_to_string(path)?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            field: "(file)".into(),
            problem: format!("is not valid JSON: {e}"),
            hint: "the file is damaged; restore it from the model's source".into(),
        })?;
        let need = |field: &str, v: Option<usize>| {
            v.ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                field: field.to_string(),
                problem: "is missing".into(),
                hint: "a llama-family config.json must set it".into(),
            })
        };
        let arch_name = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let arch = Arch::parse(&arch_name)
            .or(match arch_name.as_str() {
                "LlamaForCausalLM" | "MistralForCausalLM" => Some(Arch::Llama),
                "Qwen2ForCausalLM" => Some(Arch::Qwen2),
                _ => None,
            })
            .ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: if arch_name.is_empty() {
                    "(unnamed)".into()
                } else {
                    arch_name.clone()
                },
            })?;
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "hidden_act".into(),
                problem: format!("is `{act}`; only `silu` (SwiGLU) is implemented"),
                hint: "this model is not a llama-family model retort can run".into(),
            });
        }
        if let Some(rs) = &hf.rope_scaling
            && !rs.is_null()
        {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "rope_scaling".into(),
                problem: format!("is {rs}; RoPE scaling is not implemented"),
                hint: "use a model without rope_scaling".into(),
            });
        }
        if arch == Arch::Llama && hf.attention_bias == Some(true) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "attention_bias".into(),
                problem: "is true; llama with attention bias is not implemented".into(),
                hint: "use a model without attention bias".into(),
            });
        }
        let hidden_size = need("hidden_size", hf.hidden_size)?;
        let num_attention_heads = need("num_attention_heads", hf.num_attention_heads)?;
        // Absent or null: no end-of-sequence id here (generation_config.json or the tokenizer
        // may name one). Anything else must be a token id or a list of them.
        let bad_eos = |v: &serde_json::Value| Error::Config {
            path: path.to_path_buf(),
            field: "eos_token_id".into(),
            problem: format!("is {v}, not a token id or a list of token ids"),
            hint: "set it to a non-negative integer (or a list of them) below 2^32, or remove it"
                .into(),
        };
        let token_id = |v: &serde_json::Value| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| bad_eos(v))
        };
        let eos_token_id = match &hf.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Array(a)) => a.iter().map(token_id).collect::<Result<_>>()?,
            Some(v) => vec![token_id(v)?],
        };
        let cfg = Config {
            arch,
            hidden_size,
            intermediate_size: need("intermediate_size", hf.intermediate_size)?,
            num_hidden_layers: need("num_hidden_layers", hf.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
            vocab_size: need("vocab_size", hf.vocab_size)?,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: hf.bos_token_id,
            eos_token_id,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The `config.json` that `transformers` reads for this model (weights stored as float32).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let eos = match self.eos_token_id.as_slice() {
            [] => serde_json::Value::Null,
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        if let Some(obj) = v.as_object_mut() {
            match self.arch {
                Arch::Llama => {
                    obj.insert("attention_bias".into(), false.into());
                    obj.insert("mlp_bias".into(), false.into());
                    obj.insert("pretraining_tp".into(), 1.into());
                }
                Arch::Qwen2 => {
                    obj.insert("use_sliding_window".into(), false.into());
                    obj.insert("sliding_window".into(), serde_json::Value::Null);
                    obj.insert("max_window_layers".into(), self.num_hidden_layers.into());
                }
            }
        }
        v
    }

    /// Total parameter count (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let bias = if self.arch.qkv_bias() { q + 2 * kv } else { 0 };
        let layer = c * q + 2 * c * kv + q * c + bias + 3 * c * f + 2 * c;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.num_hidden_layers * layer + c + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> Config {
        Config {
            arch: Arch::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
        }
    }

    #[test]
    fn smollm2_135m_has_134_5m_parameters() {
        // transformers reports 134,515,008 parameters for SmolLM2-135M.
        assert_eq!(smol().num_parameters(), 134_515_008);
    }

    #[test]
    fn hf_json_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let cfg = smol();
        fs_err::write(&p, serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap()).unwrap();
        assert_eq!(Config::from_hf_json(&p).unwrap(), cfg);
    }

    #[test]
    fn unsupported_architecture_names_file_and_arch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        fs_err::write(&p, r#"{"model_type":"gpt_neox","hidden_size":8}"#).unwrap();
        let e = Config::from_hf_json(&p).unwrap_err().to_string();
        assert!(
            e.contains("gpt_neox") && e.contains("config.json") && e.contains("hint:"),
            "{e}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        fs_err::write(
            &p,
            r#"{"model_type":"llama","hidden_size":8,"num_attention_heads":2}"#,
        )
        .unwrap();
        let e = Config::from_hf_json(&p).unwrap_err().to_string();
        assert!(
            e.contains("intermediate_size") && e.contains("is missing"),
            "{e}"
        );
    }

    #[test]
    fn eos_token_id_is_an_id_a_list_or_absent_and_anything_else_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let read = |eos: &str| {
            let mut hf = smol().to_hf_json();
            hf["eos_token_id"] = serde_json::from_str(eos).unwrap();
            fs_err::write(&p, hf.to_string()).unwrap();
            Config::from_hf_json(&p).map(|c| c.eos_token_id)
        };
        assert_eq!(read("2").unwrap(), vec![2]);
        assert_eq!(read("[2, 49152]").unwrap(), vec![2, 49152]);
        assert_eq!(read("null").unwrap(), Vec::<u32>::new());
        for bad in ["-1", "2.5", "\"</s>\"", "[2, \"x\"]", "4294967296", "{}"] {
            let e = read(bad).unwrap_err().to_string();
            assert!(
                e.contains("eos_token_id") && e.contains("config.json") && e.contains("hint:"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let mut c = smol();
        c.num_key_value_heads = 4;
        let e = c.validate(Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
