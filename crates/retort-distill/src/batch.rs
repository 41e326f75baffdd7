//! From validated records to micro-batches: tokenization through the chat template with
//! assistant-only masks, an explicit truncation policy, length-bucketed batches, and collation
//! into right-padded `(B, T)` ids with the flat indices of the loss positions.
//!
//! Right padding needs no attention mask: attention is causal, so padding after a sequence never
//! influences its positions, and padded positions carry no loss.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use retort_data::Dataset;
use retort_model::{Tokenizer, TurnTokens};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::objective::MicroBatch;

/// One tokenized conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    /// `(T)` token ids.
    pub ids: Vec<u32>,
    /// `(T)` assistant-only mask: true where the token is a training target.
    pub loss_mask: Vec<bool>,
    /// Cross-tokenizer KD: the same conversation in the teacher's tokenization, aligned with
    /// this one ([`tokenize_pair`]).
    pub teacher: Option<std::sync::Arc<crate::xtok::TeacherSide>>,
}

/// Refuse samples longer than a model's `context` before any compute: names the longest sample
/// of `source` and the setting that cuts it (`what`, e.g. `train.max_len` or `--max-len`).
pub fn check_context<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
    context: usize,
    source: &std::path::Path,
    what: &str,
) -> crate::error::Result<()> {
    if let Some(s) = samples.into_iter().max_by_key(|s| s.ids.len())
        && s.ids.len() > context
    {
        return Err(crate::error::Error::invalid(
            format!(
                "`{}`: sample `{}` has {} tokens, longer than the model's context ({context} tokens)",
                source.display(),
                s.id,
                s.ids.len()
            ),
            format!("set {what} to {context} or less: longer samples are then truncated"),
        ));
    }
    Ok(())
}

impl Sample {
    /// Positions `t` whose next token `t + 1` carries loss.
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// What to do with a conversation longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_len` tokens; drop the sample if no loss token is left.
    #[default]
    Right,
    /// Drop the whole sample.
    Drop,
}

impl std::str::FromStr for Truncation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "right" => Ok(Self::Right),
            "drop" => Ok(Self::Drop),
            _ => Err(format!("unknown truncation `{s}` (expected right or drop)")),
        }
    }
}

/// What tokenization did to a dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TokenizeReport {
    pub records: usize,
    pub samples: usize,
    /// Samples cut to `max_len` (kept).
    pub truncated: usize,
    /// Samples dropped: too long under `Truncation::Drop`, or no loss token left after cutting.
    pub dropped: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
    /// Tokens removed by truncation (including dropped samples).
    pub tokens_cut: usize,
    pub max_len_seen: usize,
}

/// Tokenize every record of `ds` with `tok`'s chat template.
pub fn tokenize(
    ds: &Dataset,
    tok: &Tokenizer,
    max_len: usize,
    policy: Truncation,
) -> Result<(Vec<Sample>, TokenizeReport)> {
    collect(ds, max_len, policy, |r| {
        let enc = tok.encode_chat(&r.conversation.messages)?;
        Ok(Sample {
            id: r.id.clone(),
            ids: enc.ids,
            loss_mask: enc.loss_mask,
            teacher: None,
        })
    })
}

/// [`tokenize`] with the student's tokenizer `tok`, each sample also carrying the conversation
/// in the teacher's tokenization (its own chat template, cut on the right at `max_len`) and
/// the alignment of the two ([`crate::xtok::align_chat`]; tokens match when their vocabulary
/// strings do).
pub fn tokenize_pair(
    ds: &Dataset,
    tok: &Tokenizer,
    teacher: &Tokenizer,
    max_len: usize,
    policy: Truncation,
) -> Result<(Vec<Sample>, TokenizeReport)> {
    collect(ds, max_len, policy, |r| {
        let messages = &r.conversation.messages;
        let (enc, turns) = tok.encode_chat_turns(messages)?;
        let (tenc, tturns) = teacher.encode_chat_turns(messages)?;
        let alignment = crate::xtok::align_chat(&turns, &tturns, |a, b| {
            let s = tok.inner().id_to_token(enc.ids[a]);
            s.is_some() && s == teacher.inner().id_to_token(tenc.ids[b])
        })?;
        let keep = tenc.ids.len().min(max_len);
        let side = crate::xtok::TeacherSide {
            sample: Sample {
                id: r.id.clone(),
                ids: tenc.ids[..keep].to_vec(),
                loss_mask: tenc.loss_mask[..keep].to_vec(),
                teacher: None,
            },
            alignment,
            turns: tturns,
        };
        Ok(Sample {
            id: r.id.clone(),
            ids: enc.ids,
            loss_mask: enc.loss_mask,
            teacher: Some(std::sync::Arc::new(side)),
        })
    })
}

/// A sample with its trained turns' tokens and byte offsets.
pub type SampleTurns = (Sample, Vec<TurnTokens>);

/// [`tokenize`], each sample with its trained turns' tokens and byte offsets
/// ([`Tokenizer::encode_chat_turns`]; positions index the whole conversation, before any cut).
/// Fails where the chat template rewrites an answer's content.
pub fn tokenize_turns(
    ds: &Dataset,
    tok: &Tokenizer,
    max_len: usize,
    policy: Truncation,
) -> Result<(Vec<SampleTurns>, TokenizeReport)> {
    collect_with(ds, max_len, policy, |r| {
        let (enc, turns) = tok.encode_chat_turns(&r.conversation.messages)?;
        let s = Sample {
            id: r.id.clone(),
            ids: enc.ids,
            loss_mask: enc.loss_mask,
            teacher: None,
        };
        Ok((s, turns))
    })
}

/// Every record of `ds` through `encode`, truncated by `policy` and counted.
fn collect(
    ds: &Dataset,
    max_len: usize,
    policy: Truncation,
    mut encode: impl FnMut(&retort_data::Record) -> Result<Sample>,
) -> Result<(Vec<Sample>, TokenizeReport)> {
    let (v, rep) = collect_with(ds, max_len, policy, |r| Ok((encode(r)?, ())))?;
    Ok((v.into_iter().map(|(s, ())| s).collect(), rep))
}

/// [`collect`] with something `X` kept beside each sample.
fn collect_with<X>(
    ds: &Dataset,
    max_len: usize,
    policy: Truncation,
    mut encode: impl FnMut(&retort_data::Record) -> Result<(Sample, X)>,
) -> Result<(Vec<(Sample, X)>, TokenizeReport)> {
    let mut rep = TokenizeReport {
        records: ds.records.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(ds.records.len());
    for r in &ds.records {
        let (mut s, x) = encode(r)?;
        rep.max_len_seen = rep.max_len_seen.max(s.ids.len());
        if !apply_truncation(&mut s, max_len, policy, &mut rep) {
            continue;
        }
        rep.tokens += s.ids.len();
        rep.loss_tokens += s.loss_tokens();
        out.push((s, x));
    }
    rep.samples = out.len();
    Ok((out, rep))
}

/// Apply the truncation policy to one sample, counting what it did in `rep` (`truncated`,
/// `dropped`, `tokens_cut`). Returns whether the sample is kept.
pub fn apply_truncation(
    s: &mut Sample,
    max_len: usize,
    policy: Truncation,
    rep: &mut TokenizeReport,
) -> bool {
    if s.ids.len() <= max_len {
        return true;
    }
    rep.tokens_cut += s.ids.len() - max_len;
    if policy == Truncation::Drop {
        rep.dropped += 1;
        return false;
    }
    s.ids.truncate(max_len);
    s.loss_mask.truncate(max_len);
    if s.loss_tokens() == 0 {
        rep.dropped += 1;
        return false;
    }
    rep.truncated += 1;
    true
}

/// The batches of one epoch as sample indices: a seeded shuffle, then within windows of
/// `bucket_batches` batches samples are sorted by length (so a batch holds similar lengths),
/// then the batch order is shuffled again. Deterministic in (`seed`, `epoch`).
pub fn plan_epoch(
    lengths: &[usize],
    batch_size: usize,
    bucket_batches: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.shuffle(&mut rng);
    let batch_size = batch_size.max(1);
    let window = batch_size * bucket_batches.max(1);
    let mut batches = Vec::with_capacity(idx.len().div_ceil(batch_size));
    for w in idx.chunks_mut(window) {
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Padding share of a plan: padded positions / all positions.
pub fn padding_waste(lengths: &[usize], plan: &[Vec<usize>]) -> f64 {
    let (mut real, mut total) = (0usize, 0usize);
    for b in plan {
        let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        real += b.iter().map(|&i| lengths[i]).sum::<usize>();
        total += max * b.len();
    }
    if total == 0 {
        0.0
    } else {
        1.0 - real as f64 / total as f64
    }
}

/// Right-pad `samples` with `pad_id` into one micro-batch.
pub fn collate(samples: &[&Sample], pad_id: u32, device: &Device) -> Result<MicroBatch> {
    let b = samples.len();
    let t = samples
        .iter()
        .map(|s| s.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; b * t];
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    let mut real_tokens = 0;
    for (row, s) in samples.iter().enumerate() {
        ids[row * t..row * t + s.ids.len()].copy_from_slice(&s.ids);
        real_tokens += s.ids.len();
        for p in 0..s.ids.len().saturating_sub(1) {
            if s.loss_mask[p + 1] {
                positions.push((row * t + p) as u32);
                targets.push(s.ids[p + 1]);
            }
        }
    }
    let n = positions.len();
    Ok(MicroBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        positions: Tensor::from_vec(positions, n, device)?,
        targets: Tensor::from_vec(targets, n, device)?,
        loss_tokens: n,
        real_tokens,
        sparse: None,
        cross: None,
        sampled: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_longer_than_the_context_are_named_before_any_compute() {
        let mut long = sample(&[1; 10], &[true; 10]);
        long.id = "line-7".into();
        let samples = vec![sample(&[1, 2, 3], &[false, true, true]), long];
        let src = std::path::Path::new("d.jsonl");
        let e = check_context(&samples, 5, src, "train.max_len")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`d.jsonl`: sample `line-7` has 10 tokens")
                && e.contains("train.max_len to 5"),
            "{e}"
        );
        assert!(check_context(&samples, 10, src, "train.max_len").is_ok());
    }

    fn sample(ids: &[u32], mask: &[bool]) -> Sample {
        Sample {
            id: "s".into(),
            ids: ids.to_vec(),
            loss_mask: mask.to_vec(),
            teacher: None,
        }
    }

    #[test]
    fn collate_right_pads_and_finds_loss_positions() {
        let a = sample(&[5, 6, 7, 8], &[false, false, true, true]);
        let b = sample(&[9, 10], &[false, true]);
        let mb = collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            mb.ids.to_vec2::<u32>().unwrap(),
            [[5, 6, 7, 8], [9, 10, 0, 0]]
        );
        // Row 0: positions 1, 2 predict 7, 8. Row 1: position 0 predicts 10 (flat 4).
        assert_eq!(mb.positions.to_vec1::<u32>().unwrap(), [1, 2, 4]);
        assert_eq!(mb.targets.to_vec1::<u32>().unwrap(), [7, 8, 10]);
        assert_eq!((mb.loss_tokens, mb.real_tokens), (3, 6));
    }

    #[test]
    fn plans_are_deterministic_cover_every_sample_and_bucket_by_length() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 200 + 1).collect();
        let p1 = plan_epoch(&lengths, 4, 8, 42, 0);
        assert_eq!(p1, plan_epoch(&lengths, 4, 8, 42, 0));
        assert_ne!(p1, plan_epoch(&lengths, 4, 8, 42, 1));
        let mut all: Vec<usize> = p1.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        let bucketed = padding_waste(&lengths, &p1);
        let unbucketed = padding_waste(&lengths, &plan_epoch(&lengths, 4, 1, 42, 0));
        assert!(bucketed < unbucketed / 2.0, "{bucketed} vs {unbucketed}");
    }
}
