//! `retort label`: the teacher's top-k log-probs for every assistant token of a dataset, into a
//! resumable cache. Ctrl-C (or kill) loses at most the shard in progress; the same command resumes.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use retort_data::{Format, ReadOptions};
use retort_distill::cache::label::{self, LabelObserver, LabelOptions};
use retort_distill::cache::manifest::ShardInfo;

use crate::cli::LabelArgs;
use crate::progress;

struct Bar {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl LabelObserver for Bar {
    fn start(&mut self, positions: usize, done: usize) {
        if done > 0 {
            tracing::info!("resuming: {done} of {positions} tokens already labelled");
        }
        let b = progress::bar(positions as u64, "labelling tokens", self.quiet);
        b.set_position(done as u64);
        b.reset_eta();
        self.bar = Some(b);
    }
    fn progress(&mut self, positions: usize) {
        if let Some(b) = &self.bar {
            b.inc(positions as u64);
        }
    }
    fn shard(&mut self, info: &ShardInfo) {
        tracing::debug!(
            "{}: {} samples, {} tokens, {} bytes",
            info.file,
            info.samples,
            info.positions,
            info.bytes
        );
    }
}

pub fn run(args: LabelArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let format = args
        .format
        .as_deref()
        .map(|f| f.parse::<Format>().map_err(anyhow::Error::msg))
        .transpose()?;
    let truncation = args.truncation;
    let command = std::env::args()
        .map(|a| {
            if a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let opts = LabelOptions {
        device: ctx.device.clone(),
        teacher: args.teacher.clone(),
        data: args.data.clone(),
        read: ReadOptions {
            format,
            skip_invalid: args.skip_invalid,
        },
        out: args.out.clone(),
        k: args.top_k,
        temperature: args.temperature,
        min_prob: args.min_prob,
        codec: args.codec,
        max_len: args.max_len,
        truncation,
        batch_size: args.batch_size,
        shard_samples: args.shard_samples,
        chunk_rows: 256,
        matmul: args.matmul,
        command,
    };
    let stop = super::stop_on_ctrl_c("stopping after this batch (finished shards are kept)")?;
    let mut bar = Bar { quiet, bar: None };
    let teacher = args.teacher.to_string_lossy().to_string();
    let report = if teacher.starts_with("http://") || teacher.starts_with("https://") {
        let tok_path = args.tokenizer.as_ref().context(
            "--teacher is a server, so retort needs the tokenizer locally\nhint: add --tokenizer PATH (a GGUF file or HF directory of the served model)",
        )?;
        let (_, tok) = retort_model::checkpoint::load(
            tok_path,
            retort_model::WeightFormat::Quantized,
            &ctx.device,
        )
        .with_context(|| format!("cannot load the tokenizer of `{}`", tok_path.display()))?;
        let api_key = match &args.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .with_context(|| format!("--api-key-env names `{var}`, which is not set"))?,
            ),
            None => None,
        };
        let cfg = retort_teacher::HttpConfig {
            model: args.name.clone(),
            api_key,
            concurrency: args.concurrency.max(1),
            ..retort_teacher::HttpConfig::new(teacher.clone())
        };
        let scorer =
            retort_teacher::remote_label::RemoteScorer::connect(cfg, tok.vocab_size(), args.top_k)?;
        label::label_with(&opts, &scorer, &tok, &stop, &mut bar)
    } else {
        label::label(&opts, &stop, &mut bar)
    };
    if let Some(b) = bar.bar.take() {
        b.finish();
    }
    let r = report.with_context(|| format!("cannot label `{}`", args.data.display()))?;
    let m = &r.manifest;
    let positions = m.positions();
    let bytes = m.bytes();
    if r.interrupted {
        tracing::warn!(
            "stopped with {} of {} samples labelled; run the same command to resume",
            m.shards.iter().map(|s| s.samples).sum::<usize>(),
            m.samples
        );
    }
    tracing::info!(
        "{} tokens labelled this run in {:.1}s ({:.0} tokens/s)",
        r.positions_this_run,
        r.seconds,
        r.positions_this_run as f64 / r.seconds.max(1e-9)
    );
    outln!(
        "{}: {} samples, {} tokens, k={}, codec {}, {} bytes ({:.1} bytes/token){}",
        args.out.display(),
        m.samples,
        positions,
        m.k,
        m.encoding.codec,
        bytes,
        bytes as f64 / positions.max(1) as f64,
        if m.complete { "" } else { " — unfinished" }
    )?;
    Ok(())
}
