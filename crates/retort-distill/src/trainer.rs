//! The training loop over a [`Plan`]'s stages: gradient accumulation with global token
//! normalisation, clipping, in-place AdamW, held-out evaluation, `metrics.jsonl`, a NaN/Inf guard,
//! atomic checkpoints and exact resume.
//!
//! Run directory:
//! ```text
//! OUT/recipe.resolved.toml      the fully resolved recipe
//! OUT/metrics.jsonl             one object per optimizer step ("train") and per evaluation ("eval")
//! OUT/checkpoints/step-NNNNNNN  model (HF dir) + optimizer.safetensors + trainer_state.json
//! OUT/checkpoints/stage-K-NAME  the same, at the end of stage K (kept)
//! OUT/checkpoints/latest        name of the newest checkpoint
//! OUT/model                     the final student (HF dir) with lineage.json
//! ```
//!
//! Exact resume: data order is a pure function of (seed, stage, epoch), the model and AdamW
//! moments are saved in f32 and restored bit for bit, and nothing else carries state, so a run
//! resumed from step k reproduces the uninterrupted run exactly.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use retort_model::{checkpoint, lora};
use serde::{Deserialize, Serialize};

use crate::adamw::AdamW;
use crate::batch::{self, Sample};
use crate::error::{Error, Result};
use crate::grads::Grads;
use crate::objective::{self, LossSums, MicroBatch};
use crate::onpolicy::{self, PromptStream, RoundFile, RoundRecord};
use crate::recipe::{Estimator, Method, OnPolicy};
use crate::schedule::Schedule;
use crate::setup::{Plan, StagePlan, TeacherId};
use crate::targets;
use retort_data::files::write_atomic;

const STATE_FORMAT_VERSION: u32 = 1;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Continue from `OUT/checkpoints/latest`.
    pub resume: bool,
    /// Set from outside (Ctrl-C) to stop after the current step, with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Stop after this many optimizer steps in this invocation, with a checkpoint.
    pub max_steps_this_run: Option<usize>,
}

/// One optimizer step, as written to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub kind: String,
    pub stage: usize,
    pub stage_name: String,
    /// Optimizer steps done in this stage (1-based).
    pub step: usize,
    pub global_step: usize,
    pub epoch: usize,
    pub lr: f64,
    /// `(1 − α)·CE + α·KD` per loss token.
    pub loss: f64,
    pub ce: f64,
    pub kd: Option<f64>,
    /// Before clipping.
    pub grad_norm: f64,
    /// Loss tokens of the step.
    pub tokens: usize,
    /// Non-padding tokens processed per second (student and teacher forward, backward, update).
    pub tokens_per_s: f64,
    /// Non-padding tokens of the step (prompts and answers; `tokens` counts the answers').
    #[serde(default)]
    pub real_tokens: usize,
    /// Loss tokens per second: `tokens` over the step's time.
    #[serde(default)]
    pub loss_tokens_per_s: f64,
    /// On-policy stages: updates since the policy that wrote this step's samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staleness: Option<usize>,
}

/// One evaluation on the held-out split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub kind: String,
    pub stage: usize,
    pub stage_name: String,
    pub global_step: usize,
    /// Mean negative log-likelihood of the reference answers per token (assistant tokens only).
    pub nll: f64,
    pub ppl: f64,
    /// Mean KD divergence to the teacher per token, when the stage has a teacher.
    pub kd: Option<f64>,
    pub tokens: usize,
}

/// Where a checkpoint came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LineageEntry {
    pub stage: String,
    pub method: String,
    pub loss: Option<String>,
    pub alpha: Option<f64>,
    pub temperature: Option<f64>,
    pub data: PathBuf,
    pub data_sha256: String,
    pub teacher: Option<TeacherId>,
    pub steps: usize,
    pub completed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    format_version: u32,
    recipe_sha256: String,
    /// Stage being trained (or the last one, when `stage_done`).
    stage: usize,
    /// Optimizer steps done in `stage`.
    stage_step: usize,
    stage_done: bool,
    global_step: usize,
    lineage: Vec<LineageEntry>,
}

/// Progress callbacks (the CLI draws bars; tests ignore them).
pub trait Observer {
    fn stage_start(&mut self, _stage: &StagePlan, _done_steps: usize) {}
    fn step(&mut self, _r: &StepRecord) {}
    fn eval(&mut self, _r: &EvalRecord) {}
    fn checkpoint(&mut self, _path: &Path) {}
    /// An on-policy round was sampled and scored (its training time is still 0).
    fn round(&mut self, _r: &RoundRecord) {}
    /// Work between steps that takes a while (sampling a round, scoring it).
    fn phase(&mut self, _what: &str) {}
}

/// An observer that does nothing.
pub struct Silent;
impl Observer for Silent {}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All stages done; the final model is in this directory.
    Finished(PathBuf),
    /// Stopped early with this checkpoint; resume with `--resume`.
    Interrupted(PathBuf),
}

/// An eval micro-batch with the teacher's hidden states at its loss positions (KD stages).
type EvalBatch = (MicroBatch, Option<candle_core::Tensor>);

struct Run<'a> {
    plan: &'a Plan,
    opts: &'a RunOptions,
    ckdir: PathBuf,
    metrics: fs_err::File,
    recipe_sha256: String,
    lineage: Vec<LineageEntry>,
    global_step: usize,
    steps_this_run: usize,
    last_checkpoint: Option<PathBuf>,
    /// Eval micro-batches of one stage with the teacher's hidden states on them.
    eval_cache: Option<(usize, Vec<EvalBatch>)>,
}

/// Train every stage of `plan`, writing into `opts.out`.
pub fn run(plan: &Plan, opts: &RunOptions, obs: &mut dyn Observer) -> Result<Outcome> {
    fs_err::create_dir_all(&opts.out)?;
    let ckdir = opts.out.join("checkpoints");
    let recipe_toml = plan.recipe.to_toml()?;
    let recipe_sha256 = retort_data::files::sha256_hex(recipe_toml.as_bytes());
    let latest_file = ckdir.join("latest");
    let metrics_path = opts.out.join("metrics.jsonl");

    // Temp files and directories of a run killed mid-write (kill -9): never referenced.
    let removed = retort_data::files::remove_partials(&ckdir)?;
    if removed > 0 {
        tracing::info!(
            "removed {removed} half-written file(s) of an interrupted run from `{}`",
            ckdir.display()
        );
    }
    let resumed = if opts.resume {
        let name = fs_err::read_to_string(&latest_file).map_err(|_| {
            Error::invalid(
                format!(
                    "nothing to resume in `{}`: no checkpoints/latest",
                    opts.out.display()
                ),
                "start the run without --resume",
            )
        })?;
        let dir = ckdir.join(name.trim());
        let state: TrainerState = serde_json::from_str(&fs_err::read_to_string(
            dir.join("trainer_state.json"),
        )?)
        .map_err(|e| {
            Error::invalid(
                format!("`{}`: {e}", dir.join("trainer_state.json").display()),
                "the checkpoint is damaged; resume from an older one by editing checkpoints/latest",
            )
        })?;
        if state.format_version != STATE_FORMAT_VERSION {
            return Err(Error::invalid(
                format!(
                    "checkpoint format {} (this retort writes {STATE_FORMAT_VERSION})",
                    state.format_version
                ),
                "resume with the retort version that wrote it",
            ));
        }
        if state.recipe_sha256 != recipe_sha256 {
            return Err(Error::invalid(
                format!(
                    "the recipe differs from the one `{}` was trained with",
                    opts.out.display()
                ),
                format!(
                    "exact resume needs the same recipe (see {}); or start a new run with another --out",
                    opts.out.join("recipe.resolved.toml").display()
                ),
            ));
        }
        Some((dir, state))
    } else {
        if latest_file.exists() {
            return Err(Error::invalid(
                format!("`{}` already holds a run", opts.out.display()),
                "pass --resume to continue it, or choose another --out",
            ));
        }
        write_atomic(
            &opts.out.join("recipe.resolved.toml"),
            recipe_toml.as_bytes(),
        )?;
        None
    };

    // metrics.jsonl: on resume keep only what the checkpoint had seen.
    if let Some((_, state)) = &resumed {
        let kept: String = match fs_err::read_to_string(&metrics_path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["global_step"].as_u64())
                        .is_some_and(|g| g as usize <= state.global_step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        write_atomic(&metrics_path, kept.as_bytes())?;
    } else {
        write_atomic(&metrics_path, b"")?;
    }
    let metrics = fs_err::OpenOptions::new()
        .append(true)
        .open(&metrics_path)?;

    let mut optimizer = None;
    let (mut first_stage, mut first_step) = (0, 0);
    let mut r = Run {
        plan,
        opts,
        ckdir,
        metrics,
        recipe_sha256,
        lineage: Vec::new(),
        global_step: 0,
        steps_this_run: 0,
        last_checkpoint: None,
        eval_cache: None,
    };
    if let Some((dir, state)) = resumed {
        load_weights(plan, &dir)?;
        r.global_step = state.global_step;
        r.lineage = state.lineage;
        r.last_checkpoint = Some(dir.clone());
        if state.stage_done {
            first_stage = state.stage + 1;
        } else {
            first_stage = state.stage;
            first_step = state.stage_step;
            optimizer = Some(AdamW::load(
                plan.student.vars(),
                plan.recipe.train.adamw,
                &dir.join("optimizer.safetensors"),
            )?);
        }
    }
    for sp in &plan.stages[first_stage.min(plan.stages.len())..] {
        let opt = optimizer
            .take()
            .unwrap_or_else(|| AdamW::new(plan.student.vars(), plan.recipe.train.adamw));
        let start = if sp.index == first_stage {
            first_step
        } else {
            0
        };
        if let Some(ck) = r.train_stage(sp, start, opt, obs)? {
            return Ok(Outcome::Interrupted(ck));
        }
    }
    let model_dir = opts.out.join("model");
    // A LoRA student leaves merged (an ordinary checkpoint) with its PEFT adapter in `adapter/`.
    checkpoint::save_hf(&plan.student, &plan.tokenizer, &model_dir, true)?;
    if plan.student.lora().is_some() {
        let adapter = model_dir.join("adapter");
        fs_err::create_dir_all(&adapter)?;
        lora::save_adapter(&plan.student, &student_source(plan), &adapter)?;
    }
    let lineage = serde_json::to_vec_pretty(&r.lineage).map_err(std::io::Error::from)?;
    write_atomic(&model_dir.join("lineage.json"), &lineage)?;
    Ok(Outcome::Finished(model_dir))
}

/// What the student started from (recorded as a LoRA adapter's base).
fn student_source(plan: &Plan) -> PathBuf {
    let s = &plan.recipe.student;
    s.path
        .clone()
        .or_else(|| plan.recipe.teacher.as_ref().and_then(|t| t.path.clone()))
        .unwrap_or_default()
}

fn load_weights(plan: &Plan, dir: &Path) -> Result<()> {
    if plan.student.lora().is_some() {
        return Ok(lora::load_adapter(&plan.student, dir)?);
    }
    let ck = checkpoint::read(dir, plan.student.device())?;
    for (name, var) in plan.student.vars() {
        let t = ck.weights.dense(name, var.dims())?;
        var.set(&t)?;
    }
    Ok(())
}

impl Run<'_> {
    fn stage_seed(&self, sp: &StagePlan) -> u64 {
        self.plan
            .recipe
            .train
            .seed
            .wrapping_add(sp.index as u64 * 1_000_003)
    }

    fn lineage_entry(&self, sp: &StagePlan, steps: usize, completed: bool) -> LineageEntry {
        let kd = sp.objective.kd.as_ref();
        LineageEntry {
            stage: sp.stage.name.clone(),
            method: sp.stage.method.to_string(),
            loss: kd.map(|k| k.divergence.to_string()),
            alpha: kd.map(|k| k.alpha),
            temperature: kd.map(|k| k.temperature),
            data: sp.report.data.clone(),
            data_sha256: sp.report.data_sha256.clone(),
            teacher: kd.and(self.plan.teacher_id.clone()),
            steps,
            completed,
        }
    }

    /// Train one stage from `start` steps; `Some(checkpoint)` if the run stopped early.
    fn train_stage(
        &mut self,
        sp: &StagePlan,
        start: usize,
        mut opt: AdamW,
        obs: &mut dyn Observer,
    ) -> Result<Option<PathBuf>> {
        let t = &self.plan.recipe.train;
        let schedule = Schedule {
            peak_lr: sp.stage.lr,
            warmup_steps: (sp.total_steps as f64 * t.warmup_ratio).ceil() as usize,
            total_steps: sp.total_steps,
            decay: t.decay,
            min_lr_ratio: t.min_lr_ratio,
        };
        let lengths: Vec<usize> = sp.train.iter().map(|s| s.ids.len()).collect();
        let mut epoch_plans: HashMap<usize, Vec<Vec<usize>>> = HashMap::new();
        obs.stage_start(sp, start);
        // No held-out split (eval_fraction = 0, no eval_data): no eval records.
        let has_eval = !sp.eval.is_empty();
        if start == 0 && has_eval {
            let e = self.evaluate(sp)?; // the baseline the stage starts from
            obs.eval(&e);
        }
        let mut step = start;
        let mut on_policy = sp.stage.on_policy.as_ref().map(|o| OnPolicyRun {
            o,
            stream: PromptStream::new(
                &sp.train,
                t.batch_size,
                t.bucket_batches,
                self.stage_seed(sp),
            ),
            per_round: o.samples_per_round_for(t.batch_size, t.grad_accum),
            current: None,
        });
        while step < sp.total_steps {
            let t0 = Instant::now();
            let epoch = step / sp.steps_per_epoch;
            let k = step % sp.steps_per_epoch;
            let seed = self.stage_seed(sp);
            let mbs: Vec<MicroBatch> = match on_policy.as_mut() {
                Some(op) => op.micro_batches(self, sp, step, obs)?,
                None => {
                    let batches = epoch_plans.entry(epoch).or_insert_with(|| {
                        batch::plan_epoch(&lengths, t.batch_size, t.bucket_batches, seed, epoch)
                    });
                    let micro =
                        &batches[k * t.grad_accum..((k + 1) * t.grad_accum).min(batches.len())];
                    micro
                        .iter()
                        .map(|b| {
                            let samples: Vec<&Sample> = b.iter().map(|&i| &sp.train[i]).collect();
                            self.micro_batch(sp, &samples, true)
                        })
                        .collect::<Result<_>>()?
                }
            };
            let normalizer: usize = mbs.iter().map(|m| m.loss_tokens).sum();
            let mut grads = Grads::new(self.plan.student.vars().len());
            let mut sums = LossSums::default();
            for mb in &mbs {
                let s = objective::accumulate(
                    &self.plan.student,
                    self.plan.teacher.as_ref(),
                    &sp.objective,
                    mb,
                    normalizer.max(1) as f64,
                    &mut grads,
                )?;
                sums.add(&s);
            }
            let loss = sums.loss(sp.objective.kd.as_ref());
            let grad_norm = grads.global_norm()?;
            if t.nan_guard {
                for (what, v) in [("the loss", loss), ("the gradient norm", grad_norm)] {
                    if !v.is_finite() {
                        return Err(Error::NonFinite {
                            step: self.global_step + 1,
                            what,
                            value: v,
                            checkpoint: self
                                .last_checkpoint
                                .as_ref()
                                .map_or("(none written yet)".into(), |p| p.display().to_string()),
                        });
                    }
                }
            }
            let lr = schedule.lr(step);
            let clip = if t.max_grad_norm > 0.0 && grad_norm > t.max_grad_norm {
                t.max_grad_norm / (grad_norm + 1e-6)
            } else {
                1.0
            };
            opt.step(self.plan.student.vars(), &grads, lr, clip)?;
            drop(grads);
            step += 1;
            self.global_step += 1;
            self.steps_this_run += 1;
            let n = sums.tokens.max(1) as f64;
            let real: usize = mbs.iter().map(|m| m.real_tokens).sum();
            let secs = t0.elapsed().as_secs_f64();
            let rec = StepRecord {
                kind: "train".into(),
                stage: sp.index,
                stage_name: sp.stage.name.clone(),
                step,
                global_step: self.global_step,
                epoch,
                lr,
                loss,
                ce: sums.ce / n,
                kd: sp.objective.kd.and(sums.kd_mean()),
                grad_norm,
                tokens: sums.tokens,
                tokens_per_s: real as f64 / secs,
                real_tokens: real,
                loss_tokens_per_s: sums.tokens as f64 / secs,
                staleness: on_policy
                    .as_ref()
                    .map(|op| (step - 1) % op.o.updates_per_round),
            };
            self.write_metric(&rec)?;
            obs.step(&rec);
            if let Some(op) = on_policy.as_mut() {
                op.stepped(self, step, sp.total_steps, t0.elapsed().as_secs_f64())?;
            }
            let last = step == sp.total_steps;
            if has_eval && !last && t.eval_every > 0 && step.is_multiple_of(t.eval_every) {
                let e = self.evaluate(sp)?;
                obs.eval(&e);
            }
            let stop = self.opts.stop.load(Ordering::Relaxed)
                || self
                    .opts
                    .max_steps_this_run
                    .is_some_and(|m| self.steps_this_run >= m);
            if !last && (stop || (t.save_every > 0 && step.is_multiple_of(t.save_every))) {
                let name = format!("step-{:07}", self.global_step);
                let lineage = self.lineage_with(sp, step, false);
                let ck = self.save_checkpoint(&name, sp, step, false, &opt, lineage)?;
                obs.checkpoint(&ck);
                self.rotate()?;
                if stop {
                    return Ok(Some(ck));
                }
            }
        }
        if has_eval {
            let e = self.evaluate(sp)?;
            obs.eval(&e);
        }
        self.lineage = self.lineage_with(sp, step, true);
        let name = format!("stage-{}-{}", sp.index, sanitize(&sp.stage.name));
        let ck = self.save_checkpoint(&name, sp, step, true, &opt, self.lineage.clone())?;
        obs.checkpoint(&ck);
        Ok(None)
    }

    /// Collate `samples`; in a KD stage with a logit cache, attach the teacher's targets.
    /// Training needs targets for every sample; evaluation without them reports NLL only.
    fn micro_batch(&self, sp: &StagePlan, samples: &[&Sample], train: bool) -> Result<MicroBatch> {
        let mut mb = batch::collate(samples, self.plan.pad_id, self.plan.student.device())?;
        if let (Some(cache), Some(kd), None, Method::Kd) = (
            &self.plan.cache,
            &sp.objective.kd,
            &sp.objective.cross,
            sp.stage.method,
        ) {
            let (targets, prov) = targets::for_samples(
                cache,
                self.plan.teacher.as_ref(),
                samples,
                self.plan.pad_id,
                kd.temperature,
                sp.objective.chunk_rows,
            )?;
            if prov.live > 0 {
                tracing::debug!("{} sample(s) not in the cache labelled live", prov.live);
            }
            if targets.is_none() && train {
                return Err(Error::invalid(
                    format!(
                        "{} training sample(s) of stage `{}` are not in the logit cache",
                        prov.missing, sp.stage.name
                    ),
                    format!("relabel: {}", cache.manifest.command),
                ));
            }
            mb.sparse = targets;
        }
        if let (Some(kd), Some(_)) = (&sp.objective.kd, &sp.objective.cross)
            && mb.loss_tokens > 0
        {
            let from_cache = match &self.plan.cache {
                Some(c) => crate::xtok::targets::cached(c, samples, kd.temperature)?,
                None => None,
            };
            mb.cross = match (from_cache, &self.plan.teacher) {
                (Some(g), _) => Some(g),
                (None, Some(teacher)) => Some(crate::xtok::targets::online(
                    teacher,
                    samples,
                    self.plan.teacher_pad_id,
                    // Hybrid: the live teacher fills in with the cache's k.
                    self.plan
                        .cache
                        .as_ref()
                        .map_or(sp.stage.cross_top_k, |c| c.manifest.k),
                    kd.temperature,
                    sp.objective.chunk_rows,
                )?),
                (None, None) if train => {
                    let hint = self.plan.cache.as_ref().map_or_else(
                        || "give [teacher] a `path` or a `cache`".to_string(),
                        |c| format!("relabel: {}", c.manifest.command),
                    );
                    return Err(Error::invalid(
                        format!(
                            "training samples of stage `{}` have no teacher labels",
                            sp.stage.name
                        ),
                        hint,
                    ));
                }
                (None, None) => None,
            };
        }
        Ok(mb)
    }

    fn lineage_with(&self, sp: &StagePlan, steps: usize, completed: bool) -> Vec<LineageEntry> {
        let mut l = self.lineage.clone();
        l.push(self.lineage_entry(sp, steps, completed));
        l
    }

    fn write_metric<T: Serialize>(&mut self, rec: &T) -> Result<()> {
        let line = serde_json::to_string(rec).map_err(std::io::Error::from)?;
        writeln!(self.metrics, "{line}")?;
        self.metrics.flush()?;
        Ok(())
    }

    /// Mean NLL (and KD) of the held-out split, written to metrics. The eval batches and the
    /// teacher's hidden states on them are built once per stage.
    fn evaluate(&mut self, sp: &StagePlan) -> Result<EvalRecord> {
        if self.eval_cache.as_ref().is_none_or(|(i, _)| *i != sp.index) {
            let mut order: Vec<usize> = (0..sp.eval.len()).collect();
            order.sort_by_key(|&i| sp.eval[i].ids.len());
            let mut batches = Vec::new();
            for chunk in order.chunks(self.plan.recipe.train.batch_size) {
                let samples: Vec<&Sample> = chunk.iter().map(|&i| &sp.eval[i]).collect();
                let mb = self.micro_batch(sp, &samples, false)?;
                let th = match (&sp.objective.kd, &self.plan.teacher) {
                    (Some(_), Some(t))
                        if mb.loss_tokens > 0 && mb.sparse.is_none() && mb.cross.is_none() =>
                    {
                        Some(objective::teacher_hidden(t, &mb)?)
                    }
                    _ => None,
                };
                batches.push((mb, th));
            }
            self.eval_cache = Some((sp.index, batches));
        }
        let mut sums = LossSums::default();
        for (mb, th) in self.eval_cache.iter().flat_map(|(_, b)| b) {
            let s = objective::evaluate_cached(
                &self.plan.student,
                self.plan.teacher.as_ref(),
                &sp.objective,
                mb,
                th.as_ref(),
            )?;
            sums.add(&s);
        }
        let n = sums.tokens.max(1) as f64;
        let nll = sums.ce / n;
        let rec = EvalRecord {
            kind: "eval".into(),
            stage: sp.index,
            stage_name: sp.stage.name.clone(),
            global_step: self.global_step,
            nll,
            ppl: nll.exp(),
            kd: sp.objective.kd.and(sums.kd_mean()),
            tokens: sums.tokens,
        };
        self.write_metric(&rec)?;
        Ok(rec)
    }

    fn save_checkpoint(
        &mut self,
        name: &str,
        sp: &StagePlan,
        stage_step: usize,
        stage_done: bool,
        opt: &AdamW,
        lineage: Vec<LineageEntry>,
    ) -> Result<PathBuf> {
        fs_err::create_dir_all(&self.ckdir)?;
        let tmp = self.ckdir.join(format!(".{name}.partial"));
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        if self.plan.student.lora().is_some() {
            // The adapter alone: the base never changes (the recipe's hash pins it).
            fs_err::create_dir_all(&tmp)?;
            lora::save_adapter(&self.plan.student, &student_source(self.plan), &tmp)?;
        } else {
            checkpoint::save_hf(&self.plan.student, &self.plan.tokenizer, &tmp, false)?;
        }
        opt.save(self.plan.student.vars(), &tmp.join("optimizer.safetensors"))?;
        let state = TrainerState {
            format_version: STATE_FORMAT_VERSION,
            recipe_sha256: self.recipe_sha256.clone(),
            stage: sp.index,
            stage_step,
            stage_done,
            global_step: self.global_step,
            lineage,
        };
        write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(&state)
                .map_err(std::io::Error::from)?
                .as_bytes(),
        )?;
        let dst = self.ckdir.join(name);
        if dst.exists() {
            fs_err::remove_dir_all(&dst)?;
        }
        fs_err::rename(&tmp, &dst)?;
        write_atomic(&self.ckdir.join("latest"), name.as_bytes())?;
        self.last_checkpoint = Some(dst.clone());
        Ok(dst)
    }

    /// Keep the newest `keep_checkpoints` step checkpoints.
    fn rotate(&self) -> Result<()> {
        let keep = self.plan.recipe.train.keep_checkpoints.max(1);
        let mut steps: Vec<PathBuf> = fs_err::read_dir(&self.ckdir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
        let n = steps.len();
        for p in steps.into_iter().take(n.saturating_sub(keep)) {
            fs_err::remove_dir_all(p)?;
        }
        Ok(())
    }
}

/// An on-policy stage's rounds ([`crate::onpolicy`]).
struct OnPolicyRun<'p> {
    o: &'p OnPolicy,
    stream: PromptStream,
    per_round: usize,
    current: Option<RoundState>,
}

/// The round being trained on: its samples and the teacher's scores of them.
struct RoundState {
    file: RoundFile,
    samples: Vec<Sample>,
    tops: Vec<crate::cache::TopK>,
    vocab: usize,
    /// The teacher's top-k (`None`: its whole distribution, run in the step).
    k: Option<usize>,
    record: RoundRecord,
}

impl OnPolicyRun<'_> {
    /// The micro-batches of stage step `step` (0-based): the round's samples for it, with the
    /// teacher's targets; the round is read back or sampled and scored first when it starts.
    fn micro_batches(
        &mut self,
        run: &Run,
        sp: &StagePlan,
        step: usize,
        obs: &mut dyn Observer,
    ) -> Result<Vec<MicroBatch>> {
        let round = step / self.o.updates_per_round;
        if self.current.as_ref().is_none_or(|c| c.file.round != round) {
            self.current = Some(self.start_round(run, sp, round, obs)?);
        }
        let Some(cur) = &self.current else {
            return Err(Error::invalid(
                "no on-policy round",
                "this is a bug in retort",
            ));
        };
        let t = &run.plan.recipe.train;
        let kd = sp.objective.kd.as_ref().ok_or_else(|| {
            Error::invalid(
                "an on-policy stage without a KD term",
                "this is a bug in retort",
            )
        })?;
        let j = step % self.o.updates_per_round;
        // The live teacher's whole distribution: the objective runs the teacher in the step.
        let dense = self.o.estimator == Estimator::Full && cur.k.is_none();
        onpolicy::step_rows(j, cur.samples.len(), t.batch_size, t.grad_accum)
            .into_iter()
            .map(|rows| {
                let samples: Vec<&Sample> = rows.iter().map(|&i| &cur.samples[i]).collect();
                let tops: Vec<&crate::cache::TopK> = rows.iter().map(|&i| &cur.tops[i]).collect();
                let mut mb = batch::collate(&samples, run.plan.pad_id, run.plan.student.device())?;
                match self.o.estimator {
                    Estimator::Full if dense => {}
                    Estimator::Full => {
                        mb.sparse =
                            Some(onpolicy::sparse_targets(&tops, cur.vocab, kd.temperature));
                    }
                    Estimator::Sampled => {
                        mb.sampled = Some(
                            tops.iter()
                                .flat_map(|t| t.label_logp.iter().copied())
                                .collect(),
                        );
                    }
                }
                Ok(mb)
            })
            .collect()
    }

    fn start_round(
        &mut self,
        run: &Run,
        sp: &StagePlan,
        round: usize,
        obs: &mut dyn Observer,
    ) -> Result<RoundState> {
        let plan = run.plan;
        let local;
        let scorer: &dyn crate::cache::label::Scorer = match (&plan.scorer, &plan.teacher) {
            (Some(s), _) => s.as_ref(),
            (None, Some(teacher)) => {
                local = crate::cache::label::LocalScorer {
                    model: teacher,
                    path: plan
                        .teacher_id
                        .as_ref()
                        .map(|i| i.path.clone())
                        .unwrap_or_default(),
                    arch: plan
                        .teacher_id
                        .as_ref()
                        .map(|i| i.arch.clone())
                        .unwrap_or_default(),
                    chunk_rows: sp.objective.chunk_rows,
                };
                &local
            }
            (None, None) => {
                return Err(Error::invalid(
                    format!(
                        "on-policy stage `{}` has no teacher to grade its samples",
                        sp.stage.name
                    ),
                    "give [teacher] a `path` (a model) or a `url` (a server)",
                ));
            }
        };
        let path = onpolicy::round_path(&run.opts.out, sp.index, round);
        let file = match onpolicy::read_round(&path, &run.recipe_sha256)? {
            Some(f) => f,
            None => {
                obs.phase(&format!(
                    "round {round}: the student answers {} prompts",
                    self.per_round
                ));
                let t = &plan.recipe.train;
                let context = plan
                    .student
                    .config()
                    .max_position_embeddings
                    .min(scorer.context().unwrap_or(usize::MAX));
                let inputs = onpolicy::RoundInputs {
                    student: &plan.student,
                    tokenizer: &plan.tokenizer,
                    train: &sp.train,
                    on_policy: self.o,
                    max_len: t.max_len.min(context),
                    matmul: t.matmul,
                    seed: run.stage_seed(sp),
                    stage: sp.index,
                    recipe_sha256: &run.recipe_sha256,
                };
                let f = onpolicy::sample_round(
                    &inputs,
                    &mut self.stream,
                    round,
                    run.global_step,
                    self.per_round,
                )?;
                if let Some(dir) = path.parent() {
                    fs_err::create_dir_all(dir)?;
                }
                let json = serde_json::to_vec(&f).map_err(std::io::Error::from)?;
                write_atomic(&path, &json)?;
                f
            }
        };
        let samples = file.samples(&sp.train)?;
        obs.phase(&format!(
            "round {round}: the teacher scores {} answers",
            samples.len()
        ));
        let t0 = Instant::now();
        // Without a top-k (the live teacher's whole distribution in every step), the round's
        // scoring only gives the sampled tokens' log-probs (diagnostics, the sampled estimator).
        let k = self.o.teacher_k(plan.scorer.is_some());
        let tops = onpolicy::score(
            scorer,
            &samples,
            plan.pad_id,
            k.unwrap_or(1),
            plan.recipe.train.batch_size,
        )?;
        for (s, t) in samples.iter().zip(&tops) {
            if t.positions != crate::cache::label::loss_positions(s) {
                return Err(Error::invalid(
                    format!(
                        "the teacher scored other positions than sample `{}` has",
                        s.id
                    ),
                    "the server must score the prompt ids it is sent (vLLM's prompt_logprobs)",
                ));
            }
        }
        let record = RoundRecord::new(
            &file,
            &tops,
            &sp.stage.name,
            t0.elapsed().as_secs_f64(),
            self.o.updates_per_round,
        );
        obs.round(&record);
        Ok(RoundState {
            file,
            samples,
            tops,
            vocab: scorer.vocab_size(),
            k,
            record,
        })
    }

    /// After stage step `step` (1-based): add its time; at the round's last step (or the
    /// stage's), write the round's record.
    fn stepped(&mut self, run: &mut Run, step: usize, total: usize, secs: f64) -> Result<()> {
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        cur.record.seconds_training += secs;
        if step.is_multiple_of(self.o.updates_per_round) || step == total {
            cur.record.global_step = run.global_step;
            run.write_metric(&cur.record)?;
        }
        Ok(())
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
