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
    pub fn load(
        path: &Path,
        format: WeightFormat,
        batch_size: usize,
        device: &candle_core::Device,
    ) -> Result<LocalTeacher> {
        let (model, tokenizer) = checkpoint::load(path, format, device)?;
        let fingerprint = retort_model::checkpoint::weights_sha256(path)?;
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

    /// The prompt ids and sampling parameters of choice `j` of `request`.
    fn prepare(
        &self,
        request: &GenRequest,
        j: usize,
    ) -> std::result::Result<(Vec<u32>, SamplingParams), String> {
        let ids = match &request.prefill {
            Some(p) => self.tokenizer.encode_prompt_prefilled(&request.messages, p),
            None => self.tokenizer.encode_prompt(&request.messages),
        };
        let ids = ids.map_err(|e| e.to_string())?;
        let context = self.model.config().max_position_embeddings;
        if ids.len() >= context {
            return Err(format!(
                "the prompt has {} tokens; the teacher's context is {context} tokens, which \
                 leaves no room for an answer (shorten the input or its template)",
                ids.len()
            ));
        }
        let s = &request.sampling;
        Ok((
            ids,
            SamplingParams {
                max_new_tokens: s.max_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                seed: s.seed.wrapping_add(j as u64),
                stop: s.stop.clone(),
                logprobs: None,
                repeat_penalty: s.repeat_penalty as f32,
                ..SamplingParams::default()
            },
        ))
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
        // choices are done, its choices in order; one whose prompt cannot be built fails alone.
        let fail = |reason: String| Failure {
            reason,
            attempts: 1,
        };
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let (mut prompts, mut params) = (Vec::new(), Vec::new());
        let mut reported = vec![false; requests.len()];
        for (i, r) in requests.iter().enumerate() {
            let built: std::result::Result<Vec<_>, String> = (0..r.sampling.n.max(1))
                .map(|j| self.prepare(r, j))
                .collect();
            match built {
                Ok(choices) => {
                    for (j, (p, sp)) in choices.into_iter().enumerate() {
                        rows.push((i, j));
                        prompts.push(p);
                        params.push(sp);
                    }
                }
                Err(reason) => {
                    reported[i] = true;
                    on_done(i, Err(fail(reason)));
                }
            }
        }
        let mut pending: Vec<Vec<Option<Generation>>> = requests
            .iter()
            .map(|r| vec![None; r.sampling.n.max(1)])
            .collect();
        let result = generate_continuous(
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
        );
        if let Err(e) = result {
            // The model failed mid-run: every request not yet answered fails with its reason.
            for (i, done) in reported.iter().enumerate() {
                if !done {
                    on_done(i, Err(fail(e.to_string())));
                }
            }
        }
    }
}
