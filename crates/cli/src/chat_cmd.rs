//! `gemma3 chat`: an interactive conversation on the model's chat template, one message per
//! line of stdin. The conversation's keys and values stay cached between turns, so each turn
//! only computes its new tokens. `/reset` starts over, `/image PATH` shows an image with the
//! next message (vision models), Ctrl-C stops the current answer. When the conversation
//! outgrows the context, the oldest turns are dropped (and the user told so).

use anyhow::Result;
use clap::Args;
use gemma3_engine::{EngineError, GenerateOptions, Generator, Image, Model};
use gemma3_model::ImageInputs;
use gemma3_text::chat::{ChatContent, ChatMessage, ChatPart};
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: crate::ModelArgs,
    #[command(flatten)]
    pub sampling: crate::SamplingArgs,
    #[command(flatten)]
    pub constraint: crate::ConstraintArgs,
    #[command(flatten)]
    pub spec: crate::SpecArgs,
    /// Instructions for the whole conversation (Gemma's template puts them before the
    /// first user message)
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub image_limit: crate::ImageLimitArgs,
    /// Maximum new tokens per reply
    #[arg(short = 'n', long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Context size in tokens for the whole conversation [default: the model's trained
    /// length, capped by the memory available]
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
}

const HELP: &str = "Commands: /reset (start over), /image PATH (show an image with the next message), /help. Ctrl-C stops an answer; Ctrl-D quits.";

/// The conversation: messages, and the projector rows of its images in order.
struct Conversation {
    messages: Vec<ChatMessage>,
    /// Per image in the conversation: its views' rows.
    image_rows: Vec<Vec<f32>>,
    /// Rows of the images waiting for the next user message.
    pending: Vec<Vec<f32>>,
}

impl Conversation {
    fn new(system: Option<&str>) -> Self {
        Conversation {
            messages: system
                .map(|s| vec![ChatMessage::text("system", s)])
                .unwrap_or_default(),
            image_rows: vec![],
            pending: vec![],
        }
    }

    /// Drops the oldest user turn and the reply after it (the system message stays).
    /// False when there is nothing left to drop.
    fn drop_oldest_turn(&mut self) -> bool {
        let first = self.messages.iter().position(|m| m.role == "user");
        let Some(i) = first else { return false };
        // Keep at least the newest user message.
        if self.messages[i + 1..].iter().all(|m| m.role != "user") {
            return false;
        }
        let end = if self
            .messages
            .get(i + 1)
            .is_some_and(|m| m.role == "assistant")
        {
            i + 2
        } else {
            i + 1
        };
        let images: usize = self.messages[i..end]
            .iter()
            .map(|m| m.content.images())
            .sum();
        self.messages.drain(i..end);
        self.image_rows.drain(..images);
        true
    }
}

pub fn run(a: ChatArgs) -> Result<()> {
    let model = crate::setup(&a.model)?;
    let ctx = model.context(a.ctx_size)?;
    let mut gen = Generator::new(&model, ctx);
    let opts = GenerateOptions {
        max_new_tokens: a.max_tokens.min(ctx.saturating_sub(1)).max(1),
        sampling: a.sampling.params(&model)?.0,
        constraint: a.constraint.grammar()?,
        lookup: a.spec.lookup(),
        draft: a.spec.draft(&model)?,
        ..Default::default()
    };
    let interactive = std::io::stdin().is_terminal();
    // Ctrl-C while answering stops the answer; at the prompt it quits.
    let answering = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (answering, stop) = (answering.clone(), stop.clone());
        ctrlc::set_handler(move || {
            if answering.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }
    if interactive {
        eprintln!(
            "Chatting with {} (Ctrl-D to quit, /help for commands).",
            model.source.path().display()
        );
    }
    let mut conv = Conversation::new(a.system.as_deref());
    let mut stdin = std::io::stdin().lock();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let line = match read_line(&mut stdin)? {
            Line::End => break,
            Line::Text(t) => t,
            Line::Bad(why) => {
                // One bad line never ends the session.
                eprintln!("error: {why}; this line was skipped");
                continue;
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "reset" => {
                    conv = Conversation::new(a.system.as_deref());
                    gen.forget();
                    eprintln!("(conversation cleared)");
                }
                "image" => match add_image(
                    &model,
                    arg.trim(),
                    a.image_limit.max_image_pixels,
                    &mut conv,
                ) {
                    Ok(()) => eprintln!("(image added to your next message)"),
                    Err(e) => eprintln!("error: {e}"),
                },
                "help" => eprintln!("{HELP}"),
                _ => eprintln!("unknown command /{name}. {HELP}"),
            }
            continue;
        }
        let content = match conv.pending.is_empty() {
            true => ChatContent::Text(line.to_string()),
            false => {
                let mut parts: Vec<ChatPart> =
                    conv.pending.iter().map(|_| ChatPart::Image).collect();
                parts.push(ChatPart::Text {
                    text: line.to_string(),
                });
                ChatContent::Parts(parts)
            }
        };
        conv.messages.push(ChatMessage {
            role: "user".into(),
            content,
            ..Default::default()
        });
        conv.image_rows.append(&mut conv.pending);
        let ids = loop {
            match prompt_ids(&model, &conv) {
                Ok(ids) if ids.len() + opts.max_new_tokens <= ctx => break ids,
                Ok(ids) => {
                    if !conv.drop_oldest_turn() {
                        eprintln!(
                            "error: this message alone ({} tokens) leaves no room for a reply in the context of {ctx} tokens (/reset, or a larger --ctx-size)",
                            ids.len()
                        );
                        break vec![];
                    }
                    eprintln!("(the conversation outgrew the context of {ctx} tokens: dropped the oldest turn)");
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    break vec![];
                }
            }
        };
        if ids.is_empty() {
            // The message could not be sent: forget it, keep the conversation.
            let last = conv.messages.pop();
            let images = last.map_or(0, |m| m.content.images());
            conv.image_rows.truncate(conv.image_rows.len() - images);
            continue;
        }
        let rows: Vec<f32> = conv.image_rows.concat();
        let images = match model.image_tokens() {
            Ok(t) if !rows.is_empty() => Some(ImageInputs {
                image_token: t.soft,
                embeds: &rows,
            }),
            _ => None,
        };
        stop.store(false, Ordering::SeqCst);
        answering.store(true, Ordering::SeqCst);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut write_err = None;
        let result = gen.generate_ids_with(&ids, images, &opts, |piece| {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    write_err = Some(e);
                    false
                }
            }
        });
        answering.store(false, Ordering::SeqCst);
        // stdout gone (a closed pipe, a full disk): the session cannot go on.
        if let Some(e) = write_err {
            return Err(crate::stdout_error(e));
        }
        writeln!(out).map_err(crate::stdout_error)?;
        match result {
            Ok(g) => {
                if stop.load(Ordering::SeqCst) {
                    eprintln!("(stopped)");
                }
                conv.messages.push(ChatMessage::text("assistant", &g.text));
            }
            Err(e) => {
                eprintln!("error: {e}");
                let last = conv.messages.pop();
                let images = last.map_or(0, |m| m.content.images());
                conv.image_rows.truncate(conv.image_rows.len() - images);
            }
        }
    }
    Ok(())
}

/// The most bytes a message line may have.
const MAX_LINE_BYTES: u64 = gemma3_formats::MAX_TEXT_BYTES;

enum Line {
    Text(String),
    /// A line that cannot be a message (too long, not UTF-8): why.
    Bad(String),
    End,
}

/// The next line of `input`, read with a bounded buffer: a line past [`MAX_LINE_BYTES`] is
/// skipped to its end without being kept.
fn read_line(input: &mut impl BufRead) -> Result<Line> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(&mut *input, MAX_LINE_BYTES).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() != Some(&b'\n') && n as u64 == MAX_LINE_BYTES {
        // Skip the rest of the line (chunk by chunk, holding none of it).
        loop {
            let chunk = input.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    input.consume(i + 1);
                    break;
                }
                None => {
                    let len = chunk.len();
                    input.consume(len);
                }
            }
        }
        return Ok(Line::Bad(format!(
            "the line is longer than {} MiB",
            MAX_LINE_BYTES >> 20
        )));
    }
    match String::from_utf8(buf) {
        Ok(s) => Ok(Line::Text(s)),
        Err(e) => Ok(Line::Bad(format!(
            "the line is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))),
    }
}

/// Reads an image for the next message and encodes it now (once).
fn add_image(
    model: &Model,
    path: &str,
    max_pixels: u64,
    conv: &mut Conversation,
) -> Result<(), EngineError> {
    if path.is_empty() {
        return Err(EngineError::Input("usage: /image PATH".into()));
    }
    model.vision_tower()?;
    let img = Image::open_limited(path, max_pixels)?;
    let views = model.image_views(std::slice::from_ref(&img), None)?;
    let rows = model.encode_views(&views)?;
    conv.pending.push(rows);
    Ok(())
}

/// The conversation's prompt ids, ending where the model's reply begins.
fn prompt_ids(model: &Model, conv: &Conversation) -> Result<Vec<u32>, EngineError> {
    let text = model.chat_prompt(&conv.messages, true)?;
    if conv.image_rows.is_empty() {
        return Ok(model.encode_chat(&text));
    }
    let bos = !model.starts_with_bos(&text) && model.tokenizer.add_bos();
    model.image_prompt_ids_for(&text, &vec![0; conv.image_rows.len()], Some(bos), true)
}
