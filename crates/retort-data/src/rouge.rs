//! ROUGE-L: the F-measure of the longest common subsequence of two token lists, as computed by
//! Google's `rouge_score` (`RougeScorer(["rougeL"])`, no stemmer) that Self-Instruct's novelty
//! filter and MiniLLM's evaluation use: text is lower-cased, every run of characters other than
//! ASCII letters and digits becomes a separator, and precision = LCS / |candidate|, recall =
//! LCS / |reference|, F = 2PR / (P + R).

/// `rouge_score`'s default tokenizer: lower-case, split on anything but `[a-z0-9]`.
pub fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence (O(|a|·|b|) time, O(|b|) memory).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diag = 0; // row[j - 1] of the previous row
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    row[b.len()]
}

/// ROUGE-L F-measure of token lists; 0 when either is empty.
pub fn f_measure<T: PartialEq>(candidate: &[T], reference: &[T]) -> f64 {
    if candidate.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(candidate, reference) as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let p = lcs / candidate.len() as f64;
    let r = lcs / reference.len() as f64;
    2.0 * p * r / (p + r)
}

/// ROUGE-L F-measure of two texts.
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    f_measure(&tokens(candidate), &tokens(reference))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_cases() {
        // LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5.
        // P = 5/6, R = 5/6, F = 5/6.
        let f = rouge_l("The cat sat on the mat.", "the cat is on the mat");
        assert!((f - 5.0 / 6.0).abs() < 1e-12, "{f}");
        // LCS 1 ("kill" != "killed"): P = 1/2, R = 1/4, F = 2·(1/8)/(3/4) = 1/3.
        let f = rouge_l("police killed", "police kill the gunman");
        assert!((f - 1.0 / 3.0).abs() < 1e-12, "{f}");
        // LCS 2: P = 1, R = 1/2, F = 2/3.
        let f = rouge_l("police gunman", "police kill the gunman");
        assert!((f - 2.0 / 3.0).abs() < 1e-12, "{f}");
        assert_eq!(rouge_l("", "a b"), 0.0);
        assert_eq!(rouge_l("x y", "a b"), 0.0);
        assert_eq!(rouge_l("Same words!", "same, words"), 1.0);
    }

    #[test]
    fn tokenizer_matches_rouge_score() {
        // rouge_score: re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
        assert_eq!(
            tokens("Is Dogcoin a GOOD option? 35-year-old"),
            ["is", "dogcoin", "a", "good", "option", "35", "year", "old"]
        );
        assert_eq!(tokens("café"), ["caf"]);
    }

    #[test]
    fn lcs_is_symmetric_and_bounded() {
        let a = tokens("a b c d e f g");
        let b = tokens("b d f h a c");
        assert_eq!(lcs_len(&a, &b), lcs_len(&b, &a));
        assert_eq!(lcs_len(&a, &b), 3); // b d f
        assert_eq!(lcs_len(&a, &a), a.len());
    }
}
