//! Recipes: a TOML file that says what to train, from what, on which data, in which stages.
//!
//! ```toml
//! [teacher]                 # needed by KD stages
//! path = "assets/SmolLM2-135M-Instruct.Q4_1.gguf"
//!
//! [student]                 # an HF dir / GGUF to start from, or a depth-pruned teacher
//! num_layers = 10
//!
//! [train]                   # shared by all stages; every field has a default
//! batch_size = 4
//! max_len = 512
//!
//! [[stages]]                # stage 1: KD on synthetic teacher-labelled data
//! name = "synthetic-kd"
//! data = "data/synthetic.jsonl"
//! method = "kd"
//! loss = "forward_kl"
//!
//! [[stages]]                # stage 2: refinement on the human annotations
//! name = "human-sft"
//! data = "data/human.jsonl"
//! method = "sft"
//! ```
//!
//! Unknown fields are errors. `--set key=value` overrides any field by dotted path
//! (`train.batch_size=8`, `stages.1.lr=2e-5`) before validation; relative paths are resolved
//! against the recipe's directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adamw::AdamWParams;
use crate::batch::Truncation;
use crate::error::{Error, Result};
use crate::loss::Divergence;
use crate::schedule::Decay;
use retort_kernels::MatmulPrecision;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub teacher: Option<TeacherSpec>,
    pub student: StudentSpec,
    #[serde(default)]
    pub train: TrainParams,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// A GGUF file or a Hugging Face directory; scored in f32.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A logit cache from `retort label`: KD stages read the teacher's top-k from it instead of
    /// running the teacher. With `path` too, samples missing from the cache are labelled live.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// An OpenAI-compatible server (`http://host:8000/v1`) that scores on-policy stages'
    /// samples through vLLM's `prompt_logprobs` (vLLM, SGLang, `retort serve`). It must serve a
    /// model with the student's tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The served model's name (default: the first the server lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The environment variable holding the server's API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// Start from this model (GGUF or HF dir) ...
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// ... or from the teacher pruned to this many evenly spaced layers ...
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// ... or to exactly these layers.
    #[serde(default)]
    pub keep_layers: Option<Vec<usize>>,
    /// Train LoRA adapters on a frozen base instead of every weight:
    /// `lora = { rank = 16, alpha = 32, targets = ["q_proj", …] }` (`retort_model::lora`).
    #[serde(default)]
    pub lora: Option<retort_model::lora::LoraConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longest sequence in tokens; longer ones follow `truncation`.
    pub max_len: usize,
    pub truncation: Truncation,
    /// Shuffle windows of this many batches are sorted by length (1 = no bucketing).
    pub bucket_batches: usize,
    pub seed: u64,
    /// Warmup as a fraction of each stage's optimizer steps.
    pub warmup_ratio: f64,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub adamw: AdamWParams,
    /// Clip the global gradient norm to this value (0 = off).
    pub max_grad_norm: f64,
    /// Evaluate on the held-out split every N optimizer steps (0 = only at the end of a stage).
    pub eval_every: usize,
    /// Write a checkpoint every N optimizer steps (0 = only at the end of a stage).
    pub save_every: usize,
    /// Step checkpoints kept (older ones are deleted; stage-end checkpoints are kept).
    pub keep_checkpoints: usize,
    /// Held-out fraction of a stage's data when it has no `eval_data`.
    pub eval_fraction: f64,
    /// Rows of logits computed at once by the loss. Unset: derived from the student's vocabulary
    /// ([`TrainParams::chunk_rows_for`]) so that a chunk holds about as many logits whatever the
    /// vocabulary (1024 rows at SmolLM2's 49,152 tokens, 320 at Qwen2.5's 151,936).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_rows: Option<usize>,
    /// Keep only each decoder layer's input during the forward pass and recompute the layer in
    /// backward: one extra forward of the decoder for a fraction of the activation memory.
    pub activation_checkpointing: bool,
    /// Products of the linear layers, LM heads and attention (student and online teacher):
    /// `f32`, or `bf16` (f32 weights and accumulation, bf16 products: on AMX tiles where the CPU
    /// has them, else AVX-512 BF16, else f32). PyTorch's bf16 autocast, without bf16 copies of
    /// the weights; on an AMX CPU it is the fast setting (`docs/performance-history.md`).
    pub matmul: MatmulPrecision,
    /// Stop a run with the last good checkpoint intact on a non-finite loss or gradient.
    pub nan_guard: bool,
}

/// Logits alive in one loss chunk when `chunk_rows` is unset: 1024 rows of a 49,152-token
/// vocabulary (the value measured for SmolLM2, `docs/performance-history.md`).
const CHUNK_LOGITS: usize = 1024 * 49_152;

impl TrainParams {
    /// `chunk_rows` if set, else `CHUNK_LOGITS / vocab` rounded down to a multiple of 32, within
    /// 32..=4096: each chunk's `(rows, vocab)` buffers stay the same size across vocabularies.
    pub fn chunk_rows_for(&self, vocab: usize) -> usize {
        self.chunk_rows.unwrap_or_else(|| {
            let rows = CHUNK_LOGITS / vocab.max(1);
            (rows / 32 * 32).clamp(32, 4096)
        })
    }
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            batch_size: 4,
            grad_accum: 1,
            max_len: 512,
            truncation: Truncation::Right,
            bucket_batches: 16,
            seed: 0,
            warmup_ratio: 0.05,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
            adamw: AdamWParams::default(),
            max_grad_norm: 1.0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            eval_fraction: 0.1,
            chunk_rows: None,
            activation_checkpointing: false,
            matmul: MatmulPrecision::F32,
            nan_guard: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Cross-entropy on the data's answers.
    Sft,
    /// `(1 − α)·CE + α·KD` against the teacher's distributions.
    Kd,
    /// On-policy distillation: the student answers the stage's prompts and the teacher grades
    /// every token of its answers ([`OnPolicy`]).
    #[serde(rename = "on_policy")]
    OnPolicy,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Sft => "sft",
            Method::Kd => "kd",
            Method::OnPolicy => "on_policy",
        })
    }
}

impl Method {
    /// Whether the stage needs a teacher.
    pub fn needs_teacher(self) -> bool {
        self != Method::Sft
    }
}

/// How an on-policy stage's gradient is estimated from the student's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// The stage's divergence between the teacher's and the student's next-token distributions
    /// at every sampled position (GKD): exact per position, no sampling noise in the token's
    /// distribution, but blind to how a token changes the rest of the answer.
    #[default]
    Full,
    /// Policy gradient with the sampled token's `log p_student − log p_teacher` as its per-token
    /// cost, undiscounted (the "on-policy distillation" recipe): needs only the teacher's
    /// log-prob of the sampled token, noisier per token.
    Sampled,
}

/// An on-policy stage's schedule, sampling and estimator (`[stages.on_policy]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnPolicy {
    /// GKD's λ: the share of each round's prompts the student answers; the others keep the
    /// data's answer (off-policy KD on them). 1 = fully on-policy.
    pub lambda: f64,
    /// Prompts answered per round (default: `updates_per_round × batch_size × grad_accum`, each
    /// sample used once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_round: Option<usize>,
    /// Optimizer steps per round on the round's samples; the last step's samples are
    /// `updates_per_round − 1` updates stale.
    pub updates_per_round: usize,
    /// Longest student answer, in tokens (cut further to fit `train.max_len`).
    pub max_new_tokens: usize,
    /// Sampling temperature of the student (1 samples the student's own distribution).
    pub temperature: f64,
    pub top_p: f64,
    pub estimator: Estimator,
    /// The teacher's top-k per token (plus the sampled token; the rest is one tail bucket).
    /// Unset: the live teacher's whole distribution (exact, the teacher runs in every step), or
    /// a server's top-20 (vLLM's `--max-logprobs` default caps it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
}

impl Default for OnPolicy {
    fn default() -> Self {
        OnPolicy {
            lambda: 1.0,
            samples_per_round: None,
            updates_per_round: 4,
            max_new_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            estimator: Estimator::Full,
            top_k: None,
        }
    }
}

impl OnPolicy {
    /// Prompts per round for micro-batches of `batch` and `accum` of them per step.
    pub fn samples_per_round_for(&self, batch: usize, accum: usize) -> usize {
        self.samples_per_round
            .unwrap_or(self.updates_per_round * batch * accum)
    }

    /// The teacher's top-k when it is a server, or `top_k` of a live teacher (`None`: its whole
    /// distribution).
    pub fn teacher_k(&self, server: bool) -> Option<usize> {
        match (self.top_k, server) {
            (Some(k), _) => Some(k),
            (None, true) => Some(SERVER_TOP_K),
            (None, false) => None,
        }
    }
}

/// A server teacher's top-k when the recipe does not say: vLLM's default `--max-logprobs`.
pub const SERVER_TOP_K: usize = 20;

impl OnPolicy {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// Training data (JSONL, JSON array or Parquet; messages, Alpaca or ShareGPT).
    pub data: PathBuf,
    /// Held-out data; default: `train.eval_fraction` of `data`.
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// Force a record shape instead of detecting it.
    #[serde(default)]
    pub format: Option<retort_data::Format>,
    #[serde(default)]
    pub skip_invalid: bool,
    pub method: Method,
    /// KD divergence (`forward_kl`, `reverse_kl`, `jsd:β`, `skew_forward_kl:α`, `skew_reverse_kl:α`, `tvd`).
    #[serde(default = "default_loss", with = "retort_data::by_name")]
    pub loss: Divergence,
    /// Weight of KD in `(1 − α)·CE + α·KD`.
    #[serde(default = "one")]
    pub alpha: f64,
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default = "one_usize")]
    pub epochs: usize,
    /// Stop the stage after this many optimizer steps (default: all epochs).
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// KD from a teacher whose tokenizer is not the student's: `"uld"` or `"gold"` (its
    /// matched tokens compared by `loss`). The teacher is live (`[teacher] path`), or a logit
    /// cache of format 2, or both (hybrid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_tokenizer: Option<crate::xtok::loss::CrossLoss>,
    /// Cross-tokenizer KD: the teacher's top-k per token (the rest is one tail bucket).
    #[serde(default = "default_cross_top_k")]
    pub cross_top_k: usize,
    /// `method = "on_policy"`: rounds, sampling and estimator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_policy: Option<OnPolicy>,
}

fn default_cross_top_k() -> usize {
    64
}

fn default_loss() -> Divergence {
    Divergence::ForwardKl
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-4
}

/// Where a recipe number must lie.
#[derive(Debug, Clone, Copy)]
enum Range {
    /// `[a, b]`
    Closed(f64, f64),
    /// `[a, b)`
    ClosedOpen(f64, f64),
    /// `(a, b]`
    OpenClosed(f64, f64),
    /// `> a`
    Above(f64),
    /// `≥ a`
    AtLeast(f64),
}

impl Range {
    fn holds(self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Range::Closed(a, b) => (a..=b).contains(&x),
                Range::ClosedOpen(a, b) => (a..b).contains(&x),
                Range::OpenClosed(a, b) => x > a && x <= b,
                Range::Above(a) => x > a,
                Range::AtLeast(a) => x >= a,
            }
    }

    fn describe(self) -> String {
        match self {
            Range::Closed(a, b) => format!("a finite number in [{a}, {b}]"),
            Range::ClosedOpen(a, b) => format!("a finite number in [{a}, {b})"),
            Range::OpenClosed(a, b) => format!("a finite number in ({a}, {b}]"),
            Range::Above(a) => format!("a finite number > {a}"),
            Range::AtLeast(a) => format!("a finite number ≥ {a}"),
        }
    }
}

/// One range check of a recipe field, with the hint shown when it fails.
struct Check {
    field: String,
    value: String,
    ok: bool,
    want: String,
    hint: &'static str,
}

impl Check {
    fn real(field: &str, x: f64, range: Range) -> Check {
        Check {
            field: field.to_string(),
            value: x.to_string(),
            ok: range.holds(x),
            want: range.describe(),
            hint: hint_for(field),
        }
    }

    fn count(field: &str, x: usize, min: usize, max: usize) -> Check {
        Check {
            field: field.to_string(),
            value: x.to_string(),
            ok: (min..=max).contains(&x),
            want: if max == usize::MAX {
                format!("a whole number ≥ {min}")
            } else {
                format!("a whole number in [{min}, {max}]")
            },
            hint: hint_for(field),
        }
    }

    fn problem(&self) -> Option<String> {
        (!self.ok).then(|| {
            format!(
                "`{}` = {} is out of range: it must be {}",
                self.field, self.value, self.want
            )
        })
    }
}

/// What a sensible value of `field` looks like.
fn hint_for(field: &str) -> &'static str {
    let last = field.rsplit('.').next().unwrap_or(field);
    match last {
        "lr" => "a learning rate such as 1e-4 (full fine-tuning) or 2e-4 (LoRA)",
        "min_lr_ratio" => "the schedule's floor as a fraction of lr, e.g. 0.1; 0 decays to zero",
        "warmup_ratio" => "a fraction of the stage's steps, e.g. 0.05",
        "eval_fraction" => "a held-out fraction such as 0.1",
        "beta1" => "AdamW's first-moment decay, usually 0.9",
        "beta2" => "AdamW's second-moment decay, usually 0.999 (0.95 for short runs)",
        "eps" => "AdamW's epsilon, usually 1e-8",
        "weight_decay" => "0 (off) or a small value such as 0.01",
        "max_grad_norm" => "the clipping norm, e.g. 1.0; 0 turns clipping off",
        "alpha" => "alpha weighs KD against CE: 1 is pure KD, 0 is pure CE",
        "temperature" => "the KD temperature, usually 1 (softer: 2)",
        "epochs" => "passes over the stage's data, e.g. 1–3",
        "max_steps" => "leave it out to run every epoch",
        "cross_top_k" => "the teacher's top-k per token for cross-tokenizer KD, e.g. 64",
        _ => "fix the [train] values; recipes/README.md documents each field",
    }
}

fn recipe_err(path: &Path, reason: impl Into<String>, hint: impl Into<String>) -> Error {
    Error::Recipe {
        path: path.to_path_buf(),
        reason: reason.into(),
        hint: hint.into(),
    }
}

/// Apply `key=value` overrides to a parsed TOML document. Keys are dotted paths; a numeric
/// segment indexes an array (`stages.0.lr`). Values are parsed as TOML, else taken as strings.
pub fn apply_overrides(doc: &mut toml::Table, path: &Path, sets: &[String]) -> Result<()> {
    for set in sets {
        let (key, raw) = set.split_once('=').ok_or_else(|| {
            recipe_err(
                path,
                format!("override `{set}` has no `=`"),
                "write --set key=value, e.g. --set train.batch_size=8",
            )
        })?;
        let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
            Err(_) => toml::Value::String(raw.into()),
        };
        let parts: Vec<&str> = key.split('.').collect();
        let mut cur: &mut toml::Value = doc
            .entry(parts[0].to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        for part in &parts[1..] {
            cur = match cur {
                toml::Value::Table(t) => t
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new())),
                toml::Value::Array(a) => {
                    let i: usize = part.parse().map_err(|_| {
                        recipe_err(
                            path,
                            format!("`{key}`: `{part}` indexes a list and must be a number"),
                            "use e.g. stages.0.lr",
                        )
                    })?;
                    let n = a.len();
                    a.get_mut(i).ok_or_else(|| {
                        recipe_err(
                            path,
                            format!("`{key}`: index {i} but the list has {n} entries"),
                            "count from 0",
                        )
                    })?
                }
                _ => {
                    return Err(recipe_err(
                        path,
                        format!("`{key}`: `{part}` is inside a plain value"),
                        "check the key's path",
                    ));
                }
            };
        }
        *cur = value;
    }
    Ok(())
}

/// Where the value of `field` (`stages[0].lr`) came from: the `--set` that wrote it, or its
/// line in `text`.
fn where_is(field: &str, text: &str, sets: &[String]) -> String {
    let dotted = field.replace('[', ".").replace(']', "");
    if let Some(set) = sets
        .iter()
        .rev()
        .find(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == dotted))
    {
        return format!(" (from --set {set})");
    }
    // The original text reports the same error with a span when no override caused it.
    match toml::from_str::<Recipe>(text) {
        Err(e) => e
            .span()
            .map(|sp| {
                let line = text[..sp.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default(),
        Ok(_) => String::new(),
    }
}

/// Defaults that depend on a stage's method: an on-policy stage's divergence is reverse KL (the
/// mode-seeking loss on the student's own samples) and it has an `[on_policy]` table.
fn method_defaults(doc: &mut toml::Table) {
    let Some(toml::Value::Array(stages)) = doc.get_mut("stages") else {
        return;
    };
    for st in stages {
        if let toml::Value::Table(t) = st
            && t.get("method").and_then(|m| m.as_str()) == Some("on_policy")
        {
            t.entry("loss")
                .or_insert_with(|| toml::Value::String("reverse_kl".into()));
            t.entry("on_policy")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
    }
}

impl Recipe {
    /// Read, override, resolve relative paths and validate.
    pub fn load(path: &Path, sets: &[String]) -> Result<Recipe> {
        let text = fs_err::read_to_string(path)?;
        let mut doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            recipe_err(
                path,
                format!("invalid TOML: {e}"),
                "fix the syntax; see recipes/ for examples",
            )
        })?;
        apply_overrides(&mut doc, path, sets)?;
        method_defaults(&mut doc);
        let mut recipe: Recipe = serde_path_to_error::deserialize(toml::Value::Table(doc))
            .map_err(|e| {
                let field = e.path().to_string();
                let message = e.into_inner().message().to_string();
                let at = where_is(&field, &text, sets);
                let field = if field == "." {
                    String::new()
                } else {
                    format!("`{field}`{at}: ")
                };
                recipe_err(
                    path,
                    format!("{field}{message}"),
                    "see the documented fields in recipes/README.md",
                )
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        recipe.resolve_paths(base);
        recipe.validate(path)?;
        Ok(recipe)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = &mut self.teacher {
            if let Some(p) = &mut t.path {
                fix(p);
            }
            if let Some(p) = &mut t.cache {
                fix(p);
            }
        }
        if let Some(p) = &mut self.student.path {
            fix(p);
        }
        for s in &mut self.stages {
            fix(&mut s.data);
            if let Some(e) = &mut s.eval_data {
                fix(e);
            }
        }
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |r: String, h: &str| Err(recipe_err(path, r, h));
        if self.stages.is_empty() {
            return err(
                "no [[stages]]".into(),
                "add at least one stage with name, data and method",
            );
        }
        let s = &self.student;
        let given = [
            s.path.is_some(),
            s.num_layers.is_some(),
            s.keep_layers.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() != 1 {
            return err(
                "[student] needs exactly one of `path`, `num_layers`, `keep_layers`".into(),
                "start from a model (`path`) or prune the teacher (`num_layers` / `keep_layers`)",
            );
        }
        if let Some(t) = &self.teacher
            && t.path.is_none()
            && t.cache.is_none()
            && t.url.is_none()
        {
            return err(
                "[teacher] needs `path` (a model), `cache` (from `retort label`) or `url` (a server)"
                    .into(),
                "add [teacher] path = \"model.gguf\" or cache = \"runs/cache\"",
            );
        }
        if let Some(t) = &self.teacher
            && t.url.is_some()
            && t.path.is_some()
        {
            return err(
                "[teacher] has both `path` and `url`: on-policy samples would have two graders"
                    .into(),
                "keep one: `path` scores in this process, `url` on a server",
            );
        }
        if self.teacher.as_ref().is_none_or(|t| t.path.is_none()) && s.path.is_none() {
            let what = if self.teacher.is_none() {
                "there is no [teacher]"
            } else {
                "[teacher] has no `path`"
            };
            return err(
                format!("[student] prunes the teacher but {what}"),
                "add [teacher] path = …",
            );
        }
        if s.num_layers == Some(0) {
            return err(
                "`student.num_layers` = 0: a student needs at least one layer".into(),
                "set student.num_layers to 1 or more (e.g. a third of the teacher's layers)",
            );
        }
        if s.keep_layers.as_ref().is_some_and(Vec::is_empty) {
            return err(
                "`student.keep_layers` is empty: a student needs at least one layer".into(),
                "list the teacher's layers to keep, e.g. keep_layers = [0, 3, 6]",
            );
        }
        if let Some(Err((field, problem, hint))) = s.lora.as_ref().map(|l| l.check()) {
            return err(format!("`student.lora.{field}` {problem}"), &hint);
        }
        // Every number in range, named as it is written in the recipe.
        let t = &self.train;
        let a = &t.adamw;
        let mut checks: Vec<Check> = vec![
            Check::count("train.batch_size", t.batch_size, 1, 65_536),
            Check::count("train.grad_accum", t.grad_accum, 1, 65_536),
            Check::count("train.max_len", t.max_len, 2, 1 << 20),
            Check::count("train.bucket_batches", t.bucket_batches, 1, 1 << 20),
            Check::real(
                "train.warmup_ratio",
                t.warmup_ratio,
                Range::ClosedOpen(0.0, 1.0),
            ),
            Check::real(
                "train.min_lr_ratio",
                t.min_lr_ratio,
                Range::Closed(0.0, 1.0),
            ),
            Check::real(
                "train.eval_fraction",
                t.eval_fraction,
                Range::ClosedOpen(0.0, 1.0),
            ),
            Check::real("train.max_grad_norm", t.max_grad_norm, Range::AtLeast(0.0)),
            Check::real("train.adamw.beta1", a.beta1, Range::ClosedOpen(0.0, 1.0)),
            Check::real("train.adamw.beta2", a.beta2, Range::ClosedOpen(0.0, 1.0)),
            Check::real("train.adamw.eps", a.eps, Range::Above(0.0)),
            Check::real(
                "train.adamw.weight_decay",
                a.weight_decay,
                Range::AtLeast(0.0),
            ),
        ];
        if let Some(c) = t.chunk_rows {
            checks.push(Check::count("train.chunk_rows", c, 1, 1 << 20));
        }
        for (i, st) in self.stages.iter().enumerate() {
            let f = |name: &str| format!("stages.{i}.{name}");
            checks.push(Check::real(&f("lr"), st.lr, Range::Above(0.0)));
            checks.push(Check::count(&f("epochs"), st.epochs, 1, 1_000_000));
            if let Some(m) = st.max_steps {
                checks.push(Check::count(&f("max_steps"), m, 1, usize::MAX));
            }
            checks.push(Check::real(&f("alpha"), st.alpha, Range::Closed(0.0, 1.0)));
            checks.push(Check::count(&f("cross_top_k"), st.cross_top_k, 1, 4096));
            checks.push(Check::real(
                &f("temperature"),
                st.temperature,
                Range::Above(0.0),
            ));
            if let Some(o) = &st.on_policy {
                let g = |name: &str| format!("stages.{i}.on_policy.{name}");
                checks.push(Check::real(&g("lambda"), o.lambda, Range::Closed(0.0, 1.0)));
                if let Some(n) = o.samples_per_round {
                    checks.push(Check::count(&g("samples_per_round"), n, 1, 1 << 20));
                }
                checks.push(Check::count(
                    &g("updates_per_round"),
                    o.updates_per_round,
                    1,
                    1 << 20,
                ));
                checks.push(Check::count(
                    &g("max_new_tokens"),
                    o.max_new_tokens,
                    1,
                    1 << 20,
                ));
                checks.push(Check::real(
                    &g("temperature"),
                    o.temperature,
                    Range::Above(0.0),
                ));
                checks.push(Check::real(
                    &g("top_p"),
                    o.top_p,
                    Range::OpenClosed(0.0, 1.0),
                ));
                if let Some(k) = o.top_k {
                    checks.push(Check::count(&g("top_k"), k, 1, 4096));
                }
            }
        }
        for c in checks {
            if let Some(problem) = c.problem() {
                return err(problem, c.hint);
            }
        }
        for (i, st) in self.stages.iter().enumerate() {
            let at = format!("stages[{i}] ({})", st.name);
            if st.method.needs_teacher() && self.teacher.is_none() {
                return err(
                    format!(
                        "{at} uses method = \"{}\" but there is no [teacher]",
                        st.method
                    ),
                    "add [teacher] path = …, or use method = \"sft\"",
                );
            }
            let url = self.teacher.as_ref().is_some_and(|t| t.url.is_some());
            let cache = self.teacher.as_ref().is_some_and(|t| t.cache.is_some());
            if st.method == Method::Kd && url && !cache {
                return err(
                    format!("{at}: a KD stage reads a server teacher's scores from a logit cache"),
                    "label the data first (`retort label --teacher URL …`) and add [teacher] cache = …; \
                     the server scores on-policy stages live",
                );
            }
            if st.on_policy.is_some() && st.method != Method::OnPolicy {
                return err(
                    format!("{at} has an [on_policy] table but its method is not \"on_policy\""),
                    "remove the table, or set method = \"on_policy\"",
                );
            }
            if st.method == Method::OnPolicy {
                let no_model = self
                    .teacher
                    .as_ref()
                    .is_some_and(|t| t.path.is_none() && t.url.is_none());
                if no_model {
                    return err(
                        format!(
                            "{at}: on-policy samples are new, so a logit cache cannot grade them"
                        ),
                        "give [teacher] a `path` (a model) or a `url` (a server)",
                    );
                }
                if st.cross_tokenizer.is_some() {
                    return err(
                        format!(
                            "{at}: on-policy distillation across tokenizers is not supported yet"
                        ),
                        "use a teacher with the student's tokenizer, or an off-policy stage (method = \"kd\") with cross_tokenizer",
                    );
                }
                if st.alpha != 1.0 {
                    return err(
                        format!(
                            "`stages.{i}.alpha` = {}: an on-policy stage trains on the divergence alone",
                            st.alpha
                        ),
                        "remove alpha: cross-entropy on the student's own samples would reinforce whatever it wrote",
                    );
                }
                if let Some(o) = &st.on_policy
                    && o.estimator == Estimator::Sampled
                {
                    if o.lambda != 1.0 {
                        return err(
                            format!(
                                "`stages.{i}.on_policy.estimator` = \"sampled\" with lambda = {}",
                                o.lambda
                            ),
                            "the policy gradient needs the student's own samples: set lambda = 1, or use estimator = \"full\"",
                        );
                    }
                    if st.temperature != 1.0 || o.temperature != 1.0 {
                        return err(
                            format!(
                                "`stages.{i}.on_policy.estimator` = \"sampled\" needs the student sampled and scored at temperature 1"
                            ),
                            "remove temperature and on_policy.temperature (both default to 1)",
                        );
                    }
                }
            }
            if st.cross_tokenizer.is_some() && st.method != Method::Kd {
                return err(
                    format!("{at} sets cross_tokenizer but its method is not \"kd\""),
                    "cross_tokenizer chooses the KD loss of a kd stage; remove it, or set method = \"kd\"",
                );
            }
        }
        Ok(())
    }

    /// The resolved recipe as TOML (written into the run directory; its hash decides whether a
    /// run may resume, so a recipe that cannot be written is an error, never an empty string).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| {
            Error::invalid(
                format!("the recipe cannot be written as TOML: {e}"),
                "this is a bug in retort; please report it with the recipe",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.toml");
        fs_err::write(&p, text).unwrap();
        (d, p)
    }

    const TWO_STAGE: &str = r#"
[teacher]
path = "t.gguf"
[student]
num_layers = 4
[train]
batch_size = 2
[[stages]]
name = "kd"
data = "a.jsonl"
method = "kd"
loss = "jsd:0.5"
[[stages]]
name = "sft"
data = "b.jsonl"
method = "sft"
"#;

    #[test]
    fn two_stage_recipe_with_defaults_and_overrides() {
        let (_d, p) = write(TWO_STAGE);
        let r = Recipe::load(
            &p,
            &[
                "train.batch_size=8".into(),
                "stages.1.lr=2e-5".into(),
                "stages.0.loss=tvd".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.batch_size, 8);
        assert_eq!(r.train.max_len, 512);
        assert_eq!(r.stages[1].lr, 2e-5);
        assert_eq!(r.stages[0].loss, Divergence::Tvd);
        assert_eq!(r.stages[0].alpha, 1.0);
        // The resolved TOML parses back to the same recipe.
        let (_d2, p2) = write(&r.to_toml().unwrap());
        assert_eq!(Recipe::load(&p2, &[]).unwrap(), r);
    }

    #[test]
    fn every_bad_number_is_refused_naming_its_field() {
        let (_d, p) = write(TWO_STAGE);
        // (override, what the error must name)
        let table = [
            ("train.min_lr_ratio=-1", "`train.min_lr_ratio` = -1"),
            ("train.min_lr_ratio=1.5", "`train.min_lr_ratio`"),
            ("train.warmup_ratio=1", "`train.warmup_ratio`"),
            ("train.eval_fraction=-0.1", "`train.eval_fraction`"),
            ("train.adamw.beta1=1.5", "`train.adamw.beta1` = 1.5"),
            ("train.adamw.beta1=1.0", "`train.adamw.beta1`"),
            ("train.adamw.beta2=-0.5", "`train.adamw.beta2`"),
            ("train.adamw.eps=0", "`train.adamw.eps`"),
            ("train.adamw.weight_decay=-1", "`train.adamw.weight_decay`"),
            ("train.max_grad_norm=nan", "`train.max_grad_norm` = NaN"),
            ("train.max_grad_norm=-1", "`train.max_grad_norm`"),
            ("train.batch_size=0", "`train.batch_size` = 0"),
            ("train.batch_size=100000000", "`train.batch_size`"),
            ("train.grad_accum=0", "`train.grad_accum`"),
            ("train.max_len=1", "`train.max_len`"),
            ("train.chunk_rows=0", "`train.chunk_rows`"),
            ("train.bucket_batches=0", "`train.bucket_batches`"),
            ("stages.0.lr=0", "`stages.0.lr` = 0"),
            ("stages.1.lr=-5e-5", "`stages.1.lr`"),
            ("stages.0.lr=inf", "`stages.0.lr` = inf"),
            ("stages.0.temperature=nan", "`stages.0.temperature` = NaN"),
            ("stages.0.temperature=0", "`stages.0.temperature`"),
            ("stages.0.alpha=1.5", "`stages.0.alpha`"),
            ("stages.0.alpha=-0.1", "`stages.0.alpha`"),
            ("stages.1.epochs=0", "`stages.1.epochs`"),
            ("stages.0.max_steps=0", "`stages.0.max_steps`"),
            ("student.num_layers=0", "`student.num_layers` = 0"),
            ("student.lora.rank=0", "`student.lora.rank` is 0"),
            ("student.lora.rank=1000000000", "`student.lora.rank`"),
            ("student.lora.alpha=nan", "`student.lora.alpha` is NaN"),
            ("student.lora.alpha=-2", "`student.lora.alpha`"),
            ("student.lora.dropout=0.1", "`student.lora.dropout`"),
            ("student.lora.targets=[]", "`student.lora.targets` is empty"),
            ("student.lora.targets=[\"qkv\"]", "student.lora.targets"),
            ("train.adamw.moments=\"fp8\"", "train.adamw.moments"),
            (
                "train.activation_checkpointing=2",
                "train.activation_checkpointing",
            ),
            (
                "student.num_layers=-1",
                "`student.num_layers` (from --set student.num_layers=-1)",
            ),
            ("train.batch_size=\"two\"", "`train.batch_size` (from --set"),
            (
                "train.batch_size=two",
                "`train.batch_size` (from --set train.batch_size=two)",
            ),
        ];
        for (set, want) in table {
            let e = Recipe::load(&p, &[set.to_string()])
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(e.contains(want), "--set {set}: wanted `{want}` in: {e}");
            assert!(e.contains("hint:"), "--set {set}: no hint in: {e}");
        }
        // A type error in the file itself names the field and its line.
        let (_d, p) = write(&TWO_STAGE.replace("batch_size = 2", "batch_size = \"two\""));
        let e = Recipe::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("`train.batch_size` (line 7)"), "{e}");
        assert!(e.contains("invalid type: string \"two\""), "{e}");
        let (_d, p) =
            write(&TWO_STAGE.replace("loss = \"jsd:0.5\"", "loss = \"jsd:0.5\"\nlr = \"fast\""));
        let e = Recipe::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("`stages[0].lr` (line 13)"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors_with_hints() {
        let (_d, p) = write(&TWO_STAGE.replace("batch_size = 2", "batch_sise = 2"));
        let e = Recipe::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("batch_sise") && e.contains("hint:"), "{e}");
        let (_d, p) = write(TWO_STAGE);
        let e = Recipe::load(&p, &["stages.0.loss=mse".into()])
            .unwrap_err()
            .to_string();
        // Parsed where the recipe is read: the error names the field and the override.
        assert!(
            e.contains("stages[0].loss") && e.contains("unknown loss"),
            "{e}"
        );
        let e = Recipe::load(&p, &["stages.5.lr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("index 5 but the list has 2"), "{e}");
        let (_d, p) = write(&TWO_STAGE.replace("[teacher]\npath = \"t.gguf\"", ""));
        let e = Recipe::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("no [teacher]"), "{e}");
    }

    const ON_POLICY: &str = r#"
[teacher]
path = "t.gguf"
[student]
num_layers = 4
[[stages]]
name = "op"
data = "a.jsonl"
method = "on_policy"
"#;

    #[test]
    fn on_policy_defaults_and_every_bad_value_is_refused() {
        let (_d, p) = write(ON_POLICY);
        let r = Recipe::load(&p, &[]).unwrap();
        // Reverse KL and the [on_policy] defaults unless the recipe says otherwise.
        assert_eq!(r.stages[0].loss, Divergence::ReverseKl);
        let o = r.stages[0].on_policy.clone().unwrap();
        assert_eq!(o, OnPolicy::default());
        assert_eq!(o.samples_per_round_for(4, 2), 4 * 4 * 2);
        let r = Recipe::load(&p, &["stages.0.loss=\"jsd:0.5\"".into()]).unwrap();
        assert_eq!(r.stages[0].loss, Divergence::Jsd { beta: 0.5 });
        let (_d2, p2) = write(&r.to_toml().unwrap());
        assert_eq!(
            Recipe::load(&p2, &[]).unwrap(),
            r,
            "the resolved recipe reads back"
        );
        let table = [
            (
                "stages.0.on_policy.lambda=1.5",
                "`stages.0.on_policy.lambda` = 1.5",
            ),
            (
                "stages.0.on_policy.lambda=nan",
                "`stages.0.on_policy.lambda` = NaN",
            ),
            (
                "stages.0.on_policy.updates_per_round=0",
                "`stages.0.on_policy.updates_per_round` = 0",
            ),
            (
                "stages.0.on_policy.samples_per_round=0",
                "`stages.0.on_policy.samples_per_round` = 0",
            ),
            (
                "stages.0.on_policy.max_new_tokens=0",
                "`stages.0.on_policy.max_new_tokens` = 0",
            ),
            (
                "stages.0.on_policy.temperature=0",
                "`stages.0.on_policy.temperature` = 0",
            ),
            (
                "stages.0.on_policy.top_p=0",
                "`stages.0.on_policy.top_p` = 0",
            ),
            (
                "stages.0.on_policy.top_p=1.5",
                "`stages.0.on_policy.top_p` = 1.5",
            ),
            (
                "stages.0.on_policy.top_k=0",
                "`stages.0.on_policy.top_k` = 0",
            ),
            (
                "stages.0.on_policy.estimator=\"k3\"",
                "stages[0].on_policy.estimator",
            ),
            ("stages.0.on_policy.lambada=0.5", "lambada"),
            (
                "stages.0.alpha=0.5",
                "`stages.0.alpha` = 0.5: an on-policy stage trains on the divergence alone",
            ),
            (
                "stages.0.cross_tokenizer=\"uld\"",
                "across tokenizers is not supported yet",
            ),
        ];
        for (set, want) in table {
            let e = Recipe::load(&p, &[set.to_string()])
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(e.contains(want), "--set {set}: wanted `{want}` in: {e}");
            assert!(e.contains("hint:"), "--set {set}: no hint in: {e}");
        }
        // The sampled estimator needs the student's own samples at temperature 1.
        let sampled = "stages.0.on_policy.estimator=\"sampled\"".to_string();
        assert!(Recipe::load(&p, std::slice::from_ref(&sampled)).is_ok());
        for (other, want) in [
            ("stages.0.on_policy.lambda=0.5", "with lambda = 0.5"),
            ("stages.0.on_policy.temperature=0.7", "at temperature 1"),
            ("stages.0.temperature=2", "at temperature 1"),
        ] {
            let e = Recipe::load(&p, &[sampled.clone(), other.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{other}: {e}");
        }
        // Teachers: a cache cannot grade new samples; a server and a model are one too many;
        // a server teaches KD stages only through a cache; [on_policy] only on on-policy stages.
        let cases = [
            (
                ON_POLICY
                    .replace("path = \"t.gguf\"", "cache = \"c\"")
                    .replace("num_layers = 4", "path = \"s.gguf\""),
                "a logit cache cannot grade them",
            ),
            (
                ON_POLICY.replace(
                    "path = \"t.gguf\"",
                    "path = \"t.gguf\"\nurl = \"http://h/v1\"",
                ),
                "both `path` and `url`",
            ),
            (
                ON_POLICY
                    .replace("path = \"t.gguf\"", "url = \"http://h/v1\"")
                    .replace("num_layers = 4", "path = \"s.gguf\"")
                    .replace("on_policy\"", "kd\""),
                "reads a server teacher's scores from a logit cache",
            ),
            (
                ON_POLICY.replace("\"on_policy\"", "\"kd\"\n[stages.on_policy]\nlambda = 0.5"),
                "its method is not \"on_policy\"",
            ),
        ];
        for (text, want) in cases {
            let (_d, p) = write(&text);
            let e = Recipe::load(&p, &[]).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("hint:"),
                "wanted `{want}` in: {e}"
            );
        }
        let (_d, p) = write(
            &ON_POLICY
                .replace("path = \"t.gguf\"", "url = \"http://h/v1\"")
                .replace("num_layers = 4", "path = \"s.gguf\""),
        );
        assert!(
            Recipe::load(&p, &[]).is_ok(),
            "a server teacher grades on-policy stages"
        );
    }

    #[test]
    fn chunk_rows_default_keeps_the_chunk_size_across_vocabularies() {
        let mut t = TrainParams::default();
        assert_eq!(t.chunk_rows_for(49_152), 1024); // SmolLM2: the measured default
        assert_eq!(t.chunk_rows_for(151_936), 320); // Qwen2.5: 331.3 rounded down to 32s
        assert_eq!(t.chunk_rows_for(32_000), 1568); // Llama 2: 1572.9 → 1568
        assert_eq!(t.chunk_rows_for(100), 4096); // tiny test vocabularies: the upper clamp
        assert_eq!(t.chunk_rows_for(10_000_000), 32); // the lower clamp
        t.chunk_rows = Some(7);
        assert_eq!(t.chunk_rows_for(151_936), 7); // set in the recipe: used as is
    }
}
