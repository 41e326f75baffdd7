//! Cross-tokenizer KD losses on aligned groups ([`super::align`]), fused with cross-entropy:
//! value and gradient with respect to the student logits.
//!
//! A group is the student tokens `y_1 … y_m` (rows `rows` of the student logits; row `r`
//! predicts token `y_r`) and the teacher tokens covering the same bytes. Each side's group
//! distribution is GOLD's "observed" merge: the distribution at the group's first token times
//! the probability the model gave the group's later tokens, `e^s · q(· | prefix)` with
//! `s = Σ_{j ≥ 2} log q_j(y_j)` (teacher: `e^{s_t} · p`, its `s_t` given). Teacher distributions
//! are sparse — top-k log-probs at temperature T plus one tail bucket, as the logit cache
//! stores them.
//!
//! - **ULD** (Boizard et al. 2024): `L = Σ_i |u_i − v_i|` between the sorted top-k of the
//!   student's merged vector (tail last) and the teacher's. No vocabulary mapping.
//! - **GOLD** (TRL): on groups of one token on each side, the teacher's top-k tokens whose
//!   strings exist in the student's vocabulary ([`VocabMap`]) are compared directly with the
//!   stage's divergence, over those tokens plus one bucket for the rest (the teacher's tail and
//!   unmatched tokens, the student's mass elsewhere) — exactly the same-tokenizer sparse loss
//!   when every token matches — plus ULD between the teacher's unmatched probabilities and the
//!   student's largest probabilities outside the matched tokens; ULD on longer groups.
//!
//! With `G_v = ∂L/∂q_v` on the first row (`H = Σ q_v G_v`), `∂L/∂(z_{1,v}/T) = q_v (G_v − H)`,
//! and on a later row `j`, `∂L/∂(z_{j,v}/T) = (∂L/∂s) (δ_{v,y_j} − q_{j,v})`. The objective is
//! `(1 − α)·Σ_rows CE + α·T²·Σ_groups L`, as every other KD loss; rows in no group (tokens the
//! alignment left out) take CE only.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::fused::{self, FusedLoss, RowLoss, row_stats};
use crate::loss::{Divergence, KdMix};
use crate::sparse::term;

/// `none` in a teacher id list or a [`VocabMap`]: no entry.
const NONE: u32 = crate::cache::codec::NONE;

/// Which cross-tokenizer loss a `kd` stage uses (`cross_tokenizer = "uld" | "gold"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossLoss {
    Uld,
    Gold,
}

/// Teacher id → the student id of the same token string ([`codec::NONE`](crate::cache::codec::NONE) where the student has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabMap(pub Vec<u32>);

impl VocabMap {
    /// Matches vocabulary entries by their string (GOLD's rule), e.g. `Ġthe` ↔ `Ġthe` between
    /// two byte-level BPE vocabularies.
    pub fn by_string(teacher: &retort_model::Tokenizer, student: &retort_model::Tokenizer) -> Self {
        let n = teacher.vocab_size();
        let map = (0..n as u32)
            .map(|t| {
                teacher
                    .inner()
                    .id_to_token(t)
                    .and_then(|s| student.token_to_id(&s))
                    .unwrap_or(NONE)
            })
            .collect();
        VocabMap(map)
    }

    /// Every id maps to itself (one tokenizer on both sides).
    pub fn identity(n: usize) -> Self {
        VocabMap((0..n as u32).collect())
    }

    fn get(&self, t: u32) -> Option<u32> {
        self.0.get(t as usize).copied().filter(|&s| s != NONE)
    }
}

/// The teacher's side of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherGroup {
    /// Top-k ids at the group's first teacher token, in the teacher's vocabulary ([`codec::NONE`](crate::cache::codec::NONE) for
    /// entries dropped at labelling).
    pub ids: Vec<u32>,
    /// `k + 1` coarse log-probs at temperature T, the tail bucket last.
    pub logp: Vec<f32>,
    /// `s_t`: the teacher's log-probability of the group's later tokens (0 for one token).
    pub rest_logp: f32,
    /// One teacher token (GOLD compares such groups token by token when the student's side
    /// is one token too).
    pub single: bool,
}

/// One aligned group: student rows `rows` and the teacher's side.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub rows: Range<usize>,
    pub teacher: TeacherGroup,
}

/// How the KD term is computed.
#[derive(Debug, Clone)]
pub struct CrossKd {
    pub loss: CrossLoss,
    /// GOLD's divergence on matched tokens.
    pub div: Divergence,
    /// Needed by GOLD.
    pub map: Option<Arc<VocabMap>>,
}

/// `log Σ exp(x)` in f64 (`-inf` for no terms or all `-inf`).
fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Indices of the `n` largest entries of `z` (ties by lower index), largest first, skipping
/// `skip`.
fn top_n(z: &[f32], n: usize, skip: &[u32]) -> Vec<usize> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (v, &x) in z.iter().enumerate() {
        if best.len() == n && x <= best[n - 1].0 {
            continue;
        }
        if skip.contains(&(v as u32)) {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= x);
        best.insert(at, (x, v));
        best.truncate(n);
    }
    best.into_iter().map(|(_, v)| v).collect()
}

/// L1 between sorted vectors: value, and `sign(u_i − v_i)` per slot.
fn l1(u: &[f64], v: &[f64]) -> (f64, Vec<f64>) {
    let w: Vec<f64> = u
        .iter()
        .zip(v)
        .map(|(a, b)| {
            if a > b {
                1.0
            } else if a < b {
                -1.0
            } else {
                0.0
            }
        })
        .collect();
    (u.iter().zip(v).map(|(a, b)| (a - b).abs()).sum(), w)
}

struct Op {
    groups: Vec<Group>,
    kd: CrossKd,
    targets: Vec<u32>,
    rows: usize,
    vocab: usize,
    inv_t: f32,
    state: RowLoss,
}

/// Per row: `(m, log Σ)` at T = 1 and at T.
type Stats = ((f32, f32), (f32, f32));

impl Op {
    fn stats(&self, z: &[f32]) -> Stats {
        let s1 = row_stats(z, 1.0);
        let st = if self.inv_t == 1.0 {
            s1
        } else {
            row_stats(z, self.inv_t)
        };
        (s1, st)
    }

    /// log q_T(v) of one row.
    fn lq(&self, z: &[f32], st: (f32, f32), v: usize) -> f64 {
        (z[v] * self.inv_t - st.0 - st.1) as f64
    }

    /// One group's loss L (before α·T²), `∂L/∂q` on the first row as sparse `(id, G)` pairs
    /// plus the value for every other id, and `∂L/∂s`.
    fn group(&self, g: &Group, z: &[f32], stats: &[Stats]) -> (GroupLoss, Vec<(usize, f64)>) {
        let v = self.vocab;
        let r1 = g.rows.start;
        let z1 = &z[r1 * v..(r1 + 1) * v];
        let st1 = stats[r1].1;
        let s: f64 = g
            .rows
            .clone()
            .skip(1)
            .map(|r| self.lq(&z[r * v..(r + 1) * v], stats[r].1, self.targets[r] as usize))
            .sum();
        let t = &g.teacher;
        let k = t.ids.len();
        let valid: Vec<usize> = (0..k).filter(|&c| t.ids[c] != NONE).collect();
        let gold = self.kd.loss == CrossLoss::Gold && g.rows.len() == 1 && t.single;
        if gold && let Some(map) = &self.kd.map {
            // Matched: (student id, teacher log-prob); the rest bucket gathers the teacher's
            // tail and unmatched tokens.
            let mut matched: Vec<(u32, f64)> = Vec::new();
            let mut unmatched: Vec<f64> = Vec::new();
            for &c in &valid {
                let lp = t.logp[c] as f64;
                match map.get(t.ids[c]) {
                    Some(sid) if (sid as usize) < v => matched.push((sid, lp)),
                    _ => unmatched.push(lp.exp()),
                }
            }
            let p_rest = (t.logp[k] as f64).exp() + unmatched.iter().sum::<f64>();
            let mut loss = 0.0;
            let mut grads: Vec<(usize, f64)> = Vec::with_capacity(matched.len() + unmatched.len());
            let mut h = 0.0;
            for &(sid, lp) in &matched {
                let lq = self.lq(z1, st1, sid as usize);
                let q = lq.exp();
                let (val, gc) = term(self.kd.div, lp.exp(), lp, q, lq);
                loss += val;
                let gc = if q > 0.0 { gc } else { 0.0 };
                grads.push((sid as usize, gc));
                h += q * gc;
            }
            // The student's mass outside the matched tokens, summed over them in log space: not
            // `1 − Σ matched`, which rounds to 0 for a confident student and makes the forward
            // KL's `log q_rest` −∞ (an infinite loss, seen in training).
            let mut ids: Vec<usize> = matched.iter().map(|m| m.0 as usize).collect();
            ids.sort_unstable();
            let lq_rest = log_sum_exp(
                (0..v)
                    .filter(|a| ids.binary_search(a).is_err())
                    .map(|a| self.lq(z1, st1, a)),
            );
            let q_rest = lq_rest.exp();
            let (val, g_rest) = term(self.kd.div, p_rest, p_rest.ln(), q_rest, lq_rest);
            loss += val;
            let g_rest = if q_rest > 0.0 { g_rest } else { 0.0 };
            h += q_rest * g_rest;
            if !unmatched.is_empty() {
                unmatched.sort_by(|a, b| b.total_cmp(a));
                let skip: Vec<u32> = matched.iter().map(|m| m.0).collect();
                let top = top_n(z1, unmatched.len(), &skip);
                let u: Vec<f64> = top.iter().map(|&a| self.lq(z1, st1, a).exp()).collect();
                let (val, w) = l1(&u, &unmatched[..top.len()]);
                loss += val;
                for ((&a, &wi), &qa) in top.iter().zip(&w).zip(&u) {
                    // G_a = g_rest + w_i (a is outside the matched set).
                    grads.push((a, g_rest + wi));
                    h += qa * wi;
                }
            }
            let loss = GroupLoss {
                value: loss,
                g_else: g_rest,
                h,
                ds: 0.0,
            };
            return (loss, grads);
        }
        // ULD on the merged vectors.
        let es = s.exp();
        let et = (t.rest_logp as f64).exp();
        let mut tv: Vec<f64> = valid
            .iter()
            .map(|&c| (t.logp[c] as f64).exp() * et)
            .collect();
        tv.sort_by(|a, b| b.total_cmp(a));
        let top = top_n(z1, valid.len(), &[]);
        // A student vocabulary smaller than the teacher's k: the teacher's extra entries join
        // its tail, so both vectors are `top.len() + 1` long.
        let extra: f64 = tv.drain(top.len()..).sum();
        tv.push((t.logp[k] as f64).exp() * et + extra);
        let q: Vec<f64> = top.iter().map(|&a| self.lq(z1, st1, a).exp()).collect();
        let mut u: Vec<f64> = q.iter().map(|x| x * es).collect();
        u.push((1.0 - q.iter().sum::<f64>()).max(0.0) * es);
        let (loss, w) = l1(&u, &tv);
        let w_tail = w[w.len() - 1];
        let mut h = 0.0;
        let grads: Vec<(usize, f64)> = top
            .iter()
            .zip(&w)
            .zip(&q)
            .map(|((&a, &wi), &qa)| {
                let ga = es * (wi - w_tail);
                h += qa * ga;
                (a, ga)
            })
            .collect();
        let ds: f64 = u.iter().zip(&w).map(|(a, b)| a * b).sum();
        let loss = GroupLoss {
            value: loss,
            g_else: 0.0,
            h,
            ds,
        };
        (loss, grads)
    }

    fn run(&self, z: &[f32]) -> (Vec<f32>, f64, f64) {
        let (v, rows) = (self.vocab, self.rows);
        let (ce_w, kd_w) = self.state.mix.grad_weights();
        let (ce_w, kd_w, scale) = (ce_w as f64, kd_w as f64, self.state.scale as f64);
        let inv_t = self.inv_t;
        let temp = 1.0 / inv_t as f64;
        let stats: Vec<Stats> = (0..rows)
            .map(|r| self.stats(&z[r * v..(r + 1) * v]))
            .collect();
        let mut grad = vec![0f32; rows * v];
        // CE on every row: σ − δ_y.
        let mut ce = 0.0;
        for r in 0..rows {
            let zr = &z[r * v..(r + 1) * v];
            let ((m1, l1), _) = stats[r];
            let y = self.targets[r] as usize;
            ce += (m1 + l1 - zr[y]) as f64;
            let gr = &mut grad[r * v..(r + 1) * v];
            for (g, &x) in gr.iter_mut().zip(zr) {
                *g = (ce_w * ((x - m1 - l1).exp() as f64) * scale) as f32;
            }
            gr[y] -= (ce_w * scale) as f32;
        }
        let mut kd = 0.0;
        for g in &self.groups {
            let (loss, grads) = self.group(g, z, &stats);
            kd += loss.value;
            let r1 = g.rows.start;
            let z1 = &z[r1 * v..(r1 + 1) * v];
            let st1 = stats[r1].1;
            let gr = &mut grad[r1 * v..(r1 + 1) * v];
            // q_v (G_v − H): G_v = loss.g_else except at the listed ids.
            for (x, &zv) in gr.iter_mut().zip(z1) {
                let q = ((zv * inv_t - st1.0 - st1.1) as f64).exp();
                *x += (kd_w * q * (loss.g_else - loss.h) * scale) as f32;
            }
            for &(a, ga) in &grads {
                let q = self.lq(z1, st1, a).exp();
                gr[a] += (kd_w * q * (ga - loss.g_else) * scale) as f32;
            }
            if loss.ds != 0.0 {
                for r in g.rows.clone().skip(1) {
                    let zr = &z[r * v..(r + 1) * v];
                    let st = stats[r].1;
                    let c = kd_w * loss.ds * scale;
                    let gr = &mut grad[r * v..(r + 1) * v];
                    for (x, &zv) in gr.iter_mut().zip(zr) {
                        let q = ((zv * inv_t - st.0 - st.1) as f64).exp();
                        *x -= (c * q) as f32;
                    }
                    gr[self.targets[r] as usize] += c as f32;
                }
            }
        }
        (grad, ce, kd * temp * temp)
    }
}

/// A group's loss and the pieces of its gradient.
struct GroupLoss {
    value: f64,
    /// `∂L/∂q_v` for every id not listed.
    g_else: f64,
    /// `Σ_v q_v G_v`.
    h: f64,
    /// `∂L/∂s`.
    ds: f64,
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "retort-cross-tokenizer-kd-ce"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.state.forward_whole(
            "cross-tokenizer loss",
            (storage, layout),
            (self.rows, self.vocab),
            |z| self.run(z),
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

/// `scale · [(1 − α)·Σ_rows CE + α·T²·Σ_groups L]` over `student (N, V)` logits with `targets
/// (N)` (row r predicts `targets[r]`) and the aligned `groups` (disjoint row ranges); CPU, f32.
pub fn cross_kd_ce(
    student: &Tensor,
    targets: &Tensor,
    groups: &[Group],
    kd: &CrossKd,
    temperature: f64,
    alpha: f64,
    scale: f64,
) -> Result<FusedLoss> {
    let (rows, vocab) = student.dims2()?;
    let bad = |what: String| {
        Error::invalid(
            format!("cross-tokenizer loss: {what}"),
            "this is a bug in retort: the batch and its alignment disagree",
        )
    };
    if targets.dims1()? != rows {
        return Err(bad(format!("{rows} rows, {:?} targets", targets.dims())));
    }
    let mut end = 0;
    for g in groups {
        if g.rows.start < end || g.rows.is_empty() || g.rows.end > rows {
            return Err(bad(format!(
                "group rows {:?} after row {end} of {rows}",
                g.rows
            )));
        }
        if g.teacher.logp.len() != g.teacher.ids.len() + 1 {
            return Err(bad("teacher log-probs must be k + 1 long".into()));
        }
        end = g.rows.end;
    }
    if kd.loss == CrossLoss::Gold && kd.map.is_none() {
        return Err(bad("GOLD needs a vocabulary map".into()));
    }
    let mix = KdMix { alpha, temperature };
    let op = Op {
        groups: groups.to_vec(),
        kd: kd.clone(),
        targets: targets.to_vec1::<u32>()?,
        rows,
        vocab,
        inv_t: mix.inv_t(),
        state: RowLoss::new(mix, scale),
    };
    fused::apply(student, op, |op| &op.state)
}
