//! Prompts with images. Each `<start_of_image>` marker of the text becomes Gemma3Processor's
//! `"\n\n" <start_of_image> <image_soft_token>×mm_tokens <end_of_image> "\n\n"` (with pan &
//! scan, the original image and then its crops), and each run of soft tokens is filled by
//! the vision tower's rows for the next image view.
//!
//! The soft tokens are inserted as ids after tokenizing, not written into the text: the
//! GGUF vocabulary has no `<image_soft_token>`, and since the markers around them are
//! special tokens, the text between them tokenizes the same either way.

use crate::image::{
    expand_image_markers, image_views, Image, PanAndScan, END_OF_IMAGE, IMAGE_SOFT_TOKEN,
    START_OF_IMAGE,
};
use crate::load::Model;
use crate::EngineError;
use gemma3_model::VisionTower;

/// The ids of the image tokens the model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageTokens {
    /// `<image_soft_token>`: replaced by projector rows.
    pub soft: u32,
    /// `<start_of_image>`, `<end_of_image>`.
    pub boi: u32,
    pub eoi: u32,
}

/// The images of one request as the model sees them.
#[derive(Clone, Debug)]
pub struct ImageViews {
    /// Pan & scan crops per image (0 when off or the image is not elongated enough).
    pub crops: Vec<usize>,
    /// Every view in prompt order: each image, then its crops.
    pub views: Vec<Image>,
}

impl Model {
    /// The vision tower, or an error saying how to get one.
    pub fn vision_tower(&self) -> Result<&VisionTower, EngineError> {
        self.vision.as_ref().ok_or_else(|| {
            EngineError::Input(format!(
                "{} is a text-only model and cannot take images: use a multimodal Gemma 3 checkpoint (config.json with vision_config), or a GGUF text model with --mmproj FILE",
                self.name()
            ))
        })
    }

    /// Image token ids: the tokenizer's when it has the pieces, else the vision config's.
    pub fn image_tokens(&self) -> Result<ImageTokens, EngineError> {
        let cfg = &self.vision_tower()?.cfg;
        let id = |piece: &str, default: u32| self.tokenizer.token_to_id(piece).unwrap_or(default);
        Ok(ImageTokens {
            soft: id(IMAGE_SOFT_TOKEN, cfg.image_token_index),
            boi: id(START_OF_IMAGE, cfg.boi_token_index),
            eoi: id(END_OF_IMAGE, cfg.eoi_token_index),
        })
    }

    /// Splits images into the views the model sees (pan & scan crops when asked).
    pub fn image_views(
        &self,
        images: &[Image],
        pan_and_scan: Option<&PanAndScan>,
    ) -> Result<ImageViews, EngineError> {
        self.vision_tower()?;
        let mut out = ImageViews {
            crops: Vec::with_capacity(images.len()),
            views: vec![],
        };
        for img in images {
            let v = image_views(img, pan_and_scan);
            out.crops.push(v.len() - 1);
            out.views.extend(v);
        }
        Ok(out)
    }

    /// Token ids of a text prompt with images: markers expanded, soft-token runs in place.
    pub fn image_prompt_ids(
        &self,
        prompt: &str,
        views: &ImageViews,
        add_bos: Option<bool>,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        self.image_prompt_ids_for(prompt, &views.crops, add_bos, parse_special)
    }

    /// [`image_prompt_ids`](Self::image_prompt_ids) for images with `crops[i]` pan & scan
    /// crops each.
    pub fn image_prompt_ids_for(
        &self,
        prompt: &str,
        crops: &[usize],
        add_bos: Option<bool>,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let t = self.image_tokens()?;
        let mm = self.vision_tower()?.cfg.mm_tokens_per_image;
        let seq = format!("\n\n{START_OF_IMAGE}{END_OF_IMAGE}\n\n");
        let text = expand_image_markers(prompt, crops, &seq)?;
        let ids = self.encode_prompt(&text, add_bos, parse_special);
        let n_views: usize = crops.iter().map(|c| c + 1).sum();
        let mut out = Vec::with_capacity(ids.len() + n_views * mm);
        let mut found = 0;
        for id in ids {
            out.push(id);
            if id == t.boi {
                out.extend(std::iter::repeat_n(t.soft, mm));
                found += 1;
            }
        }
        if found != n_views {
            return Err(EngineError::Input(format!(
                "the tokenized prompt has {found} {START_OF_IMAGE} tokens for {n_views} image view(s); is {START_OF_IMAGE} a token of this tokenizer (and special tokens parsed)?"
            )));
        }
        Ok(out)
    }

    /// Encodes every view with the vision tower, after checking that `ids` hold one run of
    /// exactly `mm_tokens_per_image` soft tokens per view. The rows come in view order, as
    /// the text model's `ImageInputs` takes them.
    pub fn encode_image_views(
        &self,
        ids: &[u32],
        views: &ImageViews,
    ) -> Result<Vec<f32>, EngineError> {
        let tower = self.vision_tower()?;
        let cfg = &tower.cfg;
        let soft = self.image_tokens()?.soft;
        let runs = soft_token_runs(ids, soft);
        if runs.len() != views.views.len() {
            return Err(EngineError::Input(format!(
                "the prompt has {} run(s) of image tokens ({soft}) but {} image view(s) were given",
                runs.len(),
                views.views.len()
            )));
        }
        if let Some(bad) = runs.iter().find(|&&n| n != cfg.mm_tokens_per_image) {
            return Err(EngineError::Input(format!(
                "a run of {bad} image tokens: each image takes exactly {} ({soft} repeated)",
                cfg.mm_tokens_per_image
            )));
        }
        self.encode_views(views)
    }

    /// The projector rows of every view, in order (`mm_tokens_per_image × hidden` each).
    pub fn encode_views(&self, views: &ImageViews) -> Result<Vec<f32>, EngineError> {
        let tower = self.vision_tower()?;
        let cfg = &tower.cfg;
        let mut out =
            Vec::with_capacity(views.views.len() * cfg.mm_tokens_per_image * cfg.text_hidden_size);
        for v in &views.views {
            let px = v.pixel_values(cfg.image_size, cfg.image_mean, cfg.image_std);
            out.extend(tower.encode(&px)?);
        }
        Ok(out)
    }
}

/// Lengths of the runs of `soft` in `ids`.
fn soft_token_runs(ids: &[u32], soft: u32) -> Vec<usize> {
    let mut runs = vec![];
    let mut n = 0;
    for &t in ids {
        if t == soft {
            n += 1;
        } else if n > 0 {
            runs.push(n);
            n = 0;
        }
    }
    if n > 0 {
        runs.push(n);
    }
    runs
}

/// A prompt made ready for a sequence: its ids and, with images, the rows that replace
/// their soft tokens.
#[derive(Clone, Debug)]
pub struct PromptInputs {
    pub ids: Vec<u32>,
    pub images: Option<crate::SeqImages>,
    /// Seconds the vision tower took.
    pub image_secs: f64,
}

impl Model {
    /// Tokenizes `prompt` with `images` shown at its `<start_of_image>` markers (added in
    /// front when missing) and encodes the images. `fits` = (new tokens, context): the
    /// prompt is checked to leave that room before the (slow) image encoding. Every front
    /// end builds its prompts with images here.
    pub fn prompt_inputs(
        &self,
        prompt: &str,
        images: &[Image],
        pan_and_scan: Option<&PanAndScan>,
        add_bos: Option<bool>,
        parse_special: bool,
        fits: Option<(usize, usize)>,
    ) -> Result<PromptInputs, EngineError> {
        if images.is_empty() {
            return Ok(PromptInputs {
                ids: self.encode_prompt(prompt, add_bos, parse_special),
                images: None,
                image_secs: 0.0,
            });
        }
        let views = self.image_views(images, pan_and_scan)?;
        let ids = self.image_prompt_ids(prompt, &views, add_bos, parse_special)?;
        if let Some((max_new, ctx)) = fits {
            crate::sequence::check_fits(self, ids.len(), max_new, ctx)?;
        }
        let t0 = std::time::Instant::now();
        let embeds = self.encode_image_views(&ids, &views)?;
        Ok(PromptInputs {
            images: Some(crate::SeqImages {
                image_token: self.image_tokens()?.soft,
                embeds,
            }),
            ids,
            image_secs: t0.elapsed().as_secs_f64(),
        })
    }
}
