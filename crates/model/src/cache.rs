//! The KV cache: per layer, keys and values of past positions in f32. Full-attention layers
//! keep every position of the context; sliding layers keep a ring of the last
//! `sliding_window + max_batch - 1` positions, just enough for the oldest query of a batch
//! to see its whole window.

use crate::{LayerKind, TextConfig};

pub struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Slots in the ring; positions wrap modulo this.
    pub capacity: usize,
    /// The attention window of a sliding layer (None for full attention).
    pub window: Option<usize>,
}

pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Floats per position (kv heads × head_dim).
    pub stride: usize,
    /// Largest number of positions the cache can hold in total (the context size).
    pub context: usize,
    /// Positions written so far.
    pub len: usize,
}

impl KvCache {
    pub fn new(cfg: &TextConfig, context: usize, max_batch: usize) -> Self {
        let stride = cfg.num_kv_heads * cfg.head_dim;
        let layers = cfg
            .layer_kinds
            .iter()
            .map(|k| {
                let (capacity, window) = match k {
                    LayerKind::Full => (context, None),
                    LayerKind::Sliding => (
                        (cfg.sliding_window + max_batch - 1).min(context),
                        Some(cfg.sliding_window),
                    ),
                };
                LayerCache {
                    k: vec![0.0; capacity * stride],
                    v: vec![0.0; capacity * stride],
                    capacity,
                    window,
                }
            })
            .collect();
        KvCache {
            layers,
            stride,
            context,
            len: 0,
        }
    }

    /// Forgets everything (positions restart at 0); memory is kept.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops positions from `len` on, so a shared prefix can be reused. Sliding layers
    /// can only rewind within what their ring still holds.
    pub fn truncate(&mut self, len: usize) -> bool {
        if len > self.len {
            return false;
        }
        let back = self.len - len;
        // A ring still holds the `window` positions before `len` only if it has not wrapped
        // over them since.
        let ok = len == 0
            || self.layers.iter().all(|l| match l.window {
                Some(w) => self.len <= l.capacity || back <= l.capacity - w.min(l.capacity),
                None => true,
            });
        if !ok {
            return false;
        }
        self.len = len;
        true
    }

    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 4)
            .sum()
    }
}
