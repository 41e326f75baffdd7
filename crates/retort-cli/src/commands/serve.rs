//! `retort serve --model PATH`: the model behind an OpenAI-compatible API until Ctrl-C.

use anyhow::{Context, Result};
use retort_model::WeightFormat;
use retort_server::{ServeOptions, serve};

use crate::cli::{ServeArgs, Weights};

pub fn run(args: ServeArgs, ctx: &super::Ctx) -> Result<()> {
    let api_key = match &args.api_key_env {
        Some(var) => {
            let key = std::env::var(var).with_context(|| {
                format!("--api-key-env names `{var}`, which is not set\nhint: export {var}=…")
            })?;
            if key.trim().is_empty() {
                anyhow::bail!(
                    "--api-key-env names `{var}`, which is empty: no client could authenticate\n\
                     hint: export {var}=<a secret>, or leave out --api-key-env on loopback"
                );
            }
            Some(key)
        }
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
        device: ctx.device.clone(),
        model: args.model.model.clone(),
        name: args.name,
        host: args.host,
        port: args.port,
        weights,
        max_batch: args.max_batch as usize,
        max_queue: args.max_queue as usize,
        kv_cache_memory: args.kv_cache_memory.unwrap_or_else(default_kv_cache_memory),
        prefill_chunk: args.prefill_chunk as usize,
        api_key,
    };
    let model = opts.model.display().to_string();
    serve(opts, |addr| {
        // The address on stdout (first line), so scripts can wait for it.
        if let Err(e) = outln!("serving {model} at http://{addr}/v1") {
            tracing::warn!("cannot print the address on stdout: {e}");
        }
        tracing::info!("OpenAI-compatible API at http://{addr}/v1 (Ctrl-C to stop)");
    })
    .with_context(|| format!("cannot serve `{model}`"))
}

/// A quarter of the machine's RAM (`MemTotal` of `/proc/meminfo`), or 2 GiB where that cannot
/// be read.
fn default_kv_cache_memory() -> u64 {
    let total = fs_err::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    total.map_or(2 << 30, |t| t / 4)
}
