//! `retort data inspect`: validate a dataset and print its statistics.

use anyhow::{Context, Result, bail};
use retort_data::{Format, ReadOptions, Role, dataset};
use retort_distill::batch::{self, Truncation};
use retort_model::checkpoint;
use serde::Serialize;

use crate::cli::InspectArgs;
use crate::progress;

#[derive(Debug, Serialize)]
struct Summary {
    min: usize,
    median: usize,
    p95: usize,
    max: usize,
    total: usize,
}

fn summary(mut v: Vec<usize>) -> Summary {
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    Summary {
        min: at(0.0),
        median: at(0.5),
        p95: at(0.95),
        max: at(1.0),
        total: v.iter().sum(),
    }
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    sha256: String,
    format: String,
    records: usize,
    invalid: usize,
    invalid_examples: Vec<String>,
    turns: usize,
    system_turns: usize,
    user_turns: usize,
    assistant_turns: usize,
    assistant_turns_without_loss: usize,
    multi_turn_records: usize,
    assistant_chars: Summary,
    tokens: Option<TokenStats>,
}

#[derive(Debug, Serialize)]
struct TokenStats {
    model: String,
    max_len: usize,
    sequence_tokens: Summary,
    loss_tokens: usize,
    truncated: usize,
    dropped: usize,
    tokens_cut: usize,
}

pub fn inspect(args: InspectArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let format = args
        .format
        .as_deref()
        .map(|f| f.parse::<Format>().map_err(anyhow::Error::msg))
        .transpose()?;
    let opts = ReadOptions {
        format,
        skip_invalid: true,
    };
    let ds = dataset::read(&args.file, &opts)?;
    let convs: Vec<_> = ds.records.iter().map(|r| &r.conversation).collect();
    let count = |role: Role| {
        convs
            .iter()
            .flat_map(|c| &c.messages)
            .filter(|m| m.role == role)
            .count()
    };
    let assistant_chars = convs
        .iter()
        .flat_map(|c| &c.messages)
        .filter(|m| m.role == Role::Assistant)
        .map(|m| m.content.chars().count())
        .collect();
    let tokens = match &args.model {
        None => None,
        Some(m) => {
            let pb = progress::spinner(&format!("loading the tokenizer of {}", m.display()), quiet);
            let ck = checkpoint::read(m, &ctx.device);
            pb.finish_and_clear();
            let ck = ck.with_context(|| format!("cannot load `{}`", m.display()))?;
            let (samples, rep) =
                batch::tokenize(&ds, &ck.tokenizer, usize::MAX, Truncation::Right)?;
            let lens: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
            // What `max_len` would do, from the same tokenization (no second pass).
            let mut cut = batch::TokenizeReport::default();
            for mut s in samples {
                batch::apply_truncation(&mut s, args.max_len, Truncation::Right, &mut cut);
            }
            Some(TokenStats {
                model: m.display().to_string(),
                max_len: args.max_len,
                sequence_tokens: summary(lens),
                loss_tokens: rep.loss_tokens,
                truncated: cut.truncated,
                dropped: cut.dropped,
                tokens_cut: cut.tokens_cut,
            })
        }
    };
    let report = Report {
        file: args.file.display().to_string(),
        sha256: ds.sha256.clone(),
        format: ds.format.to_string(),
        records: ds.records.len(),
        invalid: ds.skipped.len(),
        invalid_examples: ds.skipped.iter().take(20).map(|e| e.to_string()).collect(),
        turns: convs.iter().map(|c| c.messages.len()).sum(),
        system_turns: count(Role::System),
        user_turns: count(Role::User),
        assistant_turns: count(Role::Assistant),
        assistant_turns_without_loss: convs
            .iter()
            .flat_map(|c| &c.messages)
            .filter(|m| m.role == Role::Assistant && !m.trains())
            .count(),
        multi_turn_records: convs.iter().filter(|c| c.assistant_turns() > 1).count(),
        assistant_chars: summary(assistant_chars),
        tokens,
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(&report)?;
    }
    if report.invalid > 0 && !args.skip_invalid {
        bail!(
            "{} invalid record(s) in `{}` (listed above)\nhint: fix them, or pass --skip-invalid (and `skip_invalid = true` in the recipe's stage) to train on the valid ones",
            report.invalid,
            report.file
        );
    }
    Ok(())
}

fn print_report(r: &Report) -> std::io::Result<()> {
    outln!(
        "{} ({} format, sha256 {}…)",
        r.file,
        r.format,
        &r.sha256[..12]
    )?;
    outln!("records: {} valid, {} invalid", r.records, r.invalid)?;
    for e in &r.invalid_examples {
        outln!("  invalid: {}", e.replace('\n', "\n           "))?;
    }
    outln!(
        "turns: {} ({} system, {} user, {} assistant, {} of them weight 0); {} multi-turn records",
        r.turns,
        r.system_turns,
        r.user_turns,
        r.assistant_turns,
        r.assistant_turns_without_loss,
        r.multi_turn_records
    )?;
    let c = &r.assistant_chars;
    outln!(
        "assistant answer chars: min {}, median {}, p95 {}, max {}",
        c.min,
        c.median,
        c.p95,
        c.max
    )?;
    if let Some(t) = &r.tokens {
        let s = &t.sequence_tokens;
        outln!(
            "tokens ({}): {} in all, {} loss tokens; per record min {}, median {}, p95 {}, max {}",
            t.model,
            s.total,
            t.loss_tokens,
            s.min,
            s.median,
            s.p95,
            s.max
        )?;
        outln!(
            "at max_len {}: {} records truncated, {} dropped (no loss token left), {} tokens cut",
            t.max_len,
            t.truncated,
            t.dropped,
            t.tokens_cut
        )?;
    }
    Ok(())
}
