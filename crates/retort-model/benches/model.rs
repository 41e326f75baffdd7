//! Throughput of the real default teacher on this CPU: scoring (full-sequence logits, 4×256),
//! single-stream generation and batched generation (8 streams), a synth-like workload (answers
//! of uneven length, batches of 8 run to their end vs continuous batching). The kernels' own
//! figures (GEMM roofline, bf16 GEMM, `exp`, the LM head's product per weight format) are in
//! `cargo bench -p retort-kernels --bench kernels`.
//!
//!     scripts/fetch-assets
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-model --bench model
//!
//! Reports medians of several runs. Not a test: nothing here asserts a speed.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark binary

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use retort_data::Message;
use retort_model::batching::generate_continuous;
use retort_model::generation::{SamplingParams, generate, generate_each};
use retort_model::{WeightFormat, checkpoint};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only = |name: &str| {
        args.iter()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .all(|a| name.contains(a.as_str()))
    };
    let gguf = std::env::var_os("RETORT_BENCH_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../assets/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !gguf.exists() {
        println!("{} not found: run scripts/fetch-assets", gguf.display());
        return;
    }
    // As the CLI does: kernel switches from RETORT_AMX / RETORT_Q8_KERNEL, `--allocator retain`.
    retort_kernels::cpu::set_switches(retort_kernels::cpu::Switches::from_env().unwrap()).unwrap();
    retort_kernels::runtime::configure_allocator(retort_kernels::runtime::AllocatorMode::Retain);
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    println!("retort model bench: {} | threads {threads}", gguf.display());

    let ck = checkpoint::read(&gguf, &dev).unwrap();
    let tok = ck.tokenizer.clone();
    for format in [
        WeightFormat::F32,
        WeightFormat::Quantized,
        WeightFormat::Q8_0,
    ] {
        let fname = format!("{format:?}").to_lowercase();
        if !only(&format!(
            "score-{fname} gen1-{fname} gen8-{fname} synth-{fname}"
        )) {
            continue;
        }
        let model = ck.frozen(format).unwrap();
        if only(&format!("score-{fname}")) && format == WeightFormat::F32 {
            // 4 × 256 tokens of real text through the model and the full LM head.
            // Real text (this crate's sources), cycled to 1024 tokens.
            let text = [
                include_str!("../src/model.rs"),
                include_str!("../../../README.md"),
            ]
            .concat();
            let ids = tok.encode(&text).unwrap();
            let (b, t) = (4usize, 256usize);
            let ids: Vec<u32> = ids.iter().copied().cycle().take(b * t).collect();
            let x = Tensor::from_vec(ids, (b, t), &dev).unwrap();
            let _ = model.logits(&x.narrow(1, 0, 16).unwrap()).unwrap();
            let times: Vec<f64> = (0..3)
                .map(|_| {
                    let t0 = Instant::now();
                    std::hint::black_box(model.logits(&x).unwrap());
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            let m = median(times);
            println!(
                "score {fname} 4x256 (full logits): {:.3}s = {:.1} tok/s",
                m,
                (b * t) as f64 / m
            );
            // As `retort label --matmul bf16` and an online teacher with `train.matmul = "bf16"`:
            // bf16 products, the weights packed once.
            if retort_kernels::bf16_gemm::available() {
                let mut packed = ck.frozen(format).unwrap();
                packed.set_matmul_precision(retort_kernels::MatmulPrecision::Bf16);
                packed.prepack_bf16().unwrap();
                let _ = packed.logits(&x.narrow(1, 0, 16).unwrap()).unwrap();
                let times: Vec<f64> = (0..3)
                    .map(|_| {
                        let t0 = Instant::now();
                        std::hint::black_box(packed.logits(&x).unwrap());
                        t0.elapsed().as_secs_f64()
                    })
                    .collect();
                let m = median(times);
                println!(
                    "score {fname} bf16-prepacked 4x256 (full logits): {:.3}s = {:.1} tok/s",
                    m,
                    (b * t) as f64 / m
                );
            }
        }
        let prompt = tok
            .encode_prompt(&[Message::user("Why is the sky blue?")])
            .unwrap();
        let n_new = 128;
        let params = SamplingParams {
            max_new_tokens: n_new,
            temperature: 0.8,
            top_p: 0.95,
            seed: 1,
            stop: vec![],
            logprobs: None,
            ..Default::default()
        };
        if only(&format!("synth-{fname}")) && format != WeightFormat::Quantized {
            // Slots to try, e.g. RETORT_BENCH_SLOTS=8,32 (default 8).
            let slots = std::env::var("RETORT_BENCH_SLOTS").unwrap_or_else(|_| "8".into());
            for n in slots
                .split(',')
                .filter_map(|x| x.trim().parse::<usize>().ok())
            {
                synth_workload(&model, &tok, &fname, n);
            }
        }
        for streams in [1usize, 8] {
            // candle has no SIMD kernel for Q4_1: 8 streams take minutes (≈10 tok/s), so that
            // cell runs only when asked for by name.
            let skip_slow = format == WeightFormat::Quantized
                && streams == 8
                && !args.iter().any(|a| a == "gen8-quantized");
            if !only(&format!("gen{streams}-{fname}")) || skip_slow {
                continue;
            }
            let prompts = vec![prompt.clone(); streams];
            let mut rates = vec![];
            for _ in 0..3 {
                let t0 = Instant::now();
                let out = generate(&model, &tok, &prompts, &params, |_, _| {}).unwrap();
                let tokens: usize = out.iter().map(|c| c.ids.len()).sum();
                rates.push(tokens as f64 / t0.elapsed().as_secs_f64());
            }
            println!(
                "generate {fname} {streams} stream(s), ≤{n_new} new tokens each, prompt {}: {:.1} tok/s aggregate",
                prompt.len(),
                median(rates)
            );
        }
    }
}

/// What synth asks of the teacher: many different prompts whose answers end at different
/// lengths. Fixed chunks of 8 (each chunk decodes until its longest answer is done; finished
/// rows leave the batch) against continuous batching with 8 slots (a finished row's slot takes
/// the next prompt at once). Greedy, so both produce the same answers.
fn synth_workload(
    model: &retort_model::Model,
    tok: &retort_model::Tokenizer,
    fname: &str,
    slots: usize,
) {
    const QUESTIONS: [&str; 24] = [
        "What is a stock dividend?",
        "Explain compound interest in two sentences.",
        "Should I pay off debt or invest first? Answer briefly.",
        "What does a P/E ratio tell me?",
        "Name three ways to lower blood pressure.",
        "Why do vaccines need booster doses?",
        "What is the difference between a virus and a bacterium?",
        "How much water should an adult drink per day?",
        "Write a haiku about autumn.",
        "What is the capital of Australia?",
        "Give me a tip for learning a new language.",
        "What causes inflation?",
        "Summarise the plot of Romeo and Juliet in one paragraph.",
        "How do index funds work?",
        "What is a bond yield?",
        "List the planets of the solar system.",
        "How can I sleep better?",
        "What is machine learning? Keep it short.",
        "Is it safe to take ibuprofen with coffee?",
        "Explain what an ETF is to a teenager.",
        "What are the symptoms of dehydration?",
        "Why is diversification important in investing?",
        "Translate 'good morning' into French and Spanish.",
        "What is the boiling point of water at sea level?",
    ];
    // Each question twice: as asked, and asking for detail (longer answers).
    let prompts: Vec<Vec<u32>> = QUESTIONS
        .iter()
        .flat_map(|q| [q.to_string(), format!("{q} Explain in detail.")])
        .map(|q| tok.encode_prompt(&[Message::user(q)]).unwrap())
        .collect();
    let params = vec![
        SamplingParams {
            max_new_tokens: 192,
            ..Default::default()
        };
        prompts.len()
    ];
    for round in 0..2 {
        let t0 = Instant::now();
        let mut chunked_ids = vec![];
        for (chunk, p) in prompts.chunks(slots).zip(params.chunks(slots)) {
            let out = generate_each(model, tok, chunk, p, |_, _| {}).unwrap();
            chunked_ids.extend(out.into_iter().map(|c| c.ids));
        }
        let chunked = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut cont_ids = vec![vec![]; prompts.len()];
        let stats = generate_continuous(
            model,
            tok,
            &prompts,
            &params,
            slots,
            |_, _| {},
            |i, c| cont_ids[i] = c.ids,
        )
        .unwrap();
        let continuous = t0.elapsed().as_secs_f64();
        let count = |ids: &[Vec<u32>]| ids.iter().map(Vec::len).sum::<usize>();
        let (chunked_tokens, cont_tokens) = (count(&chunked_ids), count(&cont_ids));
        // Row-steps of batches that run every row until the chunk's longest is done.
        let static_row_steps: usize = chunked_ids
            .chunks(slots)
            .map(|c| c.len() * c.iter().map(Vec::len).max().unwrap_or(0))
            .sum();
        let same = chunked_ids
            .iter()
            .zip(&cont_ids)
            .filter(|(a, b)| a == b)
            .count();
        println!(
            "synth-like {fname}, {} prompts, ≤192 new tokens, {slots} slots, round {round}: \
             chunks of {slots} {chunked_tokens} tokens in {chunked:.1} s = {:.1} tok/s | \
             continuous {cont_tokens} tokens in {continuous:.1} s = {:.1} tok/s ({:.2}x) | \
             identical answers {same} of {} | continuous: {} waves, {} joined, {} steps, \
             {} row-steps (static batches: {static_row_steps})",
            prompts.len(),
            chunked_tokens as f64 / chunked,
            cont_tokens as f64 / continuous,
            (cont_tokens as f64 / continuous) / (chunked_tokens as f64 / chunked),
            prompts.len(),
            stats.waves,
            stats.joined,
            stats.steps,
            stats.row_steps,
        );
    }
}
