//! Tool calls in OpenAI's shapes: a reply's text split by the engine's [`CallParser`] into
//! `message.content` and `message.tool_calls` (non-streamed), or into `delta`s that carry
//! each call's `index`, `id`, `type` and name first and its arguments in pieces after
//! (streamed, as OpenAI streams them: the pieces join to the non-streamed arguments).

use gemma3_engine::tools::{CallEvent, CallParser, CallSyntax};
use serde_json::{json, Value};

/// The id of a choice's `index`-th call: fixed by the request id, so that the streamed and
/// the non-streamed forms of one reply agree.
pub fn call_id(request: &str, choice: usize, index: usize) -> String {
    let tail = request.rsplit('-').next().unwrap_or(request);
    format!("call_{tail}_{choice}_{index}")
}

/// A whole reply as a chat `message`, and whether it made calls.
pub fn message(syntax: CallSyntax, text: &str, request: &str, choice: usize) -> (Value, bool) {
    let mut p = CallParser::new(syntax);
    p.push(text);
    p.finish();
    // A call cut off by the token limit is left out: every call returned is complete.
    let calls: Vec<Value> = p
        .complete_calls()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"id": call_id(request, choice, i), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    let content = p.content();
    let has_calls = !calls.is_empty();
    let content = match has_calls && content.trim().is_empty() {
        true => Value::Null,
        false => Value::from(content),
    };
    let mut m = json!({"role": "assistant", "content": content});
    if has_calls {
        m["tool_calls"] = Value::from(calls);
    }
    (m, has_calls)
}

/// The finish reason of a reply that made calls and ended by itself.
pub fn finish_reason(reason: &'static str, has_calls: bool) -> &'static str {
    match (reason, has_calls) {
        ("stop", true) => "tool_calls",
        (r, _) => r,
    }
}

/// Stream deltas for what the parser found in new text.
pub fn deltas(events: Vec<CallEvent>, request: &str, choice: usize) -> Vec<Value> {
    events
        .into_iter()
        .map(|e| match e {
            CallEvent::Content(text) => json!({"content": text}),
            CallEvent::Start { index, name } => json!({"tool_calls": [{
                "index": index, "id": call_id(request, choice, index), "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            CallEvent::Arguments { index, piece } => json!({"tool_calls": [{
                "index": index, "function": {"arguments": piece}}]}),
        })
        .collect()
}
