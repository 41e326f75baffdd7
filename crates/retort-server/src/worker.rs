//! The model thread: owns the generation model (and, once scoring is asked for, an f32 copy)
//! and runs jobs from a channel; chat jobs waiting together are generated as one batch.

use std::path::PathBuf;
use std::sync::mpsc;

use candle_core::{Device, Tensor};
use retort_model::generation::{Completion, SamplingParams, generate_each, token_logprob};
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};
use tokio::sync::{mpsc as tmpsc, oneshot};

/// Top entries of one prompt position: `(id, logprob, rank)`, the prompt's own token included.
pub type PositionLogprobs = Vec<(u32, f32, usize)>;

pub enum Job {
    Chat {
        prompt: Vec<u32>,
        /// One row per choice.
        params: Vec<SamplingParams>,
        /// `(choice, text piece)` as generated, for streaming.
        stream: Option<tmpsc::UnboundedSender<(usize, String)>>,
        reply: oneshot::Sender<Result<Vec<Completion>, String>>,
    },
    Score {
        ids: Vec<u32>,
        k: usize,
        reply: oneshot::Sender<Result<Vec<Option<PositionLogprobs>>, String>>,
    },
}

pub struct Worker {
    pub gen_model: Model,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    pub score_model: Option<Model>,
    pub max_batch: usize,
}

impl Worker {
    pub fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut chats = Vec::new();
            let mut scores = Vec::new();
            let mut rows = 0;
            let push = |j: Job, chats: &mut Vec<_>, scores: &mut Vec<_>, rows: &mut usize| match j {
                Job::Chat {
                    prompt,
                    params,
                    stream,
                    reply,
                } => {
                    *rows += params.len();
                    chats.push((prompt, params, stream, reply));
                }
                Job::Score { ids, k, reply } => scores.push((ids, k, reply)),
            };
            push(first, &mut chats, &mut scores, &mut rows);
            while rows < self.max_batch {
                match rx.try_recv() {
                    Ok(j) => push(j, &mut chats, &mut scores, &mut rows),
                    Err(_) => break,
                }
            }
            for (ids, k, reply) in scores {
                let _ = reply.send(self.score(&ids, k).map_err(|e| e.to_string()));
            }
            if !chats.is_empty() {
                self.chat(chats);
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn chat(
        &self,
        jobs: Vec<(
            Vec<u32>,
            Vec<SamplingParams>,
            Option<tmpsc::UnboundedSender<(usize, String)>>,
            oneshot::Sender<Result<Vec<Completion>, String>>,
        )>,
    ) {
        let mut prompts = Vec::new();
        let mut params = Vec::new();
        let mut owner = Vec::new(); // row → (job, choice)
        for (j, (prompt, ps, _, _)) in jobs.iter().enumerate() {
            for (c, p) in ps.iter().enumerate() {
                prompts.push(prompt.clone());
                params.push(p.clone());
                owner.push((j, c));
            }
        }
        let out = generate_each(
            &self.gen_model,
            &self.tokenizer,
            &prompts,
            &params,
            |row, piece| {
                let (j, c) = owner[row];
                if let Some(tx) = &jobs[j].2 {
                    let _ = tx.send((c, piece.to_string()));
                }
            },
        );
        match out {
            Ok(completions) => {
                let mut per_job: Vec<Vec<Completion>> = jobs.iter().map(|_| Vec::new()).collect();
                for (row, c) in completions.into_iter().enumerate() {
                    per_job[owner[row].0].push(c);
                }
                for ((_, _, _, reply), cs) in jobs.into_iter().zip(per_job) {
                    let _ = reply.send(Ok(cs));
                }
            }
            Err(e) => {
                for (_, _, _, reply) in jobs {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }

    /// Log-probs of every prompt position under the f32 model: position 0 has none; position
    /// `p` holds the top `k` of `log_softmax(logits[p-1])` and the prompt's own token `ids[p]`.
    fn score(
        &mut self,
        ids: &[u32],
        k: usize,
    ) -> retort_model::Result<Vec<Option<PositionLogprobs>>> {
        if self.score_model.is_none() {
            tracing::info!("loading {} in f32 for scoring", self.path.display());
            let (m, _) = checkpoint::load(&self.path, WeightFormat::F32, &Device::Cpu)?;
            self.score_model = Some(m);
        }
        let Some(model) = self.score_model.as_ref() else {
            return Ok(vec![]);
        };
        let mut out = vec![None];
        if ids.len() < 2 {
            return Ok(out);
        }
        let x = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.logits(&x)?.squeeze(0)?.to_vec2::<f32>()?; // (T-1, V)
        for (p, row) in logits.iter().enumerate() {
            let t = token_logprob(row, ids[p + 1], k.max(1));
            let mut entries: Vec<(u32, f32, usize)> = t
                .top
                .iter()
                .enumerate()
                .map(|(r, &(i, lp))| (i, lp, r + 1))
                .collect();
            if !t.top.iter().any(|&(i, _)| i == t.id) {
                let own = row[t.id as usize];
                let rank = 1 + row.iter().filter(|&&v| v > own).count();
                entries.push((t.id, t.logprob, rank));
            }
            out.push(Some(entries));
        }
        Ok(out)
    }
}
