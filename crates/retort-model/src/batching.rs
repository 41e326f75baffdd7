//! Continuous batching: up to `max_batch` prompts decode together, one forward pass per step for
//! the whole batch, and a row that finishes hands its slot to the next waiting prompt at once
//! instead of idling until the batch's longest row is done (Orca, Yu et al. 2022; vLLM's
//! scheduler). When nothing is waiting, finished rows are dropped from the batch.
//!
//! All rows share one position axis (the batch's KV cache is `(B, KVH, S, D)`), so a prompt
//! joins *aligned to the current position*: a prompt of `L` tokens admitted at position `p`
//! occupies positions `p − L .. p` of its row, and positions before `p − L` (the previous
//! occupant's) are masked as left padding. RoPE is relative, so this is the same computation as
//! left padding in a static batch, which is tested equal to running each prompt alone. The
//! prompt is prefilled on its own, with `p − L` masked zero positions in front, and its keys
//! and values are copied into the row (`KvCache::write_row`).
//!
//! When a waiting prompt's generation limit no longer fits in the cache, the positions no live
//! row needs any more are dropped and the cached keys rotated back by as many positions
//! (`Model::shift_cache`; RoPE rotations compose), so the batch keeps going in a bounded cache.
//! A prompt longer than the current position waits a few steps; one that still does not fit
//! waits for the next wave (a fresh cache, once the batch drains).

use std::collections::VecDeque;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::generation::{Completion, FinishReason, Sampler, SamplingParams, TokenLogprob};
use crate::generation::{apply_repeat_penalty, token_logprob};
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// One prompt being answered: its sampler and what it has produced so far.
struct Row<'a> {
    /// Index of the prompt in the caller's list.
    index: usize,
    prompt: &'a [u32],
    params: &'a SamplingParams,
    sampler: Sampler,
    out: Vec<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    done: Option<FinishReason>,
}

impl<'a> Row<'a> {
    fn new(index: usize, prompt: &'a [u32], params: &'a SamplingParams) -> Self {
        Row {
            index,
            prompt,
            params,
            sampler: Sampler::new(params.seed, params.temperature, params.top_p),
            out: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            done: (params.max_new_tokens == 0).then_some(FinishReason::Length),
        }
    }

    /// Pick the next token from `logits (V)`, record it, and check the stopping rules. Returns
    /// the id to feed to the next decode step.
    fn advance(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        on_text: &mut impl FnMut(usize, &str),
    ) -> Result<u32> {
        let p = self.params;
        let id = if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            // The window: the last n tokens of prompt + completion.
            let from_out = self.out.len().min(p.repeat_last_n);
            let from_prompt = (p.repeat_last_n - from_out).min(self.prompt.len());
            let mut recent = self.prompt[self.prompt.len() - from_prompt..].to_vec();
            recent.extend_from_slice(&self.out[self.out.len() - from_out..]);
            let mut row = logits.to_vec();
            apply_repeat_penalty(&mut row, &recent, p.repeat_penalty);
            self.sampler.sample(&row)
        } else {
            self.sampler.sample(logits)
        };
        if let Some(n) = p.logprobs {
            self.logprobs.push(token_logprob(logits, id, n));
        }
        if tokenizer.stop_ids().contains(&id) {
            self.done = Some(FinishReason::Stop);
            return Ok(id);
        }
        self.out.push(id);
        let full = tokenizer.decode(&self.out, true)?;
        // Emit only complete characters: decoding a partial UTF-8 sequence yields U+FFFD.
        if !full.ends_with('\u{FFFD}') {
            let mut new_text = full;
            if let Some(cut) = p
                .stop
                .iter()
                .filter_map(|s| new_text.find(s.as_str()))
                .min()
            {
                new_text.truncate(cut);
                self.done = Some(FinishReason::Stop);
            }
            if new_text.len() > self.text.len() && new_text.starts_with(self.text.as_str()) {
                on_text(self.index, &new_text[self.text.len()..]);
            }
            self.text = new_text;
        }
        if self.done.is_none() && self.out.len() >= p.max_new_tokens {
            self.done = Some(FinishReason::Length);
        }
        Ok(id)
    }

    fn finish(self) -> Completion {
        Completion {
            ids: self.out,
            text: self.text,
            finish_reason: self.done.unwrap_or(FinishReason::Length),
            prompt_tokens: self.prompt.len(),
            logprobs: self.logprobs,
        }
    }
}

/// What the scheduler did, for benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Fresh caches started (prefills of a whole batch).
    pub waves: usize,
    /// Prompts that took over the slot of a finished row.
    pub joined: usize,
    /// Times finished rows were dropped from the batch.
    pub shrinks: usize,
    /// Times the cache was moved towards position 0 to make room for a waiting prompt.
    pub shifts: usize,
    /// Decode steps (forward passes of the whole batch, one token per row).
    pub steps: usize,
    /// Σ over decode steps of the rows in the batch, live or not.
    pub row_steps: usize,
}

/// Rows of `logits (B, V)` as f32 vectors.
fn rows_of(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// Prefill `prompt` into row `slot` of `cache` so that its last token sits at position
/// `end − 1`; returns the logits after it, `(V)`.
fn prefill_slot(
    model: &Model,
    cache: &KvCache,
    slot: usize,
    prompt: &[u32],
    end: usize,
    dtype: DType,
) -> Result<Vec<f32>> {
    let l = prompt.len();
    let start = end - l;
    let cfg = model.config();
    let mut own = model.new_cache(end);
    own.append_zeros(
        start,
        cfg.num_key_value_heads,
        cfg.head_dim,
        dtype,
        model.device(),
    )?;
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?; // (1, L)
    let pad = [start];
    let pad_arg: &[usize] = if start > 0 { &pad } else { &[] };
    let hidden = model.forward(&ids, start, pad_arg, Some(&mut own))?; // (1, L, C)
    let logits = model.lm_head(&hidden.narrow(1, l - 1, 1)?.squeeze(1)?)?; // (1, V)
    cache.write_row(slot, &own, start, l)?;
    Ok(rows_of(&logits)?.remove(0))
}

/// Generate a completion for every prompt with at most `max_batch` decoding together,
/// refilling finished rows from the queue (in prompt order). `on_text(i, piece)` streams prompt
/// `i`'s new text; `on_done(i, completion)` is called once per prompt, as soon as it is done.
/// Each prompt's result equals generating it alone, up to float rounding.
pub fn generate_continuous(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
    max_batch: usize,
    mut on_text: impl FnMut(usize, &str),
    mut on_done: impl FnMut(usize, Completion),
) -> Result<BatchStats> {
    if params.len() != prompts.len() {
        return Err(Error::invalid(
            format!(
                "{} prompts but {} sampling parameter sets",
                prompts.len(),
                params.len()
            ),
            "pass one SamplingParams per prompt",
        ));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::invalid(
            format!("prompt {i} is empty"),
            "every prompt needs at least one token",
        ));
    }
    let max_batch = max_batch.max(1);
    let mut stats = BatchStats::default();
    let device = model.device().clone();
    let pad_id = tokenizer.stop_ids().first().copied().unwrap_or(0);
    let max_pos = model.config().max_position_embeddings;
    // A prompt with no room to generate is done before it starts.
    let mut queue: VecDeque<usize> = VecDeque::new();
    for (i, (p, sp)) in prompts.iter().zip(params).enumerate() {
        if sp.max_new_tokens == 0 {
            on_done(i, Row::new(i, p, sp).finish());
        } else {
            queue.push_back(i);
        }
    }
    while !queue.is_empty() {
        // 1. A wave: the first prompts of the queue, left-padded, prefilled in one pass.
        stats.waves += 1;
        let take = max_batch.min(queue.len());
        let first: Vec<usize> = queue.drain(..take).collect();
        let wave_prompt = first.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
        let wave_new = first
            .iter()
            .map(|&i| params[i].max_new_tokens)
            .max()
            .unwrap_or(0);
        let all_new = queue
            .iter()
            .map(|&i| params[i].max_new_tokens)
            .max()
            .unwrap_or(0)
            .max(wave_new);
        let all_prompt = queue
            .iter()
            .map(|&i| prompts[i].len())
            .max()
            .unwrap_or(0)
            .max(wave_prompt);
        // Room for the wave and for every later prompt to join. A live row started less than
        // `all_new + all_prompt` positions ago (it would be done otherwise), so after shifting
        // the cache to the oldest live row's start, `all_prompt + 2·all_new` positions always
        // leave room for one more row — unless the model's context is shorter than that.
        let cap = (all_prompt + 2 * all_new)
            .min(max_pos)
            .max(wave_prompt + wave_new);
        let mut left_pad: Vec<usize> = first
            .iter()
            .map(|&i| wave_prompt - prompts[i].len())
            .collect();
        let mut flat = Vec::with_capacity(first.len() * wave_prompt);
        for (&i, &pad) in first.iter().zip(&left_pad) {
            flat.extend(std::iter::repeat_n(pad_id, pad));
            flat.extend_from_slice(&prompts[i]);
        }
        let ids = Tensor::from_vec(flat, (first.len(), wave_prompt), &device)?;
        let mut cache = model.new_cache(cap);
        let pad_arg: &[usize] = if left_pad.iter().any(|&p| p > 0) {
            &left_pad
        } else {
            &[]
        };
        let hidden = model.forward(&ids, 0, pad_arg, Some(&mut cache))?; // (B, P, C)
        let dtype = hidden.dtype();
        let mut logits = model.lm_head(&hidden.narrow(1, wave_prompt - 1, 1)?.squeeze(1)?)?; // (B, V)
        let mut slots: Vec<Option<Row>> = first
            .iter()
            .map(|&i| Some(Row::new(i, &prompts[i], &params[i])))
            .collect();
        let mut pos = wave_prompt;
        // Once a waiting prompt cannot fit in this cache, nothing more joins this wave.
        let mut draining = false;
        loop {
            // 2. One token for every live row; finished rows free their slot.
            let rows = rows_of(&logits)?;
            let mut next = vec![pad_id; slots.len()];
            for (s, slot) in slots.iter_mut().enumerate() {
                let finished = match slot {
                    Some(row) => {
                        next[s] = row.advance(&rows[s], tokenizer, &mut on_text)?;
                        row.done.is_some()
                    }
                    None => false,
                };
                if let Some(row) = slot.take_if(|_| finished) {
                    on_done(row.index, row.finish());
                }
            }
            // 3. Free slots take waiting prompts, aligned to end at the current position.
            for s in 0..slots.len() {
                while slots[s].is_none() && !draining {
                    let Some(&i) = queue.front() else { break };
                    let l = prompts[i].len();
                    if l > pos {
                        break; // it fits once the batch has advanced further
                    }
                    if pos + params[i].max_new_tokens > cap {
                        // Make room: drop the positions no live row still needs.
                        let live = || (0..slots.len()).filter(|&r| slots[r].is_some());
                        let by = live().map(|r| left_pad[r]).min().unwrap_or(0);
                        if by == 0 || pos - by + params[i].max_new_tokens > cap || l > pos - by {
                            draining = true;
                            break;
                        }
                        model.shift_cache(&mut cache, by)?;
                        pos -= by;
                        for p in &mut left_pad {
                            *p = p.saturating_sub(by);
                        }
                        stats.shifts += 1;
                    }
                    queue.pop_front();
                    let first_logits = prefill_slot(model, &cache, s, &prompts[i], pos, dtype)?;
                    let mut row = Row::new(i, &prompts[i], &params[i]);
                    next[s] = row.advance(&first_logits, tokenizer, &mut on_text)?;
                    left_pad[s] = pos - l;
                    stats.joined += 1;
                    if row.done.is_some() {
                        on_done(i, row.finish());
                    } else {
                        slots[s] = Some(row);
                    }
                }
            }
            if slots.iter().all(Option::is_none) {
                break; // the wave is over; the queue (if any) starts the next one
            }
            // 4. Slots nothing can fill any more leave the batch.
            if slots.iter().any(Option::is_none) && (queue.is_empty() || draining) {
                let keep: Vec<usize> = (0..slots.len()).filter(|&s| slots[s].is_some()).collect();
                cache.select_rows(&keep)?;
                stats.shrinks += 1;
                slots = keep.iter().map(|&s| slots[s].take()).collect();
                left_pad = keep.iter().map(|&s| left_pad[s]).collect();
                next = keep.iter().map(|&s| next[s]).collect();
            }
            // 5. One decode step for the batch: ids (B, 1) at position `pos` → logits (B, V).
            let b = slots.len();
            let ids = Tensor::from_vec(next, (b, 1), &device)?;
            let pad_arg: &[usize] = if left_pad.iter().any(|&p| p > 0) {
                &left_pad
            } else {
                &[]
            };
            let hidden = model.forward(&ids, pos, pad_arg, Some(&mut cache))?; // (B, 1, C)
            logits = model.lm_head(&hidden.squeeze(1)?)?;
            pos += 1;
            stats.steps += 1;
            stats.row_steps += b;
        }
    }
    Ok(stats)
}
