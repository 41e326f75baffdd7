//! One module per subcommand.

mod cache;
mod chat;
mod data;
mod eval;
mod experiment;
mod export_gguf;
mod generate;
mod info;
mod init_student;
mod label;
mod review;
mod serve;
mod synth;
mod train;

use anyhow::{Context, Result};
use candle_core::Device;
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};

use crate::cli::{Cli, Command, ModelArgs, SamplingArgs, Weights};
use crate::progress;

/// What every command gets from the global flags: resolved once, here.
pub(crate) struct Ctx {
    pub quiet: bool,
    /// `--device`, resolved ([`retort_model::device`]).
    pub device: Device,
}

pub fn run(cli: Cli) -> Result<()> {
    let quiet = cli.global.quiet;
    let ctx = Ctx {
        quiet,
        device: cli.global.device.resolve()?,
    };
    let ctx = &ctx;
    match cli.command {
        Command::Info(a) => info::run(a, ctx),
        Command::Chat(a) => chat::run(a, ctx),
        Command::Generate(a) => generate::run(a, ctx),
        Command::InitStudent(a) => init_student::run(a, ctx),
        Command::ExportGguf(a) => export_gguf::run(a, ctx),
        Command::Train(a) => train::run(a, ctx),
        Command::Label(a) => label::run(a, ctx),
        Command::Cache(crate::cli::CacheCommand::Inspect(a)) => cache::inspect(a, quiet),
        Command::Cache(crate::cli::CacheCommand::Recode(a)) => cache::recode(a, quiet),
        Command::Data(crate::cli::DataCommand::Inspect(a)) => data::inspect(a, ctx),
        Command::Synth(a) => synth::run_cmd(a, ctx),
        Command::Serve(a) => serve::run(a, ctx),
        Command::Review(a) => review::review(a),
        Command::Export(a) => review::export(a),
        Command::Eval(a) => eval::eval(a, ctx),
        Command::Probe(a) => eval::probe(a, ctx),
        Command::Experiment(a) => experiment::run(a, ctx),
    }
}

/// Load a frozen model and its tokenizer, with a spinner and a log line.
pub(crate) fn load_model(args: &ModelArgs, ctx: &Ctx) -> Result<(Model, Tokenizer)> {
    let format = match args.weights {
        Weights::F32 => WeightFormat::F32,
        Weights::Q8 => WeightFormat::Q8_0,
        Weights::Quantized => WeightFormat::Quantized,
    };
    let pb = progress::spinner(&format!("loading {}", args.model.display()), ctx.quiet);
    let t0 = std::time::Instant::now();
    let loaded = checkpoint::load(&args.model, format, &ctx.device)
        .with_context(|| format!("cannot load the model `{}`", args.model.display()));
    pb.finish_and_clear();
    let (model, tok) = loaded?;
    let c = model.config();
    tracing::info!(
        "loaded {} ({} layers, {:.1}M parameters, {:?} weights) in {:.1}s",
        args.model.display(),
        c.num_hidden_layers,
        c.num_parameters() as f64 / 1e6,
        format,
        t0.elapsed().as_secs_f64()
    );
    Ok((model, tok))
}

pub(crate) fn sampling_params(
    s: &SamplingArgs,
) -> Result<retort_model::generation::SamplingParams> {
    anyhow::ensure!(s.max_new_tokens > 0, "--max-new-tokens must be at least 1");
    let p = retort_model::generation::SamplingParams {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
        stop: s.stop.clone(),
        logprobs: None,
        repeat_penalty: s.repeat_penalty,
        ..Default::default()
    };
    // The same checks as `retort serve`, named as the flags are.
    p.check().map_err(|e| {
        let flag = match e.field {
            "repetition_penalty" => "repeat-penalty",
            "top_p" => "top-p",
            f => f,
        };
        anyhow::anyhow!("--{flag}: {e}")
    })?;
    Ok(p)
}

/// `--max-new-tokens` against the model's context: more than the context is an error (an
/// answer that reaches the context's end finishes there with `length`). Returns the context.
pub(crate) fn check_context(s: &SamplingArgs, model: &Model) -> Result<usize> {
    let context = model.config().max_position_embeddings;
    anyhow::ensure!(
        s.max_new_tokens < context,
        "--max-new-tokens {} does not fit: the model's context is {context} tokens (prompt and \
         answer together)\nhint: pass --max-new-tokens {} or less",
        s.max_new_tokens,
        context.saturating_sub(1)
    );
    Ok(context)
}

/// Install the Ctrl-C handler of a long command: the first Ctrl-C sets the returned flag (the
/// command stops at its next safe point, saying `what` it keeps), the second exits at once
/// with status 130.
pub(crate) fn stop_on_ctrl_c(
    what: &'static str,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // second Ctrl-C: leave now
        }
        tracing::warn!("{what} (Ctrl-C again to quit at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}
