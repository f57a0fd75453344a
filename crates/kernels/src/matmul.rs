//! `out[n][rows] = x[n][cols] · W[rows][cols]ᵀ` for weights in any stored type.
//!
//! Rows of W are split across the thread pool in whole 16-row groups. With
//! [`Precision::Fast`] the input is quantized to 8 bits once per call and each task runs
//! the integer kernels: on the repacked copy of a [`Linear`] where there is one
//! ([`crate::packed`], AVX-512 VNNI), or else by unpacking a tile of rows into a
//! thread-local buffer ([`crate::qdot`]). With [`Precision::Exact`] (and for float weights)
//! tiles are dequantized to f32 and multiplied in f32. Either way a weight tile is decoded
//! once per call however many inputs (prompt tokens) there are, and every output element
//! is summed in a fixed order, so a row's result does not depend on the batch it is in.

use crate::dispatch;
use crate::dot::dot_rows;
use crate::packed::{self, PackedMatrix};
use crate::qdot::{self, QuantActs};
use gemma3_formats::{quant, DType, TensorData};
use std::cell::RefCell;

/// Rows per dequantized tile; also the granularity of the row split (a packed group).
const TILE: usize = 16;

thread_local! {
    static TILE_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static UNPACK_BUF: RefCell<(Vec<u8>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Quantized activations' buffers, shared by every thread: a pass may run on any of the
/// pool's threads (a team leads from whichever worker took it), and finds buffers grown
/// by earlier passes wherever it runs. One per concurrent product; a lock per product.
static ACTS: std::sync::Mutex<Vec<QuantActs>> = std::sync::Mutex::new(Vec::new());

/// How quantized weights are multiplied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Activations are quantized to 8 bits per block of 32 and multiplied in integers, as
    /// llama.cpp does: several times faster, logits within a few hundredths.
    #[default]
    Fast,
    /// Weights are dequantized to f32 and multiplied in f32, as transformers does with a
    /// dequantized GGUF: matches its logits to about 1e-3.
    Exact,
}

/// A weight matrix view: its type, row length and bytes (whole rows of whole blocks), and
/// its repacked copy if it has one.
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
    pub packed: Option<&'a PackedMatrix>,
}

/// A weight matrix as stored, with a copy repacked for the fastest kernels where this CPU
/// has them. The stored bytes serve the exact path and embedding lookups; the file pages
/// the copy replaces are handed back to the OS, so the copy costs no memory.
pub struct Linear {
    pub tensor: TensorData,
    pub packed: Option<PackedMatrix>,
}

impl Linear {
    pub fn new(tensor: TensorData) -> Self {
        let packed = PackedMatrix::pack(&tensor);
        Linear { tensor, packed }
    }

    pub fn weights(&self) -> Weights<'_> {
        Weights {
            packed: self.packed.as_ref(),
            ..Weights::of(&self.tensor)
        }
    }
}

impl<'a> Weights<'a> {
    pub fn of(t: &'a TensorData) -> Self {
        Weights {
            dtype: t.dtype,
            rows: t.rows(),
            cols: t.cols(),
            bytes: t.bytes(),
            packed: None,
        }
    }
    fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }
}

/// Matrix product against a stored tensor; see the module docs.
pub fn matmul(w: &TensorData, x: &[f32], n: usize, out: &mut [f32], precision: Precision) {
    matmul_weights(Weights::of(w), x, n, out, precision)
}

pub fn matmul_weights(w: Weights<'_>, x: &[f32], n: usize, out: &mut [f32], precision: Precision) {
    matmul_multi(&[w], x, n, &mut [out], precision)
}

/// Several matrices applied to the same input (q/k/v, gate/up) in one parallel pass: one
/// fork-join instead of one per matrix, and the input is quantized once.
pub fn matmul_multi(
    ws: &[Weights<'_>],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
    precision: Precision,
) {
    assert_eq!(ws.len(), outs.len());
    assert!(ws.len() <= 4, "matmul_multi takes at most 4 matrices");
    let cols = ws[0].cols;
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert_eq!(w.cols, cols, "matmul_multi: matrices differ in row length");
        assert!(
            x.len() >= n * cols,
            "matmul: input has {} values, need {n}x{cols}",
            x.len()
        );
        assert!(
            out.len() >= n * w.rows,
            "matmul: output has {} values, need {n}x{}",
            out.len(),
            w.rows
        );
        assert_eq!(
            w.dtype.row_bytes(cols),
            Some(w.row_bytes()),
            "matmul: bad weight bytes"
        );
    }
    if n == 0 {
        return;
    }
    // Per matrix: its first 16-row group in the joint numbering (the loop shares out
    // groups of all the matrices at once) and its output's address.
    let mut plan = [(0usize, 0usize); 4];
    let mut total = 0;
    for (m, w) in ws.iter().enumerate() {
        // Ranges write disjoint elements (distinct row ranges); addresses travel as usize.
        plan[m] = (total, outs[m].as_mut_ptr() as usize);
        total += w.rows.div_ceil(TILE);
    }
    let quantized = precision == Precision::Fast && ws.iter().any(|w| qdot::supports(w.dtype));
    // ggml's pairing: K-quant weights meet Q8_K activations, the rest Q8_0. Mixed groups
    // use Q8_0, which every unpacked integer kernel accepts.
    let block = quantized.then(|| {
        if all_k_blocks(ws, cols) {
            qdot::ActBlock::Q8K
        } else {
            qdot::ActBlock::Q8_0
        }
    });
    // The buffers leave the shared list for the call: while this thread waits for the
    // parallel part it may run another forward pass's work (another request, another
    // test), which then takes other buffers rather than these.
    let mut acts = ACTS
        .lock()
        .map(|mut a| a.pop())
        .ok()
        .flatten()
        .unwrap_or_default();
    {
        if let Some(block) = block {
            acts.quantize_as(x, n, cols, block);
        }
        let acts = &acts;
        let qdot = qdot::qdot_fn();
        // Rows r0..r1 of matrix m.
        let rows = |m: usize, r0: usize, r1: usize| {
            let w = ws[m];
            let out = plan[m].1 as *mut f32;
            let packed = w
                .packed
                .filter(|p| Some(p.act_block()) == block && packed::available());
            if let Some(p) = packed {
                // SAFETY: this range alone writes rows r0..r1 (whole groups: r0 is a
                // multiple of 16, r1 one too or the matrix's last row).
                unsafe { packed::matmul_packed(p, acts, n, r0 / 16..r1.div_ceil(16), out) };
            } else if precision == Precision::Fast && qdot::supports(w.dtype) {
                UNPACK_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    let (u, a, b) = &mut *buf;
                    if u.len() < TILE * cols {
                        u.resize(TILE * cols, 0);
                        a.resize(TILE * cols / 16, 0.0);
                        b.resize(TILE * cols / 16, 0.0);
                    }
                    // SAFETY: rows r0..r1 of every output row belong to this range alone.
                    unsafe { qmatmul_rows(w, acts, n, r0, r1, out, u, a, b, qdot) };
                });
            } else {
                TILE_BUF.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    if buf.len() < TILE * cols {
                        buf.resize(TILE * cols, 0.0);
                    }
                    // SAFETY: as above.
                    unsafe { matmul_rows(w, x, n, r0, r1, out, &mut buf) };
                });
            }
        };
        // Groups g0..g1 of the joint numbering, cut at the matrices' edges.
        let job = |g: std::ops::Range<usize>| {
            for (m, w) in ws.iter().enumerate() {
                let first = plan[m].0;
                let (a, b) = (g.start.max(first), g.end.min(first + w.rows.div_ceil(TILE)));
                if a < b {
                    rows(m, (a - first) * TILE, ((b - first) * TILE).min(w.rows));
                }
            }
        };
        crate::team::for_each_range(total, job);
    }
    if let Ok(mut a) = ACTS.lock() {
        a.push(acts);
    }
}

/// Whether every matrix pairs with Q8_K activations (and rows hold whole Q8_K blocks).
fn all_k_blocks(ws: &[Weights<'_>], cols: usize) -> bool {
    cols.is_multiple_of(256)
        && ws
            .iter()
            .all(|w| qdot::ActBlock::for_weights(w.dtype) == qdot::ActBlock::Q8K)
}

/// The integer path: unpack a tile of weight rows once, then one `qdot` per (input, row).
///
/// # Safety
/// As for [`matmul_rows`].
#[allow(clippy::too_many_arguments)]
unsafe fn qmatmul_rows(
    w: Weights<'_>,
    acts: &QuantActs,
    n: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
    u: &mut [u8],
    a: &mut [f32],
    b: &mut [f32],
    qdot: qdot::QDot,
) {
    let cols = w.cols;
    let g = cols / 16;
    let rb = w.row_bytes();
    let mut t0 = r0;
    while t0 < r1 {
        let t1 = (t0 + TILE).min(r1);
        let nt = t1 - t0;
        for r in 0..nt {
            let src = &w.bytes[(t0 + r) * rb..(t0 + r + 1) * rb];
            unpack_dispatch(
                w.dtype,
                src,
                &mut u[r * cols..(r + 1) * cols],
                &mut a[r * g..(r + 1) * g],
                &mut b[r * g..(r + 1) * g],
            );
        }
        for i in 0..n {
            let (q, dg, ds) = acts.row(i);
            let o = out.add(i * w.rows + t0);
            for r in 0..nt {
                *o.add(r) = qdot(
                    &u[r * cols..(r + 1) * cols],
                    &a[r * g..(r + 1) * g],
                    &b[r * g..(r + 1) * g],
                    q,
                    dg,
                    ds,
                );
            }
        }
        t0 = t1;
    }
}

dispatch!(fn unpack_dispatch(dtype: DType, bytes: &[u8], u: &mut [u8], a: &mut [f32], b: &mut [f32]) => unpack_body);

#[inline(always)]
fn unpack_body<const FMA: bool>(
    dtype: DType,
    bytes: &[u8],
    u: &mut [u8],
    a: &mut [f32],
    b: &mut [f32],
) {
    qdot::unpack_row(dtype, bytes, u, a, b)
}

/// # Safety
/// `out` must point to `n * w.rows` floats, and no one else may write rows `r0..r1`.
unsafe fn matmul_rows(
    w: Weights<'_>,
    x: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
    buf: &mut [f32],
) {
    let dot4 = dot_rows::<4>();
    let dot1 = dot_rows::<1>();
    let cols = w.cols;
    let rb = w.row_bytes();
    let mut t0 = r0;
    while t0 < r1 {
        let t1 = (t0 + TILE).min(r1);
        let nt = t1 - t0;
        for r in 0..nt {
            let src = &w.bytes[(t0 + r) * rb..(t0 + r + 1) * rb];
            dequantize_row(w.dtype, src, &mut buf[r * cols..(r + 1) * cols]);
        }
        let tile = &buf[..nt * cols];
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            let o = out.add(i * w.rows + t0);
            let mut r = 0;
            while r + 4 <= nt {
                let rows = [
                    &tile[r * cols..],
                    &tile[(r + 1) * cols..],
                    &tile[(r + 2) * cols..],
                    &tile[(r + 3) * cols..],
                ];
                let d = dot4(&rows, xi);
                for (k, v) in d.iter().enumerate() {
                    *o.add(r + k) = *v;
                }
                r += 4;
            }
            while r < nt {
                *o.add(r) = dot1(&[&tile[r * cols..]], xi)[0];
                r += 1;
            }
        }
        t0 = t1;
    }
}

dispatch!(fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) => dequantize_body);

#[inline(always)]
fn dequantize_body<const FMA: bool>(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    quant::dequantize(dtype, bytes, out)
}
