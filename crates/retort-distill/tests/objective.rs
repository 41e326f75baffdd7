//! The chunked objective: equal to the plain unchunked loss, chunk size does not matter,
//! accumulation equals one big batch, an all-masked batch gives zero, KL(p‖p) = 0.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use candle_core::Device;
use retort_distill::Divergence;
use retort_distill::batch::{Sample, collate};
use retort_distill::grads::Grads;
use retort_distill::loss::{cross_entropy_sum, divergence_sum};
use retort_distill::objective::{KdTerm, MicroBatch, Objective, accumulate, evaluate};
use retort_model::{Arch, Model, WeightFormat};
use retort_test::{random_weights, tiny_config};

fn samples(n: usize, vocab: u32, seed: u64) -> Vec<Sample> {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    (0..n)
        .map(|i| {
            let len = 5 + (next() % 9) as usize;
            let ids: Vec<u32> = (0..len).map(|_| next() % vocab).collect();
            let start = 1 + (next() as usize % (len - 2));
            let loss_mask = (0..len).map(|p| p >= start).collect();
            Sample {
                id: format!("s{i}"),
                ids,
                loss_mask,
                teacher: None,
            }
        })
        .collect()
}

fn models(arch: Arch) -> (Model, Model) {
    let cfg = tiny_config(arch);
    let student = Model::trainable(&cfg, &random_weights(&cfg, 1)).unwrap();
    let teacher = Model::frozen(&cfg, &random_weights(&cfg, 2), WeightFormat::F32).unwrap();
    (student, teacher)
}

fn kd(div: Divergence) -> Objective {
    Objective {
        kd: Some(KdTerm {
            divergence: div,
            temperature: 1.5,
            alpha: 0.7,
        }),
        chunk_rows: 4,
        vocab_limit: None,
        checkpoint_layers: false,
        cross: None,
    }
}

fn grads_of(student: &Model, teacher: &Model, obj: &Objective, mbs: &[MicroBatch]) -> (Grads, f64) {
    let norm: usize = mbs.iter().map(|m| m.loss_tokens).sum();
    let mut g = Grads::new(student.vars().len());
    let mut loss = 0.0;
    for mb in mbs {
        let s = accumulate(student, Some(teacher), obj, mb, norm as f64, &mut g).unwrap();
        loss += s.loss(obj.kd.as_ref()) * s.tokens as f64 / norm as f64;
    }
    (g, loss)
}

fn max_rel_diff(a: &Grads, b: &Grads) -> f32 {
    let mut worst = 0f32;
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        let scale = y
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = retort_test::max_abs_diff(x, y) / scale;
        worst = worst.max(d);
    }
    worst
}

#[test]
fn chunked_objective_equals_the_plain_full_logits_loss() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (student, teacher) = models(arch);
        let v = student.config().vocab_size as u32;
        let ss = samples(3, v, 7);
        let refs: Vec<&Sample> = ss.iter().collect();
        let mb = collate(&refs, 0, &Device::Cpu).unwrap();
        for div in [
            Divergence::ForwardKl,
            Divergence::Jsd { beta: 0.3 },
            Divergence::Tvd,
        ] {
            let obj = kd(div);
            let (g, loss) = grads_of(&student, &teacher, &obj, std::slice::from_ref(&mb));
            // Plain: full (B, T, V) logits, gather, one backward.
            let (b, t) = mb.ids.dims2().unwrap();
            let sl = student
                .logits(&mb.ids)
                .unwrap()
                .reshape((b * t, ()))
                .unwrap();
            let tl = teacher
                .logits(&mb.ids)
                .unwrap()
                .reshape((b * t, ()))
                .unwrap();
            let sl = sl.index_select(&mb.positions, 0).unwrap();
            let tl = tl.index_select(&mb.positions, 0).unwrap();
            let n = mb.loss_tokens as f64;
            let ce = cross_entropy_sum(&sl, &mb.targets).unwrap();
            let kdv = divergence_sum(&sl, &tl, div, 1.5).unwrap();
            let total = (((ce * 0.3).unwrap() + (kdv * 0.7).unwrap()).unwrap() / n).unwrap();
            let plain_loss = total.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (loss - plain_loss).abs() < 1e-5 * plain_loss.abs(),
                "{div}: {loss} vs {plain_loss}"
            );
            let store = total.backward().unwrap();
            let mut plain = Grads::new(student.vars().len());
            plain.add_store(student.vars(), &store).unwrap();
            assert!(plain.tensors.iter().all(Option::is_some));
            let d = max_rel_diff(&g, &plain);
            assert!(
                d < 1e-4,
                "{arch:?} {div}: chunked vs plain gradients differ by {d}"
            );
        }
    }
}

#[test]
fn chunk_size_does_not_change_loss_or_gradients() {
    let (student, teacher) = models(Arch::Llama);
    let ss = samples(4, student.config().vocab_size as u32, 3);
    let refs: Vec<&Sample> = ss.iter().collect();
    let mb = collate(&refs, 0, &Device::Cpu).unwrap();
    let whole = Objective {
        chunk_rows: 100_000,
        ..kd(Divergence::ReverseKl)
    };
    let (gw, lw) = grads_of(&student, &teacher, &whole, std::slice::from_ref(&mb));
    for rows in [1, 3, 7] {
        let chunked = Objective {
            chunk_rows: rows,
            ..whole.clone()
        };
        let (gc, lc) = grads_of(&student, &teacher, &chunked, std::slice::from_ref(&mb));
        assert!((lw - lc).abs() < 1e-6 * lw.abs(), "{lw} vs {lc}");
        let d = max_rel_diff(&gc, &gw);
        assert!(d < 1e-5, "chunk {rows}: {d}");
    }
}

#[test]
fn activation_checkpointing_gives_the_plain_gradients() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let (full, teacher) = models(arch);
        // A full fine-tune (the embedding, norms and tied head train too) and a LoRA student.
        let lora = full
            .to_lora(
                "tiny".as_ref(),
                &retort_model::lora::LoraConfig {
                    rank: 2,
                    ..Default::default()
                },
                4,
            )
            .unwrap();
        for (kind, student) in [("full", &full), ("lora", &lora)] {
            // B = 0 would leave every A without a gradient: give the adapters values.
            if kind == "lora" {
                for (i, (_, var)) in student.vars().iter().enumerate() {
                    let t = retort_test::random_logits(i as u64, 1, var.elem_count())
                        .reshape(var.shape())
                        .unwrap();
                    var.set(&(t * 0.01).unwrap()).unwrap();
                }
            }
            let ss = samples(3, student.config().vocab_size as u32, 5);
            let refs: Vec<&Sample> = ss.iter().collect();
            let mb = collate(&refs, 0, &Device::Cpu).unwrap();
            let plain = kd(Divergence::ForwardKl);
            let ckpt = Objective {
                checkpoint_layers: true,
                cross: None,
                ..plain.clone()
            };
            let (gp, lp) = grads_of(student, &teacher, &plain, std::slice::from_ref(&mb));
            let (gc, lc) = grads_of(student, &teacher, &ckpt, std::slice::from_ref(&mb));
            assert_eq!(lp, lc, "{arch:?} {kind}: the loss");
            assert!(gp.tensors.iter().all(Option::is_some), "{arch:?} {kind}");
            let d = max_rel_diff(&gc, &gp);
            assert!(
                d < 1e-6,
                "{arch:?} {kind}: checkpointed gradients differ by {d}"
            );
        }
    }
}

#[test]
fn batch_8x1_equals_2x4_accumulation() {
    let (student, teacher) = models(Arch::Llama);
    let ss = samples(8, student.config().vocab_size as u32, 11);
    let refs: Vec<&Sample> = ss.iter().collect();
    let obj = kd(Divergence::ForwardKl);
    let one = collate(&refs, 0, &Device::Cpu).unwrap();
    let (g1, l1) = grads_of(&student, &teacher, &obj, &[one]);
    let four: Vec<MicroBatch> = refs
        .chunks(2)
        .map(|c| collate(c, 0, &Device::Cpu).unwrap())
        .collect();
    let (g4, l4) = grads_of(&student, &teacher, &obj, &four);
    assert!((l1 - l4).abs() < 1e-5 * l1.abs(), "{l1} vs {l4}");
    let d = max_rel_diff(&g4, &g1);
    assert!(
        d < 1e-5,
        "accumulated vs full batch gradients differ by {d}"
    );
    // A mean of micro-batch means would differ: micro-batches hold different token counts.
    let counts: Vec<usize> = refs
        .chunks(2)
        .map(|c| collate(c, 0, &Device::Cpu).unwrap().loss_tokens)
        .collect();
    assert!(counts.iter().any(|&c| c != counts[0]), "{counts:?}");
}

#[test]
fn all_masked_batch_gives_zero_not_nan() {
    let (student, teacher) = models(Arch::Llama);
    let mut ss = samples(2, student.config().vocab_size as u32, 5);
    for s in &mut ss {
        s.loss_mask.iter_mut().for_each(|m| *m = false);
    }
    let refs: Vec<&Sample> = ss.iter().collect();
    let mb = collate(&refs, 0, &Device::Cpu).unwrap();
    assert_eq!(mb.loss_tokens, 0);
    let mut g = Grads::new(student.vars().len());
    let obj = kd(Divergence::ForwardKl);
    let s = accumulate(&student, Some(&teacher), &obj, &mb, 1.0, &mut g).unwrap();
    assert_eq!(s.tokens, 0);
    assert_eq!(s.loss(obj.kd.as_ref()), 0.0);
    assert!(g.is_empty());
    assert_eq!(g.global_norm().unwrap(), 0.0);
}

#[test]
fn kd_of_a_student_against_its_own_weights_is_zero() {
    let cfg = tiny_config(Arch::Llama);
    let w = random_weights(&cfg, 4);
    let student = Model::trainable(&cfg, &w).unwrap();
    let teacher = Model::frozen(&cfg, &w, WeightFormat::F32).unwrap();
    let ss = samples(3, cfg.vocab_size as u32, 9);
    let refs: Vec<&Sample> = ss.iter().collect();
    let mb = collate(&refs, 0, &Device::Cpu).unwrap();
    for div in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Tvd,
    ] {
        let s = evaluate(&student, Some(&teacher), &kd(div), &mb).unwrap();
        assert!(s.kd.abs() < 1e-4, "{div}: {}", s.kd);
        assert!(s.ce > 0.0);
    }
}
