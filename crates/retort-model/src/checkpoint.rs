//! Loading a model from a GGUF file or a Hugging Face directory, and saving one as a Hugging Face
//! directory that `transformers` and llama.cpp's converter read.
//!
//! A saved directory holds `config.json`, `model.safetensors` (f32, `format = pt`),
//! `tokenizer.json`, `tokenizer_config.json` (with the chat template) and `generation_config.json`.
//! It is written to a temporary sibling and renamed into place, so a crash never leaves half a
//! checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::{Model, SavedTensor};
use crate::tokenizer::Tokenizer;
use crate::weights::{Stored, WeightFormat, Weights};

/// What a model path points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    HfDir,
}

/// Everything read from a model path, before a [`Model`] is built from it.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub kind: SourceKind,
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

/// Read a GGUF file, a Hugging Face model directory, or a PEFT LoRA adapter directory (merged
/// into its base).
pub fn read(path: &Path, device: &Device) -> Result<Checkpoint> {
    if !path.exists() {
        return Err(Error::invalid(
            format!("model path `{}` does not exist", path.display()),
            "pass a .gguf file or a Hugging Face model directory; `scripts/fetch-assets` installs the default teacher under assets/",
        ));
    }
    if path.is_dir()
        && path.join("adapter_config.json").exists()
        && !path.join("config.json").exists()
    {
        read_adapter_dir(path, device)
    } else if path.is_dir() {
        read_hf_dir(path, device)
    } else {
        read_gguf(path, device)
    }
}

/// A PEFT LoRA adapter directory (a LoRA run's stage checkpoints, `model/adapter`, or one `peft`
/// saved): its base model, read as usual, with every update merged into the weight it changes.
/// The tokenizer and configuration are the base's.
fn read_adapter_dir(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let cfg = crate::lora::read_adapter_config(dir)?;
    if cfg.base.is_dir() && cfg.base.join("adapter_config.json").exists() {
        return Err(Error::invalid(
            format!(
                "`{}`: the base model `{}` is itself an adapter",
                dir.display(),
                cfg.base.display()
            ),
            "point base_model_name_or_path at the full base model",
        ));
    }
    let mut ck = read(&cfg.base, device)?;
    let merged = crate::lora::merge_adapter_file(&mut ck.weights.tensors, dir, cfg.scale, device)?;
    tracing::debug!(
        "{}: {merged} LoRA updates merged into {}",
        dir.display(),
        cfg.base.display()
    );
    ck.weights.source = dir.to_path_buf();
    ck.path = dir.to_path_buf();
    Ok(ck)
}

fn read_gguf(path: &Path, device: &Device) -> Result<Checkpoint> {
    let mut g = GgufFile::open(path)?;
    let config = g.config()?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    let weights = g.weights(device)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        kind: SourceKind::Gguf,
        config,
        weights,
        tokenizer,
    })
}

fn read_hf_dir(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(Error::Config {
            path: cfg_path,
            field: "(file)".into(),
            problem: "does not exist".into(),
            hint: "a Hugging Face model directory needs config.json next to its *.safetensors"
                .into(),
        });
    }
    let config = Config::from_hf_json(&cfg_path)?;
    let mut files: Vec<PathBuf> = fs_err::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Weights {
            path: dir.to_path_buf(),
            name: "*.safetensors".into(),
            problem: "is missing: the directory has no weights".into(),
        });
    }
    let mut tensors = HashMap::new();
    for f in &files {
        let bytes = fs_err::read(f)?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::CorruptWeights {
                path: f.clone(),
                format: "safetensors",
                reason: e.to_string(),
            })?;
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, device)?;
            tensors.insert(name, Stored::Dense(t));
        }
    }
    let mut eos = config.eos_token_id.clone();
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let ids = generation_eos(&gen_path)?;
        for id in ids {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let tokenizer = Tokenizer::from_hf_dir(dir, &eos)?;
    let weights = Weights::new(dir, tensors, device);
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        kind: SourceKind::HfDir,
        config,
        weights,
        tokenizer,
    })
}

impl Checkpoint {
    /// A frozen model (teacher or inference).
    pub fn frozen(&self, format: WeightFormat) -> Result<Model> {
        Model::frozen(&self.config, &self.weights, format)
    }

    /// A trainable f32 model (student).
    pub fn trainable(&self) -> Result<Model> {
        Model::trainable(&self.config, &self.weights)
    }

    /// A LoRA student on these weights (frozen f32 base, adapters from `seed`).
    pub fn lora(&self, lora: &crate::lora::LoraConfig, seed: u64) -> Result<Model> {
        Model::with_lora(&self.config, &self.weights, lora, seed)
    }
}

/// Load a frozen model and its tokenizer in one call.
pub fn load(path: &Path, format: WeightFormat, device: &Device) -> Result<(Model, Tokenizer)> {
    let ck = read(path, device)?;
    let model = ck.frozen(format)?;
    Ok((model, ck.tokenizer))
}

/// Save `model` and `tokenizer` as a Hugging Face directory at `dir`, atomically.
/// An existing `dir` is replaced only if `overwrite` is set.
pub fn save_hf(model: &Model, tokenizer: &Tokenizer, dir: &Path, overwrite: bool) -> Result<()> {
    if dir.exists() && !overwrite {
        return Err(Error::invalid(
            format!("`{}` already exists", dir.display()),
            "choose another output directory or remove this one",
        ));
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs_err::create_dir_all(parent)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    fs_err::create_dir_all(&tmp)?;
    let result = write_dir(model, tokenizer, &tmp);
    if let Err(e) = result {
        let _ = fs_err::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        fs_err::rename(dir, &old)?;
        fs_err::rename(&tmp, dir)?;
        fs_err::remove_dir_all(&old)?;
    } else {
        fs_err::rename(&tmp, dir)?;
    }
    Ok(())
}

fn write_dir(model: &Model, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let cfg = model.config();
    let config_json =
        serde_json::to_string_pretty(&cfg.to_hf_json()).map_err(std::io::Error::from)?;
    fs_err::write(dir.join("config.json"), config_json)?;
    write_f32_safetensors(&model.saved_tensors()?, &dir.join("model.safetensors"))?;
    tokenizer.save_hf(dir)?;
    let generation = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": tokenizer.stop_ids(),
        "do_sample": false,
    });
    fs_err::write(
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation).map_err(std::io::Error::from)?,
    )?;
    Ok(())
}

/// Write `tensors` as an f32 safetensors file (`format = pt`, names in sorted order as the
/// `safetensors` crate writes them), forming and converting one tensor at a time: the crate's
/// writer needs every value alive at once, which for a LoRA student's merged weights doubled the
/// process's peak memory at the final save.
fn write_f32_safetensors(tensors: &[(String, SavedTensor<'_>)], path: &Path) -> Result<()> {
    use std::io::Write;
    let io_err = |e: std::io::Error| {
        Error::invalid(
            format!("cannot write {}: {e}", path.display()),
            "check free disk space and permissions",
        )
    };
    let mut order: Vec<&(String, SavedTensor<'_>)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, t) in &order {
        let len = t.dims().iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.dims(), "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&header).map_err(std::io::Error::from)?;
    head.resize(head.len().next_multiple_of(8), b' '); // the format's 8-byte alignment
    let file = fs_err::File::create(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io_err)?;
    w.write_all(&head).map_err(io_err)?;
    for (_, t) in order {
        let v = t
            .value()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut bytes = Vec::with_capacity(1 << 18);
        for part in v.chunks(1 << 16) {
            bytes.clear();
            for x in part {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            w.write_all(&bytes).map_err(io_err)?;
        }
    }
    w.into_inner()
        .map_err(|e| io_err(e.into_error()))?
        .sync_all()?;
    Ok(())
}

/// Hex SHA-256 of a checkpoint's weights: `model.safetensors` of an HF directory, or the GGUF or
/// safetensors file itself (the teacher's fingerprint in caches and run manifests).
pub fn weights_sha256(path: &Path) -> Result<String> {
    let file = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    Ok(retort_data::files::sha256_file(&file)?)
}

/// The end-of-sequence ids of a `generation_config.json` (`eos_token_id`: one id, a list, or
/// absent). A file that does not parse, or ids that are not token ids, are errors: ignoring them
/// would stop generation at the wrong token, silently.
fn generation_eos(path: &Path) -> Result<Vec<u32>> {
    let bad = |what: String| {
        Error::invalid(
            format!("{}: {what}", path.display()),
            "fix or delete generation_config.json (it only adds end-of-sequence ids to config.json's)",
        )
    };
    let g: serde_json::Value = serde_json::from_str(&fs_err::read_to_string(path)?)
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    let id = |v: &serde_json::Value| {
        v.as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| bad(format!("`eos_token_id` holds {v}, not a token id")))
    };
    match g.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(a)) => a.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_eos_ids_are_read_or_refused_with_the_file_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("generation_config.json");
        let eos = |text: &str| {
            fs_err::write(&p, text).unwrap();
            generation_eos(&p)
        };
        assert_eq!(eos(r#"{"eos_token_id": 2}"#).unwrap(), [2]);
        assert_eq!(eos(r#"{"eos_token_id": [2, 7]}"#).unwrap(), [2, 7]);
        assert_eq!(eos(r#"{"do_sample": true}"#).unwrap(), Vec::<u32>::new());
        for bad in [
            r#"{"eos_token_id": 2"#,
            r#"{"eos_token_id": "2"}"#,
            r#"{"eos_token_id": [2, -1]}"#,
            r#"{"eos_token_id": 5000000000}"#,
        ] {
            let e = eos(bad).unwrap_err().to_string();
            assert!(
                e.contains("generation_config.json") && e.contains("hint:"),
                "{bad}: {e}"
            );
        }
    }
}
