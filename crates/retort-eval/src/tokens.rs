//! Per-token metrics on the answer (loss) tokens, summed so batches and chunks add up exactly.
//!
//! Dimension letters: N = loss positions in a chunk, V = vocabulary. Student logits `(N, V)`
//! predict the reference tokens `targets (N)`; the teacher's logits, when given, are taken on the
//! same positions (teacher forcing on the reference, as KD training sees them). All in f32 at
//! temperature 1.

use candle_core::{D, DType, Tensor};
use retort_distill::loss::log_softmax;
use serde::Serialize;

use crate::error::{Error, Result};

/// Sums over answer tokens; divide by `tokens` for means ([`TokenSums::means`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TokenSums {
    pub tokens: usize,
    /// Σ −log q(reference): the student's NLL.
    pub nll: f64,
    /// Σ [argmax q = reference].
    pub correct: usize,
    /// Σ H(q).
    pub entropy: f64,
    /// Tokens with teacher terms (all tokens when a teacher was given, else 0).
    pub teacher_tokens: usize,
    /// Σ −log p(reference): the teacher's NLL on the same answers.
    pub teacher_nll: f64,
    /// Σ KL(p‖q), teacher p, student q.
    pub kl: f64,
    /// Σ [argmax p = argmax q].
    pub agree: usize,
    /// Σ H(p).
    pub teacher_entropy: f64,
}

/// Per-token means of [`TokenSums`] (teacher fields `None` without a teacher).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenMeans {
    pub tokens: usize,
    /// Mean NLL of the reference answers, nats per token.
    pub nll: f64,
    /// exp(nll).
    pub perplexity: f64,
    /// Fraction of tokens whose argmax is the reference token.
    pub accuracy: f64,
    pub entropy: f64,
    pub teacher_nll: Option<f64>,
    pub kl: Option<f64>,
    pub agreement: Option<f64>,
    pub teacher_entropy: Option<f64>,
}

impl TokenSums {
    pub fn add(&mut self, o: &TokenSums) {
        self.tokens += o.tokens;
        self.nll += o.nll;
        self.correct += o.correct;
        self.entropy += o.entropy;
        self.teacher_tokens += o.teacher_tokens;
        self.teacher_nll += o.teacher_nll;
        self.kl += o.kl;
        self.agree += o.agree;
        self.teacher_entropy += o.teacher_entropy;
    }

    pub fn means(&self) -> TokenMeans {
        let n = self.tokens.max(1) as f64;
        let tn = self.teacher_tokens.max(1) as f64;
        let t = |x: f64| (self.teacher_tokens > 0).then_some(x / tn);
        TokenMeans {
            tokens: self.tokens,
            nll: self.nll / n,
            perplexity: (self.nll / n).exp(),
            accuracy: self.correct as f64 / n,
            entropy: self.entropy / n,
            teacher_nll: t(self.teacher_nll),
            kl: t(self.kl),
            agreement: t(self.agree as f64),
            teacher_entropy: t(self.teacher_entropy),
        }
    }
}

fn sum(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// Σ −log(target) and Σ entropy of rows of log-probs `lp (N, V)`, and their argmax `(N)`.
fn row_stats(lp: &Tensor, targets: &Tensor) -> Result<(f64, f64, Tensor)> {
    let nll = -sum(&lp.gather(&targets.unsqueeze(1)?, 1)?)?; // (N, 1)
    let entropy = -sum(&(lp.exp()? * lp)?)?;
    Ok((nll, entropy, lp.argmax(D::Minus1)?)) // (N)
}

fn count_equal(a: &Tensor, b: &Tensor) -> Result<usize> {
    Ok(sum(&a.eq(b)?.to_dtype(DType::F32)?)?.round() as usize)
}

/// The sums of one chunk: `student (N, V)` logits, optional `teacher (N, V)`, `targets (N)` u32.
pub fn chunk_sums(
    student: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
) -> Result<TokenSums> {
    let (n, v) = student.dims2()?;
    let ls = log_softmax(student)?; // (N, V) log q
    let (nll, entropy, s_top) = row_stats(&ls, targets)?;
    let targets_u32 = targets.to_dtype(DType::U32)?;
    let mut out = TokenSums {
        tokens: n,
        nll,
        correct: count_equal(&s_top, &targets_u32)?,
        entropy,
        ..Default::default()
    };
    if let Some(t) = teacher {
        let (tn, tv) = t.dims2()?;
        if (tn, tv) != (n, v) {
            return Err(Error::invalid(
                format!("teacher logits ({tn}, {tv}) against student logits ({n}, {v})"),
                "teacher and student must share the tokenizer (same vocabulary)",
            ));
        }
        let lt = log_softmax(t)?; // (N, V) log p
        let (t_nll, t_entropy, t_top) = row_stats(&lt, targets)?;
        out.teacher_tokens = n;
        out.teacher_nll = t_nll;
        out.teacher_entropy = t_entropy;
        out.kl = sum(&(lt.exp()? * (lt - &ls)?)?)?;
        out.agree = count_equal(&t_top, &s_top)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn hand_computed_two_tokens_three_words() {
        // Student row 0 uniform: q = 1/3 each. Row 1 logits (ln 2, 0, 0): q = (1/2, 1/4, 1/4).
        let ln2 = std::f32::consts::LN_2;
        let s = t(&[[0.0, 0.0, 0.0], [ln2, 0.0, 0.0]]);
        // Teacher row 0: p = (1/2, 1/4, 1/4); row 1: uniform.
        let te = t(&[[ln2, 0.0, 0.0], [0.0, 0.0, 0.0]]);
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let r = chunk_sums(&s, Some(&te), &targets).unwrap();
        let ln = |x: f64| x.ln();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        assert_eq!(r.tokens, 2);
        // NLL: −ln(1/3) − ln(1/2).
        close(r.nll, ln(3.0) + ln(2.0));
        // Student argmax: row 0 ties → index 0 (≠ 1), row 1 → 0 (= target 0).
        assert_eq!(r.correct, 1);
        // H(q): ln 3 + (½ ln 2 + ¼ ln 4 + ¼ ln 4) = ln 3 + 1.5 ln 2.
        close(r.entropy, ln(3.0) + 1.5 * ln(2.0));
        // Teacher NLL: −ln(1/4) − ln(1/3).
        close(r.teacher_nll, ln(4.0) + ln(3.0));
        // KL row 0: Σ p ln(p/q) = ½ ln(3/2) + 2·¼ ln(3/4); row 1: Σ ⅓ ln((1/3)/q) = ⅓(ln(2/3) + 2 ln(4/3)).
        let kl0 = 0.5 * ln(1.5) + 0.5 * ln(0.75);
        let kl1 = (ln(2.0 / 3.0) + 2.0 * ln(4.0 / 3.0)) / 3.0;
        close(r.kl, kl0 + kl1);
        // Teacher argmax: row 0 → 0, row 1 tie → 0; student 0, 0: both agree.
        assert_eq!(r.agree, 2);
        close(r.teacher_entropy, 1.5 * ln(2.0) + ln(3.0));
        let m = r.means();
        close(m.nll, (ln(3.0) + ln(2.0)) / 2.0);
        close(m.perplexity, (6.0f64).sqrt());
        assert_eq!(m.agreement, Some(1.0));
        // KL(p‖p) = 0 and full agreement when the student is the teacher.
        let same = chunk_sums(&te, Some(&te), &targets).unwrap();
        assert!(same.kl.abs() < 1e-6);
        assert_eq!(same.agree, 2);
    }

    #[test]
    fn sums_of_chunks_equal_the_whole() {
        let s = retort_test::random_logits(7, 9, 11);
        let te = retort_test::random_logits(8, 9, 11);
        let targets = Tensor::new(&[0u32, 3, 5, 10, 2, 2, 7, 1, 9], &Device::Cpu).unwrap();
        let whole = chunk_sums(&s, Some(&te), &targets).unwrap();
        let mut parts = TokenSums::default();
        for (start, len) in [(0, 4), (4, 1), (5, 4)] {
            parts.add(
                &chunk_sums(
                    &s.narrow(0, start, len).unwrap(),
                    Some(&te.narrow(0, start, len).unwrap()),
                    &targets.narrow(0, start, len).unwrap(),
                )
                .unwrap(),
            );
        }
        assert_eq!(
            (parts.tokens, parts.correct, parts.agree),
            (whole.tokens, whole.correct, whole.agree)
        );
        for (a, b) in [
            (parts.nll, whole.nll),
            (parts.kl, whole.kl),
            (parts.entropy, whole.entropy),
        ] {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // Without a teacher the teacher fields stay empty.
        let alone = chunk_sums(&s, None, &targets).unwrap().means();
        assert_eq!((alone.kl, alone.agreement), (None, None));
    }
}
