//! From a teacher's per-token labels of its own tokenization to the groups the cross-tokenizer
//! losses take ([`super::loss::Group`]).
//!
//! What the teacher contributes does not depend on the student: at each of its loss positions,
//! the top-k of the distribution that predicted the token (coarse log-probs at T, tail last) and
//! the log-probability it gave the token actually there. A group's teacher side is the first
//! token's top-k and the sum of the later tokens' log-probabilities.

use retort_model::Model;

use super::ChatAlignment;
use super::loss::{Group, TeacherGroup};
use crate::batch::{self, Sample};
use crate::cache::label::loss_positions;
use crate::cache::topk::{coarse_log_probs, top_k_rows};
use crate::error::{Error, Result};
use crate::objective;

/// A teacher's labels of one sequence at its loss positions.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherLabels {
    pub k: usize,
    /// Teacher positions (indices into its ids) that carry loss, increasing.
    pub positions: Vec<usize>,
    /// `(n, k)` top-k ids of the distribution that predicted each of those tokens.
    pub ids: Vec<u32>,
    /// `(n, k + 1)` coarse log-probs at the temperature, the tail bucket last.
    pub logp: Vec<f32>,
    /// `(n)` log-probability (at the temperature) of the token actually at each position.
    pub label_logp: Vec<f32>,
}

impl TeacherLabels {
    /// From the teacher's logits `(n, vocab)`, row i predicting the token `tokens[i]` at
    /// `positions[i]`, at temperature `t`.
    pub fn from_logits(
        logits: &[f32],
        vocab: usize,
        positions: Vec<usize>,
        tokens: &[u32],
        k: usize,
        t: f64,
    ) -> Self {
        let (ids, logp, tail) = top_k_rows(logits, vocab, k, t);
        let label_logp = logits
            .chunks(vocab)
            .zip(tokens)
            .map(|(row, &y)| {
                let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let lse: f64 = row
                    .iter()
                    .map(|&x| ((x as f64 - m) / t).exp())
                    .sum::<f64>()
                    .ln();
                ((row[y as usize] as f64 - m) / t - lse) as f32
            })
            .collect();
        TeacherLabels {
            k,
            positions,
            ids,
            logp: coarse_log_probs(&logp, &tail, k, vocab, 1.0),
            label_logp,
        }
    }

    fn index(&self, pos: usize) -> Option<usize> {
        self.positions.binary_search(&pos).ok()
    }
}

/// The groups of one sample. `student_row(pos)` is the loss row (index into the batch's N rows)
/// that predicts the student token at `pos`, `None` where there is none (cut by `max_len`).
/// Groups with a token on either side that has no row or label are left out; the rest come in
/// row order, end-of-turn pairs after their turn's content.
pub fn groups(
    alignment: &ChatAlignment,
    student_row: impl Fn(usize) -> Option<usize>,
    labels: &TeacherLabels,
) -> Vec<Group> {
    let k = labels.k;
    let mut out: Vec<Group> = alignment
        .groups
        .iter()
        .chain(&alignment.ends)
        .filter_map(|(s, t)| {
            let rows: Option<Vec<usize>> = s.iter().map(|&p| student_row(p)).collect();
            let rows = rows?;
            let consecutive = rows.windows(2).all(|w| w[1] == w[0] + 1);
            let idx: Option<Vec<usize>> = t.iter().map(|&p| labels.index(p)).collect();
            let idx = idx?;
            let (&first, rest) = idx.split_first()?;
            if !consecutive || rows.is_empty() {
                return None;
            }
            Some(Group {
                rows: rows[0]..rows[rows.len() - 1] + 1,
                teacher: TeacherGroup {
                    ids: labels.ids[first * k..(first + 1) * k].to_vec(),
                    logp: labels.logp[first * (k + 1)..(first + 1) * (k + 1)].to_vec(),
                    rest_logp: rest.iter().map(|&i| labels.label_logp[i]).sum(),
                    single: rest.is_empty(),
                },
            })
        })
        .collect();
    out.sort_by_key(|g| g.rows.start);
    out
}

/// The loss groups of one micro-batch of student `samples` (each carrying its teacher side,
/// [`crate::batch::tokenize_pair`]) from a live teacher: one forward of the teacher on its own
/// tokenization, its LM head `chunk_rows` rows at a time (never all of `N × V`), top-`k` at
/// temperature `t`. Group rows index the micro-batch's loss rows in
/// [`crate::batch::collate`]'s order.
pub fn online(
    teacher: &Model,
    samples: &[&Sample],
    pad_id: u32,
    k: usize,
    t: f64,
    chunk_rows: usize,
) -> Result<Vec<Group>> {
    let sides = samples
        .iter()
        .map(|s| {
            s.teacher.as_deref().ok_or_else(|| {
                Error::invalid(
                    format!("sample `{}` has no teacher tokenization", s.id),
                    "this is a bug in retort: cross-tokenizer stages tokenize with tokenize_pair",
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let t_samples: Vec<&Sample> = sides.iter().map(|x| &x.sample).collect();
    let mb = batch::collate(&t_samples, pad_id, teacher.device())?;
    let vocab = teacher.config().vocab_size;
    let k = k.min(vocab);
    let n = mb.loss_tokens;
    let targets = mb.targets.to_vec1::<u32>()?;
    let mut all = TeacherLabels {
        k,
        positions: Vec::new(),
        ids: Vec::with_capacity(n * k),
        logp: Vec::with_capacity(n * (k + 1)),
        label_logp: Vec::with_capacity(n),
    };
    if n > 0 {
        let h = objective::teacher_hidden(teacher, &mb)?; // (N, C)
        let mut start = 0;
        while start < n {
            let len = chunk_rows.max(1).min(n - start);
            let logits = teacher.lm_head(&h.narrow(0, start, len)?)?; // (len, V)
            let flat = logits.flatten_all()?.to_vec1::<f32>()?;
            let l = TeacherLabels::from_logits(
                &flat,
                vocab,
                Vec::new(),
                &targets[start..start + len],
                k,
                t,
            );
            all.ids.extend(l.ids);
            all.logp.extend(l.logp);
            all.label_logp.extend(l.label_logp);
            start += len;
        }
    }
    let (mut groups, mut t_row, mut s_row) = (Vec::new(), 0, 0);
    for (s, side) in samples.iter().zip(&sides) {
        let tpos = loss_positions(&side.sample);
        let r = tpos.len();
        let labels = TeacherLabels {
            k,
            // Row j predicts the token after loss position p: the token at p + 1.
            positions: tpos.iter().map(|&p| p as usize + 1).collect(),
            ids: all.ids[t_row * k..(t_row + r) * k].to_vec(),
            logp: all.logp[t_row * (k + 1)..(t_row + r) * (k + 1)].to_vec(),
            label_logp: all.label_logp[t_row..t_row + r].to_vec(),
        };
        let spos = loss_positions(s);
        let row = |tok: usize| {
            tok.checked_sub(1)
                .and_then(|p| spos.binary_search(&(p as u32)).ok())
                .map(|i| s_row + i)
        };
        groups.extend(self::groups(&side.alignment, row, &labels));
        t_row += r;
        s_row += spos.len();
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_take_the_first_tokens_distribution_and_the_later_tokens_log_probs() {
        // Teacher vocabulary 4; three loss positions 5, 6, 7 with tokens 1, 2, 3.
        let logits = [
            2.0f32, 1.0, 0.0, -1.0, //
            0.0, 0.0, 3.0, 0.0, //
            1.0, 1.0, 1.0, 1.0,
        ];
        let labels = TeacherLabels::from_logits(&logits, 4, vec![5, 6, 7], &[1, 2, 3], 2, 1.0);
        assert_eq!(&labels.ids[..2], &[0, 1]);
        let lse = |r: &[f32]| r.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        let want = (3.0 - lse(&logits[4..8])) + (1.0 - lse(&logits[8..12]));
        // Student tokens at positions 10, 11 are loss rows 0, 1; 12 has none (cut).
        let alignment = ChatAlignment {
            groups: vec![(vec![10], vec![5, 6, 7]), (vec![11, 12], vec![5])],
            ends: vec![(vec![11], vec![6])],
            ..Default::default()
        };
        let g = groups(&alignment, |p| (p < 12).then(|| p - 10), &labels);
        assert_eq!(g.len(), 2, "the group with a cut token is left out: {g:?}");
        assert_eq!(g[0].rows, 0..1);
        assert!(!g[0].teacher.single);
        assert!((g[0].teacher.rest_logp as f64 - want).abs() < 1e-6);
        assert_eq!(g[0].teacher.logp, labels.logp[..3].to_vec());
        assert_eq!(g[1].rows, 1..2);
        assert!(g[1].teacher.single);
        assert_eq!(g[1].teacher.ids, labels.ids[2..4].to_vec());
    }
}
