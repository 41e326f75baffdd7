//! `retort review PIPELINE_DB` (the review page until Ctrl-C) and `retort export PIPELINE_DB`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use retort_server::review::{self, ReviewOptions};
use retort_teacher::synth::run::LEDGER;
use retort_teacher::synth::{Store, export as exporting};

use crate::cli::{ExportArgs, ReviewArgs};

/// A synth output directory stands for the ledger inside it.
fn ledger_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(LEDGER)
    } else {
        p.to_path_buf()
    }
}

pub fn review(args: ReviewArgs) -> Result<()> {
    let db = ledger_path(&args.db);
    let reviewer = args
        .reviewer
        .or_else(|| std::env::var("USER").ok())
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "reviewer".into());
    let opts = ReviewOptions {
        db: db.clone(),
        host: args.host,
        port: args.port,
        reviewer: reviewer.clone(),
    };
    review::serve(opts, |_, url| {
        // The URL on stdout (first line), so scripts can wait for it; it carries the token
        // when one is required.
        if let Err(e) = outln!("reviewing {} at {url}", db.display()) {
            tracing::warn!("cannot print the address on stdout: {e}");
        }
        tracing::info!("decisions are recorded as `{reviewer}` (Ctrl-C to stop)");
    })
    .with_context(|| format!("cannot review `{}`", db.display()))
}

pub fn export(args: ExportArgs) -> Result<()> {
    let db = ledger_path(&args.db);
    let store = Store::open(&db).with_context(|| format!("cannot open `{}`", db.display()))?;
    let s = exporting::export_with(&store, &args.out, args.auto_accept)
        .with_context(|| format!("cannot export into `{}`", args.out.display()))?;
    outln!(
        "{}: {} items ({} accepted, {} rejected, {} pending, {} without answer)",
        db.display(),
        s.items,
        s.accepted,
        s.rejected,
        s.pending,
        s.no_answer
    )?;
    for (file, n, what) in [
        (
            exporting::STAGE1,
            s.stage1,
            "accepted teacher answers (edited where edited)",
        ),
        (
            exporting::STAGE2,
            s.stage2,
            "human-written or human-edited answers",
        ),
        (
            exporting::PREFERENCES,
            s.preferences,
            "pairs: human answer vs teacher original",
        ),
    ] {
        outln!("  {:<44} {n:>6}  {what}", args.out.join(file).display())?;
    }
    if s.auto_accepted > 0 {
        tracing::info!(
            "{} pending teacher answers exported as accepted (--auto-accept)",
            s.auto_accepted
        );
    }
    if s.accepted == 0 && s.auto_accepted == 0 {
        tracing::warn!(
            "nothing is accepted yet, so the sets are empty\nhint: review first: retort review {}",
            args.db.display()
        );
    }
    Ok(())
}
