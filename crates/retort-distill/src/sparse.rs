//! KD losses against a sparse (top-k + tail) teacher, fused with cross-entropy: value and
//! gradient with respect to the student logits in one pass over each row.
//!
//! Teacher and student are compared on `k + 1` outcomes — the teacher's top-k tokens and one
//! bucket for all others (see `cache::topk` for why and for re-tempering). With q the student's
//! softmax at T and `q_c` the student's coarse probabilities (`q_tail = Σ_{v ∉ topk} q_v`), each
//! divergence is a function `L(p, q)` of the coarse pair; with `g_c = ∂L/∂q_c` and
//! `H = Σ_c q_c g_c`, the chain rule through the softmax gives
//! `∂L/∂(z_v/T) = q_v (g_{c(v)} − H)`. The objective is
//! `(1 − α)·CE(z, y) + α·T²·L`, as in [`crate::fused`] and [`crate::loss`]; with `k = V` every
//! loss equals the dense one (tested).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use retort_kernels::exp;

use crate::error::{Error, Result};
use crate::fused::{self, FusedLoss, RowLoss, row_stats};
use crate::loss::{Divergence, KdMix};

/// Teacher targets of `N` rows: `ids (N, k)` and normalised coarse log-probs `(N, k + 1)` at the
/// training temperature (the last column is the tail bucket).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTargets {
    pub k: usize,
    pub ids: Vec<u32>,
    pub logp: Vec<f32>,
}

impl SparseTargets {
    pub fn rows(&self) -> usize {
        self.logp.len() / (self.k + 1)
    }

    /// Rows `start .. start + len`.
    pub fn slice(&self, start: usize, len: usize) -> SparseTargets {
        let k = self.k;
        SparseTargets {
            k,
            ids: self.ids[start * k..(start + len) * k].to_vec(),
            logp: self.logp[start * (k + 1)..(start + len) * (k + 1)].to_vec(),
        }
    }

    /// Append the rows of `o` (same k).
    pub fn extend(&mut self, o: &SparseTargets) {
        self.ids.extend_from_slice(&o.ids);
        self.logp.extend_from_slice(&o.logp);
    }
}

/// Contribution of one outcome to L and `∂L/∂q` for that outcome, in f64.
pub(crate) fn term(div: Divergence, p: f64, lp: f64, q: f64, lq: f64) -> (f64, f64) {
    let xlogy = |x: f64, a: f64, b: f64| if x > 0.0 { x * (a - b) } else { 0.0 };
    match div {
        Divergence::ForwardKl
        | Divergence::Jsd { beta: 0.0 }
        | Divergence::SkewForwardKl { alpha: 0.0 } => {
            let g = if p > 0.0 { -p / q } else { 0.0 };
            (xlogy(p, lp, lq), g)
        }
        Divergence::ReverseKl
        | Divergence::Jsd { beta: 1.0 }
        | Divergence::SkewReverseKl { alpha: 0.0 } => (xlogy(q, lq, lp), lq - lp + 1.0),
        Divergence::Jsd { beta } => {
            let m = beta * p + (1.0 - beta) * q;
            let lm = m.ln();
            let v = beta * xlogy(p, lp, lm) + (1.0 - beta) * xlogy(q, lq, lm);
            (v, (1.0 - beta) * (lq - lm))
        }
        Divergence::SkewForwardKl { alpha } => {
            let m = alpha * p + (1.0 - alpha) * q;
            let g = if p > 0.0 { -(1.0 - alpha) * p / m } else { 0.0 };
            (xlogy(p, lp, m.ln()), g)
        }
        Divergence::SkewReverseKl { alpha } => {
            let m = (1.0 - alpha) * p + alpha * q;
            let lm = m.ln();
            (xlogy(q, lq, lm), lq - lm + 1.0 - alpha * q / m)
        }
        Divergence::Tvd => {
            let s = if q > p {
                0.5
            } else if q < p {
                -0.5
            } else {
                0.0
            };
            (0.5 * (p - q).abs(), s)
        }
    }
}

struct Op {
    t: SparseTargets,
    targets: Vec<u32>,
    div: Divergence,
    rows: usize,
    vocab: usize,
    inv_t: f32,
    state: RowLoss,
}

impl Op {
    /// One row: returns (CE, T²·L) and writes the gradient of `scale·((1−α)CE + αT²L)` into `g`.
    fn row(&self, r: usize, z: &[f32], g: &mut [f32], in_top: &mut [bool]) -> (f64, f64) {
        let k = self.t.k;
        let ids = &self.t.ids[r * k..(r + 1) * k];
        let lp = &self.t.logp[r * (k + 1)..(r + 1) * (k + 1)];
        let y = self.targets[r] as usize;
        let (inv_t, scale) = (self.inv_t, self.state.scale);
        let temp = 1.0 / inv_t;
        let (m1, l1) = row_stats(z, 1.0);
        let ce = (m1 + l1 - z[y]) as f64;
        let (ms, ls) = if inv_t == 1.0 {
            (m1, l1)
        } else {
            row_stats(z, inv_t)
        };
        // Student softmax at T into g (reused as scratch), tail mass outside the top-k.
        exp::exp_scaled(z, inv_t, ms + ls, g);
        let none = crate::cache::codec::NONE;
        for &id in ids.iter().filter(|&&i| i != none) {
            in_top[id as usize] = true;
        }
        let q_tail: f64 = g
            .iter()
            .zip(in_top.iter())
            .filter(|(_, t)| !**t)
            .map(|(&q, _)| q as f64)
            .sum();
        for &id in ids.iter().filter(|&&i| i != none) {
            in_top[id as usize] = false;
        }
        let mut loss = 0f64;
        let mut gc = vec![0f64; k + 1];
        let mut h = 0f64; // Σ_c q_c g_c
        for c in 0..=k {
            if c < k && ids[c] == none {
                continue; // an entry dropped at labelling: no outcome
            }
            let (q, lq) = if c < k {
                let lq = (z[ids[c] as usize] * inv_t - ms - ls) as f64;
                (lq.exp(), lq)
            } else {
                (q_tail, q_tail.ln())
            };
            let lpc = lp[c] as f64;
            let (v, gcc) = term(self.div, lpc.exp(), lpc, q, lq);
            loss += v;
            gc[c] = if q > 0.0 { gcc } else { 0.0 };
            h += q * gc[c];
        }
        let (ce_w, kd_w) = self.state.mix.grad_weights(); // α·T² · ∂(z/T)/∂z = α·T
        let kd_w = kd_w as f64;
        let exact_ce = inv_t != 1.0 && ce_w != 0.0;
        for (gv, &zv) in g.iter_mut().zip(z) {
            let qv = *gv as f64;
            let kd = kd_w * qv * (gc[k] - h);
            let sigma = if exact_ce { (zv - m1 - l1).exp() } else { *gv };
            *gv = (ce_w * sigma + kd as f32) * scale;
        }
        for (c, &id) in ids.iter().enumerate().filter(|(_, i)| **i != none) {
            let v = id as usize;
            let qv = ((z[v] * inv_t - ms - ls) as f64).exp();
            let sigma = if exact_ce {
                (z[v] - m1 - l1).exp()
            } else {
                qv as f32
            };
            g[v] = (ce_w * sigma + (kd_w * qv * (gc[c] - h)) as f32) * scale;
        }
        g[y] -= ce_w * scale;
        (ce, loss * (temp * temp) as f64)
    }
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "retort-sparse-kd-ce"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.state.forward(
            "sparse loss",
            (storage, layout),
            (self.rows, self.vocab),
            |r, zr, gr, in_top| self.row(r, zr, gr, in_top),
        )
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        self.state.backward(arg, grad_res)
    }
}

/// `scale · [(1 − α)·Σ CE + α·Σ T²·L(p_teacher, q_student)]` over rows of `student (N, V)`
/// logits against sparse teacher targets (already at temperature T) and `targets (N)`; CPU, f32.
pub fn sparse_kd_ce(
    student: &Tensor,
    teacher: &SparseTargets,
    targets: &Tensor,
    div: Divergence,
    temperature: f64,
    alpha: f64,
    scale: f64,
) -> Result<FusedLoss> {
    let (rows, vocab) = student.dims2()?;
    let none = crate::cache::codec::NONE;
    let bad_id = teacher
        .ids
        .iter()
        .find(|&&i| i != none && i as usize >= vocab);
    if teacher.rows() != rows || targets.dims1()? != rows || bad_id.is_some() {
        return Err(Error::invalid(
            format!(
                "sparse loss: student logits {:?}, {} teacher rows, targets {:?}, teacher id {bad_id:?}",
                student.dims(),
                teacher.rows(),
                targets.dims()
            ),
            "teacher targets must match the batch and the student's vocabulary; \
             relabel the data with the student's teacher",
        ));
    }
    let mix = KdMix { alpha, temperature };
    let op = Op {
        t: teacher.clone(),
        targets: targets.to_vec1::<u32>()?,
        div,
        rows,
        vocab,
        inv_t: mix.inv_t(),
        state: RowLoss::new(mix, scale),
    };
    fused::apply(student, op, |op| &op.state)
}
