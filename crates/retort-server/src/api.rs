//! HTTP routes of `retort serve` and their translation to model jobs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use retort_data::{Message, Role};
use retort_model::generation::{FinishReason, SamplingParams};
use retort_model::{Tokenizer, WeightFormat, checkpoint};
use retort_teacher::openai::{
    ChatChoice, ChatChunk, ChatRequest, ChatResponse, ChoiceLogprobs, ChunkChoice,
    CompletionChoice, CompletionRequest, CompletionResponse, Delta, ModelCard, ModelList, Prompt,
    PromptLogprob, TokenLogprob, TopLogprob, Usage, WireMessage,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::worker::{Job, Worker};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// Name clients use in `model` (default: the file or directory name).
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    /// Weights for generation (scoring always uses f32).
    pub weights: WeightFormat,
    /// Rows generated together at most.
    pub max_batch: usize,
    /// If set, every request must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

struct AppState {
    name: String,
    tokenizer: Tokenizer,
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    api_key: Option<String>,
}

type Shared = Arc<AppState>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body =
        serde_json::json!({"error": {"message": message.into(), "type": "invalid_request_error"}});
    (status, Json(body)).into_response()
}

fn authorized(s: &AppState, headers: &HeaderMap) -> bool {
    match &s.api_key {
        None => true,
        Some(k) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.strip_prefix("Bearer ") == Some(k.as_str())),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Hand `job` to the model thread; `Err` is the error response to return.
fn send_job(s: &AppState, job: Job) -> Result<(), (StatusCode, &'static str)> {
    let tx = s.jobs.lock().map_err(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "model thread lock poisoned",
        )
    })?;
    tx.send(job).map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the model thread has stopped",
        )
    })
}

async fn models(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
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

async fn chat(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<ChatRequest>,
) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    }
    if !req.model.is_empty() && req.model != s.name {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "model `{}` is not served here; this server serves `{}`",
                req.model, s.name
            ),
        );
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let Some(r) = role(&m.role) else {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "messages[{i}].role `{}` is not system, user or assistant",
                    m.role
                ),
            );
        };
        messages.push(Message::new(r, m.content.clone()));
    }
    // A final assistant message is continued (vLLM's continue_final_message; llama.cpp's prefill).
    let continue_last = messages.last().is_some_and(|m| m.role == Role::Assistant)
        && req.add_generation_prompt != Some(true);
    let prompt = if continue_last {
        let prefill = messages.pop().map(|m| m.content).unwrap_or_default();
        s.tokenizer.encode_prompt_prefilled(&messages, &prefill)
    } else {
        s.tokenizer.encode_prompt(&messages)
    };
    let prompt = match prompt {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let n = req.n.unwrap_or(1);
    if n == 0 || n > 16 {
        return error(StatusCode::BAD_REQUEST, "n must be between 1 and 16");
    }
    let base = SamplingParams {
        max_new_tokens: req.max_tokens.unwrap_or(256),
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed.unwrap_or_else(rand::random),
        stop: req.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        logprobs: req
            .logprobs
            .unwrap_or(false)
            .then_some(req.top_logprobs.unwrap_or(0).min(20)),
        repeat_penalty: req.repetition_penalty.unwrap_or(1.0) as f32,
        ..SamplingParams::default()
    };
    let params: Vec<SamplingParams> = (0..n)
        .map(|j| SamplingParams {
            seed: base.seed.wrapping_add(j as u64),
            ..base.clone()
        })
        .collect();
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let (reply_tx, reply_rx) = oneshot::channel();
    if req.stream == Some(true) {
        let (tx, rx) = tmpsc::unbounded_channel();
        if let Err((status, message)) = send_job(
            &s,
            Job::Chat {
                prompt,
                params,
                stream: Some(tx),
                reply: reply_tx,
            },
        ) {
            return error(status, message);
        }
        let (name, created) = (s.name.clone(), now());
        let chunk = move |index: usize, delta: Delta, finish: Option<String>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: name.clone(),
            choices: vec![ChunkChoice {
                index,
                delta,
                finish_reason: finish,
            }],
        };
        let c2 = chunk.clone();
        let head = stream::iter((0..n).map(move |i| {
            c2(
                i,
                Delta {
                    role: Some("assistant".into()),
                    content: None,
                },
                None,
            )
        }));
        let c3 = chunk.clone();
        let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .map(move |(i, piece)| {
                c3(
                    i,
                    Delta {
                        role: None,
                        content: Some(piece),
                    },
                    None,
                )
            });
        let tail = stream::once(reply_rx).flat_map(move |r| {
            let finishes: Vec<ChatChunk> = match r {
                Ok(Ok(cs)) => cs
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        chunk(
                            i,
                            Delta::default(),
                            Some(finish_str(c.finish_reason).into()),
                        )
                    })
                    .collect(),
                _ => vec![],
            };
            stream::iter(finishes)
        });
        let events = head
            .chain(body)
            .chain(tail)
            .map(|c| {
                Ok::<Event, std::convert::Infallible>(
                    Event::default().data(serde_json::to_string(&c).unwrap_or_default()),
                )
            })
            .chain(stream::once(async { Ok(Event::default().data("[DONE]")) }));
        return Sse::new(events).into_response();
    }
    if let Err((status, message)) = send_job(
        &s,
        Job::Chat {
            prompt,
            params,
            stream: None,
            reply: reply_tx,
        },
    ) {
        return error(status, message);
    }
    let completions = match reply_rx.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model thread dropped the request",
            );
        }
    };
    let prompt_tokens = completions.first().map_or(0, |c| c.prompt_tokens);
    let completion_tokens: usize = completions.iter().map(|c| c.ids.len()).sum();
    let choices = completions
        .into_iter()
        .enumerate()
        .map(|(i, c)| ChatChoice {
            index: i,
            finish_reason: Some(finish_str(c.finish_reason).into()),
            logprobs: req.logprobs.unwrap_or(false).then(|| ChoiceLogprobs {
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
                content: c.text,
            },
        })
        .collect();
    Json(ChatResponse {
        id,
        object: "chat.completion".into(),
        created: now(),
        model: s.name.clone(),
        choices,
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }),
    })
    .into_response()
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// `/v1/completions`: scoring only (`prompt_logprobs`), as `retort label` uses it; generation
/// goes through `/v1/chat/completions`.
async fn completions(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<CompletionRequest>,
) -> Response {
    if !authorized(&s, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    }
    let Some(k) = req.prompt_logprobs else {
        return error(
            StatusCode::BAD_REQUEST,
            "retort serve implements /v1/completions for prompt_logprobs scoring only; use /v1/chat/completions to generate",
        );
    };
    let ids = match req.prompt {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => match s.tokenizer.encode(&t) {
            Ok(ids) => ids,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
    };
    let vocab = s.tokenizer.vocab_size();
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("token id {bad} is outside the vocabulary ({vocab})"),
        );
    }
    if k == 0 || k > 1024 {
        return error(
            StatusCode::BAD_REQUEST,
            "prompt_logprobs must be between 1 and 1024",
        );
    }
    let (tx, rx) = oneshot::channel();
    if let Err((status, message)) = send_job(
        &s,
        Job::Score {
            ids: ids.clone(),
            k,
            reply: tx,
        },
    ) {
        return error(status, message);
    }
    let rows = match rx.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model thread dropped the request",
            );
        }
    };
    let prompt_logprobs = rows
        .into_iter()
        .map(|row| {
            row.map(|entries| {
                entries
                    .into_iter()
                    .map(|(id, lp, rank)| {
                        (
                            id.to_string(),
                            PromptLogprob {
                                logprob: lp,
                                rank: Some(rank),
                                decoded_token: Some(token_text(&s.tokenizer, id)),
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>()
            })
        })
        .collect();
    Json(CompletionResponse {
        id: format!("cmpl-{:016x}", rand::random::<u64>()),
        object: "text_completion".into(),
        created: now(),
        model: s.name.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text: String::new(),
            finish_reason: Some("length".into()),
            prompt_logprobs: Some(prompt_logprobs),
        }],
        usage: Some(Usage {
            prompt_tokens: ids.len(),
            completion_tokens: 0,
            total_tokens: ids.len(),
        }),
    })
    .into_response()
}

/// Load the model, bind, call `ready(addr)`, and serve until Ctrl-C.
pub fn serve(opts: ServeOptions, ready: impl FnOnce(SocketAddr)) -> std::io::Result<()> {
    let (gen_model, tokenizer) =
        checkpoint::load(&opts.model, opts.weights, &candle_core::Device::Cpu)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    let name = opts.name.clone().unwrap_or_else(|| {
        opts.model
            .file_name()
            .map_or_else(|| "model".into(), |f| f.to_string_lossy().into_owned())
    });
    let (tx, rx) = mpsc::channel();
    let worker = Worker {
        gen_model,
        tokenizer: tokenizer.clone(),
        path: opts.model.clone(),
        score_model: None,
        max_batch: opts.max_batch.max(1),
    };
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || worker.run(rx))?;
    let state = Arc::new(AppState {
        name,
        tokenizer,
        jobs: std::sync::Mutex::new(tx),
        api_key: opts.api_key.clone(),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .with_state(state);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await?;
        ready(listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })
}
