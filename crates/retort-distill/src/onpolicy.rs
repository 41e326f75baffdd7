//! On-policy distillation: the student answers the stage's prompts, the teacher grades every
//! token of its answers, and the student trains on its own samples (GKD, Agarwal et al. 2024;
//! MiniLLM; the per-token reverse-KL recipe of the 2025 "on-policy distillation" write-ups).
//!
//! A CPU cannot sample and train at once, so a stage runs in **rounds**: the student (a frozen
//! snapshot of its current weights) answers `samples_per_round` prompts, the teacher scores the
//! answers once (top-k per token and the log-prob of the sampled token: a local model, or a
//! server through vLLM's `prompt_logprobs`), then `updates_per_round` optimizer steps train on
//! them; step `j` of a round is `j` updates stale. With GKD's λ < 1, each prompt keeps the data's
//! answer with probability `1 − λ` (off-policy KD on it).
//!
//! Prompts come from the stage's data in the trainer's own epoch order (the batches of
//! `batch::plan_epoch`, one after the other), `samples_per_round` at a time; a round's steps
//! take its samples in order, `batch_size × grad_accum` per step. So with λ = 0 and one use
//! per sample, the stage is the off-policy KD stage, step for step (tested).
//!
//! Exactly once: every round's samples are written to `OUT/rounds/stage-K/round-RRRRRR.json`
//! (atomically) before its first update. A run resumed mid-round reads them back; rounds after
//! it are sampled again from bit-identical weights with seeds that are a pure function of
//! (seed, stage, round, row), so a resumed run equals the uninterrupted one.
//!
//! The loss on the student's tokens: the stage's divergence per position (`estimator = "full"`,
//! default reverse KL), or the sampled-token policy gradient ([`sampled_loss`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_model::generation::{FinishReason, SamplingParams};
use retort_model::{Model, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::batch::{self, Sample};
use crate::cache::TopK;
use crate::cache::label::Scorer;
use crate::cache::topk::coarse_log_probs;
use crate::error::{Error, Result};
use crate::loss::log_softmax;
use crate::recipe::OnPolicy;
use crate::sparse::SparseTargets;

const ROUND_FORMAT_VERSION: u32 = 1;

/// The sampled-token loss of one chunk, before scaling by `1 / normalizer`.
pub struct SampledLoss {
    /// `Σ_t c_t · log q(x_t)` with `c_t = sg(log q(x_t) − log p(x_t))`: its gradient is the
    /// policy gradient of reverse KL with per-token, undiscounted costs.
    pub loss: Tensor,
    /// `−Σ log q(x_t)`: the student's NLL of its own tokens.
    pub ce_sum: f64,
    /// `Σ c_t`: the sampled (k1) estimate of reverse KL, summed.
    pub kd_sum: f64,
}

/// The policy-gradient form of on-policy distillation on `s_logits (n, V)` at the sampled
/// `targets (n)`, with the teacher's log-probs of those tokens `t_logp (n)`.
///
/// Reverse KL of a sequence is `E_{x∼q}[Σ_t log q(x_t) − log p(x_t)]`; its gradient is
/// `E[Σ_t ∇log q(x_t) · Σ_{s≥t} c_s]`. Keeping only `s = t` (no discount, no future costs)
/// gives `Σ_t c_t ∇log q(x_t)`: biased (blind to how a token changes what follows), with the
/// variance of one sampled token per position. [`crate::recipe::Estimator::Full`] instead
/// takes the expectation over the whole next-token distribution at each position (no sampling
/// noise there, the same blindness to the future).
pub fn sampled_loss(s_logits: &Tensor, targets: &Tensor, t_logp: &[f32]) -> Result<SampledLoss> {
    let n = targets.dim(0)?;
    if t_logp.len() != n || t_logp.iter().any(|x| !x.is_finite()) {
        return Err(Error::invalid(
            "the teacher's log-prob of a sampled token is missing or not finite",
            "a server must return the prompt's own token beside the top-k in prompt_logprobs \
             (vLLM, SGLang and `retort serve` do); or use estimator = \"full\"",
        ));
    }
    let lq = log_softmax(s_logits)? // (n, V)
        .gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
        .squeeze(1)?; // (n)
    let lp = Tensor::from_slice(t_logp, n, s_logits.device())?;
    let cost = (lq.detach() - lp)?; // (n), no gradient
    let loss = (&cost * &lq)?.sum_all()?;
    let to_f64 = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    Ok(SampledLoss {
        loss,
        ce_sum: -to_f64(lq.sum_all()?)?,
        kd_sum: to_f64(cost.sum_all()?)?,
    })
}

/// One prompt of a round and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSample {
    /// The conversation's index in the stage's training split.
    pub prompt: usize,
    /// The conversation's id in the data.
    pub id: String,
    /// Whether the student wrote the answer (else the data's answer is kept).
    pub student: bool,
    /// The student's answer: prompt + sampled tokens (the stopping end-of-turn id included);
    /// empty for a data answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<u32>,
    /// Where the answer starts in `ids`.
    #[serde(default)]
    pub answer_start: usize,
    /// The answer's text, as the student wrote it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// `stop` or `length` (cut off at the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<String>,
    /// The student's log-prob of each sampled token at sampling time (temperature 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logp: Vec<f32>,
    /// The student's entropy at each sampled position, in nats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entropy: Vec<f32>,
}

/// A round's samples as written to the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundFile {
    pub format_version: u32,
    /// The run's recipe: a file of another run is never read back.
    pub recipe_sha256: String,
    pub stage: usize,
    pub round: usize,
    /// Optimizer steps done before the round (the policy that wrote it).
    pub global_step: usize,
    pub seconds_sampling: f64,
    /// Prompts the student could not answer within `train.max_len` (kept with the data's answer).
    pub too_long: usize,
    pub samples: Vec<RoundSample>,
}

impl RoundFile {
    /// The samples to train on, in round order.
    pub fn samples(&self, train: &[Sample]) -> Result<Vec<Sample>> {
        self.samples
            .iter()
            .map(|r| {
                let data = train.get(r.prompt).ok_or_else(|| {
                    Error::invalid(
                        format!("round {} names prompt {} of {}", self.round, r.prompt, train.len()),
                        "the round file is not from this run's data; remove the run's rounds/ directory and resume",
                    )
                })?;
                Ok(if r.student {
                    let mut loss_mask = vec![false; r.ids.len()];
                    loss_mask[r.answer_start.min(r.ids.len())..].fill(true);
                    Sample {
                        id: format!("{}#round{}", data.id, self.round),
                        ids: r.ids.clone(),
                        loss_mask,
                        teacher: None,
                    }
                } else {
                    data.clone()
                })
            })
            .collect()
    }
}

/// Where round `round` of stage `stage` is written.
pub fn round_path(out: &Path, stage: usize, round: usize) -> PathBuf {
    out.join("rounds")
        .join(format!("stage-{stage}"))
        .join(format!("round-{round:06}.json"))
}

/// Read a round written by this run, if there is one.
pub fn read_round(path: &Path, recipe_sha256: &str) -> Result<Option<RoundFile>> {
    let text = match fs_err::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let f: RoundFile = serde_json::from_str(&text).map_err(|e| {
        Error::invalid(
            format!("`{}`: {e}", path.display()),
            "the round file is damaged; delete it and resume (the round is sampled again)",
        )
    })?;
    if f.format_version != ROUND_FORMAT_VERSION || f.recipe_sha256 != recipe_sha256 {
        return Err(Error::invalid(
            format!(
                "`{}` was written by another run or retort version",
                path.display()
            ),
            "resume with the recipe that wrote it, or start a new run with another --out",
        ));
    }
    Ok(Some(f))
}

/// The prompts of a stage in the trainer's epoch order: position `p` of the stream is entry
/// `p mod N` of epoch `p / N`'s batches laid end to end.
pub struct PromptStream {
    lengths: Vec<usize>,
    batch_size: usize,
    bucket_batches: usize,
    seed: u64,
    epochs: HashMap<usize, Vec<usize>>,
}

impl PromptStream {
    pub fn new(train: &[Sample], batch_size: usize, bucket_batches: usize, seed: u64) -> Self {
        PromptStream {
            lengths: train.iter().map(|s| s.ids.len()).collect(),
            batch_size,
            bucket_batches,
            seed,
            epochs: HashMap::new(),
        }
    }

    pub fn at(&mut self, p: usize) -> usize {
        let n = self.lengths.len().max(1);
        let epoch = p / n;
        let (lengths, b, w, seed) = (
            &self.lengths,
            self.batch_size,
            self.bucket_batches,
            self.seed,
        );
        let order = self.epochs.entry(epoch).or_insert_with(|| {
            batch::plan_epoch(lengths, b, w, seed, epoch)
                .into_iter()
                .flatten()
                .collect()
        });
        order[p % n]
    }
}

/// The tokens before the last answer of `s`: what the student is asked to continue.
pub fn prompt_of(s: &Sample) -> &[u32] {
    let last = s.loss_mask.iter().rposition(|&m| m).unwrap_or(s.ids.len());
    let start = s.loss_mask[..last]
        .iter()
        .rposition(|&m| !m)
        .map_or(0, |i| i + 1);
    &s.ids[..start]
}

fn mix(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(seed ^ 0x0_5A3D_1CE5, |h, &x| {
        (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
    })
}

/// What sampling a round needs.
pub struct RoundInputs<'a> {
    pub student: &'a Model,
    pub tokenizer: &'a Tokenizer,
    pub train: &'a [Sample],
    pub on_policy: &'a OnPolicy,
    /// Longest sample in tokens (`train.max_len`, within the models' context).
    pub max_len: usize,
    pub matmul: retort_kernels::MatmulPrecision,
    /// The stage's seed.
    pub seed: u64,
    pub stage: usize,
    pub recipe_sha256: &'a str,
}

/// Choose round `round`'s prompts (entries `round·S … (round+1)·S` of `stream`), decide which
/// the student answers (probability λ each), and sample its answers from a snapshot of its
/// current weights.
pub fn sample_round(
    inp: &RoundInputs,
    stream: &mut PromptStream,
    round: usize,
    global_step: usize,
    per_round: usize,
) -> Result<RoundFile> {
    let t0 = std::time::Instant::now();
    let o = inp.on_policy;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(inp.seed, &[inp.stage as u64, round as u64, 1]));
    let mut samples = Vec::with_capacity(per_round);
    for j in 0..per_round {
        let prompt = stream.at(round * per_round + j);
        // One draw per entry whatever λ, so λ changes which rows the student answers, not
        // the stream.
        let u: f64 = rng.random();
        samples.push(RoundSample {
            prompt,
            id: inp.train[prompt].id.clone(),
            student: u < o.lambda,
            ids: Vec::new(),
            answer_start: 0,
            text: String::new(),
            finish: None,
            logp: Vec::new(),
            entropy: Vec::new(),
        });
    }
    let mut prompts = Vec::new();
    let mut params = Vec::new();
    let mut rows = Vec::new();
    let mut too_long = 0;
    for (j, r) in samples.iter_mut().enumerate() {
        if !r.student {
            continue;
        }
        let prompt = prompt_of(&inp.train[r.prompt]);
        let room = inp.max_len.saturating_sub(prompt.len());
        if prompt.is_empty() || room == 0 {
            r.student = false; // no room for an answer: the data's answer stays
            too_long += 1;
            continue;
        }
        prompts.push(prompt.to_vec());
        params.push(SamplingParams {
            max_new_tokens: o.max_new_tokens.min(room),
            temperature: o.temperature,
            top_p: o.top_p,
            seed: mix(inp.seed, &[inp.stage as u64, round as u64, 2, j as u64]),
            logprobs: Some(0),
            ..SamplingParams::default()
        });
        rows.push(j);
    }
    if !prompts.is_empty() {
        let mut snapshot = inp.student.snapshot(Path::new("(training)"))?;
        snapshot.set_matmul_precision(inp.matmul);
        let mut done = vec![None; prompts.len()];
        retort_model::batching::generate_continuous(
            &snapshot,
            inp.tokenizer,
            &prompts,
            &params,
            prompts.len().min(32),
            |_, _| {},
            |i, c| done[i] = Some(c),
        )?;
        for ((&j, prompt), c) in rows.iter().zip(prompts).zip(done) {
            let c = c.ok_or_else(|| {
                Error::invalid(
                    "a prompt of the round got no answer",
                    "this is a bug in retort's batching",
                )
            })?;
            let r = &mut samples[j];
            r.answer_start = prompt.len();
            r.ids = prompt;
            r.ids.extend(c.logprobs.iter().map(|t| t.id));
            r.logp = c.logprobs.iter().map(|t| t.logprob).collect();
            r.entropy = c.logprobs.iter().map(|t| t.entropy).collect();
            r.text = c.text;
            r.finish = Some(
                match c.finish_reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                }
                .into(),
            );
            if r.ids.len() == r.answer_start {
                r.student = false; // nothing sampled (cannot happen with max_new ≥ 1)
                r.ids.clear();
            }
        }
    }
    Ok(RoundFile {
        format_version: ROUND_FORMAT_VERSION,
        recipe_sha256: inp.recipe_sha256.to_string(),
        stage: inp.stage,
        round,
        global_step,
        seconds_sampling: t0.elapsed().as_secs_f64(),
        too_long,
        samples,
    })
}

/// The teacher's top-k (and sampled-token log-probs) for every sample, `batch` at a time.
pub fn score(
    scorer: &dyn Scorer,
    samples: &[Sample],
    pad_id: u32,
    k: usize,
    batch: usize,
) -> Result<Vec<TopK>> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch.max(1)) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        out.extend(scorer.label_batch(&refs, pad_id, k, 1.0, 0.0)?);
    }
    Ok(out)
}

/// Sparse targets of a micro-batch's samples (collate order) at the training temperature: each
/// row's teacher top-k and one tail bucket, as from a logit cache. (Giving the sampled token an
/// outcome of its own was measured and did not bring the gradient closer to the exact one:
/// `docs/on-policy.md`.)
pub fn sparse_targets(tops: &[&TopK], vocab: usize, temperature: f64) -> SparseTargets {
    let k = tops.first().map_or(1, |t| t.k);
    let mut out = SparseTargets {
        k,
        ids: Vec::new(),
        logp: Vec::new(),
    };
    for t in tops {
        out.ids.extend_from_slice(&t.ids);
        out.logp.extend(coarse_log_probs(
            &t.logp,
            &t.log_tail,
            t.k,
            vocab,
            1.0 / temperature,
        ));
    }
    out
}

/// What a round looked like, written to `metrics.jsonl` (`"kind": "round"`) when it ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    pub kind: String,
    pub stage: usize,
    pub stage_name: String,
    pub round: usize,
    /// Optimizer steps done when the round ended.
    pub global_step: usize,
    /// Optimizer steps done when it was sampled.
    pub sampled_at_step: usize,
    pub samples: usize,
    /// Answers the student wrote (the others are the data's, λ < 1).
    pub student_samples: usize,
    pub too_long: usize,
    /// Mean tokens per student answer, and the share cut off at `max_new_tokens`.
    pub mean_length: f64,
    pub cut_off: f64,
    /// Per student token: the teacher's NLL of it, the student's own NLL at sampling time, the
    /// student's entropy, and the sampled estimate of reverse KL (student − teacher log-prob).
    pub teacher_nll: f64,
    pub student_nll: f64,
    pub student_entropy: f64,
    pub reverse_kl: f64,
    pub seconds_sampling: f64,
    pub seconds_scoring: f64,
    pub seconds_training: f64,
    /// Updates between the policy that wrote the samples and the last step trained on them.
    pub max_staleness: usize,
}

impl RoundRecord {
    pub fn new(
        f: &RoundFile,
        tops: &[TopK],
        stage_name: &str,
        seconds_scoring: f64,
        updates: usize,
    ) -> RoundRecord {
        let (mut tokens, mut cut, mut students) = (0usize, 0usize, 0usize);
        let (mut t_nll, mut s_nll, mut ent) = (0f64, 0f64, 0f64);
        for (r, t) in f.samples.iter().zip(tops) {
            if !r.student {
                continue;
            }
            students += 1;
            tokens += r.logp.len();
            cut += usize::from(r.finish.as_deref() == Some("length"));
            s_nll -= r.logp.iter().map(|&x| x as f64).sum::<f64>();
            ent += r.entropy.iter().map(|&x| x as f64).sum::<f64>();
            // The teacher's rows of the answer: the last `len` loss positions.
            let n = r.logp.len().min(t.label_logp.len());
            t_nll -= t.label_logp[t.label_logp.len() - n..]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>();
        }
        let per = |x: f64| if tokens > 0 { x / tokens as f64 } else { 0.0 };
        RoundRecord {
            kind: "round".into(),
            stage: f.stage,
            stage_name: stage_name.into(),
            round: f.round,
            global_step: f.global_step,
            sampled_at_step: f.global_step,
            samples: f.samples.len(),
            student_samples: students,
            too_long: f.too_long,
            mean_length: if students > 0 {
                tokens as f64 / students as f64
            } else {
                0.0
            },
            cut_off: if students > 0 {
                cut as f64 / students as f64
            } else {
                0.0
            },
            teacher_nll: per(t_nll),
            student_nll: per(s_nll),
            student_entropy: per(ent),
            reverse_kl: per(t_nll - s_nll),
            seconds_sampling: f.seconds_sampling,
            seconds_scoring,
            seconds_training: 0.0,
            max_staleness: updates.saturating_sub(1),
        }
    }
}

/// The micro-batches of step `j` of a round: `batch × accum` samples taken from the round in
/// order from `j·batch·accum` (wrapping around when the round is smaller), `batch` each.
pub fn step_rows(j: usize, round_len: usize, batch: usize, accum: usize) -> Vec<Vec<usize>> {
    let n = batch * accum;
    let rows: Vec<usize> = (0..n).map(|i| (j * n + i) % round_len.max(1)).collect();
    rows.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_everything_before_the_last_answer() {
        let s = Sample {
            id: "a".into(),
            ids: (0..10).collect(),
            loss_mask: [0, 0, 1, 1, 0, 0, 0, 1, 1, 1].map(|x| x == 1).to_vec(),
            teacher: None,
        };
        assert_eq!(prompt_of(&s), &[0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn step_rows_take_the_round_in_order_and_wrap() {
        assert_eq!(step_rows(0, 8, 2, 2), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(step_rows(1, 8, 2, 2), vec![vec![4, 5], vec![6, 7]]);
        assert_eq!(step_rows(1, 6, 2, 2), vec![vec![4, 5], vec![0, 1]]);
    }

    #[test]
    fn sampled_loss_value_and_gradient_by_hand() {
        // One row, V = 3: q = softmax(z), token 1 sampled, teacher log-prob ln 0.5.
        let z = candle_core::Var::new(&[[1.0f32, 2.0, 0.5]], &candle_core::Device::Cpu).unwrap();
        let y = Tensor::new(&[1u32], &candle_core::Device::Cpu).unwrap();
        let f = sampled_loss(z.as_tensor(), &y, &[0.5f32.ln()]).unwrap();
        let e = [1.0f64.exp(), 2.0f64.exp(), 0.5f64.exp()];
        let s: f64 = e.iter().sum();
        let lq = (e[1] / s).ln();
        let c = lq - 0.5f64.ln();
        assert!((f.kd_sum - c).abs() < 1e-6 && (f.ce_sum + lq).abs() < 1e-6);
        let g = f.loss.backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // ∂(c·log q_1)/∂z_v = c·(1[v = 1] − q_v), c held fixed.
        for v in 0..3 {
            let want = c * (f64::from(u8::from(v == 1)) - e[v] / s);
            assert!(
                (g[0][v] as f64 - want).abs() < 1e-6,
                "{v}: {} vs {want}",
                g[0][v]
            );
        }
    }
}
