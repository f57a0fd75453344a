//! The KV cache of one sequence: per layer, keys and values of past positions in pages of
//! [`PAGE`] positions, allocated as the sequence grows (a long context costs nothing until
//! it is used). Full-attention layers keep every position of the context; sliding layers
//! keep a ring of the last `sliding_window + max_chunk - 1` positions (rounded up to whole
//! pages), just enough for the oldest query of a chunk to see its whole window.

use crate::{LayerKind, ModelError, TextConfig};
use gemma3_kernels::attention::{KvView, Page, PAGE};

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
    /// Largest number of positions the cache can hold in total (the context size).
    context: usize,
    /// The longest chunk one forward pass may append (the rings' slack).
    max_chunk: usize,
    /// Positions written so far.
    len: usize,
}

impl KvCache {
    /// A cache for up to `context` positions, appended in chunks of at most `max_chunk`.
    /// Nothing is allocated until positions are written.
    pub fn new(cfg: &TextConfig, context: usize, max_chunk: usize) -> Self {
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
        let page_len = self.kv_heads * PAGE * self.head_dim;
        for l in &mut self.layers {
            let pages = l.pages_for(end);
            while l.k.len() < pages {
                l.k.push(vec![0.0; page_len].into_boxed_slice());
                l.v.push(vec![0.0; page_len].into_boxed_slice());
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
        for h in 0..self.kv_heads {
            let at = (h * PAGE + row) * hd;
            l.k[page][at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            l.v[page][at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Kv head `head` of layer `layer`, for attention.
    pub fn view(&self, layer: usize, head: usize) -> KvView<'_> {
        let l = &self.layers[layer];
        KvView {
            k: &l.k,
            v: &l.v,
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

    /// Bytes of the pages allocated now.
    pub fn bytes(&self) -> usize {
        let page = self.kv_heads * PAGE * self.head_dim * std::mem::size_of::<f32>();
        self.layers.iter().map(|l| 2 * l.k.len() * page).sum()
    }

    /// Bytes the cache would hold with `positions` positions written.
    pub fn bytes_at(&self, positions: usize) -> usize {
        let page = self.kv_heads * PAGE * self.head_dim * std::mem::size_of::<f32>();
        self.layers
            .iter()
            .map(|l| 2 * l.pages_for(positions) * page)
            .sum()
    }
}
