//! Word-level diff of an edited text against the original (the `similar` crate), as spans the
//! page renders as escaped text inside `<del>`/`<ins>`.

use serde::Serialize;
use similar::{ChangeTag, TextDiff};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Span {
    /// `"eq"`, `"del"` (only in the original) or `"ins"` (only in the edit).
    pub op: &'static str,
    pub text: String,
}

/// `original` → `edited` as spans; neighbouring spans of the same kind are merged.
pub fn word_diff(original: &str, edited: &str) -> Vec<Span> {
    let diff = TextDiff::configure()
        .timeout(std::time::Duration::from_millis(200))
        .diff_words(original, edited);
    let mut spans: Vec<Span> = Vec::new();
    for change in diff.iter_all_changes() {
        let op = match change.tag() {
            ChangeTag::Equal => "eq",
            ChangeTag::Delete => "del",
            ChangeTag::Insert => "ins",
        };
        match spans.last_mut() {
            Some(last) if last.op == op => last.text.push_str(change.value()),
            _ => spans.push(Span {
                op,
                text: change.value().to_string(),
            }),
        }
    }
    spans
}

/// Whether the diff changes anything.
pub fn changed(spans: &[Span]) -> bool {
    spans.iter().any(|s| s.op != "eq")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(spans: &[Span]) -> String {
        spans
            .iter()
            .map(|s| match s.op {
                "del" => format!("[-{}-]", s.text),
                "ins" => format!("{{+{}+}}", s.text),
                _ => s.text.clone(),
            })
            .collect()
    }

    #[test]
    fn words_inserted_deleted_and_replaced() {
        let d = word_diff("buy the stock now", "sell the stock later today");
        assert_eq!(
            render(&d),
            "[-buy-]{+sell+} the stock [-now-]{+later today+}"
        );
        // Both sides can be rebuilt from the spans.
        let side = |skip: &str| -> String {
            d.iter()
                .filter(|s| s.op != skip)
                .map(|s| s.text.as_str())
                .collect()
        };
        assert_eq!(side("ins"), "buy the stock now");
        assert_eq!(side("del"), "sell the stock later today");
        assert!(changed(&d));
        assert!(!changed(&word_diff("same text", "same text")));
        assert_eq!(render(&word_diff("", "new")), "{+new+}");
    }
}
