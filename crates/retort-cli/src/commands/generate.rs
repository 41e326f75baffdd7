//! `retort generate`: completions for one prompt or a JSONL file of prompts, batched.
//!
//! Output: one JSON record per prompt, in input order:
//! `{"id", "messages", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}`.
//! Prompts run through one continuous batch (`--batch-size` rows). An answer that reaches the
//! model's context ends there with `finish_reason: "length"`. `--out` is written whole (temp
//! file, then rename); if the run is interrupted or fails, the finished answers are kept in
//! `OUT.partial`.

use std::io::Write;
use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use retort_data::{Message, Role};
use retort_model::batching::{Batcher, BatcherLimits, Event, batch_cap};
use retort_model::generation::{Completion, SamplingParams};
use serde::Deserialize;

use crate::cli::GenerateArgs;
use crate::progress;

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    id: Option<serde_json::Value>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    system: Option<String>,
}

struct Prompt {
    id: serde_json::Value,
    messages: Vec<Message>,
}

fn read_prompts(path: &Path, default_system: Option<&str>) -> Result<Vec<Prompt>> {
    let text = fs_err::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{n}: not a prompt record\nhint: each line must be JSON like {{\"prompt\": \"…\"}} or {{\"messages\": [{{\"role\": \"user\", \"content\": \"…\"}}]}}",
                path.display()
            )
        })?;
        let system = p.system.as_deref().or(default_system);
        let mut messages = match (p.prompt, p.messages) {
            (Some(text), None) => vec![Message::user(text)],
            (None, Some(m)) => m,
            (Some(_), Some(_)) => bail!(
                "{}:{n}: has both `prompt` and `messages`\nhint: keep one of them",
                path.display()
            ),
            (None, None) => bail!(
                "{}:{n}: has neither `prompt` nor `messages`\nhint: add the user's text as \"prompt\"",
                path.display()
            ),
        };
        if messages.is_empty() || messages.iter().any(|m| m.content.trim().is_empty()) {
            bail!(
                "{}:{n}: a message is empty\nhint: remove the line or write the message",
                path.display()
            );
        }
        if messages.last().is_some_and(|m| m.role == Role::Assistant) {
            bail!(
                "{}:{n}: the last message is the assistant's, so there is nothing to answer\nhint: end with a user message",
                path.display()
            );
        }
        if let Some(s) = system
            && messages[0].role != Role::System
        {
            messages.insert(0, Message::system(s));
        }
        out.push(Prompt {
            id: p.id.unwrap_or_else(|| serde_json::json!(out.len())),
            messages,
        });
    }
    if out.is_empty() {
        bail!(
            "{}: no prompts\nhint: write one JSON prompt record per line",
            path.display()
        );
    }
    Ok(out)
}

pub fn run(args: GenerateArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    anyhow::ensure!(
        (1..=1024).contains(&args.batch_size),
        "--batch-size must be between 1 and 1024, got {}",
        args.batch_size
    );
    let prompts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => {
            let mut messages: Vec<Message> = args.system.iter().map(Message::system).collect();
            messages.push(Message::user(p.clone()));
            vec![Prompt {
                id: serde_json::json!(0),
                messages,
            }]
        }
        (None, Some(path)) => read_prompts(path, args.system.as_deref())?,
        (None, None) => bail!("pass --prompt or --prompts"),
    };
    let params = super::sampling_params(&args.sampling)?;
    let (model, tok) = super::load_model(&args.model, ctx)?;
    let context = super::check_context(&args.sampling, &model)?;
    // Every prompt is checked before any work: one that fills the context is named.
    let mut ids = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let enc = tok.encode_prompt(&p.messages)?;
        if enc.len() >= context {
            let from = match &args.prompts {
                Some(f) => format!("{}: prompt {}", f.display(), p.id),
                None => "--prompt".to_string(),
            };
            bail!(
                "{from} has {} tokens; the model's context is {context} tokens, which leaves no \
                 room for an answer\nhint: shorten the prompt or use a model with a longer context",
                enc.len()
            );
        }
        ids.push(enc);
    }

    let stop = match args.prompts {
        Some(_) => super::stop_on_ctrl_c("stopping: the finished answers are written")?,
        None => Arc::new(AtomicBool::new(false)),
    };

    let pb = progress::bar(
        prompts.len() as u64,
        "generating",
        quiet || prompts.len() == 1,
    );
    let t0 = std::time::Instant::now();
    let mut generated = 0usize;
    let mut done: Vec<Option<Completion>> = vec![None; prompts.len()];
    let mut stdout_next = 0usize; // without --out, records stream to stdout in input order
    let mut out = std::io::stdout().lock();
    let result = (|| -> Result<()> {
        let mut b = Batcher::new(
            &model,
            &tok,
            BatcherLimits {
                max_rows: args.batch_size,
                cap: batch_cap(
                    ids.iter().map(Vec::len).max().unwrap_or(1),
                    params.max_new_tokens,
                    context,
                ),
                prefill_chunk: 512,
            },
        )?;
        for (i, p) in ids.iter().enumerate() {
            let sp = SamplingParams {
                seed: params.seed.wrapping_add(i as u64),
                ..params.clone()
            };
            b.submit(i as u64, p.clone(), sp)?;
        }
        let mut pieces = 0usize;
        while !b.is_idle() {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            for e in b.step()? {
                match e {
                    Event::Text(..) => {
                        pieces += 1;
                        if pieces.is_multiple_of(16) {
                            pb.set_message(format!(
                                "generating (~{} tokens so far)",
                                generated + pieces
                            ));
                        }
                    }
                    Event::Done(i, c) => {
                        generated += c.ids.len();
                        done[i as usize] = Some(c);
                        pb.inc(1);
                    }
                }
            }
            if args.out.is_none() {
                while let Some(Some(c)) = done.get(stdout_next) {
                    writeln!(out, "{}", record(&prompts[stdout_next], c))?;
                    stdout_next += 1;
                }
            }
        }
        Ok(())
    })();
    pb.finish_and_clear();
    let finished = done.iter().filter(|c| c.is_some()).count();
    let write_all = |path: &Path| -> Result<()> {
        let text: String = prompts
            .iter()
            .zip(&done)
            .filter_map(|(p, c)| c.as_ref().map(|c| format!("{}\n", record(p, c))))
            .collect();
        Ok(retort_data::files::write_atomic(path, text.as_bytes())?)
    };
    match (result, &args.out) {
        (Ok(()), Some(o)) => write_all(o)?,
        (Ok(()), None) => out.flush()?,
        (Err(e), Some(o)) => {
            // Every finished answer is kept, beside the output (which is written only whole).
            let partial = o.with_file_name(format!(
                "{}.partial",
                o.file_name()
                    .map_or_else(|| "generate".into(), |n| n.to_string_lossy().into_owned())
            ));
            if finished > 0 {
                write_all(&partial)?;
                return Err(e.context(format!(
                    "{finished} of {} answers were finished; they are in `{}` ({} not written)",
                    prompts.len(),
                    partial.display(),
                    o.display()
                )));
            }
            return Err(e);
        }
        (Err(e), None) => {
            out.flush()?;
            return Err(e.context(format!(
                "{stdout_next} of {} answers were written",
                prompts.len()
            )));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        "{} prompts, {generated} tokens generated in {secs:.1}s ({:.1} tok/s)",
        prompts.len(),
        generated as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// The output record of one prompt.
fn record(p: &Prompt, c: &Completion) -> serde_json::Value {
    serde_json::json!({
        "id": p.id,
        "messages": p.messages,
        "completion": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.ids.len(),
    })
}
