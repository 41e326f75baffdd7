//! KD training throughput on the real default teacher: a 10-layer student pruned from
//! SmolLM2-135M-Instruct, batch 4×256 (every position a loss position), forward KL against the
//! online f32 teacher, AdamW in place. Reports tokens/s per step (teacher forward + student
//! forward/backward + update) and the process's peak RSS.
//!
//!     scripts/fetch-assets
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-distill --bench train [-- --steps N --layers L]
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
use retort_model::model::evenly_spaced_layers;
use retort_model::{WeightFormat, checkpoint};

/// The value after `name` on the command line.
fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "skipped: {} is missing (run scripts/fetch-assets)",
            path.display()
        );
        return;
    }
    // As the CLI does (`--allocator retain`), unless `--allocator system`.
    let args: Vec<String> = std::env::args().collect();
    let allocator: AllocatorMode =
        arg_str("--allocator").map_or(AllocatorMode::Retain, |v| v.parse().unwrap());
    retort_kernels::cpu::set_switches(retort_kernels::cpu::Switches::from_env().unwrap()).unwrap();
    configure_allocator(allocator);
    let dev = Device::Cpu;
    let ck = checkpoint::read(&path, &dev).unwrap();
    let teacher = ck.frozen(WeightFormat::F32).unwrap();
    let keep = evenly_spaced_layers(layers, ck.config.num_hidden_layers);
    let mut student = teacher
        .prune_layers(&keep, &path)
        .unwrap()
        .to_trainable(&path)
        .unwrap();
    let matmul: MatmulPrecision =
        arg_str("--matmul").map_or(MatmulPrecision::F32, |v| v.parse().unwrap());
    student.set_matmul_precision(matmul);
    let mut teacher = teacher;
    teacher.set_matmul_precision(matmul);
    // As `setup` does; `--no-prepack` packs the teacher's weights at every product instead.
    let prepacked = if args.iter().any(|a| a == "--no-prepack") {
        0
    } else {
        teacher.prepack_bf16().unwrap()
    };
    let teacher_mode = arg_str("--teacher").unwrap_or_else(|| "online".into());
    println!(
        "retort train bench: teacher {teacher_mode}, student {} layers ({:.1}M params), teacher 30 layers f32, batch {batch}x{seq}, forward KL, chunk_rows {}, matmul {matmul:?} (teacher weights prepacked: {prepacked}), allocator {allocator:?}, threads {}",
        layers,
        student.config().num_parameters() as f64 / 1e6,
        arg("--chunk", 1024),
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
    };
    let obj = Objective {
        kd: Some(KdTerm {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            alpha: 1.0,
        }),
        chunk_rows: arg("--chunk", 1024),
        vocab_limit: None,
        checkpoint_layers: false,
    };
    if args.iter().any(|a| a == "--phases") {
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
    if cached {
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
    let teacher_arg = if cached { None } else { Some(&teacher) };
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
            s.kd / n as f64,
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
