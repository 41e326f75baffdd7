//! Named weights as read from a file, before they become a [`crate::Model`].
//!
//! Names are always Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), whatever the source
//! format; GGUF names are mapped on load (see [`crate::gguf`]). A tensor is either dense (any float
//! dtype) or still quantized (GGUF blocks), so a quantized teacher can stay quantized for generation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use retort_kernels::frozen_bf16::FrozenBf16;
use retort_kernels::q8_matmul::{self, PackedQ8_0};

/// One stored tensor.
#[derive(Debug, Clone)]
pub enum Stored {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Stored {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Stored::Dense(t) => t.dims().to_vec(),
            Stored::Quantized(q) => q.shape().dims().to_vec(),
        }
    }
}

/// How the linear layers of a loaded model are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Everything dequantized to f32: exact scoring and the only trainable format.
    #[default]
    F32,
    /// Linear layers kept in their GGUF quantization (a quarter of the memory; slower for
    /// batched input on CPU). Embeddings and norms are f32.
    Quantized,
    /// Linear layers (re)quantized to Q8_0 from their f32 values: about a quarter of f32's
    /// memory traffic, and SIMD kernels cover Q8_0 (retort's own [`q8_matmul`] on AVX-512 VNNI,
    /// candle's elsewhere; candle has none for Q4_1), so it is the fastest format for
    /// token-by-token generation on CPU. Rounding error ≤ max|w|/254 per block of 32.
    Q8_0,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    /// The names the CLI and pipelines use: `f32`, `q8`, `quantized`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "q8" => Ok(Self::Q8_0),
            "quantized" => Ok(Self::Quantized),
            _ => Err(format!(
                "unknown weights `{s}` (expected q8, f32 or quantized)"
            )),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8",
            Self::Quantized => "quantized",
        })
    }
}

/// All tensors of one checkpoint, by Hugging Face name.
#[derive(Debug)]
pub struct Weights {
    pub(crate) source: PathBuf,
    pub(crate) tensors: HashMap<String, Stored>,
    pub(crate) device: Device,
}

impl Weights {
    pub fn new(source: &Path, tensors: HashMap<String, Stored>, device: &Device) -> Self {
        Self {
            source: source.to_path_buf(),
            tensors,
            device: device.clone(),
        }
    }

    /// The file (or directory) the weights came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// All tensors by Hugging Face name.
    pub fn tensors(&self) -> &HashMap<String, Stored> {
        &self.tensors
    }

    fn get(&self, name: &str, dims: &[usize]) -> Result<&Stored> {
        let t = self.tensors.get(name).ok_or_else(|| Error::Weights {
            path: self.source.clone(),
            name: name.to_string(),
            problem: "is missing".into(),
        })?;
        if t.dims() != dims {
            return Err(Error::Weights {
                path: self.source.clone(),
                name: name.to_string(),
                problem: format!("has shape {:?} but the config implies {dims:?}", t.dims()),
            });
        }
        Ok(t)
    }

    /// A dense f32 tensor of the given shape (dequantized if stored quantized).
    pub fn dense(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        Ok(match self.get(name, dims)? {
            Stored::Dense(t) => t.to_dtype(DType::F32)?,
            Stored::Quantized(q) => q.dequantize(&self.device)?,
        })
    }

    /// A linear weight `(out, in)`: quantized if asked and available, else dense f32.
    pub(crate) fn linear(
        &self,
        name: &str,
        dims: &[usize],
        format: WeightFormat,
    ) -> Result<LinearWeight> {
        match (self.get(name, dims)?, format) {
            (Stored::Quantized(q), WeightFormat::Quantized) => Ok(LinearWeight::Quantized {
                w: QMatMul::from_arc(q.clone())?,
                pad_in: 0,
            }),
            (_, WeightFormat::Q8_0)
                if self.device.is_cpu()
                    && q8_matmul::available()
                    && matches!(dims, [n, k] if PackedQ8_0::fits(*n, *k)) =>
            {
                // Our own kernel takes any width that is a multiple of 32: no padding.
                let q = QTensor::quantize(&self.dense(name, dims)?, GgmlDType::Q8_0)?;
                Ok(LinearWeight::PackedQ8(Arc::new(PackedQ8_0::new(&q)?)))
            }
            (_, WeightFormat::Q8_0) if dims.last().is_some_and(|c| c % 32 == 0) => {
                // candle's tiled AVX-512 VNNI kernels need the input width to be a multiple of
                // 256; pad the weight with zero columns (the input gets zeros to match), which
                // costs the extra columns' work but runs the fast kernel.
                let w = self.dense(name, dims)?; // (out, in)
                let (out, inp) = w.dims2()?;
                let pad_in = inp.next_multiple_of(Q8_TILE_K) - inp;
                let w = if pad_in > 0 {
                    Tensor::cat(
                        &[&w, &Tensor::zeros((out, pad_in), DType::F32, &self.device)?],
                        1,
                    )?
                } else {
                    w
                };
                let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
                Ok(LinearWeight::Quantized {
                    w: QMatMul::from_qtensor(q)?,
                    pad_in,
                })
            }
            _ => Ok(LinearWeight::Dense(self.dense(name, dims)?)),
        }
    }
}

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `(out, in)`, any float dtype; f32 for training.
    Dense(Tensor),
    /// Quantized `(out, in + pad_in)`; the input is padded with `pad_in` zeros before the product.
    Quantized { w: QMatMul, pad_in: usize },
    /// Q8_0 `(out, in)` in the layout of retort's own kernel ([`q8_matmul`]), where it runs.
    PackedQ8(Arc<PackedQ8_0>),
    /// A frozen weight packed once for bf16 products on AMX ([`Model::prepack_bf16`]).
    ///
    /// [`Model::prepack_bf16`]: crate::Model::prepack_bf16
    FrozenBf16(Arc<FrozenBf16>),
}

/// Input width granularity of candle's repacked x86 quantized kernels (`QK_K`).
const Q8_TILE_K: usize = 256;
