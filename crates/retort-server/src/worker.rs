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
    /// The model thread: (1) take the jobs that arrived (wait for one when idle), (2) free the
    /// rows of clients that went away, (3) run one step of the batch and deliver its events.
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
        let mut jobs = Jobs::default();
        loop {
            // 1. Jobs: wait for one when idle, else take whatever has arrived.
            let mut arrived = Vec::new();
            if engine.is_idle() {
                match rx.recv() {
                    Ok(j) => arrived.push(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                arrived.push(j);
            }
            for job in arrived {
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
                    } => jobs.submit(&mut engine, &metrics, prompt, params, (stream, reply)),
                }
            }
            // 2. Clients that went away free their rows.
            jobs.cancel_gone(&mut engine, &metrics);
            // 3. One step of the batch.
            if !engine.is_idle() {
                let before = engine.stats().steps;
                match engine.step() {
                    Ok(events) => {
                        for e in events {
                            jobs.deliver(&mut engine, &metrics, e);
                        }
                    }
                    Err(e) => {
                        // The batch's state is unknown after an error: fail every request in
                        // it and start afresh.
                        tracing::error!("generation failed: {e}");
                        jobs.fail_all(&mut engine, &metrics, &e.to_string());
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

/// The generation jobs in the batch and which row belongs to which job's choice.
#[derive(Default)]
struct Jobs {
    active: HashMap<u64, Active>,
    /// row → (job, choice)
    owner: HashMap<u64, (u64, usize)>,
    next_job: u64,
    next_row: u64,
}

type Reply = oneshot::Sender<Result<Vec<Completion>, String>>;
type Stream = Option<tmpsc::UnboundedSender<(usize, String)>>;

impl Jobs {
    /// A job's choices into the batch, one row each (a refusal answers the job at once).
    fn submit(
        &mut self,
        engine: &mut Batcher<'_>,
        metrics: &Metrics,
        prompt: Vec<u32>,
        params: Vec<SamplingParams>,
        (stream, reply): (Stream, Reply),
    ) {
        let id = self.next_job;
        self.next_job += 1;
        let admitted = params.len();
        let mut rows = Vec::with_capacity(params.len());
        let mut failed = None;
        for (c, p) in params.into_iter().enumerate() {
            let row = self.next_row;
            self.next_row += 1;
            if let Err(e) = engine.submit(row, prompt.clone(), p) {
                failed = Some(e.to_string());
                break;
            }
            self.owner.insert(row, (id, c));
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
            finish(engine, &mut self.owner, a, Err(e), metrics);
        } else {
            self.active.insert(id, a);
        }
    }

    /// Cancel the jobs whose client went away (reply or stream receiver dropped).
    fn cancel_gone(&mut self, engine: &mut Batcher<'_>, metrics: &Metrics) {
        let gone: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.gone())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(a) = self.active.remove(&id) {
                metrics.cancelled.fetch_add(1, Ordering::SeqCst);
                finish(engine, &mut self.owner, a, Err("cancelled".into()), metrics);
            }
        }
    }

    /// One event of a step: a text piece to the job's stream, or a finished choice (the job is
    /// answered when its last choice is done).
    fn deliver(&mut self, engine: &mut Batcher<'_>, metrics: &Metrics, e: Event) {
        match e {
            Event::Text(row, piece) => {
                if let Some(&(job, c)) = self.owner.get(&row)
                    && let Some(tx) = self.active.get(&job).and_then(|a| a.stream.as_ref())
                {
                    let _ = tx.send((c, piece));
                }
            }
            Event::Done(row, completion) => {
                let Some((job, c)) = self.owner.remove(&row) else {
                    return;
                };
                metrics
                    .generated_tokens
                    .fetch_add(completion.ids.len() as u64, Ordering::SeqCst);
                let Some(a) = self.active.get_mut(&job) else {
                    return;
                };
                a.done[c] = Some(completion);
                if a.done.iter().all(Option::is_some)
                    && let Some(a) = self.active.remove(&job)
                {
                    let cs = a.done.iter().flatten().cloned().collect();
                    metrics.completed.fetch_add(1, Ordering::SeqCst);
                    let waited = engine.stats().steps.saturating_sub(a.arrived_at_step);
                    metrics
                        .request_steps_sum
                        .fetch_add(waited as u64, Ordering::SeqCst);
                    metrics.request_steps_count.fetch_add(1, Ordering::SeqCst);
                    finish(engine, &mut self.owner, a, Ok(cs), metrics);
                }
            }
        }
    }

    /// Answer every job with `error` and forget every row (the batch is being restarted).
    fn fail_all(&mut self, engine: &mut Batcher<'_>, metrics: &Metrics, error: &str) {
        for (_, a) in self.active.drain() {
            finish(engine, &mut self.owner, a, Err(error.to_string()), metrics);
        }
        self.owner.clear();
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
