//! Blocked f32 matrix product `C += A·B` for large batches (the vision tower runs thousands
//! of rows through each weight, and attention over thousands of keys).
//!
//! The GotoBLAS/BLIS scheme: B is packed into `KC × NR` column panels (a block of them
//! stays in L3), A into `MC × KC` row panels (in L2), and a register-tiled micro-kernel
//! multiplies one `MR`-row A panel by one `NR`-column B panel (in L1) into an `MR × NR` tile
//! of accumulators. Operands are strided views, so transposes cost nothing, and B may be a
//! stored weight matrix `[n, k]` of any type (dequantized while it is packed), which is how
//! `x · Wᵀ` is taken without converting the weights. An operand used in many products can
//! be packed once ([`PackedA`], [`PackedB`]: attention's keys and values per head).
//! [`crate::matmul`] stays the kernel for decode-sized batches; this one wins once a weight
//! tile is reused by many rows.

use crate::matmul::Weights;
use gemma3_formats::quant;
use rayon::prelude::*;
use std::cell::RefCell;
use std::marker::PhantomData;

/// Depth of a packed block: a multiple of 256 so that a block of any quantized row starts
/// on a whole block of its type.
const KC: usize = 256;
/// Rows of A packed at once (a multiple of every kernel's MR).
const MC: usize = 96;
/// Columns of B packed at once.
const NC: usize = 8192;

/// A read-only strided view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> MatRef<'a> {
    /// Panics when the view reaches past `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len(),
            "gemm: a {rows}x{cols} view with strides ({rs}, {cs}) needs more than {} values",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }

    /// Element `(i, j)`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.at(i, j)
    }
}

/// A mutable strided view. Only row-major or column-major layouts (with any padding) are
/// accepted, so distinct elements never share memory and tiles can be written in parallel.
pub struct MatMut<'a> {
    pub(crate) data: &'a mut [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> MatMut<'a> {
    /// Panics when the view reaches past `data` or elements could overlap.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            (cs == 1 && rs >= cols) || (rs == 1 && cs >= rows),
            "gemm: output strides ({rs}, {cs}) are neither row- nor column-major for {rows}x{cols}"
        );
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len(),
            "gemm: a {rows}x{cols} output with strides ({rs}, {cs}) needs more than {} values",
            data.len()
        );
        MatMut {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// The left operand `A` (`m × k`): a view, or a matrix packed once for many products.
#[derive(Clone, Copy)]
pub enum AOperand<'a> {
    View(MatRef<'a>),
    Packed(&'a PackedA),
}

impl<'a> From<MatRef<'a>> for AOperand<'a> {
    fn from(m: MatRef<'a>) -> Self {
        AOperand::View(m)
    }
}

impl<'a> From<&'a PackedA> for AOperand<'a> {
    fn from(p: &'a PackedA) -> Self {
        AOperand::Packed(p)
    }
}

/// The right-hand operand `B` (`k × n`).
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    /// `B(p, j)` read from an f32 view.
    F32(MatRef<'a>),
    /// A stored weight matrix `W` of shape `[n, k]` (`[out, in]`, any type): `B = Wᵀ`.
    WeightsT(Weights<'a>),
    /// Packed once, used many times.
    Packed(&'a PackedB),
}

impl BOperand<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            BOperand::F32(m) => (m.rows, m.cols),
            BOperand::WeightsT(w) => (w.cols, w.rows),
            BOperand::Packed(p) => (p.k, p.n),
        }
    }
}

/// `A` in the kernel's panels, every block the product will ask for, in order: blocks of
/// `KC` columns, each split into blocks of `MC` rows of `[kc][MR]` panels.
pub struct PackedA {
    m: usize,
    k: usize,
    kern: Kernel,
    data: Vec<f32>,
}

impl PackedA {
    pub fn new(a: MatRef<'_>) -> Self {
        let kern = kernel();
        let mr = kern.mr;
        let (m, k) = (a.rows, a.cols);
        let mut data = vec![0f32; m.div_ceil(mr) * mr * k];
        let mut at = 0;
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                let len = mc.div_ceil(mr) * kc * mr;
                pack_a(&a, i0, mc, pc, kc, mr, &mut data[at..at + len]);
                at += len;
            }
        }
        PackedA { m, k, kern, data }
    }

    /// The panels of rows `i0..` (a multiple of MC) and columns `pc..pc+kc`.
    fn block(&self, pc: usize, kc: usize, i0: usize, mc: usize) -> &[f32] {
        let mr = self.kern.mr;
        let at = mr * (pc * self.m.div_ceil(mr) + (i0 / mr) * kc);
        &self.data[at..at + mc.div_ceil(mr) * kc * mr]
    }
}

/// `B` in the kernel's panels: blocks of `NC` columns, each split into blocks of `KC` rows
/// of `[kc][NR]` panels.
pub struct PackedB {
    k: usize,
    n: usize,
    kern: Kernel,
    data: Vec<f32>,
}

impl PackedB {
    pub fn new(b: BOperand<'_>) -> Self {
        if let BOperand::Packed(p) = b {
            return PackedB {
                k: p.k,
                n: p.n,
                kern: p.kern,
                data: p.data.clone(),
            };
        }
        let kern = kernel();
        let nr = kern.nr;
        let (k, n) = b.dims();
        let mut data = vec![0f32; n.div_ceil(nr) * nr * k];
        let mut at = 0;
        for jc in (0..n).step_by(NC) {
            let n_panels = NC.min(n - jc).div_ceil(nr);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                for jp in 0..n_panels {
                    pack_b(&b, pc, kc, jc + jp * nr, nr, n, &mut data[at..at + kc * nr]);
                    at += kc * nr;
                }
            }
        }
        PackedB { k, n, kern, data }
    }

    /// The panels of columns `jc..` (a multiple of NC) and rows `pc..pc+kc`.
    fn block(&self, jc: usize, pc: usize, kc: usize, n_panels: usize) -> &[f32] {
        let nr = self.kern.nr;
        let at = nr * ((jc / nr) * self.k + n_panels * pc);
        &self.data[at..at + n_panels * kc * nr]
    }
}

/// A micro-kernel: `out[MR × NR] = Σ_p a[p][0..MR] ⊗ b[p][0..NR]` over `kc` steps of
/// packed panels, or with `add`, `out += ` that (added as `out + sum`, as
/// [`CPtr::put_tile`] adds, so a tile written in place or through a buffer has the same
/// bits). B's rows are `ldb` floats apart: `NR` for a packed panel, the row stride when B
/// is read in place; `out`'s rows are `ldo` floats apart (`NR` for a tile buffer, C's row
/// stride when a whole tile is written into C).
type KernelFn = unsafe fn(
    kc: usize,
    a: *const f32,
    b: *const f32,
    ldb: usize,
    out: *mut f32,
    ldo: usize,
    add: bool,
);

#[derive(Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    f: KernelFn,
}

fn kernel() -> Kernel {
    match crate::simd::level() {
        #[cfg(target_arch = "x86_64")]
        crate::simd::Level::Avx512 => Kernel {
            mr: avx512::MR,
            nr: avx512::NR,
            f: avx512::kernel,
        },
        #[cfg(target_arch = "x86_64")]
        crate::simd::Level::Avx2 => Kernel {
            mr: avx2::MR,
            nr: avx2::NR,
            f: avx2::kernel,
        },
        #[cfg(target_arch = "aarch64")]
        crate::simd::Level::Neon => Kernel {
            mr: neon::MR,
            nr: neon::NR,
            f: neon::kernel,
        },
        _ => Kernel {
            mr: portable::MR,
            nr: portable::NR,
            f: portable::kernel,
        },
    }
}

/// The kernel for `m` rows: a 4-row one when there are that few (attention of one
/// position's query heads), so no padded rows are multiplied. Every kernel sums each
/// element in the same order, so the choice never changes a result.
fn kernel_for(m: usize) -> Kernel {
    let k = kernel();
    if m > 4 {
        return k;
    }
    match crate::simd::level() {
        #[cfg(target_arch = "x86_64")]
        crate::simd::Level::Avx512 => Kernel {
            mr: 4,
            nr: avx512::NR,
            f: avx512::kernel_rows::<4>,
        },
        #[cfg(target_arch = "x86_64")]
        crate::simd::Level::Avx2 => Kernel {
            mr: 4,
            nr: avx2::NR,
            f: avx2::kernel_rows::<4>,
        },
        #[cfg(target_arch = "aarch64")]
        crate::simd::Level::Neon => Kernel {
            mr: 4,
            nr: neon::NR,
            f: neon::kernel_rows::<4>,
        },
        _ => k,
    }
}

thread_local! {
    static A_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static B_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SEG_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `C += A·B` (`A`: `m × k`, `B`: `k × n`, `C`: `m × n`). With `parallel`, the work is
/// split over the rayon pool; without, it runs on the calling thread (for callers that
/// are already parallel, like attention over heads). Panics on mismatched shapes.
pub fn gemm<'a>(a: impl Into<AOperand<'a>>, b: BOperand<'_>, c: MatMut<'_>, parallel: bool) {
    gemm_impl(a.into(), b, c, parallel, true)
}

/// `C = A·B`: as [`gemm`], but C's old values are overwritten, not added to.
pub fn gemm_into<'a>(a: impl Into<AOperand<'a>>, b: BOperand<'_>, c: MatMut<'_>, parallel: bool) {
    gemm_impl(a.into(), b, c, parallel, false)
}

fn gemm_impl(a: AOperand<'_>, b: BOperand<'_>, c: MatMut<'_>, parallel: bool, accumulate: bool) {
    let (m, k) = match a {
        AOperand::View(v) => (v.rows, v.cols),
        AOperand::Packed(p) => (p.m, p.k),
    };
    let n = c.cols;
    assert_eq!(c.rows, m, "gemm: C has {} rows, A has {m}", c.rows);
    assert_eq!(b.dims(), (k, n), "gemm: B is not {k}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c.data[i * c.rs + j * c.cs] = 0.0;
                }
            }
        }
        return;
    }
    // Packed operands fix the kernel (the SIMD level could have changed since).
    let kern = match (a, b) {
        (AOperand::Packed(pa), BOperand::Packed(pb)) => {
            assert_eq!((pa.kern.mr, pa.kern.nr), (pb.kern.mr, pb.kern.nr));
            pa.kern
        }
        (AOperand::Packed(p), _) => p.kern,
        (_, BOperand::Packed(p)) => p.kern,
        _ => kernel_for(m),
    };
    let (mr, nr) = (kern.mr, kern.nr);
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let c_out = CPtr {
        ptr: c.data.as_mut_ptr(),
        rs: c.rs,
        cs: c.cs,
    };
    // The packed B block: local when parallel (the calling thread may run tasks), else
    // the thread's own reused buffer.
    let mut local_b = Vec::new();
    // A row-major f32 B whose panels are all full is read where it lies (values in
    // attention's P·V): the kernel steps its rows by their stride instead of NR.
    let in_place = match b {
        BOperand::F32(v) if v.cs == 1 && n.is_multiple_of(nr) => Some(v),
        _ => None,
    };
    let run = |bbuf: &mut Vec<f32>| {
        if !matches!(b, BOperand::Packed(_)) && in_place.is_none() {
            bbuf.resize(NC.min(n.div_ceil(nr) * nr) * KC.min(k), 0.0);
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            let n_panels = nc.div_ceil(nr);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // The first block of the depth sets C when it is not accumulated into.
                let add = accumulate || pc > 0;
                let bp: &[f32] = match b {
                    _ if in_place.is_some() => &[],
                    BOperand::Packed(p) => p.block(jc, pc, kc, n_panels),
                    _ => {
                        let bp = &mut bbuf[..n_panels * kc * nr];
                        let pack = |(jp, panel): (usize, &mut [f32])| {
                            pack_b(&b, pc, kc, jc + jp * nr, nr, n, panel)
                        };
                        if threads > 1 {
                            bp.par_chunks_mut(kc * nr).enumerate().for_each(pack);
                        } else {
                            bp.chunks_mut(kc * nr).enumerate().for_each(pack);
                        }
                        bp
                    }
                };
                // Tasks: blocks of MC rows, times column chunks when rows alone are too
                // few to keep every thread busy.
                let ic_blocks = m.div_ceil(MC);
                let n_chunks = if threads > 1 {
                    (4 * threads).div_ceil(ic_blocks).clamp(1, n_panels)
                } else {
                    1
                };
                let per_chunk = n_panels.div_ceil(n_chunks);
                let task = |t: usize| {
                    let (ib, ch) = (t / n_chunks, t % n_chunks);
                    let i0 = ib * MC;
                    let mc = MC.min(m - i0);
                    let jps = ch * per_chunk..((ch + 1) * per_chunk).min(n_panels);
                    let a_panels = mc.div_ceil(mr);
                    let compute = |ap: &[f32]| {
                        let mut tile = [0f32; 16 * 32];
                        for jp in jps.clone() {
                            let j0 = jc + jp * nr;
                            let cols = nr.min(n - j0);
                            let (bpan, ldb) = match in_place {
                                // Rows pc..pc+kc, columns j0..j0+NR, all inside the view.
                                Some(v) => (&v.data[pc * v.rs + j0..], v.rs),
                                None => (&bp[jp * kc * nr..(jp + 1) * kc * nr], nr),
                            };
                            for ip in 0..a_panels {
                                let apan = &ap[ip * kc * mr..(ip + 1) * kc * mr];
                                let r0 = i0 + ip * mr;
                                let rows = mr.min(m - r0);
                                if add {
                                    // SAFETY: the block lies inside C (as for put_tile).
                                    unsafe { c_out.prefetch_tile(r0, rows, j0, cols) };
                                }
                                let (a, b) = (apan.as_ptr(), bpan.as_ptr());
                                if rows == mr && cols == nr && c_out.cs == 1 {
                                    // A whole tile of row-major C: the kernel writes it
                                    // there itself.
                                    // SAFETY: as below, and the MR × NR block at (r0, j0)
                                    // lies inside C with rows c_out.rs apart.
                                    unsafe {
                                        let at = c_out.ptr.add(r0 * c_out.rs + j0);
                                        (kern.f)(kc, a, b, ldb, at, c_out.rs, add)
                                    };
                                    continue;
                                }
                                // SAFETY: the A panel holds kc·MR values, B kc rows of NR
                                // values ldb apart (checked by MatRef::new for a view), the
                                // tile MR·NR; the kernel was chosen for this CPU.
                                unsafe { (kern.f)(kc, a, b, ldb, tile.as_mut_ptr(), nr, false) };
                                // SAFETY: this task alone writes rows i0..i0+mc of
                                // columns jps, inside C (checked by MatMut::new).
                                unsafe { c_out.put_tile(&tile, nr, r0, rows, j0, cols, add) };
                            }
                        }
                    };
                    match a {
                        AOperand::Packed(p) => compute(p.block(pc, kc, i0, mc)),
                        AOperand::View(v) => A_BUF.with(|ab| {
                            let mut ab = ab.borrow_mut();
                            ab.resize(a_panels * kc * mr, 0.0);
                            pack_a(&v, i0, mc, pc, kc, mr, &mut ab);
                            compute(&ab);
                        }),
                    }
                };
                let tasks = ic_blocks * n_chunks;
                if threads > 1 && tasks > 1 {
                    crate::team::for_each(tasks, task);
                } else {
                    (0..tasks).for_each(task);
                }
            }
        }
    };
    if threads > 1 {
        run(&mut local_b);
    } else {
        B_BUF.with(|bb| run(&mut bb.borrow_mut()));
    }
}

/// C's base address for tasks that write disjoint tiles (also bf16mm's).
#[derive(Clone, Copy)]
pub(crate) struct CPtr {
    pub(crate) ptr: *mut f32,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}
// SAFETY: tasks write disjoint elements (see `gemm`).
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl CPtr {
    /// Adds (or with `add` false, stores) the `rows × cols` corner of `tile` into C at
    /// `(r0, c0)`.
    ///
    /// # Safety
    /// Asks the cache for the C block a tile is about to be added to, so that its lines
    /// arrive while the kernel multiplies (C is too large to stay cached between depth
    /// blocks, and the add after the kernel otherwise waits on memory).
    ///
    /// # Safety
    /// The block must lie inside C.
    #[inline(always)]
    unsafe fn prefetch_tile(&self, r0: usize, rows: usize, c0: usize, cols: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.cs == 1 {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            const LINE: usize = 16; // f32 values per 64-byte cache line
            for i in 0..rows {
                let row = self.ptr.add((r0 + i) * self.rs + c0);
                for j in (0..cols).step_by(LINE) {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(j) as *const i8);
                }
                _mm_prefetch::<_MM_HINT_T0>(row.add(cols - 1) as *const i8);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r0, rows, c0, cols);
    }

    /// The block must lie inside C and belong to the caller.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn put_tile(
        &self,
        tile: &[f32],
        ld: usize,
        r0: usize,
        rows: usize,
        c0: usize,
        cols: usize,
        add: bool,
    ) {
        for i in 0..rows {
            let t = &tile[i * ld..i * ld + cols];
            if self.cs == 1 {
                let c = std::slice::from_raw_parts_mut(self.ptr.add((r0 + i) * self.rs + c0), cols);
                if add {
                    for (x, y) in c.iter_mut().zip(t) {
                        *x += *y;
                    }
                } else {
                    c.copy_from_slice(t);
                }
            } else {
                for (j, y) in t.iter().enumerate() {
                    let x = self.ptr.add((r0 + i) * self.rs + (c0 + j) * self.cs);
                    *x = if add { *x + *y } else { *y };
                }
            }
        }
    }
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of A into panels of `mr` rows, each laid out
/// `[kc][mr]`, zero-padding the last panel.
fn pack_a(a: &MatRef<'_>, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize, out: &mut [f32]) {
    for (ip, panel) in out.chunks_mut(kc * mr).enumerate() {
        let rows = mr.min(mc - ip * mr);
        let r0 = i0 + ip * mr;
        if rows < mr {
            panel.fill(0.0);
        }
        if a.rs == 1 {
            // Columns are contiguous: each step is one copy.
            for p in 0..kc {
                let s = (p0 + p) * a.cs + r0;
                panel[p * mr..p * mr + rows].copy_from_slice(&a.data[s..s + rows]);
            }
        } else if a.cs == 1 {
            for ii in 0..rows {
                let s = (r0 + ii) * a.rs + p0;
                for (p, v) in a.data[s..s + kc].iter().enumerate() {
                    panel[p * mr + ii] = *v;
                }
            }
        } else {
            for ii in 0..rows {
                for p in 0..kc {
                    panel[p * mr + ii] = a.at(r0 + ii, p0 + p);
                }
            }
        }
    }
}

/// Packs columns `j0..j0+nr` (clipped at `n`, zero-padded), rows `p0..p0+kc` of B into one
/// panel laid out `[kc][nr]`.
fn pack_b(b: &BOperand<'_>, p0: usize, kc: usize, j0: usize, nr: usize, n: usize, out: &mut [f32]) {
    let cols = nr.min(n - j0);
    if cols < nr {
        out.fill(0.0);
    }
    match b {
        BOperand::F32(v) if v.cs == 1 => {
            for p in 0..kc {
                let s = (p0 + p) * v.rs + j0;
                out[p * nr..p * nr + cols].copy_from_slice(&v.data[s..s + cols]);
            }
        }
        BOperand::F32(v) if v.rs == 1 => {
            // Each column is contiguous (a transposed matrix, as keys in Q·Kᵀ).
            for jj in 0..cols {
                let s = (j0 + jj) * v.cs + p0;
                for (p, x) in v.data[s..s + kc].iter().enumerate() {
                    out[p * nr + jj] = *x;
                }
            }
        }
        BOperand::F32(v) => {
            for jj in 0..cols {
                for p in 0..kc {
                    out[p * nr + jj] = v.at(p0 + p, j0 + jj);
                }
            }
        }
        BOperand::WeightsT(w) => SEG_BUF.with(|seg| {
            let mut seg = seg.borrow_mut();
            seg.resize(kc, 0.0);
            let (be, bb) = (w.dtype.block_elems(), w.dtype.block_bytes());
            let row_bytes = w.bytes.len() / w.rows.max(1);
            // p0 is a multiple of KC, hence of every block size; kc is whole blocks except
            // at the row's end, which is whole blocks by construction.
            let start = p0 / be * bb;
            let len = kc.div_ceil(be) * bb;
            for jj in 0..cols {
                let row = &w.bytes[(j0 + jj) * row_bytes..(j0 + jj + 1) * row_bytes];
                quant::dequantize(w.dtype, &row[start..start + len], &mut seg[..kc]);
                for (p, v) in seg.iter().enumerate() {
                    out[p * nr + jj] = *v;
                }
            }
        }),
        BOperand::Packed(_) => unreachable!("packed operands are not packed again"),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    pub const MR: usize = 12;
    pub const NR: usize = 32;

    /// 12×32 tile in 24 zmm accumulators: two B loads and twelve broadcasts per step.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `kc·MR`, `b` `kc` rows of `NR` values `ldb` apart,
    /// `out` `MR` rows of `NR` values `ldo` apart.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        kernel_rows::<MR>(kc, a, b, ldb, out, ldo, add)
    }

    /// The same for an `R`-row A panel.
    ///
    /// # Safety
    /// As for [`kernel`], with `R` rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_rows<const R: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        let mut c0 = [_mm512_setzero_ps(); R];
        let mut c1 = [_mm512_setzero_ps(); R];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for i in 0..R {
                let ai = _mm512_set1_ps(*a.add(i));
                c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
                c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
            }
            a = a.add(R);
            b = b.add(ldb);
        }
        for i in 0..R {
            for (o, c) in [(out.add(i * ldo), c0[i]), (out.add(i * ldo + 16), c1[i])] {
                let c = if add {
                    _mm512_add_ps(_mm512_loadu_ps(o), c)
                } else {
                    c
                };
                _mm512_storeu_ps(o, c);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    pub const MR: usize = 6;
    pub const NR: usize = 16;

    /// 6×16 tile in 12 ymm accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; sizes as for the AVX-512 kernel.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        kernel_rows::<MR>(kc, a, b, ldb, out, ldo, add)
    }

    /// The same for an `R`-row A panel.
    ///
    /// # Safety
    /// As for [`kernel`], with `R` rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_rows<const R: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        let mut c0 = [_mm256_setzero_ps(); R];
        let mut c1 = [_mm256_setzero_ps(); R];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for i in 0..R {
                let ai = _mm256_broadcast_ss(&*a.add(i));
                c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
                c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
            }
            a = a.add(R);
            b = b.add(ldb);
        }
        for i in 0..R {
            for (o, c) in [(out.add(i * ldo), c0[i]), (out.add(i * ldo + 8), c1[i])] {
                let c = if add {
                    _mm256_add_ps(_mm256_loadu_ps(o), c)
                } else {
                    c
                };
                _mm256_storeu_ps(o, c);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;
    pub const MR: usize = 6;
    pub const NR: usize = 16;

    /// 6×16 tile in 24 of the 32 vector registers: four B loads and six scalar-times-vector
    /// fused multiply-adds per row and step.
    ///
    /// # Safety
    /// `a` holds `kc·MR`, `b` `kc` rows of `NR` values `ldb` apart, `out` `MR` rows of
    /// `NR` values `ldo` apart.
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        kernel_rows::<MR>(kc, a, b, ldb, out, ldo, add)
    }

    /// The same for an `R`-row A panel.
    ///
    /// # Safety
    /// As for [`kernel`], with `R` rows.
    pub unsafe fn kernel_rows<const R: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        let mut c = [[vdupq_n_f32(0.0); 4]; R];
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let bv: [float32x4_t; 4] = std::array::from_fn(|v| vld1q_f32(b.add(4 * v)));
            for (i, c) in c.iter_mut().enumerate() {
                let ai = *a.add(i);
                for v in 0..4 {
                    c[v] = vfmaq_n_f32(c[v], bv[v], ai);
                }
            }
            a = a.add(R);
            b = b.add(ldb);
        }
        for (i, c) in c.iter().enumerate() {
            for (v, c) in c.iter().enumerate() {
                let o = out.add(i * ldo + 4 * v);
                let c = if add { vaddq_f32(vld1q_f32(o), *c) } else { *c };
                vst1q_f32(o, c);
            }
        }
    }
}

mod portable {
    pub const MR: usize = 4;
    pub const NR: usize = 8;

    /// # Safety
    /// Sizes as for the AVX-512 kernel.
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        out: *mut f32,
        ldo: usize,
        add: bool,
    ) {
        let a = std::slice::from_raw_parts(a, kc * MR);
        let mut c = [[0f32; NR]; MR];
        for (p, ap) in a.chunks_exact(MR).enumerate() {
            let bp = std::slice::from_raw_parts(b.add(p * ldb), NR);
            for i in 0..MR {
                for j in 0..NR {
                    c[i][j] += ap[i] * bp[j];
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                let o = out.add(i * ldo + j);
                *o = if add { *o + c[i][j] } else { c[i][j] };
            }
        }
    }
}

/// B of [`gemm_few_rows`], read where it lies: element `(p, j)` at `p·ldb + j` of f32
/// values, or of f16 / bf16 values as little-endian bytes; or q8_0 (a signed byte times an
/// f16 scale, converted exactly as the reference dequantization does) in one of two layouts.
#[derive(Clone, Copy)]
pub enum RowsB<'a> {
    F32(&'a [f32]),
    F16(&'a [u8]),
    BF16(&'a [u8]),
    /// Quantized down the columns: element `(p, j)` is the byte `q[p·ldb + j]` times the f16
    /// scale at element `(p / 32)·ldb + j` of `scales` (blocks of 32 rows of one column,
    /// as cached keys lie transposed).
    Q8Cols {
        q: &'a [u8],
        scales: &'a [u8],
    },
    /// q8_0 blocks along each row (`ldb` values, a multiple of 32, in `ldb / 32 · 34`
    /// bytes): row `p` starts at byte `p · ldb / 32 · 34`, as cached values lie.
    Q8Rows(&'a [u8]),
}

/// Values in a q8_0 block, and its bytes (an f16 scale, then the signed bytes).
const Q8_BLOCK: usize = 32;
const Q8_BLOCK_BYTES: usize = 34;

impl RowsB<'_> {
    /// Elements B holds (for the bounds checks).
    fn len(&self) -> usize {
        match self {
            RowsB::F32(s) => s.len(),
            RowsB::F16(b) | RowsB::BF16(b) => b.len() / 2,
            // (The scales are checked by `gemm_few_rows`.)
            RowsB::Q8Cols { q, .. } => q.len(),
            RowsB::Q8Rows(b) => b.len() / Q8_BLOCK_BYTES * Q8_BLOCK,
        }
    }

    /// Byte offset of row `p`'s column `j` block of a [`RowsB::Q8Rows`] operand (`ldb` a
    /// multiple of the block: linear in `p`, so a loop over rows steps it by one add).
    #[inline(always)]
    fn q8_block(p: usize, j: usize, ldb: usize) -> usize {
        (p * (ldb / Q8_BLOCK) + j / Q8_BLOCK) * Q8_BLOCK_BYTES
    }

    /// Element `(p, j)` as f32 (exact conversion).
    #[inline(always)]
    fn at(&self, p: usize, j: usize, ldb: usize) -> f32 {
        let i = p * ldb + j;
        match self {
            RowsB::F32(s) => s[i],
            RowsB::F16(b) => gemma3_formats::quant::f16_at(b, 2 * i),
            RowsB::BF16(b) => {
                f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
            }
            RowsB::Q8Cols { q, scales } => {
                let s = gemma3_formats::quant::f16_at(scales, 2 * ((p / Q8_BLOCK) * ldb + j));
                q[i] as i8 as f32 * s
            }
            RowsB::Q8Rows(b) => {
                let at = Self::q8_block(p, j, ldb);
                let s = gemma3_formats::quant::f16_at(b, at);
                b[at + 2 + j % Q8_BLOCK] as i8 as f32 * s
            }
        }
    }
}

/// Bytes a few-row product asks the memory for while it multiplies, spread over its
/// steps: the B of the product that follows it (attention's values while it multiplies the
/// keys of a block, the next block's keys while it multiplies values), so that product
/// finds its operand in the caches instead of waiting on its first pass over it.
#[derive(Clone, Copy)]
// (Only x86 asks for the bytes: NEON's prefetch intrinsics are not stable Rust.)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct Warm<'a> {
    /// Where each of two byte runs starts, and its length.
    parts: [(*const i8, usize); 2],
    /// Whether the product's own B was asked for by the product before it.
    b_warm: bool,
    borrow: PhantomData<&'a [u8]>,
}

impl<'a> Warm<'a> {
    /// Nothing to ask for.
    pub const NONE: Warm<'static> = Warm {
        parts: [(std::ptr::null(), 0); 2],
        b_warm: false,
        borrow: PhantomData,
    };

    /// Every byte `b` reads.
    pub fn of(b: RowsB<'a>) -> Self {
        let run = |p: *const u8, len: usize| (p.cast::<i8>(), len);
        let parts = match b {
            RowsB::F32(s) => [run(s.as_ptr().cast(), 4 * s.len()), (std::ptr::null(), 0)],
            RowsB::F16(s) | RowsB::BF16(s) | RowsB::Q8Rows(s) => {
                [run(s.as_ptr(), s.len()), (std::ptr::null(), 0)]
            }
            RowsB::Q8Cols { q, scales } => {
                [run(q.as_ptr(), q.len()), run(scales.as_ptr(), scales.len())]
            }
        };
        Warm {
            parts,
            b_warm: false,
            borrow: PhantomData,
        }
    }

    /// Says whether this product's own B was asked for already (it was the `Warm` of the
    /// product before): then it does not ask for B's rows far ahead itself, which only
    /// costs instructions once they are in the caches.
    pub fn b_warm(self, yes: bool) -> Self {
        Warm {
            b_warm: yes,
            ..self
        }
    }

    /// Cache lines in all.
    #[cfg(target_arch = "x86_64")]
    fn lines(&self) -> usize {
        self.parts.iter().map(|p| p.1.div_ceil(64)).sum()
    }

    /// Lines `from .. to` of [`Warm::lines`], for one chunk of a product to ask for.
    #[cfg(target_arch = "x86_64")]
    fn share(&self, from: usize, to: usize) -> WarmLines {
        WarmLines {
            first: self.parts[0].0,
            first_lines: self.parts[0].1.div_ceil(64),
            second: self.parts[1].0,
            next: from,
            end: to,
        }
    }
}

/// A run of [`Warm`]'s lines that one chunk asks for, one per step.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct WarmLines {
    first: *const i8,
    first_lines: usize,
    second: *const i8,
    next: usize,
    end: usize,
}

#[cfg(target_arch = "x86_64")]
impl WarmLines {
    /// Asks for the next line into the second-level cache, if any is left.
    #[inline(always)]
    fn step(&mut self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        if self.next < self.end {
            let at = if self.next < self.first_lines {
                self.first.wrapping_add(64 * self.next)
            } else {
                self.second
                    .wrapping_add(64 * (self.next - self.first_lines))
            };
            // SAFETY: a prefetch reads nothing architecturally and never faults; the
            // address lies in (or one line-rounding past the end of) a slice we borrow.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(at) };
            self.next += 1;
        }
    }
}

/// The most rows [`gemm_few_rows`] takes (one position's query heads per kv head).
pub const FEW_ROWS: usize = 4;

/// `C = A·B` (or `C += A·B` with `accumulate`) for at most [`FEW_ROWS`] rows: A row-major
/// with row stride `lda`, B `k × n` read in place in its stored type, C row-major with row
/// stride `ldc`. Each element is what the micro-kernels compute (one multiply-add chain
/// over `p` from zero, fused where the level has FMA, then stored or added to C), so the
/// result equals [`gemm`]'s on B converted to f32, bit for bit: attention's decode rows
/// use this without converting or packing B, its prompt tiles use `gemm`. `warm`: bytes
/// to bring toward the caches meanwhile (see [`Warm`]); they change no result.
#[allow(clippy::too_many_arguments)]
pub fn gemm_few_rows(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: RowsB<'_>,
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    warm: Warm<'_>,
) {
    assert!(m <= FEW_ROWS, "gemm_few_rows: {m} rows");
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k, "gemm_few_rows: A too short");
    assert!(
        k == 0 || b.len() >= (k - 1) * ldb + n,
        "gemm_few_rows: B too short"
    );
    match b {
        RowsB::Q8Rows(_) => assert!(
            ldb.is_multiple_of(Q8_BLOCK) && n <= ldb,
            "gemm_few_rows: q8_0 rows of {ldb} values"
        ),
        RowsB::Q8Cols { scales, .. } => assert!(
            k == 0 || scales.len() / 2 >= (k - 1) / Q8_BLOCK * ldb + n,
            "gemm_few_rows: q8_0 scales too short"
        ),
        _ => {}
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_few_rows: C too short");
    #[cfg(not(target_arch = "x86_64"))]
    let _ = warm;
    #[cfg(target_arch = "x86_64")]
    match crate::simd::level() {
        // SAFETY: the level says the features are there; the slices were checked above to
        // hold every element the kernels touch.
        crate::simd::Level::Avx512 => {
            return unsafe { few_avx512::run(m, k, n, a, lda, b, ldb, c, ldc, accumulate, warm) }
        }
        crate::simd::Level::Avx2 => {
            return unsafe { few_avx2::run(m, k, n, a, lda, b, ldb, c, ldc, accumulate, warm) }
        }
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if crate::simd::level() == crate::simd::Level::Neon {
        // SAFETY: NEON is part of every aarch64 CPU; the slices were checked above to hold
        // every element the kernel touches.
        return unsafe { few_neon::run(m, k, n, a, lda, b, ldb, c, ldc, accumulate) };
    }
    // The portable micro-kernel: `c += a·b` unfused, from zero.
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc += a[i * lda + p] * b.at(p, j, ldb);
            }
            let o = &mut c[i * ldc + j];
            *o = if accumulate { *o + acc } else { acc };
        }
    }
}

/// `$call` with `$src` bound to `$b` wrapped in the calling module's `Src` type for its
/// variant (`F32s`, `F16s`, `BF16s`, `Q8Cols`, `Q8Rows`): one loop per stored type, with no
/// branch on the type inside (the x86 few-row modules).
#[cfg(target_arch = "x86_64")]
macro_rules! with_src {
    ($b:expr, $src:ident => $call:expr) => {
        match $b {
            RowsB::F32(s) => {
                let $src = F32s(s);
                $call
            }
            RowsB::F16(s) => {
                let $src = F16s(s);
                $call
            }
            RowsB::BF16(s) => {
                let $src = BF16s(s);
                $call
            }
            RowsB::Q8Cols { q, scales } => {
                let $src = Q8Cols(q, scales);
                $call
            }
            RowsB::Q8Rows(s) => {
                let $src = Q8Rows(s);
                $call
            }
        }
    };
}

/// A's rows as the x86 few-row loops read them: interleaved once per call (see
/// [`interleave`]), into a buffer each thread grows once to the longest `k` it has seen.
#[cfg(target_arch = "x86_64")]
mod few_a {
    use super::{WarmLines, FEW_ROWS};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Which vector of B a loop's `Src::load` reads: vector `v` of row `p`'s chunk from
    /// column `j`, so its `LANES` elements from column `j + LANES * v`.
    #[derive(Clone, Copy)]
    pub(super) struct At {
        pub p: usize,
        pub j: usize,
        pub v: usize,
    }

    impl At {
        /// The vector's first column.
        #[inline(always)]
        pub fn col<const LANES: usize>(self) -> usize {
            self.j + LANES * self.v
        }
        /// The vector's first element in B, rows `ldb` apart.
        #[inline(always)]
        pub fn elem<const LANES: usize>(self, ldb: usize) -> usize {
            self.p * ldb + self.col::<LANES>()
        }
    }

    thread_local! {
        /// A's rows interleaved (see [`interleave`]).
        static A_T: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// `f` of A's first `m` rows (`k` values each, `lda` apart) interleaved.
    #[inline(always)]
    pub(super) fn with_interleaved<R>(
        m: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        f: impl FnOnce(&[f32]) -> R,
    ) -> R {
        A_T.with(|a4| {
            let mut a4 = a4.borrow_mut();
            if a4.len() < k * FEW_ROWS {
                a4.resize(k * FEW_ROWS, 0.0);
            }
            interleave(m, k, a, lda, &mut a4);
            f(&a4)
        })
    }

    /// A's first `m` rows interleaved into `at`: element `(i, p)` at `at[p·FEW_ROWS + i]`
    /// (rows past `m` repeat row 0, unread), so that a loop reads each step's A values from
    /// one pointer instead of keeping a register (or a stack slot) per row. (Inlined into
    /// its caller, so its instructions take the caller's encoding.)
    #[inline(always)]
    fn interleave(m: usize, k: usize, a: &[f32], lda: usize, at: &mut [f32]) {
        const { assert!(FEW_ROWS == 4, "the transpose below is 4 × 4") };
        assert!(m >= 1 && a.len() >= (m - 1) * lda + k && at.len() >= k * FEW_ROWS);
        let row = |i: usize| if i < m { i * lda } else { 0 };
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let mut p = 0;
        while p + 4 <= k {
            // SAFETY: SSE is part of every x86-64 CPU; each row's `p .. p + 4` lies in `a`
            // and `at` holds `k · FEW_ROWS` values (asserted above).
            unsafe {
                // A 4 × 4 transpose: rows `i` at columns `p .. p + 4` to columns `i` at rows.
                let x0 = _mm_loadu_ps(a.as_ptr().add(r0 + p));
                let x1 = _mm_loadu_ps(a.as_ptr().add(r1 + p));
                let x2 = _mm_loadu_ps(a.as_ptr().add(r2 + p));
                let x3 = _mm_loadu_ps(a.as_ptr().add(r3 + p));
                let (t0, t1) = (_mm_unpacklo_ps(x0, x1), _mm_unpacklo_ps(x2, x3));
                let (t2, t3) = (_mm_unpackhi_ps(x0, x1), _mm_unpackhi_ps(x2, x3));
                let o = at.as_mut_ptr().add(p * FEW_ROWS);
                _mm_storeu_ps(o, _mm_movelh_ps(t0, t1));
                _mm_storeu_ps(o.add(4), _mm_movehl_ps(t1, t0));
                _mm_storeu_ps(o.add(8), _mm_movelh_ps(t2, t3));
                _mm_storeu_ps(o.add(12), _mm_movehl_ps(t3, t2));
            }
            p += 4;
        }
        for p in p..k {
            for (i, r) in [r0, r1, r2, r3].into_iter().enumerate() {
                at[p * FEW_ROWS + i] = a[r + p];
            }
        }
    }

    /// Steps `p0 .. p1` of a chunk, two a turn: `step(p)` for each, with `per_turn` of
    /// `warm`'s lines asked for each turn (half of them, rounded up, before a last odd step).
    #[inline(always)]
    pub(super) fn two_a_turn(
        (p0, p1): (usize, usize),
        per_turn: usize,
        warm: &mut WarmLines,
        mut step: impl FnMut(usize),
    ) {
        let mut p = p0;
        while p + 2 <= p1 {
            for _ in 0..per_turn {
                warm.step();
            }
            step(p);
            step(p + 1);
            p += 2;
        }
        if p < p1 {
            for _ in 0..per_turn.div_ceil(2) {
                warm.step();
            }
            step(p);
        }
    }

    /// Asks for every line of the `bytes` bytes from `at` into the first-level cache.
    #[inline(always)]
    pub(super) fn prefetch_span(at: *const i8, bytes: usize) {
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch reads nothing architecturally and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off)) };
            off += 64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod few_avx512 {
    use super::few_a::{prefetch_span, two_a_turn, with_interleaved, At};
    use super::{RowsB, Warm, WarmLines, FEW_ROWS, Q8_BLOCK};
    use std::arch::x86_64::*;

    /// Rows ahead that [`chunk`] asks the memory for.
    const PREFETCH: usize = 8;

    /// Rows ahead that the first [`chunk`] asks for whole (all `n` columns), so that the
    /// later chunks find B's rows in the caches instead of waiting for memory.
    const PREFETCH_ROWS: usize = 16;

    /// Vectors per [`chunk`]: two 64-byte lines of f16 per row of B, so B's rows are read
    /// in long runs, and 4 × rows chains hide the FMA latency.
    const V: usize = 4;

    /// Columns per [`chunk`].
    const WIDTH: usize = 16 * V;

    /// One row of a chunk's B, or what its rows share.
    type Vecs = [__m512; V];

    /// How [`chunk`] reads B: one implementation per [`RowsB`] variant, so each gets its
    /// own loop with no branch on the type inside.
    trait Src: Copy {
        /// Where row `p`'s [`WIDTH`] elements from column `j` start, and the bytes they span.
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize);
        /// Where row `p` starts, and how many bytes on its last element starts (of the
        /// first `n`).
        #[inline(always)]
        fn row(self, p: usize, n: usize, ldb: usize) -> (*const i8, usize) {
            let (at, _) = self.span(p, 0, ldb);
            let (last, _) = self.span(p, n - 1, ldb);
            (at, last as usize - at as usize)
        }
        /// The vector `at` names (its `mask` lanes) as f32, given what [`Src::shared`] gave
        /// for the block its row is in.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL; the elements must be in B.
        unsafe fn load(self, shared: &Vecs, at: At, ldb: usize, mask: __mmask16) -> __m512;
        /// Rows that share what [`Src::shared`] reads (blocks aligned to row 0).
        const SHARED_ROWS: usize = usize::MAX;
        /// `Warm` lines a chunk asks for per turn of two steps: its share of bytes stored
        /// like B (attention warms the other operand of the same cache) is two rows of
        /// [`WIDTH`] elements' lines per turn, spread evenly.
        const WARM_PER_TURN: usize = 4;
        /// What rows `p .. p + SHARED_ROWS` share for the chunk's columns from `j` (the
        /// `masks` lanes): read once per block of rows instead of once per row.
        ///
        /// # Safety
        /// As [`Src::load`].
        #[inline(always)]
        unsafe fn shared(self, _p: usize, _j: usize, _ldb: usize, _m: &[__mmask16; V]) -> Vecs {
            [_mm512_setzero_ps(); V]
        }
    }

    /// A chunk's [`V`] vectors: `f(v, mask)` for each vector its `masks` reach (every one,
    /// if `FULL`), zero for the others.
    #[inline(always)]
    fn each<const FULL: bool>(
        masks: &[__mmask16; V],
        f: impl Fn(usize, __mmask16) -> __m512,
    ) -> Vecs {
        // SAFETY: a zero vector needs only AVX-512 F, which every caller's target enables.
        std::array::from_fn(|v| {
            if FULL || masks[v] != 0 {
                f(v, masks[v])
            } else {
                unsafe { _mm512_setzero_ps() }
            }
        })
    }

    #[derive(Clone, Copy)]
    struct F32s<'a>(&'a [f32]);
    #[derive(Clone, Copy)]
    struct F16s<'a>(&'a [u8]);
    #[derive(Clone, Copy)]
    struct BF16s<'a>(&'a [u8]);
    #[derive(Clone, Copy)]
    struct Q8Cols<'a>(&'a [u8], &'a [u8]);
    #[derive(Clone, Copy)]
    struct Q8Rows<'a>(&'a [u8]);

    impl Src for F32s<'_> {
        const WARM_PER_TURN: usize = 8;
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(p * ldb + j).cast(), 256)
        }
        #[inline(always)]
        unsafe fn load(self, _: &Vecs, at: At, ldb: usize, mask: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(mask, self.0.as_ptr().add(at.elem::<16>(ldb)))
        }
    }

    impl Src for F16s<'_> {
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(2 * (p * ldb + j)).cast(), 128)
        }
        #[inline(always)]
        unsafe fn load(self, _: &Vecs, at: At, ldb: usize, mask: __mmask16) -> __m512 {
            let at = self.0.as_ptr().add(2 * at.elem::<16>(ldb));
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at.cast()))
        }
    }

    impl Src for BF16s<'_> {
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(2 * (p * ldb + j)).cast(), 128)
        }
        #[inline(always)]
        unsafe fn load(self, _: &Vecs, at: At, ldb: usize, mask: __mmask16) -> __m512 {
            let at = self.0.as_ptr().add(2 * at.elem::<16>(ldb));
            let h = _mm256_maskz_loadu_epi16(mask, at.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// q8_0 as the reference dequantizes it: the byte times the f16 scale, in f32 (exact).
    #[inline(always)]
    unsafe fn q8_times(q: __m128i, d: __m512) -> __m512 {
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d)
    }

    impl Q8Cols<'_> {
        /// The bytes of row `p` from column `j`, 16 of them (the `mask` lanes).
        #[inline(always)]
        unsafe fn bytes(self, p: usize, j: usize, ldb: usize, mask: __mmask16) -> __m128i {
            _mm_maskz_loadu_epi8(mask, self.0.as_ptr().add(p * ldb + j).cast())
        }
        /// The scales of columns `j .. j + 16` (the `mask` lanes) for the block row `p` is in.
        #[inline(always)]
        unsafe fn scales(self, p: usize, j: usize, ldb: usize, mask: __mmask16) -> __m512 {
            let at = 2 * ((p / Q8_BLOCK) * ldb + j);
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                self.1.as_ptr().add(at).cast(),
            ))
        }
    }

    impl Src for Q8Cols<'_> {
        const WARM_PER_TURN: usize = 3;
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(p * ldb + j).cast(), 64)
        }
        /// The bytes times the column scales [`Src::shared`] converted for the block.
        #[inline(always)]
        unsafe fn load(self, d: &Vecs, at: At, ldb: usize, mask: __mmask16) -> __m512 {
            q8_times(self.bytes(at.p, at.col::<16>(), ldb, mask), d[at.v])
        }
        /// A column's scale serves its 32 rows: [`chunk`] converts it once per block
        /// rather than once per row.
        const SHARED_ROWS: usize = Q8_BLOCK;
        #[inline(always)]
        unsafe fn shared(self, p: usize, j: usize, ldb: usize, masks: &[__mmask16; V]) -> Vecs {
            each::<false>(masks, |v, mask| self.scales(p, j + 16 * v, ldb, mask))
        }
    }

    impl Q8Rows<'_> {
        /// Row `p`'s scale for column `j`'s block, splat, and where that block's bytes start.
        #[inline(always)]
        unsafe fn scale(self, p: usize, j: usize, ldb: usize) -> (__m512, *const u8) {
            let at = RowsB::q8_block(p, j, ldb);
            let h = (self.0.as_ptr().add(at) as *const u16).read_unaligned();
            // A splat, not a scalar in lane 0: LLVM would fill the other lanes from whatever
            // register is free, often an accumulator, and chain each row onto the last FMA.
            let d = _mm512_cvtph_ps(_mm256_set1_epi16(h as i16));
            (d, self.0.as_ptr().add(at + 2 + j % Q8_BLOCK))
        }
    }

    impl Src for Q8Rows<'_> {
        const WARM_PER_TURN: usize = 3;
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            let at = RowsB::q8_block(p, j, ldb);
            (
                self.0.as_ptr().wrapping_add(at).cast(),
                2 * super::Q8_BLOCK_BYTES,
            )
        }
        /// A chunk's columns are two blocks (`j` is a multiple of [`WIDTH`]): a block's two
        /// vectors name the same scale, so it is read once for both (and the second
        /// block's only where the chunk reaches it).
        #[inline(always)]
        unsafe fn load(self, _: &Vecs, at: At, ldb: usize, mask: __mmask16) -> __m512 {
            const { assert!(WIDTH == 2 * Q8_BLOCK) };
            let (d, q) = self.scale(at.p, at.j + Q8_BLOCK * (at.v / 2), ldb);
            q8_times(_mm_maskz_loadu_epi8(mask, q.add(16 * (at.v % 2)).cast()), d)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        lda: usize,
        b: RowsB<'_>,
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
        warm: Warm<'_>,
    ) {
        with_interleaved(
            m,
            k,
            a,
            lda,
            |a4| with_src!(b, src => rows(k, n, a4, src, ldb, c, ldc, accumulate, warm, m)),
        );
    }

    /// Columns [`WIDTH`] at a time, the last chunk masked where B ends; A's `m` rows
    /// interleaved in `a4`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<S: Src>(
        k: usize,
        n: usize,
        a4: &[f32],
        b: S,
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
        warm: Warm<'_>,
        m: usize,
    ) {
        let args = (k, n, a4, b, ldb, accumulate);
        // Each column chunk asks for its share of `warm`'s lines.
        let (lines, chunks) = (warm.lines(), n.div_ceil(WIDTH));
        let share =
            |j: usize| warm.share(j / WIDTH * lines / chunks, (j / WIDTH + 1) * lines / chunks);
        let mut j = 0;
        while j < n {
            let c = &mut c[j..];
            macro_rules! go {
                ($full:literal, $ahead:literal) => {
                    match m {
                        1 => chunk::<1, $full, $ahead, S>(args, j, c, ldc, share(j)),
                        2 => chunk::<2, $full, $ahead, S>(args, j, c, ldc, share(j)),
                        3 => chunk::<3, $full, $ahead, S>(args, j, c, ldc, share(j)),
                        _ => chunk::<4, $full, $ahead, S>(args, j, c, ldc, share(j)),
                    }
                };
            }
            // The first chunk asks for B's whole rows ahead, unless B was asked for already.
            match (j + WIDTH <= n, j == 0 && !warm.b_warm) {
                (true, true) => go!(true, true),
                (true, false) => go!(true, false),
                (false, _) => go!(false, false),
            }
            j += WIDTH;
        }
    }

    /// The `R` rows of C's columns `j .. j + WIDTH` (fewer where B ends, unless `FULL`),
    /// into `c` (C from column `j`); with `AHEAD`, asking for B's whole rows well ahead
    /// (the first chunk).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    #[allow(clippy::type_complexity)]
    unsafe fn chunk<const R: usize, const FULL: bool, const AHEAD: bool, S: Src>(
        (k, n, a4, b, ldb, accumulate): (usize, usize, &[f32], S, usize, bool),
        j: usize,
        c: &mut [f32],
        ldc: usize,
        mut warm: WarmLines,
    ) {
        const { assert!(R <= FEW_ROWS) };
        let masks: [__mmask16; V] = std::array::from_fn(|v| {
            let left = n.saturating_sub(j + 16 * v).min(16);
            if FULL || left == 16 {
                0xffff
            } else {
                ((1u32 << left) - 1) as __mmask16
            }
        });
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut p0 = 0;
        while p0 < k {
            let p1 = p0.saturating_add(S::SHARED_ROWS).min(k);
            let shared = b.shared(p0, j, ldb, &masks);
            // One step of `p`: ask for what comes later, then multiply row `p` of B.
            let step = |p: usize| {
                // B's rows lie `ldb` apart: the first chunk asks for whole rows well
                // ahead (unless B was asked for already), the others for their own
                // columns a few steps ahead.
                if AHEAD && p + PREFETCH_ROWS < k {
                    let (at, last) = b.row(p + PREFETCH_ROWS, n, ldb);
                    prefetch_span(at, last + 1);
                } else if p + PREFETCH < k {
                    let (at, bytes) = b.span(p + PREFETCH, j, ldb);
                    prefetch_span(at, bytes);
                }
                let bv = each::<FULL>(&masks, |v, mask| b.load(&shared, At { p, j, v }, ldb, mask));
                let a = a4.as_ptr().add(p * FEW_ROWS);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i));
                    for v in 0..V {
                        acc[v] = _mm512_fmadd_ps(ai, bv[v], acc[v]);
                    }
                }
            };
            // Two steps a turn, with `S::WARM_PER_TURN` of `warm`'s lines asked for per turn.
            two_a_turn((p0, p1), S::WARM_PER_TURN, &mut warm, step);
            p0 = p1;
        }
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..V {
                if !FULL && masks[v] == 0 {
                    continue;
                }
                let o = c.as_mut_ptr().add(i * ldc + 16 * v);
                let x = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], o), acc[v])
                } else {
                    acc[v]
                };
                _mm512_mask_storeu_ps(o, masks[v], x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod few_avx2 {
    use super::few_a::{prefetch_span, two_a_turn, with_interleaved, At};
    use super::{RowsB, Warm, WarmLines, FEW_ROWS, Q8_BLOCK};
    use std::arch::x86_64::*;

    /// Columns per [`chunk`] (its widest).
    const WIDTH: usize = 16;

    /// Rows ahead that [`chunk`] asks the memory for.
    const PREFETCH: usize = 8;

    /// Rows ahead that the first [`chunk`] asks for whole (all `n` columns), so that the
    /// later chunks find B's rows in the caches instead of waiting for memory.
    const PREFETCH_ROWS: usize = 16;

    /// How [`chunk`] reads B: one implementation per [`RowsB`] variant, so each gets its
    /// own loop with no branch on the type inside (as in `few_avx512`).
    trait Src: Copy {
        /// Where row `p`'s 16 elements from column `j` start, and the bytes they span.
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize);
        /// Where row `p` starts, and how many bytes on its last element starts (of the
        /// first `n`).
        #[inline(always)]
        fn row(self, p: usize, n: usize, ldb: usize) -> (*const i8, usize) {
            let (at, _) = self.span(p, 0, ldb);
            let (last, _) = self.span(p, n - 1, ldb);
            (at, last as usize - at as usize)
        }
        /// The vector `at` names (`at.v` 0 or 1: the first or second 8 of the 16 elements
        /// from column `at.j`) as f32, given what [`Src::shared`] gave for the block its row
        /// is in.
        ///
        /// # Safety
        /// AVX2 and F16C; the elements must be in B.
        unsafe fn load(self, shared: &[__m256; 2], at: At, ldb: usize) -> __m256;
        /// Rows that share what [`Src::shared`] reads (blocks aligned to row 0).
        const SHARED_ROWS: usize = usize::MAX;
        /// `Warm` lines a chunk asks for per turn of two steps. A chunk's share is about
        /// one line per turn where the bytes `warm` names are stored like B (attention warms
        /// the other operand of the same cache): spread that thin, they leave the memory to
        /// B's own rows. f32 has twice the lines.
        const WARM_PER_TURN: usize = 1;
        /// What rows `p .. p + SHARED_ROWS` share for columns `j .. j + 8` (and `j + 16`
        /// when `two`): read once per block of rows instead of once per row.
        ///
        /// # Safety
        /// As [`Src::load`].
        #[inline(always)]
        unsafe fn shared(self, _p: usize, _j: usize, _ldb: usize, _two: bool) -> [__m256; 2] {
            [_mm256_setzero_ps(); 2]
        }
        /// Row `p`'s 16 elements from column `j` (`j` a multiple of 16), or, unless `TWO`,
        /// its 8 twice, given what [`Src::shared`] gave for the block row `p` is in.
        ///
        /// # Safety
        /// As [`Src::load`].
        #[inline(always)]
        unsafe fn load_shared<const TWO: bool>(
            self,
            shared: [__m256; 2],
            p: usize,
            j: usize,
            ldb: usize,
        ) -> [__m256; 2] {
            let first = self.load(&shared, At { p, j, v: 0 }, ldb);
            [
                first,
                if TWO {
                    self.load(&shared, At { p, j, v: 1 }, ldb)
                } else {
                    first
                },
            ]
        }
    }

    #[derive(Clone, Copy)]
    struct F32s<'a>(&'a [f32]);
    #[derive(Clone, Copy)]
    struct F16s<'a>(&'a [u8]);
    #[derive(Clone, Copy)]
    struct BF16s<'a>(&'a [u8]);
    #[derive(Clone, Copy)]
    struct Q8Cols<'a>(&'a [u8], &'a [u8]);
    #[derive(Clone, Copy)]
    struct Q8Rows<'a>(&'a [u8]);

    impl Src for F32s<'_> {
        const WARM_PER_TURN: usize = 2;
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(p * ldb + j).cast(), 64)
        }
        #[inline(always)]
        unsafe fn load(self, _: &[__m256; 2], at: At, ldb: usize) -> __m256 {
            _mm256_loadu_ps(self.0.as_ptr().add(at.elem::<8>(ldb)))
        }
    }

    impl Src for F16s<'_> {
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(2 * (p * ldb + j)).cast(), 32)
        }
        #[inline(always)]
        unsafe fn load(self, _: &[__m256; 2], at: At, ldb: usize) -> __m256 {
            let at = self.0.as_ptr().add(2 * at.elem::<8>(ldb));
            _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))
        }
    }

    impl Src for BF16s<'_> {
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(2 * (p * ldb + j)).cast(), 32)
        }
        #[inline(always)]
        unsafe fn load(self, _: &[__m256; 2], at: At, ldb: usize) -> __m256 {
            let x = _mm_loadu_si128(self.0.as_ptr().add(2 * at.elem::<8>(ldb)).cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(x)))
        }
    }

    /// q8_0 as the reference dequantizes it: the byte times the f16 scale, in f32 (exact).
    #[inline(always)]
    unsafe fn q8_times(q: __m128i, d: __m256) -> __m256 {
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
    }

    impl Q8Cols<'_> {
        /// The bytes of row `p` from column `j`, 8 of them.
        #[inline(always)]
        unsafe fn bytes(self, p: usize, j: usize, ldb: usize) -> __m128i {
            _mm_loadl_epi64(self.0.as_ptr().add(p * ldb + j).cast())
        }
        /// The scales of columns `j .. j + 8` for the block row `p` is in.
        #[inline(always)]
        unsafe fn scales(self, p: usize, j: usize, ldb: usize) -> __m256 {
            let at = 2 * ((p / Q8_BLOCK) * ldb + j);
            _mm256_cvtph_ps(_mm_loadu_si128(self.1.as_ptr().add(at).cast()))
        }
    }

    impl Src for Q8Cols<'_> {
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            (self.0.as_ptr().wrapping_add(p * ldb + j).cast(), 16)
        }
        /// The bytes times the column scales [`Src::shared`] converted for the block: two
        /// 8-byte loads, each widened straight from memory (no shuffle).
        #[inline(always)]
        unsafe fn load(self, d: &[__m256; 2], at: At, ldb: usize) -> __m256 {
            q8_times(self.bytes(at.p, at.col::<8>(), ldb), d[at.v])
        }
        /// A column's scale serves its 32 rows: [`chunk`] converts it once per block
        /// rather than once per row.
        const SHARED_ROWS: usize = Q8_BLOCK;
        #[inline(always)]
        unsafe fn shared(self, p: usize, j: usize, ldb: usize, two: bool) -> [__m256; 2] {
            let d0 = self.scales(p, j, ldb);
            [d0, if two { self.scales(p, j + 8, ldb) } else { d0 }]
        }
    }

    impl Q8Rows<'_> {
        /// Row `p`'s scale for column `j`'s block, and where that block's bytes start.
        #[inline(always)]
        unsafe fn scale(self, p: usize, j: usize, ldb: usize) -> (__m256, *const u8) {
            let at = RowsB::q8_block(p, j, ldb);
            let h = (self.0.as_ptr().add(at) as *const u16).read_unaligned();
            // A splat, as in `few_avx512`'s `Q8Rows`.
            let d = _mm256_cvtph_ps(_mm_set1_epi16(h as i16));
            (d, self.0.as_ptr().add(at + 2 + j % Q8_BLOCK))
        }
    }

    impl Src for Q8Rows<'_> {
        #[inline(always)]
        fn span(self, p: usize, j: usize, ldb: usize) -> (*const i8, usize) {
            let at = RowsB::q8_block(p, j, ldb);
            (self.0.as_ptr().wrapping_add(at).cast(), 18)
        }
        /// Both halves lie in one block (16 divides 32) and name the same scale, which is
        /// read once for both; each half is an 8-byte load widened straight from memory.
        #[inline(always)]
        unsafe fn load(self, _: &[__m256; 2], at: At, ldb: usize) -> __m256 {
            let (d, q) = self.scale(at.p, at.j, ldb);
            q8_times(_mm_loadl_epi64(q.add(8 * at.v).cast()), d)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        lda: usize,
        b: RowsB<'_>,
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
        warm: Warm<'_>,
    ) {
        // The last `n % 8` columns go as one more chunk of 8, the one that ends at `n` (it
        // overlaps the chunk before, whose columns it computes again and drops). Not for
        // q8_0 rows, whose 8 columns must lie in one block (attention's values have none
        // left over: their columns are the head dimension).
        let last = n / 8 * 8;
        let tail = n >= 8 && last < n && !matches!(b, RowsB::Q8Rows(_));
        with_interleaved(
            m,
            k,
            a,
            lda,
            |a4| with_src!(b, src => rows(k, n, a4, src, ldb, c, ldc, accumulate, warm, m, tail)),
        );
        if tail {
            return;
        }
        // Otherwise one by one, with the same fused multiply-adds.
        for j in last..n {
            for i in 0..m {
                let mut acc = 0f32;
                for p in 0..k {
                    acc = a[i * lda + p].mul_add(b.at(p, j, ldb), acc);
                }
                let o = &mut c[i * ldc + j];
                *o = if accumulate { *o + acc } else { acc };
            }
        }
    }

    /// Columns 16 at a time (two vectors per row, up to eight chains), then 8, then (with
    /// `tail`) the last few in the 8 that end at `n`; A's `m` rows interleaved in `a4` (see
    /// [`super::few_a`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<S: Src>(
        k: usize,
        n: usize,
        a4: &[f32],
        b: S,
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
        warm: Warm<'_>,
        m: usize,
        tail: bool,
    ) {
        let args = (k, n, a4, b, ldb, accumulate);
        // Each column chunk asks for its share of `warm`'s lines.
        let (lines, chunks) = (warm.lines(), n.div_ceil(WIDTH));
        let share =
            |j: usize| warm.share(j / WIDTH * lines / chunks, (j / WIDTH + 1) * lines / chunks);
        let mut j = 0;
        while j + 8 <= n {
            let c = &mut c[j..];
            let two = j + 16 <= n;
            // The first chunk asks for B's whole rows ahead, unless B was asked for already.
            let ahead = j == 0 && !warm.b_warm;
            match (m, two, ahead) {
                (1, true, true) => chunk::<1, true, true, S>(args, j, c, ldc, share(j)),
                (2, true, true) => chunk::<2, true, true, S>(args, j, c, ldc, share(j)),
                (3, true, true) => chunk::<3, true, true, S>(args, j, c, ldc, share(j)),
                (_, true, true) => chunk::<4, true, true, S>(args, j, c, ldc, share(j)),
                (1, true, false) => chunk::<1, true, false, S>(args, j, c, ldc, share(j)),
                (2, true, false) => chunk::<2, true, false, S>(args, j, c, ldc, share(j)),
                (3, true, false) => chunk::<3, true, false, S>(args, j, c, ldc, share(j)),
                (_, true, false) => chunk::<4, true, false, S>(args, j, c, ldc, share(j)),
                (1, false, _) => chunk::<1, false, false, S>(args, j, c, ldc, share(j)),
                (2, false, _) => chunk::<2, false, false, S>(args, j, c, ldc, share(j)),
                (3, false, _) => chunk::<3, false, false, S>(args, j, c, ldc, share(j)),
                (_, false, _) => chunk::<4, false, false, S>(args, j, c, ldc, share(j)),
            }
            j += if two { 16 } else { 8 };
        }
        if tail {
            // Columns `n - 8 .. n` into a tile, of which the last `n - j` are kept (added to
            // C as the chunks add theirs: one rounding).
            let (mut t, j0) = ([0f32; FEW_ROWS * 8], n - 8);
            let args = (k, n, a4, b, ldb, false);
            match m {
                1 => chunk::<1, false, false, S>(args, j0, &mut t, 8, share(j0)),
                2 => chunk::<2, false, false, S>(args, j0, &mut t, 8, share(j0)),
                3 => chunk::<3, false, false, S>(args, j0, &mut t, 8, share(j0)),
                _ => chunk::<4, false, false, S>(args, j0, &mut t, 8, share(j0)),
            }
            for i in 0..m {
                let row = &mut c[i * ldc + j..i * ldc + n];
                for (o, v) in row.iter_mut().zip(&t[i * 8 + j - j0..]) {
                    *o = if accumulate { *o + v } else { *v };
                }
            }
        }
    }

    /// The `R` rows of C's columns `j .. j + 16` (`j + 8` unless `TWO`), into `c` (C from
    /// column `j`); with `AHEAD`, asking for B's whole rows well ahead (the first chunk).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::type_complexity)]
    unsafe fn chunk<const R: usize, const TWO: bool, const AHEAD: bool, S: Src>(
        (k, n, a4, b, ldb, accumulate): (usize, usize, &[f32], S, usize, bool),
        j: usize,
        c: &mut [f32],
        ldc: usize,
        mut warm: WarmLines,
    ) {
        const { assert!(R <= super::FEW_ROWS) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut p0 = 0;
        while p0 < k {
            let p1 = p0.saturating_add(S::SHARED_ROWS).min(k);
            let shared = b.shared(p0, j, ldb, TWO);
            // One step of `p`: ask for what comes later, then multiply row `p` of B.
            let step = |p: usize| {
                // B's rows lie `ldb` apart: the first chunk asks for whole rows well
                // ahead (unless B was asked for already), the others for their own
                // columns a few steps ahead.
                if AHEAD && p + PREFETCH_ROWS < k {
                    let (at, last) = b.row(p + PREFETCH_ROWS, n, ldb);
                    // Every line from the one `at` is in to the one `at + last` is in.
                    prefetch_span(at, last + 64);
                } else if p + PREFETCH < k {
                    let (at, bytes) = b.span(p + PREFETCH, j, ldb);
                    _mm_prefetch::<_MM_HINT_T0>(at);
                    if TWO && bytes > 32 {
                        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(bytes - 1));
                    }
                }
                let bv = b.load_shared::<TWO>(shared, p, j, ldb);
                let a = a4.as_ptr().add(p * FEW_ROWS);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(i));
                    acc[0] = _mm256_fmadd_ps(ai, bv[0], acc[0]);
                    if TWO {
                        acc[1] = _mm256_fmadd_ps(ai, bv[1], acc[1]);
                    }
                }
            };
            // Two steps a turn, with `S::WARM_PER_TURN` of `warm`'s lines asked for per turn.
            two_a_turn((p0, p1), S::WARM_PER_TURN, &mut warm, step);
            p0 = p1;
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, x) in acc.iter().enumerate().take(if TWO { 2 } else { 1 }) {
                let o = c.as_mut_ptr().add(i * ldc + 8 * v);
                let y = if accumulate {
                    _mm256_add_ps(_mm256_loadu_ps(o), *x)
                } else {
                    *x
                };
                _mm256_storeu_ps(o, y);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod few_neon {
    use super::RowsB;
    use crate::neon::{load_bf16x4, load_f16x4};
    use std::arch::aarch64::*;

    /// 4 elements of B's row `p` from column `j`, as f32.
    #[inline(always)]
    unsafe fn load(b: RowsB<'_>, p: usize, j: usize, ldb: usize) -> float32x4_t {
        let i = p * ldb + j;
        match b {
            RowsB::F32(s) => vld1q_f32(s.as_ptr().add(i)),
            RowsB::F16(s) => load_f16x4(s.as_ptr().add(2 * i)),
            RowsB::BF16(s) => load_bf16x4(s.as_ptr().add(2 * i)),
            RowsB::Q8Cols { .. } | RowsB::Q8Rows(_) => {
                let x: [f32; 4] = std::array::from_fn(|l| b.at(p, j + l, ldb));
                vld1q_f32(x.as_ptr())
            }
        }
    }

    /// 16 columns at a time (four vectors per row), then 4, then the last few columns one
    /// by one, with the same fused multiply-adds.
    ///
    /// # Safety
    /// The slices must hold every element `gemm_few_rows` checked for.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        lda: usize,
        b: RowsB<'_>,
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j + 4 <= n {
            let vs = if j + 16 <= n { 4 } else { 1 };
            let mut acc = [[vdupq_n_f32(0.0); 4]; super::FEW_ROWS];
            for p in 0..k {
                let bv: [float32x4_t; 4] = std::array::from_fn(|v| {
                    if v < vs {
                        load(b, p, j + 4 * v, ldb)
                    } else {
                        vdupq_n_f32(0.0)
                    }
                });
                for (i, acc) in acc.iter_mut().enumerate().take(m) {
                    let ai = *a.get_unchecked(i * lda + p);
                    for v in 0..4 {
                        acc[v] = vfmaq_n_f32(acc[v], bv[v], ai);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(m) {
                for (v, x) in acc.iter().enumerate().take(vs) {
                    let o = c.as_mut_ptr().add(i * ldc + j + 4 * v);
                    let y = if accumulate {
                        vaddq_f32(vld1q_f32(o), *x)
                    } else {
                        *x
                    };
                    vst1q_f32(o, y);
                }
            }
            j += 4 * vs;
        }
        for j in j..n {
            for i in 0..m {
                let mut acc = 0f32;
                for p in 0..k {
                    acc = a[i * lda + p].mul_add(b.at(p, j, ldb), acc);
                }
                let o = &mut c[i * ldc + j];
                *o = if accumulate { *o + acc } else { acc };
            }
        }
    }
}
