//! `retort experiment EXPERIMENT.toml`: a grid of train + eval runs and the report that compares
//! them.
//!
//! The grid is arms × training-set sizes × seeds. An *arm* is a named way to train — a method,
//! a teacher, a stage recipe — given as a base recipe plus `--set`-style overrides. For a cell
//! (arm, N, seed) the runner:
//! 1. writes the training subset: the pool shuffled with seed `1000 + seed`, first N records
//!    (so subsets are nested, N₁ ⊂ N₂, as in the paper's sweeps), into `OUT/data/`;
//! 2. trains `OUT/cells/ARM-nN-sS/` from the base recipe with the arm's overrides, the subset as
//!    the arm's `subset_key` (default `stages.0.data`) and `train.seed = seed`;
//! 3. evaluates the final model on the held-out set and writes `result.json` last.
//!
//! A finished cell keeps its final `model/` and drops its training checkpoints (unless
//! `keep_checkpoints = true`).
//! A cell with `result.json` is skipped, a cell with a checkpoint resumes, so the whole grid can be
//! interrupted and rerun with the same command. The report (`report.md`, plots) is rebuilt from
//! the results each time (`crate::report`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use retort_data::dataset;
use retort_distill::recipe::Recipe;
use retort_distill::setup;
use retort_distill::trainer::{self, Observer, Outcome, RunOptions};
use retort_model::{WeightFormat, checkpoint};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::{self, EvalOptions, EvalReport, Phase};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// What the experiment tests, for the report.
    #[serde(default)]
    pub description: String,
    /// The base recipe (relative to the experiment file).
    pub recipe: PathBuf,
    /// Overrides applied to every cell (`key=value`, as `retort train --set`).
    #[serde(default)]
    pub set: Vec<String>,
    pub data: DataSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    pub grid: Grid,
    pub arms: Vec<Arm>,
    /// Models evaluated once for reference (the teacher, the untrained student, …).
    #[serde(default)]
    pub baselines: Vec<Baseline>,
    /// Keep each finished cell's training checkpoints (model + optimizer state, ~1 GB for the
    /// pruned SmolLM2). Off by default: a finished cell keeps its final `model/` only.
    #[serde(default)]
    pub keep_checkpoints: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The training pool (JSONL), subsets of which the cells train on.
    pub pool: PathBuf,
    /// Held-out data with reference answers.
    pub eval: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    pub max_len: usize,
    pub batch_size: usize,
    /// Greedy answers scored with ROUGE-L for the first N eval records (0: none).
    pub generate: usize,
    pub max_new_tokens: usize,
    /// Teacher for KL and agreement in the evaluation (optional).
    pub teacher: Option<PathBuf>,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            max_len: 512,
            batch_size: 4,
            generate: 0,
            max_new_tokens: 128,
            teacher: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    pub train_size: Vec<usize>,
    pub seeds: Vec<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub name: String,
    /// A recipe of its own instead of the base one.
    #[serde(default)]
    pub recipe: Option<PathBuf>,
    #[serde(default)]
    pub set: Vec<String>,
    /// The recipe key that receives the N-record subset (default `stages.0.data`).
    #[serde(default)]
    pub subset_key: Option<String>,
    /// Training sizes for this arm only (default: the grid's).
    #[serde(default)]
    pub train_size: Option<Vec<usize>>,
    /// Seeds for this arm only (default: the grid's), e.g. a costly check run once.
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    /// Other files cut to the subset's prompts: each `pool`'s records whose `id` is one of the
    /// subset's go to recipe key `key` (e.g. the teacher's answers to the same N prompts for a
    /// sequence-level KD stage).
    #[serde(default)]
    pub paired: Vec<Paired>,
}

/// A file cut to each cell's subset by record `id` ([`Arm::paired`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Paired {
    pub key: String,
    pub pool: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub name: String,
    pub model: PathBuf,
}

/// One finished cell (`result.json`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CellResult {
    pub id: String,
    pub arm: String,
    pub train_size: usize,
    pub seed: u64,
    pub train_seconds: f64,
    /// Optimizer steps over all stages (from `metrics.jsonl`); absent in older results.
    #[serde(default)]
    pub steps: Option<u64>,
    pub eval: serde_json::Value,
    /// Held-out NLL (nats/token), copied out of `eval` for the report.
    pub nll: f64,
    pub rouge_l: Option<f64>,
    /// The eval teacher's NLL of the greedy answers (`[eval] generate` and `teacher`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_nll_generated: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BaselineResult {
    pub name: String,
    pub model: String,
    pub nll: f64,
    pub rouge_l: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_nll_generated: Option<f64>,
}

/// What the runner tells its caller.
pub trait ExperimentObserver: Observer {
    fn cell_start(&mut self, _index: usize, _total: usize, _id: &str, _skipped: bool) {}
    fn eval_progress(&mut self, _phase: Phase, _done: usize, _total: usize) {}
    fn cell_done(&mut self, _r: &CellResult) {}
}

impl Experiment {
    pub fn load(path: &Path) -> Result<Experiment> {
        let text = fs_err::read_to_string(path).map_err(|e| {
            Error::invalid(
                format!("cannot read `{}`: {e}", path.display()),
                "pass an experiment TOML file (see experiments/)",
            )
        })?;
        let mut e: Experiment = toml::from_str(&text).map_err(|err| {
            Error::invalid(
                format!("experiment `{}`: {err}", path.display()),
                "fix the field named above; experiments/README.md documents every key",
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        e.recipe = abs(&e.recipe);
        e.data.pool = abs(&e.data.pool);
        e.data.eval = abs(&e.data.eval);
        e.eval.teacher = e.eval.teacher.as_deref().map(abs);
        for a in &mut e.arms {
            a.recipe = a.recipe.as_deref().map(abs);
            for p in &mut a.paired {
                p.pool = abs(&p.pool);
            }
        }
        for b in &mut e.baselines {
            b.model = abs(&b.model);
        }
        if e.arms.is_empty() || e.grid.seeds.is_empty() || e.grid.train_size.is_empty() {
            return Err(Error::invalid(
                format!("experiment `{}` has an empty grid", path.display()),
                "give at least one [[arms]], one seed and one train_size",
            ));
        }
        if let Some(a) = e.arms.iter().find(|a| {
            a.seeds
                .as_ref()
                .is_some_and(|s| s.is_empty() || s.iter().any(|x| !e.grid.seeds.contains(x)))
        }) {
            return Err(Error::invalid(
                format!(
                    "experiment `{}`: arm `{}` has seeds {:?}, the grid {:?}",
                    path.display(),
                    a.name,
                    a.seeds.as_deref().unwrap_or_default(),
                    e.grid.seeds
                ),
                "an arm's seeds must be a non-empty subset of [grid] seeds",
            ));
        }
        let mut names: Vec<&str> = e.arms.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() != e.arms.len() {
            return Err(Error::invalid(
                format!("experiment `{}`: two arms share a name", path.display()),
                "give each [[arms]] its own name",
            ));
        }
        Ok(e)
    }

    /// Every cell in run order: size, then seed, then arm (so a partial grid compares arms early).
    pub fn cells(&self) -> Vec<(&Arm, usize, u64)> {
        let mut sizes: Vec<usize> = self
            .arms
            .iter()
            .flat_map(|a| {
                a.train_size
                    .clone()
                    .unwrap_or_else(|| self.grid.train_size.clone())
            })
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut out = Vec::new();
        for &n in &sizes {
            for &seed in &self.grid.seeds {
                for a in &self.arms {
                    let arm_sizes = a.train_size.as_ref().unwrap_or(&self.grid.train_size);
                    let arm_seeds = a.seeds.as_ref().unwrap_or(&self.grid.seeds);
                    if arm_sizes.contains(&n) && arm_seeds.contains(&seed) {
                        out.push((a, n, seed));
                    }
                }
            }
        }
        out
    }
}

pub fn cell_id(arm: &str, n: usize, seed: u64) -> String {
    format!("{arm}-n{n}-s{seed}")
}

/// The first `n` records of the pool shuffled with `1000 + seed`: nested across `n`.
pub fn write_subset(pool: &Path, n: usize, seed: u64, out: &Path) -> Result<PathBuf> {
    let text = fs_err::read_to_string(pool)?;
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
    if n > lines.len() {
        return Err(Error::invalid(
            format!(
                "train_size {n} is larger than the pool `{}` ({} records)",
                pool.display(),
                lines.len()
            ),
            "lower train_size or use a larger pool",
        ));
    }
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1000 + seed));
    let mut body = String::new();
    for &i in &order[..n] {
        body.push_str(lines[i]);
        body.push('\n');
    }
    fs_err::create_dir_all(out)?;
    let path = out.join(format!("train-n{n}-s{seed}.jsonl"));
    retort_data::files::write_atomic(&path, body.as_bytes())?;
    Ok(path)
}

/// The records of `pool` whose `id` is one of `subset`'s, in `pool`'s order, written to
/// `out/STEM-of-SUBSET`. Errors name a record without an `id` or a subset that matches nothing.
pub fn write_paired(pool: &Path, subset: &Path, out: &Path) -> Result<PathBuf> {
    let id_of = |file: &Path, line_no: usize, line: &str| -> Result<String> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::invalid(
                format!("`{}` line {line_no}: {e}", file.display()),
                "each line must be one JSON record",
            )
        })?;
        match v.get("id") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(x) if !x.is_null() => Ok(x.to_string()),
            _ => Err(Error::invalid(
                format!("`{}` line {line_no} has no `id`", file.display()),
                "paired files are matched to the subset by record id; give every record one",
            )),
        }
    };
    let lines = |file: &Path| -> Result<Vec<(usize, String)>> {
        Ok(fs_err::read_to_string(file)?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l.to_string()))
            .collect())
    };
    let wanted: std::collections::HashSet<String> = lines(subset)?
        .iter()
        .map(|(i, l)| id_of(subset, *i, l))
        .collect::<Result<_>>()?;
    let mut body = String::new();
    for (i, l) in lines(pool)? {
        if wanted.contains(&id_of(pool, i, &l)?) {
            body.push_str(&l);
            body.push('\n');
        }
    }
    if body.is_empty() {
        return Err(Error::invalid(
            format!(
                "no record of `{}` has an id of the subset `{}`",
                pool.display(),
                subset.display()
            ),
            "a paired file must carry the pool's record ids (e.g. the teacher's answers written \
             with the prompts' ids)",
        ));
    }
    let stem = |p: &Path| {
        p.file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
    };
    fs_err::create_dir_all(out)?;
    let path = out.join(format!("{}-of-{}.jsonl", stem(pool), stem(subset)));
    retort_data::files::write_atomic(&path, body.as_bytes())?;
    Ok(path)
}

fn eval_options(spec: &EvalSpec) -> EvalOptions {
    EvalOptions {
        max_len: spec.max_len,
        batch_size: spec.batch_size,
        generate: spec.generate,
        max_new_tokens: spec.max_new_tokens,
        ..EvalOptions::default()
    }
}

fn evaluate_model(
    model_path: &Path,
    exp: &Experiment,
    device: &Device,
    obs: &mut dyn ExperimentObserver,
) -> Result<EvalReport> {
    let ds = dataset::read(&exp.data.eval, &Default::default()).map_err(|e| {
        Error::invalid(
            format!("eval data `{}`: {e}", exp.data.eval.display()),
            "fix [data] eval",
        )
    })?;
    let (model, tok) = checkpoint::load(model_path, WeightFormat::F32, device)?;
    let teacher = match &exp.eval.teacher {
        Some(t) => Some(checkpoint::load(t, WeightFormat::F32, device)?.0),
        None => None,
    };
    let mut r = eval::evaluate(
        &model,
        &tok,
        teacher.as_ref(),
        &ds,
        &eval_options(&exp.eval),
        |p, d, n| obs.eval_progress(p, d, n),
    )?;
    r.model = model_path.display().to_string();
    r.teacher = exp.eval.teacher.as_ref().map(|t| t.display().to_string());
    Ok(r)
}

/// Run (or finish) every cell of `exp` into `out`, then the baselines. Returns the results.
pub fn run(
    exp: &Experiment,
    out: &Path,
    device: &Device,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    obs: &mut dyn ExperimentObserver,
) -> Result<(Vec<CellResult>, Vec<BaselineResult>)> {
    use std::sync::atomic::Ordering;
    fs_err::create_dir_all(out.join("cells"))?;
    let out = &std::path::absolute(out)?;
    let mut baselines = Vec::new();
    for b in &exp.baselines {
        let path = out.join("baselines").join(format!("{}.json", b.name));
        if let Ok(text) = fs_err::read_to_string(&path)
            && let Ok(r) = serde_json::from_str::<BaselineResult>(&text)
        {
            baselines.push(r);
            continue;
        }
        let r = evaluate_model(&b.model, exp, device, obs)?;
        let res = BaselineResult {
            name: b.name.clone(),
            model: b.model.display().to_string(),
            nll: r.tokens.nll,
            rouge_l: r.generation.as_ref().map(|g| g.rouge_l),
            teacher_nll_generated: r.generation.as_ref().and_then(|g| g.teacher_nll),
        };
        fs_err::create_dir_all(out.join("baselines"))?;
        retort_data::files::write_atomic(
            &path,
            serde_json::to_string_pretty(&res)
                .map_err(std::io::Error::from)?
                .as_bytes(),
        )?;
        baselines.push(res);
    }
    let cells = exp.cells();
    let total = cells.len();
    let mut results = Vec::new();
    for (i, (arm, n, seed)) in cells.into_iter().enumerate() {
        let id = cell_id(&arm.name, n, seed);
        let dir = out.join("cells").join(&id);
        let result_path = dir.join("result.json");
        if let Ok(text) = fs_err::read_to_string(&result_path)
            && let Ok(r) = serde_json::from_str::<CellResult>(&text)
        {
            obs.cell_start(i, total, &id, true);
            results.push(r);
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        obs.cell_start(i, total, &id, false);
        let subset = write_subset(&exp.data.pool, n, seed, &out.join("data"))?;
        let mut sets = exp.set.clone();
        sets.extend(arm.set.iter().cloned());
        let key = arm.subset_key.as_deref().unwrap_or("stages.0.data");
        // Unquoted: an absolute path is never valid TOML, so it is read as a string.
        sets.push(format!("{key}={}", subset.display()));
        for p in &arm.paired {
            let f = write_paired(&p.pool, &subset, &out.join("data"))?;
            sets.push(format!("{}={}", p.key, f.display()));
        }
        sets.push(format!("train.seed={seed}"));
        let recipe_path = arm.recipe.as_ref().unwrap_or(&exp.recipe);
        let recipe = Recipe::load(recipe_path, &sets)?;
        let mut plan = setup::prepare(recipe, device)?;
        // A server teacher (`[teacher] url`) grades on-policy stages.
        retort_teacher::remote_label::attach_server(&mut plan)?;
        let resume = dir.join("checkpoints").join("latest").exists();
        let opts = RunOptions {
            out: dir.clone(),
            resume,
            stop: stop.clone(),
            max_steps_this_run: None,
        };
        let t0 = Instant::now();
        let model_dir = match trainer::run(&plan, &opts, obs)? {
            Outcome::Finished(d) => d,
            Outcome::Interrupted(_) => break,
        };
        let train_seconds = t0.elapsed().as_secs_f64();
        drop(plan);
        let r = evaluate_model(&model_dir, exp, device, obs)?;
        let res = CellResult {
            id: id.clone(),
            arm: arm.name.clone(),
            train_size: n,
            seed,
            train_seconds,
            steps: crate::report::optimizer_steps(&dir),
            nll: r.tokens.nll,
            rouge_l: r.generation.as_ref().map(|g| g.rouge_l),
            teacher_nll_generated: r.generation.as_ref().and_then(|g| g.teacher_nll),
            eval: serde_json::to_value(&r).map_err(std::io::Error::from)?,
        };
        retort_data::files::write_atomic(
            &result_path,
            serde_json::to_string_pretty(&res)
                .map_err(std::io::Error::from)?
                .as_bytes(),
        )?;
        if !exp.keep_checkpoints {
            // result.json is written: the cell is done and will never resume.
            let ckpt = dir.join("checkpoints");
            if ckpt.exists() {
                fs_err::remove_dir_all(&ckpt)?;
            }
        }
        obs.cell_done(&res);
        results.push(res);
    }
    Ok((results, baselines))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped experiment parses, and its base recipe and every arm's recipe load with the
    /// arm's overrides: a schema change cannot silently break `experiments/`.
    #[test]
    fn shipped_experiments_and_their_recipes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
        let mut seen = 0;
        for entry in fs_err::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let exp = Experiment::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for arm in &exp.arms {
                let mut sets = exp.set.clone();
                sets.extend(arm.set.iter().cloned());
                let recipe = arm.recipe.as_ref().unwrap_or(&exp.recipe);
                Recipe::load(recipe, &sets).unwrap_or_else(|e| {
                    panic!(
                        "{} arm `{}`: {}: {e}",
                        path.display(),
                        arm.name,
                        recipe.display()
                    )
                });
            }
            seen += 1;
        }
        assert!(seen >= 3, "found {seen} experiments in {}", dir.display());
    }

    #[test]
    fn paired_files_are_cut_to_the_subsets_ids() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let rec = |id: &str, a: &str| {
            format!(
                r#"{{"id": "{id}", "messages": [{{"role": "user", "content": "q"}}, {{"role": "assistant", "content": "{a}"}}]}}"#
            )
        };
        let pool: String = (0..10)
            .map(|i| rec(&format!("r{i}"), "human") + "\n")
            .collect();
        fs_err::write(d.join("pool.jsonl"), pool).unwrap();
        // The teacher answered some prompts only, in another order.
        let answers: String = [7, 2, 9, 4, 0]
            .iter()
            .map(|i| rec(&format!("r{i}"), "teacher") + "\n")
            .collect();
        fs_err::write(d.join("answers.jsonl"), answers).unwrap();
        let subset = write_subset(&d.join("pool.jsonl"), 4, 0, &d.join("data")).unwrap();
        let ids = |p: &Path| -> Vec<String> {
            fs_err::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
                .collect()
        };
        let paired = write_paired(&d.join("answers.jsonl"), &subset, &d.join("data")).unwrap();
        let (want, got) = (ids(&subset), ids(&paired));
        assert!(
            !got.is_empty() && got.iter().all(|i| want.contains(i)),
            "{got:?} ⊄ {want:?}"
        );
        let all_answers = ids(&d.join("answers.jsonl"));
        let expected = all_answers.iter().filter(|i| want.contains(i)).count();
        assert_eq!(got.len(), expected);
        // Nothing in common: an error naming both files.
        fs_err::write(d.join("other.jsonl"), rec("zz", "x") + "\n").unwrap();
        let e = write_paired(&d.join("other.jsonl"), &subset, &d.join("data"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("other.jsonl") && e.contains("train-n4-s0"),
            "{e}"
        );
        // A record without an id: named by file and line.
        fs_err::write(d.join("noid.jsonl"), "{\"messages\": []}\n").unwrap();
        let e = write_paired(&d.join("noid.jsonl"), &subset, &d.join("data"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("noid.jsonl` line 1"), "{e}");
    }
}
