//! Function calling. Gemma 3 has no tool tokens, so the format on the wire is ours to set
//! and to enforce:
//!
//! - A model whose own chat template reads `tools` (as transformers'
//!   `apply_chat_template(tools=...)` passes them) is rendered with it, and its calls are
//!   read in the syntax it declares: FunctionGemma's
//!   `<start_function_call>call:NAME{key:<escape>text<escape>,n:1}<end_function_call>`.
//! - Any other template (Gemma 3's own, the built-in one) gets the tool list in the system
//!   text, as Google's function-calling guide does, and calls as JSON in fenced blocks:
//!   ```` ```tool_call\n{"name": "NAME", "arguments": {…}}\n``` ````, one block per call;
//!   a tool's result goes back as a user turn holding a ```` ```tool_output ```` block.
//!
//! Either way the reply is constrained by a grammar built from the tools' parameter
//! schemas: `required` makes one or more calls, a named tool exactly that one, and `auto`
//! leaves the model free text until it writes the call marker, after which the call must
//! be complete and valid (a lazy grammar). Every call returned parses and validates.
//! [`CallParser`] splits generated text into content and calls as it streams.

use crate::constraint::{bound_integers, json_format, Grammar};
use crate::load::Model;
use crate::EngineError;
use gemma3_text::{ChatContent, ChatMessage, ChatPart};
use serde_json::{json, Map, Value};

/// One function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
}

/// Whether and what the model must call.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// Never (plain text; the tools are not shown).
    None,
    /// Text or calls, as the model decides.
    Auto,
    /// One or more calls.
    Required,
    /// Exactly one call of this function.
    Named(String),
}

/// The tools of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Several calls in one reply (with `auto` and `required`).
    pub parallel: bool,
}

/// A call the model made: the function's name and its arguments as a JSON object's text.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// How a model writes its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallSyntax {
    /// ```` ```tool_call ```` blocks of JSON (ours, for templates that know no tools).
    JsonBlocks,
    /// FunctionGemma's `<start_function_call>call:NAME{…}<end_function_call>`.
    FunctionGemma,
}

const JSON_OPEN: &str = "```tool_call\n";
const JSON_CLOSE: &str = "\n```";
const JSON_SEP: &str = "\n";
const FG_OPEN: &str = "<start_function_call>";
const FG_CALL: &str = "call:";
const FG_CLOSE: &str = "<end_function_call>";
const FG_ESCAPE: &str = "<escape>";

impl CallSyntax {
    /// What a call starts with in the text.
    fn open(self) -> &'static str {
        match self {
            CallSyntax::JsonBlocks => JSON_OPEN,
            CallSyntax::FunctionGemma => FG_OPEN,
        }
    }
}

impl Tools {
    /// Checks names: present, unique, and a named choice among them.
    pub fn check(&self) -> Result<(), EngineError> {
        let mut seen = std::collections::HashSet::new();
        for t in &self.tools {
            let ok = !t.name.is_empty()
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
            if !ok {
                return Err(EngineError::Input(format!(
                    "tool name {:?} must be letters, digits, '_', '-' or '.'",
                    t.name
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(EngineError::Input(format!(
                    "two tools are named {:?}",
                    t.name
                )));
            }
            if !t.parameters.is_object() {
                return Err(EngineError::Input(format!(
                    "the parameters of tool {:?} must be a JSON schema object",
                    t.name
                )));
            }
        }
        match &self.choice {
            ToolChoice::Named(n) if !self.tools.iter().any(|t| &t.name == n) => {
                Err(EngineError::Input(format!(
                    "tool_choice names {n:?}, which is not among the tools"
                )))
            }
            ToolChoice::Required | ToolChoice::Named(_) if self.tools.is_empty() => Err(
                EngineError::Input("tool_choice asks for a call but no tools are given".into()),
            ),
            _ => Ok(()),
        }
    }

    /// Whether the model may call anything.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None && !self.tools.is_empty()
    }

    /// The tools the grammar allows (the named one only, for a named choice).
    fn callable(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        }
    }

    /// OpenAI's shape, as templates read `tools`.
    pub fn openai_json(&self) -> Value {
        self.tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect()
    }

    /// The grammar a reply follows (None when nothing may be called).
    pub fn grammar(
        &self,
        syntax: CallSyntax,
        model: &Model,
    ) -> Result<Option<Grammar>, EngineError> {
        if !self.active() {
            return Ok(None);
        }
        let special = |s: &str| {
            model
                .tokenizer
                .token_to_id(s)
                .is_some_and(|id| model.tokenizer.is_control(id))
        };
        let many = self.parallel && !matches!(self.choice, ToolChoice::Named(_));
        let callable = self.callable();
        let mut g = String::new();
        let (open, call, close, sep) = match syntax {
            CallSyntax::JsonBlocks => {
                let mut schema = json!({
                    "anyOf": callable.iter().map(|t| json!({
                        "type": "object",
                        "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                        "required": ["name", "arguments"],
                        "additionalProperties": false,
                    })).collect::<Vec<_>>(),
                    "x-guidance": json_format(),
                });
                bound_integers(&mut schema);
                g.push_str(&format!("call_body: %json {schema}\n"));
                (
                    lark_lit(JSON_OPEN),
                    "call_body".to_string(),
                    lark_lit(JSON_CLOSE),
                    lark_lit(JSON_SEP),
                )
            }
            CallSyntax::FunctionGemma => {
                let esc = match special(FG_ESCAPE) {
                    true => FG_ESCAPE.to_string(),
                    false => lark_lit(FG_ESCAPE),
                };
                let mut fg = FgGrammar {
                    rules: String::new(),
                    next: 0,
                    esc,
                    esc_is_token: special(FG_ESCAPE),
                };
                let alts: Vec<String> = callable
                    .iter()
                    .map(|t| {
                        let args = fg.object(&t.parameters);
                        format!("{} {args}", lark_lit(&t.name))
                    })
                    .collect();
                g.push_str(&fg.rules);
                g.push_str(&format!(
                    "call_body: {} ({})\n",
                    lark_lit(FG_CALL),
                    alts.join(" | ")
                ));
                let tok = |s: &str| match special(s) {
                    true => s.to_string(),
                    false => lark_lit(s),
                };
                (
                    tok(FG_OPEN),
                    "call_body".to_string(),
                    tok(FG_CLOSE),
                    "\"\"".to_string(),
                )
            }
        };
        let one = format!("{open} {call} {close}");
        let calls = match many {
            true => format!("{one} ({sep} {one})*"),
            false => one.clone(),
        };
        let start = match self.choice {
            ToolChoice::Auto => {
                let open_text = syntax.open();
                let open_is_token = syntax == CallSyntax::FunctionGemma && special(FG_OPEN);
                if open_is_token {
                    // Text cannot produce the marker token: free text, then calls.
                    g.push_str("FREE: /(.|\\n)+/\n");
                    format!("FREE? ({calls})?")
                } else {
                    // Free text that never contains the marker, or text up to the first
                    // marker (lazy: it ends there) and then complete calls.
                    let rx = regex_escape(open_text);
                    g.push_str(&format!("TEXT: /(.|\\n)*/ & ~/(.|\\n)*{rx}(.|\\n)*/\n"));
                    g.push_str(&format!("prefix[lazy]: /(.|\\n)*{rx}/\n"));
                    let rest = format!("{call} {close}");
                    let rest = match many {
                        true => format!("{rest} ({sep} {one})*"),
                        false => rest,
                    };
                    format!("TEXT | prefix {rest}")
                }
            }
            _ => calls,
        };
        Ok(Some(Grammar::ToolCalls(format!("start: {start}\n{g}"))))
    }
}

/// A Lark string literal.
fn lark_lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// `s` as a regex matching it literally (inside Lark's `/…/`).
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '/' => out.push_str("\\/"),
            // Only the metacharacters: `\<` and `\>` mean word boundaries.
            c if "\\.+*?()|[]{}^$#&~-".contains(c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Lark rules for FunctionGemma's argument syntax, made from a JSON schema: strings
/// between `<escape>`s, numbers and booleans bare, lists in `[…]`, objects in `{…}` with
/// their properties in the schema's order (required ones always, optional ones maybe).
struct FgGrammar {
    rules: String,
    next: usize,
    esc: String,
    esc_is_token: bool,
}

impl FgGrammar {
    fn rule(&mut self, body: String) -> String {
        self.next += 1;
        let name = format!("fg{}", self.next);
        self.rules.push_str(&format!("{name}: {body}\n"));
        name
    }

    /// A string between `<escape>`s, at most `max` characters when the schema says so.
    /// When `<escape>` is text, the whole string is one lazy lexeme, so that it ends at
    /// the first closing `<escape>`.
    fn string(&mut self, max: Option<u64>) -> String {
        let reps = match max {
            Some(n) => format!("{{0,{n}}}"),
            None => "*".to_string(),
        };
        match self.esc_is_token {
            true => format!("{} /(.|\\n){reps}/ {}", self.esc, self.esc),
            false => {
                self.next += 1;
                let name = format!("fg{}", self.next);
                let esc = regex_escape(FG_ESCAPE);
                self.rules
                    .push_str(&format!("{name}[lazy]: /{esc}(.|\\n){reps}{esc}/\n"));
                name
            }
        }
    }

    fn value(&mut self, s: &Value) -> String {
        if let Some(values) = s.get("enum").and_then(Value::as_array) {
            let alts: Vec<String> = values.iter().map(|v| self.literal(v)).collect();
            if !alts.is_empty() {
                return self.rule(alts.join(" | "));
            }
        }
        if let Some(v) = s.get("const") {
            return self.literal(v);
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            _ if s.get("properties").is_some() => "object",
            _ => "",
        };
        match ty {
            "string" => {
                let max = s.get("maxLength").and_then(Value::as_u64);
                self.string(max)
            }
            // At most 16 digits: JSON's exact integers (see `bound_integers`).
            "integer" => self.rule("/-?(0|[1-9][0-9]{0,15})/".into()),
            "number" => self.rule("/-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?/".into()),
            "boolean" => self.rule("\"true\" | \"false\"".into()),
            "null" => self.rule("\"null\"".into()),
            "array" => {
                let item = match s.get("items") {
                    Some(i) => self.value(i),
                    None => self.any(),
                };
                self.rule(format!("\"[\" ({item} (\",\" {item})*)? \"]\""))
            }
            "object" => self.object(s),
            _ => self.any(),
        }
    }

    /// A value of no declared type: a string, a number or a boolean.
    fn any(&mut self) -> String {
        let s = self.string(None);
        self.rule(format!(
            "{s} | /-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?/ | \"true\" | \"false\""
        ))
    }

    fn literal(&mut self, v: &Value) -> String {
        match v {
            Value::String(s) => format!("{} {} {}", self.esc, lark_lit(s), self.esc),
            other => lark_lit(&other.to_string()),
        }
    }

    /// `{…}` with the schema's properties in order.
    fn object(&mut self, s: &Value) -> String {
        let props: Vec<(String, Value)> = s
            .get("properties")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let required: Vec<&str> = s
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let pairs: Vec<(String, bool)> = props
            .iter()
            .map(|(k, v)| {
                let val = self.value(v);
                (
                    format!("{} {val}", lark_lit(&format!("{k}:"))),
                    required.contains(&k.as_str()),
                )
            })
            .collect();
        // `after`: the properties from here on when something was written before them;
        // `first`: the same when nothing was (None: nothing may follow).
        let mut after = String::new();
        let mut first: Option<String> = None;
        for (pair, req) in pairs.iter().rev() {
            let new_after = match req {
                true => self.rule(format!("\",\" {pair} {after}")),
                false => self.rule(format!("(\",\" {pair})? {after}")),
            };
            let new_first = match (req, &first) {
                (true, _) => self.rule(format!("{pair} {after}")),
                (false, Some(f)) => self.rule(format!("{pair} {after} | {f}")),
                (false, None) => self.rule(format!("({pair} {after})?")),
            };
            after = new_after;
            first = Some(new_first);
        }
        let inner = first.unwrap_or_default();
        self.rule(format!("\"{{\" {inner} \"}}\""))
    }
}

/// Parses FunctionGemma's argument syntax into JSON.
fn fg_parse(s: &str) -> Option<Value> {
    let (v, rest) = fg_value(s.trim_start())?;
    rest.trim().is_empty().then_some(v)
}

fn fg_value(s: &str) -> Option<(Value, &str)> {
    if let Some(rest) = s.strip_prefix(FG_ESCAPE) {
        let end = rest.find(FG_ESCAPE)?;
        return Some((
            Value::String(rest[..end].to_string()),
            &rest[end + FG_ESCAPE.len()..],
        ));
    }
    if let Some(mut rest) = s.strip_prefix('{') {
        let mut map = Map::new();
        if let Some(r) = rest.strip_prefix('}') {
            return Some((Value::Object(map), r));
        }
        loop {
            let colon = rest.find(':')?;
            let key = rest[..colon].trim().to_string();
            let (v, r) = fg_value(&rest[colon + 1..])?;
            map.insert(key, v);
            rest = r.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start();
            } else if let Some(r) = rest.strip_prefix('}') {
                return Some((Value::Object(map), r));
            } else {
                return None;
            }
        }
    }
    if let Some(mut rest) = s.strip_prefix('[') {
        let mut list = Vec::new();
        if let Some(r) = rest.strip_prefix(']') {
            return Some((Value::Array(list), r));
        }
        loop {
            let (v, r) = fg_value(rest.trim_start())?;
            list.push(v);
            rest = r.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if let Some(r) = rest.strip_prefix(']') {
                return Some((Value::Array(list), r));
            } else {
                return None;
            }
        }
    }
    let end = s.find([',', '}', ']']).unwrap_or(s.len());
    let word = s[..end].trim();
    let v: Value = serde_json::from_str(word).ok()?;
    Some((v, &s[end..]))
}

impl Model {
    /// How this model writes calls: in its own template's syntax when the template reads
    /// tools (FunctionGemma's, the one recognised), else ours.
    pub fn call_syntax(&self) -> CallSyntax {
        match self.chat_template() {
            Ok(t) if t.uses_tools() && t.source().contains(FG_OPEN) => CallSyntax::FunctionGemma,
            _ => CallSyntax::JsonBlocks,
        }
    }

    /// The prompt text of a conversation with tools (see the module doc): the model's own
    /// template given `tools` when it reads them, else the tools described in the system
    /// text and earlier calls and results written as our blocks.
    pub fn tools_prompt(
        &self,
        messages: &[ChatMessage],
        tools: &Tools,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self.chat_template()?;
        let shown = tools.active().then_some(tools);
        if template.uses_tools() {
            let list = shown.map(Tools::openai_json);
            return Ok(template.render_with_tools(
                messages,
                add_generation_prompt,
                list.as_ref(),
            )?);
        }
        let messages = plain_messages(messages, shown);
        Ok(template.render(&messages, add_generation_prompt)?)
    }
}

/// The instruction that shows the tools to a model whose template knows none.
fn tools_instruction(tools: &Tools) -> String {
    let list: Vec<Value> = tools
        .tools
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
        .collect();
    let list = serde_json::to_string_pretty(&list).unwrap_or_default();
    format!(
        "You have access to the functions below. To call one, reply with a block like this and nothing else:\n```tool_call\n{{\"name\": \"function_name\", \"arguments\": {{\"argument\": \"value\"}}}}\n```\nFor several calls, write one block per call. A function's result comes back in a ```tool_output block; use it to answer.\n\n{list}"
    )
}

/// A conversation with tool calls and results written out as text, for a template that
/// knows only system, user and assistant turns: calls as our blocks in the assistant's
/// turn, results as ```` ```tool_output ```` blocks in a user turn (consecutive user turns
/// joined), the tools described in the system text.
fn plain_messages(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = tools {
        let text = tools_instruction(t);
        match messages.first() {
            Some(m) if m.role == "system" || m.role == "developer" => {}
            _ => out.push(ChatMessage::text("system", &text)),
        }
    }
    for (i, m) in messages.iter().enumerate() {
        let mut m = m.clone();
        if i == 0 && (m.role == "system" || m.role == "developer") {
            if let Some(t) = tools {
                m.content =
                    ChatContent::Text(format!("{}\n\n{}", m.text_content(), tools_instruction(t)));
            }
        }
        if let Some(calls) = m.tool_calls.take() {
            let mut text = m.text_content();
            for c in &calls {
                let f = &c["function"];
                let args = match &f["arguments"] {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                if !text.is_empty() {
                    text.push('\n');
                }
                let name =
                    serde_json::to_string(f["name"].as_str().unwrap_or("")).unwrap_or_default();
                text.push_str(&format!(
                    "{JSON_OPEN}{{\"name\": {name}, \"arguments\": {args}}}{JSON_CLOSE}"
                ));
            }
            m.content = ChatContent::Text(text);
        }
        if m.role == "tool" {
            m = ChatMessage::text(
                "user",
                &format!("```tool_output\n{}\n```", m.text_content()),
            );
        }
        match out.last_mut() {
            Some(prev) if prev.role == "user" && m.role == "user" => {
                let mut parts = to_parts(std::mem::take(&mut prev.content));
                parts.push(ChatPart::Text { text: "\n".into() });
                parts.extend(to_parts(m.content));
                prev.content = from_parts(parts);
            }
            _ => out.push(m),
        }
    }
    out
}

fn to_parts(c: ChatContent) -> Vec<ChatPart> {
    match c {
        ChatContent::Text(t) => vec![ChatPart::Text { text: t }],
        ChatContent::Parts(p) => p,
    }
}

/// Parts back to text when they hold no image (templates read both forms, some only text).
fn from_parts(parts: Vec<ChatPart>) -> ChatContent {
    if parts.iter().any(|p| matches!(p, ChatPart::Image)) {
        return ChatContent::Parts(parts);
    }
    ChatContent::Text(
        parts
            .into_iter()
            .map(|p| match p {
                ChatPart::Text { text } => text,
                ChatPart::Image => String::new(),
            })
            .collect(),
    )
}

/// What [`CallParser::push`] found in new text.
#[derive(Clone, Debug, PartialEq)]
pub enum CallEvent {
    /// Text of the reply outside calls.
    Content(String),
    /// A call begins (`index` counts calls from 0).
    Start { index: usize, name: String },
    /// A piece of the current call's arguments (the pieces join to its `arguments`).
    Arguments { index: usize, piece: String },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ParseState {
    Text,
    Head,
    Args,
    Between,
}

/// Splits a reply into content and calls as its text arrives; text that could still be
/// the start of a marker is held back until it is known.
pub struct CallParser {
    syntax: CallSyntax,
    state: ParseState,
    buf: String,
    calls: Vec<ToolCall>,
    /// How many of `calls` reached their closing marker.
    complete: usize,
    content: String,
}

impl CallParser {
    pub fn new(syntax: CallSyntax) -> CallParser {
        CallParser {
            syntax,
            state: ParseState::Text,
            buf: String::new(),
            calls: Vec::new(),
            complete: 0,
            content: String::new(),
        }
    }

    /// The calls begun so far (the last one may still be open).
    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// The calls that reached their closing marker: a reply cut off by its token limit
    /// inside a call returns the calls before it (the cut one's arguments are incomplete).
    pub fn complete_calls(&self) -> &[ToolCall] {
        &self.calls[..self.complete]
    }

    /// The content so far (text outside calls).
    pub fn content(&self) -> &str {
        &self.content
    }

    /// Feeds text; returns what it completes.
    pub fn push(&mut self, text: &str) -> Vec<CallEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        while self.step(&mut out, false) {}
        out
    }

    /// The reply ended: whatever is held back is content (or the last call's arguments).
    pub fn finish(&mut self) -> Vec<CallEvent> {
        let mut out = Vec::new();
        while self.step(&mut out, true) {}
        out
    }

    fn emit_content(&mut self, s: &str, out: &mut Vec<CallEvent>) {
        if !s.is_empty() {
            self.content.push_str(s);
            out.push(CallEvent::Content(s.to_string()));
        }
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self, out: &mut Vec<CallEvent>, end: bool) -> bool {
        let open = self.syntax.open();
        match self.state {
            ParseState::Text | ParseState::Between => {
                if let Some(i) = self.buf.find(open) {
                    let before = self.buf[..i].to_string();
                    if self.state == ParseState::Text {
                        self.emit_content(&before, out);
                    }
                    self.buf.drain(..i + open.len());
                    self.state = ParseState::Head;
                    return true;
                }
                let hold = match end {
                    true => 0,
                    false => partial_suffix(&self.buf, open),
                };
                let emit: String = self.buf.drain(..self.buf.len() - hold).collect();
                if self.state == ParseState::Text {
                    self.emit_content(&emit, out);
                } else if !emit.trim().is_empty() {
                    // Text after calls (a grammar-free reply): content too.
                    self.emit_content(&emit, out);
                }
                false
            }
            ParseState::Head => {
                let head = match self.syntax {
                    CallSyntax::JsonBlocks => json_head(&self.buf),
                    CallSyntax::FunctionGemma => fg_head(&self.buf),
                };
                match head {
                    Some((name, used)) => {
                        self.buf.drain(..used);
                        out.push(CallEvent::Start {
                            index: self.calls.len(),
                            name: name.clone(),
                        });
                        self.calls.push(ToolCall {
                            name,
                            arguments: String::new(),
                        });
                        self.state = ParseState::Args;
                        true
                    }
                    None if end => {
                        // A call cut off before its name: nothing to return for it.
                        self.buf.clear();
                        false
                    }
                    None => false,
                }
            }
            ParseState::Args => {
                let close = match self.syntax {
                    CallSyntax::JsonBlocks => "}\n```",
                    CallSyntax::FunctionGemma => FG_CLOSE,
                };
                let index = self.calls.len() - 1;
                let (piece, done, closed) = match self.buf.find(close) {
                    Some(i) => {
                        let p = self.buf[..i].to_string();
                        self.buf.drain(..i + close.len());
                        (p, true, true)
                    }
                    None => {
                        let hold = match end {
                            true => 0,
                            false => partial_suffix(&self.buf, close),
                        };
                        (
                            self.buf.drain(..self.buf.len() - hold).collect(),
                            end,
                            false,
                        )
                    }
                };
                match self.syntax {
                    CallSyntax::JsonBlocks => {
                        if !piece.is_empty() {
                            self.calls[index].arguments.push_str(&piece);
                            out.push(CallEvent::Arguments { index, piece });
                        }
                    }
                    // Not JSON until whole: converted and sent in one piece at the end.
                    CallSyntax::FunctionGemma => {
                        self.calls[index].arguments.push_str(&piece);
                        if closed {
                            let raw = std::mem::take(&mut self.calls[index].arguments);
                            let args = fg_parse(&raw).unwrap_or(Value::Object(Map::new()));
                            let text = args.to_string();
                            self.calls[index].arguments = text.clone();
                            out.push(CallEvent::Arguments { index, piece: text });
                        }
                    }
                }
                if closed {
                    self.complete += 1;
                }
                if done {
                    self.state = ParseState::Between;
                }
                done && !end
            }
        }
    }
}

/// The longest end of `s` that is a proper prefix of `marker`.
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && marker.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

/// `{"name": "NAME", "arguments": ` at the start of a JSON call: the name and the bytes
/// used, once all of it has arrived.
fn json_head(s: &str) -> Option<(String, usize)> {
    let rest = s.strip_prefix("{\"name\": ")?;
    let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
    let name = de.next()?.ok()?;
    let used = de.byte_offset();
    let after = &rest[used..];
    let key = ", \"arguments\": ";
    if after.len() < key.len() {
        return None;
    }
    after
        .starts_with(key)
        .then(|| (name, "{\"name\": ".len() + used + key.len()))
}

/// `call:NAME` up to the `{` of FunctionGemma's arguments (kept: they are parsed whole).
fn fg_head(s: &str) -> Option<(String, usize)> {
    let rest = s.strip_prefix(FG_CALL)?;
    let brace = rest.find('{')?;
    Some((rest[..brace].trim().to_string(), FG_CALL.len() + brace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(syntax: CallSyntax, text: &str, piece: usize) -> (Vec<CallEvent>, CallParser) {
        let mut p = CallParser::new(syntax);
        let mut events = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for chunk in chars.chunks(piece) {
            events.extend(p.push(&chunk.iter().collect::<String>()));
        }
        events.extend(p.finish());
        (events, p)
    }

    #[test]
    fn json_calls_stream_into_the_same_calls_whatever_the_pieces() {
        let text = "Let me look.\n```tool_call\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"n\": [1, 2]}}\n```\n```tool_call\n{\"name\": \"time\", \"arguments\": {}}\n```";
        for piece in [1, 2, 3, 7, 1000] {
            let (events, p) = run(CallSyntax::JsonBlocks, text, piece);
            assert_eq!(p.content(), "Let me look.\n");
            assert_eq!(
                p.calls(),
                &[
                    ToolCall {
                        name: "get_weather".into(),
                        arguments: "{\"city\": \"Paris\", \"n\": [1, 2]}".into()
                    },
                    ToolCall {
                        name: "time".into(),
                        arguments: "{}".into()
                    }
                ]
            );
            let args: String = events
                .iter()
                .filter_map(|e| match e {
                    CallEvent::Arguments { index: 0, piece } => Some(piece.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(args, p.calls()[0].arguments, "pieces of {piece}");
        }
    }

    #[test]
    fn text_without_calls_is_all_content() {
        let (_, p) = run(CallSyntax::JsonBlocks, "Just text with ``` fences.", 2);
        assert_eq!(p.content(), "Just text with ``` fences.");
        assert!(p.calls().is_empty());
    }

    #[test]
    fn function_gemma_calls_become_json() {
        let text = "<start_function_call>call:get_weather{city:<escape>Paris, France<escape>,days:3,units:[<escape>c<escape>]}<end_function_call>";
        let (_, p) = run(CallSyntax::FunctionGemma, text, 3);
        assert_eq!(p.calls().len(), 1);
        assert_eq!(p.calls()[0].name, "get_weather");
        let v: Value = serde_json::from_str(&p.calls()[0].arguments).unwrap();
        assert_eq!(
            v,
            json!({"city": "Paris, France", "days": 3, "units": ["c"]})
        );
    }

    #[test]
    fn conversations_with_calls_become_plain_turns() {
        let tools = Tools {
            tools: vec![Tool {
                name: "f".into(),
                description: "d".into(),
                parameters: json!({"type": "object"}),
            }],
            choice: ToolChoice::Auto,
            parallel: true,
        };
        let mut call = ChatMessage::text("assistant", "");
        call.tool_calls = Some(vec![
            json!({"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}),
        ]);
        let mut result = ChatMessage::text("tool", "42");
        result.tool_call_id = Some("1".into());
        let msgs = [
            ChatMessage::text("user", "hi"),
            call,
            result,
            ChatMessage::text("user", "and?"),
        ];
        let out = plain_messages(&msgs, Some(&tools));
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].text_content().contains("\"name\": \"f\""));
        assert_eq!(
            out[2].text_content(),
            "```tool_call\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n```"
        );
        assert_eq!(out[3].text_content(), "```tool_output\n42\n```\nand?");
    }
}
