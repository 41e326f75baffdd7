//! Checks on the opt-in Qwen2.5-Coder pair (`scripts/fetch-assets qwen`): the 1.5B-Instruct
//! teacher (Q4_K_M) and the 0.5B-Instruct student (a Q5_0/Q8_0/Q4_K/Q6_K mix), against llama.cpp
//! and gguf-py.
//!
//! Without the files these tests print a note and pass, unless `RETORT_REQUIRE_QWEN=1`, where a
//! missing file fails (`RETORT_REQUIRE_QWEN=student`: only the 0.5B student, which CI fetches with
//! `scripts/fetch-assets qwen-student`). References, written by hand:
//! - `tests/fixtures/qwen_llamacpp.json`: `scripts/reference/llamacpp_qwen.py` (llama-cpp-python);
//! - `tests/fixtures/qwen_dequant.json`: `scripts/reference/gguf_dequant.py` (gguf-py);
//! - `tests/fixtures/qwen_template.json`: `scripts/reference/hf_qwen_template.py` (transformers,
//!   reading the template and tokenizer from the GGUF file).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp, Tensor};
use retort_data::{Message, Role};
use retort_model::{Arch, WeightFormat, checkpoint};

const TEACHER: &str = "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf";
const STUDENT: &str = "Qwen2.5-Coder-0.5B-Instruct.gguf";
/// (fixture key, file name)
const MODELS: [(&str, &str); 2] = [("qwen0.5b", STUDENT), ("qwen1.5b", TEACHER)];

fn asset(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RETORT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let p = dir.join(name);
    if p.exists() {
        return Some(p);
    }
    let required = match std::env::var("RETORT_REQUIRE_QWEN").as_deref() {
        Ok("student") => name == STUDENT,
        Ok(_) => true,
        Err(_) => false,
    };
    assert!(
        !required,
        "{} is missing; run scripts/fetch-assets qwen",
        p.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-assets qwen)",
        p.display()
    );
    None
}

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&fs_err::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The tokenizer and Qwen's chat template (its default system prompt included) give the ids
/// llama.cpp gives; the config is qwen2 with attention biases.
#[test]
fn tokenizer_and_chat_prompt_match_llama_cpp() {
    let fx = fixture("qwen_llamacpp.json");
    for (key, file) in MODELS {
        let Some(path) = asset(file) else { continue };
        let ck = checkpoint::read(&path, &Device::Cpu).unwrap();
        assert_eq!(ck.config.arch, Arch::Qwen2, "{file}");
        let tok = &ck.tokenizer;
        let text = fx["tokenizer_text"].as_str().unwrap();
        let ours = tok.encode(text).unwrap();
        assert_eq!(
            ours,
            ids(&fx[key]["tokenizer_ids"]),
            "{file}: tokenizer ids"
        );
        assert_eq!(
            tok.decode(&ours, false).unwrap(),
            text,
            "{file}: round trip"
        );
        let prompt = tok
            .encode_prompt(&[Message::user(fx["question"].as_str().unwrap())])
            .unwrap();
        assert_eq!(prompt, ids(&fx[key]["prompt_ids"]), "{file}: chat prompt");
    }
}

/// Next-token logits after the chat prompt, dequantized f32 weights against llama.cpp (which
/// multiplies quantized weights with Q8-quantized activations): the same five tokens, each
/// logit within 0.5 (measured: at most 0.059 for the 0.5B, 0.163 for the 1.5B).
#[test]
fn next_token_top5_matches_llama_cpp() {
    let fx = fixture("qwen_llamacpp.json");
    for (key, file) in MODELS {
        let Some(path) = asset(file) else { continue };
        let (model, _) = checkpoint::load(&path, WeightFormat::F32, &Device::Cpu).unwrap();
        let prompt = ids(&fx[key]["prompt_ids"]);
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = model.forward(&x, 0, &[], None).unwrap(); // (1, T, C)
        let logits = model
            .lm_head(&h.i((0, prompt.len() - 1)).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(); // (V)
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut ours: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        let theirs = ids(&fx[key]["top5_ids"]);
        let mut sorted = theirs.clone();
        ours.sort();
        sorted.sort();
        assert_eq!(ours, sorted, "{file}: top-5 sets differ");
        let mut worst = 0f32;
        for (k, &id) in theirs.iter().enumerate() {
            let want = fx[key]["top5_logits"][k].as_f64().unwrap() as f32;
            let got = logits[id as usize];
            assert!(
                (got - want).abs() < 0.5,
                "{file}: token {id}: ours {got} vs llama.cpp {want}"
            );
            worst = worst.max((got - want).abs());
        }
        eprintln!("{file}: top-5 as llama.cpp's; largest logit difference {worst:.3}");
    }
}

/// Every quant type in the two files, dequantized by candle (what retort loads), equals gguf-py's
/// dequantization: the first tensor of each type, sampled values to 1e-6 relative and the sums.
#[test]
fn every_quant_type_dequantizes_like_gguf_py() {
    let fx = fixture("qwen_dequant.json");
    for (_, file) in MODELS {
        let Some(path) = asset(file) else { continue };
        let entries = fx["files"][file].as_array().unwrap();
        assert!(!entries.is_empty(), "{file}: no entries in the fixture");
        let mut f = fs_err::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        for e in entries {
            let name = e["name"].as_str().unwrap();
            let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            let kind = e["type"].as_str().unwrap();
            let v = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(
                v.len() as u64,
                e["elements"].as_u64().unwrap(),
                "{file} {name}"
            );
            for (i, want) in ids(&e["indices"])
                .iter()
                .zip(e["values"].as_array().unwrap())
            {
                let (got, want) = (v[*i as usize], want.as_f64().unwrap() as f32);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{file} {name} ({kind}) [{i}]: candle {got} vs gguf-py {want}"
                );
            }
            let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
            let sum_sq: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let (ws, wq) = (e["sum"].as_f64().unwrap(), e["sum_sq"].as_f64().unwrap());
            assert!(
                (sum - ws).abs() <= 1e-6 * wq.sqrt().max(1.0) * (v.len() as f64).sqrt(),
                "{file} {name} ({kind}): sum {sum} vs {ws}"
            );
            assert!(
                (sum_sq - wq).abs() <= 1e-5 * wq,
                "{file} {name} ({kind}): sum of squares {sum_sq} vs {wq}"
            );
        }
    }
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                r => panic!("role {r}"),
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

/// Qwen's chat template as retort renders it equals transformers' rendering (text and ids) of
/// the same conversations, with and without the generation prompt; the loss mask of a full
/// conversation covers exactly each answer and its `<|im_end|>`.
#[test]
fn chat_template_and_assistant_mask_match_transformers() {
    let fx = fixture("qwen_template.json");
    let Some(path) = asset(STUDENT) else { return };
    let ck = checkpoint::read(&path, &Device::Cpu).unwrap();
    let tok = &ck.tokenizer;
    let template = tok.template().unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for (i, case) in cases.iter().enumerate() {
        let msgs = messages(&case["messages"]);
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&msgs, generation).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "case {i}: text");
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(&text).unwrap(), want, "case {i}: ids");
        if generation || msgs.last().unwrap().role != Role::Assistant {
            continue;
        }
        let enc = tok.encode_chat(&msgs).unwrap();
        assert_eq!(enc.ids, want, "case {i}: encode_chat ids");
        // The masked tokens, run by run, decode to each answer followed by its end-of-turn.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for (j, (&id, &m)) in enc.ids.iter().zip(&enc.loss_mask).enumerate() {
            if m {
                if j == 0 || !enc.loss_mask[j - 1] {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(id);
            }
        }
        let answers: Vec<String> = msgs
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| format!("{}<|im_end|>", m.content))
            .collect();
        let got: Vec<String> = runs.iter().map(|r| tok.decode(r, false).unwrap()).collect();
        assert_eq!(got, answers, "case {i}: masked spans");
    }
}

/// LoRA on the real 0.5B student (the Qwen2 path with real weights, not a tiny random model):
/// a few plain gradient steps on the adapters lower the loss of one conversation, and the merged
/// checkpoint gives the adapter's logits.
#[test]
fn lora_on_the_real_student_learns_and_merges() {
    use retort_model::lora::{LoraConfig, LoraTarget};
    let Some(path) = asset(STUDENT) else { return };
    let ck = checkpoint::read(&path, &Device::Cpu).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj],
        ..LoraConfig::default()
    };
    let student = ck.lora(&cfg, 0).unwrap();
    let chat = ck
        .tokenizer
        .encode_chat(&[
            Message::user("Name the largest planet."),
            Message::assistant("Jupiter is the largest planet in the solar system."),
        ])
        .unwrap();
    let x = Tensor::new(chat.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let loss = || retort_test::next_token_loss(&student, &x).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    let before = scalar(&loss());
    for _ in 0..4 {
        let l = loss();
        let grads = l.backward().unwrap();
        for (name, var) in student.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            var.set(&(var.as_tensor() - (g * 0.05).unwrap()).unwrap())
                .unwrap();
        }
    }
    let after = scalar(&loss());
    eprintln!("real 0.5B LoRA: next-token loss {before:.4} -> {after:.4} after 4 steps");
    assert!(
        after < before - 0.05,
        "the loss did not fall: {before} -> {after}"
    );
    let tensors = student
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, retort_model::weights::Stored::Dense(t)))
        .collect();
    let merged = retort_model::Model::frozen(
        student.config(),
        &retort_model::Weights::new(&path, tensors, &Device::Cpu),
        WeightFormat::F32,
    )
    .unwrap();
    let d = retort_test::max_abs_diff(&student.logits(&x).unwrap(), &merged.logits(&x).unwrap());
    assert!(d < 1e-2, "merged vs adapter logits differ by {d}");
}
