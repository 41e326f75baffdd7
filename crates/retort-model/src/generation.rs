//! Text generation with a key/value cache: greedy or temperature/top-p sampling with a seed,
//! stopping on end-of-turn ids or stop strings, for one prompt or a batch of prompts advanced
//! together (one forward pass per step for the whole batch; the batching itself, static or
//! continuous, is in [`crate::batching`]).
//!
//! Batching left-pads prompts to a common length and masks the padding out of attention. RoPE is
//! relative, so a row's attention scores do not depend on how far it was shifted; results match
//! running each prompt alone up to float rounding (tested).

use candle_core::{D, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Upper bound on generated tokens per prompt.
    pub max_new_tokens: usize,
    /// 0 selects greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Seed of the sampler; prompt `i` of a batch uses stream `seed + i`.
    pub seed: u64,
    /// Generation ends when the text contains one of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Record the log-prob of each generated token and of this many most likely alternatives
    /// (`None`: no log-probs). Log-probs are of the model's distribution (temperature 1).
    pub logprobs: Option<usize>,
    /// Repetition penalty (CTRL, Keskar et al. 2019; `repetition_penalty` in transformers and
    /// vLLM, `repeat_penalty` in llama.cpp): before sampling, a token seen in the last
    /// `repeat_last_n` tokens (prompt and completion) has its logit divided by this when positive,
    /// multiplied when negative. 1.0 is off. Log-probs stay those of the model.
    pub repeat_penalty: f32,
    /// The window of [`SamplingParams::repeat_penalty`], in tokens (llama.cpp's default, 64).
    pub repeat_last_n: usize,
    /// Treat end-of-turn ids as ordinary tokens: generate until `max_new_tokens` or a stop
    /// string (vLLM's `ignore_eos`; for benchmarks and tests).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
            logprobs: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            ignore_eos: false,
        }
    }
}

/// Most alternatives a request may ask log-probs for (OpenAI's and vLLM's default limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A sampling value or a length out of range: `field` as the CLI and the API spell it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
}

impl ParamError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl SamplingParams {
    /// Range-check every knob, the same for `retort serve` and the CLI: temperature finite and
    /// ≥ 0, top-p in (0, 1], repetition penalty finite and > 0, at most
    /// [`MAX_TOP_LOGPROBS`] alternatives, stop strings non-empty.
    pub fn check(&self) -> std::result::Result<(), ParamError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ParamError::new(
                "temperature",
                format!(
                    "temperature must be a finite number ≥ 0 (0 is greedy), got {}",
                    self.temperature
                ),
            ));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(ParamError::new(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(ParamError::new(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be a finite number > 0 (1 is off), got {}",
                    self.repeat_penalty
                ),
            ));
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(ParamError::new(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(ParamError::new("stop", "stop strings must not be empty"));
        }
        Ok(())
    }
}

/// The admission check every generating command shares: a prompt of `prompt_tokens` may ask
/// for `max_new` more tokens only if both fit in `context` (vLLM's rule and wording). `None`
/// means the rest of the context. Returns the generation limit to use.
pub fn admit(
    prompt_tokens: usize,
    max_new: Option<usize>,
    context: usize,
) -> std::result::Result<usize, ParamError> {
    let requested = prompt_tokens.saturating_add(max_new.unwrap_or(0));
    if prompt_tokens >= context || requested > context {
        let detail = match max_new {
            Some(m) => format!(
                "you requested {requested} tokens ({prompt_tokens} in the prompt, {m} for the \
                 completion)"
            ),
            None => format!(
                "your prompt has {prompt_tokens} tokens, which leaves no room for a completion"
            ),
        };
        return Err(ParamError::new(
            "max_tokens",
            format!(
                "This model's maximum context length is {context} tokens. However, {detail}. \
                 Please reduce the length of the prompt or of the completion."
            ),
        ));
    }
    Ok(max_new.unwrap_or(context - prompt_tokens))
}

/// Apply a CTRL repetition penalty to `logits (V)` in place: each distinct id of `recent`
/// (out-of-vocabulary ids ignored) is penalised once, however often it occurs.
pub fn apply_repeat_penalty(logits: &mut [f32], recent: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen: Vec<u32> = recent.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l >= 0.0 {
                *l / penalty
            } else {
                *l * penalty
            };
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// The log-prob of one generated token and of the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// `(id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
    /// Entropy of the model's distribution at this position, in nats (temperature 1).
    pub entropy: f32,
}

/// One generated answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated ids, without the stopping end-of-turn id.
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// One entry per sampled token (the stopping end-of-turn id included) when asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// Picks the next token from a row of logits.
pub struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_p: f64,
}

impl Sampler {
    pub fn new(seed: u64, temperature: f64, top_p: f64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            temperature,
            top_p,
        }
    }

    /// `logits (V)` → token id.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if self.top_p < 1.0 {
            probs = nucleus(probs, total, self.top_p as f32);
        }
        let kept: f32 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f32>() * kept;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// The smallest set of most probable tokens whose mass reaches `top_p · total`, most probable
/// first. Exact; sorts only the 256 largest unless the nucleus is wider than that.
fn nucleus(mut probs: Vec<(u32, f32)>, total: f32, top_p: f32) -> Vec<(u32, f32)> {
    let by_prob_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let target = top_p * total;
    const HEAD: usize = 256;
    if probs.len() > HEAD {
        probs.select_nth_unstable_by(HEAD - 1, by_prob_desc);
        let mut head = probs[..HEAD].to_vec();
        head.sort_unstable_by(by_prob_desc);
        let mut acc = 0.0;
        for (i, p) in head.iter().enumerate() {
            acc += p.1;
            if acc >= target {
                head.truncate(i + 1);
                return head;
            }
        }
    }
    probs.sort_unstable_by(by_prob_desc);
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p.1;
        if acc >= target {
            probs.truncate(i + 1);
            break;
        }
    }
    probs
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generate a completion for each prompt (token ids), all prompts advancing together.
/// `on_text(row, piece)` receives each row's newly decoded text as it appears (for streaming).
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    let each: Vec<SamplingParams> = (0..prompts.len())
        .map(|i| SamplingParams {
            seed: params.seed.wrapping_add(i as u64),
            ..params.clone()
        })
        .collect();
    generate_each(model, tokenizer, prompts, &each, on_text)
}

/// Like [`generate`], with each prompt's own sampling parameters (its seed used as given): all
/// prompts start together, rows that finish early leave the batch.
pub fn generate_each(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    on_text: impl FnMut(usize, &str),
) -> Result<Vec<Completion>> {
    let mut out: Vec<Option<Completion>> = vec![None; prompts.len()];
    crate::batching::generate_continuous(
        model,
        tokenizer,
        prompts,
        params,
        prompts.len(),
        on_text,
        |i, c| out[i] = Some(c),
    )?;
    out.into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.ok_or_else(|| {
                Error::invalid(
                    format!("prompt {i} got no completion"),
                    "this is a bug in retort's batching",
                )
            })
        })
        .collect()
}

/// Log-softmax of `logits` at `id`, and the `n` most likely `(id, logprob)`.
pub fn token_logprob(logits: &[f32], id: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // One pass: Z = Σ e^(l − max) and Σ e^(l − max)·(l − max); H = ln Z − Σ p·(l − max).
    let (z, zl) = logits.iter().fold((0.0f64, 0.0f64), |(z, zl), &l| {
        let d = (l - max) as f64;
        let e = d.exp();
        (z + e, zl + e * d)
    });
    let lse = max + (z as f32).ln();
    let entropy = (z.ln() - zl / z) as f32;
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(idx.len());
        let by_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        idx.select_nth_unstable_by(n - 1, by_desc);
        idx.truncate(n);
        idx.sort_unstable_by(by_desc);
        top = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse),
        top,
        entropy,
    }
}

/// Greedy next-token ids for every position of `ids (B, T)`: `(B, T)`; a convenience for tests.
pub fn greedy_next(model: &Model, ids: &Tensor) -> Result<Tensor> {
    Ok(model.logits(ids)?.argmax(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        assert_eq!(Sampler::new(0, 0.0, 1.0).sample(&logits), 1);
        let draw = |seed| {
            (0..50)
                .map(|_| 0)
                .fold(Sampler::new(seed, 1.0, 1.0), |s, _: i32| s)
        };
        let mut a = draw(7);
        let mut b = draw(7);
        let xs: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(
            xs.iter().any(|&x| x != xs[0]),
            "temperature 1 should vary: {xs:?}"
        );
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut logits = [2.0f32, -1.0, 0.5, 3.0, 0.0];
        // id 0 twice (penalised once), id 1 negative, id 9 outside the vocabulary.
        apply_repeat_penalty(&mut logits, &[0, 1, 0, 9], 2.0);
        assert_eq!(logits, [1.0, -2.0, 0.5, 3.0, 0.0]);
        let mut same = [2.0f32, -1.0];
        apply_repeat_penalty(&mut same, &[0, 1], 1.0);
        assert_eq!(same, [2.0, -1.0]);
        // Greedy now prefers the unpenalised token.
        let mut l = [2.0f32, 1.5];
        apply_repeat_penalty(&mut l, &[0], 1.5);
        assert_eq!(Sampler::new(0, 0.0, 1.0).sample(&l), 1);
    }

    #[test]
    fn nucleus_over_a_large_vocabulary_equals_a_full_sort() {
        // Both branches: a peaked distribution (nucleus inside the top 256) and a flat one.
        for (peak, top_p) in [(8.0f32, 0.9f32), (0.5, 0.5), (2.0, 0.99)] {
            let probs: Vec<(u32, f32)> = (0..5000u32)
                .map(|i| (i, ((i * 7919 % 5000) as f32 / 5000.0 * peak).exp()))
                .collect();
            let total: f32 = probs.iter().map(|p| p.1).sum();
            let mut sorted = probs.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut acc = 0.0;
            let k = sorted
                .iter()
                .position(|p| {
                    acc += p.1;
                    acc >= top_p * total
                })
                .unwrap()
                + 1;
            let got: Vec<u32> = nucleus(probs, total, top_p).iter().map(|p| p.0).collect();
            let want: Vec<u32> = sorted[..k].iter().map(|p| p.0).collect();
            assert_eq!(got, want, "peak {peak}, top_p {top_p}");
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p = 0.5 keeps only the first token.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(1, 1.0, 0.5);
        assert!((0..200).all(|_| s.sample(&logits) == 0));
        let mut s = Sampler::new(1, 1.0, 0.8);
        let picks: std::collections::HashSet<u32> = (0..500).map(|_| s.sample(&logits)).collect();
        assert_eq!(picks, [0u32, 1].into_iter().collect());
    }
}
