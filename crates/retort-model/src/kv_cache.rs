//! The key/value cache for incremental decoding: one preallocated buffer per layer
//! (candle-nn's `KvCache`), grown along the position axis.

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
}
