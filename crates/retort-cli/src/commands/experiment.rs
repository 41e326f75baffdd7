//! `retort experiment EXPERIMENT.toml`: the grid with a line per cell and bars for training and
//! evaluation; Ctrl-C stops after the current step with a checkpoint, and the same command
//! continues (finished cells are skipped).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use retort_distill::setup::StagePlan;
use retort_distill::trainer::{EvalRecord, Observer, StepRecord};
use retort_eval::eval::Phase;
use retort_eval::experiment::{self, CellResult, Experiment, ExperimentObserver};
use retort_eval::report;

use crate::cli::ExperimentArgs;
use crate::progress;

struct Bars {
    quiet: bool,
    cell: String,
    bar: Option<ProgressBar>,
    phase: Option<Phase>,
}

impl Bars {
    fn replace(&mut self, b: ProgressBar) {
        if let Some(old) = self.bar.replace(b) {
            old.finish_and_clear();
        }
    }
}

impl Observer for Bars {
    fn stage_start(&mut self, sp: &StagePlan, done: usize) {
        let b = progress::bar(
            sp.total_steps as u64,
            &format!("{} · {}", self.cell, sp.stage.name),
            self.quiet,
        );
        b.set_position(done as u64);
        self.replace(b);
        self.phase = None;
    }
    fn step(&mut self, r: &StepRecord) {
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {:.3} | {:.0} tok/s", r.loss, r.tokens_per_s));
            b.set_position(r.step as u64);
        }
    }
    fn eval(&mut self, _r: &EvalRecord) {}
}

impl ExperimentObserver for Bars {
    fn cell_start(&mut self, index: usize, total: usize, id: &str, skipped: bool) {
        self.cell = id.to_string();
        if skipped {
            tracing::info!("[{}/{total}] {id}: done before, skipped", index + 1);
        } else {
            tracing::info!("[{}/{total}] {id}", index + 1);
        }
    }
    fn eval_progress(&mut self, phase: Phase, done: usize, total: usize) {
        if self.phase != Some(phase) {
            let what = match phase {
                Phase::Score => "evaluating",
                Phase::Generate => "generating",
            };
            self.replace(progress::bar(
                total as u64,
                &format!("{} · {what}", self.cell),
                self.quiet,
            ));
            self.phase = Some(phase);
        }
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
        }
    }
    fn cell_done(&mut self, r: &CellResult) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.phase = None;
        tracing::info!(
            "{}: held-out NLL {:.4} (trained in {:.0}s)",
            r.id,
            r.nll,
            r.train_seconds
        );
    }
}

pub fn run(args: ExperimentArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let exp = Experiment::load(&args.experiment)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&exp.name));
    let command = format!(
        "retort experiment {}{}",
        args.experiment.display(),
        args.out
            .as_ref()
            .map(|o| format!(" --out {}", o.display()))
            .unwrap_or_default()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (cells, baselines) = if args.report_only {
        anyhow::ensure!(
            out.join("cells").is_dir(),
            "`{}` holds no cells of this experiment: run it first (without --report-only), or pass the --out it ran with",
            out.display()
        );
        let (mut cells, mut baselines) = (Vec::new(), Vec::new());
        for (arm, n, seed) in exp.cells() {
            let p = out
                .join("cells")
                .join(experiment::cell_id(&arm.name, n, seed))
                .join("result.json");
            if let Ok(text) = fs_err::read_to_string(&p) {
                cells.push(
                    serde_json::from_str(&text).with_context(|| format!("`{}`", p.display()))?,
                );
            }
        }
        for b in &exp.baselines {
            let p = out.join("baselines").join(format!("{}.json", b.name));
            if let Ok(text) = fs_err::read_to_string(&p) {
                baselines.push(
                    serde_json::from_str(&text).with_context(|| format!("`{}`", p.display()))?,
                );
            }
        }
        (cells, baselines)
    } else {
        let flag = stop.clone();
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            tracing::warn!(
                "stopping after this step with a checkpoint (Ctrl-C again to quit at once)"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
        let mut bars = Bars {
            quiet,
            cell: String::new(),
            bar: None,
            phase: None,
        };
        let r = experiment::run(&exp, &out, &ctx.device, &stop, &mut bars)
            .with_context(|| format!("experiment `{}`", args.experiment.display()))?;
        if let Some(b) = bars.bar.take() {
            b.finish_and_clear();
        }
        r
    };
    let font = std::env::var_os("RETORT_FONT").map(std::path::PathBuf::from);
    let path = report::write(&exp, &out, &cells, &baselines, &command, font.as_deref())?;
    let total = exp.cells().len();
    if cells.len() < total {
        tracing::warn!(
            "{} of {total} cells done; run the same command to continue",
            cells.len()
        );
    }
    outln!("{}", path.display())?;
    Ok(())
}
