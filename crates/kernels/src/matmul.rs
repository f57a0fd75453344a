//! `out[n][rows] = x[n][cols] · W[rows][cols]ᵀ` for weights in any stored type.
//!
//! Rows of W are split across the thread pool. Each task dequantizes a tile of rows into a
//! thread-local f32 buffer (sized once, reused for every call) and takes four-row dot
//! products against each input row, so a weight tile is decoded once per call however many
//! inputs (prompt tokens) there are. Every output element is one `dot` over the whole row
//! in a fixed order, so a row's result does not depend on the batch it is in.

use crate::dispatch;
use crate::dot::dot_rows;
use gemma3_formats::{quant, DType, TensorData};
use rayon::prelude::*;
use std::cell::RefCell;

const TILE: usize = 8;

thread_local! {
    static TILE_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A weight matrix view: its type, row length and bytes (whole rows of whole blocks).
#[derive(Clone, Copy)]
pub struct Weights<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl<'a> Weights<'a> {
    pub fn of(t: &'a TensorData) -> Self {
        Weights {
            dtype: t.dtype,
            rows: t.rows(),
            cols: t.cols(),
            bytes: t.bytes(),
        }
    }
    fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }
}

/// Matrix product against a stored tensor; see the module docs.
pub fn matmul(w: &TensorData, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_weights(Weights::of(w), x, n, out)
}

pub fn matmul_weights(w: Weights<'_>, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert!(
        x.len() >= n * cols,
        "matmul: input has {} values, need {n}x{cols}",
        x.len()
    );
    assert!(
        out.len() >= n * rows,
        "matmul: output has {} values, need {n}x{rows}",
        out.len()
    );
    assert_eq!(
        w.dtype.row_bytes(cols),
        Some(w.row_bytes()),
        "matmul: bad weight bytes"
    );
    if n == 0 || rows == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Enough tasks to balance (8 per thread), each a whole number of tiles.
    let per_task = rows.div_ceil(threads * 8).div_ceil(TILE).max(1) * TILE;
    let tasks = rows.div_ceil(per_task);
    // Tasks write disjoint elements (distinct row ranges); the address travels as usize.
    let out_addr = out.as_mut_ptr() as usize;
    let job = |t: usize| {
        let r0 = t * per_task;
        let r1 = (r0 + per_task).min(rows);
        TILE_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < TILE * cols {
                buf.resize(TILE * cols, 0.0);
            }
            // SAFETY: rows r0..r1 of every output row belong to this task alone.
            unsafe { matmul_rows(w, x, n, r0, r1, out_addr as *mut f32, &mut buf) };
        });
    };
    if tasks == 1 {
        job(0);
    } else {
        (0..tasks).into_par_iter().for_each(job);
    }
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
