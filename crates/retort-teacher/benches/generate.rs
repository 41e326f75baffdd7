//! Generation throughput of the local teacher backend, batched vs single-stream, on the real
//! default teacher answering the stock-advisor seeds under their system prompt (varied prompt
//! lengths, early stops: what `retort synth` does). Needs `scripts/fetch-assets`.
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-teacher --bench generate [-- --tokens 96 --requests 16 --weights q8,f32 --batches 1,4,8,16]
//!
//! Prints completion tokens per second (all rows) per batch size: one run each, after a warm-up.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::path::Path;
use std::time::Instant;

use retort_data::Message;
use retort_model::WeightFormat;
use retort_teacher::{GenRequest, LocalTeacher, Sampling, Teacher};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        eprintln!(
            "skipped: {} is missing (run scripts/fetch-assets)",
            model.display()
        );
        return;
    }
    let tokens: usize = arg(&args, "--tokens", "96").parse().unwrap();
    let n_requests: usize = arg(&args, "--requests", "16").parse().unwrap();
    let seeds = fs_err::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/stock-advisor/seeds.jsonl"),
    )
    .unwrap();
    let system = "You are an expert for stock markets. Answer the user's question and justify your answer based on the information provided in the user context.";
    let prompts: Vec<String> = seeds
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "User context: {}\nQuestion: {}",
                v["user_context"].as_str().unwrap(),
                v["question"].as_str().unwrap()
            )
        })
        .collect();
    let requests: Vec<GenRequest> = (0..n_requests)
        .map(|i| GenRequest {
            messages: vec![
                Message::system(system),
                Message::user(prompts[i % prompts.len()].clone()),
            ],
            sampling: Sampling {
                max_tokens: tokens,
                temperature: 0.7,
                top_p: 0.95,
                seed: i as u64,
                ..Default::default()
            },
            prefill: None,
        })
        .collect();
    println!(
        "{n_requests} requests, ≤{tokens} new tokens each, temperature 0.7, threads {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
    );
    for w in arg(&args, "--weights", "q8,f32").split(',') {
        let format = match w {
            "f32" => WeightFormat::F32,
            "q8" => WeightFormat::Q8_0,
            _ => WeightFormat::Quantized,
        };
        for b in arg(&args, "--batches", "1,4,8,16").split(',') {
            let b: usize = b.parse().unwrap();
            let t = LocalTeacher::load(&model, format, b, &candle_core::Device::Cpu).unwrap();
            t.generate(&requests[..b.min(2)], &mut |_, _| {}); // warm-up
            let t0 = Instant::now();
            let mut toks = 0;
            t.generate(&requests, &mut |_, o| {
                toks += o.map_or(0, |g| g.iter().map(|g| g.completion_tokens).sum::<usize>())
            });
            let s = t0.elapsed().as_secs_f64();
            println!(
                "weights {w:>4} batch {b:>2}: {toks} tokens in {s:.1} s = {:.1} tok/s",
                toks as f64 / s
            );
        }
    }
}
