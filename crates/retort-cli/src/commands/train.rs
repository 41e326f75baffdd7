//! `retort train RECIPE`: run a recipe's stages with progress bars; Ctrl-C stops after the
//! current step with a checkpoint (`--resume` continues bit-identically).

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use retort_distill::onpolicy::RoundRecord;
use retort_distill::recipe::Recipe;
use retort_distill::setup::{self, StagePlan};
use retort_distill::trainer::{self, EvalRecord, Observer, Outcome, RunOptions, StepRecord};

use crate::cli::TrainArgs;
use crate::progress;

struct Bars {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Observer for Bars {
    fn stage_start(&mut self, sp: &StagePlan, done: usize) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        tracing::info!(
            "stage {} `{}`: {} optimizer steps",
            sp.index,
            sp.stage.name,
            sp.total_steps
        );
        let b = progress::bar(sp.total_steps as u64, &sp.stage.name, self.quiet);
        b.set_position(done as u64);
        self.bar = Some(b);
    }

    fn step(&mut self, r: &StepRecord) {
        if let Some(b) = &self.bar {
            let kd = r.kd.map(|k| format!(" kd {k:.3}")).unwrap_or_default();
            b.set_message(format!(
                "{} loss {:.3} ce {:.3}{kd} | {:.0} tok/s, {:.0} loss tok/s",
                r.stage_name, r.loss, r.ce, r.tokens_per_s, r.loss_tokens_per_s
            ));
            b.set_position(r.step as u64);
        }
    }

    fn eval(&mut self, r: &EvalRecord) {
        let kd = r.kd.map(|k| format!(", kd {k:.4}")).unwrap_or_default();
        let line = format!(
            "eval @ step {}: nll {:.4} (ppl {:.2}){kd} over {} tokens",
            r.global_step, r.nll, r.ppl, r.tokens
        );
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => tracing::info!("{line}"),
        }
    }

    fn phase(&mut self, what: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.set_message(what.to_string()),
            _ => tracing::info!("{what}"),
        }
    }

    fn round(&mut self, r: &RoundRecord) {
        let line = format!(
            "round {} @ step {}: {} of {} answers by the student, {:.0} tokens on average, {:.0}% cut off; \
             per token: teacher NLL {:.3}, student entropy {:.3}, reverse KL {:.3}; sampled in {:.1}s, scored in {:.1}s",
            r.round,
            r.sampled_at_step,
            r.student_samples,
            r.samples,
            r.mean_length,
            r.cut_off * 100.0,
            r.teacher_nll,
            r.student_entropy,
            r.reverse_kl,
            r.seconds_sampling,
            r.seconds_scoring
        );
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => tracing::info!("{line}"),
        }
    }

    fn checkpoint(&mut self, path: &std::path::Path) {
        tracing::debug!("checkpoint {}", path.display());
    }
}

pub fn run(args: TrainArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let pb = progress::spinner("loading models and validating data", quiet);
    let plan = setup::prepare(recipe, &ctx.device);
    pb.finish_and_clear();
    let mut plan = plan.with_context(|| format!("cannot prepare `{}`", args.recipe.display()))?;
    retort_teacher::remote_label::attach_server(&mut plan)
        .context("cannot use the recipe's teacher server")?;
    if args.dry_run {
        out!("{}", plan.summary())?;
        outln!("dry run: nothing trained")?;
        return Ok(());
    }
    for line in plan.summary().lines() {
        tracing::info!("{line}");
    }
    let stop = super::stop_on_ctrl_c("stopping after this step with a checkpoint")?;
    let opts = RunOptions {
        out: args.out.clone(),
        resume: args.resume,
        stop,
        max_steps_this_run: args.max_steps,
    };
    let mut bars = Bars { quiet, bar: None };
    let outcome = trainer::run(&plan, &opts, &mut bars);
    if let Some(b) = bars.bar.take() {
        b.finish();
    }
    match outcome? {
        Outcome::Finished(dir) => {
            tracing::info!("metrics in {}", args.out.join("metrics.jsonl").display());
            outln!("{}", dir.display())?;
        }
        Outcome::Interrupted(ck) => {
            tracing::warn!(
                "stopped at checkpoint {}; continue with `retort train {} --out {} --resume`",
                ck.display(),
                args.recipe.display(),
                args.out.display()
            );
            outln!("{}", ck.display())?;
        }
    }
    Ok(())
}
