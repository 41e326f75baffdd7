//! Everything a run needs before the first step: models loaded, vocabularies checked, every
//! stage's data read, validated, tokenized and split, and the memory estimate. `--dry-run` stops
//! here and prints [`Plan::summary`].

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use retort_data::{ReadOptions, dataset};
use retort_model::lora::LoraTarget;
use retort_model::model::evenly_spaced_layers;
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};
use serde::Serialize;

use crate::batch::{self, Sample, TokenizeReport};
use crate::cache::Reader;
use crate::error::{Error, Result};
use crate::objective::{KdTerm, Objective};
use crate::recipe::{Method, Recipe, Stage, TrainParams};

/// A stage ready to train.
#[derive(Debug)]
pub struct StagePlan {
    pub index: usize,
    pub stage: Stage,
    pub objective: Objective,
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
    pub report: DataReport,
    /// Optimizer steps of the stage (epochs × steps per epoch, capped by `max_steps`).
    pub total_steps: usize,
    pub steps_per_epoch: usize,
}

/// What reading and tokenizing a stage's data found.
#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    pub data: PathBuf,
    pub data_sha256: String,
    pub format: String,
    pub skipped_invalid: usize,
    pub tokenize: TokenizeReport,
    pub eval_source: String,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub train_loss_tokens: usize,
    /// Padding share of the first epoch's batches.
    pub padding_waste: f64,
    /// KD from a logit cache: (train samples found in it, eval samples found in it).
    pub cache_hits: Option<(usize, usize)>,
}

/// The teacher's identity, recorded in every checkpoint's lineage.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct TeacherId {
    pub path: PathBuf,
    pub sha256: String,
    pub arch: String,
    pub tokenizer_fingerprint: String,
}

/// Models and stages of a run.
pub struct Plan {
    pub recipe: Recipe,
    pub student: Model,
    pub tokenizer: Tokenizer,
    /// The live teacher (KD without a cache, or hybrid).
    pub teacher: Option<Model>,
    pub teacher_id: Option<TeacherId>,
    /// The logit cache KD stages read targets from.
    pub cache: Option<crate::cache::Reader>,
    /// A server teacher (`[teacher] url`) that grades on-policy samples; set by the caller
    /// after [`prepare`] (the HTTP client lives in `retort-teacher`). Without it, on-policy
    /// stages are graded by the live teacher.
    pub scorer: Option<Box<dyn crate::cache::label::Scorer + Send>>,
    pub stages: Vec<StagePlan>,
    pub pad_id: u32,
    /// Padding of the teacher's own tokenization (cross-tokenizer stages).
    pub teacher_pad_id: u32,
    pub memory: MemoryEstimate,
}

/// A rough peak-memory estimate (bytes), from shapes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryEstimate {
    pub student_weights: u64,
    pub grads_and_adam: u64,
    pub teacher_weights: u64,
    pub activations: u64,
    pub logits_chunk: u64,
    pub total: u64,
}

/// Autograd's kept values per token and layer, per unit of hidden size C and of MLP width F.
const ACT_C: u64 = 8;
const ACT_F: u64 = 2;

fn estimate_memory(student: &Model, teacher: Option<&Model>, recipe: &Recipe) -> MemoryEstimate {
    let s = student.config();
    let t = &recipe.train;
    let p = s.num_parameters() as u64 * 4;
    let tokens = (t.batch_size * t.max_len) as u64;
    // Per layer and token, autograd keeps ~ (ACT_C·C + ACT_F·F) f32 values (the differentiable
    // norm, RoPE, softmax and SiLU compositions keep their intermediates) and, for a LoRA
    // student, two of each adapted layer's output width (the update and the sum); attention
    // keeps ~4 copies of B·H·T² scores. Calibrated against measured peak RSS (docs/performance.md,
    // "Real students": SmolLM2 KD, Qwen2.5-Coder-0.5B full and LoRA and 1.5B LoRA, with and
    // without activation checkpointing).
    let lora_width: u64 = student.lora().map_or(0, |l| {
        let (c, f) = (s.hidden_size, s.intermediate_size);
        let kv = s.num_key_value_heads * s.head_dim;
        let q = s.num_attention_heads * s.head_dim;
        l.targets
            .iter()
            .map(|t| match t {
                LoraTarget::QProj => q,
                LoraTarget::KProj | LoraTarget::VProj => kv,
                LoraTarget::OProj | LoraTarget::DownProj => c,
                LoraTarget::GateProj | LoraTarget::UpProj => f,
            } as u64)
            .sum()
    });
    let per_layer = tokens
        * (ACT_C * s.hidden_size as u64 + ACT_F * s.intermediate_size as u64 + 2 * lora_width)
        * 4
        + (t.batch_size * s.num_attention_heads * t.max_len * t.max_len) as u64 * 4 * 4;
    let layers = s.num_hidden_layers as u64;
    let activations = if t.activation_checkpointing {
        // Each layer's input, plus one layer's activations while it is recomputed.
        layers * tokens * s.hidden_size as u64 * 4 + per_layer
    } else {
        per_layer * layers
    };
    // A chunk of logits: ~4 (rows, V) tensors alive at once; when the LM head trains (not for a
    // LoRA student), ~4 (V, C) tensors: each chunk's head gradient, its running sum, and the
    // embedding's gradient (a tied head is the embedding).
    let head_trains = student
        .vars()
        .iter()
        .any(|(n, _)| n == "lm_head.weight" || n == "model.embed_tokens.weight");
    let head_grad = if head_trains {
        4 * (s.vocab_size * s.hidden_size) as u64 * 4
    } else {
        0
    };
    let logits_chunk = (t.chunk_rows_for(s.vocab_size) * s.vocab_size) as u64 * 4 * 4 + head_grad;
    let teacher_weights = teacher.map_or(0, |m| m.config().num_parameters() as u64 * 4);
    // Gradient and two AdamW moments per trained value: every weight, or a LoRA student's
    // adapters (whose base weights get no gradient).
    let trained: u64 = student
        .vars()
        .iter()
        .map(|(_, v)| v.elem_count() as u64)
        .sum();
    let moment_bytes = match t.adamw.moments {
        crate::adamw::MomentDtype::F32 => 4,
        crate::adamw::MomentDtype::Bf16 => 2,
    };
    let grads_and_adam = trained * 4 + 2 * trained * moment_bytes;
    MemoryEstimate {
        student_weights: p,
        grads_and_adam,
        teacher_weights,
        activations,
        logits_chunk,
        // Activations are freed as the backward pass produces the gradients: the two do not
        // peak together.
        total: p
            + teacher_weights
            + 2 * trained * moment_bytes
            + (activations.max(trained * 4) + logits_chunk),
    }
}

fn load_student(
    recipe: &Recipe,
    teacher_ck: Option<&checkpoint::Checkpoint>,
    device: &Device,
) -> Result<(Model, Tokenizer)> {
    let s = &recipe.student;
    if let Some(path) = &s.path {
        let ck = checkpoint::read(path, device)?;
        let model = match &s.lora {
            Some(l) => ck.lora(l, recipe.train.seed)?,
            None => ck.trainable()?,
        };
        return Ok((model, ck.tokenizer));
    }
    let ck = teacher_ck.ok_or_else(|| {
        Error::invalid(
            "pruning the teacher needs a [teacher]",
            "add [teacher] path = …",
        )
    })?;
    let total = ck.config.num_hidden_layers;
    let keep = match (&s.keep_layers, s.num_layers) {
        (Some(k), _) => k.clone(),
        (None, Some(n)) if n >= 1 && n <= total => evenly_spaced_layers(n, total),
        (None, n) => {
            return Err(Error::invalid(
                format!("student.num_layers = {n:?} but the teacher has {total} layers"),
                format!("choose 1..={total}"),
            ));
        }
    };
    let pruned = ck
        .frozen(WeightFormat::F32)?
        .prune_layers(&keep, &ck.path)?;
    let model = match &s.lora {
        Some(l) => pruned.to_lora(&ck.path, l, recipe.train.seed)?,
        None => pruned.to_trainable(&ck.path)?,
    };
    Ok((model, ck.tokenizer.clone()))
}

/// Columns of logits KD compares, after checking the two tokenizers agree.
fn shared_vocab(
    student: &Model,
    s_tok: &Tokenizer,
    teacher_vocab: usize,
    t_tok: &Tokenizer,
    t_path: &Path,
) -> Result<Option<usize>> {
    if s_tok.fingerprint() != t_tok.fingerprint() {
        return Err(Error::invalid(
            format!(
                "the student's tokenizer differs from the teacher's (`{}`): token-level KD compares \
                 distributions over the same vocabulary",
                t_path.display()
            ),
            "use a student built from the teacher (`[student] num_layers = …`) or from the same \
             model family, or use method = \"sft\" on teacher-written data",
        ));
    }
    let (vs, vt) = (student.config().vocab_size, teacher_vocab);
    if vs == vt {
        return Ok(None);
    }
    // Padding-only differences (e.g. Qwen 151,936 vs 152,064): the rows past the tokenizer's
    // vocabulary are never produced by tokenization, so compare the shared columns only.
    let used = s_tok.vocab_size();
    let common = vs.min(vt);
    if used > common {
        return Err(Error::invalid(
            format!(
                "vocabulary sizes differ (student {vs}, teacher {vt}) and the tokenizer uses {used} ids"
            ),
            "the models do not share a vocabulary; pick a matching teacher/student pair",
        ));
    }
    Ok(Some(common))
}

fn split_eval(samples: Vec<Sample>, fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    if fraction <= 0.0 || samples.len() < 2 {
        return (samples, Vec::new());
    }
    let n_eval = ((samples.len() as f64 * fraction).ceil() as usize).clamp(1, samples.len() - 1);
    let mut idx: Vec<usize> = (0..samples.len()).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_E7A1));
    let mut is_eval = vec![false; samples.len()];
    idx[..n_eval].iter().for_each(|&i| is_eval[i] = true);
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (s, e) in samples.into_iter().zip(is_eval) {
        if e { eval.push(s) } else { train.push(s) }
    }
    (train, eval)
}

/// Load models and prepare every stage (all data validated before any compute).
pub fn prepare(recipe: Recipe, device: &Device) -> Result<Plan> {
    // The in-place AdamW and the fused losses are CPU storage ops.
    retort_model::device::require_cpu(device, "training")?;
    let teacher_ck = match recipe.teacher.as_ref().and_then(|t| t.path.as_ref()) {
        Some(p) => Some(checkpoint::read(p, device)?),
        None => None,
    };
    let (mut student, tokenizer) = load_student(&recipe, teacher_ck.as_ref(), device)?;
    student.set_matmul_precision(recipe.train.matmul);
    // Samples must fit the student's and the teacher's context.
    let context = teacher_ck
        .as_ref()
        .map_or(usize::MAX, |ck| ck.config.max_position_embeddings)
        .min(student.config().max_position_embeddings);
    let needs_teacher = recipe.stages.iter().any(|s| s.method.needs_teacher());
    let cache = match recipe.teacher.as_ref().and_then(|t| t.cache.as_ref()) {
        Some(dir) if needs_teacher => Some(Reader::open(dir, teacher_ck.is_some())?),
        _ => None,
    };
    // Cross-tokenizer stages align with the teacher's tokenizer: the live teacher's, else the
    // one a format-2 cache stores.
    let any_cross = recipe
        .stages
        .iter()
        .any(|st| st.method == Method::Kd && st.cross_tokenizer.is_some());
    let cache_tokenizer = match (&cache, any_cross) {
        (Some(c), true) => Some(c.teacher_tokenizer()?),
        _ => None,
    };
    let teacher_tokenizer = teacher_ck
        .as_ref()
        .map(|ck| &ck.tokenizer)
        .or(cache_tokenizer.as_ref());
    if let (Some(ck), Some(c)) = (&teacher_ck, &cache)
        && ck.tokenizer.fingerprint() != c.manifest.tokenizer_fingerprint
    {
        return Err(Error::invalid(
            format!(
                "logit cache `{}` was labelled with another tokenizer than the teacher's (`{}`)",
                c.dir.display(),
                ck.path.display()
            ),
            format!(
                "point [teacher] path at the cache's teacher, or relabel: {}",
                c.manifest.command
            ),
        ));
    }
    let same_tokenizer = teacher_ck
        .as_ref()
        .is_none_or(|ck| ck.tokenizer.fingerprint() == tokenizer.fingerprint());
    // Stages that compare distributions over one vocabulary (a cache-only teacher's tokenizer
    // is checked with the cache, `cache_identity`).
    let one_vocabulary = recipe
        .stages
        .iter()
        .any(|st| st.method.needs_teacher() && st.cross_tokenizer.is_none());
    if let (Some(ck), false) = (&teacher_ck, same_tokenizer)
        && let Some(st) = recipe
            .stages
            .iter()
            .find(|st| st.method.needs_teacher() && st.cross_tokenizer.is_none())
    {
        return Err(Error::invalid(
            format!(
                "stage `{}`: the student's tokenizer differs from the teacher's (`{}`), and \
                 token-level KD compares distributions over one vocabulary",
                st.name,
                ck.path.display()
            ),
            "set `cross_tokenizer = \"gold\"` (or \"uld\") on the stage for cross-tokenizer KD, \
             use a student of the teacher's family, or use method = \"sft\" on teacher-written data",
        ));
    }
    let (teacher_id, vocab_limit) = match (&teacher_ck, needs_teacher) {
        (Some(ck), true) => {
            let limit = if same_tokenizer {
                shared_vocab(
                    &student,
                    &tokenizer,
                    ck.config.vocab_size,
                    &ck.tokenizer,
                    &ck.path,
                )?
            } else {
                None
            };
            let id = TeacherId {
                path: ck.path.clone(),
                sha256: retort_model::checkpoint::weights_sha256(&ck.path)?,
                arch: format!("{:?}", ck.config.arch).to_lowercase(),
                tokenizer_fingerprint: ck.tokenizer.fingerprint(),
            };
            (Some(id), limit)
        }
        _ => (None, None),
    };
    let (teacher_id, vocab_limit) = match (&cache, teacher_id) {
        (Some(c), id) => cache_identity(c, id, &student, &tokenizer, one_vocabulary)?,
        (None, id) => (id, vocab_limit),
    };
    // A server teacher (on-policy stages): its name and URL stand for its weights.
    let teacher_id = match recipe.teacher.as_ref().and_then(|t| t.url.as_ref()) {
        Some(url) if teacher_id.is_none() => Some(TeacherId {
            path: url.into(),
            sha256: format!(
                "remote:{}@{url}",
                recipe
                    .teacher
                    .as_ref()
                    .and_then(|t| t.model.as_deref())
                    .unwrap_or("default")
            ),
            arch: "remote".into(),
            tokenizer_fingerprint: tokenizer.fingerprint(),
        }),
        _ => teacher_id,
    };
    let pad_id = tokenizer.stop_ids().first().copied().unwrap_or(0);
    let teacher_pad_id = teacher_ck
        .as_ref()
        .and_then(|ck| ck.tokenizer.stop_ids().first().copied())
        .unwrap_or(0);
    let vocab_map = match teacher_tokenizer {
        Some(tt) if any_cross => Some(std::sync::Arc::new(crate::xtok::loss::VocabMap::by_string(
            tt, &tokenizer,
        ))),
        _ => None,
    };
    for st in &recipe.stages {
        let server = recipe.teacher.as_ref().is_some_and(|t| t.url.is_some());
        if let Some(o) = &st.on_policy
            && o.estimator == crate::recipe::Estimator::Full
            && o.teacher_k(server).is_some()
        {
            tracing::warn!(
                "stage `{}`: the teacher's top-{} per token stands in for its whole distribution; \
                 on the student's own answers that gradient measured far from the exact one \
                 (docs/on-policy.md); estimator = \"sampled\" needs only the sampled token's \
                 log-prob and is unbiased",
                st.name,
                o.teacher_k(server).unwrap_or_default()
            );
        }
    }
    let live_teacher = needs_teacher && teacher_ck.is_some();
    let mut stages = Vec::with_capacity(recipe.stages.len());
    for (index, stage) in recipe.stages.iter().enumerate() {
        let data = StageData {
            tokenizer: &tokenizer,
            teacher_tokenizer,
            vocab_map: vocab_map.clone(),
            context,
            cache: cache.as_ref(),
            live_teacher,
            vocab_limit,
            chunk_rows: recipe.train.chunk_rows_for(student.config().vocab_size),
        };
        stages.push(plan_stage(index, stage, &recipe.train, &data)?);
    }
    // The teacher model is built only if some KD sample is missing from the cache: a complete
    // cache trains without it (the 1.5B teacher's f32 weights are 6.6 GB).
    let cache_covers_all = cache.is_some()
        && stages.iter().all(|sp| match sp.report.cache_hits {
            Some((tr, ev)) => tr == sp.report.train_samples && ev == sp.report.eval_samples,
            None => sp.objective.kd.is_none(),
        });
    let teacher = match (&teacher_ck, live_teacher && !cache_covers_all) {
        (Some(ck), true) => {
            let mut t = ck.frozen(WeightFormat::F32)?;
            t.set_matmul_precision(recipe.train.matmul);
            // With bf16 products, the frozen weights are packed once, not every step.
            let packed = t.prepack_bf16()?;
            if packed > 0 {
                tracing::debug!("teacher: {packed} weights packed once for bf16 products");
            }
            Some(t)
        }
        (Some(_), false) if live_teacher => {
            tracing::info!(
                "teacher: not loaded, the logit cache holds every sample of every KD stage"
            );
            None
        }
        _ => None,
    };
    drop(teacher_ck);
    let memory = estimate_memory(&student, teacher.as_ref(), &recipe);
    Ok(Plan {
        recipe,
        student,
        tokenizer,
        teacher,
        teacher_id,
        cache,
        scorer: None,
        stages,
        pad_id,
        teacher_pad_id,
        memory,
    })
}

/// What every stage's data is checked and planned against.
struct StageData<'a> {
    tokenizer: &'a Tokenizer,
    /// The teacher's tokenizer, for cross-tokenizer stages.
    teacher_tokenizer: Option<&'a Tokenizer>,
    /// Teacher id → student id of the same string (GOLD).
    vocab_map: Option<std::sync::Arc<crate::xtok::loss::VocabMap>>,
    /// Longest sample the student and the teacher take.
    context: usize,
    cache: Option<&'a Reader>,
    live_teacher: bool,
    vocab_limit: Option<usize>,
    /// Rows of logits per loss chunk (`TrainParams::chunk_rows_for` the student's vocabulary).
    chunk_rows: usize,
}

/// One stage: its data read, tokenized, checked against the context and split; its steps, KD
/// term and cache coverage.
fn plan_stage(index: usize, stage: &Stage, t: &TrainParams, d: &StageData) -> Result<StagePlan> {
    let (tokenizer, context, cache, live_teacher, vocab_limit) = (
        d.tokenizer,
        d.context,
        d.cache,
        d.live_teacher,
        d.vocab_limit,
    );
    let opts = ReadOptions {
        format: stage.format,
        skip_invalid: stage.skip_invalid,
    };
    let ds = dataset::read(&stage.data, &opts)?;
    let cross_teacher = match (stage.cross_tokenizer, d.teacher_tokenizer) {
        (Some(_), Some(tt)) => Some(tt),
        (Some(_), None) => {
            return Err(Error::invalid(
                format!(
                    "stage `{}`: cross-tokenizer KD needs the teacher's tokenizer",
                    stage.name
                ),
                "give [teacher] a `path` (a live teacher), or a `cache` labelled by this retort \
                 (format 2 stores the teacher's tokenizer)",
            ));
        }
        (None, _) => None,
    };
    let tokenize = |ds: &retort_data::Dataset, src: &Path| -> Result<_> {
        let (samples, rep) = match cross_teacher {
            Some(tt) => batch::tokenize_pair(ds, tokenizer, tt, t.max_len, t.truncation)?,
            None => batch::tokenize(ds, tokenizer, t.max_len, t.truncation)?,
        };
        batch::check_context(&samples, context, src, "train.max_len")?;
        let teacher_sides = samples
            .iter()
            .filter_map(|s| s.teacher.as_ref().map(|x| &x.sample));
        batch::check_context(teacher_sides, context, src, "train.max_len")?;
        Ok((samples, rep))
    };
    let (samples, tok_report) = tokenize(&ds, &stage.data)?;
    let (train, eval, eval_source) = match &stage.eval_data {
        Some(p) => {
            let eds = dataset::read(p, &opts)?;
            let (e, _) = tokenize(&eds, p)?;
            (samples, e, p.display().to_string())
        }
        None => {
            let (tr, ev) = split_eval(samples, t.eval_fraction, t.seed);
            (
                tr,
                ev,
                format!("{:.0}% of the data", t.eval_fraction * 100.0),
            )
        }
    };
    if train.is_empty() {
        return Err(Error::invalid(
            format!(
                "stage `{}`: no training samples left in `{}`",
                stage.name,
                stage.data.display()
            ),
            "check max_len (samples may all be cut away) and eval_fraction",
        ));
    }
    let lengths: Vec<usize> = train.iter().map(|s| s.ids.len()).collect();
    let plan0 = batch::plan_epoch(&lengths, t.batch_size, t.bucket_batches, t.seed, 0);
    let steps_per_epoch = plan0.len().div_ceil(t.grad_accum);
    let mut total_steps = match &stage.on_policy {
        // Rounds of `samples_per_round` prompts over `epochs` passes, `updates_per_round` steps
        // each (with λ = 0 and one use per sample: the off-policy stage's steps).
        Some(o) => {
            let per_round = o.samples_per_round_for(t.batch_size, t.grad_accum);
            (train.len() * stage.epochs).div_ceil(per_round) * o.updates_per_round
        }
        None => steps_per_epoch * stage.epochs,
    };
    if let Some(m) = stage.max_steps {
        total_steps = total_steps.min(m);
    }
    let kd = match stage.method {
        Method::Sft => None,
        Method::Kd | Method::OnPolicy => Some(KdTerm {
            divergence: stage.loss,
            temperature: stage.temperature,
            alpha: stage.alpha,
        }),
    };
    let cache_hits = match (&cache, stage.method) {
        (Some(c), Method::Kd) => Some(cache_coverage(
            c,
            &stage.name,
            &ds.sha256,
            &train,
            &eval,
            live_teacher,
            stage.cross_tokenizer.is_some(),
        )?),
        _ => None,
    };
    let report = DataReport {
        data: stage.data.clone(),
        data_sha256: ds.sha256.clone(),
        format: ds.format.to_string(),
        skipped_invalid: ds.skipped.len(),
        tokenize: tok_report,
        eval_source,
        train_samples: train.len(),
        eval_samples: eval.len(),
        train_loss_tokens: train.iter().map(Sample::loss_tokens).sum(),
        padding_waste: batch::padding_waste(&lengths, &plan0),
        cache_hits,
    };
    Ok(StagePlan {
        index,
        stage: stage.clone(),
        objective: Objective {
            kd,
            chunk_rows: d.chunk_rows,
            vocab_limit: if stage.cross_tokenizer.is_some() {
                None
            } else {
                vocab_limit
            },
            checkpoint_layers: t.activation_checkpointing,
            cross: stage
                .cross_tokenizer
                .map(|loss| crate::xtok::loss::CrossKd {
                    loss,
                    div: stage.loss,
                    map: d.vocab_map.clone(),
                }),
        },
        train,
        eval,
        report,
        total_steps,
        steps_per_epoch,
    })
}

/// The teacher's identity and the compared vocabulary when KD reads a cache: the cache must
/// come from the live teacher (hybrid) and, when some KD stage compares one vocabulary
/// (`one_vocabulary`, not across tokenizers), share the student's tokenizer.
fn cache_identity(
    c: &Reader,
    live: Option<TeacherId>,
    student: &Model,
    tokenizer: &Tokenizer,
    one_vocabulary: bool,
) -> Result<(Option<TeacherId>, Option<usize>)> {
    let m = &c.manifest;
    if one_vocabulary {
        c.check_matches(&tokenizer.fingerprint(), None)?;
    }
    if let Some(id) = &live
        && id.sha256 != m.teacher.sha256
    {
        return Err(Error::invalid(
            format!(
                "logit cache `{}` was labelled by another teacher (`{}`, sha256 {}…) than [teacher] path `{}` ({}…)",
                c.dir.display(),
                m.teacher.path.display(),
                &m.teacher.sha256[..12.min(m.teacher.sha256.len())],
                id.path.display(),
                &id.sha256[..12]
            ),
            format!(
                "point [teacher] path at the cache's teacher, or relabel: {}",
                m.command
            ),
        ));
    }
    let (vs, vt) = (student.config().vocab_size, m.teacher.vocab_size);
    let limit = if !one_vocabulary || vs == vt {
        None
    } else if tokenizer.vocab_size() <= vs.min(vt) {
        Some(vs.min(vt))
    } else {
        return Err(Error::invalid(
            format!("vocabulary sizes differ (student {vs}, cached teacher {vt})"),
            "the models do not share a vocabulary; pick a matching teacher/student pair",
        ));
    };
    let id = live.unwrap_or_else(|| TeacherId {
        path: m.teacher.path.clone(),
        sha256: m.teacher.sha256.clone(),
        arch: m.teacher.arch.clone(),
        tokenizer_fingerprint: m.tokenizer_fingerprint.clone(),
    });
    Ok((Some(id), limit))
}

/// How many of a KD stage's samples the cache holds (across tokenizers: their teacher sides,
/// where one without loss tokens needs nothing). Without a live teacher every training sample
/// must be there and the data must be the labelled file.
fn cache_coverage(
    c: &Reader,
    stage: &str,
    data_sha256: &str,
    train: &[Sample],
    eval: &[Sample],
    hybrid: bool,
    cross: bool,
) -> Result<(usize, usize)> {
    let held = |s: &Sample| match (&s.teacher, cross) {
        (Some(side), true) => {
            let t = &side.sample;
            t.loss_tokens() == 0 || c.contains(&crate::cache::sample_key(&t.ids, &t.loss_mask))
        }
        _ => c.contains(&crate::cache::sample_key(&s.ids, &s.loss_mask)),
    };
    let hits = |v: &[Sample]| v.iter().filter(|s| held(s)).count();
    let (tr, ev) = (hits(train), hits(eval));
    if !hybrid {
        c.check_matches(&c.manifest.tokenizer_fingerprint, Some(data_sha256))?;
        if tr < train.len() {
            let m = &c.manifest;
            return Err(Error::invalid(
                format!(
                    "stage `{stage}`: {} of {} training samples are not in logit cache `{}`",
                    train.len() - tr,
                    train.len(),
                    c.dir.display()
                ),
                format!(
                    "label with the recipe's max_len and truncation (the cache has max_len {}, {:?}): {}",
                    m.dataset.max_len, m.dataset.truncation, m.command
                ),
            ));
        }
    }
    Ok((tr, ev))
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl Plan {
    /// A human-readable summary of what the run will do (printed by `--dry-run`).
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = self.student.config();
        let _ = writeln!(
            s,
            "student: {} layers, {:.1}M parameters, vocab {}",
            c.num_hidden_layers,
            c.num_parameters() as f64 / 1e6,
            c.vocab_size
        );
        if let Some(l) = self.student.lora() {
            let trained: usize = self
                .student
                .vars()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum();
            let targets: Vec<&str> = l.targets.iter().map(|t| t.name()).collect();
            let _ = writeln!(
                s,
                "LoRA: rank {}, alpha {}, on {}: {:.2}M trained parameters, base frozen",
                l.rank,
                l.alpha,
                targets.join(", "),
                trained as f64 / 1e6
            );
        }
        if let Some(c) = &self.cache {
            let m = &c.manifest;
            let _ = writeln!(
                s,
                "logit cache: {} (k={}, T={}, codec {}, {} samples, {} tokens, {:.1} bytes/token){}",
                c.dir.display(),
                m.k,
                m.temperature,
                m.encoding.codec,
                c.len(),
                m.positions(),
                m.bytes() as f64 / m.positions().max(1) as f64,
                if self.teacher.is_some() {
                    "; samples not in it are labelled by the live teacher"
                } else {
                    ""
                }
            );
        }
        match (&self.teacher, &self.teacher_id) {
            (None, Some(id)) => {
                let _ = writeln!(
                    s,
                    "teacher: {} (from the cache only), sha256 {}",
                    id.path.display(),
                    &id.sha256[..16.min(id.sha256.len())]
                );
            }
            (Some(t), Some(id)) => {
                let _ = writeln!(
                    s,
                    "teacher: {} ({} layers, {:.1}M parameters, f32), sha256 {}",
                    id.path.display(),
                    t.config().num_hidden_layers,
                    t.config().num_parameters() as f64 / 1e6,
                    &id.sha256[..16]
                );
            }
            _ => {
                let _ = writeln!(s, "teacher: none (no KD stage)");
            }
        }
        let t = &self.recipe.train;
        let _ = writeln!(
            s,
            "batch {}×≤{} tokens, grad_accum {}, chunk_rows {}{}{}",
            t.batch_size,
            t.max_len,
            t.grad_accum,
            t.chunk_rows_for(c.vocab_size),
            if t.chunk_rows.is_none() {
                " (from the vocabulary)"
            } else {
                ""
            },
            if t.activation_checkpointing {
                ", activation checkpointing (each layer recomputed in backward)"
            } else {
                ""
            }
        );
        for st in &self.stages {
            let r = &st.report;
            let t = &self.recipe.train;
            let method = match (&st.objective.kd, &st.stage.on_policy) {
                (Some(k), Some(o)) => format!(
                    "on-policy {} ({} estimator) T={}, λ={}: rounds of {} answers (≤ {} new tokens, \
                     sampled at T={}, top-p {}) × {} updates, graded by {} ({})",
                    k.divergence,
                    match o.estimator {
                        crate::recipe::Estimator::Full => "full",
                        crate::recipe::Estimator::Sampled => "sampled",
                    },
                    k.temperature,
                    o.lambda,
                    o.samples_per_round_for(t.batch_size, t.grad_accum),
                    o.max_new_tokens,
                    o.temperature,
                    o.top_p,
                    o.updates_per_round,
                    match self.recipe.teacher.as_ref().and_then(|t| t.url.as_deref()) {
                        Some(url) => format!("the server {url}"),
                        None => "the live teacher".into(),
                    },
                    match o.teacher_k(self.scorer.is_some() || self.teacher.is_none()) {
                        Some(k) => format!("its top-{k} + the sampled token + a tail bucket"),
                        None => "its whole distribution".into(),
                    }
                ),
                (None, _) => "sft".to_string(),
                (Some(k), None) => match &st.objective.cross {
                    Some(c) => format!(
                        "kd across tokenizers ({}, teacher top-{}) {} α={} T={}",
                        match c.loss {
                            crate::xtok::loss::CrossLoss::Gold => "gold",
                            crate::xtok::loss::CrossLoss::Uld => "uld",
                        },
                        // From a cache, the teacher's top-k is the labelled one.
                        self.cache
                            .as_ref()
                            .map_or(st.stage.cross_top_k, |c| c.manifest.k),
                        k.divergence,
                        k.alpha,
                        k.temperature
                    ),
                    None => format!("kd {} α={} T={}", k.divergence, k.alpha, k.temperature),
                },
            };
            let _ = writeln!(
                s,
                "stage {} `{}`: {method}, lr {}, {} epoch(s) → {} optimizer steps",
                st.index, st.stage.name, st.stage.lr, st.stage.epochs, st.total_steps
            );
            let _ = writeln!(
                s,
                "  data {} ({}, sha256 {}…): {} records, {} invalid skipped",
                r.data.display(),
                r.format,
                &r.data_sha256[..12],
                r.tokenize.records,
                r.skipped_invalid
            );
            let _ = writeln!(
                s,
                "  tokens {} ({} loss tokens), longest {}; truncated {}, dropped {} ({} tokens cut at max_len {})",
                r.tokenize.tokens,
                r.tokenize.loss_tokens,
                r.tokenize.max_len_seen,
                r.tokenize.truncated,
                r.tokenize.dropped,
                r.tokenize.tokens_cut,
                t.max_len
            );
            let _ = writeln!(
                s,
                "  train {} samples ({} loss tokens), eval {} samples ({}); padding waste {:.1}%",
                r.train_samples,
                r.train_loss_tokens,
                r.eval_samples,
                r.eval_source,
                r.padding_waste * 100.0
            );
            if let Some((tr, ev)) = r.cache_hits {
                let _ = writeln!(
                    s,
                    "  logit cache holds {tr} of {} train and {ev} of {} eval samples",
                    r.train_samples, r.eval_samples
                );
            }
        }
        let m = &self.memory;
        let _ = writeln!(
            s,
            "memory estimate: {} peak (student {}, grads+AdamW {}, teacher {}, activations {}, logits chunk {}; \
             activations are freed as gradients arrive, so they do not add up)",
            gib(m.total),
            gib(m.student_weights),
            gib(m.grads_and_adam),
            gib(m.teacher_weights),
            gib(m.activations),
            gib(m.logits_chunk)
        );
        s
    }
}
