//! `(1 − α)·CE + α·T²·KL(p_t‖p_s)` and its gradient in one pass over each row of logits.
//!
//! The composed version in [`crate::loss`] runs ~15 tensor ops over `(N, V)` (each allocating a
//! tensor the size of the logits) and as many again in backward; this computes the per-row loss
//! and the gradient with respect to the student logits together, two `exp`s per element, rows in
//! parallel. Forward KL is the default KD loss, so it gets the fast path; the other divergences
//! use the composed ops. Tests check both agree in values and gradients.
//!
//! With z the student logits, s = z/T, q = softmax(s), p = softmax(t/T), σ = softmax(z):
//! ∂/∂z [(1 − α)·CE(z, y) + α·T²·KL(p‖q)] = (1 − α)(σ − onehot(y)) + α·T·(q − p).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use retort_kernels::exp;

use crate::error::{Error, Result};
use crate::loss::KdMix;

/// Per-row sums of the two terms, and the loss tensor (scalar, with gradient to the student).
pub struct FusedLoss {
    /// `(1 − α)·ΣCE + α·ΣKD·T²`, times `scale`; backward yields the exact gradient.
    pub loss: Tensor,
    pub ce_sum: f64,
    /// Σ T²·KL over rows (not weighted by α, not scaled).
    pub kd_sum: f64,
}

struct Op {
    /// `None` for cross-entropy alone (α must be 0).
    teacher: Option<Vec<f32>>,
    targets: Vec<u32>,
    rows: usize,
    vocab: usize,
    inv_t: f32,
    state: RowLoss,
}

/// What the fused ops (this one and [`crate::sparse`]'s) share: the mix and scale, and the
/// gradient and sums their forward pass computes for backward and the caller.
pub(crate) struct RowLoss {
    pub mix: KdMix,
    pub scale: f32,
    /// Gradient of the scaled loss w.r.t. the student logits, computed in the forward pass.
    grad: Mutex<Option<Vec<f32>>>,
    /// (Σ CE, Σ T²·KD) over rows, for the caller.
    sums: Arc<Mutex<(f64, f64)>>,
}

impl RowLoss {
    pub fn new(mix: KdMix, scale: f64) -> Self {
        Self {
            mix,
            scale: scale as f32,
            grad: Mutex::new(None),
            sums: Arc::new(Mutex::new((0.0, 0.0))),
        }
    }

    /// The op's forward: every row of the contiguous f32 logits `(rows, vocab)` through
    /// [`rows_in_parallel`]; keeps the gradient and sums, returns `scale · mix(ΣCE, ΣT²KD)`.
    pub fn forward<F>(
        &self,
        what: &str,
        (storage, layout): (&CpuStorage, &Layout),
        (rows, vocab): (usize, usize),
        row: F,
    ) -> candle_core::Result<(CpuStorage, Shape)>
    where
        F: Fn(usize, &[f32], &mut [f32], &mut [bool]) -> (f64, f64) + Sync,
    {
        self.forward_whole(what, (storage, layout), (rows, vocab), |z| {
            rows_in_parallel(z, rows, vocab, &row)
        })
    }

    /// [`Self::forward`] for losses that couple rows: `whole(z)` returns the gradient of all
    /// rows (already scaled) and the CE and KD sums.
    pub fn forward_whole<F>(
        &self,
        what: &str,
        (storage, layout): (&CpuStorage, &Layout),
        (rows, vocab): (usize, usize),
        whole: F,
    ) -> candle_core::Result<(CpuStorage, Shape)>
    where
        F: Fn(&[f32]) -> (Vec<f32>, f64, f64),
    {
        let CpuStorage::F32(z) = storage else {
            candle_core::bail!("{what}: student logits must be f32");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what}: student logits must be contiguous");
        };
        if b - a != rows * vocab {
            candle_core::bail!("{what}: {} logits for {rows} rows of {vocab}", b - a);
        }
        let (grad, ce, kd) = whole(&z[a..b]);
        let loss = self.mix.loss(ce, kd) * self.scale as f64;
        if let Ok(mut g) = self.grad.lock() {
            *g = Some(grad);
        }
        if let Ok(mut s) = self.sums.lock() {
            *s = (ce, kd);
        }
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    /// The op's backward: the gradient kept by [`Self::forward`] or [`Self::forward_whole`].
    pub fn backward(&self, arg: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        stored_grad(&self.grad, arg, grad_res)
    }
}

/// Apply a fused loss op to the student logits and read its sums.
pub(crate) fn apply<O: CustomOp1 + Send + Sync + 'static>(
    student: &Tensor,
    op: O,
    state: impl Fn(&O) -> &RowLoss,
) -> Result<FusedLoss> {
    let sums = state(&op).sums.clone();
    let loss = student.contiguous()?.apply_op1(op)?;
    let (ce_sum, kd_sum) = *sums
        .lock()
        .map_err(|_| Error::invalid("fused loss: poisoned", "this is a bug in retort"))?;
    Ok(FusedLoss {
        loss,
        ce_sum,
        kd_sum,
    })
}

/// log Σ exp(x·k) computed stably, returning (max·k, lse) so that log softmax = x·k − max − lse.
pub(crate) fn row_stats(x: &[f32], k: f32) -> (f32, f32) {
    // k > 0 (an inverse temperature), so max(x·k) = max(x)·k.
    let max = exp::max(x) * k;
    (max, exp::sum_exp(x, k, max).ln())
}

thread_local! {
    /// Per-thread rows of teacher probabilities and of the student's softmax at T = 1.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Op {
    /// One row: returns (CE, T²·KL) and writes the gradient of `(1−α)CE + αT²KL` into `g`.
    ///
    /// Each softmax takes one `exp` per value: `exp(x·k − max·k)` is written out and summed in
    /// one pass, and the last pass divides by the sum (the log-normaliser is `max·k + ln Σ`).
    fn row(&self, z: &[f32], t: Option<&[f32]>, y: u32, g: &mut [f32]) -> (f64, f64) {
        let scale = self.state.scale;
        let z_max = exp::max(z);
        let Some(t) = t else {
            let sum = exp::exp_scaled_sum(z, 1.0, z_max, g);
            let ce = (z_max + sum.ln() - z[y as usize]) as f64;
            let k = scale / sum;
            for gi in g.iter_mut() {
                *gi *= k;
            }
            g[y as usize] -= scale;
            return (ce, 0.0);
        };
        let t_max = exp::max(t);
        let mut kl = 0f64;
        let inv_t = self.inv_t;
        let (ce_w, kd_w) = self.state.mix.grad_weights();
        // Unnormalised q into g, p (and σ when T ≠ 1) into per-thread buffers, then one
        // arithmetic pass.
        let ce = SCRATCH.with_borrow_mut(|(p, sigma)| {
            p.resize(z.len(), 0.0);
            // k > 0 (an inverse temperature), so max(x·k) = max(x)·k.
            let sum_q = exp::exp_scaled_sum(z, inv_t, z_max * inv_t, g);
            let sum_p = exp::exp_scaled_sum(t, inv_t, t_max * inv_t, p);
            let (norm_q, norm_p) = (z_max * inv_t + sum_q.ln(), t_max * inv_t + sum_p.ln());
            let (sum_s, norm_s) = if inv_t == 1.0 {
                (sum_q, norm_q)
            } else {
                sigma.resize(z.len(), 0.0);
                let s = exp::exp_scaled_sum(z, 1.0, z_max, sigma);
                (s, z_max + s.ln())
            };
            // KL summed in 16 f32 lanes over chunks of 256 values (fixed-size blocks, so the
            // loop vectorises), each chunk's lanes then added in f64.
            let c = Consts {
                inv_t,
                norm_q,
                norm_p,
                inv_sum_q: 1.0 / sum_q,
                inv_sum_p: 1.0 / sum_p,
                inv_sum_s: 1.0 / sum_s,
                ce_w,
                kd_w,
                scale,
            };
            let sig: &[f32] = if inv_t == 1.0 { &[] } else { sigma };
            let n = z.len();
            let blocks = n / 16;
            let mut acc = [0f32; 16];
            for b in 0..blocks {
                let r = b * 16..b * 16 + 16;
                let s16 = if sig.is_empty() {
                    None
                } else {
                    sig[r.clone()].try_into().ok()
                };
                if let (Ok(g16), Ok(z16), Ok(t16), Ok(p16)) = (
                    <&mut [f32; 16]>::try_from(&mut g[r.clone()]),
                    <&[f32; 16]>::try_from(&z[r.clone()]),
                    <&[f32; 16]>::try_from(&t[r.clone()]),
                    <&[f32; 16]>::try_from(&p[r]),
                ) {
                    kl_block(g16, z16, t16, p16, s16, &c, &mut acc);
                }
                if b % 16 == 15 || b + 1 == blocks {
                    kl += acc.iter().map(|&a| a as f64).sum::<f64>();
                    acc = [0.0; 16];
                }
            }
            for i in blocks * 16..n {
                let s = (!sig.is_empty()).then(|| sig[i]);
                let (gi, term) = kl_value(z[i], t[i], g[i], p[i], s, &c);
                g[i] = gi;
                kl += term as f64;
            }
            (norm_s - z[y as usize]) as f64
        });
        g[y as usize] -= ce_w * scale;
        let temp = 1.0 / inv_t;
        (ce, kl * (temp * temp) as f64)
    }
}

/// The per-row constants of [`Op::row`]'s last pass.
struct Consts {
    inv_t: f32,
    /// Log-normalisers of q (student at T) and p (teacher at T).
    norm_q: f32,
    norm_p: f32,
    /// 1 / the sums of the unnormalised q, p and σ (student at T = 1).
    inv_sum_q: f32,
    inv_sum_p: f32,
    inv_sum_s: f32,
    ce_w: f32,
    kd_w: f32,
    scale: f32,
}

/// 16 values of [`Op::row`]'s last pass: `g` holds the unnormalised q on entry and the gradient
/// on exit; `acc` gains each lane's `p·(log p − log q)`. `p` and `s` (σ, when T ≠ 1; else σ = q)
/// are unnormalised too.
#[inline(always)]
fn kl_block(
    g: &mut [f32; 16],
    z: &[f32; 16],
    t: &[f32; 16],
    p: &[f32; 16],
    s: Option<&[f32; 16]>,
    c: &Consts,
    acc: &mut [f32; 16],
) {
    for l in 0..16 {
        let (gl, term) = kl_value(z[l], t[l], g[l], p[l], s.map(|s| s[l]), c);
        g[l] = gl;
        acc[l] += term;
    }
}

/// One value of that pass: the gradient `(CE weight·σ + KD weight·(q − p))·scale` and the KL
/// term `p·(log p − log q)`, from the unnormalised `q`, `p` and `s`.
#[inline(always)]
fn kl_value(z: f32, t: f32, q: f32, p: f32, s: Option<f32>, c: &Consts) -> (f32, f32) {
    let q = q * c.inv_sum_q;
    let p = p * c.inv_sum_p;
    let s = s.map_or(q, |s| s * c.inv_sum_s);
    let log_q = z * c.inv_t - c.norm_q;
    let log_p = t * c.inv_t - c.norm_p;
    let g = (c.ce_w * s + c.kd_w * (q - p)) * c.scale;
    (g, p * (log_p - log_q))
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "retort-fused-fkl-ce"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = self.vocab;
        self.state.forward(
            "fused loss",
            (storage, layout),
            (self.rows, v),
            |r, zr, gr, _| {
                let t = self.teacher.as_ref().map(|t| &t[r * v..(r + 1) * v]);
                self.row(zr, t, self.targets[r], gr)
            },
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

/// Run `row(r, z_r, g_r, scratch) → (ce, kd)` over the rows of `z (rows, vocab)` on candle's
/// threads, each row writing its gradient into `g_r`; `scratch` is a per-thread `vocab`-long
/// buffer of `false` that `row` must leave as it found it. Returns the gradient and the sums.
pub(crate) fn rows_in_parallel<F>(
    z: &[f32],
    rows: usize,
    vocab: usize,
    row: F,
) -> (Vec<f32>, f64, f64)
where
    F: Fn(usize, &[f32], &mut [f32], &mut [bool]) -> (f64, f64) + Sync,
{
    let mut grad = vec![0f32; rows * vocab];
    let threads = candle_core::utils::get_num_threads().max(1);
    let per = rows.div_ceil(threads).max(1);
    let row = &row;
    let (ce, kd) = std::thread::scope(|sc| {
        let handles: Vec<_> = grad
            .chunks_mut(per * vocab)
            .enumerate()
            .map(|(c, g)| {
                sc.spawn(move || {
                    let mut scratch = vec![false; vocab];
                    let (mut ce, mut kd) = (0f64, 0f64);
                    for (j, gr) in g.chunks_mut(vocab).enumerate() {
                        let r = c * per + j;
                        let (c1, k1) = row(r, &z[r * vocab..(r + 1) * vocab], gr, &mut scratch);
                        ce += c1;
                        kd += k1;
                    }
                    (ce, kd)
                })
            })
            .collect();
        handles.into_iter().fold((0f64, 0f64), |(a, b), h| {
            let (c, k) = h.join().unwrap_or((f64::NAN, f64::NAN));
            (a + c, b + k)
        })
    });
    (grad, ce, kd)
}

/// Backward of a loss whose gradient was computed in its forward pass and kept in `slot`.
pub(crate) fn stored_grad(
    slot: &Mutex<Option<Vec<f32>>>,
    arg: &Tensor,
    grad_res: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let g = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("fused loss: poisoned".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("fused loss: backward ran twice".into()))?;
    let g = Tensor::from_vec(g, arg.shape(), arg.device())?;
    // The incoming gradient is a scalar, 1 when this loss is what backward started from.
    let k = grad_res
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    Ok(Some(if k == 1.0 { g } else { g.affine(k, 0.0)? }))
}

/// `scale · [(1 − α)·Σ CE + α·Σ T²·KL(p_t‖p_s)]` over rows of `student (N, V)` against
/// `teacher (N, V)` logits and `targets (N)`; CPU, f32.
/// With `teacher = None`: `scale · Σ CE` (SFT).
pub fn forward_kl_ce(
    student: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
    temperature: f64,
    alpha: f64,
    scale: f64,
) -> Result<FusedLoss> {
    let (rows, vocab) = student.dims2()?;
    let teacher_dims = match teacher {
        Some(t) => t.dims2()?,
        None => (rows, vocab),
    };
    if teacher_dims != (rows, vocab) || targets.dims1()? != rows {
        return Err(Error::invalid(
            format!(
                "fused loss: student {:?}, teacher {teacher_dims:?}, targets {:?}",
                student.dims(),
                targets.dims()
            ),
            "this is a bug in retort: shapes must agree",
        ));
    }
    let mix = KdMix {
        alpha: if teacher.is_some() { alpha } else { 0.0 },
        temperature,
    };
    let op = Op {
        teacher: match teacher {
            Some(t) => Some(t.detach().contiguous()?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        },
        targets: targets.to_vec1::<u32>()?,
        rows,
        vocab,
        inv_t: mix.inv_t(),
        state: RowLoss::new(mix, scale),
    };
    apply(student, op, |op| &op.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{Divergence, cross_entropy_sum, divergence_sum};
    use candle_core::{Device, Var};

    #[test]
    fn fused_equals_composed_in_value_and_gradient() {
        let dev = Device::Cpu;
        // 37: two 16-blocks and a tail; 300: more than one 256-chunk of the KL sum.
        for v in [37, 300] {
            let n = 5;
            let s0 = (Tensor::randn(0f32, 2.0, (n, v), &dev).unwrap())
                .contiguous()
                .unwrap();
            let t = Tensor::randn(0f32, 2.0, (n, v), &dev).unwrap();
            let y = Tensor::new(&[3u32, 0, 36, 7, 7], &dev).unwrap();
            for (temp, alpha, scale) in [
                (1.0, 1.0, 1.0),
                (1.0, 0.5, 0.1),
                (2.0, 0.3, 0.25),
                (0.7, 0.0, 1.0),
            ] {
                let a = Var::from_tensor(&s0).unwrap();
                let f = forward_kl_ce(a.as_tensor(), Some(&t), &y, temp, alpha, scale).unwrap();
                let ga = f
                    .loss
                    .backward()
                    .unwrap()
                    .get(a.as_tensor())
                    .unwrap()
                    .clone();
                let b = Var::from_tensor(&s0).unwrap();
                let ce = cross_entropy_sum(b.as_tensor(), &y).unwrap();
                let kd = divergence_sum(b.as_tensor(), &t, Divergence::ForwardKl, temp).unwrap();
                let total = (((&ce * (1.0 - alpha)).unwrap() + (&kd * alpha).unwrap()).unwrap()
                    * scale)
                    .unwrap();
                let gb = total
                    .backward()
                    .unwrap()
                    .get(b.as_tensor())
                    .unwrap()
                    .clone();
                let (lf, lc) = (
                    f.loss.to_scalar::<f32>().unwrap(),
                    total.to_scalar::<f32>().unwrap(),
                );
                assert!(
                    (lf - lc).abs() < 1e-4 * lc.abs().max(1.0),
                    "T={temp} α={alpha}: {lf} vs {lc}"
                );
                assert!((f.ce_sum - ce.to_scalar::<f32>().unwrap() as f64).abs() < 1e-4);
                assert!((f.kd_sum - kd.to_scalar::<f32>().unwrap() as f64).abs() < 1e-4);
                let d = retort_test::max_abs_diff(&ga, &gb);
                assert!(d < 1e-6, "T={temp} α={alpha}: gradients differ by {d}");
            }
            // Cross-entropy alone.
            let a = Var::from_tensor(&s0).unwrap();
            let f = forward_kl_ce(a.as_tensor(), None, &y, 1.0, 0.5, 0.5).unwrap();
            let ga = f
                .loss
                .backward()
                .unwrap()
                .get(a.as_tensor())
                .unwrap()
                .clone();
            let b = Var::from_tensor(&s0).unwrap();
            let ce = (cross_entropy_sum(b.as_tensor(), &y).unwrap() * 0.5).unwrap();
            let gb = ce.backward().unwrap().get(b.as_tensor()).unwrap().clone();
            assert!(
                (f.loss.to_scalar::<f32>().unwrap() - ce.to_scalar::<f32>().unwrap()).abs() < 1e-4
            );
            assert_eq!(f.kd_sum, 0.0);
            let d = retort_test::max_abs_diff(&ga, &gb);
            assert!(d < 1e-6, "CE gradients differ by {d}");
        }
    }
}
