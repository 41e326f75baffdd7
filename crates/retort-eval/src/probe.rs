//! `retort probe`: before training, is token-level KD likely to beat SFT on this data?
//!
//! The probe scores teacher and student on a held-out slice of the user's data (teacher-forced on
//! the gold answers: each model's NLL, KL(teacher‖student), top-1 agreement, teacher entropy) and
//! turns the numbers into a verdict with the reasons, in plain words. The rules follow the
//! findings of "Understanding Knowledge Distillation in Post-Training" and our own measurements;
//! they are rules of thumb, stated with their thresholds so a user can weigh them:
//!
//! 1. **Headroom.** KD moves the student towards the teacher's distribution. If the teacher is no
//!    better than the student at predicting the gold answers (teacher NLL ≥ student NLL −
//!    [`MIN_HEADROOM`]), there is nothing to transfer: KD is unlikely to help; SFT, or a stronger
//!    teacher.
//! 2. **Data size** (findings 1–2). With few examples (< [`SMALL_DATA`]) the teacher's dense
//!    targets add information SFT's one-hot targets lack, and KD tends to win; with many
//!    (≥ [`LARGE_DATA`]) the gold data alone teaches most of it and the edge fades.
//! 3. **A much stronger teacher** (finding 3): with headroom ≥ [`LARGE_HEADROOM`] nats/token the
//!    edge can survive large data.
//! 4. **Soft targets.** A teacher whose entropy on the answers is below [`LOW_ENTROPY`] nats is
//!    nearly one-hot: its targets add little beyond its argmax (KD ≈ SFT on its own tokens).
//! 5. **A broken student.** A student more than [`FAR`] nats/token worse than the teacher (a
//!    freshly pruned one, say) is being repaired, not adapted: KD's early edge there is a recovery
//!    effect; heal it first with a general distillation stage on broad data.

use serde::Serialize;

use crate::tokens::TokenMeans;

/// Teacher NLL must be at least this much below the student's (nats/token) for KD to have
/// something to transfer.
pub const MIN_HEADROOM: f64 = 0.05;
/// Headroom (nats/token) from which the teacher counts as much stronger.
pub const LARGE_HEADROOM: f64 = 1.0;
/// Headroom below which a small-data edge is expected to be small.
pub const SOME_HEADROOM: f64 = 0.25;
/// Training examples below which data counts as scarce.
pub const SMALL_DATA: usize = 1_000;
/// Training examples from which data counts as plentiful.
pub const LARGE_DATA: usize = 5_000;
/// Teacher entropy (nats) below which its targets are nearly one-hot.
pub const LOW_ENTROPY: f64 = 0.5;
/// Student NLL this far above the teacher's (nats/token) means a student still being repaired.
pub const FAR: f64 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Likelihood {
    Likely,
    Possible,
    Unlikely,
}

impl Likelihood {
    pub fn as_str(self) -> &'static str {
        match self {
            Likelihood::Likely => "likely",
            Likelihood::Possible => "possible",
            Likelihood::Unlikely => "unlikely",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Whether KD is expected to beat SFT on this data with this teacher.
    pub kd_pays_off: Likelihood,
    /// Student NLL − teacher NLL on the gold answers (nats/token).
    pub headroom: f64,
    pub train_size: usize,
    /// One sentence per rule that fired, with its numbers.
    pub reasons: Vec<String>,
}

/// The verdict for `train_size` training examples given the held-out means of the student scored
/// against the teacher (`m.teacher_nll` etc. must be present).
pub fn verdict(m: &TokenMeans, train_size: usize) -> Verdict {
    let t_nll = m.teacher_nll.unwrap_or(f64::NAN);
    let headroom = m.nll - t_nll;
    let mut reasons = Vec::new();
    let kd_pays_off = if headroom.is_nan() || headroom < MIN_HEADROOM {
        reasons.push(format!(
            "The teacher is no better than the student on your gold answers (NLL {t_nll:.3} vs \
             {:.3} nats/token): KD would pull the student towards a model that does not know \
             more. Use SFT, or a stronger teacher.",
            m.nll
        ));
        Likelihood::Unlikely
    } else if headroom >= LARGE_HEADROOM {
        reasons.push(format!(
            "The teacher is much better than the student on your gold answers ({headroom:.2} \
             nats/token lower NLL: {t_nll:.3} vs {:.3}); a much stronger teacher keeps KD's edge \
             even as data grows.",
            m.nll
        ));
        Likelihood::Likely
    } else if train_size < SMALL_DATA && headroom >= SOME_HEADROOM {
        reasons.push(format!(
            "Data is scarce ({train_size} examples, < {SMALL_DATA}) and the teacher has headroom \
             ({headroom:.2} nats/token lower NLL): the teacher's full distributions carry \
             information the few one-hot targets lack, which is where KD beats SFT."
        ));
        Likelihood::Likely
    } else if train_size >= LARGE_DATA {
        reasons.push(format!(
            "Data is plentiful ({train_size} examples, ≥ {LARGE_DATA}) and the teacher's headroom \
             is modest ({headroom:.2} nats/token): the gold answers alone teach most of what KD \
             would; expect a small edge at most."
        ));
        Likelihood::Unlikely
    } else {
        reasons.push(format!(
            "The teacher has some headroom ({headroom:.2} nats/token lower NLL) with \
             {train_size} examples: KD may help a little; run both (`retort experiment`) to know."
        ));
        Likelihood::Possible
    };
    if let Some(h) = m.teacher_entropy
        && h < LOW_ENTROPY
    {
        reasons.push(format!(
            "The teacher is nearly certain on these answers (entropy {h:.2} nats < {LOW_ENTROPY}): \
             its targets are close to one-hot, so KD adds little beyond training on its argmax."
        ));
    }
    if headroom > FAR {
        reasons.push(format!(
            "The student is {headroom:.1} nats/token behind the teacher (NLL {:.2}, agreement {}): \
             it is being repaired rather than adapted, and KD's edge there is a recovery effect. \
             Heal it first with a general distillation stage on broad data, then compare.",
            m.nll,
            m.agreement.map_or("—".into(), |a| format!("{a:.2}"))
        ));
    }
    Verdict {
        kd_pays_off,
        headroom,
        train_size,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn means(student: f64, teacher: f64, entropy: f64) -> TokenMeans {
        TokenMeans {
            tokens: 100,
            nll: student,
            perplexity: student.exp(),
            accuracy: 0.3,
            entropy: 2.0,
            teacher_nll: Some(teacher),
            kl: Some((student - teacher).max(0.0)),
            agreement: Some(0.5),
            teacher_entropy: Some(entropy),
        }
    }

    #[test]
    fn each_rule_fires_on_its_own_numbers() {
        // No headroom: unlikely, whatever the size.
        let v = verdict(&means(2.0, 2.0, 1.5), 50);
        assert_eq!(v.kd_pays_off, Likelihood::Unlikely);
        assert!(v.reasons[0].contains("no better"), "{:?}", v.reasons);
        // Scarce data with headroom: likely.
        let v = verdict(&means(3.0, 2.5, 1.5), 200);
        assert_eq!(v.kd_pays_off, Likelihood::Likely);
        assert!(v.reasons[0].contains("scarce"));
        assert!((v.headroom - 0.5).abs() < 1e-12);
        // Plentiful data, modest headroom: the edge fades.
        let v = verdict(&means(3.0, 2.5, 1.5), 20_000);
        assert_eq!(v.kd_pays_off, Likelihood::Unlikely);
        assert!(v.reasons[0].contains("plentiful"));
        // A much stronger teacher keeps the edge on plentiful data.
        let v = verdict(&means(4.0, 2.5, 1.5), 20_000);
        assert_eq!(v.kd_pays_off, Likelihood::Likely);
        // In between: possible.
        let v = verdict(&means(3.0, 2.9, 1.5), 2_000);
        assert_eq!(v.kd_pays_off, Likelihood::Possible);
        // Extra notes: a near one-hot teacher, a broken student.
        let v = verdict(&means(9.0, 2.7, 0.2), 100);
        assert_eq!(v.reasons.len(), 3, "{:?}", v.reasons);
        assert!(v.reasons[1].contains("nearly certain"));
        assert!(v.reasons[2].contains("repaired"));
        // Missing teacher numbers never claim a payoff.
        let mut m = means(3.0, 2.0, 1.0);
        m.teacher_nll = None;
        assert_eq!(verdict(&m, 10).kd_pays_off, Likelihood::Unlikely);
    }
}
