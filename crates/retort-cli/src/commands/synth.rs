//! `retort synth PIPELINE.toml`: seeds → expansion → filters → answers, resumable (SQLite
//! ledger). Prints the funnel; writes `synth.jsonl`, `report.md`, `report.json` and
//! `ledger.sqlite` into the pipeline's output directory.

use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use retort_teacher::synth::{Pipeline, SynthObserver, run};
use retort_teacher::{HttpConfig, HttpTeacher, LocalTeacher, Teacher, retry::RetryPolicy};

use crate::cli::SynthArgs;
use crate::progress;

struct Bars {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl SynthObserver for Bars {
    fn stage(&mut self, name: &str, total: usize, done: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let b = progress::bar(total as u64, name, self.quiet);
        b.set_position(done as u64);
        b.reset_eta();
        self.bar = Some(b);
    }
    fn request(&mut self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| tracing::info!("{message}")),
            None => tracing::info!("{message}"),
        }
    }
}

/// The teacher a pipeline names: a local model or a server (its API key read from the
/// environment variable the pipeline names).
pub(crate) fn teacher_of(p: &Pipeline, ctx: &super::Ctx) -> Result<Box<dyn Teacher>> {
    let quiet = ctx.quiet;
    let t = &p.teacher;
    if let Some(url) = &t.url {
        let api_key = match &t.api_key_env {
            Some(var) => Some(std::env::var(var).with_context(|| {
                format!("[teacher] api_key_env names `{var}`, which is not set\nhint: export {var}=… or remove api_key_env for a server without auth")
            })?),
            None => None,
        };
        let cfg = HttpConfig {
            model: t.name.clone(),
            api_key,
            concurrency: t.concurrency.max(1),
            timeout: Duration::from_secs_f64(t.timeout_secs.max(0.001)),
            retry: RetryPolicy {
                max_attempts: t.max_attempts.max(1),
                base: Duration::from_secs_f64(t.backoff_secs.max(0.0)),
                ..RetryPolicy::default()
            },
            ..HttpConfig::new(url.clone())
        };
        let pb = progress::spinner(&format!("probing {url}"), quiet);
        let h = HttpTeacher::connect(cfg);
        pb.finish_and_clear();
        let h = h?;
        let c = h.capabilities();
        tracing::info!(
            "teacher server {url}: model `{}`, n honoured: {}, logprobs: {}",
            h.id().model,
            c.n,
            c.logprobs
        );
        return Ok(Box::new(h));
    }
    let model = t
        .model
        .as_ref()
        .context("[teacher] needs `model` or `url`")?;
    let format = t.weights;
    let pb = progress::spinner(&format!("loading {}", model.display()), quiet);
    let l = LocalTeacher::load(model, format, t.batch_size, &ctx.device);
    pb.finish_and_clear();
    Ok(Box::new(l.with_context(|| {
        format!("cannot load the teacher `{}`", model.display())
    })?))
}

pub fn run_cmd(args: SynthArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let mut p = Pipeline::read(&args.pipeline)?;
    if let Some(out) = args.out {
        p.output.dir = Some(out);
    }
    if let Some(t) = args.target {
        p.expand.target = t;
    }
    let teacher = teacher_of(&p, ctx)?;
    let stop = super::stop_on_ctrl_c(
        "stopping after the requests in flight (all finished answers are kept; run again to resume)",
    )?;
    let mut bars = Bars { quiet, bar: None };
    let report = run(&p, teacher.as_ref(), &stop, &mut bars);
    if let Some(b) = bars.bar.take() {
        b.finish_and_clear();
    }
    let report = report?;
    let f = &report.funnel;
    if report.interrupted {
        tracing::warn!(
            "interrupted after {:.1} s; every finished request is in {}; run the same command to resume",
            f.seconds,
            report
                .dir
                .join(retort_teacher::synth::run::LEDGER)
                .display()
        );
        return Ok(());
    }
    let md = fs_err::read_to_string(report.dir.join(retort_teacher::synth::run::REPORT_MD))?;
    outln!("{md}")?;
    outln!(
        "wrote {} ({} answered inputs) in {:.1} s",
        report
            .dir
            .join(retort_teacher::synth::run::OUTPUT)
            .display(),
        f.answered,
        f.seconds
    )?;
    Ok(())
}
