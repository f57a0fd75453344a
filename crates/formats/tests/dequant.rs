//! Every block type dequantized from hand-built blocks whose values are known by
//! construction (not by running the code under test).

use gemma3_formats::quant::{dequantize, f16_bits_to_f32};
use gemma3_formats::DType;
use half::f16;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn deq(dtype: DType, block: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; dtype.block_elems() * block.len() / dtype.block_bytes()];
    dequantize(dtype, block, &mut out);
    out
}

#[test]
fn f16_conversion_is_exact_for_every_value() {
    for bits in 0..=u16::MAX {
        let want = f16::from_bits(bits).to_f32();
        let got = f16_bits_to_f32(bits);
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{bits:#x}");
        }
    }
}

#[test]
fn plain_floats() {
    let vals = [1.5f32, -2.25, 0.0, 65504.0];
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(deq(DType::F32, &f32b), vals);
    let f16b: Vec<u8> = vals.iter().flat_map(|v| h(*v)).collect();
    assert_eq!(deq(DType::F16, &f16b), vals);
    let bf16b: Vec<u8> = vals[..3]
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    assert_eq!(deq(DType::BF16, &bf16b), &vals[..3]);
}

/// Values 0..32 as quants: element j holds q = j (low nibble for j < 16, high for j >= 16).
fn nibbles_0_to_31() -> Vec<u8> {
    (0..16u8).map(|j| (j & 0x0f) | ((j & 0x0f) << 4)).collect()
}

#[test]
fn q4_0() {
    // d = 0.5; byte j = (j) | (15 - j) << 4  => y[j] = (j - 8) * .5, y[j+16] = (15 - j - 8) * .5
    let mut b = h(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = deq(DType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
    }
}

#[test]
fn q4_1() {
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend(nibbles_0_to_31());
    let y = deq(DType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * 0.25 - 1.0);
        assert_eq!(y[j + 16], j as f32 * 0.25 - 1.0);
    }
}

#[test]
fn q5_0() {
    // qh bit j set for odd j: adds 16 to element j (j < 16) and element j (j >= 16 via bit j).
    let qh: u32 = 0xAAAA_AAAA;
    let mut b = h(2.0).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend(nibbles_0_to_31());
    let y = deq(DType::Q5_0, &b);
    for j in 0..32 {
        let low = (j % 16) as i32;
        let high = if j % 2 == 1 { 16 } else { 0 };
        assert_eq!(y[j], ((low + high) - 16) as f32 * 2.0, "element {j}");
    }
}

#[test]
fn q5_1() {
    let qh: u32 = 0xFFFF_0000; // fifth bit only on elements 16..32
    let mut b = h(1.0).to_vec();
    b.extend(h(0.5));
    b.extend(qh.to_le_bytes());
    b.extend(nibbles_0_to_31());
    let y = deq(DType::Q5_1, &b);
    for j in 0..32 {
        let q = (j % 16) as f32 + if j >= 16 { 16.0 } else { 0.0 };
        assert_eq!(y[j], q + 0.5, "element {j}");
    }
}

#[test]
fn q8_0() {
    let mut b = h(0.125).to_vec();
    b.extend((0..32).map(|j| (j as i8 - 16) as u8));
    let y = deq(DType::Q8_0, &b);
    for j in 0..32 {
        assert_eq!(y[j], (j as f32 - 16.0) * 0.125);
    }
}

/// Packs eight 6-bit (scale, min) pairs the way ggml's K-quants store them.
fn pack_k_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
    }
    q
}

#[test]
fn q4_k() {
    let sc = [1, 2, 3, 63, 17, 33, 48, 60];
    let mn = [0, 5, 10, 62, 20, 40, 1, 63];
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut b = h(d).to_vec();
    b.extend(h(dmin));
    b.extend(pack_k_scales(sc, mn));
    // qs byte i of 32-byte group g: low nibble = i % 16, high nibble = 15 - i % 16
    for _g in 0..4 {
        b.extend((0..32u8).map(|i| (i % 16) | ((15 - i % 16) << 4)));
    }
    assert_eq!(b.len(), 144);
    let y = deq(DType::Q4_K, &b);
    for s in 0..8 {
        for l in 0..32 {
            let q = if s % 2 == 0 { l % 16 } else { 15 - l % 16 } as f32;
            let want = d * sc[s] as f32 * q - dmin * mn[s] as f32;
            assert_eq!(y[s * 32 + l], want, "sub-block {s} element {l}");
        }
    }
}

#[test]
fn q5_k() {
    let sc = [7, 1, 63, 2, 40, 9, 31, 16];
    let mn = [3, 0, 1, 63, 8, 50, 2, 33];
    let (d, dmin) = (0.25f32, 0.5f32);
    let mut b = h(d).to_vec();
    b.extend(h(dmin));
    b.extend(pack_k_scales(sc, mn));
    // qh byte l: bit s set when (l + s) is even.
    b.extend((0..32u8).map(|l| {
        (0..8)
            .filter(|s| (l as usize + s).is_multiple_of(2))
            .fold(0u8, |a, s| a | (1 << s))
    }));
    for _g in 0..4 {
        b.extend((0..32u8).map(|i| (i % 16) | ((i / 2) << 4)));
    }
    assert_eq!(b.len(), 176);
    let y = deq(DType::Q5_K, &b);
    for s in 0..8 {
        for l in 0..32 {
            let low = if s % 2 == 0 { l % 16 } else { l / 2 };
            let high = if (l + s) % 2 == 0 { 16 } else { 0 };
            let want = d * sc[s] as f32 * (low + high) as f32 - dmin * mn[s] as f32;
            assert_eq!(y[s * 32 + l], want, "sub-block {s} element {l}");
        }
    }
}

#[test]
fn q6_k() {
    // Element e (0..256) gets q6 = e % 64; scale of group of 16 = (e/16) - 8 (signed).
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for e in 0..256usize {
        let q = (e % 64) as u8;
        let (half, within) = (e / 128, e % 128);
        let (quarter, l) = (within / 32, within % 32);
        // quarter 0: ql[l] low, qh bits 0-1; 1: ql[l+32] low, bits 2-3;
        // 2: ql[l] high, bits 4-5; 3: ql[l+32] high, bits 6-7
        let qi = half * 64 + l + if quarter % 2 == 1 { 32 } else { 0 };
        if quarter < 2 {
            ql[qi] |= q & 0x0f;
        } else {
            ql[qi] |= (q & 0x0f) << 4;
        }
        qh[half * 32 + l] |= (q >> 4) << (2 * quarter);
    }
    let scales: Vec<u8> = (0..16).map(|i| (i as i8 - 8) as u8).collect();
    let d = 0.5f32;
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend(&scales);
    b.extend(h(d));
    assert_eq!(b.len(), 210);
    let y = deq(DType::Q6_K, &b);
    for e in 0..256 {
        let want = d * ((e / 16) as f32 - 8.0) * ((e % 64) as f32 - 32.0);
        assert_eq!(y[e], want, "element {e}");
    }
}

#[test]
fn several_blocks_in_a_row() {
    let mut b = h(1.0).to_vec();
    b.extend([1u8; 32]);
    b.extend(h(2.0));
    b.extend([3u8; 32]);
    let y = deq(DType::Q8_0, &b);
    assert!(y[..32].iter().all(|&v| v == 1.0));
    assert!(y[32..].iter().all(|&v| v == 6.0));
}
