//! One module per subcommand.

mod cache;
mod chat;
mod data;
mod eval;
mod experiment;
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

pub fn run(cli: Cli) -> Result<()> {
    let quiet = cli.global.quiet;
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Chat(a) => chat::run(a, quiet),
        Command::Generate(a) => generate::run(a, quiet),
        Command::InitStudent(a) => init_student::run(a, quiet),
        Command::Train(a) => train::run(a, quiet),
        Command::Label(a) => label::run(a, quiet),
        Command::Cache(crate::cli::CacheCommand::Inspect(a)) => cache::inspect(a, quiet),
        Command::Cache(crate::cli::CacheCommand::Recode(a)) => cache::recode(a, quiet),
        Command::Data(crate::cli::DataCommand::Inspect(a)) => data::inspect(a, quiet),
        Command::Synth(a) => synth::run_cmd(a, quiet),
        Command::Serve(a) => serve::run(a),
        Command::Review(a) => review::review(a),
        Command::Export(a) => review::export(a),
        Command::Eval(a) => eval::eval(a, quiet),
        Command::Probe(a) => eval::probe(a, quiet),
        Command::Experiment(a) => experiment::run(a, quiet),
    }
}

/// Load a frozen model and its tokenizer, with a spinner and a log line.
pub(crate) fn load_model(args: &ModelArgs, quiet: bool) -> Result<(Model, Tokenizer)> {
    let format = match args.weights {
        Weights::F32 => WeightFormat::F32,
        Weights::Q8 => WeightFormat::Q8_0,
        Weights::Quantized => WeightFormat::Quantized,
    };
    let pb = progress::spinner(&format!("loading {}", args.model.display()), quiet);
    let t0 = std::time::Instant::now();
    let loaded = checkpoint::load(&args.model, format, &Device::Cpu)
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
    anyhow::ensure!(
        s.temperature >= 0.0,
        "--temperature must be ≥ 0 (0 is greedy), got {}",
        s.temperature
    );
    anyhow::ensure!(
        s.top_p > 0.0 && s.top_p <= 1.0,
        "--top-p must be in (0, 1], got {}",
        s.top_p
    );
    anyhow::ensure!(
        s.repeat_penalty > 0.0,
        "--repeat-penalty must be > 0 (1.0 is off), got {}",
        s.repeat_penalty
    );
    anyhow::ensure!(s.max_new_tokens > 0, "--max-new-tokens must be at least 1");
    Ok(retort_model::generation::SamplingParams {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
        stop: s.stop.clone(),
        logprobs: None,
        repeat_penalty: s.repeat_penalty,
        ..Default::default()
    })
}
