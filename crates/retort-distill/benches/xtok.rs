//! The cost of distilling across tokenizers: a KD step through the cross-tokenizer path against
//! the same-tokenizer step, on the same student, teacher, batch and machine.
//!
//! Teacher: SmolLM2-135M-Instruct (f32, 30 layers); student: 10 of its layers. Batch: the first
//! HealthBench training conversations, 4 × ≤ 256 tokens. The cross-tokenizer path is driven with
//! the teacher's own tokenizer on both sides (`batch::tokenize_pair(tok, tok)`), so the two
//! paths do the same model work and differ only in what crossing tokenizers costs: the teacher's
//! top-k and label log-probs per row, grouping by the alignment, and the GOLD loss, against the
//! dense forward KL (online) or the sparse loss (cache). Four steps, alternating:
//!
//!   online   same tokenizer, teacher live, dense forward KL (α = 1)
//!   x-online GOLD, teacher live, top-64
//!   cache    same tokenizer, top-64 from a format-2 cache (q8)
//!   x-cache  GOLD from the same cache
//!
//! Also the one-time cost of aligning: tokenizing the batch's conversations for the student alone
//! vs for both sides with the alignment, with SmolLM2's and Qwen2.5's real tokenizers (if the
//! Qwen GGUF is there).
//!
//!     scripts/fetch-assets [qwen] && scripts/fetch-data healthbench
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-distill --bench xtok [-- --steps N]
//!
//! Not a test: nothing here asserts a speed.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark binary

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;
use retort_distill::Divergence;
use retort_distill::adamw::{AdamW, AdamWParams};
use retort_distill::batch::{self, Sample, Truncation};
use retort_distill::cache::Reader;
use retort_distill::cache::label::{LabelOptions, Silent, label};
use retort_distill::grads::Grads;
use retort_distill::objective::{KdTerm, Objective, accumulate};
use retort_distill::targets;
use retort_distill::xtok::loss::{CrossKd, CrossLoss, VocabMap};
use retort_model::model::evenly_spaced_layers;
use retort_model::{WeightFormat, checkpoint};

mod common;
use common::{arg, median};

fn main() {
    let (steps, batch_n, seq, k) = (
        arg("--steps", 4),
        arg("--batch", 4),
        arg("--seq", 256),
        arg("--k", 64),
    );
    let Some((root, path, data)) = common::smollm_and_healthbench() else {
        return;
    };
    let dev = Device::Cpu;
    let ck = checkpoint::read(&path, &dev).unwrap();
    let tok = ck.tokenizer.clone();
    let teacher = ck.frozen(WeightFormat::F32).unwrap();
    let keep = evenly_spaced_layers(10, ck.config.num_hidden_layers);
    let student = teacher
        .prune_layers(&keep, &path)
        .unwrap()
        .to_trainable(&path)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (small, ds) = common::first_records(&data, batch_n, dir.path());

    // One-time: tokenizing alone vs both sides with the alignment (real tokenizers).
    let qwen = root.join("assets/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf");
    let other = if qwen.exists() {
        checkpoint::read(&qwen, &dev).unwrap().tokenizer
    } else {
        tok.clone()
    };
    let reps = 20;
    let t0 = Instant::now();
    for _ in 0..reps {
        batch::tokenize(&ds, &tok, seq, Truncation::Right).unwrap();
    }
    let alone = t0.elapsed().as_secs_f64() / (reps * ds.records.len()) as f64;
    let t0 = Instant::now();
    for _ in 0..reps {
        batch::tokenize_pair(&ds, &tok, &other, seq, Truncation::Right).unwrap();
    }
    let paired = t0.elapsed().as_secs_f64() / (reps * ds.records.len()) as f64;
    println!(
        "tokenize per conversation: student alone {:.2} ms, both sides + alignment ({}) {:.2} ms",
        alone * 1e3,
        if qwen.exists() {
            "SmolLM2 vs Qwen2.5"
        } else {
            "SmolLM2 on both sides"
        },
        paired * 1e3
    );

    // The batch on both paths, and a format-2 cache of it.
    let (samples, _) = batch::tokenize_pair(&ds, &tok, &tok, seq, Truncation::Right).unwrap();
    let refs: Vec<&Sample> = samples.iter().collect();
    let cache = dir.path().join("cache");
    let opts = LabelOptions {
        device: dev.clone(),
        teacher: path.clone(),
        data: small.clone(),
        read: Default::default(),
        out: cache.clone(),
        k,
        temperature: 1.0,
        min_prob: 0.0,
        codec: retort_distill::cache::Codec::Q8,
        max_len: seq,
        truncation: Truncation::Right,
        batch_size: batch_n,
        shard_samples: batch_n,
        chunk_rows: 256,
        matmul: Default::default(),
        command: "benches/xtok.rs".into(),
    };
    label(&opts, &AtomicBool::new(false), &mut Silent).unwrap();
    let reader = Reader::open(&cache, false).unwrap();
    let tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    println!(
        "retort xtok bench: student 10 layers, teacher 30 layers f32, {} conversations, {tokens} tokens, k={k}, threads {}",
        samples.len(),
        candle_core::utils::get_num_threads()
    );
    let kd = KdTerm {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 1.0,
    };
    let same = Objective {
        kd: Some(kd),
        chunk_rows: 1024,
        vocab_limit: None,
        checkpoint_layers: false,
        cross: None,
    };
    let cross = Objective {
        cross: Some(CrossKd {
            loss: CrossLoss::Gold,
            div: Divergence::ForwardKl,
            map: Some(Arc::new(VocabMap::by_string(&tok, &tok))),
        }),
        ..same.clone()
    };
    let mut opt = AdamW::new(student.vars(), AdamWParams::default());
    let modes = ["online", "x-online", "cache", "x-cache"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for step in 0..steps {
        for (m, mode) in modes.iter().enumerate() {
            let t0 = Instant::now();
            let mut mb = batch::collate(&refs, 0, &dev).unwrap();
            let (obj, live) = match *mode {
                "online" => (&same, Some(&teacher)),
                "cache" => {
                    mb.sparse = targets::for_samples(&reader, None, &refs, 0, 1.0, 1024)
                        .unwrap()
                        .0;
                    (&same, None)
                }
                "x-online" => {
                    mb.cross = Some(
                        retort_distill::xtok::targets::online(&teacher, &refs, 0, k, 1.0, 256)
                            .unwrap(),
                    );
                    (&cross, None)
                }
                _ => {
                    mb.cross = retort_distill::xtok::targets::cached(&reader, &refs, 1.0).unwrap();
                    assert!(mb.cross.is_some());
                    (&cross, None)
                }
            };
            let n = mb.loss_tokens;
            let mut g = Grads::new(student.vars().len());
            let s = accumulate(&student, live, obj, &mb, n as f64, &mut g).unwrap();
            // lr 0: the optimizer's work is done but the weights stay, so every mode sees the
            // same student (and `x-cache` must report the `cache` loss: GOLD over one
            // tokenizer is the sparse loss).
            opt.step(student.vars(), &g, 0.0, 1.0).unwrap();
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "step {step} {mode:>8}: kd {:.4} {dt:.2}s = {:.1} tok/s",
                s.kd / n as f64,
                tokens as f64 / dt
            );
            if step > 0 {
                times[m].push(dt);
            }
        }
    }
    let med: Vec<f64> = times.into_iter().map(median).collect();
    println!(
        "MEDIAN steps 1..: {}",
        modes
            .iter()
            .zip(&med)
            .map(|(m, t)| format!("{m} {:.1} tok/s", tokens as f64 / t))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "cross/same step time: online {:.2}x, cache {:.2}x",
        med[1] / med[0],
        med[3] / med[2]
    );
}
