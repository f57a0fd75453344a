//! The chat template renderer: an arbitrary Jinja source (a model file's
//! `tokenizer.chat_template`) compiled and rendered over arbitrary messages, and the
//! built-in Gemma 3 template over the same messages. The input is the template, a NUL
//! byte, then the messages as OpenAI JSON (`[{"role": ..., "content": ...}]`). Rendering
//! runs on minijinja fuel, so a looping template ends with an error, never a hang.
#![no_main]

use gemma3_openai::api::{conversation, MessageIn};
use gemma3_text::chat::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fn messages(json: &[u8]) -> Vec<ChatMessage> {
    serde_json::from_slice::<Vec<MessageIn>>(json)
        .ok()
        .and_then(|m| conversation(&m).ok())
        .map(|c| c.messages)
        .unwrap_or_else(|| {
            vec![
                ChatMessage::text("system", "Be brief."),
                ChatMessage::text("user", "Hi"),
                ChatMessage::text("assistant", "Hello."),
                ChatMessage::text("user", "Bye"),
            ]
        })
}

fuzz_target!(|data: &[u8]| {
    let (source, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let msgs = messages(rest);
    for add_generation_prompt in [false, true] {
        let _ = ChatTemplate::gemma3("<bos>", "<eos>").render(&msgs, add_generation_prompt);
    }
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    if let Ok(t) = ChatTemplate::from_source(source, "<bos>", "<eos>") {
        let _ = t.render(&msgs, true);
    }
});
