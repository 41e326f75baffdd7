//! The training objective on one micro-batch: `(1 − α)·CE + α·KD` over the positions that carry
//! loss, normalised by the **global** number of loss tokens of the optimizer step.
//!
//! The LM head runs only on the gathered loss positions, `chunk_rows` rows at a time, so student
//! and teacher logits exist for one chunk at most (never `B × T × V`). Each chunk is a separate
//! backward from a detached copy of its hidden states; the hidden-state gradients of all chunks
//! are then pushed through the decoder in one more backward (`Σ hidden · ∂L/∂hidden`), which
//! gives exactly the gradients of the unchunked loss.
//!
//! Shapes: `ids (B, T)` u32 right-padded; `positions (N)` u32 flat indices `b·T + t` of the
//! positions whose next token is a loss token; `targets (N)` u32 those next tokens.

use candle_core::{DType, Tensor, Var};
use retort_model::Model;

use crate::error::{Error, Result};
use crate::fused;
use crate::grads::Grads;
use crate::loss::{Divergence, KdMix, cross_entropy_sum, divergence_sum};
use crate::sparse::{self, SparseTargets};

/// The KD term of the objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdTerm {
    pub divergence: Divergence,
    pub temperature: f64,
    /// Weight of KD in `(1 − α)·CE + α·T²·KD` ([`KdMix`]).
    pub alpha: f64,
}

impl KdTerm {
    pub fn mix(&self) -> KdMix {
        KdMix {
            alpha: self.alpha,
            temperature: self.temperature,
        }
    }
}

/// What one micro-batch is trained on.
#[derive(Debug, Clone)]
pub struct Objective {
    /// `None` for SFT (cross-entropy only).
    pub kd: Option<KdTerm>,
    /// Rows of logits computed at once.
    pub chunk_rows: usize,
    /// Logit columns compared between teacher and student (the shared vocabulary); `None` = all.
    pub vocab_limit: Option<usize>,
    /// Activation checkpointing: keep only each decoder layer's input in the forward pass and
    /// recompute the layer in backward (one more forward of the decoder, a fraction of the
    /// activation memory). The gradients are those of the plain backward.
    pub checkpoint_layers: bool,
    /// Cross-tokenizer KD ([`crate::xtok::loss`]): the KD term compares aligned groups, whose
    /// targets the micro-batch carries in `cross`.
    pub cross: Option<crate::xtok::loss::CrossKd>,
}

/// One micro-batch, ready for the model.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `(B, T)` u32.
    pub ids: Tensor,
    /// `(N)` u32 flat indices of loss positions.
    pub positions: Tensor,
    /// `(N)` u32 next-token targets.
    pub targets: Tensor,
    /// N.
    pub loss_tokens: usize,
    /// Tokens in the batch that are not padding.
    pub real_tokens: usize,
    /// The teacher's top-k targets at the N loss positions, from a logit cache (already at the
    /// training temperature). When set, KD uses them instead of running the teacher.
    pub sparse: Option<SparseTargets>,
    /// Cross-tokenizer KD: the aligned groups over the N loss rows, with the teacher's side
    /// (from [`crate::xtok::targets::online`]).
    pub cross: Option<Vec<crate::xtok::loss::Group>>,
    /// On-policy stages with `estimator = "sampled"`: the teacher's log-prob of each of the N
    /// target tokens (sampled by the student). The KD term is then the policy-gradient estimate
    /// of reverse KL ([`crate::onpolicy::sampled_loss`]) instead of a divergence.
    pub sampled: Option<Vec<f32>>,
}

/// Loss sums of a micro-batch (not normalised): Σ CE and Σ KD (× T²) over its loss tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSums {
    pub ce: f64,
    pub kd: f64,
    pub tokens: usize,
    /// Tokens that have a KD term (all of them in training; in evaluation, those with teacher
    /// targets).
    pub kd_tokens: usize,
}

impl LossSums {
    pub fn add(&mut self, o: &LossSums) {
        self.ce += o.ce;
        self.kd += o.kd;
        self.tokens += o.tokens;
        self.kd_tokens += o.kd_tokens;
    }

    /// Mean KD per token that has one.
    pub fn kd_mean(&self) -> Option<f64> {
        (self.kd_tokens > 0).then(|| self.kd / self.kd_tokens as f64)
    }

    /// The objective's value per token: `(1 − α)·CE + α·KD` (CE alone for SFT).
    pub fn loss(&self, kd: Option<&KdTerm>) -> f64 {
        let n = self.tokens.max(1) as f64;
        match kd {
            None => self.ce / n,
            Some(k) => k.mix().loss(self.ce / n, self.kd_mean().unwrap_or(0.0)),
        }
    }
}

fn hidden_at(model: &Model, mb: &MicroBatch) -> Result<Tensor> {
    gather(&model.forward(&mb.ids, 0, &[], None)?, mb)
}

/// [`Model::forward`] (no cache, from position 0) with each layer's graph dropped as soon as
/// the layer is done: the same numbers, no gradient, one layer's activations alive at a time.
fn untracked_forward(model: &Model, ids: &Tensor) -> Result<Tensor> {
    let mut x = model.embed(ids)?.detach();
    for i in 0..model.config().num_hidden_layers {
        x = model.layer(i, &x)?.detach();
    }
    Ok(model.final_norm(&x)?.detach())
}

/// The loss positions' rows of `h (B, T, C)`: `(N, C)`.
fn gather(h: &Tensor, mb: &MicroBatch) -> Result<Tensor> {
    let (b, t, c) = h.dims3()?;
    Ok(h.reshape((b * t, c))?.index_select(&mb.positions, 0)?)
}

fn narrow_vocab(logits: Tensor, limit: Option<usize>) -> Result<Tensor> {
    Ok(match limit {
        Some(v) if v < logits.dim(1)? => logits.narrow(1, 0, v)?,
        _ => logits,
    })
}

fn scalar(x: &Tensor) -> Result<f64> {
    Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Run one micro-batch forward and backward; add `∂(loss_sum / normalizer)/∂θ` into `grads`.
/// `teacher` is required when the objective has a KD term.
pub fn accumulate(
    student: &Model,
    teacher: Option<&Model>,
    obj: &Objective,
    mb: &MicroBatch,
    normalizer: f64,
    grads: &mut Grads,
) -> Result<LossSums> {
    run(student, teacher, obj, mb, Some((normalizer, grads)), None)
}

/// Loss sums of one micro-batch without gradients (evaluation).
pub fn evaluate(
    student: &Model,
    teacher: Option<&Model>,
    obj: &Objective,
    mb: &MicroBatch,
) -> Result<LossSums> {
    run(student, teacher, obj, mb, None, None)
}

/// The teacher's final hidden states at the loss positions, `(N, C)`: what KD needs from the
/// teacher besides its LM head. Fixed for a fixed batch, so evaluation computes it once.
pub fn teacher_hidden(teacher: &Model, mb: &MicroBatch) -> Result<Tensor> {
    Ok(hidden_at(teacher, mb)?.detach())
}

/// [`evaluate`] with the teacher's hidden states precomputed by [`teacher_hidden`].
pub fn evaluate_cached(
    student: &Model,
    teacher: Option<&Model>,
    obj: &Objective,
    mb: &MicroBatch,
    t_hidden: Option<&Tensor>,
) -> Result<LossSums> {
    run(student, teacher, obj, mb, None, t_hidden)
}

fn run(
    student: &Model,
    teacher: Option<&Model>,
    obj: &Objective,
    mb: &MicroBatch,
    mut backward: Option<(f64, &mut Grads)>,
    cached_t_hidden: Option<&Tensor>,
) -> Result<LossSums> {
    let n = mb.loss_tokens;
    if n == 0 {
        return Ok(LossSums::default()); // nothing to learn from: no gradient, no NaN
    }
    let precomputed = mb.sparse.is_some() || mb.cross.is_some() || mb.sampled.is_some();
    let teacher = match (&obj.kd, teacher) {
        (Some(_), _) if precomputed => None, // targets from the cache or the aligned groups
        // A cross-tokenizer teacher's logits are over another vocabulary: only its groups serve.
        (Some(_), Some(t)) if obj.cross.is_none() => Some(t),
        (Some(_), _) if backward.is_none() => None, // eval without targets: CE only
        (Some(_), _) => {
            return Err(Error::invalid(
                "the KD objective needs a teacher",
                "set `teacher` in the recipe, or use `method = \"sft\"`",
            ));
        }
        (None, _) => None,
    };
    let has_kd = obj.kd.is_some() && (teacher.is_some() || precomputed);
    let layered = if obj.checkpoint_layers && backward.is_some() {
        Some(Layered::forward(student, &mb.ids)?)
    } else {
        None
    };
    let s_hidden = match &layered {
        Some(l) => gather(&student.final_norm(l.last.as_tensor())?, mb)?, // (N, C)
        None if backward.is_some() => hidden_at(student, mb)?,            // (N, C), tracked
        // Evaluation: no graph is kept (a trainable model's forward would hold every layer's
        // activations until the result is dropped, as much memory as a training step).
        None => gather(&untracked_forward(student, &mb.ids)?, mb)?,
    };
    let t_hidden = match (teacher, cached_t_hidden) {
        (Some(_), Some(h)) => Some(h.clone()),
        (Some(t), None) => Some(teacher_hidden(t, mb)?), // (N, C)
        (None, _) => None,
    };
    let h = s_hidden.detach();
    let chunk = obj.chunk_rows.max(1);
    let mut sums = LossSums {
        tokens: n,
        kd_tokens: if has_kd { n } else { 0 },
        ..Default::default()
    };
    let mut hidden_grads = Vec::with_capacity(n.div_ceil(chunk));
    let mut start = 0;
    while start < n {
        let len = chunk_len(mb, start, chunk.min(n - start));
        let hv = Var::from_tensor(&h.narrow(0, start, len)?)?; // (n, C) leaf
        let s_logits = narrow_vocab(student.lm_head(hv.as_tensor())?, obj.vocab_limit)?; // (n, V)
        let scale = backward.as_ref().map_or(1.0, |(n, _)| 1.0 / *n);
        let total = chunk_loss(
            obj,
            mb,
            (teacher, t_hidden.as_ref()),
            &s_logits,
            (start, len),
            scale,
            &mut sums,
        )?;
        if let Some((_, grads)) = backward.as_mut() {
            let store = total.backward()?;
            grads.add_store(student.vars(), &store)?;
            let gh = store.get(hv.as_tensor()).cloned().ok_or_else(|| {
                Error::invalid(
                    "the loss has no gradient towards the hidden states",
                    "this is a bug in retort: the LM head must be differentiable",
                )
            })?;
            hidden_grads.push(gh);
        }
        start += len;
    }
    if let Some((_, grads)) = backward {
        let gh = Tensor::cat(&hidden_grads, 0)?.detach(); // (N, C)
        let store = (s_hidden * gh)?.sum_all()?.backward()?;
        grads.add_store(student.vars(), &store)?;
        if let Some(l) = layered {
            l.backward(student, &store, grads)?;
        }
    }
    Ok(sums)
}

/// Rows of the chunk from `start` (at most `len`), ended at a group boundary when the batch has
/// cross-tokenizer groups: a group's rows are in one chunk (its loss couples them). A group
/// longer than the chunk gets a chunk of its own.
fn chunk_len(mb: &MicroBatch, start: usize, len: usize) -> usize {
    let Some(groups) = &mb.cross else { return len };
    let end = start + len;
    match groups
        .iter()
        .find(|g| g.rows.start < end && end < g.rows.end)
    {
        Some(g) if g.rows.start > start => g.rows.start - start,
        Some(g) => g.rows.end - start,
        None => len,
    }
}

/// A forward pass that kept only each decoder layer's input (activation checkpointing).
struct Layered {
    /// The embedding output `(B, T, C)`, tracked when the embedding trains.
    embedded: Tensor,
    /// Layer i's input, detached, `(B, T, C)` each.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf, so the final norm's backward stops at it.
    last: Var,
}

impl Layered {
    fn forward(student: &Model, ids: &Tensor) -> Result<Self> {
        let embedded = student.embed(ids)?;
        let n = student.config().num_hidden_layers;
        let mut inputs = Vec::with_capacity(n);
        let mut x = embedded.detach();
        for i in 0..n {
            let y = student.layer(i, &x)?.detach(); // the layer's graph is dropped here
            inputs.push(x);
            x = y;
        }
        Ok(Self {
            embedded,
            inputs,
            last: Var::from_tensor(&x)?,
        })
    }

    /// From the gradient at the last layer's output (in `store`), recompute each layer from its
    /// input, last to first, and push the gradient through it into `grads`; then the embedding.
    fn backward(
        self,
        student: &Model,
        store: &candle_core::backprop::GradStore,
        grads: &mut Grads,
    ) -> Result<()> {
        let missing = || {
            Error::invalid(
                "activation checkpointing lost the gradient between two layers",
                "this is a bug in retort; train without train.activation_checkpointing",
            )
        };
        let mut g = store
            .get(self.last.as_tensor())
            .cloned()
            .ok_or_else(missing)?;
        for (i, x) in self.inputs.iter().enumerate().rev() {
            let xv = Var::from_tensor(x)?;
            let y = student.layer(i, xv.as_tensor())?;
            let store = (y * &g)?.sum_all()?.backward()?;
            grads.add_store(student.vars(), &store)?;
            g = store.get(xv.as_tensor()).cloned().ok_or_else(missing)?;
        }
        if self.embedded.track_op() {
            let store = (self.embedded * g)?.sum_all()?.backward()?;
            grads.add_store(student.vars(), &store)?;
        }
        Ok(())
    }
}

/// One chunk of rows `start..start + len`: the student's logits against the targets (and the
/// teacher's logits or the cache's top-k), the loss scaled by `scale` (1 / normalizer when
/// training), its CE and KD sums added to `sums`. The fused one-pass losses on the CPU, the
/// composed ops elsewhere and for the divergences without a fused version.
fn chunk_loss(
    obj: &Objective,
    mb: &MicroBatch,
    (teacher, t_hidden): (Option<&Model>, Option<&Tensor>),
    s_logits: &Tensor,
    (start, len): (usize, usize),
    scale: f64,
    sums: &mut LossSums,
) -> Result<Tensor> {
    let targets = mb.targets.narrow(0, start, len)?;
    if let (Some(_), Some(t_logp)) = (&obj.kd, &mb.sampled) {
        let f = crate::onpolicy::sampled_loss(s_logits, &targets, &t_logp[start..start + len])?;
        sums.ce += f.ce_sum;
        sums.kd += f.kd_sum;
        return Ok((f.loss * scale)?);
    }
    if let (Some(k), Some(groups), Some(cross)) = (&obj.kd, &mb.cross, &obj.cross) {
        let end = start + len;
        let inside: Vec<crate::xtok::loss::Group> = groups
            .iter()
            .filter(|g| g.rows.start >= start && g.rows.end <= end)
            .map(|g| crate::xtok::loss::Group {
                rows: g.rows.start - start..g.rows.end - start,
                teacher: g.teacher.clone(),
            })
            .collect();
        let f = crate::xtok::loss::cross_kd_ce(
            s_logits,
            &targets,
            &inside,
            cross,
            k.temperature,
            k.alpha,
            scale,
        )?;
        sums.ce += f.ce_sum;
        sums.kd += f.kd_sum;
        return Ok(f.loss);
    }
    let fused = match (&obj.kd, t_hidden, teacher) {
        (Some(k), _, _) if mb.sparse.is_some() => {
            let sp = mb.sparse.as_ref().map(|s| s.slice(start, len));
            if !s_logits.device().is_cpu() {
                return Err(Error::invalid(
                    "KD from a logit cache runs on the CPU only for now",
                    "train on the CPU, or give the recipe a live teacher without `cache`",
                ));
            }
            sp.map(|sp| {
                sparse::sparse_kd_ce(
                    s_logits,
                    &sp,
                    &targets,
                    k.divergence,
                    k.temperature,
                    k.alpha,
                    scale,
                )
            })
            .transpose()?
        }
        _ if !s_logits.device().is_cpu() => None,
        (None, _, _) => Some(fused::forward_kl_ce(
            s_logits, None, &targets, 1.0, 0.0, scale,
        )?),
        (Some(k), Some(th), Some(t)) if k.divergence == Divergence::ForwardKl => {
            let t_logits = narrow_vocab(t.lm_head(&th.narrow(0, start, len)?)?, obj.vocab_limit)?;
            Some(fused::forward_kl_ce(
                s_logits,
                Some(&t_logits),
                &targets,
                k.temperature,
                k.alpha,
                scale,
            )?)
        }
        _ => None,
    };
    Ok(if let Some(f) = fused {
        sums.ce += f.ce_sum;
        sums.kd += f.kd_sum;
        f.loss // already scaled by 1 / normalizer
    } else {
        let ce = cross_entropy_sum(s_logits, &targets)?;
        sums.ce += scalar(&ce)?;
        let total = match (&obj.kd, t_hidden, teacher) {
            (Some(k), Some(th), Some(t)) => {
                let t_logits =
                    narrow_vocab(t.lm_head(&th.narrow(0, start, len)?)?, obj.vocab_limit)?;
                let kd = divergence_sum(s_logits, &t_logits, k.divergence, k.temperature)?;
                sums.kd += scalar(&kd)?;
                k.mix().loss_tensors(&ce, &kd)?
            }
            _ => ce,
        };
        (total * scale)?
    })
}
