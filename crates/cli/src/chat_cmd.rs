//! `gemma3 chat`: an interactive conversation with Gemma 3's chat template
//! (`<start_of_turn>user … <end_of_turn>` / `<start_of_turn>model …`), one message per line
//! of stdin. The conversation's keys and values stay cached between turns, so each turn only
//! computes its new tokens.

use anyhow::Result;
use clap::Args;
use gemma3_engine::{GenerateOptions, Generator};
use std::io::{BufRead, IsTerminal, Write};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: crate::ModelArgs,
    #[command(flatten)]
    pub sampling: crate::SamplingArgs,
    /// Instructions placed before the first user message (Gemma has no system role)
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum new tokens per reply
    #[arg(short = 'n', long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Context size in tokens for the whole conversation
    #[arg(short = 'c', long, default_value_t = 8192)]
    pub ctx_size: usize,
}

/// The text of one user turn and the opening of the model's reply.
pub fn user_turn(message: &str) -> String {
    format!("<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n")
}

pub fn run(a: ChatArgs) -> Result<()> {
    let model = crate::setup(&a.model)?;
    let ctx = model.context_for(a.ctx_size, Some(a.ctx_size));
    let mut gen = Generator::new(&model, ctx);
    let opts = GenerateOptions {
        max_new_tokens: a.max_tokens,
        sampling: a.sampling.params(&model)?.0,
        ..Default::default()
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting with {} (Ctrl-D to quit).",
            model.source.path().display()
        );
    }
    let mut conversation = String::new();
    let mut system = a.system.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let message = match system.take() {
            Some(s) => format!("{s}\n\n{line}"),
            None => line,
        };
        conversation.push_str(&user_turn(&message));
        let ids = model.encode_prompt(&conversation, None, true);
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let g = gen.generate_ids(&ids, &opts, |piece| {
            out.write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .is_ok()
        })?;
        writeln!(out)?;
        conversation.push_str(&g.text);
        conversation.push_str("<end_of_turn>\n");
    }
    Ok(())
}
