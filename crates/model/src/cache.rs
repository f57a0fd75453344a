//! The KV cache of one sequence: per layer, keys and values of past positions in pages of
//! [`PAGE`] positions, allocated as the sequence grows (a long context costs nothing until
//! it is used). Full-attention layers keep every position of the context; sliding layers
//! keep a ring of the last `sliding_window + max_chunk - 1` positions (rounded up to whole
//! pages), just enough for the oldest query of a chunk to see its whole window.

use crate::{LayerKind, ModelError, TextConfig};
use gemma3_formats::DType;
use gemma3_kernels::attention::{
    kv_row_bytes, new_page, prefetch_key, store_key, store_value, KvView, Page, KV_TYPES, PAGE,
};
use gemma3_kernels::Precision;

/// How keys and values are stored: f32, f16, bf16 or q8_0 each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvTypes {
    pub k: DType,
    pub v: DType,
}

impl KvTypes {
    pub const F32: KvTypes = KvTypes {
        k: DType::F32,
        v: DType::F32,
    };
    pub const F16: KvTypes = KvTypes {
        k: DType::F16,
        v: DType::F16,
    };

    /// The default of a precision: f16 with 8-bit activations (what llama.cpp keeps; the
    /// fast path rounds keys and values to f16 anyway, so nothing changes), f32 for exact.
    pub fn for_precision(p: Precision) -> KvTypes {
        match p {
            Precision::Fast => KvTypes::F16,
            Precision::Exact => KvTypes::F32,
        }
    }

    /// Parses a cache type name: f32, f16, bf16 or q8_0 (any case).
    pub fn parse_type(name: &str) -> Result<DType, ModelError> {
        KV_TYPES
            .into_iter()
            .find(|t| t.to_string().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "unknown cache type {name:?} (expected f32, f16, bf16 or q8_0)"
                ))
            })
    }

    /// Checks that the model's rows fit both types (q8_0 needs head_dim a multiple of 32).
    pub fn check(&self, cfg: &TextConfig) -> Result<(), ModelError> {
        for t in [self.k, self.v] {
            if kv_row_bytes(t, cfg.head_dim).is_none() {
                return Err(ModelError::Input(format!(
                    "cache type {t} cannot hold rows of {} values",
                    cfg.head_dim
                )));
            }
        }
        Ok(())
    }

    /// Bytes one position takes in one layer (keys and values of every kv head).
    pub fn bytes_per_position(&self, cfg: &TextConfig) -> usize {
        let row = |t: DType| kv_row_bytes(t, cfg.head_dim).unwrap_or(0);
        cfg.num_kv_heads * (row(self.k) + row(self.v))
    }

    pub fn label(&self) -> String {
        if self.k == self.v {
            self.k.to_string().to_lowercase()
        } else {
            format!("k {} / v {}", self.k, self.v).to_lowercase()
        }
    }
}

/// The most tokens one forward pass runs (its rows over every sequence): sizes the
/// workspace, and a sequence's chunk, which sizes the sliding layers' rings.
pub const MAX_BATCH: usize = 512;

pub struct LayerCache {
    /// Pages allocated so far, in ring order (page `i` holds slots `i·PAGE ..`).
    k: Vec<Page>,
    v: Vec<Page>,
    /// Slots in the ring; positions wrap modulo this. A multiple of [`PAGE`].
    capacity: usize,
    /// The attention window of a sliding layer (None for full attention).
    window: Option<usize>,
}

impl LayerCache {
    fn pages_for(&self, positions: usize) -> usize {
        positions.min(self.capacity).div_ceil(PAGE)
    }
}

pub struct KvCache {
    layers: Vec<LayerCache>,
    kv_heads: usize,
    head_dim: usize,
    types: KvTypes,
    /// Bytes of a key row and a value row.
    k_row: usize,
    v_row: usize,
    /// Largest number of positions the cache can hold in total (the context size).
    context: usize,
    /// The longest chunk one forward pass may append (the rings' slack).
    max_chunk: usize,
    /// Positions written so far.
    len: usize,
}

impl KvCache {
    /// An f32 cache for up to `context` positions, appended in chunks of at most
    /// `max_chunk`. Nothing is allocated until positions are written.
    pub fn new(cfg: &TextConfig, context: usize, max_chunk: usize) -> Self {
        Self::with_types(cfg, context, max_chunk, KvTypes::F32)
    }

    /// [`new`](Self::new) with keys and values stored as `types` (checked with
    /// [`KvTypes::check`]; panics on types that cannot hold the rows).
    pub fn with_types(cfg: &TextConfig, context: usize, max_chunk: usize, types: KvTypes) -> Self {
        let row = |t: DType| {
            kv_row_bytes(t, cfg.head_dim)
                .unwrap_or_else(|| panic!("cache type {t} cannot hold rows of {}", cfg.head_dim))
        };
        let max_chunk = max_chunk.max(1);
        let full = context.div_ceil(PAGE).max(1) * PAGE;
        let layers = cfg
            .layer_kinds
            .iter()
            .map(|k| {
                let (capacity, window) = match k {
                    LayerKind::Full => (full, None),
                    LayerKind::Sliding => (
                        ((cfg.sliding_window + max_chunk - 1).div_ceil(PAGE) * PAGE).min(full),
                        Some(cfg.sliding_window),
                    ),
                };
                LayerCache {
                    k: Vec::new(),
                    v: Vec::new(),
                    capacity,
                    window,
                }
            })
            .collect();
        KvCache {
            layers,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            types,
            k_row: row(types.k),
            v_row: row(types.v),
            context,
            max_chunk,
            len: 0,
        }
    }

    /// Positions written so far (the next token goes at this position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context size: the most positions this cache holds.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Positions a sliding layer's ring holds (None without sliding layers).
    pub fn sliding_capacity(&self) -> Option<usize> {
        self.layers
            .iter()
            .find(|l| l.window.is_some())
            .map(|l| l.capacity)
    }

    /// The longest chunk one forward pass may append.
    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }

    /// Checks that `n` more positions fit, and allocates the pages they need.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), ModelError> {
        if n > self.max_chunk {
            return Err(ModelError::Input(format!(
                "a chunk of {n} tokens is longer than this cache's chunk size of {}",
                self.max_chunk
            )));
        }
        let end = self.len + n;
        if end > self.context {
            return Err(ModelError::ContextOverflow {
                needed: end,
                context: self.context,
            });
        }
        let rows = self.kv_heads * PAGE;
        for l in &mut self.layers {
            let pages = l.pages_for(end);
            while l.k.len() < pages {
                l.k.push(new_page(rows, self.k_row));
                l.v.push(new_page(rows, self.v_row));
            }
        }
        Ok(())
    }

    /// Writes the keys and values of position `pos` of layer `layer` (`kv_heads ×
    /// head_dim` each); its page must be reserved.
    pub(crate) fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let l = &mut self.layers[layer];
        let slot = pos % l.capacity;
        let (page, row) = (slot / PAGE, slot % PAGE);
        // Every head's key lines asked for at once, then written: one key touches a line
        // per value (measured 0.93% -> 0.71% of a two-thread 4B token).
        for h in 0..self.kv_heads {
            prefetch_key(self.types.k, &l.k[page], h, hd, row, self.k_row);
        }
        for h in 0..self.kv_heads {
            let (kh, vh) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
            store_key(self.types.k, kh, &mut l.k[page], h, row, self.k_row);
            store_value(self.types.v, vh, &mut l.v[page], h, row, self.v_row);
        }
    }

    /// Kv head `head` of layer `layer`, for attention.
    pub fn view(&self, layer: usize, head: usize) -> KvView<'_> {
        let l = &self.layers[layer];
        KvView {
            k: &l.k,
            v: &l.v,
            k_type: self.types.k,
            v_type: self.types.v,
            capacity: l.capacity,
            head,
            head_dim: self.head_dim,
        }
    }

    /// Records that a forward pass appended `n` positions.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets everything (positions restart at 0); pages are kept for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Whether [`truncate`](Self::truncate) to `len` would succeed.
    pub fn can_truncate(&self, len: usize) -> bool {
        if len > self.len {
            return false;
        }
        let back = self.len - len;
        // A ring still holds the `window` positions before `len` only if it has not wrapped
        // over them since.
        len == 0
            || self.layers.iter().all(|l| match l.window {
                Some(w) => self.len <= l.capacity || back <= l.capacity - w.min(l.capacity),
                None => true,
            })
    }

    /// Drops positions from `len` on, so a shared prefix can be reused. Sliding layers
    /// can only rewind within what their ring still holds: false (and nothing changed)
    /// when they cannot.
    pub fn truncate(&mut self, len: usize) -> bool {
        if !self.can_truncate(len) {
            return false;
        }
        self.len = len;
        true
    }

    /// Frees the pages no position below `len` uses (after [`clear`](Self::clear) or
    /// [`truncate`](Self::truncate), to hand memory back).
    pub fn shrink(&mut self) {
        let len = self.len;
        for l in &mut self.layers {
            let keep = if len > l.capacity {
                l.k.len()
            } else {
                l.pages_for(len)
            };
            l.k.truncate(keep);
            l.v.truncate(keep);
            l.k.shrink_to_fit();
            l.v.shrink_to_fit();
        }
    }

    /// The largest magnitude among the stored keys and among the values of each layer
    /// (positions still held), as stored: to check a type's range (f16 stops at 65504).
    pub fn max_abs(&self) -> Vec<(f32, f32)> {
        let (mut k, mut v) = (vec![0f32; self.head_dim], vec![0f32; self.head_dim]);
        (0..self.layers.len())
            .map(|li| {
                let l = &self.layers[li];
                let first = self.len.saturating_sub(l.capacity);
                let (mut mk, mut mv) = (0f32, 0f32);
                for h in 0..self.kv_heads {
                    let view = self.view(li, h);
                    for p in first..self.len {
                        view.read(p, &mut k, &mut v);
                        mk = k.iter().fold(mk, |a, x| a.max(x.abs()));
                        mv = v.iter().fold(mv, |a, x| a.max(x.abs()));
                    }
                }
                (mk, mv)
            })
            .collect()
    }

    /// How keys and values are stored.
    pub fn types(&self) -> KvTypes {
        self.types
    }

    /// Bytes of a key page and a value page together.
    fn page_pair_bytes(&self) -> usize {
        self.kv_heads * PAGE * (self.k_row + self.v_row)
    }

    /// Bytes of the pages allocated now.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.len()).sum::<usize>() * self.page_pair_bytes()
    }

    /// Bytes the cache would hold with `positions` positions written.
    pub fn bytes_at(&self, positions: usize) -> usize {
        self.layers
            .iter()
            .map(|l| l.pages_for(positions))
            .sum::<usize>()
            * self.page_pair_bytes()
    }
}
