//! Structured output and tool calls end to end: `gemma3 serve` with the real model, and a
//! second server whose chat template reads `tools` (FunctionGemma's shape, from
//! tests/data/function_gemma.jinja), checked with the official `openai` Python client and
//! `jsonschema` (tests/structured_client.py; scripts/test.sh installs both into a venv and
//! names its python in GEMMA3_TEST_PYTHON).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// A `gemma3 serve` child on a free port; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gemma3"))
            .args(["serve", "--port", "0", "--threads", "2", "--parallel", "16"])
            .args(args)
            .env_remove("GEMMA3_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (_, rx) = common::read_log(child.stderr.take().unwrap(), None);
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        let http = reqwest::blocking::Client::new();
        let t0 = Instant::now();
        while http
            .get(format!("{base}/health"))
            .send()
            .map_or(true, |r| r.status() != 200)
        {
            assert!(t0.elapsed() < Duration::from_secs(60), "model not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, base }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn schemas_grammars_and_tool_calls_through_the_openai_client() {
    let Some(python) = std::env::var_os("GEMMA3_TEST_PYTHON") else {
        eprintln!("skipped: GEMMA3_TEST_PYTHON is not set (scripts/test.sh installs the openai client and jsonschema and sets it)");
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let plain = Server::start(&[]);
    let template = dir.join("data/function_gemma.jinja");
    let fg = Server::start(&["--chat-template", template.to_str().unwrap()]);
    let o = Command::new(python)
        .arg(dir.join("structured_client.py"))
        .args(["--base", &format!("{}/v1", plain.base)])
        .args(["--fg-base", &format!("{}/v1", fg.base)])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&o.stdout);
    eprintln!("{report}");
    assert!(
        o.status.success() && report.contains("all structured output checks passed"),
        "structured output checks failed:\n{report}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
