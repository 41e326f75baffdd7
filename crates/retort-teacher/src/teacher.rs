//! The teacher as the synthetic-data pipeline sees it: something that answers chat requests.
//! Two backends implement it: [`crate::local::LocalTeacher`] (a model in this process, batched)
//! and [`crate::http::HttpTeacher`] (any OpenAI-compatible server, concurrent, with retries).

use retort_data::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How to sample one request's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Choice `j` of a request uses seed `seed + j`.
    pub seed: u64,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Answers per request (OpenAI's `n`).
    #[serde(default = "one")]
    pub n: usize,
    /// Repetition penalty (1.0: off; see `retort_model::generation::SamplingParams`). Left out
    /// of the serialised form when off, so ledgers written before it existed keep their keys.
    #[serde(default = "no_penalty", skip_serializing_if = "is_no_penalty")]
    pub repeat_penalty: f64,
}

fn one() -> usize {
    1
}

/// Serde default of a repetition penalty: off (also used by the synth config).
pub(crate) fn no_penalty() -> f64 {
    1.0
}

fn is_no_penalty(p: &f64) -> bool {
    *p == 1.0
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
            n: 1,
            repeat_penalty: 1.0,
        }
    }
}

/// One chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenRequest {
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    /// The start of the assistant's answer, which the teacher continues; returned texts are
    /// the continuation only. Sent to servers as a final assistant message with vLLM's
    /// `continue_final_message` (also honoured by SGLang, llama.cpp and `retort serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<String>,
}

impl GenRequest {
    /// Content hash of the request for `teacher`: equal requests to the same teacher have the
    /// same key, and any change (a word of the prompt, a sampling parameter, the teacher) gives
    /// a new one. The pipeline's ledger is keyed by it.
    pub fn key(&self, teacher: &TeacherId) -> String {
        let mut body = serde_json::json!({
            "teacher": teacher.key_part(),
            "messages": self.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect::<Vec<_>>(),
            "sampling": self.sampling,
        });
        if let Some(p) = &self.prefill {
            body["prefill"] = p.as_str().into();
        }
        hex::encode(Sha256::digest(body.to_string().as_bytes()))
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    /// Cut off by `max_tokens`: the answer is incomplete.
    Length,
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Which teacher answered: recorded with every output for provenance and hashed into request
/// keys, so a different teacher never reuses another's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherId {
    /// `local` or `http`.
    pub backend: String,
    /// The model file or directory (local) or the served model name (http).
    pub model: String,
    /// Weights digest (local) or the server's base URL (http).
    pub fingerprint: String,
}

impl TeacherId {
    fn key_part(&self) -> String {
        format!("{}:{}:{}", self.backend, self.model, self.fingerprint)
    }
}

/// A failed request, after the retries that made sense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub reason: String,
    pub attempts: usize,
}

/// The outcome of one request: `n` answers, or why there are none.
pub type Outcome = std::result::Result<Vec<Generation>, Failure>;

/// A model that answers chat requests.
pub trait Teacher: Send + Sync {
    fn id(&self) -> &TeacherId;

    /// Answer every request. `on_done(i, outcome)` is called once per request, on the calling
    /// thread, as soon as request `i` is finished (in any order), so callers can record each
    /// answer before the next one arrives.
    fn generate(&self, requests: &[GenRequest], on_done: &mut dyn FnMut(usize, Outcome));
}
