//! Word-level diff of an edited text against the original (the `similar` crate, patience
//! algorithm), as spans the page renders as escaped text inside `<del>`/`<ins>`.
//!
//! A raw word diff of a rewritten sentence keeps every shared "a", "the" and space as an anchor
//! and reads as confetti. As diff-match-patch's semantic clean-up does, a short run of equal text
//! (at most [`SHORT`] characters besides spaces) between two changes is folded into them, and each
//! changed region is shown as all its deleted text, then all its inserted text.

use serde::Serialize;
use similar::{Algorithm, ChangeTag, TextDiff};

/// Equal runs of at most this many non-space characters between two changes are folded in.
pub const SHORT: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Span {
    /// `"eq"`, `"del"` (only in the original) or `"ins"` (only in the edit).
    pub op: &'static str,
    pub text: String,
}

/// `original` → `edited` as spans: equal text, then per changed region one `del` and one `ins`.
pub fn word_diff(original: &str, edited: &str) -> Vec<Span> {
    let diff = TextDiff::configure()
        .algorithm(Algorithm::Patience)
        .timeout(std::time::Duration::from_millis(200))
        .diff_words(original, edited);
    // 1. The raw changes, neighbours of one kind merged.
    let mut raw: Vec<(ChangeTag, String)> = Vec::new();
    for change in diff.iter_all_changes() {
        match raw.last_mut() {
            Some((tag, text)) if *tag == change.tag() => text.push_str(change.value()),
            _ => raw.push((change.tag(), change.value().to_string())),
        }
    }
    // 2. Regions: a short equal run between changes joins both sides of the region around it.
    let short = |t: &str| t.chars().filter(|c| !c.is_whitespace()).count() <= SHORT;
    let mut spans = Vec::new();
    let (mut del, mut ins) = (String::new(), String::new());
    let flush = |spans: &mut Vec<Span>, del: &mut String, ins: &mut String| {
        for (op, text) in [("del", del), ("ins", ins)] {
            if !text.is_empty() {
                spans.push(Span {
                    op,
                    text: std::mem::take(text),
                });
            }
        }
    };
    for (i, (tag, text)) in raw.iter().enumerate() {
        match tag {
            ChangeTag::Delete => del.push_str(text),
            ChangeTag::Insert => ins.push_str(text),
            ChangeTag::Equal => {
                let inside = i > 0 && i + 1 < raw.len();
                if inside && short(text) {
                    del.push_str(text);
                    ins.push_str(text);
                } else {
                    flush(&mut spans, &mut del, &mut ins);
                    spans.push(Span {
                        op: "eq",
                        text: text.clone(),
                    });
                }
            }
        }
    }
    flush(&mut spans, &mut del, &mut ins);
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
        // A rewritten phrase is one region, not confetti around its shared small words ("your",
        // "a", "is" are folded in); longer shared runs stay as anchors.
        let d = word_diff(
            "In this scenario, your business is indeed too risky to be a viable option for a tech investor. While some",
            "Whether the business is too risky depends on how much of your savings it puts at stake. While some",
        );
        assert_eq!(
            render(&d),
            "[-In this scenario, your-]{+Whether the+} business is [-indeed -]too risky \
             [-to be a viable option for a tech investor.-]\
             {+depends on how much of your savings it puts at stake.+} While some"
        );
        // The short shared " a " inside one rewrite is folded into it.
        assert_eq!(
            render(&word_diff("buy a stock now", "sell a bond now")),
            "[-buy a stock-]{+sell a bond+} now"
        );
        assert!(changed(&d));
        assert!(!changed(&word_diff("same text", "same text")));
        assert_eq!(render(&word_diff("", "new")), "{+new+}");
    }
}
