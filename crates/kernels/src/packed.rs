//! Quantized weight matrices repacked at load time for AVX-512 VNNI.
//!
//! Rows are taken 16 at a time (a *group*) and interleaved 4 bytes at a time: one 64-byte
//! load holds 4 consecutive values of each of the 16 rows, so `vpdpbusd` against 4
//! activation bytes broadcast to every lane gives one partial dot product per row. Lanes
//! are rows and never need summing across; a block's weight scales are one vector of 16
//! rows; an integer sum stays in integers for a whole block (32 values, or a K-quant
//! sub-block), then one conversion and two fused multiply-adds finish it. A tile of `G`
//! groups × `N` inputs decodes each weight block once for `N` inputs.
//!
//! Same bits, same size as the file's blocks (a few bytes more per group for Q4_K's
//! minimums), only reordered; Q8_0 values are stored as unsigned bytes (`q + 128`).
//!
//! Every (row, input) pair goes through the same sequence of float operations whatever the
//! tile shape, so a row's result does not depend on the batch it is in.

use crate::qdot::QuantActs;
use gemma3_formats::quant::k_scale_min;
use gemma3_formats::{DType, TensorData};
use rayon::prelude::*;

/// 64 bytes, 64-byte aligned: the unit of packed storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Per-type layout: values per block, metadata bytes and quant bytes per block per group.
#[derive(Clone, Copy)]
struct Layout {
    elems: usize,
    meta: usize,
    quants: usize,
}

fn layout(dtype: DType) -> Option<Layout> {
    let (elems, meta, quants) = match dtype {
        // meta: 16 f16 scales; quants: 8 steps × 16 rows × 4 bytes.
        DType::Q8_0 => (32, 32, 512),
        // quants: 4 loads of 16 rows × 4 bytes, low nibbles values 4l.., high 16+4l..
        DType::Q4_0 => (32, 32, 256),
        // meta: scales, then per load a 64-bit mask of fifth bits for low and high nibbles.
        DType::Q5_0 => (32, 96, 256),
        // meta: d, dmin (16 f16 each), scales (8 × 16 u8), minimum pairs (4 × 16 × 2 u8).
        DType::Q4_K => (256, 320, 2048),
        // Q4_K's, then per load a 64-bit mask of fifth bits for low and high nibbles.
        DType::Q5_K => (256, 832, 2048),
        // meta: d (16 f16), scales (16 × 16 i8); quants per half and 4-value step: two
        // lines of low nibbles and one of 2-bit highs, together 4 values of 4 runs of 32.
        DType::Q6_K => (256, 288, 3072),
        _ => return None,
    };
    Some(Layout {
        elems,
        meta,
        quants,
    })
}

/// A weight matrix in the interleaved layout.
pub struct PackedMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    groups: usize,
    /// Bytes of a group's metadata (rounded up to 64) and of the whole group.
    meta_bytes: usize,
    group_bytes: usize,
    data: Vec<Line>,
}

impl PackedMatrix {
    /// Whether this CPU has the kernels and `dtype` a layout.
    pub fn supports(dtype: DType) -> bool {
        available() && layout(dtype).is_some()
    }

    /// Repacks `t` (a matrix of a supported type), or `None` where there is no kernel. The
    /// file pages of `t` are handed back to the OS as they are packed (see
    /// [`TensorData::release_byte_range`]), so packing never holds both copies.
    pub fn pack(t: &TensorData) -> Option<PackedMatrix> {
        if !Self::supports(t.dtype) || t.shape.len() != 2 {
            return None;
        }
        Self::pack_with(t.dtype, t.rows(), t.cols(), t.bytes(), |r| {
            t.release_byte_range(r)
        })
    }

    /// Repacks `rows` rows of `cols` values stored as `dtype` blocks.
    pub fn pack_bytes(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        Self::pack_with(dtype, rows, cols, bytes, |_| {})
    }

    /// Packs a few megabytes at a time, calling `done` with each byte range of `bytes` that
    /// has been read for the last time.
    fn pack_with(
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        done: impl Fn(std::ops::Range<usize>),
    ) -> Option<Self> {
        let lay = layout(dtype)?;
        let rb = dtype.row_bytes(cols)?;
        assert_eq!(bytes.len(), rows * rb, "pack: bad byte count");
        let nb = cols / lay.elems;
        let meta_bytes = (nb * lay.meta).div_ceil(64) * 64;
        let group_bytes = meta_bytes + nb * lay.quants;
        let groups = rows.div_ceil(16);
        let mut data = vec![Line([0; 64]); groups * group_bytes / 64];
        let bb = dtype.block_bytes();
        let pack_group = |g: usize, lines: &mut [Line]| {
            // SAFETY: Line is 64 plain bytes.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, group_bytes)
            };
            let (meta, quants) = buf.split_at_mut(meta_bytes);
            for r in 0..16 {
                let row = g * 16 + r;
                if row >= rows {
                    break; // padding rows stay zero: zero scales, zero output
                }
                for b in 0..nb {
                    let blk = &bytes[row * rb + b * bb..row * rb + (b + 1) * bb];
                    let m = &mut meta[b * lay.meta..(b + 1) * lay.meta];
                    let q = &mut quants[b * lay.quants..(b + 1) * lay.quants];
                    pack_block(dtype, r, blk, m, q);
                }
            }
        };
        let chunk_groups = ((8 << 20) / (16 * rb)).max(1);
        for (c, chunk) in data.chunks_mut(chunk_groups * group_bytes / 64).enumerate() {
            let g0 = c * chunk_groups;
            chunk
                .par_chunks_mut(group_bytes / 64)
                .enumerate()
                .for_each(|(k, lines)| pack_group(g0 + k, lines));
            let end = ((g0 + chunk_groups) * 16).min(rows);
            done(g0 * 16 * rb..end * rb);
        }
        Some(PackedMatrix {
            dtype,
            rows,
            cols,
            groups,
            meta_bytes,
            group_bytes,
            data,
        })
    }

    /// Number of 16-row groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The activation blocking the kernel for this type expects.
    pub fn act_block(&self) -> crate::qdot::ActBlock {
        crate::qdot::ActBlock::for_weights(self.dtype)
    }

    fn group_ptr(&self, g: usize) -> *const u8 {
        debug_assert!(g < self.groups);
        // SAFETY: g < groups, so the offset is inside `data`.
        unsafe { (self.data.as_ptr() as *const u8).add(g * self.group_bytes) }
    }
}

/// Writes row `r` (0..16) of one block into its group's metadata `m` and quants `q`.
fn pack_block(dtype: DType, r: usize, blk: &[u8], m: &mut [u8], q: &mut [u8]) {
    // 4 bytes of row r in a 64-byte line.
    let put4 = |q: &mut [u8], line: usize, src: &[u8], xor: u8| {
        for t in 0..4 {
            q[64 * line + 4 * r + t] = src[t] ^ xor;
        }
    };
    match dtype {
        DType::Q8_0 => {
            m[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            for s in 0..8 {
                put4(q, s, &blk[2 + 4 * s..], 0x80);
            }
        }
        DType::Q4_0 => {
            m[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            for l in 0..4 {
                put4(q, l, &blk[2 + 4 * l..], 0);
            }
        }
        DType::Q5_0 => {
            m[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            let qh = u32::from_le_bytes(blk[2..6].try_into().unwrap());
            for l in 0..4 {
                put4(q, l, &blk[6 + 4 * l..], 0);
                for (k, base) in [(0, 4 * l), (1, 16 + 4 * l)] {
                    let at = 32 + 16 * l + 8 * k;
                    let mut mask = u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
                    for t in 0..4 {
                        mask |= (((qh >> (base + t)) & 1) as u64) << (4 * r + t);
                    }
                    m[at..at + 8].copy_from_slice(&mask.to_le_bytes());
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            m[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
            m[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            let scales = &blk[4..16];
            for j in 0..8 {
                let (sc, mn) = k_scale_min(j, scales);
                m[64 + 16 * j + r] = sc;
                m[192 + 32 * (j / 2) + 2 * r + (j % 2)] = mn;
            }
            let qs = if five { 48 } else { 16 };
            for c in 0..4 {
                for l in 0..8 {
                    put4(q, 8 * c + l, &blk[qs + 32 * c + 4 * l..], 0);
                    if five {
                        // Bit j of qh[i] is the fifth bit of value 32j + i.
                        for k in 0..2 {
                            let at = 320 + 128 * c + 16 * l + 8 * k;
                            let mut mask = u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
                            for t in 0..4 {
                                let bit = (blk[16 + 4 * l + t] >> (2 * c + k)) & 1;
                                mask |= (bit as u64) << (4 * r + t);
                            }
                            m[at..at + 8].copy_from_slice(&mask.to_le_bytes());
                        }
                    }
                }
            }
        }
        DType::Q6_K => {
            m[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
            for j in 0..16 {
                m[32 + 16 * j + r] = blk[192 + j];
            }
            // In the order the kernel reads them: per half and 4-value step, the two
            // low-nibble lines and the 2-bit line that complete them.
            for h in 0..2 {
                for l in 0..8 {
                    put4(q, 24 * h + 3 * l, &blk[64 * h + 4 * l..], 0);
                    put4(q, 24 * h + 3 * l + 1, &blk[64 * h + 32 + 4 * l..], 0);
                    put4(q, 24 * h + 3 * l + 2, &blk[128 + 32 * h + 4 * l..], 0);
                }
            }
        }
        _ => unreachable!("no packed layout for {dtype}"),
    }
}

/// Whether the packed kernels can run here (AVX-512 with VNNI, not overridden).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::level() == crate::simd::Level::Avx512 && crate::simd::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[i][rows]` for inputs `0..n` and the rows of groups `groups`: `out` points at input
/// 0's row 0 with a stride of `p.rows` per input. Activations must be quantized with
/// [`PackedMatrix::act_block`]'s blocking.
///
/// # Safety
/// `out` must hold `n * p.rows` floats, and no one else may write these groups' rows.
pub unsafe fn matmul_packed(
    p: &PackedMatrix,
    acts: &QuantActs,
    n: usize,
    groups: std::ops::Range<usize>,
    out: *mut f32,
) {
    assert!(available() && acts.cols == p.cols && acts.q.len() >= n * p.cols);
    assert!(groups.end <= p.groups);
    #[cfg(target_arch = "x86_64")]
    {
        let k = vnni::kernels(p.dtype);
        let mut g = groups.start;
        if n == 1 {
            while g + k.decode_g <= groups.end {
                (k.decode)(p, g, acts, 0, out);
                g += k.decode_g;
            }
            while g < groups.end {
                (k.one)(p, g, acts, 0, out);
                g += 1;
            }
            return;
        }
        while g < groups.end {
            let mut i = 0;
            while i + k.tile_n <= n {
                (k.tile)(p, g, acts, i, out);
                i += k.tile_n;
            }
            while i < n {
                (k.one)(p, g, acts, i, out);
                i += 1;
            }
            g += 1;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, acts, n, groups, out);
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::PackedMatrix;
    use crate::qdot::QuantActs;
    use gemma3_formats::DType;
    use std::arch::x86_64::*;

    type Tile = unsafe fn(&PackedMatrix, usize, &QuantActs, usize, *mut f32);

    pub struct Kernels {
        /// `decode_g` groups × 1 input.
        pub decode: Tile,
        pub decode_g: usize,
        /// 1 group × `tile_n` inputs.
        pub tile: Tile,
        pub tile_n: usize,
        /// 1 group × 1 input.
        pub one: Tile,
    }

    pub fn kernels(dtype: DType) -> Kernels {
        macro_rules! k {
            ($f:ident, $kind:literal, $dg:literal, $tn:literal) => {
                Kernels {
                    decode: $f::<$kind, $dg, 1>,
                    decode_g: $dg,
                    tile: $f::<$kind, 1, $tn>,
                    tile_n: $tn,
                    one: $f::<$kind, 1, 1>,
                }
            };
        }
        match dtype {
            DType::Q8_0 => k!(blocks32, 0, 4, 8),
            DType::Q4_0 => k!(blocks32, 1, 4, 8),
            DType::Q5_0 => k!(blocks32, 2, 4, 8),
            DType::Q4_K => k!(q4k, 0, 2, 4),
            DType::Q5_K => k!(q4k, 1, 2, 4),
            DType::Q6_K => k!(q6k, 0, 2, 4),
            _ => unreachable!("no packed kernel for {dtype}"),
        }
    }

    #[inline(always)]
    unsafe fn bcast(p: *const i8) -> __m512i {
        _mm512_set1_epi32((p as *const i32).read_unaligned())
    }

    /// Stores 16 rows of group `g` for input `i`, masking rows past the end.
    #[inline(always)]
    unsafe fn store(p: &PackedMatrix, g: usize, i: usize, out: *mut f32, v: __m512) {
        let r0 = g * 16;
        let dst = out.add(i * p.rows + r0);
        if r0 + 16 <= p.rows {
            _mm512_storeu_ps(dst, v);
        } else {
            let m = ((1u32 << (p.rows - r0)) - 1) as __mmask16;
            _mm512_mask_storeu_ps(dst, m, v);
        }
    }

    #[inline(always)]
    unsafe fn scales16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    /// Q8_0 (`KIND` 0), Q4_0 (1), Q5_0 (2): blocks of 32 against Q8_0 activations.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn blocks32<const KIND: u8, const G: usize, const N: usize>(
        p: &PackedMatrix,
        g0: usize,
        acts: &QuantActs,
        i0: usize,
        out: *mut f32,
    ) {
        let cols = p.cols;
        let nb = cols / 32;
        let (mb, qb) = match KIND {
            0 => (32, 512),
            1 => (32, 256),
            _ => (96, 256),
        };
        let off = match KIND {
            0 => -128.0f32,
            1 => -8.0,
            _ => -16.0,
        };
        // Two integer accumulators per pair when there are few inputs, so the chains of
        // dependent `vpdpbusd` are short (integer sums are exact: same result).
        let two = N < 4;
        let base: [*const u8; G] = std::array::from_fn(|g| p.group_ptr(g0 + g));
        let x: [*const i8; N] = std::array::from_fn(|i| acts.q.as_ptr().add((i0 + i) * cols));
        let dg: [*const f32; N] =
            std::array::from_fn(|i| acts.dg.as_ptr().add((i0 + i) * cols / 16));
        let sdx: [*const f32; N] =
            std::array::from_fn(|i| acts.sdx32.as_ptr().add((i0 + i) * cols / 32));
        let m4 = _mm512_set1_epi8(0x0f);
        let b16 = _mm512_set1_epi8(0x10);
        let mut fa = [[_mm512_setzero_ps(); N]; G];
        for b in 0..nb {
            let mut ia = [[[_mm512_setzero_si512(); 2]; N]; G];
            let qs: [*const u8; G] = std::array::from_fn(|g| base[g].add(p.meta_bytes + b * qb));
            if KIND == 0 {
                for s in 0..8 {
                    let w: [__m512i; G] =
                        std::array::from_fn(|g| _mm512_load_si512(qs[g].add(64 * s) as *const _));
                    let k = if two { s & 1 } else { 0 };
                    for i in 0..N {
                        let xv = bcast(x[i].add(32 * b + 4 * s));
                        for g in 0..G {
                            ia[g][i][k] = _mm512_dpbusd_epi32(ia[g][i][k], w[g], xv);
                        }
                    }
                }
            } else {
                for l in 0..4 {
                    let mut lo = [_mm512_setzero_si512(); G];
                    let mut hi = [_mm512_setzero_si512(); G];
                    for g in 0..G {
                        let v = _mm512_load_si512(qs[g].add(64 * l) as *const _);
                        lo[g] = _mm512_and_si512(v, m4);
                        hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                        if KIND == 2 {
                            let mk = base[g].add(b * mb + 32 + 16 * l) as *const u64;
                            lo[g] = _mm512_mask_add_epi8(lo[g], mk.read_unaligned(), lo[g], b16);
                            hi[g] =
                                _mm512_mask_add_epi8(hi[g], mk.add(1).read_unaligned(), hi[g], b16);
                        }
                    }
                    let k = if two { 1 } else { 0 };
                    for i in 0..N {
                        let xl = bcast(x[i].add(32 * b + 4 * l));
                        let xh = bcast(x[i].add(32 * b + 16 + 4 * l));
                        for g in 0..G {
                            ia[g][i][0] = _mm512_dpbusd_epi32(ia[g][i][0], lo[g], xl);
                            ia[g][i][k] = _mm512_dpbusd_epi32(ia[g][i][k], hi[g], xh);
                        }
                    }
                }
            }
            let sw: [__m512; G] = std::array::from_fn(|g| scales16(base[g].add(b * mb)));
            for i in 0..N {
                let dx = _mm512_set1_ps(*dg[i].add(2 * b));
                let c = _mm512_set1_ps(*sdx[i].add(b) * off);
                for g in 0..G {
                    let isum = if two {
                        _mm512_add_epi32(ia[g][i][0], ia[g][i][1])
                    } else {
                        ia[g][i][0]
                    };
                    let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dx, c);
                    fa[g][i] = _mm512_fmadd_ps(t, sw[g], fa[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..N {
                store(p, g0 + g, i0 + i, out, fa[g][i]);
            }
        }
    }

    /// Q4_K (`KIND` 0) and Q5_K (1) against Q8_K activations: per sub-block the integer sum
    /// times its 6-bit scale, summed in integers over the super-block; minimums through the
    /// sub-block sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q4k<const KIND: u8, const G: usize, const N: usize>(
        p: &PackedMatrix,
        g0: usize,
        acts: &QuantActs,
        i0: usize,
        out: *mut f32,
    ) {
        let cols = p.cols;
        let ns = cols / 256;
        let two = N < 4;
        let base: [*const u8; G] = std::array::from_fn(|g| p.group_ptr(g0 + g));
        let x: [*const i8; N] = std::array::from_fn(|i| acts.q.as_ptr().add((i0 + i) * cols));
        let dg: [*const f32; N] =
            std::array::from_fn(|i| acts.dg.as_ptr().add((i0 + i) * cols / 16));
        let pairs: [*const i32; N] =
            std::array::from_fn(|i| acts.pair32.as_ptr().add((i0 + i) * cols / 64));
        let m4 = _mm512_set1_epi8(0x0f);
        let b16 = _mm512_set1_epi8(0x10);
        let mb = if KIND == 1 { 832 } else { 320 };
        let mut fa = [[_mm512_setzero_ps(); N]; G];
        for s in 0..ns {
            let meta: [*const u8; G] = std::array::from_fn(|g| base[g].add(s * mb));
            let qs: [*const u8; G] = std::array::from_fn(|g| base[g].add(p.meta_bytes + s * 2048));
            let xs: [*const i8; N] = std::array::from_fn(|i| x[i].add(256 * s));
            let mut isb = [[_mm512_setzero_si512(); N]; G];
            for c in 0..4 {
                // [g][i][low/high sub-block][chain]
                let mut ia = [[[[_mm512_setzero_si512(); 2]; 2]; N]; G];
                for l in 0..8 {
                    let k = if two { l & 1 } else { 0 };
                    let mut lo = [_mm512_setzero_si512(); G];
                    let mut hi = [_mm512_setzero_si512(); G];
                    for g in 0..G {
                        let v = _mm512_load_si512(qs[g].add(512 * c + 64 * l) as *const _);
                        lo[g] = _mm512_and_si512(v, m4);
                        hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                        if KIND == 1 {
                            let mk = meta[g].add(320 + 128 * c + 16 * l) as *const u64;
                            lo[g] = _mm512_mask_add_epi8(lo[g], mk.read_unaligned(), lo[g], b16);
                            hi[g] =
                                _mm512_mask_add_epi8(hi[g], mk.add(1).read_unaligned(), hi[g], b16);
                        }
                    }
                    for i in 0..N {
                        let xl = bcast(xs[i].add(64 * c + 4 * l));
                        let xh = bcast(xs[i].add(64 * c + 32 + 4 * l));
                        for g in 0..G {
                            ia[g][i][0][k] = _mm512_dpbusd_epi32(ia[g][i][0][k], lo[g], xl);
                            ia[g][i][1][k] = _mm512_dpbusd_epi32(ia[g][i][1][k], hi[g], xh);
                        }
                    }
                }
                for g in 0..G {
                    let sl =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(meta[g].add(64 + 32 * c) as *const _));
                    let sh = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        meta[g].add(64 + 32 * c + 16) as *const _
                    ));
                    for i in 0..N {
                        let (a, b) = if two {
                            (
                                _mm512_add_epi32(ia[g][i][0][0], ia[g][i][0][1]),
                                _mm512_add_epi32(ia[g][i][1][0], ia[g][i][1][1]),
                            )
                        } else {
                            (ia[g][i][0][0], ia[g][i][1][0])
                        };
                        isb[g][i] = _mm512_add_epi32(isb[g][i], _mm512_mullo_epi32(a, sl));
                        isb[g][i] = _mm512_add_epi32(isb[g][i], _mm512_mullo_epi32(b, sh));
                    }
                }
            }
            // Σ_j min_j · Σx_j: pairs of 16-bit minimums against pairs of 16-bit sums.
            let mut mm = [[_mm512_setzero_si512(); N]; G];
            for q in 0..4 {
                for g in 0..G {
                    let mv = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                        meta[g].add(192 + 32 * q) as *const _
                    ));
                    for i in 0..N {
                        let xv = _mm512_set1_epi32(*pairs[i].add(4 * s + q));
                        mm[g][i] = _mm512_dpwssd_epi32(mm[g][i], mv, xv);
                    }
                }
            }
            for g in 0..G {
                let d = scales16(meta[g]);
                let dmin = scales16(meta[g].add(32));
                for i in 0..N {
                    let dx = _mm512_set1_ps(*dg[i].add(16 * s));
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(isb[g][i]), dx);
                    fa[g][i] = _mm512_fmadd_ps(t, d, fa[g][i]);
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(mm[g][i]), dx);
                    fa[g][i] = _mm512_fnmadd_ps(t, dmin, fa[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..N {
                store(p, g0 + g, i0 + i, out, fa[g][i]);
            }
        }
    }

    /// Q6_K against Q8_K activations: 6-bit values less 32 (through the 16-value sums),
    /// times a signed 8-bit scale per 16 values, summed in integers over the super-block.
    /// Each step reads three lines in order and yields 4 values of each of the four 32-value
    /// runs of a half super-block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q6k<const KIND: u8, const G: usize, const N: usize>(
        p: &PackedMatrix,
        g0: usize,
        acts: &QuantActs,
        i0: usize,
        out: *mut f32,
    ) {
        let cols = p.cols;
        let ns = cols / 256;
        let base: [*const u8; G] = std::array::from_fn(|g| p.group_ptr(g0 + g));
        let x: [*const i8; N] = std::array::from_fn(|i| acts.q.as_ptr().add((i0 + i) * cols));
        let dg: [*const f32; N] =
            std::array::from_fn(|i| acts.dg.as_ptr().add((i0 + i) * cols / 16));
        let sums: [*const i32; N] =
            std::array::from_fn(|i| acts.isum16.as_ptr().add((i0 + i) * cols / 16));
        let m4 = _mm512_set1_epi8(0x0f);
        let m30 = _mm512_set1_epi8(0x30);
        let mut fa = [[_mm512_setzero_ps(); N]; G];
        for s in 0..ns {
            let meta: [*const u8; G] = std::array::from_fn(|g| base[g].add(s * 288));
            let xs: [*const i8; N] = std::array::from_fn(|i| x[i].add(256 * s));
            let mut isb = [[_mm512_setzero_si512(); N]; G];
            for h in 0..2 {
                let qs: [*const u8; G] =
                    std::array::from_fn(|g| base[g].add(p.meta_bytes + s * 3072 + 1536 * h));
                for half in 0..2 {
                    // Run qd's sub-block of 16 in this half: 8h + 2qd + half. Each sum
                    // starts at -32·Σx: the values' offset, in integers.
                    let mut ia = [[[_mm512_setzero_si512(); 4]; N]; G];
                    for i in 0..N {
                        for qd in 0..4 {
                            let j = 16 * s + 8 * h + 2 * qd + half;
                            let init = _mm512_set1_epi32(-32 * *sums[i].add(j));
                            for g in 0..G {
                                ia[g][i][qd] = init;
                            }
                        }
                    }
                    for l4 in 0..4 {
                        let l = 4 * half + l4;
                        let mut v = [[_mm512_setzero_si512(); 4]; G];
                        for g in 0..G {
                            let at = qs[g].add(192 * l);
                            let ql0 = _mm512_load_si512(at as *const _);
                            let ql1 = _mm512_load_si512(at.add(64) as *const _);
                            let qh = _mm512_load_si512(at.add(128) as *const _);
                            let hi = |sh: __m512i| _mm512_and_si512(sh, m30);
                            v[g][0] = _mm512_or_si512(
                                _mm512_and_si512(ql0, m4),
                                hi(_mm512_slli_epi16(qh, 4)),
                            );
                            v[g][1] = _mm512_or_si512(
                                _mm512_and_si512(ql1, m4),
                                hi(_mm512_slli_epi16(qh, 2)),
                            );
                            v[g][2] = _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16(ql0, 4), m4),
                                hi(qh),
                            );
                            v[g][3] = _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16(ql1, 4), m4),
                                hi(_mm512_srli_epi16(qh, 2)),
                            );
                        }
                        for i in 0..N {
                            for qd in 0..4 {
                                let xv = bcast(xs[i].add(128 * h + 32 * qd + 4 * l));
                                for g in 0..G {
                                    ia[g][i][qd] = _mm512_dpbusd_epi32(ia[g][i][qd], v[g][qd], xv);
                                }
                            }
                        }
                    }
                    for g in 0..G {
                        for qd in 0..4 {
                            let j = 8 * h + 2 * qd + half;
                            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                                meta[g].add(32 + 16 * j) as *const _,
                            ));
                            for i in 0..N {
                                isb[g][i] = _mm512_add_epi32(
                                    isb[g][i],
                                    _mm512_mullo_epi32(ia[g][i][qd], sc),
                                );
                            }
                        }
                    }
                }
            }
            for g in 0..G {
                let d = scales16(meta[g]);
                for i in 0..N {
                    let dx = _mm512_set1_ps(*dg[i].add(16 * s));
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(isb[g][i]), dx);
                    fa[g][i] = _mm512_fmadd_ps(t, d, fa[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..N {
                store(p, g0 + g, i0 + i, out, fa[g][i]);
            }
        }
    }
}
