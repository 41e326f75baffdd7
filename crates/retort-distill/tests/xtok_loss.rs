//! Cross-tokenizer losses (`xtok::loss`): GOLD with one tokenizer on both sides equals the
//! same-tokenizer sparse loss in value and gradient; ULD and GOLD gradients against finite
//! differences; ULD on a hand-computed case.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use retort_distill::Divergence;
use retort_distill::cache::topk::{coarse_log_probs, top_k_rows};
use retort_distill::sparse::{SparseTargets, sparse_kd_ce};
use retort_distill::xtok::loss::{CrossKd, CrossLoss, Group, TeacherGroup, VocabMap, cross_kd_ce};

/// `(n, v)` seeded logits, uniform in [-3, 3) (`retort_test::random_logits`), as a flat vec.
fn logits(seed: u64, n: usize, v: usize) -> Vec<f32> {
    let t = retort_test::random_logits(seed, n, v);
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Top-k targets of teacher logits `(n, v)` at temperature `t`.
fn sparse(teacher: &[f32], v: usize, k: usize, t: f64) -> SparseTargets {
    let (ids, logp, tail) = top_k_rows(teacher, v, k, t);
    SparseTargets {
        k,
        ids,
        logp: coarse_log_probs(&logp, &tail, k, v, 1.0),
    }
}

fn group(rows: std::ops::Range<usize>, tg: &SparseTargets, row: usize, rest: f32) -> Group {
    let k = tg.k;
    Group {
        rows,
        teacher: TeacherGroup {
            ids: tg.ids[row * k..(row + 1) * k].to_vec(),
            logp: tg.logp[row * (k + 1)..(row + 1) * (k + 1)].to_vec(),
            rest_logp: rest,
            single: rest == 0.0,
        },
    }
}

fn grad(loss: &Tensor, x: &Var) -> Vec<f32> {
    let g = loss.backward().unwrap();
    g.get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn gold_with_one_tokenizer_equals_the_sparse_loss_in_value_and_gradient() {
    let (n, v, k) = (6, 40, 8);
    let z = logits(1, n, v);
    let t = logits(2, n, v);
    let y = Tensor::new(&[0u32, 5, 39, 3, 3, 17], &Device::Cpu).unwrap();
    let map = Some(Arc::new(VocabMap::identity(v)));
    for div in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Tvd,
    ] {
        for (temp, alpha, scale) in [(1.0, 1.0, 1.0), (2.0, 0.5, 0.25), (0.7, 0.3, 1.0)] {
            let tg = sparse(&t, v, k, temp);
            let groups: Vec<Group> = (0..n).map(|r| group(r..r + 1, &tg, r, 0.0)).collect();
            let kd = CrossKd {
                loss: CrossLoss::Gold,
                div,
                map: map.clone(),
            };
            let a = Var::from_vec(z.clone(), (n, v), &Device::Cpu).unwrap();
            let fa = cross_kd_ce(a.as_tensor(), &y, &groups, &kd, temp, alpha, scale).unwrap();
            let b = Var::from_vec(z.clone(), (n, v), &Device::Cpu).unwrap();
            let fb = sparse_kd_ce(b.as_tensor(), &tg, &y, div, temp, alpha, scale).unwrap();
            let (la, lb) = (
                fa.loss.to_scalar::<f32>().unwrap(),
                fb.loss.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (la - lb).abs() < 1e-5 * lb.abs().max(1.0),
                "{div}: {la} vs {lb}"
            );
            assert!((fa.kd_sum - fb.kd_sum).abs() < 1e-6 * fb.kd_sum.abs().max(1.0));
            let (ga, gb) = (grad(&fa.loss, &a), grad(&fb.loss, &b));
            let d = ga
                .iter()
                .zip(&gb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-6,
                "{div} T={temp} α={alpha}: gradients differ by {d}"
            );
        }
    }
}

/// Central differences in f64 of the op's f32 value: each coordinate of a few rows.
fn check_fd(z: &[f32], n: usize, v: usize, y: &Tensor, groups: &[Group], kd: &CrossKd, temp: f64) {
    let f = |zz: &[f32]| {
        let x = Tensor::from_vec(zz.to_vec(), (n, v), &Device::Cpu).unwrap();
        cross_kd_ce(&x, y, groups, kd, temp, 0.6, 1.0)
            .unwrap()
            .loss
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let a = Var::from_vec(z.to_vec(), (n, v), &Device::Cpu).unwrap();
    let l = cross_kd_ce(a.as_tensor(), y, groups, kd, temp, 0.6, 1.0).unwrap();
    let g = grad(&l.loss, &a);
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for i in 0..n * v {
        let (mut p, mut m) = (z.to_vec(), z.to_vec());
        p[i] += eps;
        m[i] -= eps;
        let fd = (f(&p) - f(&m)) / (2.0 * eps as f64);
        let err = (fd - g[i] as f64).abs();
        worst = worst.max(err);
        assert!(
            err < 2e-3 + 2e-2 * fd.abs(),
            "{:?} coord {i}: fd {fd} vs {}",
            kd.loss,
            g[i]
        );
    }
    assert!(worst.is_finite());
}

#[test]
fn uld_and_gold_gradients_match_finite_differences() {
    // Rows 0 | 1..3 (a two-token student group) | 3 (GOLD: some teacher tokens unmatched) |
    // 4 (no group: CE only) | 5..8 (three tokens against a teacher group of several).
    let (n, vs, vt, k) = (8, 12, 15, 4);
    let z = logits(3, n, vs);
    let t = logits(4, n, vt);
    let y = Tensor::new(&[1u32, 4, 7, 2, 0, 11, 3, 9], &Device::Cpu).unwrap();
    // Teacher ids 0..12 map to student ids reversed; 12..15 have no student counterpart.
    let map = VocabMap(
        (0..vt as u32)
            .map(|t| if t < 12 { 11 - t } else { u32::MAX })
            .collect(),
    );
    let tg = sparse(&t, vt, k, 1.0);
    let mut g3 = group(3..4, &tg, 3, 0.0);
    // Make sure the GOLD group has unmatched teacher tokens.
    g3.teacher.ids[1] = 13;
    g3.teacher.ids[3] = 14;
    let groups = vec![
        group(0..1, &tg, 0, 0.0),
        group(1..3, &tg, 1, -0.7),
        g3,
        group(5..8, &tg, 5, -1.3),
    ];
    for loss in [CrossLoss::Uld, CrossLoss::Gold] {
        for div in [Divergence::ForwardKl, Divergence::ReverseKl] {
            let kd = CrossKd {
                loss,
                div,
                map: Some(Arc::new(map.clone())),
            };
            check_fd(&z, n, vs, &y, &groups, &kd, 1.0);
            check_fd(&z, n, vs, &y, &groups, &kd, 2.0);
        }
    }
}

#[test]
fn uld_on_a_hand_computed_case() {
    // Student V = 3, logits 0 → q = (1/3, 1/3, 1/3). Teacher k = 1: top token p = 0.7, tail 0.3.
    // Sorted student top-1 = 1/3, tail 2/3: L = |1/3 − 0.7| + |2/3 − 0.3| = 0.7333…
    let z = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::new(&[2u32], &Device::Cpu).unwrap();
    let g = Group {
        rows: 0..1,
        teacher: TeacherGroup {
            ids: vec![5],
            logp: vec![0.7f32.ln(), 0.3f32.ln()],
            rest_logp: 0.0,
            single: true,
        },
    };
    let kd = CrossKd {
        loss: CrossLoss::Uld,
        div: Divergence::ForwardKl,
        map: None,
    };
    let f = cross_kd_ce(&z, &y, std::slice::from_ref(&g), &kd, 1.0, 1.0, 1.0).unwrap();
    let want = (0.7 - 1.0 / 3.0) + (2.0 / 3.0 - 0.3);
    assert!((f.kd_sum - want).abs() < 1e-6, "{} vs {want}", f.kd_sum);
    // A two-token group scales both vectors: teacher by e^{s_t}, student by q(y_2) = 1/3.
    let z2 = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y2 = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
    let mut g2 = g;
    g2.rows = 0..2;
    g2.teacher.rest_logp = 0.5f32.ln();
    g2.teacher.single = false;
    let f = cross_kd_ce(&z2, &y2, &[g2], &kd, 1.0, 1.0, 1.0).unwrap();
    let want = (0.35 - 1.0 / 9.0f64).abs() + (2.0 / 9.0 - 0.15f64).abs();
    assert!((f.kd_sum - want).abs() < 1e-6, "{} vs {want}", f.kd_sum);
}

#[test]
fn uld_with_a_teacher_top_k_larger_than_the_student_vocabulary() {
    // Student V = 3 (uniform), teacher k = 5: p = (0.3, 0.25, 0.2, 0.15, 0.05), tail 0.05. The
    // teacher's 4th and 5th entries join its tail: (0.3, 0.25, 0.2 | 0.25) against (⅓, ⅓, ⅓ | 0).
    let z = Tensor::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let p = [0.3f32, 0.25, 0.2, 0.15, 0.05, 0.05];
    let g = Group {
        rows: 0..1,
        teacher: TeacherGroup {
            ids: vec![7, 8, 9, 10, 11],
            logp: p.iter().map(|x| x.ln()).collect(),
            rest_logp: 0.0,
            single: true,
        },
    };
    let kd = CrossKd {
        loss: CrossLoss::Uld,
        div: Divergence::ForwardKl,
        map: None,
    };
    let f = cross_kd_ce(&z, &y, &[g], &kd, 1.0, 1.0, 1.0).unwrap();
    let third = 1.0 / 3.0f64;
    let want = (third - 0.3) + (third - 0.25) + (third - 0.2) + 0.25;
    assert!((f.kd_sum - want).abs() < 1e-6, "{} vs {want}", f.kd_sum);
}

/// A student so confident in one teacher top-k token that its other probabilities sum to less
/// than f32 rounding of 1: the rest bucket's `log q` must stay finite (it was `1 − Σ matched`,
/// which rounded to 0 and made GOLD's forward KL infinite at step 21 of a real run), and GOLD
/// still equals the sparse loss, which sums the bucket directly.
#[test]
fn gold_stays_finite_for_a_confident_student() {
    let (n, v, k) = (3, 40, 8);
    let t = logits(2, n, v);
    let tg = sparse(&t, v, k, 1.0);
    let mut z = logits(1, n, v);
    for r in 0..n {
        // 40 nats above the rest on the teacher's top-1: the rest sums to ~1e-17.
        z[r * v + tg.ids[r * k] as usize] = 40.0;
    }
    let y = Tensor::new(&[0u32, 5, 39], &Device::Cpu).unwrap();
    let groups: Vec<Group> = (0..n).map(|r| group(r..r + 1, &tg, r, 0.0)).collect();
    let kd = CrossKd {
        loss: CrossLoss::Gold,
        div: Divergence::ForwardKl,
        map: Some(Arc::new(VocabMap::identity(v))),
    };
    let a = Var::from_vec(z.clone(), (n, v), &Device::Cpu).unwrap();
    let fa = cross_kd_ce(a.as_tensor(), &y, &groups, &kd, 1.0, 1.0, 1.0).unwrap();
    let b = Var::from_vec(z, (n, v), &Device::Cpu).unwrap();
    let fb = sparse_kd_ce(b.as_tensor(), &tg, &y, Divergence::ForwardKl, 1.0, 1.0, 1.0).unwrap();
    let (la, lb) = (
        fa.loss.to_scalar::<f32>().unwrap(),
        fb.loss.to_scalar::<f32>().unwrap(),
    );
    assert!(la.is_finite() && fa.kd_sum.is_finite(), "GOLD {la}");
    assert!((la - lb).abs() < 1e-4 * lb.abs().max(1.0), "{la} vs {lb}");
    let ga = grad(&fa.loss, &a);
    assert!(ga.iter().all(|g| g.is_finite()));
}
