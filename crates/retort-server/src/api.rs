//! HTTP routes of `retort serve` and their translation to model jobs.
//!
//! Every request is checked before it reaches the model thread: the body parses (a parse error
//! names the field), every sampling value is in range (`SamplingParams::check`, shared with the
//! CLI), and the prompt plus `max_tokens` fits the context (`generation::admit`, vLLM's rule
//! and wording; an omitted `max_tokens` means the rest of the context). Admitted rows are
//! counted: past `max_batch + max_queue` rows a request is answered 503 with `Retry-After`.
//! Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use retort_data::{Message, Role};
use retort_model::batching::{BatcherLimits, kv_bytes_per_position};
use retort_model::generation::{
    Completion, FinishReason, MAX_TOP_LOGPROBS, ParamError, SamplingParams, admit,
};
use retort_model::{Tokenizer, WeightFormat, checkpoint};
use retort_teacher::openai::{
    ChatChoice, ChatChunk, ChatRequest, ChatResponse, ChoiceLogprobs, ChunkChoice,
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Delta, ModelCard,
    ModelList, Prompt, PromptLogprob, TokenLogprob, TopLogprob, Usage, WireMessage,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::worker::{Job, Metrics, PositionLogprobs, Worker};

/// Most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;
/// Most alternatives `prompt_logprobs` may ask for.
pub const MAX_PROMPT_LOGPROBS: usize = 1024;
/// Most log-prob entries (positions × alternatives) one completions answer may hold: it bounds
/// the memory of building the answer (k = 64 over a 32,768-token prompt is exactly this).
pub const MAX_LOGPROB_ENTRIES: usize = 1 << 21;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// Where the model runs (`--device`).
    pub device: candle_core::Device,
    /// Name clients use in `model` (default: the file or directory name).
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    /// Weights for generation (scoring always uses f32).
    pub weights: WeightFormat,
    /// Rows generated together at most.
    pub max_batch: usize,
    /// Rows admitted beyond those decoding (waiting for a slot); past that, 503.
    pub max_queue: usize,
    /// Bytes the key/value caches may take (the batch's and one prefill's).
    pub kv_cache_memory: u64,
    /// Prompt tokens prefilled per decoding step while other requests decode.
    pub prefill_chunk: usize,
    /// If set, every request must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

struct AppState {
    name: String,
    tokenizer: Tokenizer,
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    api_key: Option<String>,
    /// Tokens a prompt plus its completion may take.
    context: usize,
    /// Rows admitted at most (decoding + waiting).
    max_in_flight: usize,
    limits: BatcherLimits,
    kv_budget: u64,
    metrics: Arc<Metrics>,
}

type Shared = Arc<AppState>;

/// An error response in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    fn body(&self) -> serde_json::Value {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => "overloaded_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        serde_json::json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::bad(e.message).param(e.field)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;
/// Where the model thread answers a scoring job: per-position log-probs (`None` at position 0).
type ScoreReply = oneshot::Receiver<Result<Vec<Option<PositionLogprobs>>, String>>;
/// Where the model thread answers a generation job: one completion per choice.
type GenerateReply = oneshot::Receiver<Result<Vec<Completion>, String>>;

/// Parse a JSON body; an error names the field (`messages[0].content`) and the position.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let at = if path == "." {
            String::new()
        } else {
            format!("`{path}`: ")
        };
        let err = ApiError::bad(format!("invalid request body: {at}{inner}"));
        if path == "." { err } else { err.param(path) }
    })
}

fn authorize(s: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let ok = match &s.api_key {
        None => true,
        Some(k) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.strip_prefix("Bearer ") == Some(k.as_str())),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key (send `Authorization: Bearer <key>`)",
        ))
    }
}

fn check_model(s: &AppState, model: &str) -> ApiResult<()> {
    if !model.is_empty() && model != s.name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "The model `{model}` does not exist; this server serves `{}`",
                s.name
            ),
        )
        .param("model"));
    }
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts `rows` against the admission limit until the returned guard is handed to the model
/// thread (which releases them when the job is answered or cancelled).
struct Admission<'a> {
    metrics: &'a Metrics,
    rows: usize,
    armed: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics
                .in_flight
                .fetch_sub(self.rows, Ordering::SeqCst);
        }
    }
}

fn admit_rows(s: &AppState, rows: usize) -> ApiResult<Admission<'_>> {
    let before = s.metrics.in_flight.fetch_add(rows, Ordering::SeqCst);
    let a = Admission {
        metrics: &s.metrics,
        rows,
        armed: true,
    };
    if before + rows > s.max_in_flight {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is at capacity ({} rows decoding or waiting); retry shortly",
                s.max_in_flight
            ),
        );
        e.retry_after = Some(1);
        return Err(e); // `a` is dropped: the rows are released
    }
    Ok(a)
}

/// Admit `rows`, hand the model thread the job `make` builds around its reply channel, and
/// return the receiving end of that channel.
fn submit<T>(
    s: &AppState,
    rows: usize,
    make: impl FnOnce(oneshot::Sender<T>) -> Job,
) -> ApiResult<oneshot::Receiver<T>> {
    let admission = admit_rows(s, rows)?;
    let (tx, rx) = oneshot::channel();
    send_job(s, make(tx), admission)?;
    Ok(rx)
}

/// Hand `job` to the model thread; the rows it holds are then the thread's to release.
fn send_job(s: &AppState, job: Job, mut admission: Admission<'_>) -> ApiResult<()> {
    let tx = s.jobs.lock().map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "model thread lock poisoned",
        )
    })?;
    tx.send(job).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model thread has stopped",
        )
    })?;
    admission.armed = false;
    Ok(())
}

async fn models(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return e.into_response();
    }
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: s.name.clone(),
            object: "model".into(),
            owned_by: "retort".into(),
        }],
    })
    .into_response()
}

async fn health() -> StatusCode {
    StatusCode::OK
}

/// Prometheus text format, as vLLM's `/metrics` (names prefixed `retort_`).
async fn metrics(State(s): State<Shared>) -> Response {
    let m = &s.metrics;
    let gauges = [
        (
            "retort_requests_running",
            "Rows decoding now.",
            m.running.load(Ordering::SeqCst) as u64,
        ),
        (
            "retort_requests_waiting",
            "Rows waiting for a slot or being prefilled.",
            m.waiting.load(Ordering::SeqCst) as u64,
        ),
        (
            "retort_rows_in_flight",
            "Rows admitted and not yet answered.",
            m.in_flight.load(Ordering::SeqCst) as u64,
        ),
        (
            "retort_rows_in_flight_limit",
            "Rows admitted at most (max_batch + max_queue).",
            s.max_in_flight as u64,
        ),
        (
            "retort_kv_cache_bytes",
            "Bytes held by the key/value caches.",
            m.cache_bytes.load(Ordering::SeqCst) as u64,
        ),
        (
            "retort_kv_cache_peak_bytes",
            "Most bytes the key/value caches have held.",
            m.peak_cache_bytes.load(Ordering::SeqCst) as u64,
        ),
        (
            "retort_kv_cache_budget_bytes",
            "The key/value cache budget (--kv-cache-memory).",
            s.kv_budget,
        ),
        (
            "retort_context_tokens",
            "Tokens a prompt and its completion may take.",
            s.context as u64,
        ),
        (
            "retort_max_batch_rows",
            "Rows decoding together at most.",
            s.limits.max_rows as u64,
        ),
    ];
    let counters = [
        (
            "retort_requests_cancelled_total",
            "Requests whose client went away before the answer was complete.",
            m.cancelled.load(Ordering::SeqCst),
        ),
        (
            "retort_requests_completed_total",
            "Generation requests answered.",
            m.completed.load(Ordering::SeqCst),
        ),
        (
            "retort_decode_steps_total",
            "Decoding steps (one token for every row of the batch).",
            m.decode_steps.load(Ordering::SeqCst),
        ),
        (
            "retort_request_decode_steps_sum",
            "Decoding steps between a generation request's arrival at the model thread and its answer, summed.",
            m.request_steps_sum.load(Ordering::SeqCst),
        ),
        (
            "retort_request_decode_steps_count",
            "Generation requests in retort_request_decode_steps_sum.",
            m.request_steps_count.load(Ordering::SeqCst),
        ),
        (
            "retort_generation_tokens_total",
            "Tokens generated.",
            m.generated_tokens.load(Ordering::SeqCst),
        ),
    ];
    let mut out = String::new();
    for (name, help, v) in gauges {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        ));
    }
    for (name, help, v) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn role(r: &str) -> Option<Role> {
    match r {
        "system" | "developer" => Some(Role::System),
        "user" => Some(Role::User),
        "assistant" => Some(Role::Assistant),
        _ => None,
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The sampling knobs both endpoints share, checked, one set per choice (seeds `seed + j`).
#[allow(clippy::too_many_arguments)]
fn sampling(
    s: &AppState,
    prompt_tokens: usize,
    n: Option<usize>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    repetition_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    logprobs: Option<usize>,
    ignore_eos: Option<bool>,
) -> ApiResult<Vec<SamplingParams>> {
    let n = n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::bad(format!("n must be between 1 and {MAX_N}, got {n}")).param("n"));
    }
    let max_new_tokens = admit(prompt_tokens, max_tokens, s.context)?;
    let base = SamplingParams {
        max_new_tokens,
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        seed: seed.unwrap_or_else(rand::random),
        stop: stop.unwrap_or_default(),
        logprobs,
        repeat_penalty: repetition_penalty.unwrap_or(1.0) as f32,
        ignore_eos: ignore_eos.unwrap_or(false),
        ..SamplingParams::default()
    };
    base.check()?;
    if base.stop.len() > 16 {
        return Err(ApiError::bad("at most 16 stop strings").param("stop"));
    }
    Ok((0..n)
        .map(|j| SamplingParams {
            seed: base.seed.wrapping_add(j as u64),
            ..base.clone()
        })
        .collect())
}

/// A chat request turned into a prompt and checked sampling parameters.
fn chat_job(s: &AppState, req: &ChatRequest) -> ApiResult<(Vec<u32>, Vec<SamplingParams>)> {
    check_model(s, &req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty").param("messages"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let Some(r) = role(&m.role) else {
            return Err(ApiError::bad(format!(
                "messages[{i}].role `{}` is not system, developer, user or assistant",
                m.role
            ))
            .param(format!("messages[{i}].role")));
        };
        messages.push(Message::new(r, m.content.clone()));
    }
    if req.top_logprobs.is_some_and(|k| k > 0) && req.logprobs != Some(true) {
        return Err(ApiError::bad("top_logprobs needs logprobs: true").param("top_logprobs"));
    }
    // A final assistant message is continued (vLLM's continue_final_message; llama.cpp's prefill).
    let continue_last = messages.last().is_some_and(|m| m.role == Role::Assistant)
        && req.add_generation_prompt != Some(true);
    let prompt = if continue_last {
        let prefill = messages.pop().map(|m| m.content).unwrap_or_default();
        s.tokenizer.encode_prompt_prefilled(&messages, &prefill)
    } else {
        s.tokenizer.encode_prompt(&messages)
    }
    .map_err(|e| ApiError::bad(e.to_string()).param("messages"))?;
    if req.max_tokens == Some(0) {
        return Err(ApiError::bad("max_tokens must be at least 1").param("max_tokens"));
    }
    let params = sampling(
        s,
        prompt.len(),
        req.n,
        req.max_tokens,
        req.temperature,
        req.top_p,
        req.repetition_penalty,
        req.seed,
        req.stop.clone().map(|s| s.into_vec()),
        req.logprobs
            .unwrap_or(false)
            .then_some(req.top_logprobs.unwrap_or(0)),
        req.ignore_eos,
    )?;
    Ok((prompt, params))
}

async fn chat(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    match chat_inner(s, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(s: Shared, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    authorize(&s, &headers)?;
    let req: ChatRequest = parse(&body)?;
    let (prompt, params) = chat_job(&s, &req)?;
    let n = params.len();
    let prompt_tokens = prompt.len();
    let admission = admit_rows(&s, n)?;
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let (reply_tx, reply_rx) = oneshot::channel();
    if req.stream == Some(true) {
        let (tx, rx) = tmpsc::unbounded_channel();
        send_job(
            &s,
            Job::Generate {
                prompt,
                params,
                stream: Some(tx),
                reply: reply_tx,
            },
            admission,
        )?;
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let (name, created) = (s.name.clone(), now());
        let chunk = move |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: name.clone(),
            choices,
            usage,
        };
        let one = |index: usize, delta: Delta, finish: Option<String>| ChunkChoice {
            index,
            delta,
            finish_reason: finish,
        };
        let head = (0..n)
            .map(|i| {
                let delta = Delta {
                    role: Some("assistant".into()),
                    content: None,
                };
                sse(&chunk(vec![one(i, delta, None)], None))
            })
            .collect();
        let (c1, c2) = (chunk.clone(), chunk.clone());
        return Ok(sse_generation(
            head,
            rx,
            reply_rx,
            move |i, piece| {
                let delta = Delta {
                    role: None,
                    content: Some(piece),
                };
                sse(&c1(vec![one(i, delta, None)], None))
            },
            move |i, f| sse(&c2(vec![one(i, Delta::default(), Some(f.into()))], None)),
            include_usage.then_some(move |cs: &[Completion]| {
                sse(&chunk(vec![], Some(usage(prompt_tokens, cs))))
            }),
        ));
    }
    send_job(
        &s,
        Job::Generate {
            prompt,
            params,
            stream: None,
            reply: reply_tx,
        },
        admission,
    )?;
    let completions = wait(reply_rx).await?;
    let logprobs = req.logprobs.unwrap_or(false);
    let choices = completions
        .iter()
        .enumerate()
        .map(|(i, c)| ChatChoice {
            index: i,
            finish_reason: Some(finish_str(c.finish_reason).into()),
            logprobs: logprobs.then(|| ChoiceLogprobs {
                content: Some(
                    c.logprobs
                        .iter()
                        .map(|t| TokenLogprob {
                            token: token_text(&s.tokenizer, t.id),
                            logprob: t.logprob,
                            bytes: Some(token_text(&s.tokenizer, t.id).into_bytes()),
                            top_logprobs: t
                                .top
                                .iter()
                                .map(|&(id, lp)| TopLogprob {
                                    token: token_text(&s.tokenizer, id),
                                    logprob: lp,
                                    bytes: None,
                                })
                                .collect(),
                        })
                        .collect(),
                ),
            }),
            message: WireMessage {
                role: "assistant".into(),
                content: c.text.clone(),
            },
        })
        .collect();
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion".into(),
        created: now(),
        model: s.name.clone(),
        choices,
        usage: Some(usage(prompt_tokens, &completions)),
    })
    .into_response())
}

fn usage(prompt_tokens: usize, cs: &[Completion]) -> Usage {
    let completion_tokens: usize = cs.iter().map(|c| c.ids.len()).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// One SSE event with `x` as JSON; if `x` cannot be serialized, an error chunk saying so
/// (never an empty event).
fn sse<T: serde::Serialize>(x: &T) -> Event {
    let json = serde_json::to_string(x).unwrap_or_else(|e| {
        let e = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not serialize a chunk: {e}"),
        );
        e.body().to_string()
    });
    Event::default().data(json)
}

/// An error inside a stream that has already answered 200 (OpenAI's and vLLM's form).
fn sse_error(message: &str) -> Event {
    let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message);
    sse(&e.body())
}

async fn wait<T>(rx: oneshot::Receiver<Result<T, String>>) -> ApiResult<T> {
    match rx.await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model thread dropped the request",
        )),
    }
}

/// The prompts of a completions request as token ids.
fn completion_prompts(s: &AppState, prompt: &Prompt) -> ApiResult<Vec<Vec<u32>>> {
    let encode = |t: &str| {
        s.tokenizer
            .encode(t)
            .map_err(|e| ApiError::bad(e.to_string()).param("prompt"))
    };
    let prompts = match prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<ApiResult<_>>()?,
        Prompt::IdLists(l) => l.clone(),
    };
    if prompts.is_empty() || prompts.len() > MAX_N {
        return Err(ApiError::bad(format!(
            "prompt must hold between 1 and {MAX_N} prompts, got {}",
            prompts.len()
        ))
        .param("prompt"));
    }
    let vocab = s.tokenizer.vocab_size();
    for (i, ids) in prompts.iter().enumerate() {
        if ids.is_empty() {
            return Err(ApiError::bad(format!(
                "prompt {i} is empty (no tokens); send at least one token"
            ))
            .param("prompt"));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad(format!(
                "token id {bad} in prompt {i} is outside the vocabulary ({vocab})"
            ))
            .param("prompt"));
        }
    }
    Ok(prompts)
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    match completions_inner(s, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `/v1/completions`: generation from raw prompts (no chat template), `echo` and `logprobs`
/// in the legacy form, and vLLM's `prompt_logprobs` (scored by the f32 model).
async fn completions_inner(s: Shared, headers: HeaderMap, body: Bytes) -> ApiResult<Response> {
    authorize(&s, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    check_model(&s, &req.model)?;
    let prompts = completion_prompts(&s, &req.prompt)?;
    let echo = req.echo.unwrap_or(false);
    let (max_tokens, n) = check_completion(&s, &req, &prompts)?;
    if req.stream == Some(true) {
        return stream_completion(s, &req, &prompts, max_tokens, echo);
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    // Every prompt's jobs go to the model thread first (they batch together), then the
    // answers are collected in order.
    let mut pending = Vec::with_capacity(prompts.len());
    for ids in &prompts {
        pending.push(submit_completion(&s, &req, ids, max_tokens, echo)?);
    }
    for (ids, (score_rx, gen_rx)) in prompts.iter().zip(pending) {
        let scored = match score_rx {
            Some(rx) => Some(wait(rx).await?),
            None => None,
        };
        let generated: Vec<Completion> = match gen_rx {
            Some(rx) => wait(rx).await?,
            None => (0..n)
                .map(|_| Completion {
                    ids: vec![],
                    text: String::new(),
                    finish_reason: FinishReason::Length,
                    prompt_tokens: ids.len(),
                    logprobs: vec![],
                })
                .collect(),
        };
        prompt_tokens += ids.len();
        let prompt_text = if echo {
            s.tokenizer
                .decode(ids, false)
                .map_err(|e| ApiError::bad(e.to_string()).param("prompt"))?
        } else {
            String::new()
        };
        for c in generated {
            completion_tokens += c.ids.len();
            let logprobs = req.logprobs.map(|k| {
                let echoed = if echo { scored.as_deref() } else { None };
                legacy_logprobs(&s.tokenizer, ids, echoed, k, &c)
            });
            choices.push(CompletionChoice {
                index: choices.len(),
                text: format!("{prompt_text}{}", c.text),
                finish_reason: Some(finish_str(c.finish_reason).into()),
                prompt_logprobs: req
                    .prompt_logprobs
                    .and(scored.as_ref())
                    .map(|rows| vllm_prompt_logprobs(&s.tokenizer, rows)),
                logprobs,
            });
        }
    }
    Ok(Json(CompletionResponse {
        id: format!("cmpl-{:016x}", rand::random::<u64>()),
        object: "text_completion".into(),
        created: now(),
        model: s.name.clone(),
        choices,
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }),
    })
    .into_response())
}

/// Everything a `/v1/completions` request is checked for before any work: log-prob counts,
/// each prompt's size with its answer, the answer's log-prob entries, `n`. Returns the tokens to
/// generate per choice (OpenAI's default 16; scoring requests generate nothing) and `n`.
fn check_completion(
    s: &Shared,
    req: &CompletionRequest,
    prompts: &[Vec<u32>],
) -> ApiResult<(usize, usize)> {
    if let Some(k) = req.prompt_logprobs
        && (k == 0 || k > MAX_PROMPT_LOGPROBS)
    {
        return Err(ApiError::bad(format!(
            "prompt_logprobs must be between 1 and {MAX_PROMPT_LOGPROBS}, got {k}"
        ))
        .param("prompt_logprobs"));
    }
    if let Some(k) = req.logprobs
        && k > MAX_TOP_LOGPROBS
    {
        return Err(ApiError::bad(format!(
            "logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"
        ))
        .param("logprobs"));
    }
    // OpenAI's default is 16 tokens; scoring requests (prompt_logprobs) generate nothing.
    let max_tokens = match (req.max_tokens, req.prompt_logprobs) {
        (Some(m), _) => m,
        (None, Some(_)) => 0,
        (None, None) => 16,
    };
    // Every prompt is checked before any work, the size of the answer included.
    for ids in prompts {
        admit(ids.len(), Some(max_tokens), s.context)?;
        let k = req
            .prompt_logprobs
            .unwrap_or(0)
            .max(req.logprobs.unwrap_or(0));
        if k.saturating_mul(ids.len()) > MAX_LOGPROB_ENTRIES {
            return Err(ApiError::bad(format!(
                "{k} log-probs at each of {} prompt positions is more than {MAX_LOGPROB_ENTRIES} \
                 entries in one answer; ask for fewer, or split the prompt",
                ids.len()
            ))
            .param(if req.prompt_logprobs.is_some() {
                "prompt_logprobs"
            } else {
                "logprobs"
            }));
        }
    }
    let n = req.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::bad(format!("n must be between 1 and {MAX_N}, got {n}")).param("n"));
    }
    Ok((max_tokens, n))
}

/// The model-thread jobs of one prompt: scoring its own tokens (for `echo` + `logprobs`, and
/// `prompt_logprobs`) and generating its `n` choices; their reply channels.
fn submit_completion(
    s: &Shared,
    req: &CompletionRequest,
    ids: &[u32],
    max_tokens: usize,
    echo: bool,
) -> ApiResult<(Option<ScoreReply>, Option<GenerateReply>)> {
    // Log-probs of the prompt's own tokens: for echo + logprobs, and prompt_logprobs.
    let score_rx = if req.prompt_logprobs.is_some() || (echo && req.logprobs.is_some()) {
        let k = req
            .prompt_logprobs
            .unwrap_or(0)
            .max(req.logprobs.unwrap_or(0))
            .max(1);
        Some(submit(s, 1, |reply| Job::Score {
            ids: ids.to_vec(),
            k,
            reply,
        })?)
    } else {
        None
    };
    let gen_rx = if max_tokens > 0 {
        let params = sampling(
            s,
            ids.len(),
            req.n,
            Some(max_tokens),
            req.temperature,
            req.top_p,
            req.repetition_penalty,
            req.seed,
            req.stop.clone().map(|s| s.into_vec()),
            req.logprobs,
            req.ignore_eos,
        )?;
        Some(submit(s, params.len(), |reply| Job::Generate {
            prompt: ids.to_vec(),
            params,
            stream: None,
            reply,
        })?)
    } else {
        None
    };
    Ok((score_rx, gen_rx))
}

/// A streamed `/v1/completions` answer: one prompt, `n` choices, text deltas as SSE chunks
/// (`object: "text_completion"`), the echoed prompt first when asked, a finish chunk per choice
/// and, with `stream_options.include_usage`, a last chunk with the usage. Log-probs are not
/// streamed.
fn stream_completion(
    s: Shared,
    req: &CompletionRequest,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    echo: bool,
) -> ApiResult<Response> {
    let [ids] = prompts else {
        return Err(ApiError::bad(
            "stream takes one prompt; send a list of prompts with stream: false",
        )
        .param("prompt"));
    };
    if req.logprobs.is_some() || req.prompt_logprobs.is_some() {
        return Err(ApiError::bad(
            "log-probs are not streamed by retort serve; send stream: false to get them",
        )
        .param("logprobs"));
    }
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens must be at least 1 to stream").param("max_tokens"));
    }
    let params = sampling(
        &s,
        ids.len(),
        req.n,
        Some(max_tokens),
        req.temperature,
        req.top_p,
        req.repetition_penalty,
        req.seed,
        req.stop.clone().map(|s| s.into_vec()),
        None,
        req.ignore_eos,
    )?;
    let n = params.len();
    let prompt_tokens = ids.len();
    let echoed = if echo {
        s.tokenizer
            .decode(ids, false)
            .map_err(|e| ApiError::bad(e.to_string()).param("prompt"))?
    } else {
        String::new()
    };
    let (tx, rx) = tmpsc::unbounded_channel();
    let reply_rx = submit(&s, n, |reply| Job::Generate {
        prompt: ids.clone(),
        params,
        stream: Some(tx),
        reply,
    })?;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let (id, name, created) = (
        format!("cmpl-{:016x}", rand::random::<u64>()),
        s.name.clone(),
        now(),
    );
    let chunk = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: name.clone(),
        choices,
        usage,
    };
    let one = |index: usize, text: String, finish: Option<String>| CompletionChoice {
        index,
        text,
        finish_reason: finish,
        prompt_logprobs: None,
        logprobs: None,
    };
    let head = if echo {
        (0..n)
            .map(|i| sse(&chunk(vec![one(i, echoed.clone(), None)], None)))
            .collect()
    } else {
        vec![]
    };
    let (c1, c2) = (chunk.clone(), chunk.clone());
    Ok(sse_generation(
        head,
        rx,
        reply_rx,
        move |i, piece| sse(&c1(vec![one(i, piece, None)], None)),
        move |i, f| sse(&c2(vec![one(i, String::new(), Some(f.into()))], None)),
        include_usage.then_some(move |cs: &[Completion]| {
            sse(&chunk(vec![], Some(usage(prompt_tokens, cs))))
        }),
    ))
}

/// The SSE body of a streamed generation, for both endpoints: `head`, one event per generated
/// piece (`piece(choice, text)`), one per finished choice (`finish(choice, reason)`), the usage
/// event when given, then `[DONE]`. A failure after the stream started is an error event.
fn sse_generation<U>(
    head: Vec<Event>,
    rx: tmpsc::UnboundedReceiver<(usize, String)>,
    reply_rx: oneshot::Receiver<Result<Vec<Completion>, String>>,
    piece: impl Fn(usize, String) -> Event + Send + 'static,
    finish: impl Fn(usize, &'static str) -> Event + Send + 'static,
    usage_event: Option<U>,
) -> Response
where
    U: Fn(&[Completion]) -> Event + Send + 'static,
{
    let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
        .map(move |(i, p)| piece(i, p));
    let tail = stream::once(reply_rx).flat_map(move |r| {
        let events: Vec<Event> = match r {
            Ok(Ok(cs)) => {
                let mut ev: Vec<Event> = cs
                    .iter()
                    .enumerate()
                    .map(|(i, c)| finish(i, finish_str(c.finish_reason)))
                    .collect();
                if let Some(u) = &usage_event {
                    ev.push(u(&cs));
                }
                ev
            }
            Ok(Err(e)) => vec![sse_error(&e)],
            Err(_) => vec![sse_error("the model thread dropped the request")],
        };
        stream::iter(events)
    });
    let events = stream::iter(head)
        .chain(body)
        .chain(tail)
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok::<Event, std::convert::Infallible>);
    Sse::new(events).into_response()
}

/// vLLM's `prompt_logprobs`: per position, `{id: {logprob, rank, decoded_token}}`.
fn vllm_prompt_logprobs(
    tok: &Tokenizer,
    rows: &[Option<PositionLogprobs>],
) -> Vec<Option<BTreeMap<String, PromptLogprob>>> {
    rows.iter()
        .map(|row| {
            row.as_ref().map(|entries| {
                entries
                    .iter()
                    .map(|&(id, lp, rank)| {
                        (
                            id.to_string(),
                            PromptLogprob {
                                logprob: lp,
                                rank: Some(rank),
                                decoded_token: Some(token_text(tok, id)),
                            },
                        )
                    })
                    .collect()
            })
        })
        .collect()
}

/// The legacy completions `logprobs` object: the echoed prompt's tokens first (the first with
/// `null`), then the generated ones; `top_logprobs` holds the `k` most likely alternatives.
fn legacy_logprobs(
    tok: &Tokenizer,
    prompt: &[u32],
    echoed: Option<&[Option<PositionLogprobs>]>,
    k: usize,
    c: &Completion,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    let mut push = |out: &mut CompletionLogprobs, text: String, lp: Option<f32>, top| {
        out.text_offset.push(offset);
        offset += text.len();
        out.tokens.push(text);
        out.token_logprobs.push(lp);
        out.top_logprobs.push(top);
    };
    if let Some(rows) = echoed {
        for (p, &id) in prompt.iter().enumerate() {
            let entry = rows.get(p).and_then(|r| r.as_ref());
            let own = entry.and_then(|e| e.iter().find(|x| x.0 == id).map(|x| x.1));
            let top = entry.map(|e| {
                e.iter()
                    .filter(|x| x.2 <= k.max(1))
                    .map(|&(i, lp, _)| (token_text(tok, i), lp))
                    .collect::<BTreeMap<_, _>>()
            });
            push(&mut out, token_text(tok, id), own, top);
        }
    }
    // The generated tokens (a stopping end-of-turn id has a log-prob too).
    for t in &c.logprobs {
        let top = t
            .top
            .iter()
            .map(|&(i, lp)| (token_text(tok, i), lp))
            .collect::<BTreeMap<_, _>>();
        push(&mut out, token_text(tok, t.id), Some(t.logprob), Some(top));
    }
    out
}

/// Resolved sizes of the server: the context a request may use and the rows decoding together,
/// from the model and the key/value cache budget.
pub fn limits_for(
    cfg: &retort_model::Config,
    opts: &ServeOptions,
) -> std::io::Result<(BatcherLimits, usize)> {
    let per_position = kv_bytes_per_position(cfg) as u64;
    let max_pos = cfg.max_position_embeddings;
    // One prefill row beside the batch's rows: a budget of two full rows is the least.
    let cap = (opts.kv_cache_memory / (2 * per_position)).min(max_pos as u64) as usize;
    const MIN_CONTEXT: usize = 64;
    if cap < MIN_CONTEXT.min(max_pos) {
        return Err(std::io::Error::other(format!(
            "--kv-cache-memory {} bytes is too small: two rows of {} positions need {} bytes \
             ({per_position} bytes a position)\nhint: raise --kv-cache-memory",
            opts.kv_cache_memory,
            MIN_CONTEXT.min(max_pos),
            2 * per_position * MIN_CONTEXT.min(max_pos) as u64
        )));
    }
    let rows_fit = (opts.kv_cache_memory / (cap as u64 * per_position)).saturating_sub(1) as usize;
    let max_rows = opts.max_batch.clamp(1, rows_fit.max(1));
    Ok((
        BatcherLimits {
            max_rows,
            cap,
            prefill_chunk: opts.prefill_chunk.max(1),
        },
        cap,
    ))
}

/// Load the model, bind, call `ready(addr)`, and serve until Ctrl-C.
pub fn serve(opts: ServeOptions, ready: impl FnOnce(SocketAddr)) -> std::io::Result<()> {
    let (gen_model, tokenizer) = checkpoint::load(&opts.model, opts.weights, &opts.device)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (limits, context) = limits_for(gen_model.config(), &opts)?;
    tracing::info!(
        "key/value cache budget {} MiB: context {context} tokens, {} rows decoding together, \
         {} more waiting",
        opts.kv_cache_memory >> 20,
        limits.max_rows,
        opts.max_queue
    );
    let name = opts.name.clone().unwrap_or_else(|| {
        opts.model
            .file_name()
            .map_or_else(|| "model".into(), |f| f.to_string_lossy().into_owned())
    });
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel();
    let worker = Worker {
        gen_model,
        tokenizer: tokenizer.clone(),
        path: opts.model.clone(),
        limits,
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || worker.run(rx))?;
    let state = Arc::new(AppState {
        name,
        tokenizer,
        jobs: std::sync::Mutex::new(tx),
        api_key: opts.api_key.clone(),
        context,
        max_in_flight: limits.max_rows + opts.max_queue,
        limits,
        kv_budget: opts.kv_cache_memory,
        metrics,
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/health", get(health))
        .route("/metrics", get(metrics_route))
        .fallback(not_found)
        .with_state(state);
    crate::http::serve_until_ctrl_c(&opts.host, opts.port, |addr| {
        ready(addr);
        Ok::<_, std::io::Error>(app)
    })
}

async fn metrics_route(state: State<Shared>) -> Response {
    metrics(state).await
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route `{}`; retort serve has /v1/models, /v1/chat/completions, /v1/completions, \
             /health and /metrics",
            uri.path()
        ),
    )
    .into_response()
}
