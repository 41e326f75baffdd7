//! Shard files: `shard-NNNNN.bin`, sample blocks followed by their index.
//!
//! ```text
//! magic   b"RTLCSHD1"                               8 bytes
//! blocks  one zstd frame per sample (see codec.rs)
//! index   one 48-byte entry per sample:
//!           key [u8; 16]   sample key (see `sample_key`)
//!           sample u32     index of the sample in the tokenized dataset
//!           tokens u32     T, tokens of the sequence
//!           rows u32       N, positions with teacher targets
//!           raw_len u32    bytes of the block once decompressed
//!           offset u64     block start, from the start of the file
//!           len u64        block bytes
//! footer  index_offset u64, entries u64, b"RTLCEND1"  24 bytes
//! ```
//! All integers little-endian.

use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"RTLCSHD1";
pub const END: &[u8; 8] = b"RTLCEND1";
const ENTRY: usize = 48;
const FOOTER: usize = 24;

/// A sample's identity in the cache: the first 16 bytes of
/// `sha256("retort-cache-key-v1" ‖ ids as u32 LE ‖ loss mask as one byte per token)`.
/// Training looks samples up by key, so any change to tokenization, truncation or masking is a
/// miss rather than a silent misalignment.
pub fn sample_key(ids: &[u32], mask: &[bool]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"retort-cache-key-v1");
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.update(mask.iter().map(|&m| m as u8).collect::<Vec<u8>>());
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: [u8; 16],
    pub sample: u32,
    pub tokens: u32,
    pub rows: u32,
    pub raw_len: u32,
    pub offset: u64,
    pub len: u64,
}

/// Builds one shard in memory.
pub struct ShardBuilder {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl Default for ShardBuilder {
    fn default() -> Self {
        ShardBuilder {
            bytes: MAGIC.to_vec(),
            entries: Vec::new(),
        }
    }
}

impl ShardBuilder {
    pub fn push(&mut self, mut e: Entry, block: &[u8]) {
        e.offset = self.bytes.len() as u64;
        e.len = block.len() as u64;
        self.bytes.extend_from_slice(block);
        self.entries.push(e);
    }

    /// Encode `t` (sample `sample` of the dataset, with `key`) in `codec` and add it.
    pub fn push_topk(
        &mut self,
        key: [u8; 16],
        sample: u32,
        t: &super::codec::TopK,
        codec: super::codec::Codec,
        vocab: usize,
        version: u32,
    ) -> std::io::Result<()> {
        let (block, raw_len) = super::codec::encode(t, codec, vocab, version)?;
        let e = Entry {
            key,
            sample,
            tokens: t.tokens.len() as u32,
            rows: t.rows() as u32,
            raw_len: raw_len as u32,
            offset: 0,
            len: 0,
        };
        self.push(e, &block);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished file's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let index_offset = self.bytes.len() as u64;
        for e in &self.entries {
            self.bytes.extend_from_slice(&e.key);
            for x in [e.sample, e.tokens, e.rows, e.raw_len] {
                self.bytes.extend_from_slice(&x.to_le_bytes());
            }
            self.bytes.extend_from_slice(&e.offset.to_le_bytes());
            self.bytes.extend_from_slice(&e.len.to_le_bytes());
        }
        self.bytes.extend_from_slice(&index_offset.to_le_bytes());
        self.bytes
            .extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(END);
        self.bytes
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Parse the index of a whole shard file; every block must lie inside the file.
pub fn parse_index(b: &[u8]) -> Result<Vec<Entry>, String> {
    if b.len() < MAGIC.len() + FOOTER || &b[..8] != MAGIC || &b[b.len() - 8..] != END {
        return Err("not a retort shard (magic bytes missing: truncated or overwritten)".into());
    }
    let f = b.len() - FOOTER;
    let (index_offset, n) = (u64_at(b, f) as usize, u64_at(b, f + 8) as usize);
    if index_offset.checked_add(n.saturating_mul(ENTRY)) != Some(f) {
        return Err(format!(
            "index of {n} entries at byte {index_offset} does not end at the footer ({f})"
        ));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let at = index_offset + i * ENTRY;
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[at..at + 16]);
        let e = Entry {
            key,
            sample: u32_at(b, at + 16),
            tokens: u32_at(b, at + 20),
            rows: u32_at(b, at + 24),
            raw_len: u32_at(b, at + 28),
            offset: u64_at(b, at + 32),
            len: u64_at(b, at + 40),
        };
        if e.offset < 8 || e.offset.saturating_add(e.len) > index_offset as u64 {
            return Err(format!("entry {i}: block outside the data region"));
        }
        out.push(e);
    }
    Ok(out)
}

pub fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_truncation_is_detected() {
        let mut b = ShardBuilder::default();
        for i in 0..3u32 {
            let e = Entry {
                key: [i as u8; 16],
                sample: i,
                tokens: 10 + i,
                rows: 4,
                raw_len: 99,
                offset: 0,
                len: 0,
            };
            b.push(e, &vec![i as u8; 5 + i as usize]);
        }
        let bytes = b.finish();
        let idx = parse_index(&bytes).unwrap();
        assert_eq!(idx.len(), 3);
        assert_eq!((idx[2].sample, idx[2].tokens, idx[2].len), (2, 12, 7));
        let at = idx[1].offset as usize;
        assert_eq!(&bytes[at..at + 6], &[1u8; 6]);
        assert!(parse_index(&bytes[..bytes.len() - 1]).is_err());
        assert!(parse_index(&bytes[..40]).is_err());
    }

    #[test]
    fn keys_depend_on_ids_and_mask() {
        let a = sample_key(&[1, 2, 3], &[false, true, true]);
        assert_eq!(a, sample_key(&[1, 2, 3], &[false, true, true]));
        assert_ne!(a, sample_key(&[1, 2, 3], &[false, false, true]));
        assert_ne!(a, sample_key(&[1, 2, 4], &[false, true, true]));
    }
}
