//! Exact match of generated answers against references, for data with short targets
//! (classification labels, short answers); long answers are scored with ROUGE-L
//! (`retort_data::rouge`, MiniLLM's metric).

/// Lower-case, trim, collapse whitespace, and strip trailing `.`, `!`, `?` and quotes: SQuAD-style
/// normalisation light enough not to merge different answers.
pub fn normalize(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_end_matches(['.', '!', '?', '"', '\''])
        .trim()
        .to_lowercase()
}

/// Whether `generated` equals `reference` after [`normalize`].
pub fn exact_match(generated: &str, reference: &str) -> bool {
    normalize(generated) == normalize(reference)
}

/// References count as short when their median is at most this many words: exact match is
/// reported then, and not for long free-text answers, where it is always ≈ 0.
pub const SHORT_TARGET_WORDS: usize = 8;

/// Whether the references are short enough for exact match to mean something.
pub fn short_targets(references: &[&str]) -> bool {
    if references.is_empty() {
        return false;
    }
    let mut words: Vec<usize> = references
        .iter()
        .map(|r| r.split_whitespace().count())
        .collect();
    words.sort_unstable();
    words[words.len() / 2] <= SHORT_TARGET_WORDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_and_matches() {
        assert!(exact_match("  Positive.\n", "positive"));
        assert!(exact_match("New   York!", "new york"));
        assert!(!exact_match("New York City", "New York"));
        assert!(!exact_match("positive", "negative"));
        assert!(exact_match("", ""));
        assert!(short_targets(&[
            "yes",
            "no",
            "a longer answer of several words here"
        ]));
        assert!(!short_targets(&[
            "one two three four five six seven eight nine ten"
        ]));
        assert!(!short_targets(&[]));
    }
}
