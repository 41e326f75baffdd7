//! `retort generate`: completions for one prompt or a JSONL file of prompts, batched.
//!
//! Output: one JSON record per prompt, in input order:
//! `{"id", "messages", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use retort_data::{Message, Role};
use retort_model::generation::generate;
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

pub fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
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
    let (model, tok) = super::load_model(&args.model, quiet)?;

    // Write to a temporary file next to --out and rename at the end: no half-written output.
    let tmp_path = args.out.as_ref().map(|o| {
        let name = o
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        o.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
    });
    let mut sink: Box<dyn Write> = match &tmp_path {
        Some(t) => Box::new(std::io::BufWriter::new(fs_err::File::create(t)?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let pb = progress::bar(
        prompts.len() as u64,
        "generating",
        quiet || prompts.len() == 1,
    );
    let t0 = std::time::Instant::now();
    let mut generated = 0usize;
    let result = (|| -> Result<()> {
        for (chunk_idx, chunk) in prompts.chunks(args.batch_size).enumerate() {
            let ids: Vec<Vec<u32>> = chunk
                .iter()
                .map(|p| tok.encode_prompt(&p.messages))
                .collect::<retort_model::Result<_>>()?;
            let batch_params = retort_model::generation::SamplingParams {
                seed: params
                    .seed
                    .wrapping_add((chunk_idx * args.batch_size) as u64),
                ..params.clone()
            };
            let mut pieces = 0usize;
            let outs = generate(&model, &tok, &ids, &batch_params, |_, _| {
                pieces += 1;
                if pieces.is_multiple_of(16) {
                    pb.set_message(format!(
                        "generating (~{} tokens so far)",
                        generated + pieces
                    ));
                }
            })?;
            for (p, c) in chunk.iter().zip(outs) {
                generated += c.ids.len();
                let rec = serde_json::json!({
                    "id": p.id,
                    "messages": p.messages,
                    "completion": c.text,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.ids.len(),
                });
                writeln!(sink, "{rec}")?;
            }
            pb.inc(chunk.len() as u64);
        }
        sink.flush()?;
        Ok(())
    })();
    pb.finish_and_clear();
    drop(sink);
    if let Err(e) = result {
        if let Some(t) = &tmp_path {
            let _ = fs_err::remove_file(t);
        }
        return Err(e);
    }
    if let (Some(t), Some(o)) = (&tmp_path, &args.out) {
        fs_err::rename(t, o)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        "{} prompts, {generated} tokens generated in {secs:.1}s ({:.1} tok/s)",
        prompts.len(),
        generated as f64 / secs.max(1e-9)
    );
    Ok(())
}
