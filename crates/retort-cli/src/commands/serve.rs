//! `retort serve --model PATH`: the model behind an OpenAI-compatible API until Ctrl-C.

use anyhow::{Context, Result};
use retort_model::WeightFormat;
use retort_server::{ServeOptions, serve};

use crate::cli::{ServeArgs, Weights};

pub fn run(args: ServeArgs) -> Result<()> {
    let api_key = match &args.api_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("--api-key-env names `{var}`, which is not set\nhint: export {var}=…")
        })?),
        None => None,
    };
    if args.host != "127.0.0.1"
        && args.host != "localhost"
        && args.host != "::1"
        && api_key.is_none()
    {
        tracing::warn!(
            "binding {} without --api-key-env: anyone who can reach this address can use the model",
            args.host
        );
    }
    let weights = match args.model.weights {
        Weights::F32 => WeightFormat::F32,
        Weights::Q8 => WeightFormat::Q8_0,
        Weights::Quantized => WeightFormat::Quantized,
    };
    let opts = ServeOptions {
        model: args.model.model.clone(),
        name: args.name,
        host: args.host,
        port: args.port,
        weights,
        max_batch: args.max_batch,
        api_key,
    };
    let model = opts.model.display().to_string();
    serve(opts, |addr| {
        // The address on stdout (first line), so scripts can wait for it.
        println!("serving {model} at http://{addr}/v1");
        tracing::info!("OpenAI-compatible API at http://{addr}/v1 (Ctrl-C to stop)");
    })
    .with_context(|| format!("cannot serve `{model}`"))
}
