//! `manifest.json`: everything a reader needs to trust and decode a cache, human-readable.
//! Written atomically (temp file, then rename) after every finished shard.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec::Codec;
use crate::batch::Truncation;
use crate::error::{Error, Result};
use retort_data::files::write_atomic;
use retort_kernels::MatmulPrecision;

/// Bumped on any change a reader of the previous version would misread. Version 2 adds to every
/// sample the teacher's label log-probs and its turns' byte offsets, and the teacher's tokenizer
/// files to the directory ([`TOKENIZER_DIR`]): a cache any student can train from.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this retort reads.
pub const OLDEST_VERSION: u32 = 1;
/// The directory (inside the cache) of the teacher's `tokenizer.json` and `tokenizer_config.json`.
pub const TOKENIZER_DIR: &str = "tokenizer";
pub const FORMAT_NAME: &str = "retort-logit-cache";
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    pub path: PathBuf,
    /// sha256 of the weights file (`model.safetensors` for an HF dir).
    pub sha256: String,
    pub arch: String,
    /// Columns of the teacher's logits (ids are `< vocab_size`).
    pub vocab_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub path: PathBuf,
    /// sha256 of the data file's bytes (as `retort data inspect` prints).
    pub sha256: String,
    pub format: String,
    pub records: usize,
    pub max_len: usize,
    pub truncation: Truncation,
}

/// What the stored numbers are, spelled out for other tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encoding {
    pub codec: Codec,
    /// Integer type of token ids and positions in the block (`u16` or `u32`).
    pub ids: String,
    pub logp: String,
    pub log_tail: String,
    pub values: String,
    pub compression: String,
}

impl Encoding {
    pub fn new(codec: Codec, vocab: usize) -> Encoding {
        let ids = if codec == Codec::Q8 && vocab <= 1 << 16 {
            "u16"
        } else {
            "u32"
        };
        let (logp, log_tail) = match codec {
            Codec::F32 => ("f32".into(), "f32".into()),
            Codec::Q8 => (
                format!(
                    "f16 top-1, then u8 gaps of {} nat below it, delta-coded",
                    super::codec::Q8_STEP
                ),
                "f16".into(),
            ),
        };
        Encoding {
            codec,
            ids: ids.into(),
            logp,
            log_tail,
            values: "log_softmax(teacher_logits / temperature) at the top-k ids, by descending \
                     value; log_tail = log(1 - sum of the top-k probabilities)"
                .into(),
            compression: "one zstd frame per sample".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// Dataset samples `first_sample .. first_sample + samples` (after tokenization).
    pub first_sample: usize,
    pub samples: usize,
    pub positions: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub created_by: String,
    /// The command that builds (or resumes) this cache; guards print it as the fix.
    pub command: String,
    pub teacher: TeacherInfo,
    pub tokenizer_fingerprint: String,
    /// Format 2: the directory (inside the cache) holding the tokenizer the positions belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Format 2: every sample stores its turns' teacher token offsets (false when the teacher's
    /// chat template rewrites answers, so only students of the same tokenizer can use it).
    #[serde(default)]
    pub offsets: bool,
    pub dataset: DatasetInfo,
    pub k: usize,
    pub temperature: f64,
    /// Entries (after the first) below this probability were moved into the tail (0 = none).
    #[serde(default)]
    pub min_prob: f64,
    pub encoding: Encoding,
    /// Products of the (local) teacher's matmuls; caches written before this field: f32.
    #[serde(default)]
    pub matmul: MatmulPrecision,
    /// Samples per shard.
    pub shard_samples: usize,
    /// Samples the dataset has after tokenization and truncation.
    pub samples: usize,
    pub shards: Vec<ShardInfo>,
    /// True once every sample is in a shard.
    pub complete: bool,
}

impl Manifest {
    /// The settings that must match for `retort label` to resume into an existing cache.
    pub fn same_settings(&self, o: &Manifest) -> std::result::Result<(), String> {
        let checks: [(&str, String, String); 11] = [
            (
                "format_version",
                self.format_version.to_string(),
                o.format_version.to_string(),
            ),
            (
                "min_prob",
                self.min_prob.to_string(),
                o.min_prob.to_string(),
            ),
            (
                "teacher",
                self.teacher.sha256.clone(),
                o.teacher.sha256.clone(),
            ),
            (
                "tokenizer",
                self.tokenizer_fingerprint.clone(),
                o.tokenizer_fingerprint.clone(),
            ),
            (
                "dataset",
                self.dataset.sha256.clone(),
                o.dataset.sha256.clone(),
            ),
            (
                "max_len",
                self.dataset.max_len.to_string(),
                o.dataset.max_len.to_string(),
            ),
            ("k", self.k.to_string(), o.k.to_string()),
            (
                "temperature",
                self.temperature.to_string(),
                o.temperature.to_string(),
            ),
            (
                "codec",
                self.encoding.codec.to_string(),
                o.encoding.codec.to_string(),
            ),
            (
                "matmul",
                format!("{:?}", self.matmul).to_lowercase(),
                format!("{:?}", o.matmul).to_lowercase(),
            ),
            (
                "shard_samples",
                self.shard_samples.to_string(),
                o.shard_samples.to_string(),
            ),
        ];
        for (what, a, b) in checks {
            if a != b {
                return Err(format!("{what} differs (cache: {a}, now: {b})"));
            }
        }
        Ok(())
    }

    /// Whether a student of another tokenizer can train from this cache (format 2 with offsets).
    pub fn serves_any_tokenizer(&self) -> bool {
        self.format_version >= 2 && self.offsets && self.tokenizer.is_some()
    }

    pub fn positions(&self) -> usize {
        self.shards.iter().map(|s| s.positions).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = fs_err::read_to_string(&path).map_err(|e| {
            Error::invalid(
                format!("`{}` is not a logit cache: {e}", dir.display()),
                "build one with `retort label --teacher MODEL --data DATA --out DIR`",
            )
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::invalid(
                format!("`{}`: {e}", path.display()),
                "the manifest is damaged; rebuild the cache with `retort label` into a new directory",
            )
        })?;
        if m.format != FORMAT_NAME || !(OLDEST_VERSION..=FORMAT_VERSION).contains(&m.format_version)
        {
            let hint = if m.format == FORMAT_NAME && m.format_version > FORMAT_VERSION {
                format!(
                    "the cache was written by a newer retort ({}); use that version, or rebuild \
                     the cache with this one: {}",
                    m.created_by, m.command
                )
            } else {
                format!("rebuild the cache: {}", m.command)
            };
            return Err(Error::invalid(
                format!(
                    "`{}`: format {} version {}; this retort reads {FORMAT_NAME} versions \
                     {OLDEST_VERSION} to {FORMAT_VERSION}",
                    path.display(),
                    m.format,
                    m.format_version
                ),
                hint,
            ));
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid(e.to_string(), "this is a bug in retort"))?;
        Ok(write_atomic(&dir.join(MANIFEST), text.as_bytes())?)
    }
}
