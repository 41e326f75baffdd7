//! `retort eval`: a model on a dataset with reference answers.
//!
//! 1. **Scoring** (teacher-forced): every record through the chat template with the
//!    assistant-only mask (the trainer's own tokenization and truncation), batched by length;
//!    hidden states `(B, T, C)` → the loss positions `(N, C)` → the LM head in chunks of rows →
//!    [`TokenSums`]. With a teacher, its logits on the same positions give KL, agreement and
//!    entropy. Only assistant tokens count (the masks exclude prompts, role headers and padding).
//! 2. **Generation** (optional, the first `generate` records): the prompt is everything before the
//!    last assistant turn; a greedy answer of at most `max_new_tokens` is scored against that turn
//!    with ROUGE-L (and exact match when references are short).

use std::time::Instant;

use candle_core::Tensor;
use retort_data::{Dataset, Role, rouge};
use retort_distill::batch::{self, Sample, Truncation};
use retort_model::generation::{self, SamplingParams};
use retort_model::{Model, Tokenizer};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::text;
use crate::tokens::{TokenMeans, TokenSums, chunk_sums};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Tokens per conversation; longer ones are cut on the right (as in training).
    pub max_len: usize,
    /// Conversations per forward pass.
    pub batch_size: usize,
    /// Loss positions per LM-head chunk (bounds the `(rows, V)` logits held at once).
    pub chunk_rows: usize,
    /// Records whose answers are generated and scored with ROUGE-L (the first ones); 0 = none.
    pub generate: usize,
    pub max_new_tokens: usize,
    /// Prompts generated together.
    pub generate_batch: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_len: 512,
            batch_size: 4,
            chunk_rows: 256,
            generate: 0,
            max_new_tokens: 128,
            generate_batch: 8,
        }
    }
}

/// Which part of the work a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Teacher-forced scoring; units are answer tokens.
    Score,
    /// Greedy generation; units are records.
    Generate,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenExample {
    pub id: String,
    pub reference: String,
    pub generated: String,
    pub rouge_l: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenReport {
    pub samples: usize,
    pub max_new_tokens: usize,
    /// Mean ROUGE-L F-measure of the greedy answers against the references.
    pub rouge_l: f64,
    /// Fraction of exact matches; `None` unless the references are short.
    pub exact_match: Option<f64>,
    /// Answers that hit `max_new_tokens`.
    pub cut_off: usize,
    pub mean_new_tokens: f64,
    /// With a teacher: its NLL per token of the greedy answers (how likely the teacher finds
    /// what the model writes; the quality on-policy distillation trains for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_nll: Option<f64>,
    /// The first few, to read.
    pub examples: Vec<GenExample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Filled by the caller (a path or a name).
    pub model: String,
    pub teacher: Option<String>,
    pub data: String,
    pub data_sha256: String,
    pub records: usize,
    /// Conversations scored (records with at least one answer token within `max_len`).
    pub samples: usize,
    pub truncated: usize,
    pub max_len: usize,
    pub tokens: TokenMeans,
    pub generation: Option<GenReport>,
    /// The products the model (and teacher) ran: `f32` or `bf16` (filled by the caller).
    pub matmul: String,
    pub seconds: f64,
}

/// Evaluate `model` (and, against it, `teacher`) on `ds`. `progress(phase, done, total)`.
pub fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    teacher: Option<&Model>,
    ds: &Dataset,
    opts: &EvalOptions,
    mut progress: impl FnMut(Phase, usize, usize),
) -> Result<EvalReport> {
    let t0 = Instant::now();
    let context = teacher
        .map_or(usize::MAX, |t| t.config().max_position_embeddings)
        .min(model.config().max_position_embeddings);
    if let Some(t) = teacher {
        let (sv, tv) = (model.config().vocab_size, t.config().vocab_size);
        if sv != tv {
            return Err(Error::invalid(
                format!("the teacher's vocabulary ({tv}) is not the model's ({sv})"),
                "KL and agreement need one tokenizer; evaluate without --teacher, or use a teacher of the same family",
            ));
        }
    }
    let (samples, rep) = batch::tokenize(ds, tokenizer, opts.max_len, Truncation::Right)?;
    batch::check_context(&samples, context, &ds.path, "--max-len")?;
    let sums = score(model, tokenizer, teacher, &samples, opts, &mut progress)?;
    let generation = if opts.generate > 0 {
        Some(generate(
            model,
            tokenizer,
            teacher,
            ds,
            opts,
            &mut progress,
        )?)
    } else {
        None
    };
    Ok(EvalReport {
        model: String::new(),
        teacher: None,
        data: ds.path.display().to_string(),
        data_sha256: ds.sha256.clone(),
        records: ds.records.len(),
        samples: samples.len(),
        truncated: rep.truncated,
        max_len: opts.max_len,
        tokens: sums.means(),
        generation,
        matmul: "f32".into(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `(B, T, C)` hidden states at the batch's loss positions, `(N, C)`.
fn hidden_at(model: &Model, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let h = model.forward(ids, 0, &[], None)?; // (B, T, C)
    let (b, t, c) = h.dims3()?;
    Ok(h.reshape((b * t, c))?.index_select(positions, 0)?) // (N, C)
}

/// Teacher-forced sums over every answer token of `samples`.
pub fn score(
    model: &Model,
    tokenizer: &Tokenizer,
    teacher: Option<&Model>,
    samples: &[Sample],
    opts: &EvalOptions,
    progress: &mut impl FnMut(Phase, usize, usize),
) -> Result<TokenSums> {
    let pad = tokenizer.stop_ids().first().copied().unwrap_or(0);
    // Longest first, in batches of similar length: less padding, and memory peaks early.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(samples[i].ids.len()));
    let total: usize = samples.iter().map(Sample::loss_tokens).sum();
    let mut sums = TokenSums::default();
    progress(Phase::Score, 0, total);
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let rows: Vec<&Sample> = chunk.iter().map(|&i| &samples[i]).collect();
        let mb = batch::collate(&rows, pad, model.device())?;
        if mb.loss_tokens == 0 {
            continue;
        }
        let hs = hidden_at(model, &mb.ids, &mb.positions)?; // (N, C)
        let ht = match teacher {
            Some(t) => Some(hidden_at(t, &mb.ids, &mb.positions)?), // (N, C)
            None => None,
        };
        let n = mb.loss_tokens;
        let step = opts.chunk_rows.max(1);
        let mut start = 0;
        while start < n {
            let len = step.min(n - start);
            let s_logits = model.lm_head(&hs.narrow(0, start, len)?)?; // (n, V)
            let t_logits = match (&ht, teacher) {
                (Some(h), Some(t)) => Some(t.lm_head(&h.narrow(0, start, len)?)?), // (n, V)
                _ => None,
            };
            let targets = mb.targets.narrow(0, start, len)?; // (n)
            sums.add(&chunk_sums(&s_logits, t_logits.as_ref(), &targets)?);
            start += len;
        }
        progress(Phase::Score, sums.tokens, total);
    }
    Ok(sums)
}

/// Greedy answers to the first `opts.generate` records, scored against their last assistant turn.
fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    teacher: Option<&Model>,
    ds: &Dataset,
    opts: &EvalOptions,
    progress: &mut impl FnMut(Phase, usize, usize),
) -> Result<GenReport> {
    // (id, prompt ids, reference) for records that end with an assistant answer.
    let mut items = Vec::new();
    for r in &ds.records {
        if items.len() == opts.generate {
            break;
        }
        let m = &r.conversation.messages;
        let Some(last) = m.iter().rposition(|x| x.role == Role::Assistant) else {
            continue;
        };
        let prompt = tokenizer.encode_prompt(&m[..last])?;
        items.push((r.id.clone(), prompt, m[last].content.clone()));
    }
    let params = SamplingParams {
        max_new_tokens: opts.max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: vec![],
        logprobs: None,
        ..SamplingParams::default()
    };
    let total = items.len();
    progress(Phase::Generate, 0, total);
    // Continuous batching: `generate_batch` rows decode together, a finished row's slot takes
    // the next prompt. Greedy, so each answer equals generating it alone.
    let prompts: Vec<Vec<u32>> = items.iter().map(|(_, p, _)| p.clone()).collect();
    let each = vec![params; prompts.len()];
    let mut outs: Vec<Option<generation::Completion>> = vec![None; total];
    let mut done = 0;
    retort_model::batching::generate_continuous(
        model,
        tokenizer,
        &prompts,
        &each,
        opts.generate_batch.max(1),
        |_, _| {},
        |i, c| {
            outs[i] = Some(c);
            done += 1;
            progress(Phase::Generate, done, total);
        },
    )?;
    let (mut rouge_sum, mut matches, mut cut_off, mut new_tokens) = (0.0, 0, 0, 0);
    let mut examples = Vec::new();
    let mut answers = Vec::new(); // prompt + answer, the answer masked in: for the teacher
    for ((id, prompt, reference), c) in items.iter().zip(outs) {
        let Some(c) = c else {
            return Err(Error::invalid(
                format!("no answer was generated for record `{id}`"),
                "this is a bug in retort's batching",
            ));
        };
        let text = c.text.trim().to_string();
        let r = rouge::rouge_l(&text, reference);
        rouge_sum += r;
        matches += usize::from(text::exact_match(&text, reference));
        cut_off += usize::from(c.finish_reason == generation::FinishReason::Length);
        new_tokens += c.ids.len();
        let mut ids = prompt.clone();
        ids.extend(&c.ids);
        let mut loss_mask = vec![false; prompt.len()];
        loss_mask.resize(ids.len(), true);
        answers.push(Sample {
            id: id.clone(),
            ids,
            loss_mask,
            teacher: None,
        });
        if examples.len() < 5 {
            examples.push(GenExample {
                id: id.clone(),
                reference: reference.clone(),
                generated: text,
                rouge_l: r,
            });
        }
    }
    let teacher_nll = match teacher {
        Some(t) => {
            let sums = score(t, tokenizer, None, &answers, opts, &mut |_, _, _| {})?;
            (sums.tokens > 0).then(|| sums.means().nll)
        }
        None => None,
    };
    let refs: Vec<&str> = items.iter().map(|(_, _, r)| r.as_str()).collect();
    let n = total.max(1) as f64;
    Ok(GenReport {
        samples: total,
        max_new_tokens: opts.max_new_tokens,
        rouge_l: rouge_sum / n,
        exact_match: text::short_targets(&refs).then_some(matches as f64 / n),
        cut_off,
        mean_new_tokens: new_tokens as f64 / n,
        teacher_nll,
        examples,
    })
}

/// One Markdown table, a column per report (models side by side on the same data).
pub fn markdown(reports: &[EvalReport]) -> String {
    let mut out = String::new();
    let names: Vec<String> = reports.iter().map(|r| format!("`{}`", r.model)).collect();
    out.push_str(&format!("| metric | {} |\n", names.join(" | ")));
    out.push_str(&format!("| --- |{}\n", " ---: |".repeat(reports.len())));
    let row = |out: &mut String, name: &str, f: &dyn Fn(&EvalReport) -> Option<String>| {
        let cells: Vec<String> = reports
            .iter()
            .map(|r| f(r).unwrap_or_else(|| "—".into()))
            .collect();
        if cells.iter().any(|c| c != "—") {
            out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
        }
    };
    row(&mut out, "conversations scored", &|r| {
        Some(format!("{} of {}", r.samples, r.records))
    });
    row(&mut out, "answer tokens", &|r| {
        Some(r.tokens.tokens.to_string())
    });
    row(&mut out, "NLL of the references (nats/token)", &|r| {
        Some(format!("{:.3}", r.tokens.nll))
    });
    row(&mut out, "perplexity", &|r| {
        Some(format!("{:.1}", r.tokens.perplexity))
    });
    row(&mut out, "top-1 accuracy on the references", &|r| {
        Some(format!("{:.3}", r.tokens.accuracy))
    });
    row(&mut out, "entropy (nats)", &|r| {
        Some(format!("{:.3}", r.tokens.entropy))
    });
    row(&mut out, "teacher NLL (nats/token)", &|r| {
        r.tokens.teacher_nll.map(|x| format!("{x:.3}"))
    });
    row(&mut out, "KL(teacher ‖ model) (nats/token)", &|r| {
        r.tokens.kl.map(|x| format!("{x:.3}"))
    });
    row(&mut out, "top-1 agreement with the teacher", &|r| {
        r.tokens.agreement.map(|x| format!("{x:.3}"))
    });
    row(&mut out, "teacher entropy (nats)", &|r| {
        r.tokens.teacher_entropy.map(|x| format!("{x:.3}"))
    });
    row(
        &mut out,
        "teacher NLL of greedy answers (nats/token)",
        &|r| {
            r.generation
                .as_ref()
                .and_then(|g| g.teacher_nll)
                .map(|x| format!("{x:.3}"))
        },
    );
    row(&mut out, "ROUGE-L F of greedy answers", &|r| {
        r.generation
            .as_ref()
            .map(|g| format!("{:.3} (n = {})", g.rouge_l, g.samples))
    });
    row(&mut out, "exact match", &|r| {
        r.generation
            .as_ref()
            .and_then(|g| g.exact_match)
            .map(|x| format!("{x:.3}"))
    });
    row(&mut out, "answers cut off", &|r| {
        r.generation.as_ref().map(|g| {
            format!(
                "{} of {} (≤ {} tokens)",
                g.cut_off, g.samples, g.max_new_tokens
            )
        })
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use retort_data::dataset::read;
    use retort_model::Arch;

    fn setup(dir: &std::path::Path) -> (Model, Tokenizer, Dataset) {
        let cfg = retort_test::tiny_config(Arch::Llama);
        let path = retort_test::write_tiny_model(dir, &cfg, 3);
        let (m, t) =
            retort_model::checkpoint::load(&path, retort_model::WeightFormat::F32, &Device::Cpu)
                .unwrap();
        let data = dir.join("d.jsonl");
        retort_test::write_chat_data(&data, 7);
        let ds = read(&data, &Default::default()).unwrap();
        (m, t, ds)
    }

    #[test]
    fn batching_and_chunking_do_not_change_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (m, t, ds) = setup(dir.path());
        let base = EvalOptions {
            batch_size: 1,
            chunk_rows: 1_000_000,
            ..Default::default()
        };
        let a = evaluate(&m, &t, Some(&m), &ds, &base, |_, _, _| {}).unwrap();
        let b = evaluate(
            &m,
            &t,
            Some(&m),
            &ds,
            &EvalOptions {
                batch_size: 3,
                chunk_rows: 5,
                ..base.clone()
            },
            |_, _, _| {},
        )
        .unwrap();
        assert_eq!(a.tokens.tokens, b.tokens.tokens);
        assert!(
            (a.tokens.nll - b.tokens.nll).abs() < 1e-5,
            "{} vs {}",
            a.tokens.nll,
            b.tokens.nll
        );
        // The model against itself: KL 0, agreement 1, teacher NLL = NLL.
        assert!(a.tokens.kl.unwrap().abs() < 1e-5);
        assert_eq!(a.tokens.agreement, Some(1.0));
        assert!((a.tokens.teacher_nll.unwrap() - a.tokens.nll).abs() < 1e-6);
    }

    #[test]
    fn only_answer_tokens_are_scored() {
        // The NLL equals the mean of −log q over exactly the masked positions, computed here
        // from full logits of each conversation alone.
        let dir = tempfile::tempdir().unwrap();
        let (m, t, ds) = setup(dir.path());
        let r = evaluate(&m, &t, None, &ds, &EvalOptions::default(), |_, _, _| {}).unwrap();
        let (samples, _) = batch::tokenize(&ds, &t, 512, Truncation::Right).unwrap();
        let (mut sum, mut n) = (0.0f64, 0usize);
        for s in &samples {
            let ids = Tensor::new(s.ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let lp =
                retort_distill::loss::log_softmax(&m.logits(&ids).unwrap().squeeze(0).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
            for p in 0..s.ids.len() - 1 {
                if s.loss_mask[p + 1] {
                    sum -= f64::from(lp[p][s.ids[p + 1] as usize]);
                    n += 1;
                }
            }
        }
        let prompt_tokens: usize = samples.iter().map(|s| s.ids.len()).sum::<usize>() - n;
        assert!(
            prompt_tokens > 0,
            "the data has prompt tokens that must not count"
        );
        assert_eq!(r.tokens.tokens, n);
        assert!(
            (r.tokens.nll - sum / n as f64).abs() < 1e-5,
            "{} vs {}",
            r.tokens.nll,
            sum / n as f64
        );
    }

    #[test]
    fn generation_scores_greedy_answers_and_the_table_has_a_column_per_model() {
        let dir = tempfile::tempdir().unwrap();
        let (m, t, ds) = setup(dir.path());
        let opts = EvalOptions {
            generate: 3,
            max_new_tokens: 6,
            generate_batch: 2,
            ..Default::default()
        };
        let mut phases = Vec::new();
        let mut r = evaluate(&m, &t, None, &ds, &opts, |p, d, n| phases.push((p, d, n))).unwrap();
        let g = r.generation.as_ref().unwrap();
        assert_eq!(g.samples, 3);
        assert!((0.0..=1.0).contains(&g.rouge_l));
        for e in &g.examples {
            assert!((e.rouge_l - rouge::rouge_l(&e.generated, &e.reference)).abs() < 1e-12);
        }
        assert_eq!(phases.last(), Some(&(Phase::Generate, 3, 3)));
        r.model = "a".into();
        let mut r2 = r.clone();
        r2.model = "b".into();
        let md = markdown(&[r, r2]);
        assert!(md.starts_with("| metric | `a` | `b` |"), "{md}");
        assert!(md.contains("ROUGE-L F of greedy answers"));
        assert!(!md.contains("KL(teacher"), "no teacher, no KL row");
        assert!(!md.contains("teacher NLL of greedy answers"));
    }

    #[test]
    fn the_teachers_nll_of_greedy_answers_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        let (m, t, ds) = setup(dir.path());
        let cfg = retort_test::tiny_config(Arch::Llama);
        let teacher = retort_test::tiny_model(&cfg, 11);
        let opts = EvalOptions {
            generate: 4,
            max_new_tokens: 5,
            ..Default::default()
        };
        let r = evaluate(&m, &t, Some(&teacher), &ds, &opts, |_, _, _| {}).unwrap();
        let got = r.generation.as_ref().unwrap().teacher_nll.unwrap();
        // Each greedy answer generated alone, scored by the teacher's full logits.
        let (mut sum, mut n) = (0.0f64, 0usize);
        for rec in ds.records.iter().take(4) {
            let msgs = &rec.conversation.messages;
            let last = msgs
                .iter()
                .rposition(|x| x.role == Role::Assistant)
                .unwrap();
            let prompt = t.encode_prompt(&msgs[..last]).unwrap();
            let params = SamplingParams {
                max_new_tokens: 5,
                ..SamplingParams::default()
            };
            let c = generation::generate(&m, &t, std::slice::from_ref(&prompt), &params, |_, _| {})
                .unwrap()
                .remove(0);
            let mut ids = prompt.clone();
            ids.extend(&c.ids);
            let x = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let lp =
                retort_distill::loss::log_softmax(&teacher.logits(&x).unwrap().squeeze(0).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
            for p in prompt.len() - 1..ids.len() - 1 {
                sum -= f64::from(lp[p][ids[p + 1] as usize]);
                n += 1;
            }
        }
        assert!(n > 0);
        assert!(
            (got - sum / n as f64).abs() < 1e-4,
            "{got} vs {}",
            sum / n as f64
        );
        let md = markdown(&[r]);
        assert!(md.contains("teacher NLL of greedy answers"), "{md}");
    }
}
