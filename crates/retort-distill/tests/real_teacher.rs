//! The logit cache on the real default teacher, SmolLM2-135M-Instruct (GGUF Q4_1, f32 compute),
//! against the online teacher, with a 10-layer student pruned from it:
//! - k = V (49,152), f32 codec: the sparse forward KL equals the dense online one (2e-4
//!   relative: f32 sums over 49,152 columns in two different orders);
//! - k = 64: a lower bound within 5% of the dense forward KL. Measured: 12.393 vs 12.895 nats
//!   per token (3.9% below) for this untrained pruned student, whose distributions are far from
//!   the teacher's, so the teacher's tail (where the student's log-ratio is large) matters;
//! - q8 vs f32 at k = 64: the same loss to 1e-3 relative (measured 8e-5).
//!
//! The model comes from `scripts/fetch-assets` (CI runs it). Without it these tests print a note
//! and pass, unless `RETORT_REQUIRE_ASSETS=1` (set by `.ci/run`).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::PathBuf;

use candle_core::Device;
use retort_data::Message;
use retort_distill::Divergence;
use retort_distill::batch::{self, Sample};
use retort_distill::cache::label::label_batch;
use retort_distill::cache::topk::coarse_log_probs;
use retort_distill::cache::{Codec, TopK, codec};
use retort_distill::objective::{KdTerm, Objective, evaluate};
use retort_distill::sparse::SparseTargets;
use retort_model::model::evenly_spaced_layers;
use retort_model::{WeightFormat, checkpoint};

fn gguf() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("RETORT_REQUIRE_ASSETS").is_none(),
        "{} is missing; run scripts/fetch-assets",
        p.display()
    );
    eprintln!(
        "skipping: {} not found (run scripts/fetch-assets)",
        p.display()
    );
    None
}

const CONVERSATIONS: [(&str, &str); 3] = [
    (
        "I have had a mild headache for two days. Should I worry?",
        "A mild headache lasting two days is usually not dangerous. Common causes are tension, \
         poor sleep, dehydration or too much screen time. Drink water, rest, and consider an \
         over-the-counter pain reliever. See a doctor if it is sudden and severe, comes with \
         fever, a stiff neck, confusion or vision changes, or keeps getting worse.",
    ),
    (
        "Is it safe to invest all my savings in one stock?",
        "Putting all your savings into one stock is risky: if that company does badly you can \
         lose a large part of your money. Most advisors suggest keeping an emergency fund and \
         spreading investments across many companies, for example with a low-cost index fund.",
    ),
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
    ),
];

/// `(rows, V)`-free targets: decode what the codec stored and re-temper to T = 1.
fn targets(labels: &[TopK], codec_: Codec, vocab: usize) -> SparseTargets {
    let k = labels[0].k;
    let mut out = SparseTargets {
        k,
        ids: Vec::new(),
        logp: Vec::new(),
    };
    for t in labels {
        let (block, n) = codec::encode(t, codec_, vocab, 2).unwrap();
        let d = codec::decode(&block, n, codec_, vocab, k, t.tokens.len(), t.rows(), 2).unwrap();
        out.ids.extend_from_slice(&d.ids);
        out.logp
            .extend(coarse_log_probs(&d.logp, &d.log_tail, k, vocab, 1.0));
    }
    out
}

#[test]
fn cached_forward_kl_matches_the_online_teacher() {
    let Some(path) = gguf() else { return };
    let dev = Device::Cpu;
    let ck = checkpoint::read(&path, &dev).unwrap();
    let teacher = ck.frozen(WeightFormat::F32).unwrap();
    let student = teacher
        .prune_layers(&evenly_spaced_layers(10, 30), &path)
        .unwrap();
    let vocab = teacher.config().vocab_size;
    let samples: Vec<Sample> = CONVERSATIONS
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            let enc = ck
                .tokenizer
                .encode_chat(&[Message::user(*q), Message::assistant(*a)])
                .unwrap();
            Sample {
                id: format!("c{i}"),
                ids: enc.ids,
                loss_mask: enc.loss_mask,
                teacher: None,
            }
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();
    let obj = Objective {
        kd: Some(KdTerm {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            alpha: 1.0,
        }),
        chunk_rows: 64,
        vocab_limit: None,
        checkpoint_layers: false,
        cross: None,
    };
    let mb = batch::collate(&refs, 0, &dev).unwrap();
    let n = mb.loss_tokens as f64;
    let online = evaluate(&student, Some(&teacher), &obj, &mb).unwrap();
    let fkl = |labels: &[TopK], c: Codec| {
        let mut m = mb.clone();
        m.sparse = Some(targets(labels, c, vocab));
        let s = evaluate(&student, None, &obj, &m).unwrap();
        assert!((s.ce - online.ce).abs() < 1e-6 * online.ce.abs().max(1.0));
        s.kd / n
    };
    let dense = online.kd / n;
    let full = label_batch(&teacher, &refs, 0, vocab, 1.0, 0.0, 64).unwrap();
    let f_full = fkl(&full, Codec::F32);
    let top64 = label_batch(&teacher, &refs, 0, 64, 1.0, 0.0, 64).unwrap();
    let (f32_64, q8_64) = (fkl(&top64, Codec::F32), fkl(&top64, Codec::Q8));
    eprintln!(
        "{n} tokens: forward KL online {dense:.5}, cache k=V {f_full:.5}, k=64 f32 {f32_64:.5}, k=64 q8 {q8_64:.5}"
    );
    assert!(
        (f_full - dense).abs() < 2e-4 * dense,
        "k=V: {f_full} vs {dense}"
    );
    assert!(
        f32_64 <= dense + 1e-4 && f32_64 > 0.95 * dense,
        "k=64: {f32_64} vs {dense}"
    );
    assert!(
        (q8_64 - f32_64).abs() < 1e-3 * f32_64,
        "q8 {q8_64} vs f32 {f32_64}"
    );
}
