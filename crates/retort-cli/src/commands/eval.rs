//! `retort eval` (models on reference answers, side by side) and `retort probe` (will KD pay off?).

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use retort_data::{Dataset, ReadOptions, dataset};
use retort_eval::eval::{self, EvalOptions, EvalReport, Phase};
use retort_kernels::MatmulPrecision;
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};

use crate::cli::{EvalArgs, ProbeArgs};
use crate::progress;

fn load(path: &Path, ctx: &super::Ctx) -> Result<(Model, Tokenizer)> {
    let quiet = ctx.quiet;
    let pb = progress::spinner(&format!("loading {}", path.display()), quiet);
    let loaded = checkpoint::load(path, WeightFormat::F32, &ctx.device)
        .with_context(|| format!("cannot load the model `{}`", path.display()));
    pb.finish_and_clear();
    loaded
}

/// Loads a model for scoring with `matmul` products; with bf16 its weights are packed once
/// where the CPU has a bf16 GEMM ([`Model::prepack_bf16`]). Returns the products it runs.
fn load_for(
    path: &Path,
    matmul: MatmulPrecision,
    ctx: &super::Ctx,
) -> Result<(Model, Tokenizer, MatmulPrecision)> {
    let (mut model, tok) = load(path, ctx)?;
    model.set_matmul_precision(matmul);
    let packed = model.prepack_bf16()?;
    if packed > 0 {
        tracing::debug!(
            "{}: {packed} weights packed once for bf16 products",
            path.display()
        );
    }
    let runs = if matmul.bf16_runs_here() && ctx.device.is_cpu() {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    };
    Ok((model, tok, runs))
}

fn read(path: &Path) -> Result<Dataset> {
    dataset::read(path, &ReadOptions::default())
        .with_context(|| format!("cannot read the data `{}`", path.display()))
}

/// A progress callback drawing one bar per phase.
fn bars(quiet: bool, name: String) -> impl FnMut(Phase, usize, usize) {
    let mut current: Option<(Phase, ProgressBar)> = None;
    move |phase, done, total| {
        if current.as_ref().map(|(p, _)| *p) != Some(phase) {
            if let Some((_, b)) = current.take() {
                b.finish_and_clear();
            }
            let what = match phase {
                Phase::Score => format!("{name}: scoring answer tokens"),
                Phase::Generate => format!("{name}: generating answers"),
            };
            current = Some((phase, progress::bar(total as u64, &what, quiet)));
        }
        if let Some((_, b)) = &current {
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
        }
    }
}

/// `NAME=PATH` → (NAME, PATH); a plain path (or an existing file whose name has `=`) is its own
/// name.
fn labelled(arg: &Path) -> (String, std::path::PathBuf) {
    if !arg.exists()
        && let Some((name, path)) = arg.to_str().and_then(|s| s.split_once('='))
        && !name.is_empty()
        && !name.contains(['/', '\\'])
    {
        return (name.to_string(), path.into());
    }
    (arg.display().to_string(), arg.to_path_buf())
}

pub fn eval(args: EvalArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let ds = read(&args.data)?;
    let teacher = match &args.teacher {
        Some(t) => Some(load_for(t, args.matmul, ctx)?),
        None => None,
    };
    let opts = EvalOptions {
        max_len: args.max_len,
        batch_size: args.batch_size,
        generate: args.generate,
        max_new_tokens: args.max_new_tokens,
        ..EvalOptions::default()
    };
    let mut reports: Vec<EvalReport> = Vec::new();
    for arg in &args.model {
        let (name, path) = labelled(arg);
        let (model, tok, matmul) = load_for(&path, args.matmul, ctx)?;
        let context = model.config().max_position_embeddings;
        anyhow::ensure!(
            args.generate == 0 || args.max_new_tokens < context,
            "--max-new-tokens {} does not fit `{}`: its context is {context} tokens (prompt and \
             answer together)\nhint: pass --max-new-tokens {} or less",
            args.max_new_tokens,
            path.display(),
            context.saturating_sub(1)
        );
        if let Some((_, ttok, _)) = &teacher
            && ttok.fingerprint() != tok.fingerprint()
        {
            anyhow::bail!(
                "`{}` and the teacher `{}` have different tokenizers\nhint: KL and agreement need one tokenizer; drop --teacher",
                path.display(),
                args.teacher.as_deref().unwrap_or(Path::new("")).display()
            );
        }
        let mut r = eval::evaluate(
            &model,
            &tok,
            teacher.as_ref().map(|(m, _, _)| m),
            &ds,
            &opts,
            bars(quiet, name.clone()),
        )
        .with_context(|| format!("evaluating `{name}` on `{}`", args.data.display()))?;
        r.model = name;
        r.matmul = matmul.name().into();
        r.teacher = args.teacher.as_ref().map(|t| t.display().to_string());
        tracing::info!("{}: done in {:.1}s", r.model, r.seconds);
        reports.push(r);
    }
    outln!("{}", eval::markdown(&reports))?;
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&reports)?;
        retort_data::files::write_atomic(path, json.as_bytes())
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(())
}

pub fn probe(args: ProbeArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let mut ds = read(&args.data)?;
    let records = ds.records.len();
    anyhow::ensure!(records > 0, "`{}` has no records", args.data.display());
    // An evenly spread slice: every k-th record.
    let n = args.holdout.clamp(1, records);
    let stride = records as f64 / n as f64;
    let keep: Vec<usize> = (0..n).map(|i| (i as f64 * stride) as usize).collect();
    ds.records = keep.iter().map(|&i| ds.records[i].clone()).collect();
    let train_size = args.train_size.unwrap_or(records);
    let (teacher, ttok) = load(&args.teacher, ctx)?;
    let (student, stok) = load(&args.student, ctx)?;
    anyhow::ensure!(
        ttok.fingerprint() == stok.fingerprint(),
        "the teacher and the student have different tokenizers\nhint: token-level KD needs one tokenizer (a student pruned from the teacher, or the same family)"
    );
    let opts = EvalOptions {
        max_len: args.max_len,
        ..EvalOptions::default()
    };
    let r = eval::evaluate(
        &student,
        &stok,
        Some(&teacher),
        &ds,
        &opts,
        bars(quiet, "probe".into()),
    )?;
    let v = retort_eval::verdict(&r.tokens, train_size);
    if args.json {
        let out = serde_json::json!({"holdout": r, "verdict": v});
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(());
    }
    let m = &r.tokens;
    let opt = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.3}"));
    let skipped = r.records - r.samples;
    outln!(
        "held-out slice of `{}`: {} conversations, {} answer tokens{}\n",
        args.data.display(),
        r.samples,
        m.tokens,
        if skipped > 0 {
            format!(
                " ({skipped} skipped: no answer token within --max-len {})",
                args.max_len
            )
        } else {
            String::new()
        }
    )?;
    outln!("| on the gold answers | teacher | student |\n| --- | ---: | ---: |")?;
    outln!(
        "| NLL (nats/token) | {} | {:.3} |",
        opt(m.teacher_nll),
        m.nll
    )?;
    outln!(
        "| entropy (nats) | {} | {:.3} |",
        opt(m.teacher_entropy),
        m.entropy
    )?;
    outln!("| KL(teacher ‖ student) | {} | |", opt(m.kl))?;
    outln!("| top-1 agreement | {} | |", opt(m.agreement))?;
    outln!(
        "\nKD over SFT with {} training examples: {}",
        v.train_size,
        v.kd_pays_off.as_str().to_uppercase()
    )?;
    for reason in &v.reasons {
        outln!("- {reason}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_argument_may_carry_a_column_name() {
        let (n, p) = labelled(Path::new("sft=runs/sft/model"));
        assert_eq!(
            (n.as_str(), p.as_path()),
            ("sft", Path::new("runs/sft/model"))
        );
        let (n, p) = labelled(Path::new("runs/a=b/model"));
        assert_eq!(
            (n.as_str(), p.as_path()),
            ("runs/a=b/model", Path::new("runs/a=b/model"))
        );
        let (n, _) = labelled(Path::new("model.gguf"));
        assert_eq!(n, "model.gguf");
    }
}
