//! Training from the logit cache vs with the online teacher, in one run, same student and shapes
//! as `benches/train.rs`: a 10-layer student pruned from SmolLM2-135M-Instruct, batch 4×256,
//! forward KL (α = 1), AdamW. Also the labelling throughput of the teacher on the same batch.
//!
//! The batch is labelled once (k = 64, q8) into a real cache directory; a "cache" step then reads
//! the samples back through the memory-mapped reader (decode, re-temper, sparse loss) and an
//! "online" step runs the f32 teacher. Steps alternate, so both see the same machine state.
//!
//!     scripts/fetch-assets
//!     RAYON_NUM_THREADS=2 cargo bench -p retort-distill --bench cache [-- --steps N --k K]
//!
//! Not a test: nothing here asserts a speed.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark binary

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use retort_data::files::write_atomic;
use retort_distill::Divergence;
use retort_distill::adamw::{AdamW, AdamWParams};
use retort_distill::batch::{self, Sample, Truncation};
use retort_distill::cache::label::label_batch;
use retort_distill::cache::manifest::{
    DatasetInfo, Encoding, FORMAT_NAME, FORMAT_VERSION, Manifest, ShardInfo, TeacherInfo,
};
use retort_distill::cache::shard::{ShardBuilder, sample_key, shard_name};
use retort_distill::cache::{Codec, Reader};
use retort_distill::grads::Grads;
use retort_distill::objective::{KdTerm, Objective, accumulate};
use retort_distill::targets;
use retort_model::model::evenly_spaced_layers;
use retort_model::{WeightFormat, checkpoint};
use sha2::{Digest, Sha256};

mod common;
use common::{arg, median};

fn main() {
    let (steps, layers, batch, seq, k) = (
        arg("--steps", 5),
        arg("--layers", 10),
        arg("--batch", 4),
        arg("--seq", 256),
        arg("--k", 64),
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
    let dev = Device::Cpu;
    let ck = checkpoint::read(&path, &dev).unwrap();
    let teacher = ck.frozen(WeightFormat::F32).unwrap();
    let keep = evenly_spaced_layers(layers, ck.config.num_hidden_layers);
    let student = teacher
        .prune_layers(&keep, &path)
        .unwrap()
        .to_trainable(&path)
        .unwrap();
    let vocab = student.config().vocab_size;
    println!(
        "retort cache bench: student {layers} layers, teacher 30 layers f32, batch {batch}x{seq}, forward KL, k={k} q8, threads {}",
        candle_core::utils::get_num_threads()
    );
    let samples: Vec<Sample> = (0..batch)
        .map(|b| {
            let ids: Vec<u32> = (0..seq)
                .map(|t| (((b * seq + t) as u64 * 2_654_435_761) % vocab as u64) as u32)
                .collect();
            let mut loss_mask = vec![true; seq];
            loss_mask[0] = false;
            Sample {
                id: format!("s{b}"),
                ids,
                loss_mask,
                teacher: None,
            }
        })
        .collect();
    let refs: Vec<&Sample> = samples.iter().collect();

    // Label once into a real cache directory.
    let t0 = Instant::now();
    let labels = label_batch(&teacher, &refs, 0, k, 1.0, 0.0, 256).unwrap();
    let label_s = t0.elapsed().as_secs_f64();
    let rows: usize = labels.iter().map(|t| t.rows()).sum();
    let dir = tempfile::tempdir().unwrap();
    let mut b = ShardBuilder::default();
    for (i, (s, t)) in samples.iter().zip(&labels).enumerate() {
        let key = sample_key(&s.ids, &s.loss_mask);
        b.push_topk(key, i as u32, t, Codec::Q8, vocab, FORMAT_VERSION)
            .unwrap();
    }
    let bytes = b.finish();
    write_atomic(&dir.path().join(shard_name(0)), &bytes).unwrap();
    let m = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        created_by: "benches/cache.rs".into(),
        command: "cargo bench -p retort-distill --bench cache".into(),
        teacher: TeacherInfo {
            path: path.clone(),
            sha256: String::new(),
            arch: "llama".into(),
            vocab_size: vocab,
        },
        tokenizer_fingerprint: String::new(),
        tokenizer: None,
        offsets: false,
        dataset: DatasetInfo {
            path: "synthetic".into(),
            sha256: String::new(),
            format: "ids".into(),
            records: batch,
            max_len: seq,
            truncation: Truncation::Right,
        },
        k,
        temperature: 1.0,
        min_prob: 0.0,
        encoding: Encoding::new(Codec::Q8, vocab),
        matmul: Default::default(),
        shard_samples: batch,
        samples: batch,
        shards: vec![ShardInfo {
            file: shard_name(0),
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
            first_sample: 0,
            samples: batch,
            positions: rows,
        }],
        complete: true,
    };
    m.write(dir.path()).unwrap();
    let reader = Reader::open(dir.path(), false).unwrap();
    println!(
        "labelling: {rows} positions ({} tokens through the teacher) in {label_s:.2}s = {:.1} labelled tokens/s; cache {:.1} bytes/token",
        batch * seq,
        rows as f64 / label_s,
        bytes.len() as f64 / rows as f64
    );

    let obj = Objective {
        kd: Some(KdTerm {
            divergence: Divergence::ForwardKl,
            temperature: 1.0,
            alpha: 1.0,
        }),
        chunk_rows: arg("--chunk", 1024),
        vocab_limit: None,
        checkpoint_layers: false,
        cross: None,
    };
    let mut opt = AdamW::new(student.vars(), AdamWParams::default());
    let (mut online, mut cached) = (Vec::new(), Vec::new());
    for step in 0..steps {
        for mode in ["online", "cache"] {
            let t0 = Instant::now();
            let mut mb = batch::collate(&refs, 0, &dev).unwrap();
            let teacher_ref = if mode == "cache" {
                let (t, _) =
                    targets::for_samples(&reader, None, &refs, 0, 1.0, obj.chunk_rows).unwrap();
                mb.sparse = t;
                None
            } else {
                Some(&teacher)
            };
            let n = mb.loss_tokens;
            let mut g = Grads::new(student.vars().len());
            let s = accumulate(&student, teacher_ref, &obj, &mb, n as f64, &mut g).unwrap();
            opt.step(student.vars(), &g, 1e-5, 1.0).unwrap();
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "step {step} {mode:>6}: kd {:.4} {dt:.2}s = {:.1} tok/s",
                s.kd / n as f64,
                (batch * seq) as f64 / dt
            );
            if step > 0 {
                if mode == "cache" {
                    cached.push(dt)
                } else {
                    online.push(dt)
                }
            }
        }
    }
    let (o, c) = (median(online), median(cached));
    let tok = (batch * seq) as f64;
    println!(
        "MEDIAN steps 1..: online {:.1} tok/s, cache {:.1} tok/s; cache/online = {:.2}x",
        tok / o,
        tok / c,
        o / c
    );
}
