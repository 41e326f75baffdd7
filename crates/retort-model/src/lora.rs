//! LoRA students (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the
//! base weights stay frozen and each targeted linear layer learns a low-rank update,
//!
//! ```text
//! y = x·Wᵀ + b + (α / r)·(x·Aᵀ)·Bᵀ        W (out, in) frozen, A (r, in), B (out, r) trained
//! ```
//!
//! PEFT's conventions throughout, so an adapter trained here loads in `peft` and the other way
//! round: A is Kaiming-uniform (`a = √5`, bound `1/√in`), B is zero (so at step 0 the model *is*
//! the base, exactly); the parameters are named `<module>.lora_A.weight` / `lora_B.weight`; an
//! adapter is saved as `adapter_config.json` + `adapter_model.safetensors` with names prefixed
//! `base_model.model.` ([`save_adapter`]); merging writes `W + (α/r)·B·A` into an ordinary
//! Hugging Face checkpoint (`Model::named_tensors` of a LoRA model returns merged weights).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Model;

/// The `[student] lora` table of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank r of the update (1 ≤ r ≤ the smaller side of every targeted weight).
    pub rank: usize,
    /// The update is scaled by `alpha / rank` (PEFT's `lora_alpha`).
    pub alpha: f64,
    /// Dropout on the adapter's input. Only 0 (PEFT's default) is implemented: a seeded mask
    /// that survives resume bit for bit is not written yet, and a silent no-op would mislead.
    pub dropout: f64,
    /// The linear layers that get an adapter (PEFT's `target_modules` names).
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// Range checks that need no model; `Err((field, problem, hint))`.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String, String)> {
        if self.rank == 0 || self.rank > 4096 {
            return Err((
                "rank",
                format!("is {}", self.rank),
                "use a rank from 1 to 4096 (8–64 is usual)".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= 1e6) {
            return Err((
                "alpha",
                format!("is {}", self.alpha),
                "use a positive number (often 2 × rank)".into(),
            ));
        }
        if self.dropout != 0.0 {
            return Err((
                "dropout",
                format!("is {}", self.dropout),
                "LoRA dropout is not implemented; set 0 (PEFT's default)".into(),
            ));
        }
        if self.targets.is_empty() {
            return Err((
                "targets",
                "is empty".into(),
                "name at least one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    .into(),
            ));
        }
        let mut seen = self.targets.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.targets.len() {
            return Err((
                "targets",
                "names a layer twice".into(),
                "list each target once".into(),
            ));
        }
        Ok(())
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// A linear layer of the decoder that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// PEFT's `target_modules` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The target a Hugging Face module name (`model.layers.3.mlp.up_proj`) ends with.
    pub fn of_module(module: &str) -> Option<LoraTarget> {
        let last = module.rsplit('.').next()?;
        Self::ALL.into_iter().find(|t| t.name() == last)
    }
}

/// One layer's trained update, `A (r, in)` and `B (out, r)`, applied as `scale·(x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Adapter {
    /// PEFT's initialisation: `A ~ U(−1/√in, 1/√in)` (Kaiming-uniform with `a = √5`), `B = 0`.
    pub fn init(
        rng: &mut StdRng,
        out: usize,
        inp: usize,
        cfg: &LoraConfig,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..cfg.rank * inp)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (cfg.rank, inp), dev)?;
        let b = Tensor::zeros((out, cfg.rank), DType::F32, dev)?;
        Ok((a, b))
    }

    /// `x2 (rows, in) → (rows, out)`: the update's contribution. Scaled at rank width, so that
    /// autograd keeps one (rows, out) tensor per adapter instead of two.
    pub fn delta(&self, x2: &Tensor) -> Result<Tensor> {
        let h = (x2.matmul(&self.a.t()?)? * self.scale)?; // (rows, r)
        Ok(h.matmul(&self.b.t()?)?) // (rows, out)
    }

    /// `scale·B·A (out, in)`: what merging adds to the base weight.
    pub fn weight_delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// A seeded generator for adapter initialisation (one per model, consumed in layer order).
pub(crate) fn init_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Prefix PEFT puts before the Hugging Face names in `adapter_model.safetensors`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Write `model`'s adapter as a PEFT directory (`adapter_config.json`,
/// `adapter_model.safetensors`, f32) into an existing directory `dir`. `base` is recorded as
/// `base_model_name_or_path`, made absolute when it exists (so the adapter reads back from any
/// working directory).
pub fn save_adapter(model: &Model, base: &Path, dir: &Path) -> Result<()> {
    let cfg = model.lora().ok_or_else(|| {
        Error::invalid(
            "this model has no LoRA adapter to save",
            "set [student] lora in the recipe to train one",
        )
    })?;
    let tensors: Vec<(String, Tensor)> = model
        .vars()
        .iter()
        .map(|(n, v)| Ok((format!("{PEFT_PREFIX}{n}"), v.as_tensor().contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors,
        Some(metadata),
        &dir.join("adapter_model.safetensors"),
    )
    .map_err(|e| {
        Error::invalid(
            format!("cannot write adapter_model.safetensors: {e}"),
            "check free disk space and permissions",
        )
    })?;
    let targets: Vec<&str> = cfg.targets.iter().map(|t| t.name()).collect();
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": std::fs::canonicalize(base)
            .unwrap_or_else(|_| base.to_path_buf())
            .display()
            .to_string(),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&json).map_err(std::io::Error::from)?;
    retort_data::files::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    Ok(())
}

/// Set `model`'s adapter from a PEFT directory written by [`save_adapter`] (or by `peft` for the
/// same base, rank and targets). Every adapter tensor of the model must be present with its shape.
pub fn load_adapter(model: &Model, dir: &Path) -> Result<()> {
    let path: PathBuf = dir.join("adapter_model.safetensors");
    let bytes = fs_err::read(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::CorruptWeights {
        path: path.clone(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    for (name, var) in model.vars() {
        let key = format!("{PEFT_PREFIX}{name}");
        let view = st.tensor(&key).map_err(|_| Error::Weights {
            path: path.clone(),
            name: key.clone(),
            problem: "is missing (an adapter of another rank, targets or base?)".into(),
        })?;
        let t = candle_core::safetensors::Load::load(&view, model.device())?;
        if t.dims() != var.dims() {
            return Err(Error::Weights {
                path: path.clone(),
                name: key,
                problem: format!(
                    "has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// A PEFT LoRA directory's `adapter_config.json`, as far as merging needs it.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// The base model (`base_model_name_or_path`), resolved: absolute, relative to the working
    /// directory (as `peft` reads it), or relative to the adapter's directory.
    pub base: PathBuf,
    /// `lora_alpha / r` (`lora_alpha / √r` with `use_rslora`).
    pub scale: f64,
}

/// Read `dir/adapter_config.json`. Only plain LoRA is merged: DoRA and `fan_in_fan_out` are
/// refused, naming the field.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join("adapter_config.json");
    let text = fs_err::read_to_string(&path)?;
    let bad =
        |what: String, hint: &str| Error::invalid(format!("`{}`: {what}", path.display()), hint);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        bad(
            format!("invalid JSON: {e}"),
            "fix the file or save the adapter again",
        )
    })?;
    if v["peft_type"] != "LORA" {
        return Err(bad(
            format!("peft_type is {}, not LORA", v["peft_type"]),
            "retort merges LoRA adapters only",
        ));
    }
    for flag in ["use_dora", "fan_in_fan_out"] {
        if v[flag].as_bool() == Some(true) {
            return Err(bad(
                format!("`{flag}` is true"),
                "retort merges plain LoRA adapters only; merge this one with peft (merge_and_unload) and pass the merged directory",
            ));
        }
    }
    let r = v["r"].as_f64().filter(|r| *r >= 1.0).ok_or_else(|| {
        bad(
            "`r` is missing or below 1".into(),
            "save the adapter again with peft or retort",
        )
    })?;
    let alpha = v["lora_alpha"]
        .as_f64()
        .filter(|a| a.is_finite())
        .ok_or_else(|| {
            bad(
                "`lora_alpha` is missing or not a number".into(),
                "save the adapter again with peft or retort",
            )
        })?;
    let scale = if v["use_rslora"].as_bool() == Some(true) {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    let base_str = v["base_model_name_or_path"].as_str().unwrap_or_default();
    let given = PathBuf::from(base_str);
    // As `peft` resolves it (from the working directory), else from the adapter's directory.
    let base = if given.is_absolute() || given.exists() {
        given
    } else {
        dir.join(given)
    };
    if base_str.is_empty() || !base.exists() {
        return Err(bad(
            format!(
                "the base model `{base_str}` (base_model_name_or_path) is not a local file or directory"
            ),
            "set base_model_name_or_path to the base model's path (a GGUF file or Hugging Face directory; relative paths are from the adapter's directory)",
        ));
    }
    Ok(AdapterConfig { base, scale })
}

/// Add `scale·B·A` of every adapter pair in `dir/adapter_model.safetensors` (PEFT names) into
/// the base weight it updates. Returns how many weights changed. An adapter without its pair,
/// for a weight the base lacks, or of the wrong shape is an error naming the tensor.
pub(crate) fn merge_adapter_file(
    tensors: &mut HashMap<String, crate::weights::Stored>,
    dir: &Path,
    scale: f64,
    device: &Device,
) -> Result<usize> {
    let path = dir.join("adapter_model.safetensors");
    let bytes = fs_err::read(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::CorruptWeights {
        path: path.clone(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    let load = |name: &str| -> Result<Tensor> {
        let view = st.tensor(name).map_err(|_| Error::Weights {
            path: path.clone(),
            name: name.to_string(),
            problem: "is missing (each lora_A needs its lora_B)".into(),
        })?;
        Ok(candle_core::safetensors::Load::load(&view, device)?.to_dtype(DType::F32)?)
    };
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut merged = 0;
    for a_name in names.iter().filter(|n| n.ends_with(".lora_A.weight")) {
        let module = a_name
            .trim_end_matches(".lora_A.weight")
            .trim_start_matches(PEFT_PREFIX);
        let b_name = a_name.replace(".lora_A.weight", ".lora_B.weight");
        let (a, b) = (load(a_name)?, load(&b_name)?);
        let base_name = format!("{module}.weight");
        let Some(stored) = tensors.get(&base_name) else {
            return Err(Error::Weights {
                path: path.clone(),
                name: a_name.clone(),
                problem: format!("updates `{base_name}`, which the base model does not have"),
            });
        };
        let base = match stored {
            crate::weights::Stored::Dense(t) => t.to_dtype(DType::F32)?,
            crate::weights::Stored::Quantized(q) => q.dequantize(device)?,
        };
        let delta = (b.matmul(&a)? * scale)?;
        if delta.dims() != base.dims() {
            return Err(Error::Weights {
                path: path.clone(),
                name: a_name.clone(),
                problem: format!(
                    "B·A has shape {:?}, the base weight `{base_name}` {:?}",
                    delta.dims(),
                    base.dims()
                ),
            });
        }
        tensors.insert(base_name, crate::weights::Stored::Dense((base + delta)?));
        merged += 1;
    }
    if merged == 0 {
        return Err(Error::Weights {
            path,
            name: "*.lora_A.weight".into(),
            problem: "none found: the file holds no LoRA adapter".into(),
        });
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_field_and_refuses_what_is_not_implemented() {
        assert!(LoraConfig::default().check().is_ok());
        let bad = |f: fn(&mut LoraConfig)| {
            let mut c = LoraConfig::default();
            f(&mut c);
            c.check().unwrap_err().0
        };
        assert_eq!(bad(|c| c.rank = 0), "rank");
        assert_eq!(bad(|c| c.alpha = f64::NAN), "alpha");
        assert_eq!(bad(|c| c.alpha = -1.0), "alpha");
        assert_eq!(bad(|c| c.dropout = 0.05), "dropout");
        assert_eq!(bad(|c| c.targets.clear()), "targets");
        assert_eq!(
            bad(|c| c.targets = vec![LoraTarget::QProj, LoraTarget::QProj]),
            "targets"
        );
    }

    #[test]
    fn targets_use_peft_names() {
        let c: LoraConfig =
            serde_json::from_str(r#"{"rank": 8, "targets": ["q_proj", "down_proj"]}"#).unwrap();
        assert_eq!(c.targets, [LoraTarget::QProj, LoraTarget::DownProj]);
        assert_eq!(c.scale(), 4.0);
        assert!(serde_json::from_str::<LoraConfig>(r#"{"targets": ["qkv"]}"#).is_err());
        assert_eq!(
            LoraTarget::of_module("model.layers.3.mlp.up_proj"),
            Some(LoraTarget::UpProj)
        );
        assert_eq!(LoraTarget::of_module("lm_head"), None);
    }
}
