//! `retort cache inspect | recode`.

use anyhow::{Context, Result};
use retort_distill::cache::{Reader, recode as rc};
use serde::Serialize;

use crate::cli::{CacheInspectArgs, CacheRecodeArgs};
use crate::progress;

#[derive(Serialize)]
struct Report {
    dir: String,
    format_version: u32,
    /// Format 2 with offsets and a tokenizer that matches its fingerprint: a student of any
    /// tokenizer can train from it (`cross_tokenizer`).
    any_tokenizer: bool,
    /// The tokenizer the positions belong to (its fingerprint).
    tokenizer_fingerprint: String,
    complete: bool,
    teacher: String,
    teacher_sha256: String,
    dataset: String,
    dataset_sha256: String,
    k: usize,
    temperature: f64,
    codec: String,
    samples: usize,
    /// Distinct samples (identical conversations share one entry).
    unique_samples: usize,
    tokens: usize,
    shards: usize,
    bytes: u64,
    bytes_per_token: f64,
    against: Option<rc::Comparison>,
}

pub fn inspect(args: CacheInspectArgs, quiet: bool) -> Result<()> {
    let pb = progress::spinner("verifying checksums", quiet);
    let r = Reader::open(&args.dir, true);
    pb.finish_and_clear();
    let r = r.with_context(|| format!("cannot open `{}`", args.dir.display()))?;
    let against = match &args.against {
        Some(o) => {
            let b =
                Reader::open(o, true).with_context(|| format!("cannot open `{}`", o.display()))?;
            let pb = progress::spinner("comparing", quiet);
            let c = rc::compare(&r, &b);
            pb.finish_and_clear();
            Some(c?)
        }
        None => None,
    };
    let m = &r.manifest;
    let tokens = m.positions();
    // A cache that claims to serve any tokenizer must hold the one it names.
    if m.serves_any_tokenizer() {
        r.teacher_tokenizer()
            .with_context(|| format!("`{}`: its teacher tokenizer", args.dir.display()))?;
    }
    let rep = Report {
        dir: args.dir.display().to_string(),
        format_version: m.format_version,
        any_tokenizer: m.serves_any_tokenizer(),
        tokenizer_fingerprint: m.tokenizer_fingerprint.clone(),
        complete: m.complete,
        teacher: m.teacher.path.display().to_string(),
        teacher_sha256: m.teacher.sha256.clone(),
        dataset: m.dataset.path.display().to_string(),
        dataset_sha256: m.dataset.sha256.clone(),
        k: m.k,
        temperature: m.temperature,
        codec: m.encoding.codec.to_string(),
        samples: m.shards.iter().map(|s| s.samples).sum(),
        unique_samples: r.len(),
        tokens,
        shards: m.shards.len(),
        bytes: m.bytes(),
        bytes_per_token: m.bytes() as f64 / tokens.max(1) as f64,
        against,
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rep)?)?;
        return Ok(());
    }
    outln!(
        "{}: {} (format v{}), all {} shard checksums verified",
        rep.dir,
        if rep.complete {
            "complete"
        } else {
            "UNFINISHED"
        },
        rep.format_version,
        rep.shards
    )?;
    outln!(
        "teacher {} (sha256 {}…)",
        rep.teacher,
        &rep.teacher_sha256[..12]
    )?;
    outln!(
        "data    {} (sha256 {}…)",
        rep.dataset,
        &rep.dataset_sha256[..12]
    )?;
    outln!(
        "tokens  of tokenizer {}… — {}",
        &rep.tokenizer_fingerprint[..12.min(rep.tokenizer_fingerprint.len())],
        if rep.any_tokenizer {
            "serves students of any tokenizer (teacher offsets and tokenizer stored, checked)"
        } else {
            "serves students of this tokenizer only (no teacher offsets stored)"
        }
    )?;
    outln!(
        "k={} T={} codec {}: {} samples ({} distinct), {} tokens, {} bytes = {:.1} bytes/token",
        rep.k,
        rep.temperature,
        rep.codec,
        rep.samples,
        rep.unique_samples,
        rep.tokens,
        rep.bytes,
        rep.bytes_per_token
    )?;
    if let Some(c) = rep.against {
        outln!(
            "against {}: {} samples, {} tokens; KL per token mean {:.3e}, max {:.3e} nats; top-1 agreement {:.4}",
            args.against
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            c.samples,
            c.tokens,
            c.mean_kl,
            c.max_kl,
            c.top1_agreement
        )?;
    }
    Ok(())
}

pub fn recode(args: CacheRecodeArgs, quiet: bool) -> Result<()> {
    let src = Reader::open(&args.src, false)
        .with_context(|| format!("cannot open `{}`", args.src.display()))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let pb = progress::spinner("recoding", quiet);
    let m = rc::recode(
        &src,
        args.top_k,
        args.min_prob,
        args.codec,
        &args.out,
        &command,
    );
    pb.finish_and_clear();
    let m = m.with_context(|| format!("cannot recode into `{}`", args.out.display()))?;
    outln!(
        "{}: k={} codec {}, {} tokens, {} bytes ({:.1} bytes/token)",
        args.out.display(),
        m.k,
        m.encoding.codec,
        m.positions(),
        m.bytes(),
        m.bytes() as f64 / m.positions().max(1) as f64
    )?;
    Ok(())
}
