//! Continuous batching (Orca, Yu et al. 2022; vLLM's scheduler): up to `max_rows` prompts decode
//! together, one forward pass per step for the whole batch; a prompt joins the running batch at
//! the next step, a row that finishes (or is cancelled) frees its slot at once, and a long prompt
//! is prefilled in chunks between decode steps so it does not stall the rows already decoding.
//! [`Batcher`] is the step-driven engine (`retort serve` feeds it requests as they arrive);
//! [`generate_continuous`] runs a fixed list of prompts through it.
//!
//! All rows share one position axis (the batch's KV cache is `(B, KVH, S, D)`), so a prompt of
//! `L` tokens joins *aligned to the current position* `p`: it occupies positions `p − L .. p` of
//! its row and the positions before (the previous occupant's) are masked as left padding. A
//! prompt is prefilled on its own from position 0 and its keys rotated forward by `p − L` as
//! they are copied into the row (RoPE rotations compose: `R(a)·R(b) = R(a + b)`), which is the
//! same computation as left padding in a static batch, tested equal to each prompt alone. A
//! prompt longer than `p` moves the whole batch forward first (`Model::unshift_cache`).
//!
//! **Bounded by construction.** Every row's span (prompt + generation limit) is at most the
//! limits' `cap` — a longer limit is cut at the context end, where the row finishes with
//! [`FinishReason::Length`] like any other. The batch's cache holds twice the longest span of
//! the rows it has taken (at most `cap`), enlarged when a longer one joins. When the batch
//! reaches the cache's end, the positions no live row needs are dropped and the cached keys
//! rotated back (`Model::shift_cache`). That is always possible: a live row that started at
//! position 0 would have reached its limit. So memory is `max_rows × cap` cached positions at
//! most, fixed before any work, and [`kv_bytes_per_position`] turns a memory budget into
//! `max_rows × cap`.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::generation::{Completion, FinishReason, Sampler, SamplingParams, TokenLogprob};
use crate::generation::{apply_repeat_penalty, token_logprob};
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Bytes one cached position of one row takes: keys and values of every layer, in f32 (the
/// cache's dtype on the CPU, whatever the weights).
pub fn kv_bytes_per_position(cfg: &crate::Config) -> usize {
    2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * DType::F32.size_in_bytes()
}

/// What a [`Batcher`] produced in one step, by the caller's request id.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of a row (complete characters only).
    Text(u64, String),
    /// A row is done; each submitted id gets exactly one `Done` (unless cancelled).
    Done(u64, Completion),
}

/// One prompt being answered: its sampler and what it has produced so far.
struct Row {
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
    sampler: Sampler,
    out: Vec<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    done: Option<FinishReason>,
}

impl Row {
    fn new(id: u64, prompt: Vec<u32>, params: SamplingParams) -> Self {
        Row {
            id,
            sampler: Sampler::new(params.seed, params.temperature, params.top_p),
            done: (params.max_new_tokens == 0).then_some(FinishReason::Length),
            prompt,
            params,
            out: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
        }
    }

    /// Pick the next token from `logits (V)`, record it, and check the stopping rules. Returns
    /// the id to feed to the next decode step.
    fn advance(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        events: &mut Vec<Event>,
    ) -> Result<u32> {
        let p = &self.params;
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
        if !p.ignore_eos && tokenizer.stop_ids().contains(&id) {
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
                events.push(Event::Text(
                    self.id,
                    new_text[self.text.len()..].to_string(),
                ));
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
    /// Fresh caches started (the batch had drained, or nothing was running).
    pub waves: usize,
    /// Prompts that joined a batch that had already decoded (a freed slot or a new row).
    pub joined: usize,
    /// Times finished rows were dropped from the batch.
    pub shrinks: usize,
    /// Times the cache was moved towards position 0 (the batch reached the cache's end).
    pub shifts: usize,
    /// Times the batch was moved away from 0 to make room for a prompt longer than the position.
    pub unshifts: usize,
    /// Times the batch's cache was enlarged for a row with a longer span.
    pub grows: usize,
    /// Prefill forward passes (a prompt in one or more chunks).
    pub prefill_chunks: usize,
    /// Decode steps (forward passes of the whole batch, one token per row).
    pub steps: usize,
    /// Σ over decode steps of the rows in the batch, live or not.
    pub row_steps: usize,
    /// Rows cancelled by the caller.
    pub cancelled: usize,
}

/// Limits of a [`Batcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherLimits {
    /// Rows decoding together at most.
    pub max_rows: usize,
    /// Positions of the cache; every row's prompt + generation fits in it (at most the model's
    /// context).
    pub cap: usize,
    /// Prompt tokens prefilled per step while other rows decode.
    pub prefill_chunk: usize,
}

/// A prompt waiting for a slot.
struct Waiting {
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
}

/// A prompt being prefilled from position 0 in its own one-row cache.
struct Prefill {
    w: Waiting,
    cache: KvCache,
    done: usize,
}

/// The running batch.
struct Batch {
    cache: KvCache,
    /// Positions the cache holds now: at least every live row's span, grown (up to the
    /// limits' `cap`) when a row with a longer span joins, so memory follows what is in use.
    cap: usize,
    slots: Vec<Option<Row>>,
    left_pad: Vec<usize>,
    /// Per slot, the id to feed at the next decode step (already sampled and recorded).
    next: Vec<u32>,
    pos: usize,
    /// Whether the batch has decoded since it started (joins after that count as `joined`).
    decoded: bool,
}

/// The step-driven continuous-batching engine: [`Batcher::submit`] prompts at any time,
/// [`Batcher::cancel`] them, and call [`Batcher::step`] until [`Batcher::is_idle`].
pub struct Batcher<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    limits: BatcherLimits,
    pad_id: u32,
    queue: VecDeque<Waiting>,
    prefill: Option<Prefill>,
    batch: Option<Batch>,
    /// `Done` events of rows that finished before reaching the batch.
    early: Vec<Event>,
    stats: BatchStats,
}

impl<'m> Batcher<'m> {
    pub fn new(model: &'m Model, tokenizer: &'m Tokenizer, limits: BatcherLimits) -> Result<Self> {
        let max_pos = model.config().max_position_embeddings;
        if limits.cap == 0 || limits.cap > max_pos || limits.max_rows == 0 {
            return Err(Error::invalid(
                format!(
                    "batch limits {limits:?} are out of range (the model's context is {max_pos})"
                ),
                "use 1 ≤ max_rows and 1 ≤ cap ≤ max_position_embeddings",
            ));
        }
        Ok(Self {
            model,
            tokenizer,
            limits: BatcherLimits {
                prefill_chunk: limits.prefill_chunk.max(1),
                ..limits
            },
            pad_id: tokenizer.stop_ids().first().copied().unwrap_or(0),
            queue: VecDeque::new(),
            prefill: None,
            batch: None,
            early: Vec::new(),
            stats: BatchStats::default(),
        })
    }

    pub fn limits(&self) -> BatcherLimits {
        self.limits
    }

    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Queue a prompt. A generation limit past the cache's end is cut there (the row then
    /// finishes with `Length`); a prompt that leaves no room for one token is refused.
    pub fn submit(&mut self, id: u64, prompt: Vec<u32>, mut params: SamplingParams) -> Result<()> {
        let cap = self.limits.cap;
        if prompt.is_empty() {
            return Err(Error::invalid(
                format!("prompt {id} is empty"),
                "every prompt needs at least one token",
            ));
        }
        if prompt.len() >= cap {
            return Err(Error::invalid(
                format!(
                    "prompt {id} has {} tokens; the context holds {cap}, leaving no room to generate",
                    prompt.len()
                ),
                "shorten the prompt",
            ));
        }
        params.max_new_tokens = params.max_new_tokens.min(cap - prompt.len());
        if params.max_new_tokens == 0 {
            self.early
                .push(Event::Done(id, Row::new(id, prompt, params).finish()));
            return Ok(());
        }
        self.queue.push_back(Waiting { id, prompt, params });
        Ok(())
    }

    /// Drop request `id` wherever it is (waiting, prefilling or decoding); its slot is free at
    /// the next step. Returns whether it was found.
    pub fn cancel(&mut self, id: u64) -> bool {
        let mut found = false;
        if let Some(i) = self.queue.iter().position(|w| w.id == id) {
            self.queue.remove(i);
            found = true;
        }
        if self.prefill.as_ref().is_some_and(|p| p.w.id == id) {
            self.prefill = None;
            found = true;
        }
        if let Some(b) = &mut self.batch {
            for slot in &mut b.slots {
                if slot.as_ref().is_some_and(|r| r.id == id) {
                    *slot = None;
                    found = true;
                }
            }
        }
        self.early.retain(|e| match e {
            Event::Done(i, _) if *i == id => {
                found = true;
                false
            }
            _ => true,
        });
        if found {
            self.stats.cancelled += 1;
        }
        found
    }

    /// Rows decoding now.
    pub fn running(&self) -> usize {
        self.batch
            .as_ref()
            .map_or(0, |b| b.slots.iter().filter(|s| s.is_some()).count())
    }

    /// Prompts not decoding yet (waiting or being prefilled).
    pub fn waiting(&self) -> usize {
        self.queue.len() + usize::from(self.prefill.is_some())
    }

    /// Bytes held by the batch's and the prefill's caches.
    pub fn cache_bytes(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.cache.reserved_bytes())
            + self
                .prefill
                .as_ref()
                .map_or(0, |p| p.cache.reserved_bytes())
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
            && self.prefill.is_none()
            && self.batch.is_none()
            && self.early.is_empty()
    }

    /// Slots a new row could take now: free slots, or rows the batch may still grow by.
    fn free_rows(&self) -> usize {
        match &self.batch {
            None => self.limits.max_rows,
            Some(b) => {
                let free = b.slots.iter().filter(|s| s.is_none()).count();
                free + self.limits.max_rows.saturating_sub(b.slots.len())
            }
        }
    }

    /// One unit of work: prefill up to `prefill_chunk` prompt tokens into free slots, then one
    /// decode step for the whole batch. Returns what happened, in order.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = std::mem::take(&mut self.early);
        // 1. Prefill: while nothing decodes there is nobody to starve, so prefill every prompt
        //    a slot is free for (chunk by chunk); otherwise `prefill_chunk` tokens per step.
        let mut budget = self.limits.prefill_chunk;
        loop {
            let live = self.running() > 0;
            if live && budget == 0 {
                break;
            }
            if self.prefill.is_none() {
                if self.free_rows() == 0 {
                    break;
                }
                let Some(w) = self.queue.pop_front() else {
                    break;
                };
                let cache = self.model.new_cache(w.prompt.len());
                self.prefill = Some(Prefill { w, cache, done: 0 });
            }
            let Some(p) = self.prefill.as_mut() else {
                break;
            };
            // Chunks of at most `prefill_chunk` tokens even when nothing decodes: attention's
            // scores stay `(H, chunk, L)` wide, never `(H, L, L)`.
            let l = p.w.prompt.len();
            let chunk = self.limits.prefill_chunk;
            let take = if live {
                budget.min(l - p.done)
            } else {
                chunk.min(l - p.done)
            };
            let ids = Tensor::new(&p.w.prompt[p.done..p.done + take], self.model.device())?
                .unsqueeze(0)?; // (1, take)
            let hidden = self.model.forward(&ids, p.done, &[], Some(&mut p.cache))?; // (1, take, C)
            self.stats.prefill_chunks += 1;
            p.done += take;
            budget = budget.saturating_sub(take);
            if p.done < l {
                continue;
            }
            let logits = self
                .model
                .lm_head(&hidden.narrow(1, take - 1, 1)?.squeeze(1)?)?; // (1, V)
            let logits = rows_of(&logits)?.remove(0);
            let Some(p) = self.prefill.take() else { break };
            self.join(p, &logits, &mut events)?;
        }
        // 2. One decode step for the batch.
        self.decode(&mut events)?;
        Ok(events)
    }

    /// Sample a prefilled prompt's first token and put it into the batch.
    fn join(&mut self, p: Prefill, logits: &[f32], events: &mut Vec<Event>) -> Result<()> {
        let Prefill { w, cache: own, .. } = p;
        let l = w.prompt.len();
        let mut row = Row::new(w.id, w.prompt, w.params);
        let first = row.advance(logits, self.tokenizer, events)?;
        if row.done.is_some() {
            events.push(Event::Done(row.id, row.finish()));
            return Ok(());
        }
        // The row's span; room for twice that, so that joining rows rarely force a shift.
        let need = l + row.params.max_new_tokens;
        let roomy = need.saturating_mul(2).clamp(need, self.limits.cap);
        let Some(b) = self.batch.as_mut() else {
            self.stats.waves += 1;
            self.batch = Some(Batch {
                cache: KvCache::with_capacity_from(&own, roomy)?,
                cap: roomy,
                slots: vec![Some(row)],
                left_pad: vec![0],
                next: vec![first],
                pos: l,
                decoded: false,
            });
            return Ok(());
        };
        if need > b.cap {
            let grown = roomy.max(b.cap.saturating_mul(2)).min(self.limits.cap);
            b.cache = KvCache::with_capacity_from(&b.cache, grown)?;
            b.cap = grown;
            self.stats.grows += 1;
        }
        if l > b.pos {
            // Move the batch forward so the prompt ends at the current position.
            let by = l - b.pos;
            self.model.unshift_cache(&mut b.cache, by)?;
            for p in &mut b.left_pad {
                *p += by;
            }
            b.pos = l;
            self.stats.unshifts += 1;
        }
        let s = match b.slots.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                b.cache.add_rows(1)?;
                b.slots.push(None);
                b.left_pad.push(b.pos);
                b.next.push(self.pad_id);
                b.slots.len() - 1
            }
        };
        self.model.place_row(&b.cache, s, &own, b.pos - l)?;
        b.left_pad[s] = b.pos - l;
        b.next[s] = first;
        b.slots[s] = Some(row);
        if b.decoded {
            self.stats.joined += 1;
        }
        Ok(())
    }

    fn decode(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let nothing_waits = self.queue.is_empty() && self.prefill.is_none();
        let Some(b) = self.batch.as_mut() else {
            return Ok(());
        };
        // Slots nothing will fill leave the batch; an empty batch frees its cache.
        if b.slots.iter().any(Option::is_none) && nothing_waits {
            let keep: Vec<usize> = (0..b.slots.len())
                .filter(|&s| b.slots[s].is_some())
                .collect();
            if keep.is_empty() {
                self.batch = None;
                return Ok(());
            }
            b.cache.select_rows(&keep)?;
            self.stats.shrinks += 1;
            b.slots = keep.iter().map(|&s| b.slots[s].take()).collect();
            b.left_pad = keep.iter().map(|&s| b.left_pad[s]).collect();
            b.next = keep.iter().map(|&s| b.next[s]).collect();
        }
        if b.slots.iter().all(Option::is_none) {
            return Ok(()); // every row was cancelled; the next prompt takes a slot
        }
        // At the cache's end, drop the positions no live row needs (see the module docs).
        if b.pos == b.cap {
            let by = (0..b.slots.len())
                .filter(|&s| b.slots[s].is_some())
                .map(|s| b.left_pad[s])
                .min()
                .unwrap_or(0);
            if by == 0 {
                return Err(Error::invalid(
                    format!("a live row fills all {} positions of the cache", b.pos),
                    "this is a bug in retort's batching: a row's limit exceeds the cache",
                ));
            }
            self.model.shift_cache(&mut b.cache, by)?;
            b.pos -= by;
            for p in &mut b.left_pad {
                *p = p.saturating_sub(by);
            }
            self.stats.shifts += 1;
        }
        // ids (B, 1) at position `pos` → logits (B, V).
        let n = b.slots.len();
        let ids = Tensor::from_vec(b.next.clone(), (n, 1), self.model.device())?;
        let pad_arg: &[usize] = if b.left_pad.iter().any(|&p| p > 0) {
            &b.left_pad
        } else {
            &[]
        };
        let hidden = self
            .model
            .forward(&ids, b.pos, pad_arg, Some(&mut b.cache))?; // (B, 1, C)
        let logits = rows_of(&self.model.lm_head(&hidden.squeeze(1)?)?)?;
        b.pos += 1;
        b.decoded = true;
        self.stats.steps += 1;
        self.stats.row_steps += n;
        for (s, slot) in b.slots.iter_mut().enumerate() {
            let Some(row) = slot else { continue };
            b.next[s] = row.advance(&logits[s], self.tokenizer, events)?;
            if row.done.is_some()
                && let Some(row) = slot.take()
            {
                events.push(Event::Done(row.id, row.finish()));
            }
        }
        Ok(())
    }
}

/// Rows of `logits (B, V)` as f32 vectors.
fn rows_of(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// The limits' `cap` for a known set of prompts: room for the longest answer after the longest
/// prompt, with slack (twice the answer) so that joining rows rarely force a shift; at most
/// `context`, at least one position more than the longest prompt when the context allows.
pub fn batch_cap(longest_prompt: usize, most_new: usize, context: usize) -> usize {
    longest_prompt
        .saturating_add(most_new.saturating_mul(2))
        .max(longest_prompt.saturating_add(1))
        .clamp(1, context.max(1))
}

/// Generate a completion for every prompt with at most `max_batch` decoding together,
/// refilling finished rows from the queue (in prompt order). `on_text(i, piece)` streams prompt
/// `i`'s new text; `on_done(i, completion)` is called once per prompt, as soon as it is done.
/// Each prompt's result equals generating it alone, up to float rounding. A generation limit
/// past the model's context ends there with `Length`; a prompt that fills the context is an
/// error (callers check prompts first, see [`crate::generation::admit`]).
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
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let most_new = params.iter().map(|p| p.max_new_tokens).max().unwrap_or(0);
    let cap = batch_cap(longest, most_new, model.config().max_position_embeddings);
    let mut batcher = Batcher::new(
        model,
        tokenizer,
        BatcherLimits {
            max_rows: max_batch.max(1),
            cap,
            prefill_chunk: 512,
        },
    )?;
    for (i, (p, sp)) in prompts.iter().zip(params).enumerate() {
        batcher.submit(i as u64, p.clone(), sp.clone())?;
    }
    while !batcher.is_idle() {
        for e in batcher.step()? {
            match e {
                Event::Text(i, piece) => on_text(i as usize, &piece),
                Event::Done(i, c) => on_done(i as usize, c),
            }
        }
    }
    Ok(batcher.stats())
}
