//! Quantized weight matrices repacked at load time for 8-bit integer dot products
//! (AVX-512 VNNI, AVX-VNNI, or AVX2's 16-bit multiply-adds on x86-64; NEON's `sdot`, or
//! its widening multiplies, on aarch64).
//!
//! Rows are taken 16 at a time (a *group*) and interleaved 4 bytes at a time: one 64-byte
//! load holds 4 consecutive values of each of the 16 rows, so `vpdpbusd` (or `sdot`)
//! against 4 activation bytes broadcast to every lane gives one partial dot product per row. Lanes
//! are rows and never need summing across; a block's weight scales are one vector of 16
//! rows; an integer sum stays in integers for a whole block (32 values, or a K-quant
//! sub-block), then one conversion and two fused multiply-adds finish it. A tile of `G`
//! groups × `N` inputs decodes each weight block once for `N` inputs.
//!
//! Same bits, about the same size as the file's blocks (Q4_K/Q5_K keep their 6-bit scales
//! and minimums as bytes), only reordered; Q8_0 values are stored as unsigned bytes
//! (`q + 128`); the fifth bits of Q5_0/Q5_K become 64-bit masks per line.
//!
//! Every (row, input) pair goes through the same sequence of float operations whatever the
//! tile shape, so a row's result does not depend on the batch it is in.

use crate::qdot::QuantActs;
use crate::simd::Level;
use gemma3_formats::quant::k_scale_min;
use gemma3_formats::{DType, TensorData};
use rayon::prelude::*;

/// 64 bytes, 64-byte aligned: the unit of packed storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// The weight types with a packed layout (and kernels), in the order tables list them.
pub const PACKED_TYPES: [DType; 6] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q5_0,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
];

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
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    meta_bytes: usize,
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
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
        let lines = groups * group_bytes / 64;
        let mut data: Vec<Line> = Vec::with_capacity(lines);
        huge_pages(data.as_ptr() as usize, lines * 64);
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
        // Each group's lines are zeroed (padding stays zero) and packed by the thread that
        // packs it: the buffer is written once, and the kernel's first-touch work (zeroing
        // and mapping its pages, a large share of loading) is spread over the threads.
        let chunk_groups = ((8 << 20) / (16 * rb)).max(1);
        let spare = &mut data.spare_capacity_mut()[..lines];
        for (c, chunk) in spare
            .chunks_mut(chunk_groups * group_bytes / 64)
            .enumerate()
        {
            let g0 = c * chunk_groups;
            chunk
                .par_chunks_mut(group_bytes / 64)
                .enumerate()
                .for_each(|(k, group)| pack_group(g0 + k, zeroed(group)));
            let end = ((g0 + chunk_groups) * 16).min(rows);
            done(g0 * 16 * rb..end * rb);
        }
        // SAFETY: the chunks cover the first `lines` lines, and `zeroed` initialised each.
        unsafe { data.set_len(lines) };
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

    /// Writes row `r` as it was stored before packing (its blocks' bytes, as in the file)
    /// into `out` (at least a row's bytes): a row of a tied embedding read from the packed
    /// copy of the output projection, so the file's pages are never touched again.
    pub fn stored_row(&self, r: usize, out: &mut [u8]) {
        let lay = layout(self.dtype).expect("a packed type has a layout");
        let (bb, nb) = (self.dtype.block_bytes(), self.cols / lay.elems);
        assert!(
            r < self.rows && out.len() >= nb * bb,
            "stored_row: row {r} or buffer"
        );
        let g = r / 16;
        // SAFETY: `Line` is 64 plain bytes; the group's lines are inside `data`.
        let group = unsafe {
            std::slice::from_raw_parts(
                self.data.as_ptr().add(g * self.group_bytes / 64) as *const u8,
                self.group_bytes,
            )
        };
        let (meta, quants) = group.split_at(self.meta_bytes);
        for b in 0..nb {
            unpack_block(
                self.dtype,
                r % 16,
                &meta[b * lay.meta..(b + 1) * lay.meta],
                &quants[b * lay.quants..(b + 1) * lay.quants],
                &mut out[b * bb..(b + 1) * bb],
            );
        }
    }

    /// Bytes of the packed copy.
    pub fn bytes(&self) -> usize {
        self.data.len() * 64
    }

    /// Number of 16-row groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The activation blocking the kernel for this type expects.
    pub fn act_block(&self) -> crate::qdot::ActBlock {
        crate::qdot::ActBlock::for_weights(self.dtype)
    }

    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    fn group_ptr(&self, g: usize) -> *const u8 {
        debug_assert!(g < self.groups);
        // SAFETY: g < groups, so the offset is inside `data`.
        unsafe { (self.data.as_ptr() as *const u8).add(g * self.group_bytes) }
    }
}

/// Asks Linux to back a packed matrix with 2 MB pages before its pages are first written.
/// Decode streams every weight once per token: with 4 KB pages a core misses the TLB every
/// 64 lines of each stream, and the page walks cap what one core pulls from memory. Where
/// transparent huge pages are off (or this is not Linux) nothing changes.
fn huge_pages(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let end = start + bytes;
        // Whole 2 MB pages inside the buffer only: the advice covers nothing else.
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: madvise only advises on pages of an allocation we own (its capacity);
            // it changes neither their contents nor their validity; a failure is harmless.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// Zeroes `lines` and returns them initialised.
fn zeroed(lines: &mut [std::mem::MaybeUninit<Line>]) -> &mut [Line] {
    for l in lines.iter_mut() {
        l.write(Line([0; 64]));
    }
    // SAFETY: every element was just written; `MaybeUninit<Line>` has `Line`'s layout.
    unsafe { &mut *(lines as *mut [std::mem::MaybeUninit<Line>] as *mut [Line]) }
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

/// Reads row `r` (0..16) of one block back from its group's metadata `m` and quants `q`
/// into `blk`, as stored before [`pack_block`] (which it undoes byte for byte).
fn unpack_block(dtype: DType, r: usize, m: &[u8], q: &[u8], blk: &mut [u8]) {
    let get4 = |dst: &mut [u8], line: usize, xor: u8| {
        for t in 0..4 {
            dst[t] = q[64 * line + 4 * r + t] ^ xor;
        }
    };
    // Bit `4r + t` of the 64-bit mask at `m[at..]`.
    let bit = |at: usize, t: usize| {
        let mask = u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
        ((mask >> (4 * r + t)) & 1) as u8
    };
    match dtype {
        DType::Q8_0 => {
            blk[0..2].copy_from_slice(&m[2 * r..2 * r + 2]);
            for s in 0..8 {
                get4(&mut blk[2 + 4 * s..], s, 0x80);
            }
        }
        DType::Q4_0 => {
            blk[0..2].copy_from_slice(&m[2 * r..2 * r + 2]);
            for l in 0..4 {
                get4(&mut blk[2 + 4 * l..], l, 0);
            }
        }
        DType::Q5_0 => {
            blk[0..2].copy_from_slice(&m[2 * r..2 * r + 2]);
            let mut qh = 0u32;
            for l in 0..4 {
                get4(&mut blk[6 + 4 * l..], l, 0);
                for (k, base) in [(0, 4 * l), (1, 16 + 4 * l)] {
                    for t in 0..4 {
                        qh |= (bit(32 + 16 * l + 8 * k, t) as u32) << (base + t);
                    }
                }
            }
            blk[2..6].copy_from_slice(&qh.to_le_bytes());
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            blk[0..2].copy_from_slice(&m[2 * r..2 * r + 2]);
            blk[2..4].copy_from_slice(&m[32 + 2 * r..32 + 2 * r + 2]);
            let sc = |j: usize| m[64 + 16 * j + r];
            let mn = |j: usize| m[192 + 32 * (j / 2) + 2 * r + (j % 2)];
            // The 6-bit scales and minimums back into ggml's 12 bytes (every bit is used,
            // so this is the only encoding `k_scale_min` reads them from).
            for j in 0..4 {
                blk[4 + j] = sc(j) | ((sc(j + 4) >> 4) << 6);
                blk[8 + j] = mn(j) | ((mn(j + 4) >> 4) << 6);
                blk[12 + j] = (sc(j + 4) & 0x0f) | ((mn(j + 4) & 0x0f) << 4);
            }
            let qs = if five { 48 } else { 16 };
            if five {
                blk[16..48].fill(0);
            }
            for c in 0..4 {
                for l in 0..8 {
                    get4(&mut blk[qs + 32 * c + 4 * l..], 8 * c + l, 0);
                    if five {
                        for k in 0..2 {
                            for t in 0..4 {
                                blk[16 + 4 * l + t] |=
                                    bit(320 + 128 * c + 16 * l + 8 * k, t) << (2 * c + k);
                            }
                        }
                    }
                }
            }
        }
        DType::Q6_K => {
            blk[208..210].copy_from_slice(&m[2 * r..2 * r + 2]);
            for j in 0..16 {
                blk[192 + j] = m[32 + 16 * j + r];
            }
            for h in 0..2 {
                for l in 0..8 {
                    get4(&mut blk[64 * h + 4 * l..], 24 * h + 3 * l, 0);
                    get4(&mut blk[64 * h + 32 + 4 * l..], 24 * h + 3 * l + 1, 0);
                    get4(&mut blk[128 + 32 * h + 4 * l..], 24 * h + 3 * l + 2, 0);
                }
            }
        }
        _ => unreachable!("no packed layout for {dtype}"),
    }
}

/// The instructions the packed kernels use on this CPU, or `None` where there are none.
pub fn kernels_name() -> Option<&'static str> {
    if !available() {
        return None;
    }
    let level = crate::simd::level();
    Some(if level == Level::Neon {
        if crate::simd::has_dotprod() {
            "NEON + dot product"
        } else {
            "NEON"
        }
    } else if level == Level::Avx512 && crate::simd::has_vnni() {
        "AVX-512 VNNI"
    } else if crate::simd::has_avx_vnni() {
        "AVX2 + AVX-VNNI"
    } else {
        "AVX2"
    })
}

/// Whether the packed kernels can run here: AVX-512 (VNNI), AVX2 (AVX-VNNI), or NEON
/// (dot product).
pub fn available() -> bool {
    matches!(
        crate::simd::level(),
        Level::Avx2 | Level::Avx512 | Level::Neon
    )
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
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let k = isa::kernels(p.dtype);
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
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = (p, acts, n, groups, out);
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod isa {
    //! The kernels, written once over [`Isa`]: AVX-512 with VNNI (one register per line),
    //! AVX2 with AVX-VNNI or with 16-bit multiply-adds (two registers per line), and NEON
    //! with `sdot` or with widening multiplies (four registers per line).

    use super::PackedMatrix;
    use crate::qdot::QuantActs;
    use gemma3_formats::DType;
    #[cfg(target_arch = "aarch64")]
    use std::arch::aarch64::*;
    #[cfg(target_arch = "x86_64")]
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
        // Tile shapes (groups per decode step, inputs per prompt tile) that keep a tile's
        // accumulators in registers: x86 has 16 or 32 of them, one or two per row vector;
        // NEON 32, four per row vector. The shape never changes a result.
        #[cfg(target_arch = "x86_64")]
        macro_rules! for_isa {
            ($m:ident) => {
                match dtype {
                    DType::Q8_0 => k!($m, 0, 4, 8),
                    DType::Q4_0 => k!($m, 1, 4, 8),
                    DType::Q5_0 => k!($m, 2, 4, 8),
                    DType::Q4_K => k!($m, 3, 2, 4),
                    DType::Q5_K => k!($m, 4, 2, 4),
                    DType::Q6_K => k!($m, 5, 2, 4),
                    _ => unreachable!("no packed kernel for {dtype}"),
                }
            };
        }
        #[cfg(target_arch = "aarch64")]
        macro_rules! for_isa {
            ($m:ident) => {
                match dtype {
                    DType::Q8_0 => k!($m, 0, 2, 2),
                    DType::Q4_0 => k!($m, 1, 2, 2),
                    DType::Q5_0 => k!($m, 2, 2, 2),
                    DType::Q4_K => k!($m, 3, 1, 2),
                    DType::Q5_K => k!($m, 4, 1, 2),
                    DType::Q6_K => k!($m, 5, 1, 2),
                    _ => unreachable!("no packed kernel for {dtype}"),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = crate::simd::level() == crate::simd::Level::Avx512;
            if avx512 && crate::simd::has_vnni() {
                for_isa!(avx512_vnni)
            } else if crate::simd::has_avx_vnni() {
                for_isa!(avx2_vnni)
            } else {
                for_isa!(avx2_madd)
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if crate::simd::has_dotprod() {
                for_isa!(neon_dot)
            } else {
                for_isa!(neon_widen)
            }
        }
    }

    /// What the kernels need of an instruction set. A *line* holds 4 bytes of each of 16
    /// rows; an integer or float vector one value per row.
    pub trait Isa {
        type L: Copy;
        type I: Copy;
        type F: Copy;
        /// Whether `dot` would overflow on Q8_0's unsigned bytes (`q + 128`), so Q8_0 goes
        /// through `dot_signed` on the signed values and has no offset term.
        const SIGNED_Q8: bool;
        /// Whether tiles of few inputs split each integer sum over two accumulators, to
        /// shorten dependent chains (x86, one or two registers per row vector); NEON's four
        /// registers per vector are four chains already. Integer sums: same results.
        const SPLIT_CHAINS: bool;
        unsafe fn load(p: *const u8) -> Self::L;
        unsafe fn splat8(v: i8) -> Self::L;
        unsafe fn and(a: Self::L, b: Self::L) -> Self::L;
        unsafe fn or(a: Self::L, b: Self::L) -> Self::L;
        unsafe fn srl2(a: Self::L) -> Self::L;
        unsafe fn srl4(a: Self::L) -> Self::L;
        unsafe fn sll2(a: Self::L) -> Self::L;
        unsafe fn sll4(a: Self::L) -> Self::L;
        /// Adds 16 to the bytes whose bit is set in `mask` (a fifth bit).
        unsafe fn add16_where(a: Self::L, mask: u64) -> Self::L;
        /// `acc + Σ₄ w·x` per row: unsigned weight bytes times the 4 signed bytes at `x`.
        unsafe fn dot(acc: Self::I, w: Self::L, x: *const i8) -> Self::I;
        /// As `dot` for Q8_0's stored bytes, read as signed values (only if `SIGNED_Q8`).
        unsafe fn dot_signed(acc: Self::I, w: Self::L, x: *const i8) -> Self::I;
        unsafe fn izero() -> Self::I;
        unsafe fn iset(v: i32) -> Self::I;
        unsafe fn iadd(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn imul(a: Self::I, b: Self::I) -> Self::I;
        unsafe fn u8x16(p: *const u8) -> Self::I;
        unsafe fn i8x16(p: *const u8) -> Self::I;
        /// `acc + m₀·lo16(x) + m₁·hi16(x)` per row, `m` 16 pairs of bytes at `p`.
        unsafe fn dot_pairs(acc: Self::I, p: *const u8, x: i32) -> Self::I;
        unsafe fn cvt(a: Self::I) -> Self::F;
        unsafe fn fzero() -> Self::F;
        unsafe fn fset(v: f32) -> Self::F;
        unsafe fn f16x16(p: *const u8) -> Self::F;
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
        unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
        unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
        /// Stores the first `n` (≤ 16) rows.
        unsafe fn store(p: *mut f32, v: Self::F, n: usize);
    }

    #[inline(always)]
    unsafe fn read4(x: *const i8) -> i32 {
        (x as *const i32).read_unaligned()
    }

    #[cfg(target_arch = "x86_64")]
    pub struct Avx512;

    #[cfg(target_arch = "x86_64")]
    impl Isa for Avx512 {
        type L = __m512i;
        type I = __m512i;
        type F = __m512;
        const SIGNED_Q8: bool = false;
        const SPLIT_CHAINS: bool = true;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m512i {
            _mm512_load_si512(p as *const _)
        }
        #[inline(always)]
        unsafe fn splat8(v: i8) -> __m512i {
            _mm512_set1_epi8(v)
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
            _mm512_and_si512(a, b)
        }
        #[inline(always)]
        unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
            _mm512_or_si512(a, b)
        }
        #[inline(always)]
        unsafe fn srl2(a: __m512i) -> __m512i {
            _mm512_srli_epi16(a, 2)
        }
        #[inline(always)]
        unsafe fn srl4(a: __m512i) -> __m512i {
            _mm512_srli_epi16(a, 4)
        }
        #[inline(always)]
        unsafe fn sll2(a: __m512i) -> __m512i {
            _mm512_slli_epi16(a, 2)
        }
        #[inline(always)]
        unsafe fn sll4(a: __m512i) -> __m512i {
            _mm512_slli_epi16(a, 4)
        }
        #[inline(always)]
        unsafe fn add16_where(a: __m512i, mask: u64) -> __m512i {
            _mm512_mask_add_epi8(a, mask, a, _mm512_set1_epi8(0x10))
        }
        #[inline(always)]
        unsafe fn dot(acc: __m512i, w: __m512i, x: *const i8) -> __m512i {
            _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(read4(x)))
        }
        #[inline(always)]
        unsafe fn dot_signed(acc: __m512i, w: __m512i, x: *const i8) -> __m512i {
            Self::dot(acc, w, x)
        }
        #[inline(always)]
        unsafe fn izero() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn iset(v: i32) -> __m512i {
            _mm512_set1_epi32(v)
        }
        #[inline(always)]
        unsafe fn iadd(a: __m512i, b: __m512i) -> __m512i {
            _mm512_add_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn imul(a: __m512i, b: __m512i) -> __m512i {
            _mm512_mullo_epi32(a, b)
        }
        #[inline(always)]
        unsafe fn u8x16(p: *const u8) -> __m512i {
            _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const _))
        }
        #[inline(always)]
        unsafe fn i8x16(p: *const u8) -> __m512i {
            _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const _))
        }
        #[inline(always)]
        unsafe fn dot_pairs(acc: __m512i, p: *const u8, x: i32) -> __m512i {
            let m = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const _));
            _mm512_dpwssd_epi32(acc, m, _mm512_set1_epi32(x))
        }
        #[inline(always)]
        unsafe fn cvt(a: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(a)
        }
        #[inline(always)]
        unsafe fn fzero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn fset(v: f32) -> __m512 {
            _mm512_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn f16x16(p: *const u8) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const _))
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512, n: usize) {
            if n >= 16 {
                _mm512_storeu_ps(p, v);
            } else {
                _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v);
            }
        }
    }

    /// AVX2: a line is two 256-bit halves (rows 0-7, 8-15). `VNNI` picks AVX-VNNI's
    /// `vpdpbusd`; without it `vpmaddubsw` + `vpmaddwd` do the same sums (exact for weights
    /// below 64; Q8_0 uses the sign trick on its signed bytes).
    #[cfg(target_arch = "x86_64")]
    pub struct Avx2<const VNNI: bool>;

    #[cfg(target_arch = "x86_64")]
    #[derive(Clone, Copy)]
    pub struct Two<T>(T, T);

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn bytes_of_mask(mask: u32) -> __m256i {
        // Byte k gets 0xff when bit k of `mask` is set.
        let v = _mm256_set1_epi32(mask as i32);
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits)
    }

    #[cfg(target_arch = "x86_64")]
    impl<const VNNI: bool> Avx2<VNNI> {
        #[inline(always)]
        unsafe fn dot_half(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, w, x)
            } else {
                let p = _mm256_maddubs_epi16(w, x);
                _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    impl<const VNNI: bool> Isa for Avx2<VNNI> {
        type L = Two<__m256i>;
        type I = Two<__m256i>;
        type F = Two<__m256>;
        const SIGNED_Q8: bool = !VNNI;
        const SPLIT_CHAINS: bool = true;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self::L {
            Two(
                _mm256_load_si256(p as *const _),
                _mm256_load_si256(p.add(32) as *const _),
            )
        }
        #[inline(always)]
        unsafe fn splat8(v: i8) -> Self::L {
            Two(_mm256_set1_epi8(v), _mm256_set1_epi8(v))
        }
        #[inline(always)]
        unsafe fn and(a: Self::L, b: Self::L) -> Self::L {
            Two(_mm256_and_si256(a.0, b.0), _mm256_and_si256(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn or(a: Self::L, b: Self::L) -> Self::L {
            Two(_mm256_or_si256(a.0, b.0), _mm256_or_si256(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn srl2(a: Self::L) -> Self::L {
            Two(_mm256_srli_epi16(a.0, 2), _mm256_srli_epi16(a.1, 2))
        }
        #[inline(always)]
        unsafe fn srl4(a: Self::L) -> Self::L {
            Two(_mm256_srli_epi16(a.0, 4), _mm256_srli_epi16(a.1, 4))
        }
        #[inline(always)]
        unsafe fn sll2(a: Self::L) -> Self::L {
            Two(_mm256_slli_epi16(a.0, 2), _mm256_slli_epi16(a.1, 2))
        }
        #[inline(always)]
        unsafe fn sll4(a: Self::L) -> Self::L {
            Two(_mm256_slli_epi16(a.0, 4), _mm256_slli_epi16(a.1, 4))
        }
        #[inline(always)]
        unsafe fn add16_where(a: Self::L, mask: u64) -> Self::L {
            let b16 = _mm256_set1_epi8(0x10);
            let lo = _mm256_and_si256(bytes_of_mask(mask as u32), b16);
            let hi = _mm256_and_si256(bytes_of_mask((mask >> 32) as u32), b16);
            Two(_mm256_add_epi8(a.0, lo), _mm256_add_epi8(a.1, hi))
        }
        #[inline(always)]
        unsafe fn dot(acc: Self::I, w: Self::L, x: *const i8) -> Self::I {
            let xv = _mm256_set1_epi32(read4(x));
            Two(
                Self::dot_half(acc.0, w.0, xv),
                Self::dot_half(acc.1, w.1, xv),
            )
        }
        #[inline(always)]
        unsafe fn dot_signed(acc: Self::I, w: Self::L, x: *const i8) -> Self::I {
            if VNNI {
                return Self::dot(acc, w, x);
            }
            // |q| times x with q's sign: products stay within i16 pairs.
            let xv = _mm256_set1_epi32(read4(x));
            let flip = _mm256_set1_epi8(-128);
            let half = |acc: __m256i, w: __m256i| {
                let q = _mm256_xor_si256(w, flip);
                Self::dot_half(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(xv, q))
            };
            Two(half(acc.0, w.0), half(acc.1, w.1))
        }
        #[inline(always)]
        unsafe fn izero() -> Self::I {
            Two(_mm256_setzero_si256(), _mm256_setzero_si256())
        }
        #[inline(always)]
        unsafe fn iset(v: i32) -> Self::I {
            Two(_mm256_set1_epi32(v), _mm256_set1_epi32(v))
        }
        #[inline(always)]
        unsafe fn iadd(a: Self::I, b: Self::I) -> Self::I {
            Two(_mm256_add_epi32(a.0, b.0), _mm256_add_epi32(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn imul(a: Self::I, b: Self::I) -> Self::I {
            Two(_mm256_mullo_epi32(a.0, b.0), _mm256_mullo_epi32(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn u8x16(p: *const u8) -> Self::I {
            Two(
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const _)),
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const _)),
            )
        }
        #[inline(always)]
        unsafe fn i8x16(p: *const u8) -> Self::I {
            Two(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const _)),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8) as *const _)),
            )
        }
        #[inline(always)]
        unsafe fn dot_pairs(acc: Self::I, p: *const u8, x: i32) -> Self::I {
            let xv = _mm256_set1_epi32(x);
            let lo = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const _));
            let hi = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(16) as *const _));
            Two(
                _mm256_add_epi32(acc.0, _mm256_madd_epi16(lo, xv)),
                _mm256_add_epi32(acc.1, _mm256_madd_epi16(hi, xv)),
            )
        }
        #[inline(always)]
        unsafe fn cvt(a: Self::I) -> Self::F {
            Two(_mm256_cvtepi32_ps(a.0), _mm256_cvtepi32_ps(a.1))
        }
        #[inline(always)]
        unsafe fn fzero() -> Self::F {
            Two(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn fset(v: f32) -> Self::F {
            Two(_mm256_set1_ps(v), _mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn f16x16(p: *const u8) -> Self::F {
            Two(
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const _)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const _)),
            )
        }
        #[inline(always)]
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
            Two(_mm256_mul_ps(a.0, b.0), _mm256_mul_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            Two(
                _mm256_fmadd_ps(a.0, b.0, c.0),
                _mm256_fmadd_ps(a.1, b.1, c.1),
            )
        }
        #[inline(always)]
        unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            Two(
                _mm256_fnmadd_ps(a.0, b.0, c.0),
                _mm256_fnmadd_ps(a.1, b.1, c.1),
            )
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::F, n: usize) {
            if n >= 16 {
                _mm256_storeu_ps(p, v.0);
                _mm256_storeu_ps(p.add(8), v.1);
            } else {
                let mut tmp = [0f32; 16];
                _mm256_storeu_ps(tmp.as_mut_ptr(), v.0);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v.1);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, n);
            }
        }
    }

    /// Stores 16 rows of group `g` for input `i`, leaving rows past the end alone.
    #[inline(always)]
    unsafe fn store<S: Isa>(p: &PackedMatrix, g: usize, i: usize, out: *mut f32, v: S::F) {
        let r0 = g * 16;
        S::store(out.add(i * p.rows + r0), v, p.rows - r0);
    }

    /// Q8_0 (`KIND` 0), Q4_0 (1), Q5_0 (2): blocks of 32 against Q8_0 activations.
    #[inline(always)]
    unsafe fn blocks32<S: Isa, const KIND: u8, const G: usize, const N: usize>(
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
            0 if S::SIGNED_Q8 => 0.0,
            0 => -128.0f32,
            1 => -8.0,
            _ => -16.0,
        };
        // Two integer accumulators per pair when there are few inputs, so the chains of
        // dependent dot products are short (integer sums are exact: same result).
        let two = S::SPLIT_CHAINS && N < 4;
        let base: [*const u8; G] = std::array::from_fn(|g| p.group_ptr(g0 + g));
        let x: [*const i8; N] = std::array::from_fn(|i| acts.q.as_ptr().add((i0 + i) * cols));
        let dg: [*const f32; N] =
            std::array::from_fn(|i| acts.dg.as_ptr().add((i0 + i) * cols / 16));
        let sdx: [*const f32; N] =
            std::array::from_fn(|i| acts.sdx32.as_ptr().add((i0 + i) * cols / 32));
        let m4 = S::splat8(0x0f);
        let mut fa = [[S::fzero(); N]; G];
        for b in 0..nb {
            let mut ia = [[[S::izero(); 2]; N]; G];
            let qs: [*const u8; G] = std::array::from_fn(|g| base[g].add(p.meta_bytes + b * qb));
            if KIND == 0 {
                for s in 0..8 {
                    let w: [S::L; G] = std::array::from_fn(|g| S::load(qs[g].add(64 * s)));
                    let k = if two { s & 1 } else { 0 };
                    for i in 0..N {
                        let xs = x[i].add(32 * b + 4 * s);
                        for g in 0..G {
                            ia[g][i][k] = if S::SIGNED_Q8 {
                                S::dot_signed(ia[g][i][k], w[g], xs)
                            } else {
                                S::dot(ia[g][i][k], w[g], xs)
                            };
                        }
                    }
                }
            } else {
                for l in 0..4 {
                    let mut lo = [S::splat8(0); G];
                    let mut hi = [S::splat8(0); G];
                    for g in 0..G {
                        let v = S::load(qs[g].add(64 * l));
                        lo[g] = S::and(v, m4);
                        hi[g] = S::and(S::srl4(v), m4);
                        if KIND == 2 {
                            let mk = base[g].add(b * mb + 32 + 16 * l) as *const u64;
                            lo[g] = S::add16_where(lo[g], mk.read_unaligned());
                            hi[g] = S::add16_where(hi[g], mk.add(1).read_unaligned());
                        }
                    }
                    let k = if two { 1 } else { 0 };
                    for i in 0..N {
                        let xl = x[i].add(32 * b + 4 * l);
                        let xh = x[i].add(32 * b + 16 + 4 * l);
                        for g in 0..G {
                            ia[g][i][0] = S::dot(ia[g][i][0], lo[g], xl);
                            ia[g][i][k] = S::dot(ia[g][i][k], hi[g], xh);
                        }
                    }
                }
            }
            let sw: [S::F; G] = std::array::from_fn(|g| S::f16x16(base[g].add(b * mb)));
            for i in 0..N {
                let dx = S::fset(*dg[i].add(2 * b));
                let c = S::fset(*sdx[i].add(b) * off);
                for g in 0..G {
                    let isum = if two {
                        S::iadd(ia[g][i][0], ia[g][i][1])
                    } else {
                        ia[g][i][0]
                    };
                    let t = S::fmadd(S::cvt(isum), dx, c);
                    fa[g][i] = S::fmadd(t, sw[g], fa[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..N {
                store::<S>(p, g0 + g, i0 + i, out, fa[g][i]);
            }
        }
    }

    /// Q4_K (`FIVE` false) and Q5_K (true) against Q8_K activations: per sub-block the
    /// integer sum times its 6-bit scale, summed in integers over the super-block;
    /// minimums through the sub-block sums.
    #[inline(always)]
    unsafe fn q4k<S: Isa, const FIVE: bool, const G: usize, const N: usize>(
        p: &PackedMatrix,
        g0: usize,
        acts: &QuantActs,
        i0: usize,
        out: *mut f32,
    ) {
        let cols = p.cols;
        let ns = cols / 256;
        let two = S::SPLIT_CHAINS && N < 4;
        let base: [*const u8; G] = std::array::from_fn(|g| p.group_ptr(g0 + g));
        let x: [*const i8; N] = std::array::from_fn(|i| acts.q.as_ptr().add((i0 + i) * cols));
        let dg: [*const f32; N] =
            std::array::from_fn(|i| acts.dg.as_ptr().add((i0 + i) * cols / 16));
        let pairs: [*const i32; N] =
            std::array::from_fn(|i| acts.pair32.as_ptr().add((i0 + i) * cols / 64));
        let m4 = S::splat8(0x0f);
        let mb = if FIVE { 832 } else { 320 };
        let mut fa = [[S::fzero(); N]; G];
        for s in 0..ns {
            let meta: [*const u8; G] = std::array::from_fn(|g| base[g].add(s * mb));
            let qs: [*const u8; G] = std::array::from_fn(|g| base[g].add(p.meta_bytes + s * 2048));
            let xs: [*const i8; N] = std::array::from_fn(|i| x[i].add(256 * s));
            let mut isb = [[S::izero(); N]; G];
            for c in 0..4 {
                // [g][i][low/high sub-block][chain]
                let mut ia = [[[[S::izero(); 2]; 2]; N]; G];
                for l in 0..8 {
                    let k = if two { l & 1 } else { 0 };
                    let mut lo = [S::splat8(0); G];
                    let mut hi = [S::splat8(0); G];
                    for g in 0..G {
                        let v = S::load(qs[g].add(512 * c + 64 * l));
                        lo[g] = S::and(v, m4);
                        hi[g] = S::and(S::srl4(v), m4);
                        if FIVE {
                            let mk = meta[g].add(320 + 128 * c + 16 * l) as *const u64;
                            lo[g] = S::add16_where(lo[g], mk.read_unaligned());
                            hi[g] = S::add16_where(hi[g], mk.add(1).read_unaligned());
                        }
                    }
                    for i in 0..N {
                        let xl = xs[i].add(64 * c + 4 * l);
                        let xh = xs[i].add(64 * c + 32 + 4 * l);
                        for g in 0..G {
                            ia[g][i][0][k] = S::dot(ia[g][i][0][k], lo[g], xl);
                            ia[g][i][1][k] = S::dot(ia[g][i][1][k], hi[g], xh);
                        }
                    }
                }
                for g in 0..G {
                    let sl = S::u8x16(meta[g].add(64 + 32 * c));
                    let sh = S::u8x16(meta[g].add(64 + 32 * c + 16));
                    for i in 0..N {
                        let (a, b) = if two {
                            (
                                S::iadd(ia[g][i][0][0], ia[g][i][0][1]),
                                S::iadd(ia[g][i][1][0], ia[g][i][1][1]),
                            )
                        } else {
                            (ia[g][i][0][0], ia[g][i][1][0])
                        };
                        isb[g][i] = S::iadd(isb[g][i], S::imul(a, sl));
                        isb[g][i] = S::iadd(isb[g][i], S::imul(b, sh));
                    }
                }
            }
            // Σ_j min_j · Σx_j: pairs of minimums against pairs of 16-bit sums.
            let mut mm = [[S::izero(); N]; G];
            for q in 0..4 {
                for g in 0..G {
                    for i in 0..N {
                        let xv = *pairs[i].add(4 * s + q);
                        mm[g][i] = S::dot_pairs(mm[g][i], meta[g].add(192 + 32 * q), xv);
                    }
                }
            }
            for g in 0..G {
                let d = S::f16x16(meta[g]);
                let dmin = S::f16x16(meta[g].add(32));
                for i in 0..N {
                    let dx = S::fset(*dg[i].add(16 * s));
                    let t = S::mul(S::cvt(isb[g][i]), dx);
                    fa[g][i] = S::fmadd(t, d, fa[g][i]);
                    let t = S::mul(S::cvt(mm[g][i]), dx);
                    fa[g][i] = S::fnmadd(t, dmin, fa[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..N {
                store::<S>(p, g0 + g, i0 + i, out, fa[g][i]);
            }
        }
    }

    /// Q6_K against Q8_K activations: 6-bit values less 32 (through the 16-value sums),
    /// times a signed 8-bit scale per 16 values, summed in integers over the super-block.
    /// Each step reads three lines in order and yields 4 values of each of the four 32-value
    /// runs of a half super-block.
    #[inline(always)]
    unsafe fn q6k<S: Isa, const G: usize, const N: usize>(
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
        let m4 = S::splat8(0x0f);
        let m30 = S::splat8(0x30);
        let mut fa = [[S::fzero(); N]; G];
        for s in 0..ns {
            let meta: [*const u8; G] = std::array::from_fn(|g| base[g].add(s * 288));
            let xs: [*const i8; N] = std::array::from_fn(|i| x[i].add(256 * s));
            let mut isb = [[S::izero(); N]; G];
            for h in 0..2 {
                let qs: [*const u8; G] =
                    std::array::from_fn(|g| base[g].add(p.meta_bytes + s * 3072 + 1536 * h));
                for half in 0..2 {
                    // Run qd's sub-block of 16 in this half: 8h + 2qd + half. Each sum
                    // starts at -32·Σx: the values' offset, in integers.
                    let mut ia = [[[S::izero(); 4]; N]; G];
                    for i in 0..N {
                        for qd in 0..4 {
                            let j = 16 * s + 8 * h + 2 * qd + half;
                            let init = S::iset(-32 * *sums[i].add(j));
                            for g in 0..G {
                                ia[g][i][qd] = init;
                            }
                        }
                    }
                    for l4 in 0..4 {
                        let l = 4 * half + l4;
                        let mut v = [[S::splat8(0); 4]; G];
                        for g in 0..G {
                            let at = qs[g].add(192 * l);
                            let ql0 = S::load(at);
                            let ql1 = S::load(at.add(64));
                            let qh = S::load(at.add(128));
                            v[g][0] = S::or(S::and(ql0, m4), S::and(S::sll4(qh), m30));
                            v[g][1] = S::or(S::and(ql1, m4), S::and(S::sll2(qh), m30));
                            v[g][2] = S::or(S::and(S::srl4(ql0), m4), S::and(qh, m30));
                            v[g][3] = S::or(S::and(S::srl4(ql1), m4), S::and(S::srl2(qh), m30));
                        }
                        for i in 0..N {
                            for qd in 0..4 {
                                let xq = xs[i].add(128 * h + 32 * qd + 4 * l);
                                for g in 0..G {
                                    ia[g][i][qd] = S::dot(ia[g][i][qd], v[g][qd], xq);
                                }
                            }
                        }
                    }
                    for g in 0..G {
                        for qd in 0..4 {
                            let j = 8 * h + 2 * qd + half;
                            let sc = S::i8x16(meta[g].add(32 + 16 * j));
                            for i in 0..N {
                                isb[g][i] = S::iadd(isb[g][i], S::imul(ia[g][i][qd], sc));
                            }
                        }
                    }
                }
            }
            for g in 0..G {
                let d = S::f16x16(meta[g]);
                for i in 0..N {
                    let dx = S::fset(*dg[i].add(16 * s));
                    let t = S::mul(S::cvt(isb[g][i]), dx);
                    fa[g][i] = S::fmadd(t, d, fa[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..N {
                store::<S>(p, g0 + g, i0 + i, out, fa[g][i]);
            }
        }
    }

    /// One instruction set's entry points: `KIND` 0-2 are [`blocks32`]'s, 3-4 Q4_K/Q5_K,
    /// 5 Q6_K. Each is compiled with its features so the generic bodies inline into it.
    macro_rules! entry {
        ($name:ident, $isa:ty, $features:literal) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const KIND: u8, const G: usize, const N: usize>(
                p: &PackedMatrix,
                g0: usize,
                acts: &QuantActs,
                i0: usize,
                out: *mut f32,
            ) {
                match KIND {
                    0 => blocks32::<$isa, 0, G, N>(p, g0, acts, i0, out),
                    1 => blocks32::<$isa, 1, G, N>(p, g0, acts, i0, out),
                    2 => blocks32::<$isa, 2, G, N>(p, g0, acts, i0, out),
                    3 => q4k::<$isa, false, G, N>(p, g0, acts, i0, out),
                    4 => q4k::<$isa, true, G, N>(p, g0, acts, i0, out),
                    _ => q6k::<$isa, G, N>(p, g0, acts, i0, out),
                }
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    entry!(
        avx512_vnni,
        Avx512,
        "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"
    );
    #[cfg(target_arch = "x86_64")]
    entry!(avx2_vnni, Avx2<true>, "avx2,fma,f16c,avxvnni");
    #[cfg(target_arch = "x86_64")]
    entry!(avx2_madd, Avx2<false>, "avx2,fma,f16c");
    #[cfg(target_arch = "aarch64")]
    entry!(neon_dot, Neon<true>, "neon,dotprod");
    #[cfg(target_arch = "aarch64")]
    entry!(neon_widen, Neon<false>, "neon");

    /// NEON: a line is four 128-bit registers (rows 0-3, 4-7, 8-11, 12-15). `DOT` picks
    /// `sdot` (signed × signed bytes, four products summed per 32-bit lane); without it
    /// `smull` + pairwise widening adds make the same sums. Weights are read as signed
    /// bytes: every packed value but Q8_0's is below 64, and Q8_0 flips its stored
    /// `q + 128` back to `q` (`SIGNED_Q8`).
    #[cfg(target_arch = "aarch64")]
    pub struct Neon<const DOT: bool>;

    #[cfg(target_arch = "aarch64")]
    impl<const DOT: bool> Neon<DOT> {
        /// `acc + Σ₄ w·x` per 32-bit lane.
        #[inline(always)]
        unsafe fn dot4(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
            if DOT {
                let mut acc = acc;
                // SAFETY: `sdot` only computes on registers; the entry points that use
                // `DOT = true` are compiled with (and only run on CPUs that have) dotprod.
                std::arch::asm!(
                    "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
                    acc = inout(vreg) acc,
                    w = in(vreg) w,
                    x = in(vreg) x,
                    options(pure, nomem, nostack)
                );
                acc
            } else {
                // Products of two bytes fit 16 bits (|−128·−128| = 16384); pairs are summed
                // into 32 bits, then pairs of pairs.
                let lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
                let hi = vmull_high_s8(w, x);
                vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)))
            }
        }

        #[inline(always)]
        unsafe fn xdup(x: *const i8) -> int8x16_t {
            vreinterpretq_s8_s32(vdupq_n_s32(read4(x)))
        }
    }

    #[cfg(target_arch = "aarch64")]
    impl<const DOT: bool> Isa for Neon<DOT> {
        type L = [uint8x16_t; 4];
        type I = [int32x4_t; 4];
        type F = [float32x4_t; 4];
        const SIGNED_Q8: bool = true;
        const SPLIT_CHAINS: bool = false;
        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self::L {
            std::array::from_fn(|j| vld1q_u8(p.add(16 * j)))
        }
        #[inline(always)]
        unsafe fn splat8(v: i8) -> Self::L {
            [vdupq_n_u8(v as u8); 4]
        }
        #[inline(always)]
        unsafe fn and(a: Self::L, b: Self::L) -> Self::L {
            std::array::from_fn(|j| vandq_u8(a[j], b[j]))
        }
        #[inline(always)]
        unsafe fn or(a: Self::L, b: Self::L) -> Self::L {
            std::array::from_fn(|j| vorrq_u8(a[j], b[j]))
        }
        // Shifts per byte: the x86 forms shift 16-bit lanes, but every use masks the bits
        // that crossed bytes away, so both give the same values.
        #[inline(always)]
        unsafe fn srl2(a: Self::L) -> Self::L {
            a.map(|v| vshrq_n_u8::<2>(v))
        }
        #[inline(always)]
        unsafe fn srl4(a: Self::L) -> Self::L {
            a.map(|v| vshrq_n_u8::<4>(v))
        }
        #[inline(always)]
        unsafe fn sll2(a: Self::L) -> Self::L {
            a.map(|v| vshlq_n_u8::<2>(v))
        }
        #[inline(always)]
        unsafe fn sll4(a: Self::L) -> Self::L {
            a.map(|v| vshlq_n_u8::<4>(v))
        }
        #[inline(always)]
        unsafe fn add16_where(a: Self::L, mask: u64) -> Self::L {
            // Byte k of the line gets 16 where bit k is set: the mask goes into a register
            // once, a table lookup spreads each of its bytes over 8 bytes, each tested
            // against one bit.
            const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
            const SPREAD: [[u8; 16]; 4] = {
                let mut t = [[0u8; 16]; 4];
                let mut k = 0;
                while k < 64 {
                    t[k / 16][k % 16] = (k / 8) as u8;
                    k += 1;
                }
                t
            };
            let bits = vld1q_u8(BITS.as_ptr());
            let b16 = vdupq_n_u8(0x10);
            let m = vreinterpretq_u8_u64(vdupq_n_u64(mask));
            std::array::from_fn(|j| {
                let spread = vqtbl1q_u8(m, vld1q_u8(SPREAD[j].as_ptr()));
                vaddq_u8(a[j], vandq_u8(vtstq_u8(spread, bits), b16))
            })
        }
        #[inline(always)]
        unsafe fn dot(acc: Self::I, w: Self::L, x: *const i8) -> Self::I {
            // Plain loops, not closures: `sdot` must be inlined straight into the entry
            // point compiled with dotprod.
            let xv = Self::xdup(x);
            let mut acc = acc;
            for j in 0..4 {
                acc[j] = Self::dot4(acc[j], vreinterpretq_s8_u8(w[j]), xv);
            }
            acc
        }
        #[inline(always)]
        unsafe fn dot_signed(acc: Self::I, w: Self::L, x: *const i8) -> Self::I {
            let xv = Self::xdup(x);
            let flip = vdupq_n_u8(0x80);
            let mut acc = acc;
            for j in 0..4 {
                acc[j] = Self::dot4(acc[j], vreinterpretq_s8_u8(veorq_u8(w[j], flip)), xv);
            }
            acc
        }
        #[inline(always)]
        unsafe fn izero() -> Self::I {
            [vdupq_n_s32(0); 4]
        }
        #[inline(always)]
        unsafe fn iset(v: i32) -> Self::I {
            [vdupq_n_s32(v); 4]
        }
        #[inline(always)]
        unsafe fn iadd(a: Self::I, b: Self::I) -> Self::I {
            std::array::from_fn(|j| vaddq_s32(a[j], b[j]))
        }
        #[inline(always)]
        unsafe fn imul(a: Self::I, b: Self::I) -> Self::I {
            std::array::from_fn(|j| vmulq_s32(a[j], b[j]))
        }
        #[inline(always)]
        unsafe fn u8x16(p: *const u8) -> Self::I {
            let b = vld1q_u8(p);
            let (lo, hi) = (vmovl_u8(vget_low_u8(b)), vmovl_high_u8(b));
            [
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo))),
                vreinterpretq_s32_u32(vmovl_high_u16(lo)),
                vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi))),
                vreinterpretq_s32_u32(vmovl_high_u16(hi)),
            ]
        }
        #[inline(always)]
        unsafe fn i8x16(p: *const u8) -> Self::I {
            let b = vld1q_s8(p as *const i8);
            let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
            [
                vmovl_s16(vget_low_s16(lo)),
                vmovl_high_s16(lo),
                vmovl_s16(vget_low_s16(hi)),
                vmovl_high_s16(hi),
            ]
        }
        #[inline(always)]
        unsafe fn dot_pairs(acc: Self::I, p: *const u8, x: i32) -> Self::I {
            // Row r's pair (m[2r], m[2r+1]) against (lo16(x), hi16(x)), in 32 bits.
            let xv = vreinterpretq_s16_s32(vdupq_n_s32(x));
            let (b0, b1) = (vld1q_u8(p), vld1q_u8(p.add(16)));
            let m: [uint16x8_t; 4] = [
                vmovl_u8(vget_low_u8(b0)),
                vmovl_high_u8(b0),
                vmovl_u8(vget_low_u8(b1)),
                vmovl_high_u8(b1),
            ];
            std::array::from_fn(|j| {
                let m = vreinterpretq_s16_u16(m[j]);
                let lo = vmull_s16(vget_low_s16(m), vget_low_s16(xv));
                let hi = vmull_high_s16(m, xv);
                vaddq_s32(acc[j], vpaddq_s32(lo, hi))
            })
        }
        #[inline(always)]
        unsafe fn cvt(a: Self::I) -> Self::F {
            a.map(|v| vcvtq_f32_s32(v))
        }
        #[inline(always)]
        unsafe fn fzero() -> Self::F {
            [vdupq_n_f32(0.0); 4]
        }
        #[inline(always)]
        unsafe fn fset(v: f32) -> Self::F {
            [vdupq_n_f32(v); 4]
        }
        #[inline(always)]
        unsafe fn f16x16(p: *const u8) -> Self::F {
            std::array::from_fn(|j| crate::neon::load_f16x4(p.add(8 * j)))
        }
        #[inline(always)]
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
            std::array::from_fn(|j| vmulq_f32(a[j], b[j]))
        }
        #[inline(always)]
        unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            std::array::from_fn(|j| vfmaq_f32(c[j], a[j], b[j]))
        }
        #[inline(always)]
        unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            std::array::from_fn(|j| vfmsq_f32(c[j], a[j], b[j]))
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: Self::F, n: usize) {
            if n >= 16 {
                for (j, v) in v.iter().enumerate() {
                    vst1q_f32(p.add(4 * j), *v);
                }
            } else {
                let mut tmp = [0f32; 16];
                for (j, v) in v.iter().enumerate() {
                    vst1q_f32(tmp.as_mut_ptr().add(4 * j), *v);
                }
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every packed type gives back each row's stored bytes exactly (odd row count, random
    /// bytes: every bit of every field).
    #[test]
    fn stored_rows_come_back_byte_for_byte() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        };
        for dtype in PACKED_TYPES {
            let (rows, cols) = (35, 512);
            let rb = dtype.row_bytes(cols).unwrap();
            let bytes: Vec<u8> = (0..rows * rb).map(|_| next()).collect();
            let p = PackedMatrix::pack_with(dtype, rows, cols, &bytes, |_| {}).unwrap();
            let mut out = vec![0u8; rb];
            for r in 0..rows {
                p.stored_row(r, &mut out);
                assert!(out == bytes[r * rb..(r + 1) * rb], "{dtype} row {r}");
            }
        }
    }
}
