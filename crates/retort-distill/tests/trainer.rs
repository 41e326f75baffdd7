//! The trainer end to end on tiny models: a two-stage KD → SFT recipe trains and lowers the
//! loss, a run stopped and resumed equals the uninterrupted run bit for bit, the NaN guard stops
//! with the last checkpoint intact, and bad data is refused before any compute.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};

use candle_core::Device;
use retort_distill::recipe::Recipe;
use retort_distill::setup::prepare;
use retort_distill::trainer::{Outcome, RunOptions, Silent, run};
use retort_model::Arch;
use retort_test::{WORDS, tiny_config, write_tiny_model};

fn sentence(x: &mut u64, n: usize) -> String {
    let words = &WORDS[3..]; // skip role names
    (0..n)
        .map(|_| {
            *x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            words[(*x >> 33) as usize % words.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_data(path: &Path, n: usize, seed: u64) {
    let mut x = seed;
    let mut out = String::new();
    for i in 0..n {
        let q = sentence(&mut x, 3 + i % 4);
        // A learnable answer: the question's words, reversed, then "yes".
        let a: Vec<&str> = q.split(' ').rev().collect();
        let rec = serde_json::json!({"id": format!("r{i}"), "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": format!("{} yes", a.join(" "))}]});
        out.push_str(&format!("{rec}\n"));
    }
    fs_err::write(path, out).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    recipe: PathBuf,
}

fn fixture(extra: &str) -> Fixture {
    fixture_with("", extra)
}

/// `student` goes into `[student]` (after `num_layers = 2`), `extra` into `[train]`.
fn fixture_with(student: &str, extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.num_hidden_layers = 3;
    let teacher = write_tiny_model(&root, &cfg, 1);
    write_data(&root.join("synthetic.jsonl"), 24, 5);
    write_data(&root.join("human.jsonl"), 10, 9);
    let recipe = root.join("two-stage.toml");
    let text = format!(
        r#"
[teacher]
path = "{teacher}"
[student]
num_layers = 2
{student}
[train]
batch_size = 2
grad_accum = 2
max_len = 24
save_every = 2
eval_every = 3
keep_checkpoints = 2
warmup_ratio = 0.1
chunk_rows = 5
{extra}
[[stages]]
name = "synthetic-kd"
data = "synthetic.jsonl"
method = "kd"
loss = "forward_kl"
alpha = 0.5
temperature = 2.0
epochs = 2
lr = 0.01
[[stages]]
name = "human-sft"
data = "human.jsonl"
method = "sft"
epochs = 2
lr = 0.005
"#,
        teacher = teacher.display()
    );
    fs_err::write(&recipe, text).unwrap();
    Fixture {
        _dir: dir,
        root,
        recipe,
    }
}

fn train(
    recipe: &Path,
    out: &Path,
    resume: bool,
    max_steps: Option<usize>,
) -> retort_distill::Result<Outcome> {
    let plan = prepare(Recipe::load(recipe, &[])?, &Device::Cpu)?;
    let opts = RunOptions {
        out: out.to_path_buf(),
        resume,
        max_steps_this_run: max_steps,
        ..Default::default()
    };
    run(&plan, &opts, &mut Silent)
}

fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    fs_err::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .map(|mut v| {
            // Timings differ between runs; everything else must not.
            let o = v.as_object_mut().unwrap();
            if o["kind"] == "train" {
                let (all, loss) = (o["tokens_per_s"].as_f64(), o["loss_tokens_per_s"].as_f64());
                let (real, tokens) = (o["real_tokens"].as_u64(), o["tokens"].as_u64());
                assert!(real >= tokens && tokens > Some(0), "{o:?}");
                assert!(all >= loss && loss > Some(0.0), "{o:?}");
            }
            o.remove("tokens_per_s");
            o.remove("loss_tokens_per_s");
            v
        })
        .collect()
}

/// Train into `out` stopping after 3 steps, then (after `between`) resume and stop at step 9
/// (stage 2 of the fixture), then resume to the end.
fn interrupted_twice_then_resumed(recipe: &Path, out: &Path, between: impl Fn(&Path)) {
    assert!(matches!(
        train(recipe, out, false, Some(3)).unwrap(),
        Outcome::Interrupted(_)
    ));
    between(out);
    assert!(matches!(
        train(recipe, out, true, Some(9)).unwrap(),
        Outcome::Interrupted(_)
    ));
    assert_eq!(
        train(recipe, out, true, None).unwrap(),
        Outcome::Finished(out.join("model"))
    );
}

#[test]
fn two_stage_run_trains_and_resume_is_bit_exact() {
    let fx = fixture("");
    let a = fx.root.join("run-a");
    let out = train(&fx.recipe, &a, false, None).unwrap();
    assert_eq!(out, Outcome::Finished(a.join("model")));
    let train_a = records(&a, "train");
    // 21 KD samples after a 10 % eval split (3) → 11 batches of 2 → 6 steps/epoch × 2 epochs;
    // then 9 SFT samples → 5 batches → 3 steps/epoch × 2.
    assert_eq!(train_a.len(), 12 + 6);
    let kd_losses: Vec<f64> = train_a[..12]
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    let (first, last) = (
        kd_losses[..3].iter().sum::<f64>(),
        kd_losses[9..].iter().sum::<f64>(),
    );
    assert!(last < first, "KD loss did not fall: {kd_losses:?}");
    assert!(
        train_a
            .iter()
            .all(|r| r["grad_norm"].as_f64().unwrap().is_finite())
    );
    let lineage: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(a.join("model/lineage.json")).unwrap())
            .unwrap();
    assert_eq!(lineage[0]["stage"], "synthetic-kd");
    assert_eq!(lineage[0]["teacher"]["arch"], "llama");
    assert_eq!(lineage[1]["method"], "sft");
    assert!(lineage[1]["teacher"].is_null());
    assert_eq!(lineage[1]["completed"], true);
    assert_eq!(lineage[0]["data_sha256"].as_str().unwrap().len(), 64);

    // Interrupted twice (once mid-stage 1, once mid-stage 2) and resumed; a fresh start over
    // an interrupted run is refused.
    let b = fx.root.join("run-b");
    interrupted_twice_then_resumed(&fx.recipe, &b, |b| {
        let e = train(&fx.recipe, b, false, None).unwrap_err().to_string();
        assert!(e.contains("--resume"), "{e}");
    });

    let wa = fs_err::read(a.join("model/model.safetensors")).unwrap();
    let wb = fs_err::read(b.join("model/model.safetensors")).unwrap();
    assert!(wa == wb, "resumed model differs from the uninterrupted one");
    assert_eq!(records(&b, "train"), train_a);
    assert_eq!(records(&b, "eval"), records(&a, "eval"));
    // Step checkpoints rotate; stage checkpoints stay.
    let mut names: Vec<String> = fs_err::read_dir(b.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(
        names.contains(&"stage-0-synthetic-kd".to_string()),
        "{names:?}"
    );
    assert!(
        names.iter().filter(|n| n.starts_with("step-")).count() <= 2,
        "{names:?}"
    );
    // A changed recipe cannot silently resume an old run.
    let e = {
        let plan = prepare(
            Recipe::load(&fx.recipe, &["stages.1.lr=0.1".into()]).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        run(
            &plan,
            &RunOptions {
                out: b.clone(),
                resume: true,
                ..Default::default()
            },
            &mut Silent,
        )
        .unwrap_err()
        .to_string()
    };
    assert!(e.contains("recipe differs"), "{e}");
}

#[test]
fn lora_run_trains_only_adapters_and_resume_is_bit_exact() {
    let fx = fixture_with(
        r#"lora = { rank = 4, alpha = 8, targets = ["q_proj", "v_proj", "up_proj", "down_proj"] }"#,
        "",
    );
    let a = fx.root.join("run-a");
    assert_eq!(
        train(&fx.recipe, &a, false, None).unwrap(),
        Outcome::Finished(a.join("model"))
    );
    let train_a = records(&a, "train");
    assert_eq!(train_a.len(), 12 + 6);
    let kd: Vec<f64> = train_a[..12]
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert!(
        kd[9..].iter().sum::<f64>() < kd[..3].iter().sum::<f64>(),
        "KD loss did not fall: {kd:?}"
    );
    // The final model is merged (an ordinary checkpoint) and carries its PEFT adapter.
    let adapter: serde_json::Value = serde_json::from_str(
        &fs_err::read_to_string(a.join("model/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["r"], 4);
    assert!(a.join("model/adapter/adapter_model.safetensors").exists());
    // Step checkpoints hold the adapter, not the model.
    let latest = fs_err::read_to_string(a.join("checkpoints/latest")).unwrap();
    let ck = a.join("checkpoints").join(latest.trim());
    assert!(ck.join("adapter_model.safetensors").exists());
    assert!(!ck.join("model.safetensors").exists());
    // Only the adapted layers changed: the embedding and norms are the pruned teacher's.
    let read = |p: &Path| {
        let bytes = fs_err::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, v)| (n, v.data().to_vec()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let merged = read(&a.join("model/model.safetensors"));
    let plan = prepare(Recipe::load(&fx.recipe, &[]).unwrap(), &Device::Cpu).unwrap();
    let base: std::collections::HashMap<_, _> = plan
        .student
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                n,
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            )
        })
        .collect();
    for (name, bytes) in &merged {
        let same = base[name] == *bytes;
        let adapted = ["q_proj", "v_proj", "up_proj", "down_proj"]
            .iter()
            .any(|t| name.contains(t));
        assert_eq!(same, !adapted, "{name}: changed = {}", !same);
    }

    // Interrupted (mid-stage 1 and mid-stage 2) and resumed: bit for bit the same.
    let b = fx.root.join("run-b");
    interrupted_twice_then_resumed(&fx.recipe, &b, |_| {});
    for f in [
        "model/model.safetensors",
        "model/adapter/adapter_model.safetensors",
    ] {
        assert!(
            fs_err::read(a.join(f)).unwrap() == fs_err::read(b.join(f)).unwrap(),
            "resumed {f} differs from the uninterrupted one"
        );
    }
    assert_eq!(records(&b, "train"), train_a);
    assert_eq!(records(&b, "eval"), records(&a, "eval"));
}

#[test]
fn bf16_adamw_moments_train_and_resume_bit_exact() {
    let fx = fixture(r#"adamw.moments = "bf16""#);
    let a = fx.root.join("run-a");
    train(&fx.recipe, &a, false, None).unwrap();
    let b = fx.root.join("run-b");
    interrupted_twice_then_resumed(&fx.recipe, &b, |_| {});
    let wa = fs_err::read(a.join("model/model.safetensors")).unwrap();
    assert!(wa == fs_err::read(b.join("model/model.safetensors")).unwrap());
    assert_eq!(records(&b, "train"), records(&a, "train"));
    // The stored moments are bf16 (half the size of the f32 run's).
    let latest = fs_err::read_to_string(a.join("checkpoints/latest")).unwrap();
    let bytes = fs_err::read(
        a.join("checkpoints")
            .join(latest.trim())
            .join("optimizer.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (name, m) = st
        .tensors()
        .into_iter()
        .find(|(n, _)| n.starts_with("m."))
        .unwrap();
    assert_eq!(m.dtype(), safetensors::Dtype::BF16, "{name}");
}

#[test]
fn nan_guard_stops_with_the_last_checkpoint_intact() {
    let fx = fixture("");
    let out = fx.root.join("run");
    let plan = prepare(
        Recipe::load(
            &fx.recipe,
            &[
                "stages.0.lr=1e30".into(),
                "train.save_every=1".into(),
                "train.max_grad_norm=0".into(),
            ],
        )
        .unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let e = run(
        &plan,
        &RunOptions {
            out: out.clone(),
            ..Default::default()
        },
        &mut Silent,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("is not finite"), "{msg}");
    let latest = fs_err::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert!(msg.contains(&latest), "{msg} should name {latest}");
    // The checkpoint it names loads.
    retort_model::checkpoint::read(&out.join("checkpoints").join(latest.trim()), &Device::Cpu)
        .unwrap();
}

#[test]
fn bad_data_is_refused_before_any_compute() {
    let fx = fixture("");
    let mut text = fs_err::read_to_string(fx.root.join("human.jsonl")).unwrap();
    text.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n");
    fs_err::write(fx.root.join("human.jsonl"), text).unwrap();
    let e = prepare(Recipe::load(&fx.recipe, &[]).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("human.jsonl:line 11"), "{e}");
    assert!(e.contains("no assistant turn"), "{e}");
    // --skip-invalid equivalent in the recipe.
    let plan = prepare(
        Recipe::load(&fx.recipe, &["stages.1.skip_invalid=true".into()]).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(plan.stages[1].report.skipped_invalid, 1);
    let summary = plan.summary();
    assert!(summary.contains("memory estimate"), "{summary}");
    assert!(summary.contains("1 invalid skipped"), "{summary}");
}

#[test]
fn padded_teacher_vocabulary_is_compared_on_shared_columns_and_other_tokenizers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny_config(Arch::Llama);
    let student = write_tiny_model(&root.join("s"), &cfg, 1);
    // The teacher has 8 padding rows more in its embedding (as Qwen's 152,064 vs 151,936).
    let mut padded = cfg.clone();
    padded.vocab_size += 8;
    let teacher = write_tiny_model(&root.join("t"), &padded, 2);
    write_data(&root.join("d.jsonl"), 6, 1);
    let recipe = root.join("r.toml");
    let text = format!(
        "[teacher]\npath = \"{}\"\n[student]\npath = \"{}\"\n[[stages]]\nname = \"kd\"\ndata = \"d.jsonl\"\nmethod = \"kd\"\n",
        teacher.display(),
        student.display()
    );
    fs_err::write(&recipe, text).unwrap();
    let plan = prepare(Recipe::load(&recipe, &[]).unwrap(), &Device::Cpu).unwrap();
    assert_eq!(plan.stages[0].objective.vocab_limit, Some(cfg.vocab_size));
    let out = root.join("run");
    assert!(matches!(
        run(
            &plan,
            &RunOptions {
                out,
                ..Default::default()
            },
            &mut Silent
        )
        .unwrap(),
        Outcome::Finished(_)
    ));

    // A teacher whose tokenizer differs is refused with a hint.
    let t_dir = root.join("t/tiny");
    let mut tok: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(t_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let id = vocab.remove("sky").unwrap();
    vocab.insert("cloud".into(), id);
    fs_err::write(t_dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = prepare(Recipe::load(&recipe, &[]).unwrap(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer differs") && e.contains("hint:"),
        "{e}"
    );
}
