//! Shared by the tests that run `gemma3 serve`: reading a server's log as it runs, and a
//! metric's value from its /metrics text.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::ChildStderr;
use std::sync::{mpsc, Arc, Mutex};

/// What a server prints when it is listening: the line's prefix, before its address.
pub const LISTENING: &str = "gemma3 serve: listening on ";

/// Reads a server's stderr on a thread: every line into the log (and echoed with `echo`
/// as a prefix, when given); the address it listens on, once, into the channel.
pub fn read_log(
    stderr: ChildStderr,
    echo: Option<String>,
) -> (Arc<Mutex<String>>, mpsc::Receiver<String>) {
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix(LISTENING) {
                let _ = tx.send(addr.to_string());
            } else if let Some(tag) = &echo {
                eprintln!("[{tag}] {line}");
            }
            kept.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    (log, rx)
}

/// A metric's value in /metrics text: its first series, labelled or not.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
