//! Block layouts of ggml's quantized types and their reference (scalar) dequantization,
//! written from ggml's definitions. These are the ground truth the fast kernels are tested
//! against, so they favour clarity over speed.

use crate::DType;

#[inline(always)]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Dequantizes `bytes` (whole blocks of `dtype`) into `out`, one value per element.
/// Panics if the lengths disagree: callers hold validated tensors. Inlined so that kernels
/// compiled for wider vector units get vectorised copies of the block loops.
#[inline(always)]
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let be = dtype.block_elems();
    let bb = dtype.block_bytes();
    assert_eq!(out.len() % be, 0, "{dtype}: output is not whole blocks");
    assert_eq!(
        bytes.len(),
        out.len() / be * bb,
        "{dtype}: byte count mismatch"
    );
    macro_rules! blocks {
        ($f:ident) => {
            for (o, b) in out.chunks_exact_mut(be).zip(bytes.chunks_exact(bb)) {
                $f(b, o);
            }
        };
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::Q4_0 => blocks!(dequant_q4_0),
        DType::Q4_1 => blocks!(dequant_q4_1),
        DType::Q5_0 => blocks!(dequant_q5_0),
        DType::Q5_1 => blocks!(dequant_q5_1),
        DType::Q8_0 => blocks!(dequant_q8_0),
        DType::Q4_K => blocks!(dequant_q4_k),
        DType::Q5_K => blocks!(dequant_q5_k),
        DType::Q6_K => blocks!(dequant_q6_k),
    }
}

/// IEEE half to single, branch-free so that loops over it vectorise. Exact for every
/// input: normals and subnormals by rescaling, infinities and NaNs by their exponent.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let em = (h as u32) & 0x7fff;
    // Shift exponent+mantissa into place and rebias by multiplying with 2^112.
    let scaled = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let inf_nan = f32::from_bits((em << 13) | 0x7f80_0000);
    let v = if em >= 0x7c00 { inf_nan } else { scaled };
    f32::from_bits(v.to_bits() | sign)
}

/// The per-block dequantizer of a quantized type.
pub fn block_fn(dtype: DType) -> fn(&[u8], &mut [f32]) {
    match dtype {
        DType::Q4_0 => dequant_q4_0,
        DType::Q4_1 => dequant_q4_1,
        DType::Q5_0 => dequant_q5_0,
        DType::Q5_1 => dequant_q5_1,
        DType::Q8_0 => dequant_q8_0,
        DType::Q4_K => dequant_q4_k,
        DType::Q5_K => dequant_q5_k,
        DType::Q6_K => dequant_q6_k,
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a block type"),
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles. Low nibbles are values 0..16, high nibbles 16..32.
#[inline(always)]
pub fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; value = q*d + m.
#[inline(always)]
pub fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, 32 high bits (u32 LE), 16 bytes of low nibbles; value = (q5 - 16)*d.
#[inline(always)]
pub fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, 32 high bits, 16 bytes of low nibbles; value = q5*d + m.
#[inline(always)]
pub fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 d, 32 signed bytes; value = q*d.
#[inline(always)]
pub fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in the 12 `scales` bytes of
/// Q4_K and Q5_K.
#[inline(always)]
pub fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: super-block of 256 = 8 sub-blocks of 32. f16 d, f16 dmin, 12 bytes of 6-bit
/// scales/mins, 128 bytes of nibbles. Each 32-byte run of `qs` holds two sub-blocks: low
/// nibbles first, high nibbles second. value = d*sc*q - dmin*m.
#[inline(always)]
pub fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (s1, m1) = k_scale_min(2 * c, scales);
        let (s2, m2) = k_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let o = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            o[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: like Q4_K plus 32 bytes `qh` of fifth bits: sub-block `s` takes bit `s` of each qh byte.
#[inline(always)]
pub fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (s1, m1) = k_scale_min(2 * c, scales);
        let (s2, m2) = k_scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let o = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            o[l] = d1 * ((q[l] & 0x0f) | h1) as f32 - m1;
            o[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K: 128 bytes low nibbles `ql`, 64 bytes of 2-bit highs `qh`, 16 signed 8-bit scales,
/// f16 d. Each half (128 values) uses 64 ql bytes, 32 qh bytes and 8 scales; value =
/// d*scale*(q6 - 32), with 16 values per scale.
#[inline(always)]
pub fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &ql_all[64 * h..64 * h + 64];
        let qh = &qh_all[32 * h..32 * h + 32];
        let sc = &sc_all[8 * h..8 * h + 8];
        let o = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
