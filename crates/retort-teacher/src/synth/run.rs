//! The pipeline: seeds → few-shot expansion (rounds of requests, each showing k seeds sampled
//! without replacement with a fixed seed) → parse → filters (rules, then novelty) → answers under
//! the system prompt (a cut-off answer regenerated once with a larger limit) → `synth.jsonl`
//! with provenance, the `items` table and the funnel report.
//!
//! Every request goes through the ledger: done requests are read back, never re-sent. All
//! decisions are taken in request order from stored responses, so a rerun — after a crash, a
//! kill or a finished run — reaches the same items, and only changed requests reach the teacher.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use retort_data::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::config::Pipeline;
use super::filter::{Novelty, check, record_text};
use super::ledger::{ItemRow, Ledger, Stored};
use super::parse::{Record, parse, render};
use crate::error::{Error, Result};
use crate::teacher::{Finish, GenRequest, Generation, Sampling, Teacher};

pub const LEDGER: &str = "ledger.sqlite";
pub const OUTPUT: &str = "synth.jsonl";
pub const REPORT_MD: &str = "report.md";
pub const REPORT_JSON: &str = "report.json";

/// One seed record.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub id: String,
    pub record: Record,
}

/// Read the seeds file: JSONL with every configured field as a non-empty string.
pub fn read_seeds(path: &Path, fields: &[String]) -> Result<Vec<Seed>> {
    // The error names the key and the resolved path itself (fs_err would repeat the path).
    #[allow(clippy::disallowed_methods)]
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::invalid(
            format!(
                "[seeds] path: cannot read `{}`: {e}",
                std::path::absolute(path)
                    .unwrap_or_else(|_| path.to_path_buf())
                    .display()
            ),
            "the path is relative to the pipeline file's directory; write the seeds there as \
             JSONL, or fix `path` under [seeds]",
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| {
            Error::invalid(
                format!("{}:{}: {reason}", path.display(), i + 1),
                format!(
                    "each line must be a JSON object with the string fields {fields:?} (and optionally \"id\")"
                ),
            )
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let mut record = Record::new();
        for f in fields {
            match v.get(f).and_then(|x| x.as_str()) {
                Some(s) if !s.trim().is_empty() => {
                    record.insert(f.clone(), s.trim().to_string());
                }
                Some(_) => return Err(bad(format!("field `{f}` is empty"))),
                None => return Err(bad(format!("field `{f}` is missing or not a string"))),
            }
        }
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(x) if !x.is_null() => x.to_string(),
            _ => format!("seed-{}", out.len()),
        };
        out.push(Seed { id, record });
    }
    if out.is_empty() {
        return Err(Error::invalid(
            format!("{}: no seed records", path.display()),
            "write a few seed examples, one JSON object per line",
        ));
    }
    Ok(out)
}

/// What the pipeline reports as it goes.
pub trait SynthObserver {
    /// A stage starts with `total` requests (of which `done` already in the ledger).
    fn stage(&mut self, name: &str, total: usize, done: usize);
    /// One more request finished.
    fn request(&mut self);
    fn note(&mut self, message: &str);
}

pub struct Quiet;
impl SynthObserver for Quiet {
    fn stage(&mut self, _: &str, _: usize, _: usize) {}
    fn request(&mut self) {}
    fn note(&mut self, _: &str) {}
}

/// Counts from seed to answer, with the reasons things were dropped.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Funnel {
    pub rounds: usize,
    pub stop_reason: String,
    pub expand_requests: usize,
    pub expand_failed: usize,
    /// Expansion texts received.
    pub generated: usize,
    /// Complete records parsed out of them.
    pub parsed: usize,
    /// Records missing a field (not in `parsed`).
    pub incomplete: usize,
    pub rejected: BTreeMap<String, usize>,
    pub novel: usize,
    /// Novel inputs sent to be answered (at most the target).
    pub kept: usize,
    /// Answers cut off at `max_tokens` and regenerated with `retry_max_tokens`.
    pub regenerated: usize,
    pub answered: usize,
    pub failed: BTreeMap<String, usize>,
    /// Requests this run sent to the teacher (the rest came from the ledger).
    pub sent_this_run: usize,
    pub completion_tokens_this_run: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct SynthReport {
    pub funnel: Funnel,
    pub dir: PathBuf,
    /// Stopped early by the stop flag (resume by running again).
    pub interrupted: bool,
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A stable 64-bit number from parts (sampling seeds, shuffles).
fn mix(parts: &[&str]) -> u64 {
    let d = Sha256::digest(parts.join("\u{1f}").as_bytes());
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn render_template(
    template: &str,
    ctx: minijinja::Value,
    path: &Path,
    what: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let hint = "templates are minijinja (Jinja2); the expansion template sees `examples`, `n`, \
                `format`, `labels`; the answer template sees each seed field by name";
    let fail = |reason: String| Error::Pipeline {
        path: path.to_path_buf(),
        reason: format!("{what}: {reason}"),
        hint: hint.into(),
    };
    // Name the variables the template uses that the context lacks (minijinja's strict mode
    // says only "undefined value").
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| fail(e.to_string()))?;
    let mut missing: Vec<String> = tmpl
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| ctx.get_attr(v).map_or(true, |x| x.is_undefined()))
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(fail(format!(
            "uses {}, which {} not defined here",
            missing
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        )));
    }
    tmpl.render(ctx).map_err(|e| fail(e.to_string()))
}

struct Expansion {
    request: GenRequest,
    key: String,
    seeds: Vec<String>,
    round: usize,
}

fn expansion(
    p: &Pipeline,
    seeds: &[Seed],
    teacher: &dyn Teacher,
    round: usize,
    i: usize,
) -> Result<Expansion> {
    let e = &p.expand;
    let (r_s, i_s, seed_s) = (round.to_string(), i.to_string(), e.seed.to_string());
    let mut rng = StdRng::seed_from_u64(mix(&["expand", &seed_s, &r_s, &i_s]));
    let k = e.examples_per_prompt.min(seeds.len());
    let picked: Vec<&Seed> = rand::seq::index::sample(&mut rng, seeds.len(), k)
        .iter()
        .map(|j| &seeds[j])
        .collect();
    let examples: Vec<String> = picked
        .iter()
        .map(|s| render(&s.record, &p.seeds.fields, &p.seeds.labels))
        .collect();
    let format = p
        .seeds
        .labels
        .iter()
        .map(|l| format!("{l}: …"))
        .collect::<Vec<_>>()
        .join(" / ");
    let ctx = minijinja::context! { examples => examples, n => e.ask_for, format => format, labels => p.seeds.labels.clone() };
    let user = render_template(&e.template, ctx.clone(), &p.path, "[expand] template")?;
    let prefill = match &e.prefill {
        Some(t) => Some(render_template(t, ctx, &p.path, "[expand] prefill")?),
        None => None,
    };
    let request = GenRequest {
        prefill,
        messages: vec![Message::user(user)],
        sampling: Sampling {
            max_tokens: e.max_tokens,
            temperature: e.temperature,
            top_p: e.top_p,
            seed: mix(&["expand-sample", &seed_s, &r_s, &i_s]) >> 1,
            stop: vec![],
            n: 1,
            repeat_penalty: e.repeat_penalty,
        },
    };
    Ok(Expansion {
        key: request.key(teacher.id()),
        request,
        seeds: picked.iter().map(|s| s.id.clone()).collect(),
        round,
    })
}

/// What every request of a run goes through.
struct Sender<'a> {
    teacher: &'a dyn Teacher,
    ledger: &'a Ledger,
    /// Requests handed to the teacher at once (between checks of `stop`).
    chunk: usize,
    stop: &'a AtomicBool,
}

/// Send the requests of `todo` not yet done, recording each; returns false if stopped.
fn run_requests(
    tx: &Sender,
    stage: &str,
    label: &str,
    todo: &[(&GenRequest, &str)],
    funnel: &mut Funnel,
    obs: &mut dyn SynthObserver,
) -> Result<bool> {
    let Sender {
        teacher,
        ledger,
        chunk,
        stop,
    } = *tx;
    let mut pending = Vec::new();
    for &(r, k) in todo {
        if !ledger.is_done(k)? {
            pending.push((r, k));
        }
    }
    obs.stage(label, todo.len(), todo.len() - pending.len());
    for part in pending.chunks(chunk.max(1)) {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let reqs: Vec<GenRequest> = part.iter().map(|(r, _)| (*r).clone()).collect();
        let t0 = Instant::now();
        let mut err = None;
        teacher.generate(&reqs, &mut |i, outcome| {
            if let Ok(g) = &outcome {
                funnel.completion_tokens_this_run +=
                    g.iter().map(|g| g.completion_tokens).sum::<usize>();
            }
            funnel.sent_this_run += 1;
            if let Err(e) = ledger.record(
                part[i].1,
                stage,
                &reqs[i],
                &outcome,
                t0.elapsed().as_secs_f64(),
            ) {
                err.get_or_insert(e);
            }
            obs.request();
        });
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(!stop.load(Ordering::Relaxed))
}

struct Kept {
    record: Record,
    hash: String,
    expand: usize,
}

/// Run (or resume) the pipeline `p` with `teacher`, writing into `p.out_dir()`: the inputs
/// expanded from the seeds (`expand_inputs`), each answered under the system prompt
/// (`answer_inputs`), then items, output and report (`write_items`).
pub fn run(
    p: &Pipeline,
    teacher: &dyn Teacher,
    stop: &AtomicBool,
    obs: &mut dyn SynthObserver,
) -> Result<SynthReport> {
    let t0 = Instant::now();
    let dir = p.out_dir();
    // Everything that can be checked is checked before the output directory and the ledger
    // exist: the seeds, and the templates rendered once.
    let seeds = read_seeds(&p.seeds.path, &p.seeds.fields)?;
    expansion(p, &seeds, teacher, 0, 0)?;
    if let Some(s) = seeds.first() {
        let ctx = minijinja::Value::from(s.record.clone());
        render_template(&p.answer.template, ctx, &p.path, "[answer] template")?;
    }
    fs_err::create_dir_all(&dir)?;
    let mut ledger = Ledger::open(&dir.join(LEDGER))?;
    let mut funnel = Funnel::default();
    let phases = {
        // A local teacher decodes `batch_size` rows with continuous batching, so it gets several
        // batches' worth at once (a finished row's slot takes the next request); an HTTP teacher
        // keeps `concurrency` requests in flight. Every answer is recorded as it completes, so
        // an interrupt loses nothing; it only waits for the requests in hand.
        let chunk = (4 * p.teacher.batch_size).max(p.teacher.concurrency).max(1);
        let tx = Sender {
            teacher,
            ledger: &ledger,
            chunk,
            stop,
        };
        match expand_inputs(p, &seeds, &tx, &mut funnel, obs)? {
            Some((expansions, kept)) => answer_inputs(p, &kept, &tx, &mut funnel, obs)?
                .map(|answers| (expansions, kept, answers)),
            None => None,
        }
    };
    let Some((expansions, kept, answers)) = phases else {
        return interrupted(funnel, dir, t0);
    };
    write_items(
        (p, teacher),
        &mut ledger,
        (&expansions, &kept, &answers),
        &mut funnel,
        &dir,
        t0,
    )?;
    Ok(SynthReport {
        funnel,
        dir,
        interrupted: false,
    })
}

/// Each kept input's answer request, and the retry with the larger limit where the first was
/// cut off.
struct Answers {
    first: Vec<(GenRequest, String)>,
    second: Vec<Option<(GenRequest, String)>>,
}

/// Phase 1, expansion, round by round, until the target of novel inputs, a run of rounds with too few
/// novel candidates, or `max_rounds`. `None` when interrupted.
fn expand_inputs(
    p: &Pipeline,
    seeds: &[Seed],
    tx: &Sender,
    funnel: &mut Funnel,
    obs: &mut dyn SynthObserver,
) -> Result<Option<(Vec<Expansion>, Vec<Kept>)>> {
    let fields = &p.seeds.fields;
    let mut novelty = Novelty::new(p.filter.rouge_l_max);
    for s in seeds {
        novelty.add(&record_text(&s.record, fields));
    }
    let mut expansions: Vec<Expansion> = Vec::new();
    let mut kept: Vec<Kept> = Vec::new();
    let mut low_streak = 0;
    for round in 0..p.expand.max_rounds {
        let first = expansions.len();
        for i in 0..p.expand.requests_per_round {
            expansions.push(expansion(p, seeds, tx.teacher, round, i)?);
        }
        let todo: Vec<(&GenRequest, &str)> = expansions[first..]
            .iter()
            .map(|e| (&e.request, e.key.as_str()))
            .collect();
        if !run_requests(
            tx,
            "expand",
            &format!("expand round {}", round + 1),
            &todo,
            funnel,
            obs,
        )? {
            return Ok(None);
        }
        funnel.rounds = round + 1;
        let (mut parsed_round, mut novel_round) = (0, 0);
        for (ei, e) in expansions.iter().enumerate().skip(first) {
            funnel.expand_requests += 1;
            match tx.ledger.get(&e.key)? {
                Some(Stored::Done(gens)) => {
                    // Records inside the prefill (the examples) are not candidates.
                    let pre = e.request.prefill.as_deref().unwrap_or("");
                    let in_prefill = parse(pre, fields, &p.seeds.labels).records.len();
                    for g in gens {
                        funnel.generated += 1;
                        let parsed = parse(&format!("{pre}{}", g.text), fields, &p.seeds.labels);
                        funnel.incomplete += parsed.incomplete;
                        for rec in parsed.records.into_iter().skip(in_prefill) {
                            funnel.parsed += 1;
                            parsed_round += 1;
                            let verdict = check(&rec, fields, &p.filter).and_then(|()| {
                                if novelty.admit(&record_text(&rec, fields)) {
                                    Ok(())
                                } else {
                                    Err(super::filter::Reject::NearDuplicate)
                                }
                            });
                            match verdict {
                                Ok(()) => {
                                    funnel.novel += 1;
                                    novel_round += 1;
                                    let hash = sha(&json(&rec)?);
                                    kept.push(Kept {
                                        record: rec,
                                        hash,
                                        expand: ei,
                                    });
                                }
                                Err(r) => *funnel.rejected.entry(r.reason()).or_default() += 1,
                            }
                        }
                    }
                }
                Some(Stored::Failed(reason)) => {
                    funnel.expand_failed += 1;
                    *funnel
                        .failed
                        .entry(format!("expansion request: {}", short(&reason)))
                        .or_default() += 1;
                }
                None => {}
            }
        }
        obs.note(&format!(
            "round {}: {parsed_round} parsed, {novel_round} novel, {} kept in all",
            round + 1,
            kept.len()
        ));
        if kept.len() >= p.expand.target {
            funnel.stop_reason = format!("target of {} novel inputs reached", p.expand.target);
            break;
        }
        let frac = if parsed_round == 0 {
            0.0
        } else {
            novel_round as f64 / parsed_round as f64
        };
        low_streak = if frac < p.filter.min_novel_fraction {
            low_streak + 1
        } else {
            0
        };
        if low_streak >= p.filter.patience {
            funnel.stop_reason = format!(
                "{} rounds in a row with fewer than {:.0}% novel candidates",
                p.filter.patience,
                100.0 * p.filter.min_novel_fraction
            );
            break;
        }
        if round + 1 == p.expand.max_rounds {
            funnel.stop_reason = format!("max_rounds = {} reached", p.expand.max_rounds);
        }
    }
    kept.truncate(p.expand.target);
    funnel.kept = kept.len();
    Ok(Some((expansions, kept)))
}

/// Phase 2, answers: each kept input under the system prompt; cut-off answers regenerated with the
/// larger limit. `None` when interrupted.
fn answer_inputs(
    p: &Pipeline,
    kept: &[Kept],
    tx: &Sender,
    funnel: &mut Funnel,
    obs: &mut dyn SynthObserver,
) -> Result<Option<Answers>> {
    let a = &p.answer;
    let answer_request = |rec: &Record, hash: &str, max_tokens: usize| -> Result<GenRequest> {
        let ctx = minijinja::Value::from(rec.clone());
        let user = render_template(&a.template, ctx, &p.path, "[answer] template")?;
        Ok(GenRequest {
            prefill: None,
            messages: vec![Message::system(a.system.clone()), Message::user(user)],
            sampling: Sampling {
                max_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: mix(&["answer", &a.seed.to_string(), hash]) >> 1,
                stop: vec![],
                n: 1,
                repeat_penalty: a.repeat_penalty,
            },
        })
    };
    let first: Vec<(GenRequest, String)> = kept
        .iter()
        .map(|k| {
            answer_request(&k.record, &k.hash, a.max_tokens)
                .map(|r| (r.key(tx.teacher.id()), r))
                .map(|(key, r)| (r, key))
        })
        .collect::<Result<_>>()?;
    let todo: Vec<(&GenRequest, &str)> = first.iter().map(|(r, k)| (r, k.as_str())).collect();
    if !run_requests(tx, "answer", "answer", &todo, funnel, obs)? {
        return Ok(None);
    }
    // Cut-off answers: regenerate with the larger limit.
    let mut second: Vec<Option<(GenRequest, String)>> = Vec::with_capacity(kept.len());
    for (k, (_, key)) in kept.iter().zip(&first) {
        let cut = matches!(tx.ledger.get(key)?, Some(Stored::Done(g)) if g.first().is_some_and(|g| g.finish == Finish::Length));
        second.push(if cut {
            let r = answer_request(&k.record, &k.hash, a.retry_max_tokens)?;
            Some((r.clone(), r.key(tx.teacher.id())))
        } else {
            None
        });
    }
    let todo: Vec<(&GenRequest, &str)> = second
        .iter()
        .flatten()
        .map(|(r, k)| (r, k.as_str()))
        .collect();
    if !todo.is_empty()
        && !run_requests(
            tx,
            "answer",
            "answer (regenerate cut-off)",
            &todo,
            funnel,
            obs,
        )?
    {
        return Ok(None);
    }

    Ok(Some(Answers { first, second }))
}

/// Phase 3, items (the ledger's `items`, what review reads), the training set and the report.
fn write_items(
    (p, teacher): (&Pipeline, &dyn Teacher),
    ledger: &mut Ledger,
    (expansions, kept, answers): (&[Expansion], &[Kept], &Answers),
    funnel: &mut Funnel,
    dir: &Path,
    t0: Instant,
) -> Result<()> {
    let a = &p.answer;
    let expand_template_sha = sha(&p.expand.template);
    let answer_template_sha = sha(&a.template);
    let system_sha = sha(&a.system);
    let mut rows = Vec::with_capacity(kept.len());
    let mut jsonl = String::new();
    for (pos, ((k, (req1, key1)), again)) in kept
        .iter()
        .zip(&answers.first)
        .zip(&answers.second)
        .enumerate()
    {
        let (req, key) = match again {
            Some((r, key)) => {
                funnel.regenerated += 1;
                (r, key)
            }
            None => (req1, key1),
        };
        let e = &expansions[k.expand];
        let (status, detail, answer): (&str, Option<String>, Option<Generation>) =
            match ledger.get(key)? {
                Some(Stored::Done(g)) => match g.into_iter().next() {
                    Some(g) if g.finish == Finish::Length => (
                        "failed",
                        Some(format!(
                            "cut off at retry_max_tokens = {}",
                            a.retry_max_tokens
                        )),
                        None,
                    ),
                    Some(g) if g.text.trim().is_empty() => {
                        ("failed", Some("empty answer".into()), None)
                    }
                    Some(g) => ("answered", None, Some(g)),
                    None => ("failed", Some("no choice returned".into()), None),
                },
                Some(Stored::Failed(reason)) => (
                    "failed",
                    Some(format!("request failed: {}", short(&reason))),
                    None,
                ),
                None => ("failed", Some("not answered".into()), None),
            };
        match &detail {
            Some(d) => {
                *funnel
                    .failed
                    .entry(d.split(':').next().unwrap_or(d).to_string())
                    .or_default() += 1
            }
            None => funnel.answered += 1,
        }
        let provenance = serde_json::json!({
            "teacher": teacher.id(),
            "pipeline": p.path.display().to_string(),
            "expand": {
                "request": e.key,
                "round": e.round,
                "template_sha256": expand_template_sha,
                "seeds": e.seeds,
                "sampling": e.request.sampling,
            },
            "answer": {
                "request": key,
                "template_sha256": answer_template_sha,
                "system_sha256": system_sha,
                "sampling": req.sampling,
                "regenerated": again.is_some(),
            },
        });
        let messages = answer.as_ref().map(|g| {
            let mut m = req.messages.clone();
            m.push(Message::assistant(g.text.trim().to_string()));
            m
        });
        if let Some(m) = &messages {
            let line = serde_json::json!({
                "id": &k.hash[..16],
                "messages": m,
                "input": k.record,
                "provenance": provenance,
            });
            jsonl.push_str(&line.to_string());
            jsonl.push('\n');
        }
        rows.push(ItemRow {
            hash: k.hash.clone(),
            position: pos,
            input: json(&k.record)?,
            messages: messages.as_ref().map(json).transpose()?,
            expand_key: e.key.clone(),
            answer_key: Some(key.clone()),
            status: status.into(),
            detail,
            provenance: provenance.to_string(),
        });
    }
    ledger.write_items(&rows)?;
    funnel.seconds = t0.elapsed().as_secs_f64();
    retort_data::files::write_atomic(&dir.join(OUTPUT), jsonl.as_bytes())?;
    let report = serde_json::to_string_pretty(&*funnel).map_err(bug)?;
    ledger.set_meta("funnel", &report)?;
    retort_data::files::write_atomic(&dir.join(REPORT_JSON), report.as_bytes())?;
    retort_data::files::write_atomic(
        &dir.join(REPORT_MD),
        funnel_markdown(funnel, p, teacher).as_bytes(),
    )?;
    Ok(())
}

/// A value retort itself built, as JSON (cannot fail for these types; an error names the bug).
fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(bug)
}

fn bug(e: serde_json::Error) -> Error {
    Error::invalid(
        format!("cannot write JSON: {e}"),
        "this is a bug in retort; please report it",
    )
}

fn interrupted(mut funnel: Funnel, dir: PathBuf, t0: Instant) -> Result<SynthReport> {
    funnel.seconds = t0.elapsed().as_secs_f64();
    Ok(SynthReport {
        funnel,
        dir,
        interrupted: true,
    })
}

fn short(s: &str) -> String {
    let s = s.lines().next().unwrap_or("");
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The funnel as a Markdown report.
pub fn funnel_markdown(f: &Funnel, p: &Pipeline, teacher: &dyn Teacher) -> String {
    let mut s = String::new();
    let id = teacher.id();
    s.push_str(&format!("# Synthetic data: {}\n\n", p.path.display()));
    s.push_str(&format!("Teacher: {} `{}`. Stopped expanding: {}. Wall time of the last run: {:.1} s ({} requests sent, {} completion tokens).\n\n",
        id.backend, id.model, f.stop_reason, f.seconds, f.sent_this_run, f.completion_tokens_this_run));
    s.push_str("| stage | count |\n| --- | ---: |\n");
    let rows: Vec<(String, usize)> = vec![
        (
            format!("expansion requests ({} rounds)", f.rounds),
            f.expand_requests,
        ),
        ("expansion requests failed".into(), f.expand_failed),
        ("texts generated".into(), f.generated),
        ("records parsed".into(), f.parsed),
        ("records incomplete (not parsed)".into(), f.incomplete),
        ("novel inputs".into(), f.novel),
        ("kept (≤ target)".into(), f.kept),
        ("answers regenerated after a cut-off".into(), f.regenerated),
        ("answered".into(), f.answered),
    ];
    for (k, v) in rows {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    if !f.rejected.is_empty() {
        s.push_str("\nRejected candidates:\n\n| reason | count |\n| --- | ---: |\n");
        for (k, v) in &f.rejected {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
    }
    if !f.failed.is_empty() {
        s.push_str("\nFailures:\n\n| reason | count |\n| --- | ---: |\n");
        for (k, v) in &f.failed {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
    }
    s
}
