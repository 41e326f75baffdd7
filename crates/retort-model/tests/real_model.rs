//! Checks on the real default teacher, SmolLM2-135M-Instruct (GGUF Q4_1), against llama.cpp.
//!
//! The model comes from `scripts/fetch-assets` (CI runs it). Without it these tests print a note
//! and pass, unless `RETORT_REQUIRE_ASSETS=1` (set by `.ci/run`), where a missing model fails.
//! Reference: `tests/fixtures/smollm2_llamacpp.json`, written by
//! `scripts/reference/llamacpp_smollm2.py` (llama-cpp-python 0.3.36).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::PathBuf;

use candle_core::{D, Device, IndexOp, Tensor};
use retort_data::Message;
use retort_model::{WeightFormat, checkpoint};

fn gguf() -> Option<PathBuf> {
    let p = std::env::var_os("RETORT_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../assets/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("RETORT_REQUIRE_ASSETS").is_none(),
        "{} is missing; run scripts/fetch-assets",
        p.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-assets)",
        p.display()
    );
    None
}

fn fixture() -> serde_json::Value {
    let text = fs_err::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_llamacpp.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// "Why is the sky blue?" as a chat prompt: ids and `(1, T)` tensor.
fn sky_prompt(tok: &retort_model::Tokenizer) -> (Vec<u32>, Tensor) {
    let p = tok
        .encode_prompt(&[Message::user("Why is the sky blue?")])
        .unwrap();
    let x = Tensor::new(p.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    (p, x)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_ids_match_llama_cpp() {
    let Some(path) = gguf() else { return };
    let fx = fixture();
    let (_, tok) = checkpoint::load(&path, WeightFormat::Quantized, &Device::Cpu).unwrap();
    let ours = tok.encode(fx["tokenizer_text"].as_str().unwrap()).unwrap();
    assert_eq!(ours, ids(&fx["tokenizer_ids"]));
    // The chat template renders the prompt llama.cpp was given, token for token.
    let prompt = tok
        .encode_prompt(&[Message::user("What is the capital of France?")])
        .unwrap();
    assert_eq!(prompt, ids(&fx["prompt_ids"]));
    assert!(!tok.add_bos(), "SmolLM2's GGUF does not ask for BOS");
    assert_eq!(
        tok.decode(&ours, false).unwrap(),
        fx["tokenizer_text"].as_str().unwrap()
    );
}

fn top5(path: &std::path::Path, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let (model, _) = checkpoint::load(path, WeightFormat::F32, &Device::Cpu).unwrap();
    let x = Tensor::new(prompt, &Device::Cpu)
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
    let ids: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    (ids, logits)
}

/// Against an independent f32 numpy forward (`scripts/reference/numpy_smollm2.py`), which applies
/// llama.cpp's interleaved RoPE to the permuted GGUF weights: same order, logits within 1e-3.
#[test]
fn next_token_top5_matches_f32_reference() {
    let Some(path) = gguf() else { return };
    let text = fs_err::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_numpy.json"
    ))
    .unwrap();
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (ours, logits) = top5(&path, &ids(&fx["prompt_ids"]));
    assert_eq!(ours, ids(&fx["top5_ids"]));
    for (k, &id) in ours.iter().enumerate() {
        let want = fx["top5_logits"][k].as_f64().unwrap() as f32;
        assert!(
            (logits[id as usize] - want).abs() < 1e-3,
            "token {id}: {} vs {want}",
            logits[id as usize]
        );
    }
}

/// Against llama.cpp, which multiplies Q4_1 weights with Q8-quantized activations: the same five
/// tokens; the top two are 0.08 apart in f32 and swap places under llama.cpp's rounding.
#[test]
fn next_token_top5_matches_llama_cpp() {
    let Some(path) = gguf() else { return };
    let fx = fixture();
    let (ours, logits) = top5(&path, &ids(&fx["prompt_ids"]));
    let theirs = ids(&fx["top5_ids"]);
    let (mut a, mut b) = (ours.clone(), theirs.clone());
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "top-5 sets differ: ours {ours:?}, llama.cpp {theirs:?}"
    );
    for (k, &id) in theirs.iter().enumerate() {
        let want = fx["top5_logits"][k].as_f64().unwrap() as f32;
        let got = logits[id as usize];
        assert!(
            (got - want).abs() < 1.0,
            "token {id}: ours {got} vs llama.cpp {want}"
        );
    }
}

#[test]
fn quantized_and_f32_weights_agree() {
    let Some(path) = gguf() else { return };
    let ck = checkpoint::read(&path, &Device::Cpu).unwrap();
    let f = ck.frozen(WeightFormat::F32).unwrap();
    // A prompt and a physician-style answer: ~150 positions, so that one near-tie flipping (Q8_0
    // also quantizes activations, so 1e-7 changes upstream can move a logit by 0.03) is < 1 %.
    let p = ck
        .tokenizer
        .encode_prompt(&[
            Message::user("Why is the sky blue?"),
            Message::assistant(
                "Sunlight is a mix of all visible colours. As it passes through the atmosphere, \
                 it is scattered by nitrogen and oxygen molecules, which are much smaller than the \
                 wavelength of light. This Rayleigh scattering is far stronger for short \
                 wavelengths, so blue light is scattered across the whole sky and reaches our eyes \
                 from every direction. Violet is scattered even more, but the Sun emits less of \
                 it, part of it is absorbed high in the atmosphere, and our eyes are less \
                 sensitive to it. At sunrise and sunset the light crosses much more air, most of \
                 the blue is scattered away before it reaches us, and the sky near the horizon \
                 turns red and orange.",
            ),
        ])
        .unwrap();
    let x = Tensor::new(p.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let lf = f.logits(&x).unwrap();
    for format in [WeightFormat::Quantized, WeightFormat::Q8_0] {
        let lq = ck.frozen(format).unwrap().logits(&x).unwrap();
        let same = lf
            .argmax(D::Minus1)
            .unwrap()
            .eq(&lq.argmax(D::Minus1).unwrap())
            .unwrap();
        let agree = same
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!(
            "{format:?}: argmax agreement with f32 over {} positions: {agree}",
            p.len()
        );
        assert!(agree > 0.9, "{format:?}: argmax agreement {agree}");
    }
}

#[test]
fn assistant_mask_on_the_real_template() {
    let Some(path) = gguf() else { return };
    let (_, tok) = checkpoint::load(&path, WeightFormat::Quantized, &Device::Cpu).unwrap();
    let msgs = [
        Message::system("You are an expert for stock markets."),
        Message::user("I am 35. Is Dogcoin a good investment?"),
        Message::assistant("Probably not: it is volatile.\nDiversify instead."),
        Message::user("And index funds? 123456"),
        Message::assistant("Yes — low fees, broad exposure (e.g. 7% p.a.)."),
    ];
    let enc = tok.encode_chat(&msgs).unwrap();
    assert_eq!(enc.ids.len(), enc.loss_mask.len());
    // The masked tokens, decoded span by span, are exactly the answers plus <|im_end|>.
    let mut spans: Vec<Vec<u32>> = vec![];
    let mut prev = false;
    for (&id, &m) in enc.ids.iter().zip(&enc.loss_mask) {
        if m && !prev {
            spans.push(vec![]);
        }
        if m {
            spans.last_mut().unwrap().push(id);
        }
        prev = m;
    }
    let texts: Vec<String> = spans
        .iter()
        .map(|s| tok.decode(s, false).unwrap())
        .collect();
    assert_eq!(
        texts,
        vec![
            "Probably not: it is volatile.\nDiversify instead.<|im_end|>".to_string(),
            "Yes — low fees, broad exposure (e.g. 7% p.a.).<|im_end|>".to_string(),
        ]
    );
    // A conversation without a system turn gets SmolLM2's default system prompt, unmasked.
    let enc2 = tok.encode_chat(&msgs[1..3]).unwrap();
    let text = tok.decode(&enc2.ids, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{text}"
    );
    assert_eq!(
        enc2.loss_mask.iter().filter(|&&m| m).count(),
        spans[0].len()
    );
}

#[test]
fn greedy_answer_is_coherent() {
    let Some(path) = gguf() else { return };
    let (model, tok) = checkpoint::load(&path, WeightFormat::F32, &Device::Cpu).unwrap();
    let prompt = tok
        .encode_prompt(&[Message::user("Why is the sky blue?")])
        .unwrap();
    let fx = fixture();
    assert_eq!(prompt, ids(&fx["sky_prompt_ids"]));
    let params = retort_model::generation::SamplingParams {
        max_new_tokens: 40,
        ..Default::default()
    };
    let out = retort_model::generation::generate(&model, &tok, &[prompt], &params, |_, _| {})
        .unwrap()
        .remove(0);
    eprintln!("answer: {}", out.text);
    // llama.cpp's greedy answer (Q8 activations) and ours (f32) start the same way, then drift
    // apart at a near-tie (after 11 tokens when the fixture was made).
    let theirs = ids(&fx["sky_greedy_ids"]);
    let common = out
        .ids
        .iter()
        .zip(&theirs)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        common >= 8,
        "only {common} leading tokens agree: {:?}",
        out.text
    );
    assert!(out.text.contains("Rayleigh scattering"), "{:?}", out.text);
}

#[test]
fn ten_layer_student_reloads_with_identical_logits() {
    let Some(path) = gguf() else { return };
    let ck = checkpoint::read(&path, &Device::Cpu).unwrap();
    let keep = [0, 3, 6, 10, 13, 16, 19, 23, 26, 29];
    let student = ck
        .frozen(WeightFormat::F32)
        .unwrap()
        .prune_layers(&keep, &path)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("student");
    checkpoint::save_hf(&student, &ck.tokenizer, &out, false).unwrap();
    let back = checkpoint::read(&out, &Device::Cpu).unwrap();
    assert_eq!(back.config.num_hidden_layers, 10);
    let reloaded = back.trainable().unwrap();
    let (_, x) = sky_prompt(&ck.tokenizer);
    let (a, b) = (student.logits(&x).unwrap(), reloaded.logits(&x).unwrap());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // The reloaded student is trainable (differentiable ops); compare it with the same mode too.
    let b_frozen = back
        .frozen(WeightFormat::F32)
        .unwrap()
        .logits(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        a.iter()
            .zip(&b_frozen)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "frozen logits differ after reload"
    );
    let d = a
        .iter()
        .zip(b.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-3, "trainable path differs by {d}");
    assert_eq!(
        back.tokenizer
            .encode_prompt(&[Message::user("hi")])
            .unwrap(),
        ck.tokenizer.encode_prompt(&[Message::user("hi")]).unwrap()
    );
}

#[test]
fn continuous_batching_matches_each_prompt_alone_up_to_near_ties() {
    // Six real questions through 3 slots (rows join mid-batch, the cache shifts), greedy, f32
    // weights. Batch composition changes float rounding, so a greedy answer may take the other
    // branch at a near-tie; anywhere else the two runs must agree token for token, with
    // log-probs equal to 1e-3. (Not Q8_0: it quantizes activations, so a left-padded batch —
    // static batching too — moves its log-probs by up to ~0.1 against the prompt alone, and
    // greedy answers part at ordinary margins; the tiny-model test checks Q8_0 exactly.)
    use retort_model::batching::generate_continuous;
    use retort_model::generation::{SamplingParams, generate_each};
    let Some(path) = gguf() else { return };
    let questions = [
        "Why is the sky blue?",
        "What is a stock dividend?",
        "Name three ways to lower blood pressure. Explain in detail.",
        "What is the capital of Australia?",
        "Write a haiku about autumn.",
        "How do index funds work?",
    ];
    for format in [WeightFormat::F32] {
        let (model, tok) = checkpoint::load(&path, format, &Device::Cpu).unwrap();
        let prompts: Vec<Vec<u32>> = questions
            .iter()
            .map(|q| tok.encode_prompt(&[Message::user(*q)]).unwrap())
            .collect();
        let params: Vec<SamplingParams> = (0..prompts.len())
            .map(|i| SamplingParams {
                max_new_tokens: 16 + 8 * (i % 3),
                logprobs: Some(2),
                ..Default::default()
            })
            .collect();
        let mut got = vec![None; prompts.len()];
        let stats = generate_continuous(
            &model,
            &tok,
            &prompts,
            &params,
            3,
            |_, _| {},
            |i, c| got[i] = Some(c),
        )
        .unwrap();
        assert!(stats.joined >= 3, "{stats:?}");
        let mut identical = 0;
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate_each(
                &model,
                &tok,
                std::slice::from_ref(p),
                &params[i..=i],
                |_, _| {},
            )
            .unwrap()
            .remove(0);
            let c = got[i].as_ref().unwrap();
            let common = c
                .ids
                .iter()
                .zip(&alone.ids)
                .take_while(|(a, b)| a == b)
                .count();
            let noise = c.logprobs[..common]
                .iter()
                .zip(&alone.logprobs)
                .map(|(x, y)| {
                    (x.top[0].1 - y.top[0].1)
                        .abs()
                        .max((x.top[1].1 - y.top[1].1).abs())
                })
                .fold(0f32, f32::max);
            assert!(
                noise < 1e-3,
                "{format:?} prompt {i}: log-probs differ by {noise}"
            );
            if c.ids == alone.ids {
                identical += 1;
                continue;
            }
            // They part at position `common`: there, the alone run's top two must be close.
            let top = &alone.logprobs[common].top;
            let margin = top[0].1 - top[1].1;
            eprintln!(
                "{format:?} prompt {i}: parts after {common} tokens, top-2 margin {margin:.4}"
            );
            assert!(
                margin < 0.05,
                "{format:?} prompt {i}: runs part after {common} tokens at a clear choice (margin {margin})"
            );
        }
        eprintln!(
            "{format:?}: {identical} of {} identical, {stats:?}",
            prompts.len()
        );
    }
}
