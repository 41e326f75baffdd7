//! `retort label`: run the teacher (f32, batched) over every loss token of a dataset and write
//! its top-k log-probs and tail mass into a cache.
//!
//! Work is cut into shards of `shard_samples` consecutive samples. A shard is built in memory,
//! written to a temp file, synced and renamed, and only then recorded in the manifest (itself
//! replaced atomically). A run killed at any point therefore leaves finished shards, each listed
//! once, and at most one unlisted file that the next run overwrites: running the same command
//! again resumes with no sample lost or written twice.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use retort_data::{ReadOptions, dataset};
use retort_kernels::MatmulPrecision;
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};

use super::codec::{Codec, TopK};
use super::manifest::{
    DatasetInfo, Encoding, FORMAT_NAME, FORMAT_VERSION, MANIFEST, Manifest, ShardInfo,
    TOKENIZER_DIR, TeacherInfo,
};
use super::shard::{ShardBuilder, sample_key, shard_name};
use super::topk::{drop_below, label_log_probs, top_k_rows};
use crate::batch::{self, Sample, Truncation};
use crate::error::{Error, Result};
use crate::objective;
use retort_data::files::write_atomic;
use retort_model::TurnTokens;

#[derive(Debug, Clone)]
pub struct LabelOptions {
    pub teacher: PathBuf,
    /// Where the teacher runs (`--device`).
    pub device: candle_core::Device,
    pub data: PathBuf,
    pub read: ReadOptions,
    pub out: PathBuf,
    pub k: usize,
    pub temperature: f64,
    /// Entries (after the first) below this probability join the tail (0 = keep all k).
    pub min_prob: f64,
    pub codec: Codec,
    pub max_len: usize,
    pub truncation: Truncation,
    /// Sequences per teacher forward.
    pub batch_size: usize,
    pub shard_samples: usize,
    /// Rows of logits computed at once.
    pub chunk_rows: usize,
    /// Products of a local teacher's linear layers and LM head: `F32` (exact) or `Bf16` (f32
    /// accumulation, the frozen weights packed once; f32 where the CPU has no bf16 GEMM). A
    /// remote teacher's are its server's.
    pub matmul: MatmulPrecision,
    /// The command line, recorded in the manifest for guards to print.
    pub command: String,
}

/// What labelling reports as it goes.
pub trait LabelObserver {
    /// `positions` to label in all, `done` of them already in the cache.
    fn start(&mut self, positions: usize, done: usize);
    /// `positions` more labelled.
    fn progress(&mut self, positions: usize);
    fn shard(&mut self, info: &ShardInfo);
}

/// Observer that reports nothing.
pub struct Silent;
impl LabelObserver for Silent {
    fn start(&mut self, _: usize, _: usize) {}
    fn progress(&mut self, _: usize) {}
    fn shard(&mut self, _: &ShardInfo) {}
}

#[derive(Debug, Clone)]
pub struct LabelReport {
    pub manifest: Manifest,
    /// Positions labelled by this run (not counting shards found finished).
    pub positions_this_run: usize,
    pub seconds: f64,
    /// True when the run stopped early (stop flag) with the cache unfinished.
    pub interrupted: bool,
}

/// What labels a batch of samples: the local f32 model, or a server reached over HTTP
/// (`retort_teacher::remote_label`). Rows follow [`loss_positions`]; each row holds exactly
/// `k` entries (unused slots [`super::codec::NONE`] with log-prob `-inf`), sorted descending,
/// and the label log-prob of the token that follows (`TopK::label_logp`; the caller adds the
/// turns).
pub trait Scorer: Sync {
    fn vocab_size(&self) -> usize;
    /// Tokens a sample may have, where the scorer knows it (a local model); samples longer than
    /// that are refused before any labelling.
    fn context(&self) -> Option<usize> {
        None
    }
    /// Recorded in the manifest (and compared by guards).
    fn info(&self) -> Result<TeacherInfo>;
    fn label_batch(
        &self,
        samples: &[&Sample],
        pad_id: u32,
        k: usize,
        temperature: f64,
        min_prob: f64,
    ) -> Result<Vec<TopK>>;
}

/// The teacher loaded in this process, scored in f32.
pub struct LocalScorer<'a> {
    pub model: &'a Model,
    pub path: PathBuf,
    pub arch: String,
    pub chunk_rows: usize,
}

impl Scorer for LocalScorer<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
    fn context(&self) -> Option<usize> {
        Some(self.model.config().max_position_embeddings)
    }
    fn info(&self) -> Result<TeacherInfo> {
        Ok(TeacherInfo {
            path: self.path.clone(),
            sha256: retort_model::checkpoint::weights_sha256(&self.path)?,
            arch: self.arch.clone(),
            vocab_size: self.vocab_size(),
        })
    }
    fn label_batch(
        &self,
        samples: &[&Sample],
        pad_id: u32,
        k: usize,
        temperature: f64,
        min_prob: f64,
    ) -> Result<Vec<TopK>> {
        label_batch(
            self.model,
            samples,
            pad_id,
            k,
            temperature,
            min_prob,
            self.chunk_rows,
        )
    }
}

/// Positions `p` of a sample whose next token carries loss, i.e. rows of its teacher targets.
pub fn loss_positions(s: &Sample) -> Vec<u32> {
    (0..s.ids.len().saturating_sub(1))
        .filter(|&p| s.loss_mask[p + 1])
        .map(|p| p as u32)
        .collect()
}

/// Teacher top-k for each of `samples` (one batch), in order.
pub fn label_batch(
    teacher: &Model,
    samples: &[&Sample],
    pad_id: u32,
    k: usize,
    temperature: f64,
    min_prob: f64,
    chunk_rows: usize,
) -> Result<Vec<TopK>> {
    let device = teacher.device();
    let mb = batch::collate(samples, pad_id, device)?;
    let vocab = teacher.config().vocab_size;
    let k = k.min(vocab);
    let n = mb.loss_tokens;
    let (mut ids, mut logp, mut tail, mut label) = (
        Vec::with_capacity(n * k),
        Vec::with_capacity(n * k),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    if n > 0 {
        let targets = mb.targets.to_vec1::<u32>()?; // (N): the token each row predicts
        let h = objective::teacher_hidden(teacher, &mb)?; // (N, C)
        let mut start = 0;
        while start < n {
            let len = chunk_rows.max(1).min(n - start);
            let logits: Tensor = teacher.lm_head(&h.narrow(0, start, len)?)?; // (len, V)
            let flat = logits.flatten_all()?.to_vec1::<f32>()?;
            let (mut i, mut l, mut t) = top_k_rows(&flat, vocab, k, temperature);
            drop_below(&mut i, &mut l, &mut t, k, min_prob);
            label.extend(label_log_probs(
                &flat,
                vocab,
                &targets[start..start + len],
                temperature,
            ));
            ids.extend(i);
            logp.extend(l);
            tail.extend(t);
            start += len;
        }
    }
    let mut out = Vec::with_capacity(samples.len());
    let mut row = 0;
    for s in samples {
        let positions = loss_positions(s);
        let r = positions.len();
        out.push(TopK {
            k,
            tokens: s.ids.clone(),
            positions,
            ids: ids[row * k..(row + r) * k].to_vec(),
            logp: logp[row * k..(row + r) * k].to_vec(),
            log_tail: tail[row..row + r].to_vec(),
            label_logp: label[row..row + r].to_vec(),
            turns: None,
        });
        row += r;
    }
    Ok(out)
}

/// Label `opts.data` into `opts.out`, resuming a cache left unfinished with the same settings.
/// Stops between batches when `stop` is set, keeping every finished shard.
pub fn label(
    opts: &LabelOptions,
    stop: &AtomicBool,
    obs: &mut dyn LabelObserver,
) -> Result<LabelReport> {
    check_options(opts)?;
    let ck = checkpoint::read(&opts.teacher, &opts.device)?;
    let mut teacher = ck.frozen(WeightFormat::F32)?;
    teacher.set_matmul_precision(opts.matmul);
    let packed = teacher.prepack_bf16()?;
    if packed > 0 {
        tracing::debug!("teacher: {packed} weights packed once for bf16 products");
    }
    let scorer = LocalScorer {
        model: &teacher,
        path: opts.teacher.clone(),
        arch: format!("{:?}", ck.config.arch).to_lowercase(),
        chunk_rows: opts.chunk_rows,
    };
    label_with(opts, &scorer, &ck.tokenizer, stop, obs)
}

fn check_options(opts: &LabelOptions) -> Result<()> {
    if opts.k == 0
        || opts.shard_samples == 0
        || opts.temperature <= 0.0
        || !(0.0..1.0).contains(&opts.min_prob)
    {
        return Err(Error::invalid(
            format!(
                "--top-k {}, --shard-samples {}, --temperature {}, --min-prob {}",
                opts.k, opts.shard_samples, opts.temperature, opts.min_prob
            ),
            "top-k and shard-samples must be at least 1, the temperature positive, and \
             min-prob in [0, 1)",
        ));
    }
    Ok(())
}

/// The manifest to continue: the one in `opts.out` if its settings equal `fresh`'s (its shards
/// kept up to the first missing or truncated file), else `fresh`. Removes the temp files of a
/// run killed mid-write (never listed, so safe to remove).
fn resume_or_start(opts: &LabelOptions, fresh: Manifest) -> Result<Manifest> {
    fs_err::create_dir_all(&opts.out)?;
    retort_data::files::remove_partials(&opts.out)?;
    if !opts.out.join(MANIFEST).exists() {
        return Ok(fresh);
    }
    let mut m = Manifest::read(&opts.out)?;
    m.same_settings(&fresh).map_err(|why| {
        Error::invalid(
            format!(
                "`{}` holds a cache with other settings: {why}",
                opts.out.display()
            ),
            "label into a new --out directory, or delete this one to relabel",
        )
    })?;
    // A shard whose file is gone or has the wrong size is redone from there on.
    let ok = m
        .shards
        .iter()
        .take_while(|s| {
            fs_err::metadata(opts.out.join(&s.file)).is_ok_and(|md| md.len() == s.bytes)
        })
        .count();
    m.shards.truncate(ok);
    m.command = opts.command.clone();
    Ok(m)
}

/// Shard `si` (samples from `first` on, one top-k per sample in `results`) encoded and written
/// atomically; its manifest entry.
fn write_shard(
    opts: &LabelOptions,
    si: usize,
    first: usize,
    samples: &[(Sample, Option<Vec<TurnTokens>>)],
    results: Vec<Option<TopK>>,
    vocab: usize,
) -> Result<ShardInfo> {
    let mut builder = ShardBuilder::default();
    let mut rows = 0;
    for (j, t) in results.into_iter().enumerate() {
        let Some(t) = t else {
            return Err(Error::invalid(
                "a sample was left unlabelled",
                "this is a bug in retort",
            ));
        };
        let (s, turns) = &samples[first + j];
        let t = TopK {
            turns: turns.clone(),
            ..t
        };
        rows += t.rows();
        let key = sample_key(&s.ids, &s.loss_mask);
        builder.push_topk(
            key,
            (first + j) as u32,
            &t,
            opts.codec,
            vocab,
            FORMAT_VERSION,
        )?;
    }
    let samples_in = builder.len();
    let bytes = builder.finish();
    let file = shard_name(si);
    write_atomic(&opts.out.join(&file), &bytes)?;
    Ok(ShardInfo {
        file,
        sha256: retort_data::files::sha256_hex(&bytes),
        bytes: bytes.len() as u64,
        first_sample: first,
        samples: samples_in,
        positions: rows,
    })
}

/// The dataset in `tok`'s tokenization, each sample with its turns' offsets — or, where the
/// chat template rewrites answers (so no other tokenizer can be aligned with it), without them
/// for every sample: the cache then serves students of the teacher's tokenizer only.
fn tokenize(
    ds: &retort_data::Dataset,
    tok: &Tokenizer,
    opts: &LabelOptions,
) -> Result<Vec<(Sample, Option<Vec<TurnTokens>>)>> {
    match batch::tokenize_turns(ds, tok, opts.max_len, opts.truncation) {
        Ok((v, _)) => Ok(v.into_iter().map(|(s, t)| (s, Some(t))).collect()),
        Err(e) => {
            let (v, _) = batch::tokenize(ds, tok, opts.max_len, opts.truncation)?;
            tracing::warn!(
                "teacher token offsets not stored ({e}): the cache serves students of the \
                 teacher's tokenizer only"
            );
            Ok(v.into_iter().map(|s| (s, None)).collect())
        }
    }
}

/// The teacher's tokenizer files into `opts.out/tokenizer/` (written aside, then renamed), so a
/// student of another tokenizer can align with the cache without the teacher.
fn save_tokenizer(tok: &Tokenizer, opts: &LabelOptions) -> Result<()> {
    let dest = opts.out.join(TOKENIZER_DIR);
    let tmp = opts.out.join(format!(".{TOKENIZER_DIR}.partial"));
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    fs_err::create_dir_all(&tmp)?;
    tok.save_hf(&tmp)?;
    if dest.exists() {
        fs_err::remove_dir_all(&dest)?;
    }
    fs_err::rename(&tmp, &dest)?;
    Ok(())
}

/// [`label`] with any [`Scorer`] and the tokenizer that matches it (`opts.teacher` is only
/// recorded).
pub fn label_with(
    opts: &LabelOptions,
    scorer: &dyn Scorer,
    tok: &Tokenizer,
    stop: &AtomicBool,
    obs: &mut dyn LabelObserver,
) -> Result<LabelReport> {
    let t0 = Instant::now();
    check_options(opts)?;
    let ds = dataset::read(&opts.data, &opts.read)?;
    let samples = tokenize(&ds, tok, opts)?;
    let offsets = samples.iter().all(|(_, t)| t.is_some());
    if let Some(context) = scorer.context() {
        let plain = samples.iter().map(|(s, _)| s);
        batch::check_context(plain, context, &opts.data, "--max-len")?;
    }
    let vocab = scorer.vocab_size();
    let k = opts.k.min(vocab);
    let fresh = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        created_by: format!("retort {}", env!("CARGO_PKG_VERSION")),
        command: opts.command.clone(),
        teacher: scorer.info()?,
        tokenizer_fingerprint: tok.fingerprint(),
        tokenizer: Some(TOKENIZER_DIR.into()),
        offsets,
        dataset: DatasetInfo {
            path: opts.data.clone(),
            sha256: ds.sha256.clone(),
            format: ds.format.to_string(),
            records: ds.records.len(),
            max_len: opts.max_len,
            truncation: opts.truncation,
        },
        k,
        temperature: opts.temperature,
        min_prob: opts.min_prob,
        encoding: Encoding::new(opts.codec, vocab),
        matmul: opts.matmul,
        shard_samples: opts.shard_samples,
        samples: samples.len(),
        shards: Vec::new(),
        complete: false,
    };
    let mut manifest = resume_or_start(opts, fresh)?;
    save_tokenizer(tok, opts)?;
    let n_shards = samples.len().div_ceil(opts.shard_samples);
    let done_shards = manifest.shards.len();
    let total_positions: usize = samples.iter().map(|(s, _)| s.loss_tokens()).sum();
    obs.start(total_positions, manifest.positions());
    let pad_id = tok.stop_ids().first().copied().unwrap_or(0);
    let mut positions_this_run = 0;
    let mut interrupted = false;
    for si in done_shards..n_shards {
        let first = si * opts.shard_samples;
        let range = first..(first + opts.shard_samples).min(samples.len());
        // Longest first, so each batch holds similar lengths.
        let mut order: Vec<usize> = range.clone().collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(samples[i].0.ids.len()), i));
        let mut results: Vec<Option<TopK>> = vec![None; range.len()];
        for b in order.chunks(opts.batch_size.max(1)) {
            if stop.load(Ordering::Relaxed) {
                interrupted = true;
                break;
            }
            let batch: Vec<&Sample> = b.iter().map(|&i| &samples[i].0).collect();
            let out = scorer.label_batch(&batch, pad_id, k, opts.temperature, opts.min_prob)?;
            let rows: usize = out.iter().map(TopK::rows).sum();
            for (&i, t) in b.iter().zip(out) {
                results[i - first] = Some(t);
            }
            positions_this_run += rows;
            obs.progress(rows);
        }
        if interrupted {
            break;
        }
        let info = write_shard(opts, si, first, &samples, results, vocab)?;
        manifest.shards.push(info.clone());
        manifest.complete = manifest.shards.len() == n_shards;
        manifest.write(&opts.out)?;
        obs.shard(&info);
    }
    if n_shards == 0 || (!interrupted && manifest.shards.len() == n_shards) {
        manifest.complete = true;
        manifest.write(&opts.out)?;
    }
    Ok(LabelReport {
        manifest,
        positions_this_run,
        seconds: t0.elapsed().as_secs_f64(),
        interrupted,
    })
}
