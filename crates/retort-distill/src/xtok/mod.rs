//! Cross-tokenizer distillation: a teacher whose tokenizer is not the student's.
//!
//! [`align`] groups the two tokenizations of the same answer into spans with common byte
//! boundaries; the losses compare the spans' probabilities.

pub mod align;
pub mod loss;
pub mod targets;

use retort_model::TurnTokens;

/// The aligned tokens of one conversation, as positions into each side's ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatAlignment {
    /// `(student positions, teacher positions)` of each content group, in order.
    pub groups: Vec<(Vec<usize>, Vec<usize>)>,
    /// Each turn's end-of-turn tokens, paired as one group when both sides have some.
    pub ends: Vec<(Vec<usize>, Vec<usize>)>,
    /// Content tokens in no group, per side.
    pub unaligned: (usize, usize),
    /// End-of-turn tokens: how many there are on each side (template tokens, outside the
    /// content alignment).
    pub template: (usize, usize),
}

impl ChatAlignment {
    /// Groups of one token on each side.
    pub fn one_to_one(&self) -> usize {
        self.groups
            .iter()
            .filter(|(s, t)| s.len() == 1 && t.len() == 1)
            .count()
    }
}

/// Aligns the trained turns of one conversation encoded by two tokenizers
/// ([`retort_model::Tokenizer::encode_chat_turns`]). `same(student_pos, teacher_pos)` says
/// whether two tokens are the same string: a group whose tokens are pairwise the same on both
/// sides (pieces of one character that both tokenizers split alike — always so for one
/// tokenizer on both sides) is split into one-token pairs.
pub fn align_chat(
    student: &[TurnTokens],
    teacher: &[TurnTokens],
    same: impl Fn(usize, usize) -> bool,
) -> crate::Result<ChatAlignment> {
    if student.len() != teacher.len() {
        return Err(crate::Error::invalid(
            format!(
                "the student's encoding has {} trained turns, the teacher's {}",
                student.len(),
                teacher.len()
            ),
            "both sides must encode the same conversation",
        ));
    }
    let mut out = ChatAlignment::default();
    for (s, t) in student.iter().zip(teacher) {
        let a = align::align(&s.offsets, &t.offsets);
        for g in &a.groups {
            let (sp, tp) = (
                &s.positions[g.student.clone()],
                &t.positions[g.teacher.clone()],
            );
            if sp.len() > 1 && sp.len() == tp.len() && sp.iter().zip(tp).all(|(&a, &b)| same(a, b))
            {
                out.groups
                    .extend(sp.iter().zip(tp).map(|(&a, &b)| (vec![a], vec![b])));
            } else {
                out.groups.push((sp.to_vec(), tp.to_vec()));
            }
        }
        out.unaligned.0 += a.unaligned_student;
        out.unaligned.1 += a.unaligned_teacher;
        out.template.0 += s.end_positions.len();
        out.template.1 += t.end_positions.len();
        if !s.end_positions.is_empty() && !t.end_positions.is_empty() {
            out.ends
                .push((s.end_positions.clone(), t.end_positions.clone()));
        }
    }
    Ok(out)
}

/// A conversation in the teacher's tokenization, aligned with the student's
/// ([`crate::batch::tokenize_pair`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeacherSide {
    /// The teacher's ids and loss mask (cut at `max_len`).
    pub sample: crate::batch::Sample,
    pub alignment: ChatAlignment,
    /// The teacher's trained turns the alignment was made from (compared with a logit cache's).
    pub turns: Vec<TurnTokens>,
}
