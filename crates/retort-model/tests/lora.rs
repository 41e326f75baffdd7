//! LoRA students on tiny random models: at step 0 the model is the base exactly (B = 0); its
//! gradients match finite differences; the merged checkpoint gives the logits of base + adapter;
//! only the adapters train; a PEFT adapter written and read back is the same adapter.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use candle_core::{Device, Tensor};
use retort_model::lora::{self, LoraConfig, LoraTarget};
use retort_model::{Arch, Model, WeightFormat, Weights, weights::Stored};
use retort_test::{finite_difference_at_largest, ids, max_abs_diff, random_weights, tiny_config};

fn next_token_loss(model: &Model, x: &Tensor) -> Tensor {
    retort_test::next_token_loss(model, x).unwrap()
}

fn cfg(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        ..LoraConfig::default()
    }
}

/// Give every B seeded random values (a trained adapter), so that A's gradients are not zero.
fn randomize_b(model: &Model, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, var) in model.vars() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn at_step_zero_a_lora_student_is_its_base_exactly() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let c = tiny_config(arch);
        let w = random_weights(&c, 1);
        let base = Model::trainable(&c, &w).unwrap();
        let student = Model::with_lora(&c, &w, &cfg(4), 7).unwrap();
        let x = ids(&[&[1, 5, 6, 7, 8, 9, 2], &[1, 10, 11, 12, 13, 14, 2]]);
        let (a, b) = (base.logits(&x).unwrap(), student.logits(&x).unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{arch:?}"
        );
        // Only adapters train: A and B for each of the 7 targets in each layer.
        assert_eq!(student.vars().len(), 2 * 7 * c.num_hidden_layers);
        assert!(
            student
                .vars()
                .iter()
                .all(|(n, _)| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
        );
        // The same seed gives the same A.
        let again = Model::with_lora(&c, &w, &cfg(4), 7).unwrap();
        for ((n, v1), (_, v2)) in student.vars().iter().zip(again.vars()) {
            assert_eq!(max_abs_diff(v1.as_tensor(), v2.as_tensor()), 0.0, "{n}");
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let c = tiny_config(Arch::Qwen2);
    let w = random_weights(&c, 2);
    let student = Model::with_lora(&c, &w, &cfg(3), 5).unwrap();
    randomize_b(&student, 1);
    let x = ids(&[&[1, 5, 6, 7, 8, 2], &[1, 9, 10, 11, 12, 13]]);
    let grads = next_token_loss(&student, &x).backward().unwrap();
    let mut probed = 0;
    for (name, var) in student.vars() {
        if !(name.starts_with("model.layers.0.self_attn.q_proj")
            || name.starts_with("model.layers.1.mlp.down_proj")
            || name.starts_with("model.layers.0.self_attn.v_proj")
            || name.starts_with("model.layers.1.mlp.gate_proj"))
        {
            continue;
        }
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let (g, fd, rel) = finite_difference_at_largest(var, grad, 1e-2, || {
            retort_test::scalar_f64(&next_token_loss(&student, &x))
        });
        assert!(
            g != 0.0 && rel < 2e-2,
            "{name}: autograd {g} vs finite difference {fd} (rel {rel})"
        );
        probed += 1;
    }
    assert_eq!(probed, 8, "A and B of four layers");
}

#[test]
fn merged_checkpoint_gives_base_plus_adapter_logits() {
    let c = tiny_config(Arch::Llama);
    let w = random_weights(&c, 3);
    let student = Model::with_lora(&c, &w, &cfg(4), 9).unwrap();
    randomize_b(&student, 2);
    let x = ids(&[&[1, 5, 6, 7, 8, 9, 2, 4], &[1, 10, 11, 12, 13, 14, 2, 4]]);
    let with_adapter = student.logits(&x).unwrap();
    let tensors = student
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Stored::Dense(t)))
        .collect();
    let merged = Model::frozen(
        &c,
        &Weights::new("merged".as_ref(), tensors, &Device::Cpu),
        WeightFormat::F32,
    )
    .unwrap();
    let base = Model::frozen(&c, &w, WeightFormat::F32).unwrap();
    let merged_logits = merged.logits(&x).unwrap();
    let d = max_abs_diff(&with_adapter, &merged_logits);
    let moved = max_abs_diff(&with_adapter, &base.logits(&x).unwrap());
    // (W + s·B·A)·x and W·x + s·(x·Aᵀ)·Bᵀ differ only by f32 rounding; the adapter itself moves
    // the logits by orders of magnitude more.
    assert!(d < 1e-4, "merged vs adapter logits differ by {d}");
    assert!(moved > 1e-2, "the adapter moved the logits by only {moved}");
}

#[test]
fn adapter_round_trips_through_peft_files() {
    let c = tiny_config(Arch::Qwen2);
    let w = random_weights(&c, 4);
    let lc = LoraConfig {
        targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj],
        ..cfg(2)
    };
    let student = Model::with_lora(&c, &w, &lc, 3).unwrap();
    randomize_b(&student, 3);
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(&student, "base-model".as_ref(), dir.path()).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &fs_err::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 2);
    assert_eq!(json["lora_alpha"], 4.0);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let st_bytes = fs_err::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), [2, c.hidden_size]);
    // Read back into a fresh student of another seed: the same adapter, the same logits.
    let other = Model::with_lora(&c, &w, &lc, 99).unwrap();
    lora::load_adapter(&other, dir.path()).unwrap();
    let x = ids(&[&[1, 5, 6, 7, 8, 9]]);
    assert_eq!(
        max_abs_diff(&student.logits(&x).unwrap(), &other.logits(&x).unwrap()),
        0.0
    );
    // An adapter of another rank is refused, naming the tensor.
    let wrong = Model::with_lora(&c, &w, &LoraConfig { rank: 3, ..lc }, 1).unwrap();
    let e = lora::load_adapter(&wrong, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_A.weight") && e.contains("shape"), "{e}");
}

#[test]
fn bad_lora_settings_are_refused_before_building() {
    let c = tiny_config(Arch::Llama);
    let w = random_weights(&c, 5);
    let too_big = LoraConfig {
        rank: 4096,
        ..LoraConfig::default()
    };
    let e = Model::with_lora(&c, &w, &too_big, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.rank") && e.contains("at most"), "{e}");
    let dropout = LoraConfig {
        dropout: 0.1,
        ..LoraConfig::default()
    };
    let e = Model::with_lora(&c, &w, &dropout, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.dropout"), "{e}");
}

/// A PEFT adapter directory reads as a model (`checkpoint::read`): its base (a saved Hugging
/// Face directory, found relative to the adapter) with every update merged, giving the LoRA
/// student's logits; bad adapter configurations are refused naming the field.
#[test]
fn an_adapter_directory_reads_as_its_merged_model() {
    use retort_model::checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let c = tiny_config(Arch::Llama);
    let base_dir = retort_test::write_tiny_model(dir.path(), &c, 6);
    let base = checkpoint::read(&base_dir, &Device::Cpu).unwrap();
    let lc = LoraConfig {
        targets: vec![LoraTarget::QProj, LoraTarget::KProj, LoraTarget::UpProj],
        ..cfg(2)
    };
    let student = Model::with_lora(&c, &base.weights, &lc, 7).unwrap();
    randomize_b(&student, 8);
    let adapter = dir.path().join("adapter");
    fs_err::create_dir_all(&adapter).unwrap();
    // Relative to the adapter's directory, as a run's `model/adapter` may be moved with its base.
    lora::save_adapter(&student, "../tiny".as_ref(), &adapter).unwrap();
    let read = checkpoint::read(&adapter, &Device::Cpu).unwrap();
    let merged = read.frozen(WeightFormat::F32).unwrap();
    let x = ids(&[&[1, 5, 6, 7, 8, 9, 2, 4]]);
    let d = max_abs_diff(&student.logits(&x).unwrap(), &merged.logits(&x).unwrap());
    let moved = max_abs_diff(
        &student.logits(&x).unwrap(),
        &base.frozen(WeightFormat::F32).unwrap().logits(&x).unwrap(),
    );
    assert!(
        d < 1e-4 && moved > 1e-2,
        "merged vs adapter {d}, moved {moved}"
    );
    assert_eq!(
        read.tokenizer.encode("hello world").unwrap(),
        base.tokenizer.encode("hello world").unwrap()
    );

    let cfg_path = adapter.join("adapter_config.json");
    let original = fs_err::read_to_string(&cfg_path).unwrap();
    let edit = |key: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v[key] = value;
        fs_err::write(&cfg_path, v.to_string()).unwrap();
        checkpoint::read(&adapter, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let e = edit("base_model_name_or_path", "Qwen/Qwen2.5-0.5B".into());
    assert!(
        e.contains("base_model_name_or_path") && e.contains("hint"),
        "{e}"
    );
    let e = edit("use_dora", true.into());
    assert!(e.contains("use_dora"), "{e}");
    let e = edit("peft_type", "IA3".into());
    assert!(e.contains("peft_type"), "{e}");
    let e = edit("r", 0.into());
    assert!(e.contains("`r`"), "{e}");
}
