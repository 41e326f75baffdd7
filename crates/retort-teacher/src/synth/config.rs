//! The pipeline file of `retort synth` (TOML), read strictly: an unknown key is an error that
//! names it, and relative paths are taken from the pipeline file's directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the teacher is: a local model file/directory or an OpenAI-compatible server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// GGUF file or Hugging Face directory (local backend).
    pub model: Option<PathBuf>,
    /// Base URL ending in `/v1` (HTTP backend).
    pub url: Option<String>,
    /// Served model name (HTTP); default: the first the server lists.
    pub name: Option<String>,
    /// Name of the environment variable holding the API key (HTTP).
    pub api_key_env: Option<String>,
    /// Local weights: `q8` (default, fastest generation on CPU), `f32` or `quantized`.
    #[serde(default = "default_weights", with = "retort_data::by_name")]
    pub weights: retort_model::WeightFormat,
    /// Local: rows generated together.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// HTTP: requests in flight.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// HTTP: whole-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// HTTP: attempts per request.
    #[serde(default = "default_attempts")]
    pub max_attempts: usize,
    /// HTTP: first backoff wait.
    #[serde(default = "default_backoff")]
    pub backoff_secs: f64,
}

fn default_weights() -> retort_model::WeightFormat {
    retort_model::WeightFormat::Q8_0
}
fn default_batch() -> usize {
    8
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> f64 {
    300.0
}
fn default_attempts() -> usize {
    8
}
fn default_backoff() -> f64 {
    0.5
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SeedsConfig {
    /// JSONL, one seed record per line with every field (and an optional `id`).
    pub path: PathBuf,
    /// Field names of a record, in the order they are shown.
    pub fields: Vec<String>,
    /// How each field is labelled in prompts and in the teacher's output (default: the name).
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExpandConfig {
    /// minijinja template of the user message; sees `examples` (rendered records), `n` and
    /// `format` (the labels joined as `Label: … / Label: …`).
    #[serde(default = "default_expand_template")]
    pub template: String,
    /// Optional minijinja template of the start of the teacher's answer (same variables, plus
    /// `labels`): e.g. the examples as a numbered list ending in `4. User context:`, which the
    /// teacher continues. Small models follow this far better than an instruction alone.
    /// Records that the prefill itself contains are not counted as candidates.
    #[serde(default)]
    pub prefill: Option<String>,
    /// Seeds shown per prompt, sampled without replacement.
    #[serde(default = "default_examples")]
    pub examples_per_prompt: usize,
    /// New records asked for per prompt.
    #[serde(default = "default_ask")]
    pub ask_for: usize,
    #[serde(default = "default_per_round")]
    pub requests_per_round: usize,
    #[serde(default = "default_rounds")]
    pub max_rounds: usize,
    /// Novel inputs wanted; expansion stops once reached.
    pub target: usize,
    #[serde(default = "default_expand_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default = "default_expand_tokens")]
    pub max_tokens: usize,
    /// Repetition penalty on the last 64 tokens, prompt included (1.0: off). Small teachers copy
    /// the examples they are shown and fall into loops; 1.1–1.3 curbs both.
    #[serde(default = "crate::teacher::no_penalty")]
    pub repeat_penalty: f64,
    #[serde(default)]
    pub seed: u64,
}

pub const DEFAULT_EXPAND_TEMPLATE: &str = "Here are examples:\n\n{% for e in examples %}{{ e }}\n\n{% endfor %}Write {{ n }} new, different examples in exactly the same format ({{ format }}).";

fn default_expand_template() -> String {
    DEFAULT_EXPAND_TEMPLATE.into()
}
fn default_examples() -> usize {
    3
}
fn default_ask() -> usize {
    5
}
fn default_per_round() -> usize {
    8
}
fn default_rounds() -> usize {
    30
}
fn default_expand_temperature() -> f64 {
    0.9
}
fn default_top_p() -> f64 {
    0.95
}
fn default_expand_tokens() -> usize {
    320
}

/// A constraint on one field's text.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    pub name: String,
    /// The trimmed text must end with one of these.
    #[serde(default)]
    pub ends_with: Vec<String>,
    /// The trimmed text must not end with any of these.
    #[serde(default)]
    pub not_ends_with: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// A candidate whose ROUGE-L F against a seed or a kept input exceeds this is a near-
    /// duplicate (Self-Instruct uses 0.7).
    #[serde(default = "default_rouge")]
    pub rouge_l_max: f64,
    /// Characters per field.
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    /// Case-insensitive substrings that reject a candidate.
    #[serde(default)]
    pub blocklist: Vec<String>,
    #[serde(default)]
    pub field: Vec<FieldRule>,
    /// Stop expanding after this many rounds in a row whose novel share of parsed candidates
    /// is below `min_novel_fraction`.
    #[serde(default = "default_patience")]
    pub patience: usize,
    #[serde(default = "default_min_novel")]
    pub min_novel_fraction: f64,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            rouge_l_max: default_rouge(),
            min_chars: default_min_chars(),
            max_chars: default_max_chars(),
            blocklist: vec![],
            field: vec![],
            patience: default_patience(),
            min_novel_fraction: default_min_novel(),
        }
    }
}

fn default_rouge() -> f64 {
    0.7
}
fn default_min_chars() -> usize {
    8
}
fn default_max_chars() -> usize {
    500
}
fn default_patience() -> usize {
    3
}
fn default_min_novel() -> f64 {
    0.05
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnswerConfig {
    /// System prompt the teacher answers under.
    pub system: String,
    /// minijinja template of the user message; sees every field by name.
    pub template: String,
    #[serde(default = "default_answer_temperature")]
    pub temperature: f64,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default = "default_answer_tokens")]
    pub max_tokens: usize,
    /// An answer cut off at `max_tokens` is regenerated once with this limit; cut off again,
    /// it is dropped (never silently kept).
    #[serde(default = "default_retry_tokens")]
    pub retry_max_tokens: usize,
    /// Repetition penalty on the last 64 tokens (1.0: off); see `[expand] repeat_penalty`.
    #[serde(default = "crate::teacher::no_penalty")]
    pub repeat_penalty: f64,
    #[serde(default)]
    pub seed: u64,
}

fn default_answer_temperature() -> f64 {
    0.7
}
fn default_answer_tokens() -> usize {
    256
}
fn default_retry_tokens() -> usize {
    512
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Directory for `ledger.sqlite`, `synth.jsonl` and `report.md` (default: `synth-out`).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub teacher: TeacherConfig,
    pub seeds: SeedsConfig,
    pub expand: ExpandConfig,
    #[serde(default)]
    pub filter: FilterConfig,
    pub answer: AnswerConfig,
    #[serde(default)]
    pub output: OutputConfig,
    /// The file it was read from (not part of the TOML).
    #[serde(skip)]
    pub path: PathBuf,
}

impl Pipeline {
    pub fn read(path: &Path) -> Result<Pipeline> {
        let text = fs_err::read_to_string(path)?;
        Pipeline::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Pipeline> {
        let err = |reason: String, hint: &str| Error::Pipeline {
            path: path.to_path_buf(),
            reason,
            hint: hint.into(),
        };
        let mut p: Pipeline = toml::from_str(text).map_err(|e| {
            err(
                e.to_string(),
                "see examples/stock-advisor/pipeline.toml for every key with its meaning",
            )
        })?;
        p.path = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |q: &Path| {
            if q.is_absolute() {
                q.to_path_buf()
            } else {
                base.join(q)
            }
        };
        if let Some(m) = &p.teacher.model {
            p.teacher.model = Some(rel(m));
        }
        p.seeds.path = rel(&p.seeds.path);
        p.output.dir = Some(rel(p
            .output
            .dir
            .as_deref()
            .unwrap_or(Path::new("synth-out"))));
        match (&p.teacher.model, &p.teacher.url) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(err(
                    "[teacher] needs exactly one of `model` (a local GGUF or HF directory) and `url` (an OpenAI-compatible server)".into(),
                    "e.g. model = \"../../assets/SmolLM2-135M-Instruct.Q4_1.gguf\" or url = \"http://127.0.0.1:8000/v1\"",
                ));
            }
        }
        if p.seeds.fields.is_empty() {
            return Err(err(
                "[seeds] fields is empty".into(),
                "list the fields of a seed record, e.g. fields = [\"user_context\", \"question\"]",
            ));
        }
        if p.seeds.labels.is_empty() {
            p.seeds.labels = p.seeds.fields.clone();
        }
        if p.seeds.labels.len() != p.seeds.fields.len() {
            return Err(err(
                format!(
                    "[seeds] has {} fields but {} labels",
                    p.seeds.fields.len(),
                    p.seeds.labels.len()
                ),
                "give one label per field, in the same order",
            ));
        }
        for r in &p.filter.field {
            if !p.seeds.fields.contains(&r.name) {
                return Err(err(
                    format!(
                        "[[filter.field]] names `{}`, which is not a seed field",
                        r.name
                    ),
                    &format!("use one of {:?}", p.seeds.fields),
                ));
            }
        }
        let e = &p.expand;
        if e.examples_per_prompt == 0
            || e.ask_for == 0
            || e.requests_per_round == 0
            || e.target == 0
        {
            return Err(err(
                "[expand] examples_per_prompt, ask_for, requests_per_round and target must be at least 1".into(),
                "e.g. examples_per_prompt = 3, ask_for = 5, requests_per_round = 8, target = 100",
            ));
        }
        if !(0.0..=1.0).contains(&p.filter.rouge_l_max) {
            return Err(err(
                format!(
                    "[filter] rouge_l_max = {} is outside [0, 1]",
                    p.filter.rouge_l_max
                ),
                "Self-Instruct uses 0.7",
            ));
        }
        for (section, v) in [
            ("expand", p.expand.repeat_penalty),
            ("answer", p.answer.repeat_penalty),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(err(
                    format!("[{section}] repeat_penalty = {v} must be positive"),
                    "1.0 is off; 1.1–1.3 curbs repetition loops",
                ));
            }
        }
        for (key, v) in [
            ("[expand] max_tokens", p.expand.max_tokens),
            ("[answer] max_tokens", p.answer.max_tokens),
            ("[answer] retry_max_tokens", p.answer.retry_max_tokens),
        ] {
            if v == 0 {
                return Err(err(
                    format!("{key} = 0 leaves no room for an answer"),
                    "e.g. max_tokens = 512; a local teacher ends an answer at its context",
                ));
            }
        }
        for (section, t, top_p) in [
            ("expand", p.expand.temperature, p.expand.top_p),
            ("answer", p.answer.temperature, p.answer.top_p),
        ] {
            if !(t.is_finite() && t >= 0.0) {
                return Err(err(
                    format!("[{section}] temperature = {t} must be a finite number ≥ 0"),
                    "0 is greedy; 0.7–1.0 gives varied answers",
                ));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(err(
                    format!("[{section}] top_p = {top_p} must be in (0, 1]"),
                    "1.0 is off; 0.9–0.95 trims unlikely tokens",
                ));
            }
        }
        if p.answer.retry_max_tokens < p.answer.max_tokens {
            return Err(err(
                "[answer] retry_max_tokens is below max_tokens".into(),
                "set retry_max_tokens to a larger limit than max_tokens, e.g. twice it",
            ));
        }
        Ok(p)
    }

    pub fn out_dir(&self) -> PathBuf {
        self.output
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("synth-out"))
    }
}
