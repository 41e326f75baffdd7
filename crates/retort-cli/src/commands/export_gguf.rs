//! `retort export-gguf`: a model as a GGUF file llama.cpp runs (see
//! [`retort_model::gguf_write`]).

use anyhow::{Context, Result, bail};
use retort_model::checkpoint;
use retort_model::gguf_write::write_gguf;

use crate::cli::ExportGgufArgs;
use crate::progress;

pub fn run(args: ExportGgufArgs, ctx: &super::Ctx) -> Result<()> {
    if args.out.exists() && !args.force {
        bail!(
            "`{}` already exists\nhint: choose another --out or add --force to replace it",
            args.out.display()
        );
    }
    if args.out.is_dir() {
        bail!(
            "`{}` is a directory\nhint: --out names the GGUF file to write, e.g. student.q8_0.gguf",
            args.out.display()
        );
    }
    let pb = progress::spinner(&format!("reading {}", args.model.display()), ctx.quiet);
    let ck = checkpoint::read(&args.model, &ctx.device);
    pb.finish_and_clear();
    let ck = ck.with_context(|| format!("cannot load `{}`", args.model.display()))?;
    let name = args.name.clone().unwrap_or_else(|| {
        // `runs/NAME/model` → NAME; a file → its stem.
        let p = &args.model;
        let dir_name = |q: &std::path::Path| q.file_name().map(|n| n.to_string_lossy().to_string());
        match dir_name(p).as_deref() {
            Some("model") => p.parent().and_then(dir_name),
            _ => p.file_stem().map(|n| n.to_string_lossy().to_string()),
        }
        .unwrap_or_else(|| "retort-student".into())
    });
    let pb = progress::spinner(
        &format!("writing {} ({})", args.out.display(), args.quant),
        ctx.quiet,
    );
    let done = write_gguf(&ck, args.quant, &args.out, &name);
    pb.finish_and_clear();
    let e = done.with_context(|| format!("cannot export `{}`", args.model.display()))?;
    tracing::info!(
        "wrote {} ({} tensors, {:.1} MB, {}, tokenizer pre `{}`{})",
        e.path.display(),
        e.tensors,
        e.bytes as f64 / 1e6,
        args.quant,
        e.pre_tokenizer,
        if e.f16_fallback.is_empty() {
            String::new()
        } else {
            format!(
                "; {} matrices as f16, their rows not whole blocks",
                e.f16_fallback.len()
            )
        }
    );
    outln!("{}", e.path.display())?;
    if !ctx.quiet {
        eprintln!(
            "chat with it:\n  retort chat --model {p}\n  llama-cli -m {p} -cnv   # llama.cpp",
            p = e.path.display()
        );
    }
    Ok(())
}
