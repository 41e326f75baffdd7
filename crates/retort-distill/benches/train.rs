//! Training throughput. By default KD on the real default teacher: a 10-layer student pruned
//! from SmolLM2-135M-Instruct, batch 4×256 (every position a loss position), forward KL against
//! the online f32 teacher, AdamW in place. Reports tokens/s per step (teacher forward + student
//! forward/backward + update) and the process's peak RSS.
//!
//!     scripts/fetch-assets
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-distill --bench train [-- --steps N --layers L]
//!
//! A real student instead (`--student` a GGUF file or HF directory; `--lora R` for a rank-R
//! adapter on all seven projections, α = 2R; `--checkpointing` recomputes each layer in
//! backward): SFT (cross-entropy) by default, or KD from `--teacher-path`'s top-64 computed
//! once before the timed steps (`--teacher cached`, as a logit cache) or at every step
//! (`--teacher online`). `chunk_rows` is derived from the vocabulary as the trainer does.
//!
//!     scripts/fetch-assets qwen
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-distill --bench train -- --matmul bf16 \
//!         --student assets/Qwen2.5-Coder-0.5B-Instruct.gguf --lora 16
//!     ... --teacher cached --teacher-path assets/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
//!
//! `scripts/bench/compare-torch` alternates it with `scripts/bench/torch_train.py` (same shapes).
//! Not a test: nothing here asserts a speed.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark binary

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use retort_distill::Divergence;
use retort_distill::adamw::{AdamW, AdamWParams};
use retort_distill::cache::topk::{coarse_log_probs, top_k_rows};
use retort_distill::grads::Grads;
use retort_distill::objective::{KdTerm, MicroBatch, Objective, accumulate};
use retort_distill::sparse::SparseTargets;
use retort_kernels::MatmulPrecision;
use retort_kernels::runtime::{AllocatorMode, configure_allocator};
use retort_model::lora::LoraConfig;
use retort_model::model::evenly_spaced_layers;
use retort_model::{WeightFormat, checkpoint};

mod common;
use common::{arg, arg_str};

fn peak_rss_mb() -> f64 {
    let status = fs_err::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let (steps, layers, batch, seq) = (
        arg("--steps", 5),
        arg("--layers", 10),
        arg("--batch", 4),
        arg("--seq", 256),
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let student_path = arg_str("--student").map(|p| root.join(p));
    let teacher_path = match (arg_str("--teacher-path"), &student_path) {
        (Some(p), _) => Some(root.join(p)),
        (None, None) => Some(root.join("assets/SmolLM2-135M-Instruct.Q4_1.gguf")),
        (None, Some(_)) => None,
    };
    for p in student_path.iter().chain(&teacher_path) {
        if !p.exists() {
            println!(
                "skipped: {} is missing (run scripts/fetch-assets, or scripts/fetch-assets qwen)",
                p.display()
            );
            return;
        }
    }
    // As the CLI does (`--allocator retain`), unless `--allocator system`.
    let args: Vec<String> = std::env::args().collect();
    let allocator: AllocatorMode =
        arg_str("--allocator").map_or(AllocatorMode::Retain, |v| v.parse().unwrap());
    retort_kernels::cpu::set_switches(retort_kernels::cpu::Switches::from_env().unwrap()).unwrap();
    configure_allocator(allocator);
    let dev = Device::Cpu;
    let teacher_ck = teacher_path
        .as_ref()
        .map(|p| checkpoint::read(p, &dev).unwrap());
    let teacher = teacher_ck
        .as_ref()
        .map(|ck| ck.frozen(WeightFormat::F32).unwrap());
    let lora = arg("--lora", 0);
    let (mut student, student_name) = match &student_path {
        Some(p) => {
            let ck = checkpoint::read(p, &dev).unwrap();
            let m = if lora > 0 {
                let cfg = LoraConfig {
                    rank: lora,
                    alpha: 2.0 * lora as f64,
                    ..LoraConfig::default()
                };
                ck.lora(&cfg, 0).unwrap()
            } else {
                ck.trainable().unwrap()
            };
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (m, name)
        }
        None => {
            let (ck, path) = (teacher_ck.as_ref().unwrap(), teacher_path.as_ref().unwrap());
            let keep = evenly_spaced_layers(layers, ck.config.num_hidden_layers);
            let m = teacher
                .as_ref()
                .unwrap()
                .prune_layers(&keep, path)
                .unwrap()
                .to_trainable(path)
                .unwrap();
            (m, format!("{layers} layers of the teacher"))
        }
    };
    let matmul: MatmulPrecision =
        arg_str("--matmul").map_or(MatmulPrecision::F32, |v| v.parse().unwrap());
    student.set_matmul_precision(matmul);
    let mut teacher = teacher;
    // As `setup` does; `--no-prepack` packs the teacher's weights at every product instead.
    let mut prepacked = 0;
    if let Some(t) = teacher.as_mut() {
        t.set_matmul_precision(matmul);
        if !args.iter().any(|a| a == "--no-prepack") {
            prepacked = t.prepack_bf16().unwrap();
        }
    }
    let default_mode = if teacher.is_some() { "online" } else { "none" };
    let teacher_mode = arg_str("--teacher").unwrap_or_else(|| default_mode.into());
    assert!(
        teacher_mode == "none" || teacher.is_some(),
        "--teacher {teacher_mode} needs --teacher-path"
    );
    let chunk_rows = arg(
        "--chunk",
        retort_distill::recipe::TrainParams::default().chunk_rows_for(student.config().vocab_size),
    );
    let checkpointing = args.iter().any(|a| a == "--checkpointing");
    println!(
        "retort train bench: teacher {teacher_mode}, student {student_name} ({:.1}M params{}), batch {batch}x{seq}, {}, chunk_rows {chunk_rows}, checkpointing {checkpointing}, matmul {matmul:?} (teacher weights prepacked: {prepacked}), allocator {allocator:?}, threads {}",
        student.config().num_parameters() as f64 / 1e6,
        if lora > 0 {
            format!(", LoRA r{lora}")
        } else {
            String::new()
        },
        if teacher_mode == "none" {
            "cross-entropy"
        } else {
            "forward KL"
        },
        candle_core::utils::get_num_threads()
    );
    // Deterministic token ids; every position but the last predicts the next token.
    let v = student.config().vocab_size as u32;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i as u64 * 2_654_435_761) % v as u64) as u32)
        .collect();
    let positions: Vec<u32> = (0..batch)
        .flat_map(|b| (0..seq - 1).map(move |t| (b * seq + t) as u32))
        .collect();
    let targets: Vec<u32> = positions.iter().map(|&p| ids[p as usize + 1]).collect();
    let n = positions.len();
    let mb = MicroBatch {
        ids: Tensor::from_vec(ids, (batch, seq), &dev).unwrap(),
        positions: Tensor::from_vec(positions, n, &dev).unwrap(),
        targets: Tensor::from_vec(targets, n, &dev).unwrap(),
        loss_tokens: n,
        real_tokens: batch * seq,
        sparse: None,
        cross: None,
        sampled: None,
    };
    let obj = Objective {
        kd: (teacher_mode != "none").then_some(KdTerm {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            alpha: 1.0,
        }),
        chunk_rows,
        vocab_limit: None,
        checkpoint_layers: checkpointing,
        cross: None,
    };
    if let (Some(teacher), true) = (&teacher, args.iter().any(|a| a == "--phases")) {
        // Where a step's time goes: forward passes alone (no backward), 3 runs each, median.
        let time = |f: &dyn Fn()| {
            let mut ts: Vec<f64> = (0..3)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(f64::total_cmp);
            ts[1]
        };
        let h_t = time(&|| {
            teacher.forward(&mb.ids, 0, &[], None).unwrap();
        });
        let l_t = time(&|| {
            let h = teacher.forward(&mb.ids, 0, &[], None).unwrap();
            let h = h.reshape((batch * seq, ())).unwrap();
            teacher
                .lm_head(&h.index_select(&mb.positions, 0).unwrap())
                .unwrap();
        });
        let h_s = time(&|| {
            student.forward(&mb.ids, 0, &[], None).unwrap();
        });
        println!(
            "phases: teacher body {h_t:.2}s, teacher body+head {l_t:.2}s, student body forward {h_s:.2}s"
        );
    }
    // `--teacher cached`: the teacher's top-64 at every loss position computed once, before the
    // timed steps, as `retort label` stores them; the steps then read them like a logit cache.
    let cached = teacher_mode == "cached";
    let mut mb = mb;
    if let (Some(teacher), true) = (&teacher, cached) {
        let k = arg("--top-k", 64);
        let h = teacher.forward(&mb.ids, 0, &[], None).unwrap();
        let h = h
            .reshape((batch * seq, ()))
            .unwrap()
            .index_select(&mb.positions, 0)
            .unwrap();
        let logits = teacher.lm_head(&h).unwrap().flatten_all().unwrap();
        let logits = logits.to_vec1::<f32>().unwrap();
        let (ids, logp, tail) = top_k_rows(&logits, v as usize, k, 1.0);
        mb.sparse = Some(SparseTargets {
            k,
            logp: coarse_log_probs(&logp, &tail, k, v as usize, 1.0),
            ids,
        });
    }
    let teacher_arg = if teacher_mode == "online" {
        teacher.as_ref()
    } else {
        None
    };
    let mut opt = AdamW::new(student.vars(), AdamWParams::default());
    let mut times = Vec::new();
    for step in 0..steps {
        let t0 = Instant::now();
        let mut g = Grads::new(student.vars().len());
        let s = accumulate(&student, teacher_arg, &obj, &mb, n as f64, &mut g).unwrap();
        let t1 = Instant::now();
        opt.step(student.vars(), &g, 1e-4, 1.0).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "step {step}: loss {:.4} fwd+bwd {:.2}s adamw {:.2}s total {dt:.2}s = {:.1} tok/s",
            if obj.kd.is_some() { s.kd } else { s.ce } / n as f64,
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64(),
            (batch * seq) as f64 / dt
        );
        if step > 0 {
            times.push(dt);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "MEAN steps 1..: {mean:.2}s/step = {:.1} tok/s; peak RSS {:.0} MB",
        (batch * seq) as f64 / mean,
        peak_rss_mb()
    );
}
