//! `retort chat`: an interactive conversation, answers streamed token by token.

use std::io::{BufRead, Write};

use anyhow::Result;
use retort_data::Message;
use retort_model::generation::generate;

use crate::cli::ChatArgs;

pub fn run(args: ChatArgs, ctx: &super::Ctx) -> Result<()> {
    let (model, tok) = super::load_model(&args.model, ctx)?;
    let params = super::sampling_params(&args.sampling)?;
    let mut history: Vec<Message> = args.system.iter().map(Message::system).collect();
    eprintln!(
        "Type a message and press Enter; an empty line or Ctrl-D ends the chat, /reset forgets the conversation."
    );
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if line == "/reset" {
            history.retain(|m| m.role == retort_data::Role::System);
            continue;
        }
        history.push(Message::user(line));
        let prompt = tok.encode_prompt(&history)?;
        let t0 = std::time::Instant::now();
        let mut write_err = None;
        let out = generate(&model, &tok, &[prompt], &params, |_, piece| {
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err.get_or_insert(e);
            }
        })?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        let answer = out
            .into_iter()
            .next()
            .map(|c| (c.text, c.ids.len()))
            .unwrap_or_default();
        writeln!(stdout)?;
        tracing::debug!("{} tokens in {:.2}s", answer.1, t0.elapsed().as_secs_f64());
        history.push(Message::assistant(answer.0));
    }
    Ok(())
}
