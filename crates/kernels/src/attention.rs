//! Scaled dot-product attention over paged key/value caches, with the softmax in f32. The
//! query heads that share a kv head are taken together, so each key and value is read once
//! for all of them, where it lies in the cache: no copies per head. Keys go in blocks whose
//! scores are one small matrix product, under an online softmax, so no score row outgrows
//! a block.
//!
//! [`attend_batch`] is the entry point of a forward pass: a batch holds segments of
//! several sequences (each with its own cache); long segments (prompt chunks) run in tiles
//! of positions, short ones (decode steps) split their key range into parts that run in
//! parallel and are folded in order. Every row meets the same aligned blocks and parts in
//! the same order however it is batched, so its result does not depend on the batch.

use crate::gemm::RowsB;
use gemma3_formats::quantize::quantize_into;
use gemma3_formats::DType;
use rayon::prelude::*;
use std::ops::Range;

/// Positions per cache page. A page holds every kv head's rows for `PAGE` consecutive
/// ring slots (`[kv_head][PAGE][row]`), and a key block never crosses a page.
pub const PAGE: usize = KEY_BLOCK;

/// One cache page: `kv_heads × PAGE` rows of the cache type, in f32 words (so that an f32
/// cache is read in place and every type's bytes are suitably aligned).
pub type Page = Box<[f32]>;

/// The types keys and values may be stored in: f32, f16, bf16 (each value rounded to
/// nearest even) and q8_0 (blocks of 32 values with an f16 scale, as ggml's).
pub const KV_TYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0];

/// Bytes of one cached row of `dim` values in `ty`, or None when `ty` cannot hold such
/// rows (not a cache type, or q8_0 with `dim` not a multiple of 32).
pub fn kv_row_bytes(ty: DType, dim: usize) -> Option<usize> {
    if !KV_TYPES.contains(&ty) {
        return None;
    }
    ty.row_bytes(dim)
}

/// A new zeroed page of `rows` rows of `row_bytes` bytes.
pub fn new_page(rows: usize, row_bytes: usize) -> Page {
    vec![0.0f32; (rows * row_bytes).div_ceil(4)].into_boxed_slice()
}

fn page_bytes(p: &[f32]) -> &[u8] {
    // SAFETY: any f32 memory may be read as bytes (u8 has no alignment or validity needs).
    unsafe { std::slice::from_raw_parts(p.as_ptr().cast::<u8>(), p.len() * 4) }
}

fn page_bytes_mut(p: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern written is a valid f32 bit pattern.
    unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr().cast::<u8>(), p.len() * 4) }
}

/// The bytes of rows `rows` of `page` (rows of `row_bytes`).
pub fn page_rows(page: &Page, rows: Range<usize>, row_bytes: usize) -> &[u8] {
    &page_bytes(page)[rows.start * row_bytes..rows.end * row_bytes]
}

/// Stores `x` (one row) as `ty` at row `row` of `page` (rows of `row_bytes`).
pub fn store_row(ty: DType, x: &[f32], page: &mut Page, row: usize, row_bytes: usize) {
    let out = &mut page_bytes_mut(page)[row * row_bytes..(row + 1) * row_bytes];
    quantize_into(ty, x, out);
}

/// Where a q8_0 key's parts lie in its kv head's share of a page (`PAGE · row_bytes`
/// bytes from `head · PAGE · row_bytes`): the signed bytes transposed, `[dim][PAGE]`, then
/// the f16 scales, `[dim / 32][PAGE]`. Returns the byte offsets of the bytes and of the
/// scales of the head's first slot.
fn q8_key_parts(head: usize, dim: usize, row_bytes: usize) -> (usize, usize) {
    let base = head * PAGE * row_bytes;
    (base, base + dim * PAGE)
}

/// Where the key of kv head `head` (keys of `dim` values) at `slot` lies in its page, in
/// bytes: value `p` at `first + p · stride`, and with q8_0 the f16 scale of block `b` at
/// `scales + b · 2 · PAGE`.
struct KeyAt {
    first: usize,
    stride: usize,
    scales: Option<usize>,
}

fn key_at(ty: DType, head: usize, dim: usize, slot: usize, row_bytes: usize) -> KeyAt {
    match ty {
        DType::Q8_0 => {
            let (qs, scales) = q8_key_parts(head, dim, row_bytes);
            KeyAt {
                first: qs + slot,
                stride: PAGE,
                scales: Some(scales + 2 * slot),
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => {
            let width = ty.block_bytes();
            KeyAt {
                first: width * (head * dim * PAGE + slot),
                stride: width * PAGE,
                scales: None,
            }
        }
        other => unreachable!("{other} is not a cache type"),
    }
}

/// Stores the key `x` of kv head `head` at slot `slot` of `page`. Keys lie transposed in
/// their page (`[kv_head][dim][PAGE]`; q8_0 as [`q8_key_parts`] says, quantized along the
/// row as the reference does): a block's scores then read them in place or after a plain
/// conversion, with no transposing copy per block.
pub fn store_key(
    ty: DType,
    x: &[f32],
    page: &mut Page,
    head: usize,
    slot: usize,
    row_bytes: usize,
) {
    let at = key_at(ty, head, x.len(), slot, row_bytes);
    let bytes = page_bytes_mut(page);
    // Converted (or quantized) a block of 32 values at a time, as a row would be, then
    // spread over the block's lines.
    let mut buf = [0u8; 4 * 32];
    for (b, blk) in x.chunks(32).enumerate() {
        let enc = &mut buf[..ty
            .row_bytes(blk.len())
            .expect("cache rows are whole blocks")];
        quantize_into(ty, blk, enc);
        let values = match at.scales {
            Some(scales) => {
                let s = scales + b * 2 * PAGE;
                bytes[s..s + 2].copy_from_slice(&enc[..2]);
                &enc[2..]
            }
            None => &enc[..],
        };
        let width = values.len() / blk.len();
        for (p, v) in values.chunks_exact(width).enumerate() {
            let o = at.first + (32 * b + p) * at.stride;
            bytes[o..o + width].copy_from_slice(v);
        }
    }
}

/// Asks for the cache lines [`store_key`] will write for kv head `head` (keys of `dim`
/// values) at `slot`, for writing, without waiting for them. Keys lie transposed, so one
/// key touches a line per value, and between two decode steps the weights streamed through
/// the caches evict them: stores that miss wait for their lines a few at a time, while
/// prefetches ask for many at once.
pub fn prefetch_key(
    ty: DType,
    page: &Page,
    head: usize,
    dim: usize,
    slot: usize,
    row_bytes: usize,
) {
    let at = key_at(ty, head, dim, slot, row_bytes);
    let bytes = page_bytes(page);
    for p in 0..dim {
        crate::simd::prefetch_write(&bytes[at.first + p * at.stride]);
    }
    if let Some(scales) = at.scales {
        for b in 0..dim / 32 {
            crate::simd::prefetch_write(&bytes[scales + b * 2 * PAGE]);
        }
    }
}

/// Stores the value `x` of kv head `head` at slot `slot` of `page`.
pub fn store_value(
    ty: DType,
    x: &[f32],
    page: &mut Page,
    head: usize,
    slot: usize,
    row_bytes: usize,
) {
    store_row(ty, x, page, head * PAGE + slot, row_bytes)
}

/// Converts cached values (f16, bf16, q8_0) to f32: f16 with the CPU's conversion
/// instructions where there are some, the rest with the reference dequantization
/// vectorised for the level.
fn dequant_rows(ty: DType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    let x86 = matches!(
        crate::simd::level(),
        crate::simd::Level::Avx2 | crate::simd::Level::Avx512
    );
    #[cfg(target_arch = "x86_64")]
    if ty == DType::F16 && x86 {
        assert_eq!(bytes.len(), 2 * out.len());
        // SAFETY: the level says F16C (and AVX-512 F for that level) is there; the lengths
        // match (checked above).
        let done = unsafe {
            if crate::simd::level() == crate::simd::Level::Avx512 {
                f16c::to_f32_x16(bytes, out)
            } else {
                f16c::to_f32_x8(bytes, out)
            }
        };
        if done < out.len() {
            gemma3_formats::quant::dequantize(ty, &bytes[2 * done..], &mut out[done..]);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if ty == DType::Q8_0 && x86 {
        assert_eq!(
            bytes.len() * 32,
            out.len() * 34,
            "q8_0: 34 bytes per 32 values"
        );
        // SAFETY: the level says F16C and AVX2 (and AVX-512 F for that level) are there;
        // the lengths match (checked above).
        unsafe {
            if crate::simd::level() == crate::simd::Level::Avx512 {
                f16c::q8_0_to_f32_x16(bytes, out)
            } else {
                f16c::q8_0_to_f32_x8(bytes, out)
            }
        };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if crate::simd::level() == crate::simd::Level::Neon && matches!(ty, DType::F16 | DType::Q8_0) {
        // SAFETY: NEON is part of every aarch64 CPU; the lengths are checked inside.
        unsafe { neon_kv::to_f32(ty, bytes, out) };
        return;
    }
    dequant_rows_portable(ty, bytes, out)
}

/// Cached f16 and q8_0 rows to f32 with NEON: `fcvtl` for f16, and for q8_0 the
/// reference's products (`scale × q` in f32), so the same values.
#[cfg(target_arch = "aarch64")]
mod neon_kv {
    use crate::neon::load_f16x4;
    use gemma3_formats::DType;
    use std::arch::aarch64::*;

    /// # Safety
    /// Only NEON is needed; `bytes` must hold `out.len()` values of `ty` (asserted).
    pub unsafe fn to_f32(ty: DType, bytes: &[u8], out: &mut [f32]) {
        if ty == DType::F16 {
            assert_eq!(bytes.len(), 2 * out.len());
            let n = out.len() / 4 * 4;
            for i in (0..n).step_by(4) {
                vst1q_f32(
                    out.as_mut_ptr().add(i),
                    load_f16x4(bytes.as_ptr().add(2 * i)),
                );
            }
            gemma3_formats::quant::dequantize(ty, &bytes[2 * n..], &mut out[n..]);
            return;
        }
        assert_eq!(
            bytes.len() * 32,
            out.len() * 34,
            "q8_0: 34 bytes per 32 values"
        );
        for (b, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let d = gemma3_formats::quant::f16_at(b, 0);
            for half in 0..2 {
                let q = vld1q_s8(b.as_ptr().add(2 + 16 * half) as *const i8);
                let (lo, hi) = (vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q));
                let w = [
                    vmovl_s16(vget_low_s16(lo)),
                    vmovl_high_s16(lo),
                    vmovl_s16(vget_low_s16(hi)),
                    vmovl_high_s16(hi),
                ];
                for (v, w) in w.iter().enumerate() {
                    let f = vmulq_n_f32(vcvtq_f32_s32(*w), d);
                    vst1q_f32(o.as_mut_ptr().add(16 * half + 4 * v), f);
                }
            }
        }
    }
}

crate::dispatch!(fn dequant_rows_portable(ty: DType, bytes: &[u8], out: &mut [f32]) => dequant_rows_body);

#[inline(always)]
fn dequant_rows_body<const FMA: bool>(ty: DType, bytes: &[u8], out: &mut [f32]) {
    gemma3_formats::quant::dequantize(ty, bytes, out)
}

/// f16 to f32 with `vcvtph2ps`, 16 or 8 at a time; each returns how many leading values it
/// converted (whole vectors), the caller does the rest.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn to_f32_x16(src: &[u8], out: &mut [f32]) -> usize {
        let n = out.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let h = _mm256_loadu_si256(src.as_ptr().add(2 * i) as *const __m256i);
            _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
        n
    }

    /// q8_0 blocks (an f16 scale, then 32 signed bytes) to f32, 16 values per step: the
    /// same products as the reference (`scale × q` in f32), so the same values.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q8_0_to_f32_x16(src: &[u8], out: &mut [f32]) {
        for (b, o) in src.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let h = (b.as_ptr() as *const u16).read_unaligned();
            // A splat, not a scalar in lane 0: LLVM would fill the other lanes from
            // whatever register is free, a false dependency on that register's last writer.
            let d = _mm512_cvtph_ps(_mm256_set1_epi16(h as i16));
            for half in 0..2 {
                let q = _mm_loadu_si128(b.as_ptr().add(2 + 16 * half) as *const __m128i);
                let f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                _mm512_storeu_ps(o.as_mut_ptr().add(16 * half), _mm512_mul_ps(d, f));
            }
        }
    }

    /// [`q8_0_to_f32_x16`] with 8 values per step.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn q8_0_to_f32_x8(src: &[u8], out: &mut [f32]) {
        for (b, o) in src.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let h = (b.as_ptr() as *const u16).read_unaligned();
            // A splat, as in `q8_0_to_f32_x16`.
            let d = _mm256_cvtph_ps(_mm_set1_epi16(h as i16));
            for quarter in 0..4 {
                let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * quarter) as *const __m128i);
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * quarter), _mm256_mul_ps(d, f));
            }
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn to_f32_x8(src: &[u8], out: &mut [f32]) -> usize {
        let n = out.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        n
    }
}

/// One kv head of a layer's paged cache: position `p` lives in ring slot
/// `p % capacity`, i.e. page `slot / PAGE`, row `slot % PAGE`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [Page],
    pub v: &'a [Page],
    /// How keys and values are stored (one of [`KV_TYPES`]).
    pub k_type: DType,
    pub v_type: DType,
    /// Slots in the ring (positions wrap modulo this); a multiple of [`PAGE`].
    pub capacity: usize,
    /// Which kv head.
    pub head: usize,
    pub head_dim: usize,
}

thread_local! {
    /// A key block and a value block in f32, for caches of other types.
    static BLOCK_F32: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl<'a> KvView<'a> {
    /// Keys of positions `k0 .. k0 + nk` (inside one page) as the `head_dim × nk` matrix
    /// Kᵀ: in place for an f32 cache, else converted into `buf`.
    #[inline]
    fn keys_t<'b>(&self, k0: usize, nk: usize, buf: &'b mut Vec<f32>) -> crate::gemm::MatRef<'b>
    where
        'a: 'b,
    {
        use crate::gemm::MatRef;
        let hd = self.head_dim;
        let (page, row) = self.page_of(k0, nk);
        let page = &self.k[page];
        let ty = self.k_type;
        let first = self.head * hd * PAGE + row;
        if ty == DType::F32 {
            let data: &'a [f32] = &page[first..first + (hd - 1) * PAGE + nk];
            return MatRef::new(data, hd, nk, PAGE, 1);
        }
        buf.resize(nk * hd, 0.0);
        let bytes = page_bytes(page);
        if ty == DType::Q8_0 {
            let rb = ty.row_bytes(hd).expect("a cache type holds whole rows");
            let (qs, scales) = q8_key_parts(self.head, hd, rb);
            let mut d = [0f32; PAGE];
            for (p, out) in buf[..nk * hd].chunks_exact_mut(nk).enumerate() {
                if p % 32 == 0 {
                    let at = scales + 2 * ((p / 32) * PAGE + row);
                    for (d, h) in d.iter_mut().zip(bytes[at..at + 2 * nk].chunks_exact(2)) {
                        *d = half::f16::from_le_bytes([h[0], h[1]]).to_f32();
                    }
                }
                let at = qs + p * PAGE + row;
                for ((o, q), d) in out.iter_mut().zip(&bytes[at..at + nk]).zip(&d) {
                    // The reference's product (`scale × q` in f32): the same values.
                    *o = *q as i8 as f32 * d;
                }
            }
            return MatRef::new(&buf[..nk * hd], hd, nk, nk, 1);
        }
        for p in 0..hd {
            let at = 2 * (first + p * PAGE);
            dequant_rows(ty, &bytes[at..at + 2 * nk], &mut buf[p * nk..(p + 1) * nk]);
        }
        MatRef::new(&buf[..nk * hd], hd, nk, nk, 1)
    }

    /// Values of positions `k0 .. k0 + nk` (inside one page) as an `nk × head_dim` matrix:
    /// in place for an f32 cache, else converted into `buf`.
    #[inline]
    fn values<'b>(&self, k0: usize, nk: usize, buf: &'b mut Vec<f32>) -> crate::gemm::MatRef<'b>
    where
        'a: 'b,
    {
        use crate::gemm::MatRef;
        let hd = self.head_dim;
        let (page, row) = self.page_of(k0, nk);
        let page = &self.v[page];
        let first = self.head * PAGE + row;
        if self.v_type == DType::F32 {
            let data: &'a [f32] = &page[first * hd..(first + nk) * hd];
            return MatRef::new(data, nk, hd, hd, 1);
        }
        let rb = self
            .v_type
            .row_bytes(hd)
            .expect("a cache type holds whole rows");
        buf.resize(nk * hd, 0.0);
        dequant_rows(
            self.v_type,
            page_rows(page, first..first + nk, rb),
            &mut buf[..nk * hd],
        );
        MatRef::new(&buf[..nk * hd], nk, hd, hd, 1)
    }

    /// Kᵀ of positions `k0 .. k0 + nk` read in place (`head_dim` rows `PAGE` elements
    /// apart).
    fn keys_t_in_place(&self, k0: usize, nk: usize) -> (RowsB<'a>, usize) {
        let hd = self.head_dim;
        let (page, row) = self.page_of(k0, nk);
        let page = &self.k[page];
        if self.k_type == DType::Q8_0 {
            let rb = self.k_type.row_bytes(hd).expect("q8_0 holds whole rows");
            let (qs, scales) = q8_key_parts(self.head, hd, rb);
            let bytes = page_bytes(page);
            let q = &bytes[qs + row..qs + (hd - 1) * PAGE + row + nk];
            let last = (hd / 32 - 1) * PAGE + row + nk;
            let scales = &bytes[scales + 2 * row..scales + 2 * last];
            return (RowsB::Q8Cols { q, scales }, PAGE);
        }
        let first = self.head * hd * PAGE + row;
        let end = first + (hd - 1) * PAGE + nk;
        (typed_rows(self.k_type, page, first..end), PAGE)
    }

    /// Values of positions `k0 .. k0 + nk` read in place (rows `head_dim` apart).
    fn values_in_place(&self, k0: usize, nk: usize) -> (RowsB<'a>, usize) {
        let hd = self.head_dim;
        let (page, row) = self.page_of(k0, nk);
        let page = &self.v[page];
        if self.v_type == DType::Q8_0 {
            let rb = self.v_type.row_bytes(hd).expect("q8_0 holds whole rows");
            let first = self.head * PAGE + row;
            return (RowsB::Q8Rows(page_rows(page, first..first + nk, rb)), hd);
        }
        let first = (self.head * PAGE + row) * hd;
        (typed_rows(self.v_type, page, first..first + nk * hd), hd)
    }

    /// Page and row of position `k0`, whose block of `nk` must not cross the page.
    #[inline]
    fn page_of(&self, k0: usize, nk: usize) -> (usize, usize) {
        let slot = k0 % self.capacity;
        let (page, row) = (slot / PAGE, slot % PAGE);
        debug_assert!(row + nk <= PAGE, "a key block crosses a page");
        (page, row)
    }

    /// The key and value stored for position `p` (as the cache holds them), into `k` and
    /// `v` (`head_dim` each): for checks and tests.
    pub fn read(&self, p: usize, k: &mut [f32], v: &mut [f32]) {
        let (mut kb, mut vb) = (Vec::new(), Vec::new());
        let kt = self.keys_t(p, 1, &mut kb);
        for (i, x) in k.iter_mut().enumerate() {
            *x = kt.get(i, 0);
        }
        let vv = self.values(p, 1, &mut vb);
        for (i, x) in v.iter_mut().enumerate() {
            *x = vv.get(0, i);
        }
    }
}

/// Elements `range` of a page of `ty` (f32, f16 or bf16) as [`RowsB`].
fn typed_rows(ty: DType, page: &[f32], range: Range<usize>) -> RowsB<'_> {
    match ty {
        DType::F32 => RowsB::F32(&page[range]),
        DType::F16 => RowsB::F16(&page_bytes(page)[2 * range.start..2 * range.end]),
        DType::BF16 => RowsB::BF16(&page_bytes(page)[2 * range.start..2 * range.end]),
        other => unreachable!("{other} is read by its own layout"),
    }
}

/// Keys per block: a block's scores for a tile of rows are one small matrix product.
pub const KEY_BLOCK: usize = 256;

/// Keys per part (whole blocks). Parts and blocks start at multiples of their size in
/// position space, so a row meets the same blocks in the same order whichever tile or step
/// computes it: prefill and decode give identical results, and decode may compute the
/// parts of a long range in parallel and fold them afterwards.
pub const KEY_PART: usize = 1024;

/// The parts `keys` touches, as absolute position ranges clipped to `keys`.
pub fn key_parts(keys: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let n = part_count(&keys);
    (0..n).map(move |i| key_part(&keys, i))
}

/// How many parts [`key_parts`] yields.
pub fn part_count(keys: &Range<usize>) -> usize {
    if keys.is_empty() {
        return 0;
    }
    keys.end.div_ceil(KEY_PART) - keys.start / KEY_PART
}

/// Part `i` (counted from the first) of those [`key_parts`] yields.
pub fn key_part(keys: &Range<usize>, i: usize) -> Range<usize> {
    let p = keys.start / KEY_PART + i;
    (p * KEY_PART).max(keys.start)..((p + 1) * KEY_PART).min(keys.end)
}

/// Per-thread buffers of [`attend_rows`], grown once: one part's state and the running
/// maxima and sums. (The score tile of [`attend_part`] is `SCORES`.)
#[derive(Default)]
struct Scratch {
    part_acc: Vec<f32>,
    part_max: Vec<f32>,
    part_sum: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// The softmax state of `rows` query rows over the keys of one part (`part`, inside one
/// [`KEY_PART`]-aligned part), left unnormalised for [`fold_part`]: per row the largest
/// score `max`, `sum = Σ exp(score - max)` and `acc = Σ exp(score - max)·V`. Row `r` sees the
/// keys `keys[r] ∩ part`. `q` and `acc` are row-major `rows × head_dim`. A row with no key in
/// the part gets `max = -inf`, `sum = 0`, `acc = 0`.
#[allow(clippy::too_many_arguments)]
pub fn attend_part(
    q: &[f32],
    keys: &[Range<usize>],
    kv: &KvView<'_>,
    scores: Scores,
    part: Range<usize>,
    acc: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
) {
    use crate::gemm::{gemm, gemm_few_rows, gemm_into, BOperand, MatMut, MatRef, Warm, FEW_ROWS};
    let hd = kv.head_dim;
    let rows = keys.len();
    assert!(q.len() >= rows * hd && acc.len() >= rows * hd && max.len() >= rows);
    acc[..rows * hd].fill(0.0);
    max[..rows].fill(f32::NEG_INFINITY);
    sum[..rows].fill(0.0);
    let qv = MatRef::row_major(&q[..rows * hd], rows, hd);
    BLOCK_F32.with(|blocks| {
        SCORES.with(|s| {
            let (kbuf, vbuf) = &mut *blocks.borrow_mut();
            let mut s = s.borrow_mut();
            if s.len() < rows * KEY_BLOCK {
                // At least a whole group's rows: a decode task may take part of a group or
                // all of it, on whichever thread, and should find the tile grown already.
                s.resize(rows.max(MAX_GROUP) * KEY_BLOCK, 0.0);
            }
            // Blocks end at multiples of KEY_BLOCK, so they stay inside one page of the ring
            // (its capacity is a multiple of the page).
            let block_end = |k: usize| ((k / KEY_BLOCK + 1) * KEY_BLOCK).min(part.end);
            let mut k0 = part.start;
            while k0 < part.end {
                let k1 = block_end(k0);
                let nk = k1 - k0;
                let s = &mut s[..rows * nk];
                // A decode step reads the values in place (the keys' product fetches them).
                let values = (rows <= FEW_ROWS).then(|| kv.values_in_place(k0, nk));
                // A decode step's few rows read the cache in place (no conversion or
                // packing); a prompt tile goes through the blocked product. Both sum the
                // same terms in the same order.
                if let Some((vb, _)) = values {
                    // While the keys are multiplied, the values they weigh are fetched (the
                    // keys were, by the block before, but for a part's first).
                    let (kt, ld) = kv.keys_t_in_place(k0, nk);
                    let warm = Warm::of(vb).b_warm(k0 > part.start);
                    gemm_few_rows(rows, hd, nk, q, hd, kt, ld, s, nk, false, warm)
                } else {
                    let kt = kv.keys_t(k0, nk, kbuf);
                    gemm_into(qv, BOperand::F32(kt), MatMut::row_major(s, rows, nk), false)
                }
                for (r, range) in keys.iter().enumerate() {
                    let row = &mut s[r * nk..(r + 1) * nk];
                    let (a, b) = (range.start.clamp(k0, k1) - k0, range.end.clamp(k0, k1) - k0);
                    if a >= b {
                        row.fill(0.0);
                        continue;
                    }
                    row[..a].fill(0.0);
                    row[b..].fill(0.0);
                    let live = &mut row[a..b];
                    let m = crate::vmath::scores_max(live, scores.scale, scores.softcap);
                    let m_new = max[r].max(m);
                    if m_new > max[r] {
                        // Earlier blocks were summed against a smaller maximum.
                        let c = (max[r] - m_new).exp();
                        sum[r] *= c;
                        acc[r * hd..(r + 1) * hd].iter_mut().for_each(|v| *v *= c);
                        max[r] = m_new;
                    }
                    sum[r] += crate::vmath::exp_sum(live, m_new);
                }
                if let Some((vb, ld)) = values {
                    // While the values are multiplied, the part's next keys are fetched.
                    let next = if k1 < part.end {
                        Warm::of(kv.keys_t_in_place(k1, block_end(k1) - k1).0)
                    } else {
                        Warm::NONE
                    };
                    let warm = next.b_warm(true);
                    let acc = &mut acc[..rows * hd];
                    gemm_few_rows(rows, nk, hd, s, nk, vb, ld, acc, hd, true, warm)
                } else {
                    gemm(
                        MatRef::row_major(s, rows, nk),
                        BOperand::F32(kv.values(k0, nk, vbuf)),
                        MatMut::row_major(&mut acc[..rows * hd], rows, hd),
                        false,
                    )
                }
                k0 = k1;
            }
        })
    });
}

/// Folds a part's state (`acc_p`, `max_p`, `sum_p`) into a running one, row by row; the
/// same arithmetic wherever the parts were computed. Start from `acc = 0`, `max = -inf`,
/// `sum = 0` and fold the parts in position order.
pub fn fold_part(
    acc: &mut [f32],
    max: &mut [f32],
    sum: &mut [f32],
    acc_p: &[f32],
    max_p: &[f32],
    sum_p: &[f32],
    hd: usize,
) {
    for r in 0..max_p.len() {
        if max_p[r] == f32::NEG_INFINITY {
            continue;
        }
        let m = max[r].max(max_p[r]);
        let (a, b) = ((max[r] - m).exp(), (max_p[r] - m).exp());
        sum[r] = sum[r] * a + sum_p[r] * b;
        for (x, y) in acc[r * hd..(r + 1) * hd]
            .iter_mut()
            .zip(&acc_p[r * hd..(r + 1) * hd])
        {
            *x = *x * a + y * b;
        }
        max[r] = m;
    }
}

/// Attention of query rows that share one key/value head (the query heads of a group, for
/// one or many positions): `out[r] = softmax(q[r]·K[keys[r]]ᵀ · scale) · V[keys[r]]`, scores
/// capped when `softcap` is set. Parts are computed and folded in order ([`attend_part`],
/// [`fold_part`]), so a key is read once per tile of rows and no score row is longer than a
/// block, however long the context.
pub fn attend_rows(
    q: &[f32],
    keys: &[Range<usize>],
    kv: &KvView<'_>,
    scores: Scores,
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let rows = keys.len();
    let lo = keys.iter().map(|r| r.start).min().unwrap_or(0);
    let hi = keys.iter().map(|r| r.end).max().unwrap_or(0);
    let out = &mut out[..rows * hd];
    out.fill(0.0);
    SCRATCH.with(|t| {
        let t = &mut *t.borrow_mut();
        t.part_acc.resize(rows * hd, 0.0);
        t.part_max.resize(rows, 0.0);
        t.part_sum.resize(rows, 0.0);
        t.max.clear();
        t.max.resize(rows, f32::NEG_INFINITY);
        t.sum.clear();
        t.sum.resize(rows, 0.0);
        for part in key_parts(lo..hi) {
            attend_part(
                q,
                keys,
                kv,
                scores,
                part,
                &mut t.part_acc,
                &mut t.part_max,
                &mut t.part_sum,
            );
            fold_part(
                out,
                &mut t.max,
                &mut t.sum,
                &t.part_acc,
                &t.part_max[..rows],
                &t.part_sum,
                hd,
            );
        }
        normalize(out, &t.sum, hd);
    });
}

/// Divides each row of a folded state by its sum: the attention output.
pub fn normalize(acc: &mut [f32], sum: &[f32], hd: usize) {
    for (row, s) in acc.chunks_mut(hd).zip(sum) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Query and key/value heads of a layer: query head `h` uses kv head `h / (q / kv)`.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q / self.kv
    }
}

/// How raw scores are scaled: `s·scale`, then `c·tanh(s/c)` when `softcap` is set.
#[derive(Clone, Copy, Debug)]
pub struct Scores {
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// Segments with at least this many rows (prompt chunks) run in tiles of positions; shorter
/// ones (decode steps) split each row's key range into parts computed in parallel.
pub const TILE_MIN_ROWS: usize = 8;

/// Positions per task of the tiled path: with the query heads of a group that is the row
/// count of each score tile (64 measured best for 512-token prompts, with or without a long
/// context before them).
const QUERY_BLOCK: usize = 64;

/// Query heads per kv head that the part path handles (Gemma 3 has 2 to 4).
pub const MAX_GROUP: usize = 16;

/// Below this much work (query heads × keys × head_dim over the short rows of a batch), the
/// part path runs on the calling thread: a fork-join costs more than it saves.
const PARALLEL_WORK: usize = 1 << 18;

/// The same inside a team, whose hand-off costs about a microsecond: a two-thread 4B
/// decode step shares its attention over kv heads from 8 keys on, not 128.
const TEAM_PARALLEL_WORK: usize = 1 << 14;

/// Buffers of [`attend_batch`]'s part path. Sized by [`AttnScratch::new`] for the largest
/// batch expected, so a decode step allocates nothing; a larger batch grows them once.
#[derive(Default)]
pub struct AttnScratch {
    /// Short rows: (row, segment).
    rows: Vec<(usize, usize)>,
    /// Per short row its first slot, then the total: slot `j` of row `i` is part
    /// `(j - start[i]) / kv_heads` and kv head `(j - start[i]) % kv_heads`.
    slot_start: Vec<usize>,
    part_acc: Vec<f32>,
    part_max: Vec<f32>,
    part_sum: Vec<f32>,
    run_max: Vec<f32>,
    run_sum: Vec<f32>,
}

impl AttnScratch {
    /// Room for `rows` short rows whose key ranges span up to `positions` positions.
    pub fn new(heads: Heads, rows: usize, positions: usize) -> Self {
        let slots = rows * (positions.div_ceil(KEY_PART) + 1) * heads.kv;
        let g = heads.group();
        AttnScratch {
            rows: Vec::with_capacity(rows),
            slot_start: Vec::with_capacity(rows + 1),
            part_acc: vec![0.0; slots * g * heads.dim],
            part_max: vec![0.0; slots * g],
            part_sum: vec![0.0; slots * g],
            run_max: vec![0.0; heads.q],
            run_sum: vec![0.0; heads.q],
        }
    }

    pub fn bytes(&self) -> usize {
        4 * (self.part_acc.len() + self.part_max.len() + self.part_sum.len())
    }
}

thread_local! {
    /// Gathered query rows, their outputs and key ranges of one tile.
    static QUERY_TILE: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<Range<usize>>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Attention of one forward pass over a batch of sequences. `q` and `out` are
/// `rows × (heads.q · heads.dim)`; `keys[r]` are the positions row `r` sees; `segments[s]`
/// are the rows of sequence `s`, whose cache `kv(s, kv_head)` gives. Each row's result is
/// the same whatever else is in the batch.
#[allow(clippy::too_many_arguments)]
pub fn attend_batch<'a>(
    q: &[f32],
    keys: &[Range<usize>],
    segments: &[Range<usize>],
    kv: &(dyn Fn(usize, usize) -> KvView<'a> + Sync),
    heads: Heads,
    scores: Scores,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) {
    let qd = heads.q * heads.dim;
    assert!(
        heads.group() <= MAX_GROUP,
        "{} query heads per kv head",
        heads.group()
    );
    for (s, rows) in segments.iter().enumerate() {
        if rows.len() >= TILE_MIN_ROWS {
            attend_tiles(
                &q[rows.start * qd..rows.end * qd],
                &keys[rows.clone()],
                &|h| kv(s, h),
                heads,
                scores,
                &mut out[rows.start * qd..rows.end * qd],
            );
        }
    }
    attend_short_rows(q, keys, segments, kv, heads, scores, out, scratch);
}

/// A prompt chunk: tasks of up to [`QUERY_BLOCK`] positions, at least one per thread; per
/// kv head a task takes all of its query heads at once, so every key is read once per tile.
fn attend_tiles<'a>(
    q: &[f32],
    keys: &[Range<usize>],
    kv: &(dyn Fn(usize) -> KvView<'a> + Sync),
    heads: Heads,
    scores: Scores,
    out: &mut [f32],
) {
    let (hd, group) = (heads.dim, heads.group());
    let qd = heads.q * hd;
    let n = keys.len();
    let block = QUERY_BLOCK.min(n.div_ceil(rayon::current_num_threads()));
    out.par_chunks_mut(block * qd)
        .enumerate()
        .for_each(|(b, out)| {
            let t0 = b * block;
            let nt = out.len() / qd;
            QUERY_TILE.with(|tile| {
                let (qt, ot, tile_keys) = &mut *tile.borrow_mut();
                qt.resize(nt * group * hd, 0.0);
                ot.resize(nt * group * hd, 0.0);
                for kvh in 0..heads.kv {
                    tile_keys.clear();
                    for t in 0..nt {
                        for j in 0..group {
                            let (head, r) = (kvh * group + j, t * group + j);
                            let src = (t0 + t) * qd + head * hd;
                            qt[r * hd..(r + 1) * hd].copy_from_slice(&q[src..src + hd]);
                            tile_keys.push(keys[t0 + t].clone());
                        }
                    }
                    attend_rows(qt, tile_keys, &kv(kvh), scores, ot);
                    for t in 0..nt {
                        for j in 0..group {
                            let (head, r) = (kvh * group + j, t * group + j);
                            out[t * qd + head * hd..t * qd + (head + 1) * hd]
                                .copy_from_slice(&ot[r * hd..(r + 1) * hd]);
                        }
                    }
                }
            });
        });
}

/// Decode steps (and short chunks): per row and kv head, the group's query heads together.
/// The parts of every short row's key range (the aligned parts a tile folds in order) run
/// as independent tasks, then each row folds its parts in order.
#[allow(clippy::too_many_arguments)]
fn attend_short_rows<'a>(
    q: &[f32],
    keys: &[Range<usize>],
    segments: &[Range<usize>],
    kv: &(dyn Fn(usize, usize) -> KvView<'a> + Sync),
    heads: Heads,
    scores: Scores,
    out: &mut [f32],
    sc: &mut AttnScratch,
) {
    let (hd, group, nkv, nh) = (heads.dim, heads.group(), heads.kv, heads.q);
    let qd = nh * hd;
    sc.rows.clear();
    sc.slot_start.clear();
    let mut slots = 0;
    let mut work = 0;
    for (s, rows) in segments.iter().enumerate() {
        if rows.len() >= TILE_MIN_ROWS {
            continue;
        }
        for r in rows.clone() {
            sc.rows.push((r, s));
            sc.slot_start.push(slots);
            slots += part_count(&keys[r]) * nkv;
            work += nh * keys[r].len() * hd;
        }
    }
    if sc.rows.is_empty() {
        return;
    }
    sc.slot_start.push(slots);
    if sc.part_max.len() < slots * group {
        sc.part_acc.resize(slots * group * hd, 0.0);
        sc.part_max.resize(slots * group, 0.0);
        sc.part_sum.resize(slots * group, 0.0);
    }
    let parallel = if crate::team::leading() {
        work >= TEAM_PARALLEL_WORK
    } else {
        work >= PARALLEL_WORK
    };
    // Fewer slots than threads (a short context, one kv head): a task takes some of a
    // group's query heads. Each row's scores and sums are its own multiply-add chains, so
    // splitting a group changes no bit; only the keys are read once per task.
    let threads = rayon::current_num_threads();
    let split = if parallel && slots < threads && group.is_multiple_of(2) {
        2
    } else {
        1
    };
    let gs = group / split;
    let (rows, starts) = (&sc.rows, &sc.slot_start);
    let task = |t: usize, acc: &mut [f32], max: &mut [f32], sum: &mut [f32]| {
        let (j, h0) = (t / split, (t % split) * gs);
        let i = starts.partition_point(|&st| st <= j) - 1;
        let (r, s) = rows[i];
        let local = j - starts[i];
        let (part, kvh) = (local / nkv, local % nkv);
        let ranges: [Range<usize>; MAX_GROUP] = std::array::from_fn(|_| keys[r].clone());
        let q0 = r * qd + (kvh * group + h0) * hd;
        attend_part(
            &q[q0..q0 + gs * hd],
            &ranges[..gs],
            &kv(s, kvh),
            scores,
            key_part(&keys[r], part),
            acc,
            max,
            sum,
        );
    };
    let acc = &mut sc.part_acc[..slots * group * hd];
    let max = &mut sc.part_max[..slots * group];
    let sum = &mut sc.part_sum[..slots * group];
    if parallel && slots * split > 1 {
        crate::team::for_each_chunk3((acc, gs * hd), (max, gs), (sum, gs), task);
    } else {
        acc.chunks_mut(gs * hd)
            .zip(max.chunks_mut(gs))
            .zip(sum.chunks_mut(gs))
            .enumerate()
            .for_each(|(t, ((a, m), s))| task(t, a, m, s));
    }
    // The slots of part p of a row hold every head's state (heads in kv-head order).
    for (i, &(r, _)) in sc.rows.iter().enumerate() {
        let o = &mut out[r * qd..(r + 1) * qd];
        o.fill(0.0);
        sc.run_max.fill(f32::NEG_INFINITY);
        sc.run_sum.fill(0.0);
        let first = sc.slot_start[i];
        for p in 0..part_count(&keys[r]) {
            let s0 = first + p * nkv;
            fold_part(
                o,
                &mut sc.run_max,
                &mut sc.run_sum,
                &sc.part_acc[s0 * group * hd..(s0 + nkv) * group * hd],
                &sc.part_max[s0 * group..(s0 + nkv) * group],
                &sc.part_sum[s0 * group..(s0 + nkv) * group],
                hd,
            );
        }
        normalize(o, &sc.run_sum, hd);
    }
}
