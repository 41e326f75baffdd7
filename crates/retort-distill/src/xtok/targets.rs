//! From a teacher's per-token labels of its own tokenization to the groups the cross-tokenizer
//! losses take ([`super::loss::Group`]).
//!
//! What the teacher contributes does not depend on the student: at each of its loss positions,
//! the top-k of the distribution that predicted the token (coarse log-probs at T, tail last) and
//! the log-probability it gave the token actually there. A group's teacher side is the first
//! token's top-k and the sum of the later tokens' log-probabilities.

use retort_model::Model;

use super::loss::{Group, TeacherGroup};
use super::{ChatAlignment, TeacherSide};
use crate::batch::{self, Sample};
use crate::cache::label::loss_positions;
use crate::cache::topk::{coarse_log_probs, label_log_probs, top_k_rows};
use crate::cache::{Reader, TopK, sample_key};
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
        let label_logp = label_log_probs(logits, vocab, tokens, t);
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
    let sides = sides(samples)?;
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
        s_row = push_groups(&mut groups, s, side, &labels, s_row);
        t_row += r;
    }
    Ok(groups)
}

/// The groups of sample `s` (whose loss rows start at batch row `s_row`) appended to `out`;
/// returns the batch row after its last.
fn push_groups(
    out: &mut Vec<Group>,
    s: &Sample,
    side: &TeacherSide,
    labels: &TeacherLabels,
    s_row: usize,
) -> usize {
    let spos = loss_positions(s);
    let row = |tok: usize| {
        tok.checked_sub(1)
            .and_then(|p| spos.binary_search(&(p as u32)).ok())
            .map(|i| s_row + i)
    };
    out.extend(groups(&side.alignment, row, labels));
    s_row + spos.len()
}

/// The teacher side of every sample, or an error naming the first without one.
fn sides<'a>(samples: &[&'a Sample]) -> Result<Vec<&'a TeacherSide>> {
    samples
        .iter()
        .map(|s| {
            s.teacher.as_deref().ok_or_else(|| {
                Error::invalid(
                    format!("sample `{}` has no teacher tokenization", s.id),
                    "this is a bug in retort: cross-tokenizer stages tokenize with tokenize_pair",
                )
            })
        })
        .collect()
}

/// A cached sample's labels at training temperature `t`: the stored top-k re-tempered as for
/// same-tokenizer KD ([`coarse_log_probs`]), and the label log-probs moved by the same shift
/// (`lp' = (T_label / t)·lp + c`, `c` read off the re-tempered top-1, so exact where the
/// tail's spread is).
pub fn labels_from_cache(tk: &TopK, vocab: usize, t_label: f64, t: f64) -> TeacherLabels {
    let k = tk.k;
    let ratio = t_label / t;
    let logp = coarse_log_probs(&tk.logp, &tk.log_tail, k, vocab, ratio);
    let label_logp = if ratio == 1.0 {
        tk.label_logp.clone()
    } else {
        tk.label_logp
            .iter()
            .enumerate()
            .map(|(r, &lp)| {
                let c = logp[r * (k + 1)] as f64 - ratio * tk.logp[r * k] as f64;
                (ratio * lp as f64 + c) as f32
            })
            .collect()
    };
    TeacherLabels {
        k,
        positions: tk.positions.iter().map(|&p| p as usize + 1).collect(),
        ids: tk.ids.clone(),
        logp,
        label_logp,
    }
}

/// The loss groups of one micro-batch from a format-2 logit cache ([`online`]'s result without
/// the teacher): each sample's teacher side is found by its key, its stored turns checked
/// against the ones the alignment was made from. `None` when some sample is not in the cache
/// (the caller labels live, or refuses). Samples whose teacher side has no loss token left
/// (cut at `max_len`) need nothing.
pub fn cached(cache: &Reader, samples: &[&Sample], t: f64) -> Result<Option<Vec<Group>>> {
    let m = &cache.manifest;
    let (mut groups, mut s_row) = (Vec::new(), 0);
    for (s, side) in samples.iter().zip(sides(samples)?) {
        if side.sample.loss_tokens() == 0 {
            s_row += loss_positions(s).len();
            continue;
        }
        let Some(tk) = cache.get(&sample_key(&side.sample.ids, &side.sample.loss_mask))? else {
            return Ok(None);
        };
        let damaged = |what: &str| {
            Error::invalid(
                format!(
                    "logit cache `{}`: sample `{}` has the right key but {what}",
                    cache.dir.display(),
                    s.id
                ),
                format!(
                    "the cache or its tokenizer files were changed; rebuild it: {}",
                    m.command
                ),
            )
        };
        if tk.tokens != side.sample.ids || tk.label_logp.len() != tk.rows() {
            return Err(damaged("other tokens or no label log-probs"));
        }
        if tk.turns.as_ref() != Some(&side.turns) {
            return Err(damaged("other teacher token offsets"));
        }
        let labels = labels_from_cache(&tk, m.teacher.vocab_size, m.temperature, t);
        let before = groups.len();
        s_row = push_groups(&mut groups, s, side, &labels, s_row);
        if groups[before..]
            .iter()
            .any(|g| g.teacher.rest_logp.is_nan())
        {
            return Err(Error::invalid(
                format!(
                    "logit cache `{}`: sample `{}` lacks the teacher's log-prob of some answer \
                     tokens (the server that labelled it did not return the prompt's own tokens)",
                    cache.dir.display(),
                    s.id
                ),
                "label with a server that returns them (vLLM, SGLang, `retort serve`) or with \
                 the teacher locally",
            ));
        }
    }
    Ok(Some(groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels read from a cache labelled at T = 1 and re-tempered to T = 2 equal labels computed
    /// at T = 2 from the logits, when the top-k is the whole vocabulary (no tail to spread) —
    /// the label log-probs of tokens included.
    #[test]
    fn cached_labels_re_tempered_equal_labels_at_the_training_temperature() {
        let (v, n) = (7, 4);
        let logits: Vec<f32> = (0..v * n)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let tokens = [3u32, 0, 6, 2];
        let positions = vec![4usize, 5, 6, 7];
        let want = TeacherLabels::from_logits(&logits, v, positions.clone(), &tokens, v, 2.0);
        let (ids, logp, tail) = top_k_rows(&logits, v, v, 1.0);
        let tk = TopK {
            k: v,
            tokens: vec![0; 9],
            positions: positions.iter().map(|&p| p as u32 - 1).collect(),
            ids,
            logp,
            log_tail: tail,
            label_logp: label_log_probs(&logits, v, &tokens, 1.0),
            turns: None,
        };
        let got = labels_from_cache(&tk, v, 1.0, 2.0);
        assert_eq!((&got.positions, &got.ids), (&want.positions, &want.ids));
        for (a, b) in got
            .logp
            .iter()
            .zip(&want.logp)
            .chain(got.label_logp.iter().zip(&want.label_logp))
        {
            assert!(
                (a - b).abs() < 1e-5 || (a.is_infinite() && b.is_infinite()),
                "{a} vs {b}"
            );
        }
        // At the labelling temperature the stored values pass through.
        let same = labels_from_cache(&tk, v, 1.0, 1.0);
        assert_eq!(same.label_logp, tk.label_logp);
    }

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
