//! Gradients of a model's trainable tensors, accumulated across LM-head chunks and micro-batches.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::Result;

/// One optional gradient per trainable tensor, in the order of [`retort_model::Model::vars`].
#[derive(Debug, Default)]
pub struct Grads {
    pub tensors: Vec<Option<Tensor>>,
}

impl Grads {
    pub fn new(n_vars: usize) -> Grads {
        Grads {
            tensors: vec![None; n_vars],
        }
    }

    /// Add every gradient `store` holds for `vars` (summing with what is already there).
    pub fn add_store(&mut self, vars: &[(String, Var)], store: &GradStore) -> Result<()> {
        for (slot, (_, var)) in self.tensors.iter_mut().zip(vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// √(Σ‖g‖²) over all gradients, in f64.
    pub fn global_norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for g in self.tensors.iter().flatten() {
            sq += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sq.sqrt())
    }

    /// Whether no tensor received a gradient (e.g. every position of every micro-batch masked).
    pub fn is_empty(&self) -> bool {
        self.tensors.iter().all(Option::is_none)
    }
}
