//! The local backend: a model held in this process, requests answered with continuous batching
//! (one forward pass per step for the whole batch, finished rows replaced by waiting ones; each
//! row keeps its own sampling parameters).

use std::path::Path;

use retort_model::batching::generate_continuous;
use retort_model::generation::{Completion, FinishReason, SamplingParams};
use retort_model::{Model, Tokenizer, WeightFormat, checkpoint};

use crate::error::Result;
use crate::teacher::{Failure, Finish, GenRequest, Generation, Outcome, Teacher, TeacherId};

pub struct LocalTeacher {
    model: Model,
    tokenizer: Tokenizer,
    id: TeacherId,
    /// Rows generated together.
    pub batch_size: usize,
}

impl LocalTeacher {
    /// Load `path` (GGUF or HF directory) with `format` weights.
    pub fn load(path: &Path, format: WeightFormat, batch_size: usize) -> Result<LocalTeacher> {
        let (model, tokenizer) = checkpoint::load(path, format, &candle_core::Device::Cpu)?;
        let fingerprint = retort_distill::setup::weights_sha256(path)?;
        Ok(LocalTeacher {
            model,
            tokenizer,
            id: TeacherId {
                backend: "local".into(),
                model: path.display().to_string(),
                fingerprint,
            },
            batch_size: batch_size.max(1),
        })
    }

    pub fn from_parts(
        model: Model,
        tokenizer: Tokenizer,
        id: TeacherId,
        batch_size: usize,
    ) -> Self {
        LocalTeacher {
            model,
            tokenizer,
            id,
            batch_size: batch_size.max(1),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The prompt ids and sampling parameters of `rows` (request index, choice).
    fn prepare(
        &self,
        requests: &[GenRequest],
        rows: &[(usize, usize)],
    ) -> std::result::Result<(Vec<Vec<u32>>, Vec<SamplingParams>), String> {
        let mut prompts = Vec::with_capacity(rows.len());
        let mut params = Vec::with_capacity(rows.len());
        for &(i, j) in rows {
            let r = &requests[i];
            let ids = match &r.prefill {
                Some(p) => self.tokenizer.encode_prompt_prefilled(&r.messages, p),
                None => self.tokenizer.encode_prompt(&r.messages),
            };
            prompts.push(ids.map_err(|e| e.to_string())?);
            params.push(SamplingParams {
                max_new_tokens: r.sampling.max_tokens,
                temperature: r.sampling.temperature,
                top_p: r.sampling.top_p,
                seed: r.sampling.seed.wrapping_add(j as u64),
                stop: r.sampling.stop.clone(),
                logprobs: None,
                repeat_penalty: r.sampling.repeat_penalty as f32,
                ..SamplingParams::default()
            });
        }
        Ok((prompts, params))
    }
}

fn generation(c: Completion) -> Generation {
    Generation {
        completion_tokens: c.ids.len(),
        prompt_tokens: c.prompt_tokens,
        text: c.text,
        finish: match c.finish_reason {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
        },
    }
}

impl Teacher for LocalTeacher {
    fn id(&self) -> &TeacherId {
        &self.id
    }

    fn generate(&self, requests: &[GenRequest], on_done: &mut dyn FnMut(usize, Outcome)) {
        // Rows = (request, choice), decoded with continuous batching: `batch_size` rows at a
        // time, a finished row's slot taken by the next one. A request is reported once all its
        // choices are done, its choices in order.
        let rows: Vec<(usize, usize)> = requests
            .iter()
            .enumerate()
            .flat_map(|(i, r)| (0..r.sampling.n.max(1)).map(move |j| (i, j)))
            .collect();
        let mut pending: Vec<Vec<Option<Generation>>> = requests
            .iter()
            .map(|r| vec![None; r.sampling.n.max(1)])
            .collect();
        let mut reported = vec![false; requests.len()];
        let result = self.prepare(requests, &rows).and_then(|(prompts, params)| {
            generate_continuous(
                &self.model,
                &self.tokenizer,
                &prompts,
                &params,
                self.batch_size,
                |_, _| {},
                |k, c| {
                    let (i, j) = rows[k];
                    pending[i][j] = Some(generation(c));
                    if pending[i].iter().all(Option::is_some) {
                        reported[i] = true;
                        on_done(i, Ok(pending[i].drain(..).flatten().collect()));
                    }
                },
            )
            .map_err(|e| e.to_string())
        });
        if let Err(reason) = result {
            for (i, done) in reported.iter().enumerate() {
                if !done {
                    on_done(
                        i,
                        Err(Failure {
                            reason: reason.clone(),
                            attempts: 1,
                        }),
                    );
                }
            }
        }
    }
}
