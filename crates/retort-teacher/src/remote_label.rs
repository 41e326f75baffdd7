//! Labelling on an OpenAI-compatible server: the teacher's top-k log-probs at every answer token
//! through vLLM's `prompt_logprobs` extension of `/v1/completions` (prompts sent as token ids,
//! so the server scores exactly the tokens retort trains on). `retort serve` implements the same
//! extension. The result is the same cache as local labelling: only the scorer differs.
//!
//! The server returns log-probs at temperature 1 and only the top-k, so the tail mass is
//! `1 − Σ top-k probabilities` (computed in f64) and labelling runs at temperature 1 (training
//! re-tempers). vLLM caps `prompt_logprobs` at its `--max-logprobs` (default 20): start it with
//! `--max-logprobs K` for larger k.
//!
//! The cache stores the log-prob of each answer token too (format 2, for students of another
//! tokenizer): servers return it beside the top-k, as vLLM's `prompt_logprobs` does.

use retort_distill::batch::Sample;
use retort_distill::cache::TopK;
use retort_distill::cache::codec::NONE;
use retort_distill::cache::label::{Scorer, loss_positions};
use retort_distill::cache::manifest::TeacherInfo;
use retort_distill::cache::topk::drop_below;

use crate::error::{Error, Result};
use crate::http::{HttpConfig, HttpTeacher};
use crate::openai::{CompletionRequest, CompletionResponse, Prompt};
use crate::teacher::{Failure, Teacher};

/// Connect the server teacher of `plan`'s recipe (`[teacher] url`), if it has one, as the
/// grader of its on-policy stages: probed for `prompt_logprobs` with the largest top-k a stage
/// asks for (`OnPolicy::teacher_k`). The API key is read from `[teacher] api_key_env`.
pub fn attach_server(plan: &mut retort_distill::setup::Plan) -> Result<()> {
    let Some(t) = plan.recipe.teacher.clone() else {
        return Ok(());
    };
    let Some(url) = &t.url else {
        return Ok(());
    };
    let api_key = match &t.api_key_env {
        Some(var) => Some(std::env::var(var).map_err(|_| Error::Invalid {
            reason: format!("[teacher] api_key_env names `{var}`, which is not set"),
            hint: format!("export {var}=… (the server's API key), or remove api_key_env"),
        })?),
        None => None,
    };
    let k = plan
        .recipe
        .stages
        .iter()
        .filter_map(|s| s.on_policy.as_ref().and_then(|o| o.teacher_k(true)))
        .max()
        .unwrap_or(1);
    let cfg = HttpConfig {
        model: t.model.clone(),
        api_key,
        ..HttpConfig::new(url.clone())
    };
    let scorer = RemoteScorer::connect(cfg, plan.tokenizer.vocab_size(), k)?;
    plan.scorer = Some(Box::new(scorer));
    Ok(())
}

pub struct RemoteScorer {
    http: HttpTeacher,
    vocab: usize,
}

fn distill_err(reason: String, hint: &str) -> retort_distill::Error {
    retort_distill::Error::Invalid {
        reason,
        hint: hint.into(),
    }
}

impl RemoteScorer {
    /// Connect, probe, and check that the server returns `prompt_logprobs` with `k` entries.
    /// `vocab` is the local tokenizer's (the server must use the same tokenizer).
    pub fn connect(cfg: HttpConfig, vocab: usize, k: usize) -> Result<RemoteScorer> {
        let http = HttpTeacher::connect(cfg)?;
        let s = RemoteScorer { http, vocab };
        let url = s.http.config().base_url.clone();
        let rows = s.score_ids(&[1, 2], k).map_err(|f| Error::Server {
            url: url.clone(),
            reason: format!("scoring with prompt_logprobs = {k} failed: {}", f.reason),
            hint: "the server must implement vLLM's prompt_logprobs extension of /v1/completions \
                   (vLLM, SGLang, `retort serve`); vLLM caps it at --max-logprobs (default 20): \
                   restart it with --max-logprobs K or label with a smaller --top-k"
                .into(),
        })?;
        let n = rows.get(1).and_then(|r| r.as_ref()).map_or(0, Vec::len);
        if rows.len() != 2 || n < k.min(vocab) {
            return Err(Error::Server {
                url,
                reason: format!("a 2-token prompt came back with {} positions and {n} log-probs at the second (asked for {k})", rows.len()),
                hint: "the server does not implement prompt_logprobs as vLLM does; use vLLM, SGLang or `retort serve`".into(),
            });
        }
        Ok(s)
    }

    /// Per prompt position: `None` (position 0) or `(id, logprob, rank)` entries.
    #[allow(clippy::type_complexity)]
    fn score_ids(
        &self,
        ids: &[u32],
        k: usize,
    ) -> std::result::Result<Vec<Option<Vec<(u32, f32, usize)>>>, Failure> {
        let req = CompletionRequest {
            model: self.http.id().model.clone(),
            prompt: Prompt::Ids(ids.to_vec()),
            max_tokens: Some(1),
            temperature: Some(0.0),
            prompt_logprobs: Some(k),
            ..Default::default()
        };
        let (resp, attempts): (CompletionResponse, usize) = self.http.post("/completions", &req)?;
        let bad = |reason: String| Failure { reason, attempts };
        let choice = resp
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| bad("no choice in the response".into()))?;
        let rows = choice
            .prompt_logprobs
            .ok_or_else(|| bad("the response has no prompt_logprobs".into()))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(match row {
                None => None,
                Some(map) => {
                    let mut v = Vec::with_capacity(map.len());
                    for (id, e) in map {
                        let id: u32 = id
                            .parse()
                            .map_err(|_| bad(format!("token id `{id}` is not a number")))?;
                        v.push((id, e.logprob, e.rank.unwrap_or(usize::MAX)));
                    }
                    Some(v)
                }
            });
        }
        Ok(out)
    }

    fn score(&self, s: &Sample, k: usize) -> std::result::Result<TopK, Failure> {
        let rows = self.score_ids(&s.ids, k)?;
        if rows.len() != s.ids.len() {
            return Err(Failure {
                reason: format!(
                    "{} prompt positions scored, {} sent",
                    rows.len(),
                    s.ids.len()
                ),
                attempts: 1,
            });
        }
        let positions = loss_positions(s);
        let mut t = TopK {
            k,
            tokens: s.ids.clone(),
            ids: Vec::with_capacity(positions.len() * k),
            logp: Vec::with_capacity(positions.len() * k),
            log_tail: Vec::with_capacity(positions.len()),
            label_logp: Vec::with_capacity(positions.len()),
            turns: None,
            positions,
        };
        for &p in &t.positions {
            // Row p predicts token p + 1: the server's entry for prompt position p + 1.
            let mut entries = rows[p as usize + 1].clone().unwrap_or_default();
            // vLLM and `retort serve` return the prompt's own token beside the top-k; NaN
            // where a server does not (only cross-tokenizer training needs it, and says so).
            let own = s.ids[p as usize + 1];
            t.label_logp.push(
                entries
                    .iter()
                    .find(|e| e.0 == own)
                    .map_or(f32::NAN, |e| e.1),
            );
            entries.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            entries.retain(|e| (e.0 as usize) < self.vocab);
            entries.truncate(k);
            let mass: f64 = entries.iter().map(|e| (e.1 as f64).exp()).sum();
            for j in 0..k {
                match entries.get(j) {
                    Some(e) => {
                        t.ids.push(e.0);
                        t.logp.push(e.1);
                    }
                    None => {
                        t.ids.push(NONE);
                        t.logp.push(f32::NEG_INFINITY);
                    }
                }
            }
            let rest = 1.0 - mass;
            t.log_tail.push(if rest > 0.0 {
                rest.ln() as f32
            } else {
                f32::NEG_INFINITY
            });
        }
        Ok(t)
    }
}

impl Scorer for RemoteScorer {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn info(&self) -> retort_distill::Result<TeacherInfo> {
        let id = self.http.id();
        Ok(TeacherInfo {
            path: format!("{}#{}", id.fingerprint, id.model).into(),
            // No weights to hash: the served model's name and URL stand for it.
            sha256: format!("remote:{}@{}", id.model, id.fingerprint),
            arch: "remote".into(),
            vocab_size: self.vocab,
        })
    }

    fn label_batch(
        &self,
        samples: &[&Sample],
        _pad_id: u32,
        k: usize,
        temperature: f64,
        min_prob: f64,
    ) -> retort_distill::Result<Vec<TopK>> {
        if temperature != 1.0 {
            return Err(distill_err(
                format!("--temperature {temperature} with a remote teacher"),
                "servers return log-probs at temperature 1; label at --temperature 1 (training re-tempers)",
            ));
        }
        let mut out: Vec<Option<TopK>> = vec![None; samples.len()];
        let mut failed: Option<(usize, Failure)> = None;
        self.http.run_concurrently(
            samples.len(),
            &|i| self.score(samples[i], k),
            &mut |i, r| match r {
                Ok(t) => out[i] = Some(t),
                Err(f) => {
                    failed.get_or_insert((i, f));
                }
            },
        );
        if let Some((i, f)) = failed {
            return Err(distill_err(
                format!(
                    "server {}: sample `{}` could not be scored after {} attempt(s): {}",
                    self.http.config().base_url,
                    samples[i].id,
                    f.attempts,
                    f.reason
                ),
                "finished shards are kept; fix the server and run the same command to resume",
            ));
        }
        let mut tops: Vec<TopK> = out.into_iter().flatten().collect();
        for t in &mut tops {
            drop_below(&mut t.ids, &mut t.logp, &mut t.log_tail, k, min_prob);
        }
        Ok(tops)
    }
}
