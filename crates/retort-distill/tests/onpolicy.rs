//! On-policy distillation on tiny models: with λ = 0 the stage is off-policy KD step by step;
//! both estimators' gradients match finite differences; a run stopped mid-round and resumed
//! equals the uninterrupted run bit for bit; the rounds are written, readable and diagnosed.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};

use candle_core::Device;
use retort_distill::Divergence;
use retort_distill::batch::{Sample, collate};
use retort_distill::grads::Grads;
use retort_distill::objective::{KdTerm, Objective, accumulate};
use retort_distill::onpolicy::RoundFile;
use retort_distill::recipe::Recipe;
use retort_distill::setup::prepare;
use retort_distill::sparse::SparseTargets;
use retort_distill::trainer::{Outcome, RunOptions, Silent, run};
use retort_model::{Arch, Model, WeightFormat};
use retort_test::{WORDS, finite_difference_at_largest, random_weights, tiny_config};

fn write_data(path: &Path, n: usize) {
    let mut x = 7u64;
    let mut word = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        WORDS[3 + (x >> 33) as usize % (WORDS.len() - 3)]
    };
    let mut out = String::new();
    for i in 0..n {
        let q: Vec<&str> = (0..3 + i % 4).map(|_| word()).collect();
        let a: Vec<&str> = q.iter().rev().copied().collect();
        let rec = serde_json::json!({"id": format!("r{i}"), "messages": [
            {"role": "user", "content": q.join(" ")},
            {"role": "assistant", "content": format!("{} yes", a.join(" "))}]});
        out.push_str(&format!("{rec}\n"));
    }
    fs_err::write(path, out).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut cfg = tiny_config(Arch::Llama);
    cfg.num_hidden_layers = 3;
    let teacher = retort_test::write_tiny_model(&root, &cfg, 1);
    write_data(&root.join("data.jsonl"), 24);
    Fixture {
        _dir: dir,
        root,
        teacher,
    }
}

impl Fixture {
    /// A one-stage recipe: `stage` is the stage's method and options.
    fn recipe(&self, name: &str, stage: &str) -> PathBuf {
        let p = self.root.join(format!("{name}.toml"));
        let text = format!(
            r#"
[teacher]
path = "{teacher}"
[student]
num_layers = 2
[train]
batch_size = 2
grad_accum = 2
max_len = 40
eval_fraction = 0.0
save_every = 1
keep_checkpoints = 100
chunk_rows = 5
[[stages]]
name = "op"
data = "data.jsonl"
epochs = 2
lr = 0.01
{stage}
"#,
            teacher = self.teacher.display()
        );
        fs_err::write(&p, text).unwrap();
        p
    }
}

fn train(recipe: &Path, out: &Path, resume: bool, max_steps: Option<usize>) -> Outcome {
    let plan = prepare(Recipe::load(recipe, &[]).unwrap(), &Device::Cpu).unwrap();
    let opts = RunOptions {
        out: out.to_path_buf(),
        resume,
        max_steps_this_run: max_steps,
        ..Default::default()
    };
    run(&plan, &opts, &mut Silent).unwrap()
}

fn records(out: &Path, kind: &str) -> Vec<serde_json::Value> {
    fs_err::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            for timing in [
                "tokens_per_s",
                "loss_tokens_per_s",
                "seconds_sampling",
                "seconds_scoring",
                "seconds_training",
            ] {
                o.remove(timing);
            }
            v
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<u8> {
    fs_err::read(dir.join("model.safetensors")).unwrap()
}

fn rounds(out: &Path) -> Vec<RoundFile> {
    let mut paths: Vec<PathBuf> = fs_err::read_dir(out.join("rounds/stage-0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let mut r: RoundFile =
                serde_json::from_str(&fs_err::read_to_string(p).unwrap()).unwrap();
            r.seconds_sampling = 0.0; // a timing: differs between runs
            r
        })
        .collect()
}

#[test]
fn lambda_zero_is_off_policy_kd_step_by_step() {
    let f = fixture();
    let vocab = tiny_config(Arch::Llama).vocab_size;
    let off = f.recipe("off", "method = \"kd\"\nloss = \"reverse_kl\"\nalpha = 1.0");
    let b = f.root.join("run-off");
    train(&off, &b, false, None);
    let rb = records(&b, "train");
    // The live teacher's whole distribution in the step (top_k unset), and its top-k with
    // k = V scored once per round: both are the off-policy stage's targets.
    for (name, top_k, tol) in [
        ("dense", String::new(), 1e-6),
        ("top-V", format!("top_k = {vocab}"), 1e-4),
    ] {
        let on = f.recipe(
            name,
            &format!(
                "method = \"on_policy\"\n[stages.on_policy]\nlambda = 0.0\nupdates_per_round = 2\n{top_k}"
            ),
        );
        let a = f.root.join(format!("run-{name}"));
        train(&on, &a, false, None);
        let ra = records(&a, "train");
        assert_eq!(ra.len(), 12, "24 samples × 2 epochs / 4 per step");
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(x["tokens"], y["tokens"], "the same samples in every step");
            assert_eq!(x["real_tokens"], y["real_tokens"]);
            assert_eq!(x["lr"], y["lr"]);
            for key in ["loss", "ce", "kd", "grad_norm"] {
                let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
                assert!(
                    (p - q).abs() <= tol * q.abs().max(1.0),
                    "{name}, step {}: {key} {p} (on-policy, λ = 0) vs {q} (off-policy)",
                    x["step"]
                );
            }
        }
        // Every round kept the data's answers.
        let rs = rounds(&a);
        assert_eq!(rs.len(), 6);
        assert!(rs.iter().all(|r| r.samples.iter().all(|s| !s.student)));
        let round_recs = records(&a, "round");
        assert_eq!(round_recs.len(), 6);
        assert!(round_recs.iter().all(|r| r["student_samples"] == 0));
    }
}

#[test]
fn on_policy_rounds_are_written_diagnosed_and_resume_exactly() {
    let f = fixture();
    let recipe = f.recipe(
        "on",
        "method = \"on_policy\"\n[stages.on_policy]\nlambda = 0.75\nupdates_per_round = 3\nsamples_per_round = 8\nmax_new_tokens = 6\ntop_k = 8",
    );
    let whole = f.root.join("whole");
    assert!(matches!(
        train(&recipe, &whole, false, None),
        Outcome::Finished(_)
    ));
    // Stopped in the middle of the second round (step 4 of rounds of 3), then resumed twice.
    let parts = f.root.join("parts");
    assert!(matches!(
        train(&recipe, &parts, false, Some(4)),
        Outcome::Interrupted(_)
    ));
    assert_eq!(
        rounds(&parts).len(),
        2,
        "round 1 was written before its first update"
    );
    train(&recipe, &parts, true, Some(1));
    assert!(matches!(
        train(&recipe, &parts, true, None),
        Outcome::Finished(_)
    ));
    assert_eq!(weights(&whole.join("model")), weights(&parts.join("model")));
    assert_eq!(records(&whole, "train"), records(&parts, "train"));
    assert!(rounds(&whole) == rounds(&parts), "the rounds differ");

    // 24 prompts × 2 epochs in rounds of 8: 6 rounds of 3 updates.
    let rs = rounds(&whole);
    assert_eq!(rs.len(), 6);
    let students: usize = rs
        .iter()
        .map(|r| r.samples.iter().filter(|s| s.student).count())
        .sum();
    // λ = 0.75 of 48 prompts: 36 expected; a binomial's 4σ is 12.
    assert!((24..=48).contains(&students), "{students} student answers");
    for r in &rs {
        assert_eq!(r.samples.len(), 8);
        for s in r.samples.iter().filter(|s| s.student) {
            let n = s.ids.len() - s.answer_start;
            assert!((1..=6).contains(&n), "answer of {n} tokens");
            assert_eq!(s.logp.len(), n);
            assert_eq!(s.entropy.len(), n);
            assert!(s.logp.iter().all(|&x| x <= 0.0));
            assert!(s.entropy.iter().all(|&h| h >= 0.0));
            let cut = s.finish.as_deref() == Some("length");
            assert_eq!(cut, n == 6, "{s:?}");
        }
    }
    let recs = records(&whole, "round");
    assert_eq!(recs.len(), 6);
    for r in &recs {
        assert!(r["teacher_nll"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["student_entropy"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["max_staleness"], 2);
    }
    let steps = records(&whole, "train");
    let stale: Vec<u64> = steps
        .iter()
        .map(|s| s["staleness"].as_u64().unwrap())
        .collect();
    assert_eq!(stale[..6], [0, 1, 2, 0, 1, 2]);
}

/// The objective's gradient on the student's own tokens against central finite differences,
/// for both estimators.
#[test]
fn on_policy_gradients_match_finite_differences() {
    let cfg = tiny_config(Arch::Llama);
    let student = Model::trainable(&cfg, &random_weights(&cfg, 3)).unwrap();
    let teacher = Model::frozen(&cfg, &random_weights(&cfg, 4), WeightFormat::F32).unwrap();
    let v = cfg.vocab_size;
    let sample = Sample {
        id: "a".into(),
        ids: vec![1, 5, 6, 7, 8, 9, 10, 11, 2],
        loss_mask: vec![false, false, false, false, true, true, true, true, true],
        teacher: None,
    };
    let mb0 = collate(&[&sample], 0, &Device::Cpu).unwrap();
    let n = mb0.loss_tokens;
    // The teacher's full distribution at the loss positions, and its log-prob of each token.
    let t_logits = teacher.logits(&mb0.ids).unwrap().squeeze(0).unwrap(); // (T, V)
    let t_lp = retort_distill::loss::log_softmax(&t_logits)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let positions: Vec<u32> = mb0.positions.to_vec1().unwrap();
    let targets: Vec<u32> = mb0.targets.to_vec1().unwrap();
    let mut sparse = SparseTargets {
        k: v,
        ids: Vec::new(),
        logp: Vec::new(),
    };
    for &p in &positions {
        sparse.ids.extend(0..v as u32);
        sparse.logp.extend(&t_lp[p as usize]);
        sparse.logp.push(f32::NEG_INFINITY); // nothing outside the top-k
    }
    let token_lp: Vec<f32> = positions
        .iter()
        .zip(&targets)
        .map(|(&p, &y)| t_lp[p as usize][y as usize])
        .collect();
    let obj = Objective {
        kd: Some(KdTerm {
            divergence: Divergence::ReverseKl,
            temperature: 1.0,
            alpha: 1.0,
        }),
        chunk_rows: 3,
        vocab_limit: None,
        checkpoint_layers: false,
        cross: None,
    };
    // The student's log-probs of its tokens now: the sampled estimator's costs are held at
    // these values (they carry no gradient).
    let s_lp_now = |m: &Model| -> Vec<f64> {
        let lp =
            retort_distill::loss::log_softmax(&m.logits(&mb0.ids).unwrap().squeeze(0).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
        positions
            .iter()
            .zip(&targets)
            .map(|(&p, &y)| lp[p as usize][y as usize] as f64)
            .collect()
    };
    let cost: Vec<f64> = s_lp_now(&student)
        .iter()
        .zip(&token_lp)
        .map(|(q, &p)| q - p as f64)
        .collect();
    for sampled in [false, true] {
        let mut mb = mb0.clone();
        if sampled {
            mb.sampled = Some(token_lp.clone());
        } else {
            mb.sparse = Some(sparse.clone());
        }
        let mut g = Grads::new(student.vars().len());
        accumulate(&student, None, &obj, &mb, n as f64, &mut g).unwrap();
        // The loss the gradient is of, recomputed from the model.
        let loss = || -> f64 {
            if sampled {
                s_lp_now(&student)
                    .iter()
                    .zip(&cost)
                    .map(|(lq, c)| c * lq)
                    .sum::<f64>()
                    / n as f64
            } else {
                let s = retort_distill::objective::evaluate(&student, None, &obj, &mb).unwrap();
                s.kd / n as f64
            }
        };
        let mut probed = 0;
        for (i, (name, var)) in student.vars().iter().enumerate() {
            if !(name.contains("layers.1.self_attn.q_proj")
                || name.contains("layers.0.mlp.up_proj")
                || name == "model.embed_tokens.weight")
            {
                continue;
            }
            let grad = g.tensors[i].as_ref().unwrap();
            let (a, fd, rel) = finite_difference_at_largest(var, grad, 1e-2, loss);
            assert!(
                a != 0.0 && rel < 2e-2,
                "{} estimator, {name}: autograd {a} vs finite difference {fd} (rel {rel})",
                if sampled { "sampled" } else { "full" }
            );
            probed += 1;
        }
        assert_eq!(probed, 3);
    }
}
