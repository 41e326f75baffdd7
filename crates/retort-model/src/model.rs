//! The llama-family decoder (Llama, SmolLM, Qwen2), one implementation for teacher and student.
//!
//! Dimension letters used below:
//! B batch, T new positions in this call, S key positions (cached + new), C hidden size,
//! H query heads, KVH key/value heads, G = H / KVH query heads per key/value head,
//! D head dim, F MLP width, V vocabulary.
//!
//! [`Model::forward`] returns the final-norm hidden states `(B, T, C)` for every position;
//! [`Model::lm_head`] maps any `(…, C)` to logits `(…, V)`, so losses can apply the head only where
//! they take a loss, chunk by chunk.
//!
//! Two execution modes with the same numbers: a *frozen* model uses candle's fused kernels
//! (`rms_norm`, `softmax_last_dim`, `rope`), which carry **no gradient**; a *trainable* model
//! (weights are [`Var`]s) uses compositions of differentiable ops instead. Tests check both agree
//! and that every trainable tensor receives a gradient.

use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor, Var};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::lora::{self, Adapter, LoraConfig, LoraTarget};
use crate::rope::Rope;
use crate::weights::{LinearWeight, WeightFormat, Weights};
use retort_kernels::frozen_bf16::FrozenBf16;
pub use retort_kernels::softmax::attention_mask;
use retort_kernels::{self as kernels, MatmulPrecision, matmul_bf16};

/// From 2 up to this many rows, a dense linear layer multiplies `W · xᵀ` instead of `x · Wᵀ`.
/// Measured on the LM head (`cargo bench -p retort-model --bench model -- linear`, 2 threads):
/// 8 rows 14.1 ms vs 17.9 ms; 1 row equal; 32 rows slower (39.0 vs 29.9 ms).
const SMALL_BATCH_ROWS: usize = 8;

/// A linear layer `y = x Wᵀ + b`, dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Products of a dense weight in bf16 where that runs (see [`MatmulPrecision`]).
    precision: MatmulPrecision,
    /// A LoRA student's trained update on this (frozen) weight.
    lora: Option<Adapter>,
}

impl Linear {
    /// `x (…, in) → (…, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                // Fold leading dims so one GEMM runs against the transposed (strided) weight.
                let dims = x.dims().to_vec();
                let (&inner, lead) = dims.split_last().ok_or_else(|| {
                    Error::invalid("linear layer got a scalar input", "this is a bug in retort")
                })?;
                let (out, _) = w.dims2()?;
                let rows: usize = lead.iter().product();
                let x2 = x.reshape((rows, inner))?;
                let y = if rows > SMALL_BATCH_ROWS
                    && x.device().is_cpu()
                    && self.precision.bf16_runs_here()
                {
                    matmul_bf16(&x2, &w.t()?)? // (rows, out), bf16 products
                } else if (2..=SMALL_BATCH_ROWS).contains(&rows) {
                    // Few rows (decoding): W (out, in) · xᵀ keeps the big weight as the
                    // contiguous left operand, which gemm streams without repacking it.
                    w.matmul(&x2.t()?)?.t()?.contiguous()? // (rows, out)
                } else {
                    x2.matmul(&w.t()?)? // (rows, out)
                };
                let mut out_dims = lead.to_vec();
                out_dims.push(out);
                y.reshape(out_dims)?
            }
            LinearWeight::Quantized { w, pad_in } => {
                let x = if *pad_in > 0 {
                    let mut zeros_dims = x.dims().to_vec();
                    if let Some(last) = zeros_dims.last_mut() {
                        *last = *pad_in;
                    }
                    Tensor::cat(
                        &[x, &Tensor::zeros(zeros_dims, x.dtype(), x.device())?],
                        D::Minus1,
                    )?
                } else {
                    x.contiguous()?
                };
                w.forward(&x)?
            }
            LinearWeight::PackedQ8(w) => x.contiguous()?.apply_op1_no_bwd(w.as_ref())?,
            LinearWeight::FrozenBf16(w) => x.contiguous()?.apply_op1_no_bwd(w.as_ref())?,
        };
        let y = match &self.lora {
            // (…, in) → (rows, in) → (rows, out) → (…, out)
            Some(ad) => (&y + ad.delta(&x.flatten_to(D::Minus2)?)?.reshape(y.shape())?)?,
            None => y,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The dense weight as a checkpoint stores it: with a LoRA update merged in
    /// (`W + (α/r)·B·A`) when it is asked for.
    fn saved_weight(&self) -> Option<SavedTensor<'_>> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(SavedTensor(match &self.lora {
                Some(adapter) => Saved::Merged { base: w, adapter },
                None => Saved::Ready(w.clone()),
            })),
            LinearWeight::Quantized { .. }
            | LinearWeight::PackedQ8(_)
            | LinearWeight::FrozenBf16(_) => None,
        }
    }
}

/// A tensor a checkpoint stores, formed when its value is asked for: a LoRA student's merged
/// weights exist one at a time while a checkpoint is written instead of all at once.
pub struct SavedTensor<'a>(Saved<'a>);

enum Saved<'a> {
    Ready(Tensor),
    Merged {
        base: &'a Tensor,
        adapter: &'a Adapter,
    },
}

impl SavedTensor<'_> {
    pub fn dims(&self) -> &[usize] {
        match &self.0 {
            Saved::Ready(t) => t.dims(),
            Saved::Merged { base, .. } => base.dims(),
        }
    }

    pub fn value(&self) -> Result<Tensor> {
        match &self.0 {
            Saved::Ready(t) => Ok(t.clone()),
            Saved::Merged { base, adapter } => Ok((*base + adapter.weight_delta()?)?),
        }
    }
}

/// Whether ops must carry gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Fused candle kernels, no backward.
    Frozen,
    /// Differentiable compositions.
    Trainable,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Frozen => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?,
        Mode::Trainable if x.device().is_cpu() => kernels::rms_norm(x, w, eps as f32)?,
        Mode::Trainable => {
            // x · (mean(x²) + eps)^-½ · w, over the last dim.
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_mul(&(ms + eps)?.sqrt()?.recip()?)?
                .broadcast_mul(w)?
        }
    })
}

fn softmax_last(x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Frozen => candle_nn::ops::softmax_last_dim(x)?,
        Mode::Trainable => candle_nn::ops::softmax(x, D::Minus1)?,
    })
}

/// Where a call's queries sit: absolute position of the first, per-row left padding, and the
/// additive mask built from both (devices other than the CPU, whose softmax masks itself).
struct Positions<'a> {
    pos0: usize,
    left_pad: &'a [usize],
    mask: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `x (B, T, C)`, `mask (B|1, 1, T, S)` additive → `(B, T, C)`.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        at: &Positions,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (pos0, left_pad, mask) = (at.pos0, at.left_pad, at.mask.as_ref());
        let (b, t, _c) = x.dims3()?;
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let g = h / kvh;
        // 1. Projections, heads split out: (B, T, H·D) → (B, H, T, D).
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        // 2. Rotary position embedding at absolute positions pos0 .. pos0 + T.
        let q = rope.apply(&q, pos0, mode == Mode::Trainable)?;
        let k = rope.apply(&k, pos0, mode == Mode::Trainable)?;
        // Attention's two products in bf16 as well when the linear layers use bf16 (as PyTorch's
        // autocast does); not with a cache (generation keeps f32).
        let bf16 = self.q_proj.precision.bf16_runs_here() && x.device().is_cpu() && cache.is_none();
        // 3. Append to the cache: k, v (B, KVH, S, D).
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let s = k.dim(2)?;
        // 4. Grouped-query attention without copying K/V: the G query heads that share one K/V
        //    head are stacked along the position axis. (B, H, T, D) → (B, KVH, G·T, D).
        let q = q.reshape((b, kvh, g * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        if t == 1 && mode == Mode::Frozen && q.device().is_cpu() {
            // Decoding: one fused op reads the cache in place and skips each row's padding.
            let y = kernels::decode_attention(&q, &k, &v, scale as f32, left_pad)?; // (B, KVH, G, D)
            return self.o_proj.forward(&y.reshape((b, 1, h * d))?);
        }
        let att = if q.device().is_cpu() {
            // Scale, mask and softmax in one op with its own backward.
            let scores = if bf16 {
                matmul_bf16(&q, &k.t()?)?
            } else {
                q.matmul(&k.t()?)?
            }; // (B, KVH, G·T, S)
            kernels::masked_softmax(&scores, scale as f32, t, pos0, left_pad)?
        } else {
            let att = (q.matmul(&k.t()?)? * scale)?; // (B, KVH, G·T, S)
            let att = match mask {
                Some(m) => att
                    .reshape((b, kvh, g, t, s))?
                    .broadcast_add(&m.unsqueeze(1)?)?
                    .reshape((b, kvh, g * t, s))?,
                None => att,
            };
            softmax_last(&att, mode)?
        };
        let y = if bf16 {
            matmul_bf16(&att, &v)?
        } else {
            att.matmul(&v)? // v may be a strided view of the cache
        }; // (B, KVH, G·T, D)
        // 5. Heads back together: (B, H, T, D) → (B, T, H·D) → (B, T, C).
        let y = y
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        self.o_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// SwiGLU: `down(silu(gate(x)) · up(x))`, `(B, T, C) → (B, T, F) → (B, T, C)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let a = if x.device().is_cpu() {
            kernels::swiglu(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        self.down_proj.forward(&a)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// A llama-family decoder with its LM head.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed_tokens: Tensor, // (V, C)
    layers: Vec<Block>,
    norm: Tensor,    // (C)
    lm_head: Linear, // (V, C); shares embed_tokens when tied
    rope: Rope,
    mode: Mode,
    /// Trainable parameters by Hugging Face name (empty for a frozen model; a LoRA student's
    /// are its adapters, `<module>.lora_A.weight` and `.lora_B.weight`).
    vars: Vec<(String, Var)>,
    /// Set for a LoRA student: its base weights are frozen tensors, its `vars` the adapters.
    lora: Option<LoraConfig>,
    device: Device,
}

impl Model {
    /// Build a frozen model (a teacher) from loaded weights.
    pub fn frozen(cfg: &Config, weights: &Weights, format: WeightFormat) -> Result<Model> {
        Self::build(cfg, weights, format, Mode::Frozen, None)
    }

    /// Build a trainable model (a student): every weight becomes an f32 [`Var`].
    pub fn trainable(cfg: &Config, weights: &Weights) -> Result<Model> {
        Self::build(cfg, weights, WeightFormat::F32, Mode::Trainable, None)
    }

    /// Build a LoRA student ([`crate::lora`]): the weights are frozen f32 tensors, the targeted
    /// linear layers get adapters initialised from `seed` (B = 0: the model starts as the base),
    /// and only the adapters are [`Var`]s. Ops carry gradients (as for [`Model::trainable`]).
    pub fn with_lora(
        cfg: &Config,
        weights: &Weights,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<Model> {
        lora.check().map_err(|(field, problem, hint)| {
            Error::invalid(format!("lora.{field} {problem}"), hint)
        })?;
        Self::build(
            cfg,
            weights,
            WeightFormat::F32,
            Mode::Trainable,
            Some((lora, seed)),
        )
    }

    fn build(
        cfg: &Config,
        w: &Weights,
        format: WeightFormat,
        mode: Mode,
        lora: Option<(&LoraConfig, u64)>,
    ) -> Result<Model> {
        cfg.validate(w.source())?;
        let device = w.device.clone();
        let mut vars = Vec::new();
        // Base weights are Vars only for a full fine-tune; a LoRA student's adapters always are.
        let base_trains = mode == Mode::Trainable && lora.is_none();
        let mut rng = lora::init_rng(lora.map_or(0, |(_, seed)| seed));
        let mut var = |name: &str, t: Tensor, trains: bool| -> Result<Tensor> {
            Ok(if trains {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                vars.push((name.to_string(), v));
                t
            } else {
                t
            })
        };
        let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let embed_name = "model.embed_tokens.weight";
        let embed_tokens = var(embed_name, w.dense(embed_name, &[v, c])?, base_trains)?;

        let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = match (
                mode,
                w.linear(&format!("{name}.weight"), &[out, inp], format)?,
            ) {
                (Mode::Trainable, LinearWeight::Dense(t)) => {
                    LinearWeight::Dense(var(&format!("{name}.weight"), t, base_trains)?)
                }
                (_, lw) => lw,
            };
            let bias = if bias {
                let bname = format!("{name}.bias");
                Some(var(&bname, w.dense(&bname, &[out])?, base_trains)?)
            } else {
                None
            };
            let lora = match lora {
                Some((lc, _))
                    if LoraTarget::of_module(name).is_some_and(|t| lc.targets.contains(&t)) =>
                {
                    if lc.rank > out.min(inp) {
                        return Err(Error::invalid(
                            format!(
                                "lora.rank = {} exceeds the smaller side of `{name}` ({out} × {inp})",
                                lc.rank
                            ),
                            format!("use a rank of at most {}", out.min(inp)),
                        ));
                    }
                    let (a, b) = Adapter::init(&mut rng, out, inp, lc, &device)?;
                    Some(Adapter {
                        a: var(&format!("{name}.lora_A.weight"), a, true)?,
                        b: var(&format!("{name}.lora_B.weight"), b, true)?,
                        scale: lc.scale(),
                    })
                }
                _ => None,
            };
            Ok(Linear {
                weight,
                bias,
                precision: MatmulPrecision::F32,
                lora,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let qkv_bias = cfg.arch.qkv_bias();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = Attention {
                q_proj: linear(&format!("{p}.self_attn.q_proj"), qd, c, qkv_bias)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), kvd, c, qkv_bias)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), kvd, c, qkv_bias)?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), c, qd, false)?,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            };
            let mlp = Mlp {
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), f, c, false)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), f, c, false)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), c, f, false)?,
            };
            layers.push((p, self_attn, mlp));
        }
        let lm_head = if cfg.tie_word_embeddings {
            match format {
                // A quantized tied head reuses the quantized embedding (GGUF stores it once).
                WeightFormat::Quantized | WeightFormat::Q8_0 if mode == Mode::Frozen => Linear {
                    weight: w.linear(embed_name, &[v, c], format)?,
                    bias: None,
                    precision: MatmulPrecision::F32,
                    lora: None,
                },
                _ => Linear {
                    weight: LinearWeight::Dense(embed_tokens.clone()),
                    bias: None,
                    precision: MatmulPrecision::F32,
                    lora: None,
                },
            }
        } else {
            linear("lm_head", v, c, false)?
        };
        // Norm weights last so the closure borrows end above.
        let mut blocks = Vec::with_capacity(layers.len());
        for (p, self_attn, mlp) in layers {
            let n1 = format!("{p}.input_layernorm.weight");
            let n2 = format!("{p}.post_attention_layernorm.weight");
            blocks.push(Block {
                input_layernorm: var(&n1, w.dense(&n1, &[c])?, base_trains)?,
                self_attn,
                post_attention_layernorm: var(&n2, w.dense(&n2, &[c])?, base_trains)?,
                mlp,
            });
        }
        let norm = var(
            "model.norm.weight",
            w.dense("model.norm.weight", &[c])?,
            base_trains,
        )?;
        let rope = Rope::new(
            cfg.head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            &device,
        )?;
        Ok(Model {
            cfg: cfg.clone(),
            embed_tokens,
            layers: blocks,
            norm,
            lm_head,
            rope,
            mode,
            vars,
            lora: lora.map(|(c, _)| c.clone()),
            device,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable parameters by Hugging Face name; empty for a frozen model; a LoRA student's
    /// adapters.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The adapter configuration of a LoRA student.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Run the products of every dense linear layer and of the LM head at `p` (weights and
    /// activations stay f32); with bf16, attention's two products (QKᵀ and PV) too.
    pub fn set_matmul_precision(&mut self, p: MatmulPrecision) {
        for l in self.linears_mut() {
            l.precision = p;
        }
    }

    /// For a frozen model with bf16 products ([`MatmulPrecision::Bf16`]) on a CPU with AMX or
    /// AVX-512 BF16: packs
    /// every dense linear weight and the LM head once into bf16 tiles
    /// ([`kernels::frozen_bf16`]) and drops their f32 copies, so no forward pass re-packs them.
    /// The products are bit for bit those of bf16 precision, which now also runs for inputs of
    /// ≤ 8 rows; the packed layers stay at bf16 whatever `set_matmul_precision` says later, and the
    /// model can no longer be saved. Returns how many weights were packed (0 where
    /// this does not apply).
    pub fn prepack_bf16(&mut self) -> Result<usize> {
        if self.mode != Mode::Frozen || !self.device.is_cpu() || !kernels::bf16_gemm::available() {
            return Ok(0);
        }
        let mut packed = 0;
        for l in self.linears_mut() {
            if l.precision != MatmulPrecision::Bf16 {
                continue;
            }
            if let LinearWeight::Dense(w) = &l.weight {
                l.weight = LinearWeight::FrozenBf16(Arc::new(FrozenBf16::new(w)?));
                packed += 1;
            }
        }
        Ok(packed)
    }

    /// Every linear layer, the LM head last.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|layer| {
                let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
                [
                    &mut a.q_proj,
                    &mut a.k_proj,
                    &mut a.v_proj,
                    &mut a.o_proj,
                    &mut m.gate_proj,
                    &mut m.up_proj,
                    &mut m.down_proj,
                ]
            })
            .chain(std::iter::once(&mut self.lm_head))
    }

    pub fn is_trainable(&self) -> bool {
        self.mode == Mode::Trainable
    }

    /// Final-norm hidden states for every position.
    ///
    /// - `ids (B, T)` u32 token ids;
    /// - `pos0`: absolute position of `ids[:, 0]` (the cache length when decoding);
    /// - `left_pad`: per row, how many leading positions (from position 0) are padding, which no
    ///   query may attend to; empty when no row is padded;
    /// - `cache`: key/value cache to read and extend (generation), or `None`.
    ///
    /// Returns `(B, T, C)`.
    pub fn forward(
        &self,
        ids: &Tensor,
        pos0: usize,
        left_pad: &[usize],
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if pos0 + t > self.cfg.max_position_embeddings {
            return Err(Error::invalid(
                format!(
                    "sequence of {} positions exceeds max_position_embeddings = {}",
                    pos0 + t,
                    self.cfg.max_position_embeddings
                ),
                "shorten the input or lower the generation limit",
            ));
        }
        let mut x = self.embed(ids)?; // (B, T, C)
        // The CPU path masks inside its fused softmax; other devices add this mask.
        let mask = if self.device.is_cpu() {
            None
        } else {
            attention_mask(b, t, pos0, left_pad, &self.device)? // (B|1, 1, T, S)
        };
        let at = Positions {
            pos0,
            left_pad,
            mask,
        };
        for i in 0..self.layers.len() {
            let layer_cache = match cache.as_deref_mut() {
                Some(kc) => Some(kc.layer_mut(i)?),
                None => None,
            };
            x = self.block(i, &x, &at, layer_cache)?;
        }
        self.final_norm(&x) // (B, T, C)
    }

    /// Activation checkpointing's pieces: [`Model::forward`] without a cache and from position 0
    /// is `final_norm(layer(L−1, … layer(0, embed(ids))))`, so a trainer can keep only each
    /// layer's input and recompute the layer in backward. `ids (B, T) → (B, T, C)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Decoder layer `i` on `x (B, T, C)` at positions `0..T`, no padding on the left, no cache.
    pub fn layer(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if i >= self.layers.len() {
            return Err(Error::invalid(
                format!("layer {i} of a {}-layer model", self.layers.len()),
                "this is a bug in retort",
            ));
        }
        let mask = if self.device.is_cpu() {
            None
        } else {
            attention_mask(b, t, 0, &[], &self.device)?
        };
        let at = Positions {
            pos0: 0,
            left_pad: &[],
            mask,
        };
        self.block(i, x, &at, None)
    }

    /// The final RMSNorm, `(…, C) → (…, C)`.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps, self.mode)
    }

    /// One pre-norm block: `x + attn(norm(x))`, then `+ mlp(norm(·))`.
    fn block(
        &self,
        i: usize,
        x: &Tensor,
        at: &Positions,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> Result<Tensor> {
        let layer = &self.layers[i];
        let eps = self.cfg.rms_norm_eps;
        let h = rms_norm(x, &layer.input_layernorm, eps, self.mode)?;
        let a = layer
            .self_attn
            .forward(&h, &self.rope, at, cache, self.mode)?;
        let x = (x + a)?;
        let h = rms_norm(&x, &layer.post_attention_layernorm, eps, self.mode)?;
        Ok((&x + layer.mlp.forward(&h)?)?)
    }

    /// `hidden (…, C) → logits (…, V)`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits for every position, `(B, T) → (B, T, V)`: a convenience for small inputs; losses
    /// should gather the positions they need and call [`Model::lm_head`] on those.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.lm_head(&self.forward(ids, 0, &[], None)?)
    }

    /// Every dense tensor by Hugging Face name, in checkpoint order (a LoRA student's weights
    /// merged). Errors on quantized weights.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.saved_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.value()?)))
            .collect()
    }

    /// [`Model::named_tensors`] with each value formed only when asked for.
    pub fn saved_tensors(&self) -> Result<Vec<(String, SavedTensor<'_>)>> {
        let quantized = || {
            Error::invalid(
                "cannot save a model whose linear layers are quantized or packed for inference",
                "load it with dequantized (f32) weights, without `prepack_bf16`, before saving",
            )
        };
        let ready = |t: &Tensor| SavedTensor(Saved::Ready(t.clone()));
        let dense = |l| Linear::saved_weight(l).ok_or_else(quantized);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            ready(&self.embed_tokens),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                ready(&l.input_layernorm),
            ));
            for (n, lin) in [
                ("self_attn.q_proj", &l.self_attn.q_proj),
                ("self_attn.k_proj", &l.self_attn.k_proj),
                ("self_attn.v_proj", &l.self_attn.v_proj),
                ("self_attn.o_proj", &l.self_attn.o_proj),
                ("mlp.gate_proj", &l.mlp.gate_proj),
                ("mlp.up_proj", &l.mlp.up_proj),
                ("mlp.down_proj", &l.mlp.down_proj),
            ] {
                out.push((format!("{p}.{n}.weight"), dense(lin)?));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{n}.bias"), ready(b)));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                ready(&l.post_attention_layernorm),
            ));
        }
        out.push(("model.norm.weight".to_string(), ready(&self.norm)));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), dense(&self.lm_head)?));
        }
        Ok(out)
    }

    /// Build a [`KvCache`] for `batch` rows and up to `max_len` positions.
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, max_len)
    }

    /// Move a generation cache `by` positions towards 0: the first `by` positions are dropped
    /// and the cached keys rotated back by `by` (RoPE is relative, so attention between the
    /// kept positions is unchanged). Decoding continues at position `len − by`.
    pub fn shift_cache(&self, cache: &mut KvCache, by: usize) -> Result<()> {
        cache.drop_front(by, |k| self.rope.rotate_back(k, by))
    }

    /// Move a generation cache `by` positions away from 0: `by` masked zero positions are
    /// inserted in front and the cached keys rotated forward by `by` (the inverse of
    /// [`Model::shift_cache`]). Decoding continues at position `len + by`.
    pub fn unshift_cache(&self, cache: &mut KvCache, by: usize) -> Result<()> {
        cache.prepend_zeros(by, |k| self.rope.rotate_forward(k, by))
    }

    /// Copy a one-row cache prefilled from position 0 into row `row` of `cache` at positions
    /// `at ..`, its keys rotated forward by `at` (as if it had been prefilled there).
    pub fn place_row(&self, cache: &KvCache, row: usize, src: &KvCache, at: usize) -> Result<()> {
        cache.write_row_at(row, src, at, |k| self.rope.rotate_forward(k, at))
    }

    /// Keep only the given layers (Minitron-style depth pruning): the result has
    /// `keep.len()` layers, copied from this model's layers in the given order.
    pub fn prune_layers(&self, keep: &[usize], source: &Path) -> Result<Model> {
        if keep.is_empty() {
            return Err(Error::invalid(
                "no layers to keep",
                "pass at least one layer index",
            ));
        }
        if let Some(&bad) = keep.iter().find(|&&i| i >= self.layers.len()) {
            return Err(Error::invalid(
                format!(
                    "layer {bad} does not exist in `{}` ({} layers)",
                    source.display(),
                    self.layers.len()
                ),
                format!("use indices 0..{}", self.layers.len()),
            ));
        }
        let mut m = self.clone();
        m.layers = keep.iter().map(|&i| self.layers[i].clone()).collect();
        m.cfg.num_hidden_layers = keep.len();
        m.vars.clear();
        m.lora = None;
        Ok(m)
    }

    /// A trainable copy (every weight an f32 [`Var`]) of a model with dense weights, e.g. a
    /// frozen teacher pruned into a student.
    pub fn to_trainable(&self, source: &Path) -> Result<Model> {
        Model::trainable(&self.cfg, &self.dense_weights(source)?)
    }

    /// A LoRA student ([`Model::with_lora`]) on this model's dense weights (merged ones, if it
    /// carries adapters itself).
    pub fn to_lora(&self, source: &Path, lora: &LoraConfig, seed: u64) -> Result<Model> {
        Model::with_lora(&self.cfg, &self.dense_weights(source)?, lora, seed)
    }

    /// A frozen f32 copy of this model's current weights (a LoRA student's merged), for
    /// inference while it trains: generation from it tracks no gradients. `source` is recorded
    /// as where the weights came from; products are f32 until `set_matmul_precision`.
    pub fn snapshot(&self, source: &Path) -> Result<Model> {
        Model::frozen(&self.cfg, &self.dense_weights(source)?, WeightFormat::F32)
    }

    /// This model's weights as f32 [`Weights`] recorded as coming from `source`.
    fn dense_weights(&self, source: &Path) -> Result<Weights> {
        let tensors = self
            .named_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, crate::weights::Stored::Dense(t.to_dtype(DType::F32)?))))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        Ok(Weights::new(source, tensors, &self.device))
    }
}

/// `n` layer indices out of `total`, evenly spaced, first and last included.
pub fn evenly_spaced_layers(n: usize, total: usize) -> Vec<usize> {
    match n {
        0 => vec![],
        1 => vec![0],
        _ => (0..n)
            .map(|i| (i * (total - 1) + (n - 1) / 2) / (n - 1))
            .collect(),
    }
}
