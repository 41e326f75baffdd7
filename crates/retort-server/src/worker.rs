//! The model thread: owns the generation model (and, once scoring is asked for, an f32 copy)
//! and feeds every request's choices into one continuous batch ([`Batcher`]): a request joins
//! the running batch at the next decoding step, long prompts are prefilled in chunks between
//! steps, and a request whose client has gone (its reply or stream receiver dropped) is
//! cancelled at the next step, freeing its rows.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use candle_core::{Device, Tensor};
use retort_model::batching::{Batcher, BatcherLimits, Event};
use retort_model::generation::{Completion, SamplingParams, token_logprob};
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};
use tokio::sync::{mpsc as tmpsc, oneshot};

/// Top entries of one prompt position: `(id, logprob, rank)`, the prompt's own token included.
pub type PositionLogprobs = Vec<(u32, f32, usize)>;

pub enum Job {
    Generate {
        prompt: Vec<u32>,
        /// One row per choice.
        params: Vec<SamplingParams>,
        /// `(choice, text piece)` as generated, for streaming.
        stream: Option<tmpsc::UnboundedSender<(usize, String)>>,
        reply: oneshot::Sender<Result<Vec<Completion>, String>>,
    },
    Score {
        ids: Vec<u32>,
        k: usize,
        reply: oneshot::Sender<Result<Vec<Option<PositionLogprobs>>, String>>,
    },
}

/// Counters the HTTP side reads (`GET /metrics`) and admits requests by.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Rows admitted and not yet answered (waiting, prefilling or decoding).
    pub in_flight: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Requests whose client went away before the answer was complete.
    pub cancelled: AtomicU64,
    pub completed: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Σ and count over answered generation requests of the decoding steps between their
    /// arrival at the model thread and their answer (what a request waited, in steps).
    pub request_steps_sum: AtomicU64,
    pub request_steps_count: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cache_bytes: AtomicUsize,
    pub peak_cache_bytes: AtomicUsize,
}

pub struct Worker {
    pub gen_model: Model,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    pub limits: BatcherLimits,
    pub metrics: std::sync::Arc<Metrics>,
}

/// A generation job (chat or completions) in the batch.
struct Active {
    /// Rows counted in `Metrics::in_flight` for it.
    admitted: usize,
    /// The batch's decoding step when the job arrived.
    arrived_at_step: usize,
    rows: Vec<u64>,
    done: Vec<Option<Completion>>,
    stream: Option<tmpsc::UnboundedSender<(usize, String)>>,
    reply: oneshot::Sender<Result<Vec<Completion>, String>>,
}

impl Active {
    fn gone(&self) -> bool {
        self.reply.is_closed() || self.stream.as_ref().is_some_and(|s| s.is_closed())
    }
}

impl Worker {
    pub fn run(self, rx: mpsc::Receiver<Job>) {
        let Worker {
            gen_model,
            tokenizer,
            path,
            limits,
            metrics,
        } = self;
        let device = gen_model.device().clone();
        let mut score_model: Option<Model> = None;
        let mut engine = match Batcher::new(&gen_model, &tokenizer, limits) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot start the batch: {e}");
                return;
            }
        };
        let mut active: HashMap<u64, Active> = HashMap::new();
        let mut owner: HashMap<u64, (u64, usize)> = HashMap::new(); // row → (job, choice)
        let (mut next_job, mut next_row) = (0u64, 0u64);
        loop {
            // 1. Jobs: wait for one when idle, else take whatever has arrived.
            let mut jobs = Vec::new();
            if engine.is_idle() {
                match rx.recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                jobs.push(j);
            }
            for job in jobs {
                match job {
                    Job::Score { ids, k, reply } => {
                        let out = score(&mut score_model, &path, &device, &ids, k)
                            .map_err(|e| e.to_string());
                        let _ = reply.send(out);
                        metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                    Job::Generate {
                        prompt,
                        params,
                        stream,
                        reply,
                    } => {
                        let id = next_job;
                        next_job += 1;
                        let admitted = params.len();
                        let mut rows = Vec::with_capacity(params.len());
                        let mut failed = None;
                        for (c, p) in params.into_iter().enumerate() {
                            let row = next_row;
                            next_row += 1;
                            if let Err(e) = engine.submit(row, prompt.clone(), p) {
                                failed = Some(e.to_string());
                                break;
                            }
                            owner.insert(row, (id, c));
                            rows.push(row);
                        }
                        let a = Active {
                            admitted,
                            arrived_at_step: engine.stats().steps,
                            done: vec![None; rows.len()],
                            rows,
                            stream,
                            reply,
                        };
                        if let Some(e) = failed {
                            finish(&mut engine, &mut owner, a, Err(e), &metrics);
                        } else {
                            active.insert(id, a);
                        }
                    }
                }
            }
            // 2. Clients that went away free their rows.
            let gone: Vec<u64> = active
                .iter()
                .filter(|(_, a)| a.gone())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                if let Some(a) = active.remove(&id) {
                    metrics.cancelled.fetch_add(1, Ordering::SeqCst);
                    finish(
                        &mut engine,
                        &mut owner,
                        a,
                        Err("cancelled".into()),
                        &metrics,
                    );
                }
            }
            // 3. One step of the batch.
            if !engine.is_idle() {
                let before = engine.stats().steps;
                match engine.step() {
                    Ok(events) => {
                        for e in events {
                            match e {
                                Event::Text(row, piece) => {
                                    if let Some(&(job, c)) = owner.get(&row)
                                        && let Some(tx) =
                                            active.get(&job).and_then(|a| a.stream.as_ref())
                                    {
                                        let _ = tx.send((c, piece));
                                    }
                                }
                                Event::Done(row, completion) => {
                                    let Some((job, c)) = owner.remove(&row) else {
                                        continue;
                                    };
                                    metrics
                                        .generated_tokens
                                        .fetch_add(completion.ids.len() as u64, Ordering::SeqCst);
                                    let Some(a) = active.get_mut(&job) else {
                                        continue;
                                    };
                                    a.done[c] = Some(completion);
                                    if a.done.iter().all(Option::is_some)
                                        && let Some(a) = active.remove(&job)
                                    {
                                        let cs = a.done.iter().flatten().cloned().collect();
                                        metrics.completed.fetch_add(1, Ordering::SeqCst);
                                        let waited =
                                            engine.stats().steps.saturating_sub(a.arrived_at_step);
                                        metrics
                                            .request_steps_sum
                                            .fetch_add(waited as u64, Ordering::SeqCst);
                                        metrics.request_steps_count.fetch_add(1, Ordering::SeqCst);
                                        finish(&mut engine, &mut owner, a, Ok(cs), &metrics);
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // The batch's state is unknown after an error: fail every request in
                        // it and start afresh.
                        tracing::error!("generation failed: {e}");
                        for (_, a) in active.drain() {
                            finish(&mut engine, &mut owner, a, Err(e.to_string()), &metrics);
                        }
                        owner.clear();
                        match Batcher::new(&gen_model, &tokenizer, limits) {
                            Ok(fresh) => engine = fresh,
                            Err(e) => {
                                tracing::error!("cannot restart the batch: {e}");
                                return;
                            }
                        }
                    }
                }
                let steps = engine.stats().steps - before;
                metrics
                    .decode_steps
                    .fetch_add(steps as u64, Ordering::SeqCst);
            }
            metrics.running.store(engine.running(), Ordering::SeqCst);
            metrics.waiting.store(engine.waiting(), Ordering::SeqCst);
            let bytes = engine.cache_bytes();
            metrics.cache_bytes.store(bytes, Ordering::SeqCst);
            metrics.peak_cache_bytes.fetch_max(bytes, Ordering::SeqCst);
        }
    }
}

/// Take a job out of the batch (cancelling rows still in it), answer it and release its rows.
fn finish(
    engine: &mut Batcher<'_>,
    owner: &mut HashMap<u64, (u64, usize)>,
    a: Active,
    result: Result<Vec<Completion>, String>,
    metrics: &Metrics,
) {
    for row in &a.rows {
        if owner.remove(row).is_some() {
            engine.cancel(*row);
        }
    }
    metrics.in_flight.fetch_sub(a.admitted, Ordering::SeqCst);
    let _ = a.reply.send(result);
}

/// Log-probs of every prompt position under the f32 model: position 0 has none; position
/// `p` holds the top `k` of `log_softmax(logits[p-1])` and the prompt's own token `ids[p]`.
fn score(
    score_model: &mut Option<Model>,
    path: &std::path::Path,
    device: &Device,
    ids: &[u32],
    k: usize,
) -> retort_model::Result<Vec<Option<PositionLogprobs>>> {
    if score_model.is_none() {
        tracing::info!("loading {} in f32 for scoring", path.display());
        let (m, _) = checkpoint::load(path, WeightFormat::F32, device)?;
        *score_model = Some(m);
    }
    let Some(model) = score_model.as_ref() else {
        return Ok(vec![]);
    };
    let mut out = vec![None];
    if ids.len() < 2 {
        return Ok(out);
    }
    // Chunks of positions through a cache: attention and logits stay `CHUNK` rows wide
    // whatever the prompt's length.
    const CHUNK: usize = 256;
    let inputs = &ids[..ids.len() - 1];
    let mut cache = model.new_cache(inputs.len());
    for (c, part) in inputs.chunks(CHUNK).enumerate() {
        let x = Tensor::new(part, device)?.unsqueeze(0)?; // (1, T)
        let hidden = model.forward(&x, c * CHUNK, &[], Some(&mut cache))?; // (1, T, C)
        let logits = model.lm_head(&hidden)?.squeeze(0)?.to_vec2::<f32>()?; // (T, V)
        for (j, row) in logits.iter().enumerate() {
            let p = c * CHUNK + j;
            let t = token_logprob(row, ids[p + 1], k.max(1));
            let mut entries: Vec<(u32, f32, usize)> = t
                .top
                .iter()
                .enumerate()
                .map(|(r, &(i, lp))| (i, lp, r + 1))
                .collect();
            if !t.top.iter().any(|&(i, _)| i == t.id) {
                let own = row.get(t.id as usize).copied().unwrap_or(f32::NEG_INFINITY);
                let rank = 1 + row.iter().filter(|&&v| v > own).count();
                entries.push((t.id, t.logprob, rank));
            }
            out.push(Some(entries));
        }
    }
    Ok(out)
}
