//! Image bytes: decode (PNG, JPEG, WebP, GIF, BMP, EXIF orientation, RGB conversion), then
//! what the vision tower is fed: pan & scan crops and each view resized to 896 and
//! normalized. Decoding goes through the library's pixel limit (checked from the header
//! before decoding), set low here so the fuzzer explores decoders instead of allocating.
#![no_main]

use gemma3_engine::image::image_views;
use gemma3_engine::{Image, PanAndScan};
use gemma3_model::VisionConfig;
use libfuzzer_sys::fuzz_target;

/// 2048 × 2048: large enough for every decoder path, small enough to stay fast.
const MAX_PIXELS: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    // The library's own limit, checked from the header before decoding (small here, so
    // the fuzzer does not spend its time on huge images).
    let Ok(img) = Image::decode_limited(data, MAX_PIXELS) else {
        return;
    };
    assert_eq!(img.rgb().len(), img.width() * img.height() * 3);
    let cfg = VisionConfig::default();
    let n = cfg.image_size * cfg.image_size * 3;
    for view in image_views(&img, Some(&PanAndScan::default())) {
        let px = view.pixel_values(cfg.image_size, cfg.image_mean, cfg.image_std);
        assert_eq!(px.len(), n);
        assert!(px.iter().all(|v| v.is_finite() && v.abs() <= 1.0 + 1e-6));
    }
});
