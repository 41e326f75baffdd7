//! Opening a cache: every shard is checked (size, then sha256) and memory-mapped; samples are
//! found by key, so shuffled and resumed training reads them in any order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::codec::{self, TopK};
use super::manifest::Manifest;
use super::shard::{self, Entry};
use crate::error::{Error, Result};

pub struct Reader {
    pub dir: PathBuf,
    pub manifest: Manifest,
    maps: Vec<Mmap>,
    /// Each shard's entries in file order.
    entries: Vec<Vec<Entry>>,
    index: HashMap<[u8; 16], (usize, Entry)>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("dir", &self.dir)
            .field("samples", &self.index.len())
            .finish()
    }
}

impl Reader {
    /// Open `dir`. With `allow_partial`, an unfinished cache opens too (its finished shards).
    pub fn open(dir: &Path, allow_partial: bool) -> Result<Reader> {
        let manifest = Manifest::read(dir)?;
        let rebuild = rebuild_hint(dir, &manifest.command);
        if !manifest.complete && !allow_partial {
            let done: usize = manifest.shards.iter().map(|s| s.samples).sum();
            return Err(Error::invalid(
                format!(
                    "logit cache `{}` is unfinished: {done} of {} samples labelled",
                    dir.display(),
                    manifest.samples
                ),
                format!(
                    "finish it by running the same command again (it resumes): {}; or give the \
                     recipe a live teacher too (`[teacher] path = …`) to label the rest on the fly",
                    manifest.command
                ),
            ));
        }
        let mut maps = Vec::with_capacity(manifest.shards.len());
        let mut shard_entries = Vec::with_capacity(manifest.shards.len());
        let mut index = HashMap::new();
        for (si, s) in manifest.shards.iter().enumerate() {
            let path = dir.join(&s.file);
            let file = fs_err::File::open(&path).map_err(|e| {
                Error::invalid(format!("logit cache shard missing: {e}"), rebuild.clone())
            })?;
            let len = file.metadata()?.len();
            if len != s.bytes {
                return Err(Error::invalid(
                    format!(
                        "logit cache shard `{}` is truncated or damaged: {len} bytes, the manifest says {}",
                        path.display(),
                        s.bytes
                    ),
                    rebuild.clone(),
                ));
            }
            // SAFETY: the map is read-only; shards are written once to a temp file and renamed
            // into place, never modified afterwards. A concurrent truncation by another process
            // would be caught by the checksum below or fault like any I/O error.
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(file.file()) }?;
            let sum = hex::encode(Sha256::digest(&map[..]));
            if sum != s.sha256 {
                return Err(Error::invalid(
                    format!(
                        "logit cache shard `{}` fails its checksum (sha256 {sum}, the manifest says {})",
                        path.display(),
                        s.sha256
                    ),
                    rebuild.clone(),
                ));
            }
            let entries = shard::parse_index(&map).map_err(|e| {
                Error::invalid(format!("`{}`: {e}", path.display()), rebuild.clone())
            })?;
            for e in &entries {
                index.insert(e.key, (si, *e));
            }
            shard_entries.push(entries);
            maps.push(map);
        }
        Ok(Reader {
            dir: dir.to_path_buf(),
            manifest,
            maps,
            entries: shard_entries,
            index,
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, key: &[u8; 16]) -> bool {
        self.index.contains_key(key)
    }

    /// The teacher targets of the sample with this key, if the cache has it.
    pub fn get(&self, key: &[u8; 16]) -> Result<Option<TopK>> {
        match self.index.get(key) {
            Some(&(si, e)) => Ok(Some(self.decode(si, &e)?)),
            None => Ok(None),
        }
    }

    /// Every sample of shard `si`, in file order.
    pub fn shard_entries(&self, si: usize) -> Result<Vec<(Entry, TopK)>> {
        self.entries[si]
            .iter()
            .map(|e| Ok((*e, self.decode(si, e)?)))
            .collect()
    }

    fn decode(&self, si: usize, e: &Entry) -> Result<TopK> {
        let m = &self.manifest;
        let block = &self.maps[si][e.offset as usize..(e.offset + e.len) as usize];
        let t = codec::decode(
            block,
            e.raw_len as usize,
            m.encoding.codec,
            m.teacher.vocab_size,
            m.k,
            e.tokens as usize,
            e.rows as usize,
            m.format_version,
        )
        .map_err(|err| {
            Error::invalid(
                format!(
                    "logit cache `{}`, {}, sample {}: {err}",
                    self.dir.display(),
                    m.shards[si].file,
                    e.sample
                ),
                rebuild_hint(&self.dir, &m.command),
            )
        })?;
        Ok(t)
    }

    /// The tokenizer the cache's positions belong to (the teacher's, stored with format 2), for a
    /// student of another tokenizer to align with. Errors name what is missing and how to fix it.
    pub fn teacher_tokenizer(&self) -> Result<retort_model::Tokenizer> {
        let m = &self.manifest;
        let relabel = format!(
            "label again with this retort (format {}): {}",
            super::manifest::FORMAT_VERSION,
            m.command
        );
        if m.format_version < 2 {
            return Err(Error::invalid(
                format!(
                    "logit cache `{}` is format {}, which stores no teacher token offsets: only a \
                     student of the teacher's tokenizer can train from it",
                    self.dir.display(),
                    m.format_version
                ),
                relabel,
            ));
        }
        if !m.offsets {
            return Err(Error::invalid(
                format!(
                    "logit cache `{}` has no teacher token offsets: the teacher's chat template \
                     rewrites answers, so its tokens cannot be aligned with another tokenizer's",
                    self.dir.display()
                ),
                "use a teacher whose template renders answers verbatim (ChatML, Llama 3, Qwen2), \
                 or a student of the teacher's tokenizer",
            ));
        }
        let dir = self.dir.join(
            m.tokenizer
                .as_deref()
                .unwrap_or(super::manifest::TOKENIZER_DIR),
        );
        let tok = retort_model::Tokenizer::from_hf_dir(&dir, &[]).map_err(|e| {
            Error::invalid(
                format!(
                    "logit cache `{}`: the teacher's tokenizer: {e}",
                    self.dir.display()
                ),
                relabel.clone(),
            )
        })?;
        if tok.fingerprint() != m.tokenizer_fingerprint {
            return Err(Error::invalid(
                format!(
                    "logit cache `{}`: `{}` is not the tokenizer the cache was labelled with \
                     (fingerprint {}…, the manifest says {}…)",
                    self.dir.display(),
                    dir.display(),
                    &tok.fingerprint()[..12],
                    &m.tokenizer_fingerprint[..12.min(m.tokenizer_fingerprint.len())]
                ),
                relabel,
            ));
        }
        Ok(tok)
    }

    /// Refuse a cache built with another tokenizer, or (unless `None`) for another data file.
    pub fn check_matches(
        &self,
        tokenizer_fingerprint: &str,
        data_sha256: Option<&str>,
    ) -> Result<()> {
        let m = &self.manifest;
        if m.tokenizer_fingerprint != tokenizer_fingerprint {
            return Err(Error::invalid(
                format!(
                    "logit cache `{}` was labelled with another tokenizer (fingerprint {}…, the student's is {}…)",
                    self.dir.display(),
                    &m.tokenizer_fingerprint[..12.min(m.tokenizer_fingerprint.len())],
                    &tokenizer_fingerprint[..12.min(tokenizer_fingerprint.len())]
                ),
                format!(
                    "for KD across tokenizers set `cross_tokenizer = \"gold\"` (or \"uld\") on \
                     the stage; otherwise label the data again with a teacher that shares the \
                     student's tokenizer: {}",
                    m.command
                ),
            ));
        }
        if let Some(sha) = data_sha256
            && sha != m.dataset.sha256
        {
            return Err(Error::invalid(
                format!(
                    "logit cache `{}` was labelled on another version of the data (`{}`, sha256 {}…; the stage's data has {}…)",
                    self.dir.display(),
                    m.dataset.path.display(),
                    &m.dataset.sha256[..12.min(m.dataset.sha256.len())],
                    &sha[..12.min(sha.len())]
                ),
                format!(
                    "relabel the current data into a new directory: {}; or give the recipe a live \
                     teacher too (`[teacher] path = …`) so samples missing from the cache are labelled on the fly",
                    m.command
                ),
            ));
        }
        Ok(())
    }
}

/// How to rebuild the damaged cache in `dir`: the command recorded at labelling time, with its
/// `--out` pointed at `dir` (the cache may have been moved or copied since).
fn rebuild_hint(dir: &Path, command: &str) -> String {
    let mut words: Vec<String> = command.split(' ').map(str::to_string).collect();
    let target = dir.display().to_string();
    match words.iter().position(|w| w == "--out" || w == "-o") {
        Some(i) if i + 1 < words.len() => words[i + 1] = target.clone(),
        _ => words.extend(["--out".to_string(), target.clone()]),
    }
    format!(
        "delete `{target}` and label again into it: {}",
        words.join(" ")
    )
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn the_rebuild_hint_names_the_cache_where_it_is_now() {
        let h = rebuild_hint(
            Path::new("/data/moved"),
            "retort label --teacher t.gguf --data d.jsonl --out runs/cache --top-k 64",
        );
        assert!(
            h.contains("--out /data/moved --top-k 64") && h.contains("delete `/data/moved`"),
            "{h}"
        );
        assert!(!h.contains("runs/cache"), "{h}");
        let h = rebuild_hint(Path::new("c"), "retort label --teacher t");
        assert!(h.ends_with("retort label --teacher t --out c"), "{h}");
    }
}
