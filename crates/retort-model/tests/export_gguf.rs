//! `retort export-gguf` on real models of both architectures: a student pruned from SmolLM2
//! (llama) and from Qwen2.5-Coder-0.5B (qwen2), saved as retort saves students, exported, and
//! read back — by retort (always) and by llama.cpp (when `RETORT_LLAMA_PYTHON` names a Python
//! with llama-cpp-python; `RETORT_REQUIRE_LLAMA=1` makes that check required).
//!
//! Checked: the configuration survives; the tokenizer gives the same ids (multilingual, code,
//! special tokens) and the same chat prompt; the next-token logits match the saved model's —
//! f32 exactly (the Q/K permutation round trip), q8_0 within a small KL; llama.cpp's tokens
//! equal retort's and its log-probs at retort's top-5 ids are within tolerance.
//!
//! The models come from `scripts/fetch-assets` (SmolLM2; `RETORT_REQUIRE_ASSETS=1` makes it
//! required) and `scripts/fetch-assets qwen-student` (`RETORT_REQUIRE_QWEN`).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use retort_data::Message;
use retort_model::checkpoint::{self, Checkpoint};
use retort_model::gguf_write::{GgufType, write_gguf};
use retort_model::{Model, WeightFormat};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN05: &str = "Qwen2.5-Coder-0.5B-Instruct.gguf";

const TEXT: &str = "Hello world! 12345 don't  spaces\nnewline <|im_start|>user\n\
    Grüße aus München, ça va? Привет, мир. 東京は晴れ。 مرحبا 🙂🚀\n\
    def f(x):\n    return x**2 + 3.14159 * x - 1_000_000  # комментарий\n<|im_end|>\n";

fn asset(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RETORT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let p = dir.join(name);
    if p.exists() {
        return Some(p);
    }
    let required = if name == SMOLLM2 {
        std::env::var_os("RETORT_REQUIRE_ASSETS").is_some()
    } else {
        std::env::var_os("RETORT_REQUIRE_QWEN").is_some()
    };
    assert!(
        !required,
        "{} is missing; run scripts/fetch-assets",
        p.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-assets)",
        p.display()
    );
    None
}

/// Next-token logits `(V,)` after `ids`.
fn last_logits(model: &Model, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .logits(&x)
        .unwrap()
        .i((0, ids.len() - 1))
        .unwrap()
        .contiguous()
        .unwrap()
}

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let lse = m + v.iter().map(|x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32;
    v.iter().map(|x| x - lse).collect()
}

/// KL(softmax(p) ‖ softmax(q)) in nats.
fn kl(p: &[f32], q: &[f32]) -> f32 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| (*a as f64).exp() * (a - b) as f64)
        .sum::<f64>() as f32
}

fn top5(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(5);
    idx
}

/// llama.cpp's token ids of [`TEXT`] and its next-token logits after `ids`, or `None` when no
/// llama-cpp-python is configured.
fn llama_cpp(gguf: &Path, ids: &[u32], scratch: &Path) -> Option<(Vec<u32>, Vec<f32>)> {
    let Some(py) = std::env::var_os("RETORT_LLAMA_PYTHON") else {
        assert!(
            std::env::var_os("RETORT_REQUIRE_LLAMA").is_none(),
            "RETORT_REQUIRE_LLAMA is set but RETORT_LLAMA_PYTHON is not"
        );
        eprintln!(
            "skipping the llama.cpp check: set RETORT_LLAMA_PYTHON to a Python with llama-cpp-python"
        );
        return None;
    };
    let text = scratch.join("text.txt");
    let ids_file = scratch.join("ids.json");
    fs_err::write(&text, TEXT).unwrap();
    fs_err::write(&ids_file, serde_json::to_string(ids).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/reference/llamacpp_logits.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(gguf)
        .arg(&text)
        .arg(&ids_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "llama.cpp failed on {}: {}",
        gguf.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text_ids = v["text_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    Some((text_ids, logits))
}

/// Prune `source` to `keep`, save it as retort saves a student, export it as f32 and q8_0, and
/// check each export against the saved model. `llama_tol`: the largest logit difference allowed
/// between llama.cpp's and retort's log-probs, both running the exported file, at retort's
/// top-5, per type.
fn export_round_trip(source: &Path, keep: &[usize], llama_tol: [(GgufType, f32); 2]) {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint::read(source, &dev).unwrap();
    let student = ck
        .frozen(WeightFormat::F32)
        .unwrap()
        .prune_layers(keep, source)
        .unwrap();
    let saved = dir.path().join("student");
    checkpoint::save_hf(&student, &ck.tokenizer, &saved, false).unwrap();
    let hf: Checkpoint = checkpoint::read(&saved, &dev).unwrap();
    let model = hf.frozen(WeightFormat::F32).unwrap();
    let prompt = hf
        .tokenizer
        .encode_prompt(&[Message::user("Why is the sky blue?")])
        .unwrap();
    let want = last_logits(&model, &prompt);
    let want_v: Vec<f32> = want.to_vec1().unwrap();
    let text_ids = hf.tokenizer.encode(TEXT).unwrap();
    for (ty, llama_max) in llama_tol {
        let out = dir.path().join(format!("student.{ty}.gguf"));
        let e = write_gguf(&hf, ty, &out, "student").unwrap();
        assert!(e.f16_fallback.is_empty(), "{:?}", e.f16_fallback);
        let back = checkpoint::read(&out, &dev).unwrap();
        let (a, b) = (&hf.config, &back.config);
        assert_eq!(
            (
                a.arch,
                a.hidden_size,
                a.intermediate_size,
                a.num_hidden_layers
            ),
            (
                b.arch,
                b.hidden_size,
                b.intermediate_size,
                b.num_hidden_layers
            )
        );
        assert_eq!(
            (
                a.num_attention_heads,
                a.num_key_value_heads,
                a.head_dim,
                a.vocab_size
            ),
            (
                b.num_attention_heads,
                b.num_key_value_heads,
                b.head_dim,
                b.vocab_size
            )
        );
        assert_eq!(a.tie_word_embeddings, b.tie_word_embeddings);
        assert!((a.rope_theta - b.rope_theta).abs() <= 1e-3 * a.rope_theta);
        assert!((a.rms_norm_eps - b.rms_norm_eps).abs() <= 1e-3 * a.rms_norm_eps);
        assert_eq!(back.tokenizer.encode(TEXT).unwrap(), text_ids, "{ty}");
        let back_prompt = back
            .tokenizer
            .encode_prompt(&[Message::user("Why is the sky blue?")])
            .unwrap();
        assert_eq!(back_prompt, prompt, "{ty}: chat prompt");
        let got = last_logits(&back.frozen(WeightFormat::F32).unwrap(), &prompt);
        let got_v: Vec<f32> = got.to_vec1().unwrap();
        let d = want_v
            .iter()
            .zip(&got_v)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = want_v.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
        let kl = kl(&want_v, &got_v);
        match ty {
            GgufType::F32 => assert!(d <= 1e-4 * scale, "{ty}: max |Δ| {d}"),
            // Q8_0's rounding (≤ max|w|/254 per block of 32) moves the distribution little.
            _ => assert!(kl <= 0.02, "{ty}: KL(saved ‖ export) {kl}"),
        }
        assert_eq!(top5(&want_v)[0], top5(&got_v)[0], "{ty}: argmax");
        eprintln!(
            "{}: {ty} export {:.1} MB, against the saved model: max |Δlogit| {d:.2e}, KL {kl:.2e}",
            source.display(),
            e.bytes as f64 / 1e6
        );
        if let Some((llama_ids, llama_logits)) = llama_cpp(&out, &prompt, dir.path()) {
            assert_eq!(llama_ids, text_ids, "{ty}: llama.cpp tokenizes differently");
            // Against retort's logits of the same file: what differs is only how each
            // multiplies (llama.cpp rounds activations to 8 bits against Q8_0 weights).
            assert_eq!(llama_logits.len(), got_v.len());
            let top = top5(&got_v);
            let (ours, theirs) = (log_softmax(&got_v), log_softmax(&llama_logits));
            let dl = top
                .iter()
                .map(|&i| (ours[i] - theirs[i]).abs())
                .fold(0f32, f32::max);
            assert!(
                top.contains(&top5(&llama_logits)[0]),
                "{ty}: llama.cpp's argmax {} is not in retort's top-5 {top:?}",
                top5(&llama_logits)[0]
            );
            assert!(
                dl <= llama_max,
                "{ty}: llama.cpp's log-probs at retort's top-5 differ by {dl}"
            );
            eprintln!(
                "{}: {ty}, llama.cpp: same tokens, top-5 log-probs within {dl:.3} (allowed {llama_max})",
                source.display()
            );
        }
    }
}

#[test]
fn smollm2_student_exports_to_gguf_that_retort_and_llama_cpp_read() {
    let Some(src) = asset(SMOLLM2) else { return };
    // All 30 layers: a few-layer pruning of SmolLM2 has outlier activations that make 8-bit
    // rounding of them (llama.cpp's Q8_0 path) move logits by ~1.
    export_round_trip(
        &src,
        &(0..30).collect::<Vec<_>>(),
        [(GgufType::F32, 0.05), (GgufType::Q8_0, 0.3)],
    );
}

#[test]
fn qwen2_student_exports_to_gguf_that_retort_and_llama_cpp_read() {
    let Some(src) = asset(QWEN05) else { return };
    export_round_trip(
        &src,
        &[0, 8, 16, 23],
        [(GgufType::F32, 0.05), (GgufType::Q8_0, 0.3)],
    );
}

/// A tokenizer llama.cpp could not run the same way is refused, naming the model and why, and
/// nothing is left at the destination.
#[test]
fn a_tokenizer_llama_cpp_lacks_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = retort_test::tiny_config(retort_model::Arch::Qwen2);
    let model_dir = retort_test::write_tiny_model(dir.path(), &cfg, 1);
    let ck = checkpoint::read(&model_dir, &Device::Cpu).unwrap();
    let out = dir.path().join("tiny.gguf");
    let e = write_gguf(&ck, GgufType::Q8_0, &out, "tiny")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not byte-level BPE") && e.contains(&model_dir.display().to_string()),
        "{e}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = fs_err::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}
