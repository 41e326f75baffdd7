//! From teacher logits to stored top-k, and from stored top-k to the distribution the sparse
//! losses compare against.
//!
//! **The tail.** A top-k row keeps `k` log-probs and the mass of everything else,
//! `tail = 1 − Σ_topk p`. The sparse losses compare teacher and student on `k + 1` outcomes:
//! the `k` stored tokens and one "any other token" bucket, whose student probability is the
//! student's mass outside the teacher's top-k. Every divergence is then exact on this coarsened
//! pair of distributions; for forward KL it is a lower bound of the full KL (data processing), and
//! with `k = V` it is the full divergence.
//!
//! **Re-tempering.** Stored values are `log_softmax(z / T_label)`. Training at `T` needs
//! `log_softmax(z / T) = (T_label / T)·lp + const` on the top-k, which is exact; for the tail the
//! individual logits are unknown, so it is treated as spread evenly over its `V − c` tokens
//! (`c` the entries stored in the row; each of log-prob `log(tail / (V − c))`), then tempered
//! the same way and everything renormalised. At `T = T_label` nothing changes; with `k = V` there is no tail.

use crate::fused::row_stats;

/// Top-k of one row of logits at temperature `1 / inv_t`: writes ids and log-probs (descending,
/// ties by lower id) and returns the log tail mass. `order` and `in_top` are scratch.
fn top_k_row(
    z: &[f32],
    k: usize,
    inv_t: f32,
    ids: &mut [u32],
    logp: &mut [f32],
    order: &mut Vec<u32>,
    in_top: &mut [bool],
) -> f32 {
    let (m, l) = row_stats(z, inv_t);
    order.clear();
    order.extend(0..z.len() as u32);
    let cmp = |a: &u32, b: &u32| {
        z[*b as usize]
            .total_cmp(&z[*a as usize])
            .then_with(|| a.cmp(b))
    };
    if k < z.len() {
        order.select_nth_unstable_by(k - 1, cmp);
    }
    order[..k].sort_unstable_by(cmp);
    for (i, &id) in order[..k].iter().enumerate() {
        ids[i] = id;
        logp[i] = z[id as usize] * inv_t - m - l;
        in_top[id as usize] = true;
    }
    let mut tail = 0f32;
    for (v, &zv) in z.iter().enumerate() {
        if !in_top[v] {
            tail += (zv * inv_t - m).exp();
        }
    }
    for &id in &order[..k] {
        in_top[id as usize] = false;
    }
    if tail > 0.0 {
        tail.ln() - l
    } else {
        f32::NEG_INFINITY
    }
}

/// Top-k of every row of `logits (N, V)` at `temperature`: `(ids (N, k), logp (N, k),
/// log_tail (N))`. Rows run in parallel on candle's thread count.
pub fn top_k_rows(
    logits: &[f32],
    vocab: usize,
    k: usize,
    temperature: f64,
) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let rows = logits.len() / vocab.max(1);
    let k = k.min(vocab);
    let (mut ids, mut logp, mut tail) =
        (vec![0u32; rows * k], vec![0f32; rows * k], vec![0f32; rows]);
    let inv_t = (1.0 / temperature) as f32;
    let threads = candle_core::utils::get_num_threads().max(1);
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        for (c, ((ids, logp), tail)) in ids
            .chunks_mut(per * k)
            .zip(logp.chunks_mut(per * k))
            .zip(tail.chunks_mut(per))
            .enumerate()
        {
            sc.spawn(move || {
                let mut order = Vec::with_capacity(vocab);
                let mut in_top = vec![false; vocab];
                for (j, t) in tail.iter_mut().enumerate() {
                    let r = c * per + j;
                    *t = top_k_row(
                        &logits[r * vocab..(r + 1) * vocab],
                        k,
                        inv_t,
                        &mut ids[j * k..(j + 1) * k],
                        &mut logp[j * k..(j + 1) * k],
                        &mut order,
                        &mut in_top,
                    );
                }
            });
        }
    });
    (ids, logp, tail)
}

/// `log_softmax(z / t)` of each row of `logits (N, V)` at its `targets[r]` (the token that
/// followed), in f64 and rounded to f32; ids outside the row are `-inf`.
pub fn label_log_probs(logits: &[f32], vocab: usize, targets: &[u32], t: f64) -> Vec<f32> {
    logits
        .chunks(vocab.max(1))
        .zip(targets)
        .map(|(row, &y)| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse: f64 = row
                .iter()
                .map(|&x| ((x as f64 - m) / t).exp())
                .sum::<f64>()
                .ln();
            row.get(y as usize)
                .map_or(f32::NEG_INFINITY, |&z| ((z as f64 - m) / t - lse) as f32)
        })
        .collect()
}

/// Drop entries (after the first) whose probability is below `min_prob` from rows of
/// `(ids (N, k), logp (N, k), log_tail (N))`: their mass joins the tail, their slots become
/// [`super::codec::NONE`] with log-prob `-inf`. Rows are sorted, so the dropped ones end a row.
pub fn drop_below(
    ids: &mut [u32],
    logp: &mut [f32],
    log_tail: &mut [f32],
    k: usize,
    min_prob: f64,
) {
    if min_prob <= 0.0 {
        return;
    }
    let cut = min_prob.ln() as f32;
    for (r, tail) in log_tail.iter_mut().enumerate() {
        let mut mass = if *tail == f32::NEG_INFINITY {
            0.0
        } else {
            (*tail as f64).exp()
        };
        let mut changed = false;
        for i in 1..k {
            let j = r * k + i;
            if ids[j] != super::codec::NONE && logp[j] < cut {
                mass += (logp[j] as f64).exp();
                ids[j] = super::codec::NONE;
                logp[j] = f32::NEG_INFINITY;
                changed = true;
            }
        }
        if changed {
            *tail = mass.ln() as f32;
        }
    }
}

/// Normalised log-probs of the `k + 1` outcomes (top-k, then the tail bucket) at the training
/// temperature: `(N, k + 1)`. `ratio = T_label / T_train`.
pub fn coarse_log_probs(
    logp: &[f32],
    log_tail: &[f32],
    k: usize,
    vocab: usize,
    ratio: f64,
) -> Vec<f32> {
    let rows = log_tail.len();
    let mut out = Vec::with_capacity(rows * (k + 1));
    let mut a = vec![0f64; k + 1];
    for r in 0..rows {
        let row = &logp[r * k..(r + 1) * k];
        for (ai, &lp) in a.iter_mut().zip(row) {
            *ai = ratio * lp as f64;
        }
        // Tokens in the tail: all but the stored entries (dropped ones, `-inf`, are in it).
        let kept = row.iter().filter(|&&lp| lp > f32::NEG_INFINITY).count();
        let rest = vocab.saturating_sub(kept) as f64;
        let lt = log_tail[r] as f64;
        a[k] = if rest == 0.0 || lt == f64::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            rest.ln() + ratio * (lt - rest.ln())
        };
        let m = a.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        let lse = m + a.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        out.extend(a.iter().map(|&x| (x - lse) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_a_sort_and_the_tail_is_the_rest() {
        let z = [0.5f32, 3.0, -1.0, 3.0, 2.0, -7.0, 0.0];
        let (ids, logp, tail) = top_k_rows(&z, 7, 3, 1.0);
        assert_eq!(ids, [1, 3, 4]); // tie 3.0/3.0 broken by lower id
        let lse = z.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        for (i, &id) in ids.iter().enumerate() {
            assert!((logp[i] as f64 - (z[id as usize] as f64 - lse)).abs() < 1e-6);
        }
        let rest: f64 = [0.5f64, -1.0, -7.0, 0.0].iter().map(|x| x.exp()).sum();
        assert!((tail[0] as f64 - (rest.ln() - lse)).abs() < 1e-6);
        // k = V: no tail.
        let (_, _, tail) = top_k_rows(&z, 7, 7, 2.0);
        assert_eq!(tail[0], f32::NEG_INFINITY);
    }

    #[test]
    fn dropped_entries_join_the_tail() {
        let z = [3.0f32, 2.0, 0.0, -1.0, -3.0, -6.0];
        let (mut ids, mut logp, mut tail) = top_k_rows(&z, 6, 4, 1.0);
        let before: f64 =
            logp.iter().map(|x| (*x as f64).exp()).sum::<f64>() + (tail[0] as f64).exp();
        drop_below(&mut ids, &mut logp, &mut tail, 4, 0.03);
        assert_eq!(ids, [0, 1, 2, super::super::codec::NONE]); // p(-1) ≈ 0.012 < 0.03
        let after: f64 =
            logp.iter().map(|x| (*x as f64).exp()).sum::<f64>() + (tail[0] as f64).exp();
        assert!((before - after).abs() < 1e-6 && (after - 1.0).abs() < 1e-5);
    }

    #[test]
    fn re_tempering_is_exact_without_a_tail_and_uniform_tail_otherwise() {
        let z = [1.0f32, 2.0, 0.5, -1.0];
        let (_, logp, tail) = top_k_rows(&z, 4, 4, 1.0);
        let c = coarse_log_probs(&logp, &tail, 4, 4, 1.0 / 2.0); // T_label 1 → T 2
        let (_, want, _) = top_k_rows(&z, 4, 4, 2.0);
        for i in 0..4 {
            assert!((c[i] - want[i]).abs() < 1e-6);
        }
        assert_eq!(c[4], f32::NEG_INFINITY);
        // A uniform tail (two tokens with the same logit) re-tempers exactly too.
        let z = [3.0f32, 1.0, -2.0, -2.0];
        let (_, logp, tail) = top_k_rows(&z, 4, 2, 1.0);
        let c = coarse_log_probs(&logp, &tail, 2, 4, 1.0 / 3.0);
        let (_, dense, _) = top_k_rows(&z, 4, 4, 3.0);
        let want_tail = (dense[2].exp() + dense[3].exp()).ln();
        assert!((c[0] - dense[0]).abs() < 1e-5 && (c[1] - dense[1]).abs() < 1e-5);
        assert!((c[2] - want_tail).abs() < 1e-5, "{} vs {want_tail}", c[2]);
    }
}
