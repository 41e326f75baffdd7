//! How one sample's teacher distributions are laid out in bytes.
//!
//! A sample block holds, for a sequence of `T` tokens and the `N` positions whose next token
//! carries loss, in this order (all little-endian), then compressed as one zstd frame:
//!
//! | part | `f32` codec | `q8` codec |
//! | --- | --- | --- |
//! | tokens `(T)` | u32 | u32 |
//! | positions `(N)` | u32, delta to the previous (first absolute) | same |
//! | entries per row `(N)` | — | u8 if `k ≤ 255` else u16: `c_r ≤ k`, the entries kept (≥ `min_prob`) |
//! | top-k ids | u32 `(N, k)` | `(Σ c_r)` u16 if `vocab ≤ 65536` else u32, byte planes (all low bytes, then the next byte, …) |
//! | top-1 log-prob `(N)` | — | f16 |
//! | top-k log-probs | f32 `(N, k)` | u8 gaps: `g_i = round((lp_0 − lp_i) / step)` saturated at 255, stored as `g_i − g_{i−1}` (`g_0 = 0` not stored: `(Σ (c_r − 1))`) |
//! | log tail mass `(N)` | f32 | f16 |
//! | *format 2:* label log-prob `(N)` | f32 | f16 |
//! | *format 2:* trained turns | u32 count (`u32::MAX`: not stored), then per turn: u32 `n`, u32 `m`, content positions `(n)` u32 delta-coded, byte starts `(n)` u32 as the gap to the previous token's end, byte lengths `(n)` u32, end-of-turn positions `(m)` u32 | same |
//!
//! The label log-prob of row `r` is the teacher's log-prob (at `T_label`) of the token actually at
//! `positions[r] + 1`; with the turns (the teacher's own token positions and byte offsets of each
//! answer's content, [`TurnTokens`]) a student of any tokenizer can align with the rows.
//!
//! Ids are ordered by descending log-prob. `lp` are `log_softmax(z / T_label)` of the teacher
//! logits `z`; the tail is `log(1 − Σ_topk p)`, computed from the logits (not by subtraction),
//! `-inf` when the top-k holds the whole vocabulary. Entries dropped under `min_prob` (their mass
//! added to the tail) end a row as id [`NONE`] with log-prob `-inf`.

use half::f16;
use retort_model::TurnTokens;

/// The id of an entry that is not there (dropped below `min_prob`); always at the end of a row.
pub const NONE: u32 = u32::MAX;

/// Per-sample teacher targets, decoded: `positions (N)`, `ids (N, k)`, `logp (N, k)`,
/// `log_tail (N)`, and in format 2 `label_logp (N)` and the turns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopK {
    pub k: usize,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub ids: Vec<u32>,
    pub logp: Vec<f32>,
    pub log_tail: Vec<f32>,
    /// `(N)` log-prob at the labelling temperature of the token at `positions[r] + 1` (NaN where
    /// a server did not return it); empty in format 1.
    pub label_logp: Vec<f32>,
    /// The trained turns' content tokens with their byte offsets, for a student of another
    /// tokenizer; `None` in format 1, or when the chat template rewrites answers.
    pub turns: Option<Vec<TurnTokens>>,
}

impl TopK {
    pub fn rows(&self) -> usize {
        self.positions.len()
    }
}

/// The byte layout of the top-k values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Reference: u32 ids, f32 log-probs.
    F32,
    /// Compact: u16/u32 ids in byte planes, f16 top-1, u8 log-prob gaps of 1/16 nat, f16 tail.
    Q8,
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Codec::F32),
            "q8" => Ok(Codec::Q8),
            _ => Err(format!("unknown codec `{s}`; expected q8 or f32")),
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::F32 => "f32",
            Codec::Q8 => "q8",
        })
    }
}

/// Quantization step of the `q8` log-prob gaps, in nats.
pub const Q8_STEP: f32 = 1.0 / 16.0;

/// zstd level of sample blocks.
const ZSTD_LEVEL: i32 = 9;

fn id_bytes(vocab: usize) -> usize {
    if vocab <= 1 << 16 { 2 } else { 4 }
}

fn put_u32s(out: &mut Vec<u8>, xs: impl IntoIterator<Item = u32>) {
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Serialize and compress one sample in format `version` (1 or 2): `(block, raw_len)`.
pub fn encode(
    t: &TopK,
    codec: Codec,
    vocab: usize,
    version: u32,
) -> std::io::Result<(Vec<u8>, usize)> {
    let (n, k) = (t.rows(), t.k);
    let mut raw = Vec::with_capacity(t.tokens.len() * 4 + n * (4 + k * 8 + 8));
    put_u32s(&mut raw, t.tokens.iter().copied());
    let mut prev = 0u32;
    put_u32s(
        &mut raw,
        t.positions.iter().map(|&p| {
            let d = p.wrapping_sub(prev);
            prev = p;
            d
        }),
    );
    match codec {
        Codec::F32 => {
            put_u32s(&mut raw, t.ids.iter().copied());
            for x in &t.logp {
                raw.extend_from_slice(&x.to_le_bytes());
            }
            for x in &t.log_tail {
                raw.extend_from_slice(&x.to_le_bytes());
            }
        }
        Codec::Q8 => {
            let count = |r: usize| {
                t.ids[r * k..(r + 1) * k]
                    .iter()
                    .take_while(|&&id| id != NONE)
                    .count()
                    .max(1)
            };
            let counts: Vec<usize> = (0..n).map(count).collect();
            for &c in &counts {
                if k <= 255 {
                    raw.push(c as u8);
                } else {
                    raw.extend_from_slice(&(c as u16).to_le_bytes());
                }
            }
            for plane in 0..id_bytes(vocab) {
                for (r, &c) in counts.iter().enumerate() {
                    raw.extend(
                        t.ids[r * k..r * k + c]
                            .iter()
                            .map(|&id| (id >> (8 * plane)) as u8),
                    );
                }
            }
            for r in 0..n {
                raw.extend_from_slice(&f16::from_f32(t.logp[r * k]).to_le_bytes());
            }
            for (r, &c) in counts.iter().enumerate() {
                let row = &t.logp[r * k..r * k + c];
                let mut prev = 0u8;
                for &lp in &row[1..] {
                    let g = ((row[0] - lp) / Q8_STEP).round().clamp(0.0, 255.0) as u8;
                    let g = g.max(prev); // rows are sorted; guard against rounding ties
                    raw.push(g - prev);
                    prev = g;
                }
            }
            for x in &t.log_tail {
                raw.extend_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
    }
    if version >= 2 {
        encode_teacher_tokens(&mut raw, t, codec)?;
    }
    Ok((zstd::bulk::compress(&raw, ZSTD_LEVEL)?, raw.len()))
}

/// Format 2's label log-probs and turns.
fn encode_teacher_tokens(raw: &mut Vec<u8>, t: &TopK, codec: Codec) -> std::io::Result<()> {
    if t.label_logp.len() != t.rows() {
        return Err(std::io::Error::other(format!(
            "{} label log-probs for {} rows",
            t.label_logp.len(),
            t.rows()
        )));
    }
    for &x in &t.label_logp {
        match codec {
            Codec::F32 => raw.extend_from_slice(&x.to_le_bytes()),
            Codec::Q8 => raw.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
        }
    }
    let Some(turns) = &t.turns else {
        put_u32s(raw, [u32::MAX]);
        return Ok(());
    };
    let narrow = |x: usize| {
        u32::try_from(x).map_err(|_| std::io::Error::other(format!("{x} does not fit in u32")))
    };
    put_u32s(raw, [narrow(turns.len())?]);
    for turn in turns {
        put_u32s(
            raw,
            [
                narrow(turn.positions.len())?,
                narrow(turn.end_positions.len())?,
            ],
        );
        let mut prev = 0;
        for &p in &turn.positions {
            put_u32s(raw, [narrow(p)?.wrapping_sub(prev)]);
            prev = narrow(p)?;
        }
        let mut end = 0u32;
        for &(a, b) in &turn.offsets {
            put_u32s(raw, [narrow(a)?.wrapping_sub(end)]);
            end = narrow(b)?;
        }
        for &(a, b) in &turn.offsets {
            put_u32s(raw, [narrow(b)?.wrapping_sub(narrow(a)?)]);
        }
        for &p in &turn.end_positions {
            put_u32s(raw, [narrow(p)?]);
        }
    }
    Ok(())
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| {
            format!(
                "block ends at byte {} of {} needed",
                self.b.len(),
                self.at + n
            )
        })?;
        self.at += n;
        Ok(s)
    }
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>, String> {
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>, String> {
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn f16s(&mut self, n: usize) -> Result<Vec<f32>, String> {
        Ok(self
            .take(n * 2)?
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect())
    }
}

/// Decompress and decode one sample block of `tokens` tokens and `rows` positions
/// (`raw_len` bytes once decompressed, from the shard index).
#[allow(clippy::too_many_arguments)]
pub fn decode(
    block: &[u8],
    raw_len: usize,
    codec: Codec,
    vocab: usize,
    k: usize,
    tokens: usize,
    rows: usize,
    version: u32,
) -> Result<TopK, String> {
    let raw = zstd::bulk::decompress(block, raw_len).map_err(|e| format!("zstd: {e}"))?;
    let mut c = Cursor { b: &raw, at: 0 };
    let toks = c.u32s(tokens)?;
    let mut prev = 0u32;
    let positions: Vec<u32> = c
        .u32s(rows)?
        .into_iter()
        .map(|d| {
            prev = prev.wrapping_add(d);
            prev
        })
        .collect();
    let nk = rows * k;
    let (ids, logp, log_tail) = match codec {
        Codec::F32 => (c.u32s(nk)?, c.f32s(nk)?, c.f32s(rows)?),
        Codec::Q8 => {
            let counts: Vec<usize> = if k <= 255 {
                c.take(rows)?.iter().map(|&x| x as usize).collect()
            } else {
                c.take(rows * 2)?
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
                    .collect()
            };
            if let Some(&bad) = counts.iter().find(|&&x| x == 0 || x > k) {
                return Err(format!("a row claims {bad} entries (k = {k})"));
            }
            let kept: usize = counts.iter().sum();
            let mut packed = vec![0u32; kept];
            for plane in 0..id_bytes(vocab) {
                for (id, &b) in packed.iter_mut().zip(c.take(kept)?) {
                    *id |= (b as u32) << (8 * plane);
                }
            }
            let top = c.f16s(rows)?;
            let gaps = c.take(kept - rows)?;
            let (mut ids, mut logp) = (vec![NONE; nk], vec![f32::NEG_INFINITY; nk]);
            let (mut at_id, mut at_gap) = (0, 0);
            for (r, (&lp0, &cr)) in top.iter().zip(&counts).enumerate() {
                ids[r * k..r * k + cr].copy_from_slice(&packed[at_id..at_id + cr]);
                at_id += cr;
                logp[r * k] = lp0;
                let mut g = 0u32;
                for i in 1..cr {
                    g += gaps[at_gap] as u32;
                    at_gap += 1;
                    logp[r * k + i] = lp0 - g as f32 * Q8_STEP;
                }
            }
            (ids, logp, c.f16s(rows)?)
        }
    };
    let (label_logp, turns) = if version >= 2 {
        decode_teacher_tokens(&mut c, codec, rows)?
    } else {
        (Vec::new(), None)
    };
    if c.at != raw.len() {
        return Err(format!(
            "{} bytes left over after decoding",
            raw.len() - c.at
        ));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i != NONE && i as usize >= vocab) {
        return Err(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        ));
    }
    Ok(TopK {
        k,
        tokens: toks,
        positions,
        ids,
        logp,
        log_tail,
        label_logp,
        turns,
    })
}

/// Format 2's label log-probs and turns (whose positions index the whole encoded
/// conversation, so they may run past a sample cut at `max_len`).
fn decode_teacher_tokens(
    c: &mut Cursor,
    codec: Codec,
    rows: usize,
) -> Result<(Vec<f32>, Option<Vec<TurnTokens>>), String> {
    let label_logp = match codec {
        Codec::F32 => c.f32s(rows)?,
        Codec::Q8 => c.f16s(rows)?,
    };
    let count = c.u32s(1)?[0];
    if count == u32::MAX {
        return Ok((label_logp, None));
    }
    // Every turn costs at least 8 bytes: a count beyond what is left is damage, not a reason to
    // allocate.
    if count as usize > (c.b.len() - c.at) / 8 {
        return Err(format!(
            "{count} turns claimed in a block of {} bytes",
            c.b.len()
        ));
    }
    let mut turns = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let nm = c.u32s(2)?;
        let (n, m) = (nm[0] as usize, nm[1] as usize);
        let mut p = 0u32;
        let positions: Vec<usize> = c
            .u32s(n)?
            .into_iter()
            .map(|d| {
                p = p.wrapping_add(d);
                p as usize
            })
            .collect();
        let starts = c.u32s(n)?;
        let lens = c.u32s(n)?;
        let mut end = 0u32;
        let offsets = starts
            .iter()
            .zip(&lens)
            .map(|(&gap, &len)| {
                let a = end.wrapping_add(gap);
                end = a.wrapping_add(len);
                (a as usize, end as usize)
            })
            .collect();
        let end_positions: Vec<usize> = c.u32s(m)?.into_iter().map(|x| x as usize).collect();
        turns.push(TurnTokens {
            positions,
            offsets,
            end_positions,
        });
    }
    Ok((label_logp, Some(turns)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(k: usize, vocab: u32) -> TopK {
        let n = 5;
        let mut ids = Vec::new();
        let mut logp = Vec::new();
        for r in 0..n {
            for i in 0..k {
                ids.push((r as u32 * 7919 + i as u32 * 104_729) % vocab);
                logp.push(-0.1 - 0.37 * 8.0 * i as f32 / k as f32 - r as f32 * 0.01);
            }
        }
        TopK {
            k,
            tokens: (0..12).map(|i| i * 1000 % vocab).collect(),
            positions: vec![3, 4, 5, 9, 10],
            ids,
            logp,
            log_tail: vec![-3.0, -4.5, f32::NEG_INFINITY, -20.0, -0.5],
            label_logp: vec![-0.25, -7.5, -0.125, -1.0, f32::NAN],
            turns: Some(vec![
                TurnTokens {
                    // A zero-width token, two byte-fallback pieces of one 3-byte character
                    // (overlapping ranges), and positions past the 12 kept tokens.
                    positions: vec![3, 4, 5, 6, 13],
                    offsets: vec![(0, 0), (0, 3), (0, 3), (3, 9), (9, 70_000)],
                    end_positions: vec![14, 15],
                },
                TurnTokens::default(),
            ]),
        }
    }

    /// Equality with NaN label log-probs compared as bits.
    fn same(a: &TopK, b: &TopK) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        TopK {
            label_logp: vec![],
            ..a.clone()
        } == TopK {
            label_logp: vec![],
            ..b.clone()
        } && bits(&a.label_logp) == bits(&b.label_logp)
    }

    #[test]
    fn format_1_blocks_have_no_teacher_tokens_and_format_2_keeps_them() {
        let t = sample(8, 50_000);
        let (b, n) = encode(&t, Codec::F32, 50_000, 1).unwrap();
        let d = decode(&b, n, Codec::F32, 50_000, 8, 12, 5, 1).unwrap();
        assert!(d.label_logp.is_empty() && d.turns.is_none());
        assert!(same(
            &d,
            &TopK {
                label_logp: vec![],
                turns: None,
                ..t.clone()
            }
        ));
        // A format-2 block read as format 1 has bytes left over: an error, not a misread.
        let (b2, n2) = encode(&t, Codec::F32, 50_000, 2).unwrap();
        assert!(decode(&b2, n2, Codec::F32, 50_000, 8, 12, 5, 1).is_err());
        // Turns not stored round-trip as None.
        let none = TopK {
            turns: None,
            ..t.clone()
        };
        let (b3, n3) = encode(&none, Codec::Q8, 50_000, 2).unwrap();
        let d3 = decode(&b3, n3, Codec::Q8, 50_000, 8, 12, 5, 2).unwrap();
        assert_eq!(d3.turns, None);
        // Format 2 needs a label log-prob per row.
        let short = TopK {
            label_logp: vec![0.0],
            ..t
        };
        assert!(encode(&short, Codec::Q8, 50_000, 2).is_err());
    }

    #[test]
    fn f32_round_trips_exactly() {
        for vocab in [50_000u32, 150_000] {
            let t = sample(8, vocab);
            let (b, n) = encode(&t, Codec::F32, vocab as usize, 2).unwrap();
            let d = decode(&b, n, Codec::F32, vocab as usize, 8, 12, 5, 2).unwrap();
            assert!(same(&d, &t), "{d:?}");
        }
    }

    #[test]
    fn q8_round_trips_ids_exactly_and_log_probs_within_half_a_step() {
        for vocab in [50_000u32, 150_000] {
            let t = sample(8, vocab);
            let (b, n) = encode(&t, Codec::Q8, vocab as usize, 2).unwrap();
            let d = decode(&b, n, Codec::Q8, vocab as usize, 8, 12, 5, 2).unwrap();
            assert_eq!(
                (&d.ids, &d.positions, &d.tokens, &d.turns),
                (&t.ids, &t.positions, &t.tokens, &t.turns)
            );
            // Label log-probs in f16: exact for these values, NaN kept.
            assert_eq!(&d.label_logp[..4], &t.label_logp[..4]);
            assert!(d.label_logp[4].is_nan());
            for (a, b) in d.logp.iter().zip(&t.logp) {
                // f16 top-1 (≤ 2⁻¹¹ relative) plus half a gap step.
                assert!((a - b).abs() <= Q8_STEP / 2.0 + 1e-3, "{a} vs {b}");
            }
            assert_eq!(d.log_tail[2], f32::NEG_INFINITY);
            assert!((d.log_tail[3] + 20.0).abs() < 0.01);
        }
    }

    #[test]
    fn rows_with_dropped_entries_round_trip() {
        for k in [8, 300] {
            let mut t = sample(k, 50_000);
            for r in 0..5 {
                for i in (k - r * (k / 8))..k {
                    t.ids[r * k + i] = NONE;
                    t.logp[r * k + i] = f32::NEG_INFINITY;
                }
            }
            for codec in [Codec::Q8, Codec::F32] {
                let (b, n) = encode(&t, codec, 50_000, 2).unwrap();
                let d = decode(&b, n, codec, 50_000, k, 12, 5, 2).unwrap();
                assert_eq!(d.ids, t.ids, "{codec} k={k}");
                for (a, b) in d.logp.iter().zip(&t.logp) {
                    assert!(
                        a == b || (a - b).abs() <= Q8_STEP / 2.0 + 1e-2,
                        "{a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn corrupt_blocks_are_errors() {
        let t = sample(4, 50_000);
        let (b, n) = encode(&t, Codec::Q8, 50_000, 2).unwrap();
        assert!(decode(&b[..b.len() / 2], n, Codec::Q8, 50_000, 4, 12, 5, 2).is_err());
        assert!(decode(&b, n, Codec::Q8, 50_000, 4, 12, 6, 2).is_err());
        assert!(decode(&b, n, Codec::Q8, 1000, 4, 12, 5, 2).is_err()); // ids out of range
        // A turn count no block could hold.
        let mut raw = zstd::bulk::decompress(&b, n).unwrap();
        let at = raw.len() - 4 * (1 + 2 * 2 + 3 * 5 + 2);
        raw[at..at + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        let z = zstd::bulk::compress(&raw, 3).unwrap();
        let e = decode(&z, raw.len(), Codec::Q8, 50_000, 4, 12, 5, 2).unwrap_err();
        assert!(e.contains("turns claimed"), "{e}");
    }
}
