//! An OpenAI request body as the server reads it: chat and completion requests
//! deserialized from the bytes, then every check and conversion a handler applies before
//! the model is involved (supported features, n, logprobs, max_tokens, stop strings,
//! sampling, per-choice options, messages into a conversation, prompts, image data URLs).
#![no_main]

use gemma3_engine::SamplingParams;
use gemma3_openai::api::{
    check_top_logprobs, conversation, prompts, ChatRequest, CompletionRequest, Defaults, GenParams,
};
use gemma3_openai::images::ImageSource;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("fuzz setup: {e}"))
    })
}

fn params(p: &GenParams) {
    let _ = p.constraint();
    let _ = p.tools();
    let _ = p.n();
    let _ = p.max_tokens();
    let _ = p.stop_strings();
    let sampling = SamplingParams::default();
    let d = Defaults {
        lookup: None,
        draft: None,
        sampling: &sampling,
        seed: 7,
    };
    let _ = p.sampling(&d);
    let _ = p.options(&d, 16, Some(2), 3);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(data) {
        params(&req.params);
        if let Some(k) = req.top_logprobs {
            let _ = check_top_logprobs(k, "top_logprobs");
        }
        if let Ok(conv) = conversation(&req.messages) {
            let images = ImageSource::new(false, gemma3_engine::image::DEFAULT_MAX_IMAGE_PIXELS);
            for url in &conv.image_urls {
                let _ = runtime().block_on(images.fetch(url));
            }
        }
    }
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        params(&req.params);
        if let Some(k) = req.logprobs {
            let _ = check_top_logprobs(k, "logprobs");
        }
        let _ = prompts(&req.prompt);
    }
});
