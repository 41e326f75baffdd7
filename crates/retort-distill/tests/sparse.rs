//! Sparse (top-k + tail) KD losses against the dense ones and against finite differences.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use candle_core::{DType, Device, Tensor, Var};
use retort_distill::Divergence;
use retort_distill::cache::topk::{coarse_log_probs, top_k_rows};
use retort_distill::loss::{cross_entropy_sum, divergence_sum};
use retort_distill::sparse::{SparseTargets, sparse_kd_ce};

const ALL: [Divergence; 9] = [
    Divergence::ForwardKl,
    Divergence::ReverseKl,
    Divergence::Jsd { beta: 0.5 },
    Divergence::Jsd { beta: 0.1 },
    Divergence::Jsd { beta: 0.9 },
    Divergence::SkewForwardKl { alpha: 0.1 },
    Divergence::SkewReverseKl { alpha: 0.3 },
    Divergence::Tvd,
    Divergence::Jsd { beta: 0.0 },
];

fn randn(seed: u64, n: usize, v: usize, std: f32) -> Tensor {
    let dev = Device::Cpu;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n * v)
        .map(|_| {
            // Sum of 4 uniforms: roughly normal, deterministic.
            let mut s = 0f32;
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s += (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s * std * 1.7
        })
        .collect();
    Tensor::from_vec(data, (n, v), &dev).unwrap()
}

/// Sparse targets from teacher logits: top-k at `t_label`, re-tempered to `t_train`.
fn targets(teacher: &Tensor, k: usize, t_label: f64, t_train: f64) -> SparseTargets {
    let v = teacher.dim(1).unwrap();
    let flat = teacher.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (ids, logp, tail) = top_k_rows(&flat, v, k, t_label);
    SparseTargets {
        k,
        ids,
        logp: coarse_log_probs(&logp, &tail, k, v, t_label / t_train),
    }
}

fn grad_of(loss: &Tensor, x: &Var) -> Tensor {
    loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
}

#[test]
fn with_k_equal_to_the_vocabulary_sparse_equals_dense_in_value_and_gradient() {
    let (n, v) = (6, 29);
    let s0 = randn(1, n, v, 2.0);
    let t = randn(2, n, v, 2.5);
    let y = Tensor::new(&[0u32, 5, 28, 3, 3, 17], &Device::Cpu).unwrap();
    for div in ALL {
        for (temp, alpha, scale) in [(1.0, 1.0, 1.0), (2.0, 0.5, 0.25), (0.7, 0.3, 1.0)] {
            let tg = targets(&t, v, 1.0, temp);
            let a = Var::from_tensor(&s0).unwrap();
            let f = sparse_kd_ce(a.as_tensor(), &tg, &y, div, temp, alpha, scale).unwrap();
            let ga = grad_of(&f.loss, &a);
            let b = Var::from_tensor(&s0).unwrap();
            let ce = cross_entropy_sum(b.as_tensor(), &y).unwrap();
            let kd = divergence_sum(b.as_tensor(), &t, div, temp).unwrap();
            let total = ((((&ce * (1.0 - alpha)).unwrap() + (&kd * alpha).unwrap()).unwrap())
                * scale)
                .unwrap();
            let gb = grad_of(&total, &b);
            let (ls, ld) = (
                f.loss.to_scalar::<f32>().unwrap(),
                total.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (ls - ld).abs() < 1e-4 * ld.abs().max(1.0),
                "{div} T={temp}: sparse {ls} vs dense {ld}"
            );
            let kd_dense = kd.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (f.kd_sum - kd_dense).abs() < 1e-4 * kd_dense.abs().max(1.0),
                "{div} T={temp}: kd {} vs {kd_dense}",
                f.kd_sum
            );
            let d = retort_test::max_abs_diff(&ga, &gb);
            assert!(
                d < 2e-5,
                "{div} T={temp} α={alpha}: gradients differ by {d}"
            );
        }
    }
}

#[test]
fn bucket_semantics_on_a_hand_computed_case() {
    // V = 3, k = 1. Teacher p = (0.7, 0.2, 0.1) with top-1 = token 0, tail 0.3.
    // Student logits 0 → q = (1/3, 1/3, 1/3), coarse (1/3, 2/3).
    let t = Tensor::new(&[[0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()]], &Device::Cpu).unwrap();
    let s = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    let tg = targets(&t, 1, 1.0, 1.0);
    assert_eq!(tg.ids, [0]);
    let (p, q) = ([0.7f64, 0.3], [1.0 / 3.0, 2.0 / 3.0]);
    let kl = |a: [f64; 2], b: [f64; 2]| a[0] * (a[0] / b[0]).ln() + a[1] * (a[1] / b[1]).ln();
    for (div, want) in [
        (Divergence::ForwardKl, kl(p, q)),
        (Divergence::ReverseKl, kl(q, p)),
        (Divergence::Tvd, (0.7 - 1.0 / 3.0)),
    ] {
        let f = sparse_kd_ce(&s, &tg, &y, div, 1.0, 1.0, 1.0).unwrap();
        assert!(
            (f.kd_sum - want).abs() < 1e-6,
            "{div}: {} vs {want}",
            f.kd_sum
        );
        assert!((f.ce_sum - 3f64.ln()).abs() < 1e-6);
    }
}

#[test]
fn gradients_with_a_tail_match_finite_differences() {
    let (n, v, k) = (3, 11, 4);
    let s0 = randn(5, n, v, 1.5);
    let t = randn(6, n, v, 2.0);
    let y = Tensor::new(&[1u32, 4, 10], &Device::Cpu).unwrap();
    for div in ALL {
        for temp in [1.0, 1.7] {
            let tg = targets(&t, k, 1.0, temp);
            let f = |s: &Tensor| sparse_kd_ce(s, &tg, &y, div, temp, 0.6, 1.0).unwrap();
            let a = Var::from_tensor(&s0).unwrap();
            let g = grad_of(&f(a.as_tensor()).loss, &a)
                .to_vec2::<f32>()
                .unwrap();
            let base = s0.to_vec2::<f32>().unwrap();
            let h = 1e-2f32;
            for i in 0..n {
                for j in 0..v {
                    let at = |d: f32| {
                        let mut x = base.clone();
                        x[i][j] += d;
                        let r = f(&Tensor::new(x, &Device::Cpu).unwrap());
                        0.4 * r.ce_sum + 0.6 * r.kd_sum
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                    let an = g[i][j] as f64;
                    assert!(
                        (fd - an).abs() < 2e-3 + 1e-2 * an.abs(),
                        "{div} T={temp} [{i},{j}]: analytic {an} vs fd {fd}"
                    );
                }
            }
        }
    }
}

#[test]
fn top_k_forward_kl_is_a_lower_bound_that_tightens_with_k() {
    let (n, v) = (8, 64);
    let s = randn(11, n, v, 2.0);
    let t = randn(12, n, v, 3.0);
    let y = Tensor::new(&[0u32; 8], &Device::Cpu).unwrap();
    let dense = divergence_sum(&s, &t, Divergence::ForwardKl, 1.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let mut prev = 0.0;
    for k in [1, 4, 16, 32, 64] {
        let f = sparse_kd_ce(
            &s,
            &targets(&t, k, 1.0, 1.0),
            &y,
            Divergence::ForwardKl,
            1.0,
            1.0,
            1.0,
        )
        .unwrap();
        assert!(
            f.kd_sum <= dense + 1e-4,
            "k={k}: {} > dense {dense}",
            f.kd_sum
        );
        assert!(f.kd_sum >= prev - 1e-4, "k={k}: {} < {prev}", f.kd_sum);
        prev = f.kd_sum;
    }
    assert!((prev - dense).abs() < 1e-4);
}

#[test]
fn entries_dropped_below_min_prob_equal_a_smaller_k_per_row() {
    use retort_distill::cache::topk::drop_below;
    let (n, v, k) = (4, 29, 12);
    let s0 = randn(21, n, v, 1.5);
    let t = randn(22, n, v, 2.5);
    let y = Tensor::new(&[2u32, 7, 0, 28], &Device::Cpu).unwrap();
    let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut ids, mut logp, mut tail) = top_k_rows(&flat, v, k, 1.0);
    drop_below(&mut ids, &mut logp, &mut tail, k, 0.02);
    let kept: Vec<usize> = (0..n)
        .map(|r| {
            ids[r * k..(r + 1) * k]
                .iter()
                .filter(|&&i| i != u32::MAX)
                .count()
        })
        .collect();
    assert!(
        kept.iter().any(|&c| c < k) && kept.iter().all(|&c| c >= 1),
        "{kept:?}"
    );
    for div in ALL {
        let tg = SparseTargets {
            k,
            ids: ids.clone(),
            logp: coarse_log_probs(&logp, &tail, k, v, 0.5),
        };
        let a = Var::from_tensor(&s0).unwrap();
        let f = sparse_kd_ce(a.as_tensor(), &tg, &y, div, 2.0, 0.7, 1.0).unwrap();
        let ga = grad_of(&f.loss, &a).to_vec2::<f32>().unwrap();
        let (mut kd, mut gb) = (0.0, Vec::new());
        for (r, &kr) in kept.iter().enumerate() {
            let row = t.narrow(0, r, 1).unwrap();
            let tr = targets(&row, kr, 1.0, 2.0);
            let b = Var::from_tensor(&s0.narrow(0, r, 1).unwrap()).unwrap();
            let yr = y.narrow(0, r, 1).unwrap();
            let fr = sparse_kd_ce(b.as_tensor(), &tr, &yr, div, 2.0, 0.7, 1.0).unwrap();
            kd += fr.kd_sum;
            gb.push(grad_of(&fr.loss, &b).to_vec2::<f32>().unwrap().remove(0));
        }
        assert!(
            (f.kd_sum - kd).abs() < 1e-4 * kd.abs().max(1.0),
            "{div}: {} vs {kd}",
            f.kd_sum
        );
        for r in 0..n {
            for j in 0..v {
                assert!((ga[r][j] - gb[r][j]).abs() < 1e-5, "{div} [{r},{j}]");
            }
        }
    }
}
