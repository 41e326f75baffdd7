//! Derived caches and cache comparisons, without the teacher: keep the top `k' < k` of every
//! row (exact: the stored rows are sorted, and the dropped entries join the tail) in another
//! codec; and measure how far two caches of the same samples are apart.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::codec::{self, Codec, TopK};
use super::manifest::{Encoding, Manifest, ShardInfo};
use super::reader::Reader;
use super::shard::{Entry, ShardBuilder, shard_name};
use super::topk::{coarse_log_probs, drop_below};
use crate::error::{Error, Result};
use retort_data::files::write_atomic;

/// The top `k` of each row of `t` (`k ≤ t.k`); dropped entries are added to the tail.
pub fn truncate(t: &TopK, k: usize) -> TopK {
    let k0 = t.k;
    let mut out = TopK {
        k,
        tokens: t.tokens.clone(),
        positions: t.positions.clone(),
        ids: Vec::with_capacity(t.rows() * k),
        logp: Vec::with_capacity(t.rows() * k),
        log_tail: Vec::with_capacity(t.rows()),
        label_logp: t.label_logp.clone(),
        turns: t.turns.clone(),
    };
    for r in 0..t.rows() {
        out.ids.extend_from_slice(&t.ids[r * k0..r * k0 + k]);
        out.logp.extend_from_slice(&t.logp[r * k0..r * k0 + k]);
        let rest = std::iter::once(t.log_tail[r] as f64)
            .chain(t.logp[r * k0 + k..(r + 1) * k0].iter().map(|&x| x as f64));
        let xs: Vec<f64> = rest.collect();
        let m = xs.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
        let lse = if m == f64::NEG_INFINITY {
            m
        } else {
            m + xs.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
        };
        out.log_tail.push(lse as f32);
    }
    out
}

/// Write `src` again into `out` with `k` entries per row in `codec`, moving entries below
/// `min_prob` into the tail.
pub fn recode(
    src: &Reader,
    k: usize,
    min_prob: f64,
    codec: Codec,
    out: &Path,
    command: &str,
) -> Result<Manifest> {
    let m0 = &src.manifest;
    if k == 0 || k > m0.k {
        return Err(Error::invalid(
            format!("cannot keep top-{k} of a cache with k = {}", m0.k),
            format!("choose 1..={}; a larger k needs relabelling", m0.k),
        ));
    }
    if out.join(super::manifest::MANIFEST).exists() {
        return Err(Error::invalid(
            format!("`{}` already holds a cache", out.display()),
            "choose a new --out directory",
        ));
    }
    fs_err::create_dir_all(out)?;
    let vocab = m0.teacher.vocab_size;
    let mut m = m0.clone();
    m.k = k;
    m.min_prob = m0.min_prob.max(min_prob);
    m.encoding = Encoding::new(codec, vocab);
    m.command = command.to_string();
    m.shards.clear();
    m.complete = false;
    // The copy keeps the source's format version (a format-1 cache has no teacher offsets to
    // carry over) and its teacher tokenizer.
    if let Some(dir) = &m0.tokenizer {
        copy_dir(&src.dir.join(dir), &out.join(dir))?;
    }
    for (si, s) in m0.shards.iter().enumerate() {
        let mut b = ShardBuilder::default();
        let mut rows = 0;
        for (e, t) in src.shard_entries(si)? {
            let mut t = truncate(&t, k);
            drop_below(&mut t.ids, &mut t.logp, &mut t.log_tail, k, min_prob);
            rows += t.rows();
            let (block, raw_len) = codec::encode(&t, codec, vocab, m.format_version)?;
            let e = Entry {
                raw_len: raw_len as u32,
                ..e
            };
            b.push(e, &block);
        }
        let samples = b.len();
        let bytes = b.finish();
        let file = shard_name(si);
        write_atomic(&out.join(&file), &bytes)?;
        m.shards.push(ShardInfo {
            file,
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
            first_sample: s.first_sample,
            samples,
            positions: rows,
        });
        m.write(out)?;
    }
    m.complete = m0.complete;
    m.write(out)?;
    Ok(m)
}

/// Copy the files of directory `from` into `to` (each written atomically).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs_err::create_dir_all(to)?;
    for e in fs_err::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            write_atomic(&to.join(e.file_name()), &fs_err::read(e.path())?)?;
        }
    }
    Ok(())
}

/// How far cache `b`'s distributions are from cache `a`'s, on the samples both hold.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Comparison {
    pub samples: usize,
    pub tokens: usize,
    /// Mean and max over tokens of KL(a‖b) on a's `k + 1` outcomes (nats).
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Share of rows whose top-1 id agrees.
    pub top1_agreement: f64,
}

/// Compare two caches of the same data (same k; ids may differ where values tie).
pub fn compare(a: &Reader, b: &Reader) -> Result<Comparison> {
    let (ma, mb) = (&a.manifest, &b.manifest);
    if ma.k != mb.k {
        return Err(Error::invalid(
            format!("caches have k = {} and k = {}", ma.k, mb.k),
            "recode the larger one to the smaller k first (`retort cache recode`)",
        ));
    }
    let (k, vocab) = (ma.k, ma.teacher.vocab_size);
    let mut c = Comparison::default();
    let mut agree = 0usize;
    for si in 0..ma.shards.len() {
        for (e, ta) in a.shard_entries(si)? {
            let Some(tb) = b.get(&e.key)? else { continue };
            c.samples += 1;
            let pa = coarse_log_probs(&ta.logp, &ta.log_tail, k, vocab, 1.0);
            let pb = coarse_log_probs(&tb.logp, &tb.log_tail, k, vocab, 1.0);
            for r in 0..ta.rows() {
                // b's log-prob of each of a's outcomes (ids can be ordered differently).
                let mut kl = 0f64;
                let mut tail_b = pb[r * (k + 1) + k].exp() as f64;
                let row_b = &tb.ids[r * k..(r + 1) * k];
                let lb: Vec<Option<f64>> = ta.ids[r * k..(r + 1) * k]
                    .iter()
                    .map(|id| {
                        row_b
                            .iter()
                            .position(|x| x == id)
                            .map(|j| pb[r * (k + 1) + j] as f64)
                    })
                    .collect();
                // Outcomes of a missing from b's top-k are in b's tail; split it evenly.
                let missing = lb
                    .iter()
                    .zip(&ta.ids[r * k..(r + 1) * k])
                    .filter(|(x, id)| x.is_none() && **id != codec::NONE)
                    .count();
                for (i, l) in lb.iter().enumerate() {
                    let la = pa[r * (k + 1) + i] as f64;
                    if la == f64::NEG_INFINITY {
                        continue; // an entry dropped at labelling
                    }
                    let lbv = match l {
                        Some(v) => *v,
                        None => {
                            let share = tail_b / (missing + 1) as f64;
                            share.max(f64::MIN_POSITIVE).ln()
                        }
                    };
                    kl += la.exp() * (la - lbv);
                }
                if missing > 0 {
                    tail_b /= (missing + 1) as f64;
                }
                let lat = pa[r * (k + 1) + k] as f64;
                if lat > f64::NEG_INFINITY {
                    kl += lat.exp() * (lat - tail_b.max(f64::MIN_POSITIVE).ln());
                }
                c.tokens += 1;
                c.mean_kl += kl;
                c.max_kl = c.max_kl.max(kl);
                agree += (ta.ids[r * k] == tb.ids[r * k]) as usize;
            }
        }
    }
    if c.tokens > 0 {
        c.mean_kl /= c.tokens as f64;
        c.top1_agreement = agree as f64 / c.tokens as f64;
    }
    Ok(c)
}
