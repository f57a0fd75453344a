//! Matrix products on bf16-rounded operands, summed in f32: what a bf16 model computes
//! (Gemma 3 is trained and published in bf16), several times faster than the f32
//! [`crate::gemm`] where the CPU multiplies bf16 pairs natively:
//! - Intel AMX (Sapphire Rapids and later): one `tdpbf16ps` multiplies a 16×32 block of A
//!   by a 32×16 block of B, sixteen times the work of an AVX-512 f32 multiply-add;
//! - AVX-512 BF16 (Zen 4 and 5, Cooper Lake and later Xeons): `vdpbf16ps` adds two
//!   products per lane, twice an f32 multiply-add's work where it issues as often; Intel
//!   cores issue it at half that rate, so it is used only where a probe at start finds it
//!   faster than f32 (see [`unit`]).
//!
//! Both read B packed once in the same layout ([`PackedB16`]: panels of 16 columns, each
//! row of a panel holding a pair of consecutive k for its 16 columns) and A rounded to
//! bf16 row by row. [`available`] says whether this CPU (and OS, for AMX) runs either;
//! where neither runs, callers keep the f32 product. The order of the sums differs from
//! the f32 product's, so results agree with it to bf16 rounding, not bit for bit; the
//! exact precision never comes here.

use crate::gemm::{CPtr, MatMut, MatRef};
use crate::matmul::Weights;
use gemma3_formats::quant;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// Columns of one panel of B (one AMX tile's columns, one zmm of f32 sums).
const PANEL: usize = 16;
/// Depth of one step: 32 bf16 values are one 64-byte tile row.
const DEPTH: usize = 32;
/// Rows of A (and C) one kernel call computes: two AMX tiles of 16.
const ROWS: usize = 32;
/// Columns one kernel call computes: two panels.
const COLS: usize = 2 * PANEL;
/// Rows and columns of C one parallel task computes (multiples of ROWS and COLS), sized
/// so that a task's A rows and B panels stay in the core's L2 cache.
const TASK_ROWS: usize = 128;
const TASK_COLS: usize = 256;

/// Which unit multiplies: decided once (0 = not yet).
static UNIT: AtomicU8 = AtomicU8::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Unit {
    /// Neither: callers use the f32 product.
    None = 1,
    /// AVX-512 BF16 dot products.
    Avx512Bf16 = 2,
    /// AMX tiles.
    Amx = 3,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::None => "none",
            Unit::Avx512Bf16 => "AVX-512 BF16",
            Unit::Amx => "AMX-BF16",
        }
    }
}

/// The unit bf16 products run on, decided once: AMX where the CPU and OS allow it; else
/// AVX-512 BF16 where `vdpbf16ps` outruns the f32 multiply-add on this core (it does not
/// on Intel cores through Emerald Rapids, which issue it at half the rate: there the f32
/// product is faster and none is used); none below the AVX-512 `GEMMA3_SIMD` level.
/// `GEMMA3_BF16=off|avx512|amx` caps the unit (`avx512` forces it where the CPU has it).
pub fn unit() -> Unit {
    if crate::simd::level() != crate::simd::Level::Avx512 {
        return Unit::None;
    }
    match UNIT.load(Ordering::Relaxed) {
        1 => Unit::None,
        2 => Unit::Avx512Bf16,
        3 => Unit::Amx,
        _ => {
            let u = chosen();
            UNIT.store(u as u8, Ordering::Relaxed);
            u
        }
    }
}

/// Whether bf16 products run faster than f32 ones here.
pub fn available() -> bool {
    unit() != Unit::None
}

/// Forces the unit (the best below it that the CPU runs, whether or not it is the faster
/// one); for tests and benchmarks. Returns the unit now in use.
pub fn set_unit(u: Unit) -> Unit {
    UNIT.store(u.min(supported()) as u8, Ordering::Relaxed);
    unit()
}

/// The default unit: the best the CPU runs, capped by `GEMMA3_BF16`; AVX-512 BF16 only
/// when asked for or faster than f32.
fn chosen() -> Unit {
    let best = supported();
    match std::env::var("GEMMA3_BF16").as_deref() {
        Ok("off") | Ok("none") => Unit::None,
        Ok("avx512") => best.min(Unit::Avx512Bf16),
        _ if best == Unit::Avx512Bf16 && !dot_outruns_fma() => Unit::None,
        _ => best,
    }
}

/// The best unit this CPU (and OS) runs.
#[cfg(target_arch = "x86_64")]
fn supported() -> Unit {
    if amx_permitted() {
        Unit::Amx
    } else if std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        Unit::Avx512Bf16
    } else {
        Unit::None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn supported() -> Unit {
    Unit::None
}

/// Whether `vdpbf16ps` does at least 1.3 times the arithmetic of `vfmadd` per second on
/// this core: a fraction of a millisecond of each, best of three, once. The gap either way
/// is about 2x on the CPUs we know, far outside timing noise.
#[cfg(target_arch = "x86_64")]
fn dot_outruns_fma() -> bool {
    use std::time::Instant;
    const STEPS: usize = 20_000;
    let best = |f: &dyn Fn() -> f32| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    // SAFETY: `supported()` found AVX-512F and AVX-512 BF16 before this is called.
    let dot = best(&|| unsafe { avx512bf16::throughput(STEPS, true) });
    // SAFETY: as above.
    let fma = best(&|| unsafe { avx512bf16::throughput(STEPS, false) });
    // A dot instruction does twice the arithmetic of a multiply-add.
    2.0 * fma > 1.3 * dot
}

#[cfg(not(target_arch = "x86_64"))]
fn dot_outruns_fma() -> bool {
    false
}

/// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission for this process to use tile
/// data (asked once; kernels before 5.16, and other systems, give none).
#[cfg(target_arch = "x86_64")]
fn amx_permitted() -> bool {
    static PERMITTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PERMITTED.get_or_init(|| {
        // CPUID leaf 7 is there on every CPU with AVX-512 (the level checked above).
        let r = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = ((r.edx >> 24) & 1 == 1, (r.edx >> 22) & 1 == 1);
        tile && bf16 && request_tile_permission()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel to let this process
    // use the tile registers; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    false
}

/// `x` rounded to the nearest bf16 (ties to even), as torch rounds; NaN stays NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

/// The right operand `B` (`k × n`) rounded to bf16 and packed for both units: panels of
/// [`PANEL`] columns (the last zero-padded), each `kp / 2` rows of `PANEL` pairs
/// `(B[2p][j], B[2p+1][j])`, `kp` = `k` rounded up to [`DEPTH`] (zeros below).
pub struct PackedB16 {
    k: usize,
    n: usize,
    kp: usize,
    data: Vec<u16>,
}

impl PackedB16 {
    /// Packs `fill(j, column)` for every column `j`, in parallel: `column` is B's column
    /// `j` (`k` values) to fill in f32.
    fn build(k: usize, n: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let kp = k.next_multiple_of(DEPTH);
        let panels = n.div_ceil(COLS) * 2;
        let mut data = vec![0u16; panels * PANEL * kp];
        data.par_chunks_mut(PANEL * kp)
            .enumerate()
            .for_each(|(p, panel)| {
                let mut col = vec![0f32; k];
                for jj in 0..PANEL.min(n.saturating_sub(p * PANEL)) {
                    fill(p * PANEL + jj, &mut col);
                    for (kk, v) in col.iter().enumerate() {
                        panel[(kk / 2) * 2 * PANEL + jj * 2 + kk % 2] = to_bf16(*v);
                    }
                }
            });
        PackedB16 { k, n, kp, data }
    }

    /// `B = Wᵀ` for a stored weight matrix (`rows × cols`): `k = cols`, `n = rows`, as a
    /// linear layer multiplies.
    pub fn of_weights(w: Weights<'_>) -> Self {
        let row_bytes = w.bytes.len() / w.rows.max(1);
        Self::build(w.cols, w.rows, |j, col| {
            quant::dequantize(w.dtype, &w.bytes[j * row_bytes..(j + 1) * row_bytes], col)
        })
    }

    /// A `k × n` view.
    pub fn of_view(b: MatRef<'_>) -> Self {
        Self::build(b.rows, b.cols, |j, col| {
            for (kk, v) in col.iter_mut().enumerate() {
                *v = b.get(kk, j);
            }
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    fn panel(&self, p: usize) -> &[u16] {
        &self.data[p * PANEL * self.kp..(p + 1) * PANEL * self.kp]
    }
}

thread_local! {
    /// A rounded to bf16, for products on the calling thread alone.
    static A16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Buffers of A for parallel products, kept between calls.
static A16_POOL: Mutex<Vec<Vec<u16>>> = Mutex::new(Vec::new());

/// `C += A·B` (or `C = A·B` without `accumulate`) on bf16-rounded A and B, summed in f32.
/// With `parallel`, split over the thread pool. Panics on mismatched shapes, or where
/// [`available`] is false.
pub fn gemm(a: MatRef<'_>, b: &PackedB16, c: MatMut<'_>, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(k, b.k, "bf16 gemm: A has {k} columns, B {} rows", b.k);
    assert_eq!((c.rows, c.cols), (m, n), "bf16 gemm: C is not {m}x{n}");
    let u = unit();
    assert!(u != Unit::None, "bf16 gemm: no bf16 unit on this CPU");
    if m == 0 || n == 0 {
        return;
    }
    let mp = m.next_multiple_of(ROWS);
    let len = mp * b.kp;
    let out = CPtr {
        ptr: c.data.as_mut_ptr(),
        rs: c.rs,
        cs: c.cs,
    };
    if parallel {
        let mut buf = A16_POOL
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        buf.resize(len, 0);
        buf.par_chunks_mut(b.kp * ROWS)
            .enumerate()
            .for_each(|(g, rows)| round_rows(&a, g * ROWS, rows, b.kp));
        let (row_tasks, col_tasks) = (mp.div_ceil(TASK_ROWS), n.div_ceil(TASK_COLS));
        crate::team::for_each(row_tasks * col_tasks, |t| {
            let (i0, j0) = ((t / col_tasks) * TASK_ROWS, (t % col_tasks) * TASK_COLS);
            let rows = i0..(i0 + TASK_ROWS).min(m);
            let cols = j0..(j0 + TASK_COLS).min(n);
            block(u, &buf, b, rows, cols, out, accumulate);
        });
        if let Ok(mut p) = A16_POOL.lock() {
            p.push(buf);
        }
    } else {
        A16.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(len, 0);
            round_rows(&a, 0, &mut buf, b.kp);
            block(u, &buf, b, 0..m, 0..n, out, accumulate);
        });
    }
}

/// Rows `i0..` of A rounded to bf16 into `out` (rows of `kp`, zero-padded right and
/// below A's last row).
fn round_rows(a: &MatRef<'_>, i0: usize, out: &mut [u16], kp: usize) {
    for (r, row) in out.chunks_exact_mut(kp).enumerate() {
        let i = i0 + r;
        if i >= a.rows {
            row.fill(0);
            continue;
        }
        if a.cs == 1 {
            let src = &a.data[i * a.rs..i * a.rs + a.cols];
            for (o, v) in row.iter_mut().zip(src) {
                *o = to_bf16(*v);
            }
        } else {
            for (kk, o) in row[..a.cols].iter_mut().enumerate() {
                *o = to_bf16(a.get(i, kk));
            }
        }
        row[a.cols..].fill(0);
    }
}

/// `tile` (ROWS × COLS) = A (ROWS rows of `kp`) · the two panels, on unit `u` (whose
/// tiles, for AMX, the caller configured on this thread).
#[cfg(target_arch = "x86_64")]
fn kernel(u: Unit, kp: usize, a: &[u16], p0: &[u16], p1: &[u16], tile: &mut [f32; ROWS * COLS]) {
    match u {
        // SAFETY: the caller's `Tiles` configured the tiles on this thread (AMX was
        // detected and permitted); A holds ROWS rows of kp, each panel kp/2 rows of 64
        // bytes, the tile ROWS × COLS.
        Unit::Amx => unsafe { amx::kernel(kp, a, p0, p1, tile) },
        // SAFETY: the unit was detected; sizes as above.
        Unit::Avx512Bf16 => unsafe { avx512bf16::kernel(kp, a, p0, p1, tile) },
        Unit::None => unreachable!("bf16 gemm without a unit"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn kernel(_: Unit, _: usize, _: &[u16], _: &[u16], _: &[u16], _: &mut [f32; ROWS * COLS]) {
    unreachable!("bf16 gemm without a unit (none exists off x86-64)")
}

/// C's rows `rows` × columns `cols` (`rows.start` a multiple of ROWS, `cols.start` of
/// COLS) from the rounded A (`a16`, rows of `b.kp`) and B.
fn block(
    u: Unit,
    a16: &[u16],
    b: &PackedB16,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: CPtr,
    accumulate: bool,
) {
    let kp = b.kp;
    let mut tile = [0f32; ROWS * COLS];
    #[cfg(target_arch = "x86_64")]
    let _tiles = (u == Unit::Amx).then(amx::Tiles::configure);
    for j0 in cols.clone().step_by(COLS) {
        let (p0, p1) = (b.panel(j0 / PANEL), b.panel(j0 / PANEL + 1));
        let nc = COLS.min(cols.end - j0);
        for i0 in rows.clone().step_by(ROWS) {
            let a = &a16[i0 * kp..(i0 + ROWS) * kp];
            kernel(u, kp, a, p0, p1, &mut tile);
            let nr = ROWS.min(rows.end - i0);
            // SAFETY: rows and cols are clipped to C, and this block is this task's alone.
            unsafe { out.put_tile(&tile, COLS, i0, nr, j0, nc, accumulate) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{COLS, DEPTH, PANEL, ROWS};
    use std::arch::asm;

    /// The tile registers configured on this thread for [`kernel`] (eight tiles of 16 rows
    /// of 64 bytes); released when dropped.
    pub struct Tiles;

    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Tiles {
        pub fn configure() -> Tiles {
            let mut cfg = Config([0; 64]);
            cfg.0[0] = 1; // palette 1
            for t in 0..8 {
                cfg.0[16 + 2 * t] = 64; // bytes per row
                cfg.0[48 + t] = 16; // rows
            }
            // SAFETY: AMX was detected and permitted before any Tiles is made (unit());
            // the configuration is a valid palette-1 one, 64 bytes, aligned.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: the tiles were configured on this thread by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// `tile` (ROWS × COLS f32) = A (ROWS rows of `kp` bf16) · the two panels.
    ///
    /// # Safety
    /// A [`Tiles`] lives on this thread; `a` holds ROWS·kp values, each panel kp·PANEL,
    /// `kp` a multiple of DEPTH.
    pub unsafe fn kernel(
        kp: usize,
        a: &[u16],
        p0: &[u16],
        p1: &[u16],
        tile: &mut [f32; ROWS * COLS],
    ) {
        debug_assert!(a.len() >= ROWS * kp && p0.len() >= PANEL * kp && p1.len() >= PANEL * kp);
        let (a0, a1) = (a.as_ptr(), a.as_ptr().add(16 * kp));
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for s in 0..kp / DEPTH {
            // A: 16 rows of 32 values, kp apart; B: 16 rows of 16 pairs, packed.
            asm!(
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tileloadd tmm6, [{b0} + {sb} * 1]",
                "tileloadd tmm7, [{b1} + {sb} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(s * DEPTH),
                a1 = in(reg) a1.add(s * DEPTH),
                b0 = in(reg) p0.as_ptr().add(s * DEPTH * PANEL),
                b1 = in(reg) p1.as_ptr().add(s * DEPTH * PANEL),
                sa = in(reg) kp * 2,
                sb = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let t = tile.as_mut_ptr();
        asm!(
            "tilestored [{t0} + {s} * 1], tmm0",
            "tilestored [{t1} + {s} * 1], tmm1",
            "tilestored [{t2} + {s} * 1], tmm2",
            "tilestored [{t3} + {s} * 1], tmm3",
            t0 = in(reg) t,
            t1 = in(reg) t.add(PANEL),
            t2 = in(reg) t.add(16 * COLS),
            t3 = in(reg) t.add(16 * COLS + PANEL),
            s = in(reg) COLS * 4,
            options(nostack)
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use super::{COLS, PANEL, ROWS};
    use std::arch::x86_64::*;

    /// `steps` rounds of twelve independent `vdpbf16ps` (`dot`) or `vfmadd` on registers:
    /// the issue rate of each, for [`super::dot_outruns_fma`].
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn throughput(steps: usize, dot: bool) -> f32 {
        let mut c = [_mm512_setzero_ps(); 12];
        let x = _mm512_set1_ps(std::hint::black_box(1e-3));
        let xb: __m512bh =
            std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3a83_3a83)));
        for _ in 0..steps {
            for s in c.iter_mut() {
                *s = if dot {
                    _mm512_dpbf16_ps(*s, xb, xb)
                } else {
                    _mm512_fmadd_ps(x, x, *s)
                };
            }
        }
        c.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    /// Rows per pass: 2·R zmm sums, two B loads and R broadcasts per pair of k.
    const R: usize = 8;

    /// As the AMX kernel, with `vdpbf16ps`.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; sizes as for the AMX kernel.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel(
        kp: usize,
        a: &[u16],
        p0: &[u16],
        p1: &[u16],
        tile: &mut [f32; ROWS * COLS],
    ) {
        debug_assert!(a.len() >= ROWS * kp && p0.len() >= PANEL * kp && p1.len() >= PANEL * kp);
        for g in 0..ROWS / R {
            let mut c0 = [_mm512_setzero_ps(); R];
            let mut c1 = [_mm512_setzero_ps(); R];
            let ag = a.as_ptr().add(g * R * kp);
            for p in 0..kp / 2 {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(p0.as_ptr().add(p * 2 * PANEL).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(p1.as_ptr().add(p * 2 * PANEL).cast()));
                for r in 0..R {
                    let pair = (ag.add(r * kp + 2 * p) as *const u32).read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                    c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);
                    c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);
                }
            }
            for r in 0..R {
                let o = tile.as_mut_ptr().add((g * R + r) * COLS);
                _mm512_storeu_ps(o, c0[r]);
                _mm512_storeu_ps(o.add(PANEL), c1[r]);
            }
        }
    }
}
