//! Test helpers shared by retort's crates: tiny seeded random llama-family models and a tiny
//! word-level tokenizer with a ChatML template, all built in code (no downloads).
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let path = retort_test::write_tiny_model(dir.path(), &retort_test::tiny_config(retort_model::Arch::Llama), 0);
//! assert!(path.join("model.safetensors").exists());
//! ```

#![forbid(unsafe_code)]
// A test-support crate: a panic here is a failed test set-up, reported where it happens.
#![allow(clippy::unwrap_used)]

pub mod fake_openai;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use retort_model::chat_template::ChatTemplate;
use retort_model::weights::Stored;
use retort_model::{Arch, Config, Model, Tokenizer, WeightFormat, Weights};

/// Words of the tiny vocabulary after the special tokens.
pub const WORDS: &[&str] = &[
    "system",
    "user",
    "assistant",
    "the",
    "sky",
    "is",
    "blue",
    "why",
    "?",
    "because",
    "of",
    "light",
    "hello",
    "world",
    "a",
    "b",
    "c",
    "d",
    "yes",
    "no",
    "stock",
    "market",
    "good",
    "bad",
];

/// Special tokens: `[UNK]`=0, `<|im_start|>`=1, `<|im_end|>`=2 (EOS), `<pad>`=3.
pub const SPECIALS: &[&str] = &["[UNK]", "<|im_start|>", "<|im_end|>", "<pad>"];

/// ChatML without a default system prompt.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A word-level tokenizer over [`SPECIALS`] + [`WORDS`], splitting on whitespace.
pub fn tiny_hf_tokenizer() -> tokenizers::Tokenizer {
    tiny_hf_tokenizer_with_ids(|i| i)
}

/// [`tiny_hf_tokenizer`] with the token at position `i` of [`SPECIALS`] + [`WORDS`] given id
/// `id(i)` (a permutation: another vocabulary order over the same strings).
pub fn tiny_hf_tokenizer_with_ids(id: impl Fn(usize) -> usize) -> tokenizers::Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    let vocab: HashMap<String, u32> = SPECIALS
        .iter()
        .chain(WORDS)
        .enumerate()
        .map(|(i, w)| (w.to_string(), id(i) as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    let specials: Vec<tokenizers::AddedToken> = SPECIALS
        .iter()
        .map(|s| tokenizers::AddedToken::from(s.to_string(), true))
        .collect();
    tok.add_special_tokens(specials).unwrap();
    tok
}

/// The tiny tokenizer with ChatML and `<|im_end|>` as EOS.
pub fn tiny_tokenizer() -> Tokenizer {
    tiny_tokenizer_with_ids(|i| i)
}

/// [`tiny_tokenizer`] over [`tiny_hf_tokenizer_with_ids`]; `id` must keep the specials in place.
pub fn tiny_tokenizer_with_ids(id: impl Fn(usize) -> usize) -> Tokenizer {
    let template = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
    Tokenizer::new(
        tiny_hf_tokenizer_with_ids(id),
        Some(template),
        None,
        false,
        vec![2],
        Path::new("tiny-tokenizer"),
    )
}

/// A 2-layer model: C=16, H=4, KVH=2 (grouped-query), D=4, F=32, V = tiny vocabulary.
pub fn tiny_config(arch: Arch) -> Config {
    Config {
        arch,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        vocab_size: SPECIALS.len() + WORDS.len(),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 128,
        tie_word_embeddings: arch == Arch::Llama,
        bos_token_id: None,
        eos_token_id: vec![2],
    }
}

/// Seeded random weights for `cfg`, by Hugging Face name. Norm weights are near 1, matrices
/// uniform in ±0.5/√fan_in·√3 (unit-variance activations), biases small.
pub fn random_weights(cfg: &Config, seed: u64) -> Weights {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let mut put = |name: String, dims: &[usize], scale: f32, offset: f32| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        tensors.insert(
            name,
            Stored::Dense(Tensor::from_vec(v, dims, &dev).unwrap()),
        );
    };
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let w = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    put("model.embed_tokens.weight".into(), &[v, c], 1.0, 0.0);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[c], 0.2, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[c],
            0.2,
            1.0,
        );
        put(format!("{p}.self_attn.q_proj.weight"), &[q, c], w(c), 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, c], w(c), 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, c], w(c), 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[c, q], w(q), 0.0);
        if cfg.arch.qkv_bias() {
            put(format!("{p}.self_attn.q_proj.bias"), &[q], 0.1, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.1, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.1, 0.0);
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[f, c], w(c), 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[f, c], w(c), 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[c, f], w(f), 0.0);
    }
    put("model.norm.weight".into(), &[c], 0.2, 1.0);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, c], w(c), 0.0);
    }
    Weights::new(Path::new("random-weights"), tensors, &dev)
}

/// A frozen tiny model.
pub fn tiny_model(cfg: &Config, seed: u64) -> Model {
    Model::frozen(cfg, &random_weights(cfg, seed), WeightFormat::F32).unwrap()
}

/// Write a tiny model with its tokenizer as a Hugging Face directory `dir/tiny`; returns its path.
pub fn write_tiny_model(dir: &Path, cfg: &Config, seed: u64) -> PathBuf {
    let out = dir.join("tiny");
    retort_model::checkpoint::save_hf(&tiny_model(cfg, seed), &tiny_tokenizer(), &out, false)
        .unwrap();
    out
}

/// Write `weights` (dense, Hugging Face names) as a llama.cpp-style GGUF file: GGUF tensor names,
/// Q/K rows permuted for interleaved RoPE (llama only), matrices stored as `dtype`, norms as F32,
/// and a BPE tokenizer over the tiny vocabulary in the metadata.
pub fn write_tiny_gguf(path: &Path, cfg: &Config, weights: &Weights, dtype: GgmlDType) {
    use candle_core::quantized::gguf_file::Value;
    let a = cfg.arch.name();
    let u = |x: usize| Value::U32(x as u32);
    let tokens: Vec<Value> = SPECIALS
        .iter()
        .chain(WORDS)
        .map(|t| Value::String(t.to_string()))
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
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
        (
            format!("{a}.context_length"),
            u(cfg.max_position_embeddings),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
    ];
    let mut names: Vec<&String> = weights.names().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let dims = weights.tensors()[name].dims();
        let t = retort_model::gguf_write::to_gguf_layout(
            cfg,
            name,
            weights.dense(name, &dims).unwrap(),
        )
        .unwrap();
        let q = if dims.len() == 2 {
            QTensor::quantize(&t, dtype).unwrap()
        } else {
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        tensors.push((retort_model::gguf_write::gguf_name(name).unwrap(), q));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = fs_err::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Re-exported so doc tests and users of this crate need not depend on it.
pub use retort_data::Message;

/// `n` two-turn chats (user question, assistant answer) over the tiny vocabulary, as JSONL
/// `messages` records: deterministic, every word known to [`tiny_tokenizer`].
pub fn write_chat_data(path: &Path, n: usize) {
    let words = [
        "the", "sky", "is", "blue", "why", "because", "of", "light", "hello", "world",
    ];
    let mut out = String::new();
    for i in 0..n {
        let q = format!(
            "{} {} {}",
            words[i % 10],
            words[(i * 3 + 1) % 10],
            words[(i * 7 + 2) % 10]
        );
        let a = format!("{} {} yes", words[(i * 3 + 1) % 10], words[i % 10]);
        out.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{q}\"}}, {{\"role\": \"assistant\", \"content\": \"{a}\"}}]}}\n"
        ));
    }
    fs_err::write(path, out).unwrap();
}

/// `(n, v)` f32 logits uniform in [-3, 3), seeded: inputs for loss and metric tests.
pub fn random_logits(seed: u64, n: usize, v: usize) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..n * v).map(|_| rng.random_range(-3.0..3.0)).collect();
    Tensor::from_vec(data, (n, v), &Device::Cpu).expect("a (n, v) tensor")
}

/// Token ids `(B, T)` from equal-length rows.
pub fn ids(rows: &[&[u32]]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let t = rows.first().map_or(0, |r| r.len());
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).expect("rows of equal length")
}

/// Mean next-token cross-entropy over all positions of `x (B, T)`, from differentiable ops.
pub fn next_token_loss(model: &Model, x: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::D;
    let (b, t) = x.dims2()?;
    let logits = model
        .logits(&x.narrow(1, 0, t - 1)?)
        .map_err(candle_core::Error::wrap)?; // (B, T-1, V)
    let v = logits.dim(D::Minus1)?;
    let targets = x.narrow(1, 1, t - 1)?.flatten_all()?;
    let logp = candle_nn::ops::log_softmax(&logits.reshape((b * (t - 1), v))?, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.mean_all()?.neg()
}

/// A scalar loss tensor as f64.
pub fn scalar_f64(loss: &Tensor) -> f64 {
    loss.to_dtype(candle_core::DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("a scalar loss")
}

/// Checks autograd against a central finite difference at the entry of `var` whose gradient
/// is largest: `loss` recomputes the loss (f64) from the model that holds `var`; `grad` is
/// autograd's gradient of `var`. Returns (autograd, finite difference, relative error); `var`
/// is restored.
pub fn finite_difference_at_largest(
    var: &candle_core::Var,
    grad: &Tensor,
    eps: f32,
    loss: impl Fn() -> f64,
) -> (f32, f64, f64) {
    let g = grad
        .flatten_all()
        .and_then(|g| g.to_vec1::<f32>())
        .expect("an f32 gradient");
    let k = (0..g.len())
        .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
        .expect("a non-empty gradient");
    let base = var
        .as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("an f32 variable");
    let loss_at = |delta: f32| {
        let mut w = base.clone();
        w[k] += delta;
        let t = Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("same shape");
        var.set(&t).expect("same shape");
        loss()
    };
    let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
    loss_at(0.0);
    let rel = (fd - g[k] as f64).abs() / fd.abs().max(1e-3);
    (g[k], fd, rel)
}
