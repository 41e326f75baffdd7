//! Which parsed candidates become inputs: per-field length and ending rules, a blocklist, and
//! the novelty filter — ROUGE-L F against every seed and every input kept so far (Self-Instruct's
//! rule). Verdicts depend only on the order candidates arrive in, so a rerun over the same
//! responses keeps the same inputs.

use retort_data::rouge;

use super::config::FilterConfig;
use super::parse::Record;

/// Why a candidate was not kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    TooShort(String),
    TooLong(String),
    Ending(String),
    Blocklisted(String),
    /// ROUGE-L above the threshold against a seed or a kept input.
    NearDuplicate,
}

impl Reject {
    /// A stable label for the funnel report.
    pub fn reason(&self) -> String {
        match self {
            Reject::TooShort(f) => format!("field `{f}` too short"),
            Reject::TooLong(f) => format!("field `{f}` too long"),
            Reject::Ending(f) => format!("field `{f}` breaks its ending rule"),
            Reject::Blocklisted(w) => format!("blocklisted `{w}`"),
            Reject::NearDuplicate => "near-duplicate (ROUGE-L)".into(),
        }
    }
}

/// The set of texts new candidates must differ from.
pub struct Novelty {
    threshold: f64,
    pool: Vec<Vec<String>>,
}

/// The text a record is compared by: its fields in order, joined.
pub fn record_text(r: &Record, fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| r.get(f).map_or("", String::as_str))
        .collect::<Vec<_>>()
        .join(" \n ")
}

impl Novelty {
    pub fn new(threshold: f64) -> Novelty {
        Novelty {
            threshold,
            pool: vec![],
        }
    }

    /// Highest ROUGE-L F of `text` against the pool.
    pub fn max_similarity(&self, text: &str) -> f64 {
        let t = rouge::tokens(text);
        self.pool
            .iter()
            .map(|p| rouge::f_measure(&t, p))
            .fold(0.0, f64::max)
    }

    /// Keep `text` if novel (adding it to the pool); `false` if a near-duplicate.
    pub fn admit(&mut self, text: &str) -> bool {
        if self.max_similarity(text) > self.threshold {
            return false;
        }
        self.pool.push(rouge::tokens(text));
        true
    }

    /// Add without checking (seeds).
    pub fn add(&mut self, text: &str) {
        self.pool.push(rouge::tokens(text));
    }
}

/// The rule-based checks (everything but novelty).
pub fn check(r: &Record, fields: &[String], cfg: &FilterConfig) -> Result<(), Reject> {
    for f in fields {
        let v = r.get(f).map_or("", |s| s.trim());
        let chars = v.chars().count();
        if chars < cfg.min_chars {
            return Err(Reject::TooShort(f.clone()));
        }
        if chars > cfg.max_chars {
            return Err(Reject::TooLong(f.clone()));
        }
    }
    for rule in &cfg.field {
        let v = r.get(&rule.name).map_or("", |s| s.trim());
        let ok_end =
            rule.ends_with.is_empty() || rule.ends_with.iter().any(|e| v.ends_with(e.as_str()));
        let bad_end = rule.not_ends_with.iter().any(|e| v.ends_with(e.as_str()));
        if !ok_end || bad_end {
            return Err(Reject::Ending(rule.name.clone()));
        }
    }
    let all = record_text(r, fields).to_lowercase();
    if let Some(w) = cfg
        .blocklist
        .iter()
        .find(|w| all.contains(&w.to_lowercase()))
    {
        return Err(Reject::Blocklisted(w.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::config::FieldRule;

    fn rec(c: &str, q: &str) -> Record {
        [
            ("user_context".to_string(), c.to_string()),
            ("question".to_string(), q.to_string()),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn rules_name_the_field_and_novelty_uses_the_threshold() {
        let fields = vec!["user_context".to_string(), "question".to_string()];
        let cfg = FilterConfig {
            min_chars: 5,
            max_chars: 40,
            blocklist: vec!["Click HERE".into()],
            field: vec![FieldRule {
                name: "question".into(),
                ends_with: vec!["?".into()],
                not_ends_with: vec![],
            }],
            ..Default::default()
        };
        assert_eq!(
            check(&rec("I am 30 years old.", "Buy bonds?"), &fields, &cfg),
            Ok(())
        );
        assert_eq!(
            check(&rec("I am", "Buy bonds?"), &fields, &cfg),
            Err(Reject::TooShort("user_context".into()))
        );
        assert_eq!(
            check(&rec("I am 30 years old.", "Buy bonds now."), &fields, &cfg),
            Err(Reject::Ending("question".into()))
        );
        assert_eq!(
            check(&rec("I am 30, click here", "Buy bonds?"), &fields, &cfg),
            Err(Reject::Blocklisted("Click HERE".into()))
        );
        assert_eq!(
            check(&rec(&"x".repeat(41), "Buy bonds?"), &fields, &cfg),
            Err(Reject::TooLong("user_context".into()))
        );

        let mut n = Novelty::new(0.7);
        n.add("I am 62 and plan to retire. Should I move my savings into index funds?");
        // 12 of 13 tokens shared: F ≈ 0.92 > 0.7.
        assert!(!n.admit("I am 63 and plan to retire. Should I move my savings into index funds?"));
        assert!(n.admit("I just inherited a house. Should I sell it and buy shares?"));
        assert!(
            !n.admit("I just inherited a house. Should I sell it and buy shares?"),
            "kept inputs join the pool"
        );
        assert_eq!(n.max_similarity("completely unrelated words here"), 0.0);
    }
}
