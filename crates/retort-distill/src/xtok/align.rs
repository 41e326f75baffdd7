//! Aligning two tokenizations of the same text by byte offsets: the smallest groups of tokens
//! whose byte boundaries coincide on both sides.
//!
//! After TRL's GOLD (`ULDLoss._align_by_byte_offsets`), which walks both offset lists and closes a
//! group where both sides end on the same byte. Walking by token ends alone breaks on tokens
//! that share bytes — byte-fallback pieces of one multi-byte character each carry the whole
//! character's range, and zero-width tokens (an added BOS, a special marker) carry none — so here
//! each side first lists its *cuts*: byte positions `b` after token `i` such that tokens `..=i`
//! cover nothing at or beyond `b` and tokens `i + 1..` nothing before it. A group boundary is a
//! byte that is a cut on both sides; several cuts at one byte (zero-width tokens) keep the last,
//! so a zero-width token joins the group before it.
//!
//! Offsets are byte ranges `(start, end)` in one shared coordinate system (here: relative to the
//! start of an assistant turn's content), in token order.

use std::collections::BTreeMap;
use std::ops::Range;

/// One aligned span: student tokens `student` and teacher tokens `teacher` (index ranges into
/// the offset lists given to [`align`]) covering the same bytes `bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub student: Range<usize>,
    pub teacher: Range<usize>,
    pub bytes: Range<usize>,
}

impl Group {
    /// One token on each side: the two per-token distributions can be compared directly.
    pub fn is_one_to_one(&self) -> bool {
        self.student.len() == 1 && self.teacher.len() == 1
    }
}

/// Byte position → number of tokens before the cut (the last such count for that byte).
fn cuts(offsets: &[(usize, usize)]) -> BTreeMap<usize, usize> {
    let n = offsets.len();
    // suffix_min_start[i] = min start of tokens i.., usize::MAX past the end.
    let mut suffix_min_start = vec![usize::MAX; n + 1];
    for i in (0..n).rev() {
        suffix_min_start[i] = suffix_min_start[i + 1].min(offsets[i].0);
    }
    let mut out = BTreeMap::new();
    let first = offsets.first().map_or(0, |o| o.0.min(o.1));
    if suffix_min_start[0] >= first {
        out.insert(first, 0);
    }
    let mut max_end = 0;
    for (i, &(s, e)) in offsets.iter().enumerate() {
        max_end = max_end.max(e).max(s);
        if suffix_min_start[i + 1] >= max_end {
            out.insert(max_end, i + 1);
        }
    }
    out
}

/// Groups `student` and `teacher` tokens into the smallest spans with common byte boundaries.
///
/// Every token belongs to at most one group, groups never overlap and come in order. Tokens
/// before the first common boundary (a zero-width BOS on one side) or after the last (text only
/// one side covers, e.g. one side cut at `max_len`) are in no group and counted in
/// [`Alignment`]. A span that only one side has tokens for (the other dropped its bytes) joins
/// the next group.
pub fn align(student: &[(usize, usize)], teacher: &[(usize, usize)]) -> Alignment {
    let (cs, ct) = (cuts(student), cuts(teacher));
    let mut groups = Vec::new();
    let mut first: Option<(usize, usize)> = None;
    let mut prev: Option<(usize, usize, usize)> = None; // (byte, student idx, teacher idx)
    for (&byte, &si) in &cs {
        let Some(&ti) = ct.get(&byte) else { continue };
        match prev {
            None => {
                first = Some((si, ti));
                prev = Some((byte, si, ti));
            }
            Some((pb, ps, pt)) if si > ps && ti > pt => {
                groups.push(Group {
                    student: ps..si,
                    teacher: pt..ti,
                    bytes: pb..byte,
                });
                prev = Some((byte, si, ti));
            }
            Some(_) => {} // one side has no tokens here yet: the span joins the next group
        }
    }
    let (lead_s, lead_t) = first.unwrap_or((student.len(), teacher.len()));
    let (end_s, end_t) = prev.map_or((student.len(), teacher.len()), |(_, s, t)| (s, t));
    Alignment {
        groups,
        unaligned_student: lead_s + (student.len() - end_s),
        unaligned_teacher: lead_t + (teacher.len() - end_t),
    }
}

/// The groups of one text and what was left out of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Alignment {
    pub groups: Vec<Group>,
    /// Student tokens in no group (one-sided text or tails).
    pub unaligned_student: usize,
    pub unaligned_teacher: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Offsets of `text` split at the byte positions `at` (sorted, inside the text).
    fn split(text: &str, at: &[usize]) -> Vec<(usize, usize)> {
        let mut b: Vec<usize> = std::iter::once(0).chain(at.iter().copied()).collect();
        b.push(text.len());
        b.windows(2).map(|w| (w[0], w[1])).collect()
    }

    fn groups(a: &Alignment) -> Vec<(Range<usize>, Range<usize>)> {
        a.groups
            .iter()
            .map(|g| (g.student.clone(), g.teacher.clone()))
            .collect()
    }

    #[test]
    fn identical_tokenizations_align_one_to_one() {
        let o = split("the cat sat", &[3, 7]);
        let a = align(&o, &o);
        assert_eq!(a.groups.len(), 3);
        assert!(a.groups.iter().all(Group::is_one_to_one));
        assert_eq!(a.groups[1].bytes, 3..7);
        assert_eq!((a.unaligned_student, a.unaligned_teacher), (0, 0));
    }

    #[test]
    fn digits_split_differently_group_to_the_common_boundary() {
        // "12345 apples": student "123" "45" " apples"; teacher "1" "2" "3" "4" "5" " apples".
        let text = "12345 apples";
        let s = split(text, &[3, 5]);
        let t = split(text, &[1, 2, 3, 4, 5]);
        let a = align(&s, &t);
        assert_eq!(groups(&a), vec![(0..1, 0..3), (1..2, 3..5), (2..3, 5..6)]);
        assert_eq!(a.groups[0].bytes, 0..3);
    }

    #[test]
    fn byte_fallback_pieces_of_one_character_stay_together() {
        // "a€b": '€' is 3 bytes (1..4). Student: byte-fallback, three tokens each carrying the
        // character's whole range; teacher: one token for it.
        let s = vec![(0, 1), (1, 4), (1, 4), (1, 4), (4, 5)];
        let t = vec![(0, 1), (1, 4), (4, 5)];
        let a = align(&s, &t);
        assert_eq!(groups(&a), vec![(0..1, 0..1), (1..4, 1..2), (4..5, 2..3)]);
        // The same with the teacher merging the character with the next letter.
        let t2 = vec![(0, 1), (1, 5)];
        assert_eq!(groups(&align(&s, &t2)), vec![(0..1, 0..1), (1..5, 1..2)]);
    }

    #[test]
    fn a_zero_width_token_joins_the_group_before_it() {
        // Teacher ends the turn with a zero-width marker after "hi".
        let s = vec![(0, 2)];
        let t = vec![(0, 2), (2, 2)];
        let a = align(&s, &t);
        assert_eq!(groups(&a), vec![(0..1, 0..2)]);
        // A zero-width token first (BOS on one side only) has nothing before it to join: it is
        // left out, the rest aligns.
        let t = vec![(0, 0), (0, 1), (1, 2)];
        let s = vec![(0, 1), (1, 2)];
        let a = align(&s, &t);
        assert_eq!(a.groups.len(), 2, "{a:?}");
        assert_eq!(a.groups[0].teacher, 1..2);
        assert_eq!((a.unaligned_student, a.unaligned_teacher), (0, 1));
    }

    #[test]
    fn whitespace_attached_to_different_sides_groups_the_words() {
        // "a b": student "a " "b", teacher "a" " b": the only common cut inside is none.
        let s = vec![(0, 2), (2, 3)];
        let t = vec![(0, 1), (1, 3)];
        assert_eq!(groups(&align(&s, &t)), vec![(0..2, 0..2)]);
    }

    #[test]
    fn spans_that_never_align_make_one_group() {
        let text = "abcdefgh";
        let s = split(text, &[1, 3, 5, 7]);
        let t = split(text, &[2, 4, 6]);
        assert_eq!(groups(&align(&s, &t)), vec![(0..5, 0..4)]);
    }

    #[test]
    fn text_on_one_side_only_is_left_out_and_counted() {
        // The teacher's text stops at byte 4 (its turn was cut at max_len).
        let s = split("abcdefgh", &[2, 4, 6]);
        let t = split("abcd", &[2]);
        let a = align(&s, &t);
        assert_eq!(groups(&a), vec![(0..1, 0..1), (1..2, 1..2)]);
        assert_eq!((a.unaligned_student, a.unaligned_teacher), (2, 0));
        assert!(align(&s, &[]).groups.is_empty());
    }

    /// Random texts (ASCII, digits, spaces, 2–4-byte characters), each side tokenized at random
    /// character boundaries, some characters as byte-fallback pieces. Every group covers the
    /// same bytes on both sides, groups partition both sides in order, and no group holds a
    /// boundary common to both (minimality).
    #[test]
    fn random_tokenizations_partition_both_sides_minimally() {
        const CHARS: &[&str] = &["a", "b", " ", "7", "\n", "é", "€", "𝄞", "ß"];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..500 {
            let text: String = (0..rng.random_range(1..40))
                .map(|_| CHARS[rng.random_range(0..CHARS.len())])
                .collect();
            let bounds: Vec<usize> = (1..text.len())
                .filter(|&b| text.is_char_boundary(b))
                .collect();
            let tokenize = |rng: &mut ChaCha8Rng| -> Vec<(usize, usize)> {
                let at: Vec<usize> = bounds
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.4))
                    .collect();
                let mut out = Vec::new();
                for (s, e) in split(&text, &at) {
                    // A one-character multi-byte token may become byte-fallback pieces.
                    if e - s > 1 && text[s..e].chars().count() == 1 && rng.random_bool(0.5) {
                        out.extend(std::iter::repeat_n((s, e), e - s));
                    } else {
                        out.push((s, e));
                    }
                }
                out
            };
            let (s, t) = (tokenize(&mut rng), tokenize(&mut rng));
            let a = align(&s, &t);
            assert_eq!((a.unaligned_student, a.unaligned_teacher), (0, 0), "{case}");
            let (mut ns, mut nt, mut byte) = (0, 0, 0);
            for g in &a.groups {
                assert_eq!(
                    (g.student.start, g.teacher.start),
                    (ns, nt),
                    "{case}: {a:?}"
                );
                assert!(!g.student.is_empty() && !g.teacher.is_empty());
                let cover = |o: &[(usize, usize)]| {
                    (o.iter().map(|x| x.0).min(), o.iter().map(|x| x.1).max())
                };
                let want = (Some(g.bytes.start), Some(g.bytes.end));
                assert_eq!(cover(&s[g.student.clone()]), want, "{case}");
                assert_eq!(cover(&t[g.teacher.clone()]), want, "{case}");
                assert_eq!(g.bytes.start, byte);
                // Minimal: no byte inside the group is a cut on both sides.
                let (cs, ct) = (cuts(&s), cuts(&t));
                assert!(
                    !(g.bytes.start + 1..g.bytes.end)
                        .any(|b| cs.contains_key(&b) && ct.contains_key(&b)),
                    "{case}: {g:?} is not minimal"
                );
                (ns, nt, byte) = (g.student.end, g.teacher.end, g.bytes.end);
            }
            assert_eq!((ns, nt, byte), (s.len(), t.len(), text.len()), "{case}");
        }
    }
}
