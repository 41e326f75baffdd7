//! Model-level properties on tiny random models: gradients reach every parameter, fused and
//! differentiable paths agree, the KV cache and batching change nothing, checkpoints round-trip
//! bit for bit, GGUF and safetensors give the same model, and bad files give clear errors.

use candle_core::{D, DType, Device, IndexOp, Tensor};
use retort_model::generation::{SamplingParams, generate};
use retort_model::{Arch, Model, WeightFormat, checkpoint};
use retort_test::{max_abs_diff, random_weights, tiny_config, tiny_model, tiny_tokenizer};

fn ids(rows: &[&[u32]]) -> Tensor {
    Tensor::new(
        rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap()
}

/// Mean next-token cross-entropy over all positions, built from differentiable ops.
fn next_token_loss(model: &Model, x: &Tensor) -> Tensor {
    let (b, t) = x.dims2().unwrap();
    let logits = model.logits(&x.narrow(1, 0, t - 1).unwrap()).unwrap(); // (B, T-1, V)
    let v = logits.dim(D::Minus1).unwrap();
    let targets = x.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let logp =
        candle_nn::ops::log_softmax(&logits.reshape((b * (t - 1), v)).unwrap(), D::Minus1).unwrap();
    let picked = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    picked.mean_all().unwrap().neg().unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    for (arch, tied) in [
        (Arch::Llama, true),
        (Arch::Llama, false),
        (Arch::Qwen2, false),
    ] {
        let mut cfg = tiny_config(arch);
        cfg.tie_word_embeddings = tied;
        let student = Model::trainable(&cfg, &random_weights(&cfg, 1)).unwrap();
        let expected = student.named_tensors().unwrap().len();
        assert_eq!(
            student.vars().len(),
            expected,
            "{arch:?}: every saved tensor is a Var"
        );
        let loss = next_token_loss(
            &student,
            &ids(&[&[1, 5, 6, 7, 8, 9, 2], &[1, 10, 11, 12, 13, 14, 2]]),
        );
        let grads = loss.backward().unwrap();
        for (name, var) in student.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{arch:?}: gradient of {name} has norm² {norm}"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let cfg = tiny_config(Arch::Qwen2);
    let weights = random_weights(&cfg, 2);
    let x = ids(&[&[1, 5, 6, 7, 8, 2]]);
    let student = Model::trainable(&cfg, &weights).unwrap();
    let grads = next_token_loss(&student, &x).backward().unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.bias",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ] {
        let var = &student.vars().iter().find(|(n, _)| n == name).unwrap().1;
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Probe the entry with the largest gradient.
        let k = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let eps = 1e-2f32;
        let loss_at = |delta: f32| {
            let mut w = base.clone();
            w[k] += delta;
            var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            next_token_loss(&student, &x)
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
        loss_at(0.0);
        let rel = (fd - g[k] as f64).abs() / fd.abs().max(1e-3);
        assert!(
            rel < 2e-2,
            "{name}[{k}]: autograd {} vs finite difference {fd} (rel {rel})",
            g[k]
        );
    }
}

#[test]
fn fused_frozen_path_equals_differentiable_path() {
    let cfg = tiny_config(Arch::Qwen2);
    let w = random_weights(&cfg, 3);
    let frozen = Model::frozen(&cfg, &w, WeightFormat::F32).unwrap();
    let trainable = Model::trainable(&cfg, &w).unwrap();
    let x = ids(&[&[1, 5, 6, 7, 8, 9, 2, 4], &[1, 10, 11, 12, 13, 14, 2, 4]]);
    let d = max_abs_diff(&frozen.logits(&x).unwrap(), &trainable.logits(&x).unwrap());
    assert!(d < 1e-5, "{d}");
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let cfg = tiny_config(Arch::Llama);
    let model = tiny_model(&cfg, 4);
    let seq: &[u32] = &[1, 5, 6, 7, 8, 9, 10, 11, 12];
    let full = model.logits(&ids(&[seq])).unwrap(); // (1, T, V)
    let mut cache = model.new_cache(32);
    // Prefill 4 positions, then one at a time.
    let h = model
        .forward(&ids(&[&seq[..4]]), 0, &[], Some(&mut cache))
        .unwrap();
    let mut rows = vec![model.lm_head(&h).unwrap()];
    for (i, &t) in seq.iter().enumerate().skip(4) {
        let h = model
            .forward(&ids(&[&[t]]), i, &[], Some(&mut cache))
            .unwrap();
        rows.push(model.lm_head(&h).unwrap());
    }
    let inc = Tensor::cat(&rows, 1).unwrap();
    let d = max_abs_diff(&full, &inc);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn left_padded_batch_equals_each_sequence_alone() {
    let cfg = tiny_config(Arch::Qwen2);
    let model = tiny_model(&cfg, 5);
    let a: &[u32] = &[1, 5, 6, 7, 8, 9];
    let b: &[u32] = &[1, 10, 11];
    let pad = 3u32;
    let batch = ids(&[a, &[pad, pad, pad, 1, 10, 11]]);
    let h = model.forward(&batch, 0, &[0, 3], None).unwrap();
    let alone_a = model.forward(&ids(&[a]), 0, &[], None).unwrap();
    let alone_b = model.forward(&ids(&[b]), 0, &[], None).unwrap();
    assert!(max_abs_diff(&h.i(0..1).unwrap(), &alone_a) < 1e-5);
    let d = max_abs_diff(&h.i((1..2, 3..6)).unwrap(), &alone_b);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let cfg = tiny_config(Arch::Llama);
    let model = tiny_model(&cfg, 6);
    let tok = tiny_tokenizer();
    let prompts: Vec<Vec<u32>> = vec![vec![1, 5, 6, 7], vec![1, 8], vec![1, 9, 10, 11, 12, 13]];
    for temperature in [0.0, 0.8] {
        let params = SamplingParams {
            max_new_tokens: 12,
            temperature,
            top_p: 0.9,
            seed: 11,
            stop: vec![],
        };
        let batched = generate(&model, &tok, &prompts, &params, |_, _| {}).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let single_params = SamplingParams {
                seed: 11 + i as u64,
                ..params.clone()
            };
            let alone = generate(
                &model,
                &tok,
                std::slice::from_ref(p),
                &single_params,
                |_, _| {},
            )
            .unwrap();
            assert_eq!(
                batched[i].ids, alone[0].ids,
                "prompt {i} at temperature {temperature}"
            );
        }
    }
}

#[test]
fn generation_stops_on_eos_and_on_stop_strings() {
    let cfg = tiny_config(Arch::Llama);
    let model = tiny_model(&cfg, 7);
    let tok = tiny_tokenizer();
    let params = SamplingParams {
        max_new_tokens: 40,
        ..Default::default()
    };
    let free = generate(&model, &tok, &[vec![1, 5]], &params, |_, _| {})
        .unwrap()
        .remove(0);
    assert!(
        !free.ids.contains(&2),
        "EOS is never part of the returned ids"
    );
    if free.text.split_whitespace().count() >= 2 {
        // Stop at the second word: the text must end right before it.
        let second = free.text.split_whitespace().nth(1).unwrap().to_string();
        let stop = SamplingParams {
            stop: vec![second.clone()],
            ..params.clone()
        };
        let mut streamed = String::new();
        let cut = generate(&model, &tok, &[vec![1, 5]], &stop, |_, s| {
            streamed.push_str(s)
        })
        .unwrap()
        .remove(0);
        assert_eq!(
            cut.finish_reason,
            retort_model::generation::FinishReason::Stop
        );
        assert!(
            !cut.text.contains(&second),
            "{:?} still contains {second:?}",
            cut.text
        );
        assert_eq!(
            streamed, cut.text,
            "streamed pieces add up to the final text"
        );
    }
}

#[test]
fn checkpoint_round_trip_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = tiny_config(arch);
        let model = Model::trainable(&cfg, &random_weights(&cfg, 8)).unwrap();
        let out = dir.path().join(arch.name());
        checkpoint::save_hf(&model, &tiny_tokenizer(), &out, false).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let ck = checkpoint::read(&out, &Device::Cpu).unwrap();
        assert_eq!(ck.config, cfg);
        let back = ck.trainable().unwrap();
        let (a, b) = (
            model.named_tensors().unwrap(),
            back.named_tensors().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let (va, vb) = (
                ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                tb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{na} differs"
            );
        }
        let x = ids(&[&[1, 5, 6, 7]]);
        assert_eq!(
            max_abs_diff(&model.logits(&x).unwrap(), &back.logits(&x).unwrap()),
            0.0
        );
        // The chat template survives the round trip.
        let msgs = [retort_data::Message::user("why is the sky blue ?")];
        assert_eq!(
            ck.tokenizer.encode_prompt(&msgs).unwrap(),
            tiny_tokenizer().encode_prompt(&msgs).unwrap()
        );
        // Saving onto an existing directory needs overwrite.
        let e = checkpoint::save_hf(&model, &tiny_tokenizer(), &out, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists") && e.contains("hint:"), "{e}");
        checkpoint::save_hf(&model, &tiny_tokenizer(), &out, true).unwrap();
    }
}

#[test]
fn pruning_keeps_the_chosen_layers() {
    let mut cfg = tiny_config(Arch::Llama);
    cfg.num_hidden_layers = 4;
    let w = random_weights(&cfg, 9);
    let model = Model::frozen(&cfg, &w, WeightFormat::F32).unwrap();
    let x = ids(&[&[1, 5, 6, 7]]);
    let all = model.prune_layers(&[0, 1, 2, 3], "m".as_ref()).unwrap();
    assert_eq!(
        max_abs_diff(&model.logits(&x).unwrap(), &all.logits(&x).unwrap()),
        0.0
    );
    let pruned = model.prune_layers(&[0, 3], "m".as_ref()).unwrap();
    assert_eq!(pruned.config().num_hidden_layers, 2);
    let names: Vec<String> = pruned
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"model.layers.1.mlp.up_proj.weight".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("model.layers.2.")));
    // Layer 1 of the pruned model is layer 3 of the original.
    let orig = model
        .named_tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "model.layers.3.mlp.up_proj.weight")
        .unwrap()
        .1;
    let new = pruned
        .named_tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "model.layers.1.mlp.up_proj.weight")
        .unwrap()
        .1;
    assert_eq!(max_abs_diff(&orig, &new), 0.0);
    let e = model
        .prune_layers(&[0, 9], "m".as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 9") && e.contains("hint:"), "{e}");
}
