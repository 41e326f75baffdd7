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
use retort_model::kernels::MatmulPrecision;

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
    /// Rows of logits computed at once by the loss.
    pub chunk_rows: usize,
    /// Products of the linear layers, LM heads and attention (student and online teacher):
    /// `f32`, or `bf16` (f32 weights and accumulation, bf16 products: on AMX tiles where the CPU
    /// has them, else AVX-512 BF16, else f32). PyTorch's bf16 autocast, without bf16 copies of
    /// the weights; on an AMX CPU it is the fast setting (`docs/performance.md`).
    pub matmul: MatmulPrecision,
    /// Stop a run with the last good checkpoint intact on a non-finite loss or gradient.
    pub nan_guard: bool,
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
            chunk_rows: 1024,
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
}

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
    #[serde(default = "default_loss")]
    pub loss: String,
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
}

fn default_loss() -> String {
    "forward_kl".into()
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

impl Stage {
    pub fn divergence(&self) -> std::result::Result<Divergence, String> {
        Divergence::parse(&self.loss)
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
        let mut recipe: Recipe =
            toml::Value::Table(doc)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    recipe_err(
                        path,
                        e.message().to_string(),
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
        {
            return err(
                "[teacher] needs `path` (a model), `cache` (from `retort label`), or both".into(),
                "add [teacher] path = \"model.gguf\" or cache = \"runs/cache\"",
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
        let t = &self.train;
        if t.batch_size == 0 || t.grad_accum == 0 || t.max_len < 2 || t.chunk_rows == 0 {
            return err(
                "train.batch_size, grad_accum and chunk_rows must be ≥ 1 and max_len ≥ 2".into(),
                "fix the [train] values",
            );
        }
        if !(0.0..1.0).contains(&t.eval_fraction) || !(0.0..1.0).contains(&t.warmup_ratio) {
            return err(
                "train.eval_fraction and warmup_ratio must be in [0, 1)".into(),
                "e.g. 0.1 and 0.05",
            );
        }
        for (i, st) in self.stages.iter().enumerate() {
            let at = format!("stages[{i}] ({})", st.name);
            if st.method == Method::Kd {
                if self.teacher.is_none() {
                    return err(
                        format!("{at} uses method = \"kd\" but there is no [teacher]"),
                        "add [teacher] path = …, or use method = \"sft\"",
                    );
                }
                if let Err(e) = st.divergence() {
                    return err(
                        format!("{at}: {e}"),
                        "see the loss names in recipes/README.md",
                    );
                }
                if !(0.0..=1.0).contains(&st.alpha) || st.temperature <= 0.0 {
                    return err(
                        format!("{at}: alpha must be in [0, 1] and temperature > 0"),
                        "alpha weighs KD against CE",
                    );
                }
            }
            if st.epochs == 0 || st.lr <= 0.0 || !st.lr.is_finite() {
                return err(
                    format!("{at}: epochs must be ≥ 1 and lr > 0"),
                    "e.g. epochs = 1, lr = 1e-4",
                );
            }
        }
        Ok(())
    }

    /// The resolved recipe as TOML (written into the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
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
        assert_eq!(r.stages[0].divergence().unwrap(), Divergence::Tvd);
        assert_eq!(r.stages[0].alpha, 1.0);
        // The resolved TOML parses back to the same recipe.
        let (_d2, p2) = write(&r.to_toml());
        assert_eq!(Recipe::load(&p2, &[]).unwrap(), r);
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
        assert!(
            e.contains("stages[0] (kd)") && e.contains("unknown loss"),
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
}
