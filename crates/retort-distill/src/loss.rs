//! Token-level losses on rows of logits, each summed over rows (the caller divides by the global
//! count of loss tokens).
//!
//! Shapes: `student`, `teacher` `(N, V)` logits at the N positions that carry loss; `targets (N)`
//! u32. All maths in f32 through log-softmax; the teacher side carries no gradient.
//!
//! With p = teacher, q = student distributions (after temperature T):
//!
//! | divergence | per-position value |
//! | --- | --- |
//! | forward KL | KL(p‖q) = Σ p (log p − log q) |
//! | reverse KL | KL(q‖p) = Σ q (log q − log p) |
//! | generalized JSD(β) | β KL(p‖m) + (1−β) KL(q‖m), m = β p + (1−β) q; β = 0 → forward KL, β = 1 → reverse KL (GKD's endpoints, as TRL's `generalized_jsd_loss`) |
//! | skew forward KL(α) | KL(p ‖ α p + (1−α) q) (DistiLLM); α = 0 → forward KL |
//! | skew reverse KL(α) | KL(q ‖ (1−α) p + α q) (DistiLLM); α = 0 → reverse KL |
//! | TVD | ½ Σ \|p − q\| |
//!
//! Every divergence is multiplied by T² so gradient magnitudes do not shrink with temperature
//! (Hinton et al.).

use candle_core::{D, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Which divergence the KD term uses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Divergence {
    ForwardKl,
    ReverseKl,
    Jsd { beta: f64 },
    SkewForwardKl { alpha: f64 },
    SkewReverseKl { alpha: f64 },
    Tvd,
}

impl Divergence {
    /// Parse `forward_kl`, `reverse_kl`, `jsd:0.5`, `skew_forward_kl:0.1`, `skew_reverse_kl:0.1`, `tvd`.
    pub fn parse(s: &str) -> std::result::Result<Divergence, String> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = |default: f64| -> std::result::Result<f64, String> {
            match arg {
                None => Ok(default),
                Some(a) => a
                    .parse::<f64>()
                    .map_err(|_| format!("`{a}` in `{s}` is not a number")),
            }
        };
        let d = match name {
            "forward_kl" | "fkl" | "kl" => Divergence::ForwardKl,
            "reverse_kl" | "rkl" => Divergence::ReverseKl,
            "jsd" => Divergence::Jsd { beta: num(0.5)? },
            "skew_forward_kl" | "sfkl" => Divergence::SkewForwardKl { alpha: num(0.1)? },
            "skew_reverse_kl" | "srkl" => Divergence::SkewReverseKl { alpha: num(0.1)? },
            "tvd" => Divergence::Tvd,
            _ => {
                return Err(format!(
                    "unknown loss `{s}`; expected forward_kl, reverse_kl, jsd[:β], \
                     skew_forward_kl[:α], skew_reverse_kl[:α] or tvd"
                ));
            }
        };
        d.validate()?;
        Ok(d)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match *self {
            Divergence::Jsd { beta } if !(0.0..=1.0).contains(&beta) => {
                Err(format!("jsd β must be in [0, 1], got {beta}"))
            }
            Divergence::SkewForwardKl { alpha } | Divergence::SkewReverseKl { alpha }
                if !(0.0..1.0).contains(&alpha) =>
            {
                Err(format!("skew KL α must be in [0, 1), got {alpha}"))
            }
            _ => Ok(()),
        }
    }
}

impl std::str::FromStr for Divergence {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Divergence::parse(s)
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::ForwardKl => write!(f, "forward_kl"),
            Divergence::ReverseKl => write!(f, "reverse_kl"),
            Divergence::Jsd { beta } => write!(f, "jsd:{beta}"),
            Divergence::SkewForwardKl { alpha } => write!(f, "skew_forward_kl:{alpha}"),
            Divergence::SkewReverseKl { alpha } => write!(f, "skew_reverse_kl:{alpha}"),
            Divergence::Tvd => write!(f, "tvd"),
        }
    }
}

/// The KD objective's mix of cross-entropy and divergence, written once:
/// `(1 − α)·CE + α·T²·KD(p_teacher/T ‖ q_student/T)` (Hinton et al.'s T² keeps the KD gradient's
/// scale independent of T). Every path — the composed ops, the fused and sparse ones, the
/// objective's reported means — combines its terms through this type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdMix {
    /// Weight of the KD term, in [0, 1]; 0 is SFT.
    pub alpha: f64,
    /// Softmax temperature T of both distributions in the KD term.
    pub temperature: f64,
}

impl KdMix {
    /// SFT: cross-entropy alone.
    pub const SFT: KdMix = KdMix {
        alpha: 0.0,
        temperature: 1.0,
    };

    /// The loss from CE and a KD term already multiplied by T² (as every path sums it).
    pub fn loss(self, ce: f64, kd_t2: f64) -> f64 {
        (1.0 - self.alpha) * ce + self.alpha * kd_t2
    }

    /// [`Self::loss`] on tensors (the composed path).
    pub fn loss_tensors(self, ce: &Tensor, kd_t2: &Tensor) -> Result<Tensor> {
        (ce * (1.0 - self.alpha))? + (kd_t2 * self.alpha)?
    }

    /// A fused row's gradient weights on the student logits z, in the f32 the kernels use: CE's
    /// `1 − α`, and KD's `α·T²·∂(z/T)/∂z = α·T` (T as `1 / (1/T)` in f32, as the rows see it).
    pub fn grad_weights(self) -> (f32, f32) {
        let alpha = self.alpha as f32;
        let temp = 1.0 / self.inv_t();
        (1.0 - alpha, alpha * temp)
    }

    /// `1/T` in f32.
    pub fn inv_t(self) -> f32 {
        (1.0 / self.temperature) as f32
    }
}

/// `log_softmax` over the last dim, differentiable; the max shift carries no gradient (the
/// result does not depend on it).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `log(wa·eᵃ + wb·eᵇ)` elementwise, stable; weights in (0, 1).
fn log_mix(a: &Tensor, wa: f64, b: &Tensor, wb: f64) -> Result<Tensor> {
    let a = (a + wa.ln())?;
    let b = (b + wb.ln())?;
    let m = a.maximum(&b)?.detach();
    let s = (a.broadcast_sub(&m)?.exp()? + b.broadcast_sub(&m)?.exp()?)?;
    m + s.log()?
}

/// Σ over all elements of `exp(lp) · (lp − lq)`, i.e. Σ_rows KL(p‖q) from log-probs.
fn kl_sum(lp: &Tensor, lq: &Tensor) -> Result<Tensor> {
    (lp.exp()? * (lp - lq)?)?.sum_all()
}

/// Σ over rows of the divergence between teacher and student at temperature `t`, times t².
/// Returns a scalar f32 tensor with gradient towards `student`.
pub fn divergence_sum(
    student: &Tensor,
    teacher: &Tensor,
    div: Divergence,
    temperature: f64,
) -> Result<Tensor> {
    let scale = |x: &Tensor| -> Result<Tensor> {
        if temperature == 1.0 {
            x.to_dtype(DType::F32)
        } else {
            x.to_dtype(DType::F32)? / temperature
        }
    };
    let ls = log_softmax(&scale(student)?)?; // (N, V) log q
    let lt = log_softmax(&scale(&teacher.detach())?)?.detach(); // (N, V) log p
    let value = match div {
        Divergence::ForwardKl
        | Divergence::Jsd { beta: 0.0 }
        | Divergence::SkewForwardKl { alpha: 0.0 } => kl_sum(&lt, &ls)?,
        Divergence::ReverseKl
        | Divergence::Jsd { beta: 1.0 }
        | Divergence::SkewReverseKl { alpha: 0.0 } => kl_sum(&ls, &lt)?,
        Divergence::Jsd { beta } => {
            let lm = log_mix(&lt, beta, &ls, 1.0 - beta)?;
            ((kl_sum(&lt, &lm)? * beta)? + (kl_sum(&ls, &lm)? * (1.0 - beta))?)?
        }
        Divergence::SkewForwardKl { alpha } => {
            let lm = log_mix(&lt, alpha, &ls, 1.0 - alpha)?;
            kl_sum(&lt, &lm)?
        }
        Divergence::SkewReverseKl { alpha } => {
            let lm = log_mix(&lt, 1.0 - alpha, &ls, alpha)?;
            kl_sum(&ls, &lm)?
        }
        Divergence::Tvd => ((lt.exp()? - ls.exp()?)?.abs()?.sum_all()? * 0.5)?,
    };
    value * (temperature * temperature)
}

/// Σ over rows of −log q(target). `targets (N)` u32.
pub fn cross_entropy_sum(student: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let ls = log_softmax(student)?; // (N, V)
    let picked = ls.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    picked.sum_all()?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn logits(seed: u64, n: usize, v: usize) -> Tensor {
        // Deterministic pseudo-random values in [-3, 3).
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n * v)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            })
            .collect();
        Tensor::from_vec(data, (n, v), &Device::Cpu).unwrap()
    }

    const ALL: [Divergence; 8] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Jsd { beta: 0.1 },
        Divergence::SkewForwardKl { alpha: 0.1 },
        Divergence::SkewReverseKl { alpha: 0.3 },
        Divergence::Tvd,
        Divergence::Jsd { beta: 0.9 },
    ];

    #[test]
    fn divergence_of_a_distribution_with_itself_is_zero() {
        let x = logits(1, 4, 11);
        for d in ALL {
            for t in [1.0, 2.0] {
                let v = divergence_sum(&x, &x, d, t)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(v.abs() < 1e-5, "{d} T={t}: {v}");
            }
        }
    }

    #[test]
    fn hand_computed_two_token_case() {
        // p = softmax([0, ln 3]) = (1/4, 3/4); q = softmax([0, 0]) = (1/2, 1/2).
        let t = Tensor::new(&[[0f32, 3f32.ln()]], &Device::Cpu).unwrap();
        let s = Tensor::new(&[[0f32, 0.0]], &Device::Cpu).unwrap();
        let (p, q) = ([0.25f64, 0.75], [0.5f64, 0.5]);
        let kl = |a: [f64; 2], b: [f64; 2]| a[0] * (a[0] / b[0]).ln() + a[1] * (a[1] / b[1]).ln();
        let mix = |wa: f64, a: [f64; 2], b: [f64; 2]| {
            [wa * a[0] + (1.0 - wa) * b[0], wa * a[1] + (1.0 - wa) * b[1]]
        };
        let m = mix(0.5, p, q);
        let cases = [
            (Divergence::ForwardKl, kl(p, q)),
            (Divergence::ReverseKl, kl(q, p)),
            (
                Divergence::Jsd { beta: 0.5 },
                0.5 * kl(p, m) + 0.5 * kl(q, m),
            ),
            (Divergence::Jsd { beta: 0.0 }, kl(p, q)),
            (Divergence::Jsd { beta: 1.0 }, kl(q, p)),
            (
                Divergence::SkewForwardKl { alpha: 0.1 },
                kl(p, mix(0.1, p, q)),
            ),
            (
                Divergence::SkewReverseKl { alpha: 0.1 },
                kl(q, mix(0.9, p, q)),
            ),
            (Divergence::Tvd, 0.25),
        ];
        for (d, want) in cases {
            let got = divergence_sum(&s, &t, d, 1.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((got as f64 - want).abs() < 1e-6, "{d}: {got} vs {want}");
        }
        // Temperature 2: logits halved, value times 4.
        let t2 = Tensor::new(&[[0f32, 2.0 * 3f32.ln()]], &Device::Cpu).unwrap();
        let got = divergence_sum(&s, &t2, Divergence::ForwardKl, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got as f64 - 4.0 * kl(p, q)).abs() < 1e-6, "{got}");
        // Cross-entropy of target 1 under q: ln 2.
        let ce = cross_entropy_sum(&s, &Tensor::new(&[1u32], &Device::Cpu).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ce as f64 - 2f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, v) = (3, 7);
        let t = logits(7, n, v);
        let s0 = logits(9, n, v);
        let targets = Tensor::new(&[1u32, 4, 6], &Device::Cpu).unwrap();
        for d in ALL {
            for temp in [1.0, 1.7] {
                let f = |s: &Tensor| -> Tensor {
                    (divergence_sum(s, &t, d, temp).unwrap()
                        + cross_entropy_sum(s, &targets).unwrap())
                    .unwrap()
                };
                let s = Var::from_tensor(&s0).unwrap();
                let g = f(s.as_tensor())
                    .backward()
                    .unwrap()
                    .get(s.as_tensor())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let base = s0.to_vec2::<f32>().unwrap();
                let h = 1e-2f32;
                for i in 0..n {
                    for j in 0..v {
                        let at = |delta: f32| {
                            let mut x = base.clone();
                            x[i][j] += delta;
                            let xt = Tensor::new(x, &Device::Cpu).unwrap();
                            f(&xt)
                                .to_dtype(DType::F64)
                                .unwrap()
                                .to_scalar::<f64>()
                                .unwrap()
                        };
                        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                        let an = g[i][j] as f64;
                        assert!(
                            (fd - an).abs() < 2e-3 + 1e-2 * an.abs(),
                            "{d} T={temp} [{i},{j}]: autograd {an} vs fd {fd}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn parse_names_and_ranges() {
        assert_eq!(
            Divergence::parse("jsd:0.3").unwrap(),
            Divergence::Jsd { beta: 0.3 }
        );
        assert_eq!(Divergence::parse("fkl").unwrap(), Divergence::ForwardKl);
        assert!(Divergence::parse("jsd:1.5").unwrap_err().contains("[0, 1]"));
        assert!(Divergence::parse("skew_forward_kl:1").is_err());
        assert!(
            Divergence::parse("mse")
                .unwrap_err()
                .contains("unknown loss")
        );
        for d in ALL {
            assert_eq!(Divergence::parse(&d.to_string()).unwrap(), d);
        }
    }
}
