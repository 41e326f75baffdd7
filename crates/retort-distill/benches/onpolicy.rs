//! The bias and variance of the on-policy estimators, measured on real models.
//!
//! Teacher: SmolLM2-135M-Instruct (f32); student: the healed 10-layer student
//! (`runs/healed-student/model`) if it is there, else 10 evenly spaced layers of the teacher.
//! Prompts: the first `--prompts` HealthBench training conversations. Each of `--draws`
//! independent draws samples one answer per prompt (temperature 1, ≤ `--new` tokens) from the
//! student and computes the gradient of the per-token reverse KL three ways on the same answers:
//!
//!   dense    the exact per-position reverse KL over the whole vocabulary (teacher live)
//!   top-k    the same over the teacher's top-k + one tail bucket (`estimator = "full"` with
//!            `top_k`, or a server teacher)
//!   sampled  the policy gradient with the sampled token's cost `log q − log p`
//!            (`estimator = "sampled"`): per position, an unbiased one-sample estimate of the
//!            dense gradient at that prefix
//!
//! Reported per estimator: its relative variance per draw, `E‖g − ḡ‖² / ‖ḡ‖²` (ḡ the mean over
//! draws), and the cosine of its mean gradient with the dense one's (the bias that remains after
//! averaging, plus the noise of `--draws` draws). Not a test: nothing here asserts.
//!
//!     scripts/fetch-assets && scripts/fetch-data healthbench
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-distill --bench onpolicy [-- --draws 8 --prompts 4 --new 64 --k 64]

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark binary

use std::time::Instant;

use candle_core::Device;
use retort_distill::Divergence;
use retort_distill::batch::{self, Truncation};
use retort_distill::cache::TopK;
use retort_distill::cache::label::LocalScorer;
use retort_distill::grads::Grads;
use retort_distill::objective::{KdTerm, MicroBatch, Objective, accumulate};
use retort_distill::onpolicy::{self, PromptStream, RoundInputs};
use retort_distill::recipe::OnPolicy;
use retort_model::model::evenly_spaced_layers;
use retort_model::{Model, WeightFormat, checkpoint};

mod common;
use common::arg;

/// Running sums of one estimator's gradients.
struct Moments {
    sum: Option<Vec<f64>>,
    sq_norms: f64,
    draws: usize,
}

impl Moments {
    fn new() -> Self {
        Moments {
            sum: None,
            sq_norms: 0.0,
            draws: 0,
        }
    }

    fn add(&mut self, g: &[f32]) {
        let sum = self.sum.get_or_insert_with(|| vec![0.0; g.len()]);
        for (s, &x) in sum.iter_mut().zip(g) {
            *s += x as f64;
        }
        self.sq_norms += g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        self.draws += 1;
    }

    fn mean(&self) -> Vec<f64> {
        let n = self.draws.max(1) as f64;
        self.sum
            .as_ref()
            .map_or(Vec::new(), |s| s.iter().map(|x| x / n).collect())
    }

    /// `E‖g − ḡ‖² / ‖ḡ‖²`, with the unbiased (n − 1) variance.
    fn relative_variance(&self) -> f64 {
        let n = self.draws as f64;
        let m = self.mean();
        let mean_sq: f64 = m.iter().map(|x| x * x).sum();
        let var = (self.sq_norms / n - mean_sq) * n / (n - 1.0).max(1.0);
        var / mean_sq.max(1e-300)
    }
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}

fn flat(student: &Model, g: &Grads) -> Vec<f32> {
    let mut out = Vec::new();
    for (t, (_, v)) in g.tensors.iter().zip(student.vars()) {
        match t {
            Some(t) => out.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
            None => out.extend(std::iter::repeat_n(0.0, v.elem_count())),
        }
    }
    out
}

fn main() {
    let (draws, n_prompts, new, k) = (
        arg("--draws", 8),
        arg("--prompts", 4),
        arg("--new", 64),
        arg("--k", 64),
    );
    let Some((root, path, data)) = common::smollm_and_healthbench() else {
        return;
    };
    let dev = Device::Cpu;
    let ck = checkpoint::read(&path, &dev).unwrap();
    let tok = ck.tokenizer.clone();
    let teacher = ck.frozen(WeightFormat::F32).unwrap();
    let healed = root.join("runs/healed-student/model");
    let (student, which) = if healed.join("config.json").exists() {
        (
            checkpoint::read(&healed, &dev)
                .unwrap()
                .trainable()
                .unwrap(),
            "the healed 10-layer student",
        )
    } else {
        let keep = evenly_spaced_layers(10, ck.config.num_hidden_layers);
        (
            teacher
                .prune_layers(&keep, &path)
                .unwrap()
                .to_trainable(&path)
                .unwrap(),
            "10 pruned layers (no healed student in runs/)",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = common::first_records(&data, n_prompts, dir.path());
    let (train, _) = batch::tokenize(&ds, &tok, 384, Truncation::Right).unwrap();
    let scorer = LocalScorer {
        model: &teacher,
        path: path.clone(),
        arch: "llama".into(),
        chunk_rows: 256,
    };
    let obj = Objective {
        kd: Some(KdTerm {
            divergence: Divergence::ReverseKl,
            temperature: 1.0,
            alpha: 1.0,
        }),
        chunk_rows: 256,
        vocab_limit: None,
        checkpoint_layers: false,
        cross: None,
    };
    let vocab = teacher.config().vocab_size;
    let on = OnPolicy {
        max_new_tokens: new,
        ..OnPolicy::default()
    };
    println!(
        "student: {which}; {} prompts, {draws} draws, ≤ {new} new tokens, top-{k}",
        train.len()
    );
    let names = ["dense", "top-k", "sampled"];
    let mut moments = [Moments::new(), Moments::new(), Moments::new()];
    let mut same_draw = [0f64; 3]; // Σ over draws of cos(g, dense g of the same answers)
    let mut tokens = 0;
    let t0 = Instant::now();
    for d in 0..draws {
        let inputs = RoundInputs {
            student: &student,
            tokenizer: &tok,
            train: &train,
            on_policy: &on,
            max_len: 384 + new,
            matmul: Default::default(),
            seed: 1000 + d as u64,
            stage: 0,
            recipe_sha256: "",
        };
        let mut stream = PromptStream::new(&train, train.len(), 1, 0);
        let round = onpolicy::sample_round(&inputs, &mut stream, 0, 0, train.len()).unwrap();
        let samples = round.samples(&train).unwrap();
        let tops: Vec<TopK> = onpolicy::score(&scorer, &samples, 0, k, samples.len()).unwrap();
        let refs: Vec<&_> = samples.iter().collect();
        let top_refs: Vec<&TopK> = tops.iter().collect();
        let base: MicroBatch = batch::collate(&refs, 0, &dev).unwrap();
        let n = base.loss_tokens as f64;
        tokens += base.loss_tokens;
        let mut dense_g: Vec<f64> = Vec::new();
        for (e, m) in moments.iter_mut().enumerate() {
            let mut mb = base.clone();
            let t = match e {
                0 => Some(&teacher),
                1 => {
                    mb.sparse = Some(onpolicy::sparse_targets(&top_refs, vocab, 1.0));
                    None
                }
                _ => {
                    mb.sampled = Some(
                        tops.iter()
                            .flat_map(|t| t.label_logp.iter().copied())
                            .collect(),
                    );
                    None
                }
            };
            let mut g = Grads::new(student.vars().len());
            accumulate(&student, t, &obj, &mb, n, &mut g).unwrap();
            let g = flat(&student, &g);
            m.add(&g);
            let g: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            if e == 0 {
                dense_g = g.clone();
            }
            same_draw[e] += cosine(&g, &dense_g);
        }
        println!(
            "draw {d}: {} answer tokens, {:.0} s so far",
            base.loss_tokens,
            t0.elapsed().as_secs_f64()
        );
    }
    let dense = moments[0].mean();
    println!(
        "\n{tokens} answer tokens over {draws} draws ({:.1} per draw)",
        tokens as f64 / draws as f64
    );
    println!(
        "| estimator | relative variance per draw | cosine with dense, same answers (mean) | cosine of the {draws}-draw means |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for ((name, m), c) in names.iter().zip(&moments).zip(same_draw) {
        println!(
            "| {name} | {:.3} | {:.4} | {:.4} |",
            m.relative_variance(),
            c / draws as f64,
            cosine(&m.mean(), &dense)
        );
    }
}
