//! `retort init-student`: a depth-pruned student initialised from the teacher's weights
//! (Minitron / DistilBERT style), saved as a Hugging Face directory.

use anyhow::{Context, Result, bail};
use retort_model::checkpoint;
use retort_model::model::evenly_spaced_layers as evenly_spaced;

use crate::cli::InitStudentArgs;
use crate::progress;

pub fn run(args: InitStudentArgs, ctx: &super::Ctx) -> Result<()> {
    let quiet = ctx.quiet;
    let pb = progress::spinner(&format!("reading {}", args.teacher.display()), quiet);
    let ck = checkpoint::read(&args.teacher, &ctx.device);
    pb.finish_and_clear();
    let ck = ck.with_context(|| format!("cannot load the teacher `{}`", args.teacher.display()))?;
    let total = ck.config.num_hidden_layers;
    let keep = match (&args.keep_layers, args.num_layers) {
        (Some(k), _) => k.clone(),
        (None, Some(n)) => {
            if n == 0 || n > total {
                bail!("--num-layers must be between 1 and {total} (the teacher's depth), got {n}");
            }
            evenly_spaced(n, total)
        }
        (None, None) => bail!("pass --keep-layers or --num-layers"),
    };
    let mut seen = std::collections::HashSet::new();
    if let Some(d) = keep.iter().find(|&&i| !seen.insert(i)) {
        bail!("--keep-layers lists layer {d} twice; each teacher layer can be kept once");
    }
    let pb = progress::spinner("dequantizing and pruning", quiet);
    let teacher = ck.frozen(retort_model::WeightFormat::F32)?;
    let student = teacher.prune_layers(&keep, &args.teacher)?;
    pb.set_message(format!("writing {}", args.out.display()));
    let saved = checkpoint::save_hf(&student, &ck.tokenizer, &args.out, args.force);
    pb.finish_and_clear();
    saved.with_context(|| format!("cannot save the student to `{}`", args.out.display()))?;
    let c = student.config();
    tracing::info!(
        "student: {} of {} teacher layers {:?}, {:.1}M parameters, saved to {}",
        keep.len(),
        total,
        keep,
        c.num_parameters() as f64 / 1e6,
        args.out.display()
    );
    outln!("{}", args.out.display())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::evenly_spaced;

    #[test]
    fn evenly_spaced_keeps_first_and_last() {
        assert_eq!(
            evenly_spaced(10, 30),
            vec![0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
        );
        assert_eq!(evenly_spaced(2, 30), vec![0, 29]);
        assert_eq!(evenly_spaced(30, 30), (0..30).collect::<Vec<_>>());
        assert_eq!(evenly_spaced(1, 30), vec![0]);
    }
}
