//! Teacher targets for a micro-batch from the logit cache, with the live teacher filling in
//! samples the cache lacks (hybrid mode).

use retort_model::Model;

use crate::batch::Sample;
use crate::cache::label::{label_batch, loss_positions};
use crate::cache::topk::coarse_log_probs;
use crate::cache::{Reader, TopK, sample_key};
use crate::error::{Error, Result};
use crate::sparse::SparseTargets;

/// Where each sample's targets came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provenance {
    pub cached: usize,
    pub live: usize,
    pub missing: usize,
}

/// Sparse targets for `samples` (in collate order) at the training temperature, or `None` when
/// some sample is in neither the cache nor reachable through a live teacher.
pub fn for_samples(
    cache: &Reader,
    live: Option<&Model>,
    samples: &[&Sample],
    pad_id: u32,
    temperature: f64,
    chunk_rows: usize,
) -> Result<(Option<SparseTargets>, Provenance)> {
    let m = &cache.manifest;
    let mut found: Vec<Option<TopK>> = Vec::with_capacity(samples.len());
    let mut prov = Provenance::default();
    for s in samples {
        let t = cache.get(&sample_key(&s.ids, &s.loss_mask))?;
        if let Some(t) = &t {
            if t.tokens != s.ids || t.positions != loss_positions(s) {
                return Err(Error::invalid(
                    format!(
                        "logit cache `{}`: sample `{}` has the right key but other tokens",
                        cache.dir.display(),
                        s.id
                    ),
                    format!("the cache is damaged; rebuild it: {}", m.command),
                ));
            }
            prov.cached += 1;
        }
        found.push(t);
    }
    let missing: Vec<usize> = (0..samples.len()).filter(|&i| found[i].is_none()).collect();
    if !missing.is_empty() {
        let Some(teacher) = live else {
            prov.missing = missing.len();
            return Ok((None, prov));
        };
        let batch: Vec<&Sample> = missing.iter().map(|&i| samples[i]).collect();
        let labelled = label_batch(
            teacher,
            &batch,
            pad_id,
            m.k,
            m.temperature,
            m.min_prob,
            chunk_rows,
        )?;
        for (&i, t) in missing.iter().zip(labelled) {
            found[i] = Some(t);
        }
        prov.live = missing.len();
    }
    let ratio = m.temperature / temperature;
    let mut out = SparseTargets {
        k: m.k,
        ids: Vec::new(),
        logp: Vec::new(),
    };
    for t in found.into_iter().flatten() {
        out.ids.extend_from_slice(&t.ids);
        out.logp.extend(coarse_log_probs(
            &t.logp,
            &t.log_tail,
            t.k,
            m.teacher.vocab_size,
            ratio,
        ));
    }
    Ok((Some(out), prov))
}
