//! Images in, pixel values out, as Gemma3Processor prepares them (fixtures README, item 12
//! and "Pan & scan"): decode (PNG, JPEG, WebP, GIF's first frame, BMP), convert to RGB the
//! way PIL's `convert("RGB")` does (alpha dropped, gray replicated), resize to the tower's
//! square size with PIL's bilinear filter (bit-exact: same coefficients, same 22-bit
//! fixed-point passes), then `(u8/255 - mean) / std`, channels first.
//!
//! Also the prompt side: where each `<start_of_image>` marker goes and what it becomes.

use crate::EngineError;
use std::path::Path;

/// The marker a prompt uses for "an image here".
pub const START_OF_IMAGE: &str = "<start_of_image>";
pub const END_OF_IMAGE: &str = "<end_of_image>";
pub const IMAGE_SOFT_TOKEN: &str = "<image_soft_token>";

/// The most pixels an image may have unless the caller says otherwise (PIL warns past
/// 89 M; 50 M is a 7000x7000 photo). Checked from the file's header, before decoding.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 50_000_000;

/// The largest image file read from disk.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;

/// Memory a decoder may use beyond the pixels themselves (tables, a row or two).
const DECODER_SLACK_BYTES: u64 = 16 << 20;

/// An 8-bit RGB image, rows top to bottom, `width · height · 3` bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}x{} RGB)", self.width, self.height)
    }
}

impl Image {
    /// Wraps RGB bytes; errors when they do not hold `width · height` pixels.
    pub fn from_rgb(width: usize, height: usize, rgb: Vec<u8>) -> Result<Image, EngineError> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return Err(EngineError::Input(format!(
                "an RGB image of {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                rgb.len()
            )));
        }
        Ok(Image { width, height, rgb })
    }

    /// Reads and decodes an image file of at most [`DEFAULT_MAX_IMAGE_PIXELS`].
    pub fn open(path: impl AsRef<Path>) -> Result<Image, EngineError> {
        Image::open_limited(path, DEFAULT_MAX_IMAGE_PIXELS)
    }

    /// Reads and decodes an image file of at most `max_pixels` pixels (and
    /// [`MAX_IMAGE_FILE_BYTES`]).
    pub fn open_limited(path: impl AsRef<Path>, max_pixels: u64) -> Result<Image, EngineError> {
        let path = path.as_ref();
        let bytes = gemma3_formats::read_bytes(path, MAX_IMAGE_FILE_BYTES).map_err(|e| {
            EngineError::BadImage(match e {
                gemma3_formats::FormatError::Io { path, err } => {
                    format!("cannot read image {}: {err}", path.display())
                }
                other => format!("image {other}"),
            })
        })?;
        Image::decode_limited(&bytes, max_pixels)
            .map_err(|e| EngineError::BadImage(format!("image {}: {e}", path.display())))
    }

    /// [`decode_limited`](Self::decode_limited) to [`DEFAULT_MAX_IMAGE_PIXELS`].
    pub fn decode(bytes: &[u8]) -> Result<Image, String> {
        Image::decode_limited(bytes, DEFAULT_MAX_IMAGE_PIXELS)
    }

    /// Decodes PNG, JPEG, WebP, GIF (first frame) or BMP bytes, applying the EXIF
    /// orientation (as transformers' `load_image` does), then converting to RGB. An image
    /// whose header claims more than `max_pixels` pixels is refused before decoding, and the
    /// decoder may allocate no more than such an image needs.
    pub fn decode_limited(bytes: &[u8], max_pixels: u64) -> Result<Image, String> {
        use ::image::{DynamicImage, ImageDecoder, ImageReader, Limits};
        let reader = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))?;
        if reader.format().is_none() {
            return Err("not a PNG, JPEG, WebP, GIF or BMP file".into());
        }
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| format!("cannot decode: {e}"))?;
        let (w, h) = decoder.dimensions();
        let pixels = u64::from(w) * u64::from(h);
        if pixels > max_pixels {
            return Err(format!(
                "{w}x{h} is {:.1} megapixels, more than the limit of {:.1}",
                pixels as f64 / 1e6,
                max_pixels as f64 / 1e6
            ));
        }
        if pixels == 0 {
            return Err(format!("{w}x{h} has no pixels"));
        }
        // Up to 16-bit RGBA (8 bytes a pixel), plus the decoder's own buffers.
        let mut limits = Limits::default();
        limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(DECODER_SLACK_BYTES));
        decoder
            .set_limits(limits)
            .map_err(|e| format!("cannot decode: {e}"))?;
        let orientation = decoder.orientation().ok();
        let mut img =
            DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode: {e}"))?;
        if let Some(o) = orientation {
            img.apply_orientation(o);
        }
        // PIL's convert("RGB"): alpha is dropped, not composited; gray is replicated. An RGB
        // image is taken as it is (no second copy).
        let rgb = img.into_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        Image::from_rgb(w, h, rgb.into_raw()).map_err(|e| e.to_string())
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The pixels inside `[x0, y0, x1, y1)` (PIL's `crop`, within the image).
    pub fn crop(&self, b: [usize; 4]) -> Image {
        let [x0, y0, x1, y1] = b;
        assert!(x0 < x1 && y0 < y1 && x1 <= self.width && y1 <= self.height);
        let mut rgb = Vec::with_capacity((x1 - x0) * (y1 - y0) * 3);
        for y in y0..y1 {
            rgb.extend_from_slice(&self.rgb[(y * self.width + x0) * 3..(y * self.width + x1) * 3]);
        }
        Image {
            width: x1 - x0,
            height: y1 - y0,
            rgb,
        }
    }

    /// PIL's `resize((w, h), BILINEAR)` on an RGB image, to the bit: two passes, each
    /// rounding to 8 bits, skipping a pass whose size is unchanged. Pillow (13) runs the
    /// horizontal pass first unless the height shrinks by more than twice as many pixels
    /// as the width does.
    pub fn resize_bilinear(&self, width: usize, height: usize) -> Image {
        let dy = self.height as i64 - height as i64;
        let dx = self.width as i64 - width as i64;
        if dy > 0 && dy > 2 * dx {
            self.resize_vertical(height).resize_horizontal(width)
        } else {
            self.resize_horizontal(width).resize_vertical(height)
        }
    }

    fn resize_horizontal(&self, width: usize) -> Image {
        if width == self.width {
            return self.clone();
        }
        let c = Coeffs::new(self.width, width);
        let mut out = vec![0u8; width * self.height * 3];
        for y in 0..self.height {
            let src = &self.rgb[y * self.width * 3..(y + 1) * self.width * 3];
            let dst = &mut out[y * width * 3..(y + 1) * width * 3];
            for xx in 0..width {
                let (lo, k) = c.taps(xx);
                for ch in 0..3 {
                    let mut ss = 1i32 << (PRECISION_BITS - 1);
                    for (i, w) in k.iter().enumerate() {
                        ss += src[(lo + i) * 3 + ch] as i32 * w;
                    }
                    dst[xx * 3 + ch] = clip8(ss);
                }
            }
        }
        Image {
            width,
            height: self.height,
            rgb: out,
        }
    }

    fn resize_vertical(&self, height: usize) -> Image {
        if height == self.height {
            return self.clone();
        }
        let c = Coeffs::new(self.height, height);
        let row = self.width * 3;
        let mut out = vec![0u8; row * height];
        for yy in 0..height {
            let (lo, k) = c.taps(yy);
            for x in 0..row {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for (i, w) in k.iter().enumerate() {
                    ss += self.rgb[(lo + i) * row + x] as i32 * w;
                }
                out[yy * row + x] = clip8(ss);
            }
        }
        Image {
            width: self.width,
            height,
            rgb: out,
        }
    }

    /// Resized to `size × size`, then `(u8/255 - mean) / std` per channel, channels first:
    /// the `3 × size × size` values the vision tower takes.
    pub fn pixel_values(&self, size: usize, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let img = self.resize_bilinear(size, size);
        let n = size * size;
        let mut out = vec![0f32; 3 * n];
        for (i, px) in img.rgb.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                // transformers rescales in f64 and casts to f32, then normalizes in f32.
                let v = (px[ch] as f64 * (1.0 / 255.0)) as f32;
                out[ch * n + i] = (v - mean[ch]) / std[ch];
            }
        }
        out
    }
}

/// Pillow's fixed-point precision for 8-bit resampling (32 bits less 8 for the value and 2
/// for headroom).
const PRECISION_BITS: u32 = 22;

fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Per output pixel: the first input pixel and the fixed-point weights of the triangle
/// filter, stretched by the scale when shrinking (antialiasing), normalized to sum 1.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize) -> Coeffs {
        // Pillow passes the box as floats and works in doubles from there.
        let scale = (in_size as f32) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the bilinear filter's support is 1
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) casts truncate toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let (xmin, xmax) = (xmin as usize, xmax.max(0) as usize);
            let mut ww = 0.0;
            for x in 0..xmax {
                let t = (((x + xmin) as f64 - center + 0.5) * ss).abs();
                w[x] = if t < 1.0 { 1.0 - t } else { 0.0 };
                ww += w[x];
            }
            for x in 0..xmax {
                if ww != 0.0 {
                    w[x] /= ww;
                }
                let f = w[x] * (1 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if f < 0.0 {
                    (f - 0.5) as i32
                } else {
                    (f + 0.5) as i32
                };
            }
            bounds.push((xmin, xmax));
        }
        Coeffs { ksize, bounds, k }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (lo, n) = self.bounds[i];
        (lo, &self.k[i * self.ksize..i * self.ksize + n])
    }
}

/// Pan & scan (Gemma3ImageProcessor): a wide or tall image is also shown as up to
/// `max_num_crops` crops side by side. The defaults are Gemma3Processor's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanAndScan {
    pub min_crop_size: usize,
    pub max_num_crops: usize,
    pub min_ratio_to_activate: f64,
}

impl Default for PanAndScan {
    fn default() -> Self {
        PanAndScan {
            min_crop_size: 256,
            max_num_crops: 4,
            min_ratio_to_activate: 1.2,
        }
    }
}

impl PanAndScan {
    /// Crop boxes `[x0, y0, x1, y1)` of a `width × height` image, in row-major order; empty
    /// when the image is not elongated enough or the crops would be too small.
    pub fn crop_boxes(&self, width: usize, height: usize) -> Vec<[usize; 4]> {
        // Work on the long side; a tall image is the transpose of a wide one.
        let (long, short) = (width.max(height), width.min(height));
        if long == 0 || short == 0 {
            return vec![];
        }
        let ratio = long as f64 / short as f64;
        if ratio < self.min_ratio_to_activate {
            return vec![];
        }
        let n = ((ratio + 0.5).floor() as usize)
            .min((long as f64 / self.min_crop_size as f64).floor() as usize)
            .max(2)
            .min(self.max_num_crops);
        if n == 0 {
            return vec![];
        }
        let crop = long.div_ceil(n);
        if crop.min(short) < self.min_crop_size {
            return vec![];
        }
        (0..n)
            .map(|i| {
                let (a, b) = (i * crop, ((i + 1) * crop).min(long));
                if width >= height {
                    [a, 0, b, height]
                } else {
                    [0, a, width, b]
                }
            })
            .collect()
    }
}

/// What each image shows the model: the whole image, then its pan & scan crops.
pub fn image_views(img: &Image, pan_and_scan: Option<&PanAndScan>) -> Vec<Image> {
    let mut views = vec![img.clone()];
    if let Some(ps) = pan_and_scan {
        views.extend(
            ps.crop_boxes(img.width(), img.height())
                .into_iter()
                .map(|b| img.crop(b)),
        );
    }
    views
}

/// Gemma3Processor's text for one image view: `"\n\n" <start_of_image> soft*mm_tokens
/// <end_of_image> "\n\n"`.
pub fn full_image_sequence(mm_tokens: usize) -> String {
    format!(
        "\n\n{START_OF_IMAGE}{}{END_OF_IMAGE}\n\n",
        IMAGE_SOFT_TOKEN.repeat(mm_tokens)
    )
}

/// Replaces the `<start_of_image>` markers of `text`, one per image, by `sequence` (one
/// view's text, which must hold the marker itself once) — with pan & scan crops
/// (`crops[i] > 0`), by "Here is the original image …" and a sequence per crop, as
/// Gemma3Processor does. With fewer markers than images the missing ones go in front,
/// separated by spaces (as the processor writes them for an empty prompt); more markers
/// than images is an error.
pub fn expand_image_markers(
    text: &str,
    crops: &[usize],
    sequence: &str,
) -> Result<String, EngineError> {
    let markers = text.matches(START_OF_IMAGE).count();
    if markers > crops.len() {
        return Err(EngineError::Input(format!(
            "the prompt has {markers} {START_OF_IMAGE} markers but {} image(s) were given",
            crops.len()
        )));
    }
    let missing = crops.len() - markers;
    let mut text = text.to_string();
    if missing > 0 {
        let mut front = vec![START_OF_IMAGE; missing].join(" ");
        if !text.is_empty() {
            front.push(' ');
        }
        text.insert_str(0, &front);
    }
    let mut out = String::with_capacity(text.len() + crops.len() * sequence.len());
    let mut parts = text.split(START_OF_IMAGE);
    out.push_str(parts.next().unwrap_or(""));
    for (&n, rest) in crops.iter().zip(parts) {
        if n == 0 {
            out.push_str(sequence);
        } else {
            out.push_str("Here is the original image ");
            out.push_str(sequence);
            out.push_str(" and here are some crops to help you see better ");
            out.push_str(&vec![sequence; n].join(" "));
        }
        out.push_str(rest);
    }
    Ok(out)
}
