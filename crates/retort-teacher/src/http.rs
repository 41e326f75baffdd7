//! The OpenAI-compatible HTTP backend: vLLM, SGLang, llama.cpp's server, `retort serve` or a
//! hosted API. Requests run on `concurrency` threads; each is retried with backoff (and the
//! server's `Retry-After`) on refused, dropped or timed-out connections, 408/409/425/429/5xx and
//! malformed bodies, and fails at once on other 4xx. A probe at connect time finds the model and
//! whether the server returns log-probs and honours `n`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::openai::{ChatRequest, ChatResponse, ModelList, Stop, WireMessage};
use crate::retry::{RetryPolicy, Verdict, verdict};
use crate::teacher::{Failure, Finish, GenRequest, Generation, Outcome, Teacher, TeacherId};

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Base URL up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Served model name; `None` picks the first model the server lists.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer …`.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Whole-request timeout (connect, send, wait, receive).
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl HttpConfig {
    pub fn new(base_url: impl Into<String>) -> HttpConfig {
        HttpConfig {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            model: None,
            api_key: None,
            concurrency: 4,
            timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
        }
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    pub models: Vec<String>,
    /// Chat completions carry `logprobs.content` with `top_logprobs`.
    pub logprobs: bool,
    /// `n > 1` returns `n` choices (else retort sends `n` requests with seeds `seed + j`).
    pub n: bool,
}

pub struct HttpTeacher {
    cfg: HttpConfig,
    agent: ureq::Agent,
    id: TeacherId,
    caps: Capabilities,
}

/// A response body, or why there is none.
struct Attempt {
    status: Option<u16>,
    retry_after: Option<String>,
    body: std::result::Result<String, String>,
}

impl HttpTeacher {
    /// Connect to `cfg.base_url` and probe it (one `GET /models`, one small chat request).
    pub fn connect(cfg: HttpConfig) -> Result<HttpTeacher> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut t = HttpTeacher {
            id: TeacherId {
                backend: "http".into(),
                model: cfg.model.clone().unwrap_or_default(),
                fingerprint: cfg.base_url.clone(),
            },
            caps: Capabilities {
                models: vec![],
                logprobs: false,
                n: false,
            },
            cfg,
            agent,
        };
        t.probe()?;
        Ok(t)
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn config(&self) -> &HttpConfig {
        &self.cfg
    }

    fn server_error(&self, reason: impl Into<String>, hint: impl Into<String>) -> Error {
        Error::Server {
            url: self.cfg.base_url.clone(),
            reason: reason.into(),
            hint: hint.into(),
        }
    }

    fn probe(&mut self) -> Result<()> {
        let list: ModelList = self.get("/models").map_err(|f| {
            self.server_error(
                format!("GET /models failed after {} attempt(s): {}", f.attempts, f.reason),
                "is the server running, and does the URL end in /v1 (e.g. http://127.0.0.1:8000/v1)?",
            )
        })?;
        self.caps.models = list.data.iter().map(|m| m.id.clone()).collect();
        match &self.cfg.model {
            Some(m) if !self.caps.models.contains(m) => {
                return Err(self.server_error(
                    format!(
                        "the server does not serve model `{m}`; it lists {:?}",
                        self.caps.models
                    ),
                    "set the teacher's `name` to one of the listed models",
                ));
            }
            Some(_) => {}
            None => {
                let first = self.caps.models.first().cloned().ok_or_else(|| {
                    self.server_error(
                        "GET /models lists no model",
                        "start the server with a model loaded",
                    )
                })?;
                self.id.model = first.clone();
                self.cfg.model = Some(first);
            }
        }
        let body = ChatRequest {
            model: self.id.model.clone(),
            messages: vec![WireMessage {
                role: "user".into(),
                content: "Say hi.".into(),
            }],
            n: Some(2),
            max_tokens: Some(2),
            temperature: Some(1.0),
            seed: Some(0),
            logprobs: Some(true),
            top_logprobs: Some(2),
            ..Default::default()
        };
        let r: std::result::Result<(ChatResponse, usize), Failure> =
            self.post("/chat/completions", &body);
        let (resp, _) = match r {
            Ok(r) => r,
            // Some servers refuse n > 1 or logprobs outright: ask again without them.
            Err(_) => {
                let plain = ChatRequest {
                    n: None,
                    logprobs: None,
                    top_logprobs: None,
                    ..body
                };
                self.post("/chat/completions", &plain).map_err(|f| {
                    self.server_error(
                        format!(
                            "POST /chat/completions failed after {} attempt(s): {}",
                            f.attempts, f.reason
                        ),
                        "check the model name and the API key (teacher `api_key_env`)",
                    )
                })?
            }
        };
        self.caps.n = resp.choices.len() == 2;
        self.caps.logprobs = resp.choices.first().is_some_and(|c| {
            c.logprobs
                .as_ref()
                .and_then(|l| l.content.as_ref())
                .is_some_and(|c| c.first().is_some_and(|t| !t.top_logprobs.is_empty()))
        });
        tracing::info!(url = %self.cfg.base_url, model = %self.id.model, n = self.caps.n, logprobs = self.caps.logprobs, "teacher server probed");
        Ok(())
    }

    fn attempt(&self, path: &str, body: Option<&str>) -> Attempt {
        let url = format!("{}{path}", self.cfg.base_url);
        let auth = self.cfg.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let res = match body {
            Some(b) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(b)
            }
            None => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
        };
        match res {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = resp
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| format!("reading the body: {e}"));
                Attempt {
                    status: Some(status),
                    retry_after,
                    body,
                }
            }
            Err(e) => Attempt {
                status: None,
                retry_after: None,
                body: Err(e.to_string()),
            },
        }
    }

    /// `path` with retries; the parsed body and the attempts it took.
    fn send<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&str>,
    ) -> std::result::Result<(T, usize), Failure> {
        let policy = &self.cfg.retry;
        let mut last = String::new();
        for attempt in 1..=policy.max_attempts.max(1) {
            let a = self.attempt(path, body);
            let v = match (&a.body, a.status) {
                // A 2xx whose body does not read or parse is a server hiccup: retry.
                (Ok(text), Some(200..=299)) => match serde_json::from_str::<T>(text) {
                    Ok(parsed) => return Ok((parsed, attempt)),
                    Err(e) => {
                        last = format!("malformed response body ({e})");
                        Verdict::Retry { retry_after: None }
                    }
                },
                (Err(e), Some(s @ 200..=299)) => {
                    last = format!("HTTP {s}, {e}");
                    Verdict::Retry { retry_after: None }
                }
                (body, status) => {
                    last = match (status, body) {
                        (Some(s), Ok(b)) => {
                            format!("HTTP {s}: {}", b.chars().take(300).collect::<String>())
                        }
                        (Some(s), Err(e)) => format!("HTTP {s}: {e}"),
                        (None, Err(e)) => e.clone(),
                        (None, Ok(_)) => "no status".into(),
                    };
                    verdict(status, a.retry_after.as_deref())
                }
            };
            match v {
                Verdict::Done => {}
                Verdict::Fatal => {
                    return Err(Failure {
                        reason: last,
                        attempts: attempt,
                    });
                }
                Verdict::Retry { retry_after } => {
                    if attempt < policy.max_attempts {
                        let wait = policy.wait(attempt, retry_after, rand::random::<f64>());
                        tracing::debug!(path, attempt, ?wait, reason = %last, "retrying");
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        Err(Failure {
            reason: format!("gave up: {last}"),
            attempts: policy.max_attempts.max(1),
        })
    }

    /// `GET base/path` with retries.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> std::result::Result<T, Failure> {
        self.send(path, None).map(|(t, _)| t)
    }

    /// `POST base/path` with a JSON body, with retries.
    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> std::result::Result<(T, usize), Failure> {
        let text = serde_json::to_string(body).map_err(|e| Failure {
            reason: e.to_string(),
            attempts: 0,
        })?;
        self.send(path, Some(&text))
    }

    fn wire(&self, r: &GenRequest, n: usize, seed: u64) -> ChatRequest {
        let s = &r.sampling;
        let mut messages: Vec<WireMessage> = r
            .messages
            .iter()
            .map(|m| WireMessage {
                role: m.role.as_str().to_string(),
                content: m.content.clone(),
            })
            .collect();
        if let Some(p) = &r.prefill {
            messages.push(WireMessage {
                role: "assistant".into(),
                content: p.clone(),
            });
        }
        ChatRequest {
            model: self.id.model.clone(),
            messages,
            continue_final_message: r.prefill.as_ref().map(|_| true),
            add_generation_prompt: r.prefill.as_ref().map(|_| false),
            n: (n > 1).then_some(n),
            temperature: Some(s.temperature),
            top_p: Some(s.top_p),
            repetition_penalty: (s.repeat_penalty != 1.0).then_some(s.repeat_penalty),
            seed: Some(seed),
            max_tokens: Some(s.max_tokens),
            stop: (!s.stop.is_empty()).then(|| Stop::Many(s.stop.clone())),
            ..Default::default()
        }
    }

    /// One request (all its choices), with retries.
    pub fn chat(&self, r: &GenRequest) -> Outcome {
        let n = r.sampling.n.max(1);
        let calls: Vec<(usize, u64)> = if n == 1 || self.caps.n {
            vec![(n, r.sampling.seed)]
        } else {
            (0..n)
                .map(|j| (1, r.sampling.seed.wrapping_add(j as u64)))
                .collect()
        };
        let mut out = Vec::with_capacity(n);
        let mut attempts = 0;
        for (n_call, seed) in calls {
            let (resp, a): (ChatResponse, usize) =
                self.post("/chat/completions", &self.wire(r, n_call, seed))?;
            attempts += a;
            if resp.choices.len() != n_call {
                return Err(Failure {
                    reason: format!("asked for {n_call} choice(s), got {}", resp.choices.len()),
                    attempts,
                });
            }
            // `usage` is optional in the protocol; a server without it counts 0 tokens in the
            // synth report (only bookkeeping reads these counts).
            let usage = resp.usage.unwrap_or_default();
            for c in resp.choices {
                // Only "length" means cut off; "stop", a tool call, a content filter or no
                // reason all end the answer as it is.
                let finish = match c.finish_reason.as_deref() {
                    Some("length") => Finish::Length,
                    _ => Finish::Stop,
                };
                out.push(Generation {
                    text: c.message.content,
                    finish,
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens / n_call.max(1),
                });
            }
        }
        Ok(out)
    }

    /// Run `work(i)` for every `i < count` on `concurrency` threads, handing each result to
    /// `on_done` on the calling thread as it arrives.
    pub fn run_concurrently<T: Send>(
        &self,
        count: usize,
        work: &(dyn Fn(usize) -> T + Sync),
        on_done: &mut dyn FnMut(usize, T),
    ) {
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::channel::<(usize, T)>();
        std::thread::scope(|scope| {
            for _ in 0..self.cfg.concurrency.clamp(1, count.max(1)) {
                let tx = tx.clone();
                let next = &next;
                scope.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        if tx.send((i, work(i))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            for (i, t) in rx {
                on_done(i, t);
            }
        });
    }
}

impl Teacher for HttpTeacher {
    fn id(&self) -> &TeacherId {
        &self.id
    }

    fn generate(&self, requests: &[GenRequest], on_done: &mut dyn FnMut(usize, Outcome)) {
        self.run_concurrently(requests.len(), &|i| self.chat(&requests[i]), on_done);
    }
}
