//! The key/value cache for incremental decoding: one preallocated buffer per layer
//! (candle-nn's `KvCache`), grown along the position axis.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of every layer, `(B, KVH, S, D)` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    max_len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        // Dimension 2 is the position axis of (B, KVH, S, D).
        let layers = (0..num_layers)
            .map(|_| candle_nn::kv_cache::KvCache::new(2, max_len))
            .collect();
        Self { layers, max_len }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> Result<&mut candle_nn::kv_cache::KvCache> {
        let n = self.layers.len();
        self.layers.get_mut(i).ok_or_else(|| {
            Error::invalid(
                format!("cache has {n} layers, model asked for layer {i}"),
                "build the cache with Model::new_cache",
            )
        })
    }

    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.reset();
        }
    }

    /// Append `len` zero positions to every layer of a one-row cache: `(1, kv_heads, len,
    /// head_dim)` keys and values. A prompt prefilled after them (with those positions masked as
    /// left padding) gets the absolute positions it would have in a batch that is `len` ahead.
    pub fn append_zeros(
        &mut self,
        len: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let zeros = Tensor::zeros((1, kv_heads, len, head_dim), dtype, device)?;
        for l in &mut self.layers {
            l.append(&zeros, &zeros)?;
        }
        Ok(())
    }

    /// Overwrite positions `from .. from + len` of row `row` with the same positions of row 0 of
    /// `src` (a one-row cache), in place. Both caches must already hold those positions.
    pub fn write_row(&self, row: usize, src: &KvCache, from: usize, len: usize) -> Result<()> {
        if src.layers.len() != self.layers.len() {
            return Err(Error::invalid(
                format!(
                    "source cache has {} layers, this one {}",
                    src.layers.len(),
                    self.layers.len()
                ),
                "build both caches with the same Model::new_cache",
            ));
        }
        if from + len > self.len() || from + len > src.len() {
            return Err(Error::invalid(
                format!(
                    "positions {from}..{} are not in both caches (lengths {} and {})",
                    from + len,
                    self.len(),
                    src.len()
                ),
                "prefill the source up to the batch's current position",
            ));
        }
        for (dst, src) in self.layers.iter().zip(&src.layers) {
            for (d, s) in [
                (dst.k_cache(), src.k_cache()),
                (dst.v_cache(), src.v_cache()),
            ] {
                let (Some(all), Some(cur)) = (d.all_data(), s.current_data()?) else {
                    return Err(Error::invalid(
                        "an empty cache layer",
                        "prefill both caches before copying rows",
                    ));
                };
                let part = cur.narrow(0, 0, 1)?.narrow(2, from, len)?.contiguous()?; // (1, KVH, len, D)
                all.narrow(0, row, 1)?.slice_set(&part, 2, from)?;
            }
        }
        Ok(())
    }

    /// Drop the first `by` positions of every layer, so position `by` becomes 0; the kept keys
    /// go through `fix_keys` (the RoPE rotation back by `by`, see `Model::shift_cache`).
    pub fn drop_front(
        &mut self,
        by: usize,
        fix_keys: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if by == 0 {
            return Ok(());
        }
        let len = self.len();
        if by > len {
            return Err(Error::invalid(
                format!("cannot drop {by} positions of a cache holding {len}"),
                "drop at most the cached length",
            ));
        }
        self.rebuild(|k, v| {
            let k = fix_keys(&k.narrow(2, by, len - by)?.contiguous()?)?;
            Ok((k, v.narrow(2, by, len - by)?.contiguous()?))
        })
    }

    /// Keep only the rows `rows` (in that order) of every layer; positions are unchanged.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(first) = self
            .layers
            .first()
            .and_then(|l| l.k_cache().all_data().clone())
        else {
            return Ok(()); // nothing cached yet
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(),
            rows.len(),
            first.device(),
        )?;
        self.rebuild(|k, v| {
            Ok((
                k.contiguous()?.index_select(&idx, 0)?,
                v.contiguous()?.index_select(&idx, 0)?,
            ))
        })
    }

    /// Rows of the cache (0 before anything is cached).
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| {
                l.k_cache()
                    .all_data()
                    .as_ref()
                    .map(|t| t.dim(0).unwrap_or(0))
            })
            .unwrap_or(0)
    }

    /// Bytes of the buffers allocated for keys and values (capacity, not just what is filled).
    pub fn reserved_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [l.k_cache().all_data(), l.v_cache().all_data()])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// A cache of capacity `max_len` holding everything `src` holds (all rows).
    pub fn with_capacity_from(src: &KvCache, max_len: usize) -> Result<KvCache> {
        if src.len() > max_len {
            return Err(Error::invalid(
                format!("cannot fit {} cached positions in {max_len}", src.len()),
                "give the new cache at least the source's length",
            ));
        }
        let mut out = KvCache::new(src.layers.len(), max_len);
        for (dst, s) in out.layers.iter_mut().zip(&src.layers) {
            if let (Some(k), Some(v)) = (s.k()?, s.v()?) {
                dst.append(&k.contiguous()?, &v.contiguous()?)?;
            }
        }
        Ok(out)
    }

    /// Insert `len` zero positions in front of every layer, so position `p` becomes `p + len`;
    /// the kept keys go through `fix_keys` (the RoPE rotation forward by `len`).
    pub fn prepend_zeros(
        &mut self,
        len: usize,
        fix_keys: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.len() + len > self.max_len {
            return Err(Error::invalid(
                format!(
                    "cannot grow a cache of {} positions by {len} within {}",
                    self.len(),
                    self.max_len
                ),
                "this is a bug in retort's batching: a row longer than the cache was admitted",
            ));
        }
        self.rebuild(|k, v| {
            let (b, h, _, d) = k.dims4()?;
            let zk = Tensor::zeros((b, h, len, d), k.dtype(), k.device())?;
            let zv = Tensor::zeros((b, h, len, d), v.dtype(), v.device())?;
            let k = Tensor::cat(&[&zk, &fix_keys(&k)?], 2)?;
            let v = Tensor::cat(&[&zv, &v], 2)?;
            Ok((k, v))
        })
    }

    /// Add `n` rows of zeros after the last row of every layer.
    pub fn add_rows(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.rebuild(|k, v| {
            let (_, h, s, d) = k.dims4()?;
            let zk = Tensor::zeros((n, h, s, d), k.dtype(), k.device())?;
            let zv = Tensor::zeros((n, h, s, d), v.dtype(), v.device())?;
            Ok((Tensor::cat(&[&k, &zk], 0)?, Tensor::cat(&[&v, &zv], 0)?))
        })
    }

    /// Overwrite row `row` at positions `at .. at + L` with every position of row 0 of `src`
    /// (a one-row cache of `L` positions), keys through `fix_keys`, in place.
    pub fn write_row_at(
        &self,
        row: usize,
        src: &KvCache,
        at: usize,
        fix_keys: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let len = src.len();
        if src.layers.len() != self.layers.len() || at + len > self.len() || row >= self.rows() {
            return Err(Error::invalid(
                format!(
                    "cannot write {len} positions of a {}-layer cache at {at} of row {row} of a \
                     {}-layer cache of {} rows and {} positions",
                    src.layers.len(),
                    self.layers.len(),
                    self.rows(),
                    self.len()
                ),
                "this is a bug in retort's batching",
            ));
        }
        for (dst, s) in self.layers.iter().zip(&src.layers) {
            let (Some(k), Some(v)) = (s.k()?, s.v()?) else {
                continue;
            };
            let k = fix_keys(&k.narrow(0, 0, 1)?.contiguous()?)?;
            let v = v.narrow(0, 0, 1)?.contiguous()?;
            for (d, part) in [(dst.k_cache(), k), (dst.v_cache(), v)] {
                let Some(all) = d.all_data() else {
                    return Err(Error::invalid(
                        "an empty cache layer",
                        "prefill the batch before copying rows into it",
                    ));
                };
                all.narrow(0, row, 1)?.slice_set(&part, 2, at)?;
            }
        }
        Ok(())
    }

    /// Replace every cached layer's keys and values `(B, KVH, S, D)` by `f(k, v)`, in fresh
    /// buffers of the same capacity.
    fn rebuild(&mut self, f: impl Fn(Tensor, Tensor) -> Result<(Tensor, Tensor)>) -> Result<()> {
        for l in &mut self.layers {
            let (Some(k), Some(v)) = (l.k()?, l.v()?) else {
                continue;
            };
            let (k, v) = f(k, v)?;
            let mut fresh = candle_nn::kv_cache::KvCache::new(2, self.max_len);
            fresh.append(&k, &v)?;
            *l = fresh;
        }
        Ok(())
    }
}
