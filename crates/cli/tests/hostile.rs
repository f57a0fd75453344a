//! The `gemma3` binary against hostile and careless input: every case ends with the
//! documented exit code (0 success or a closed pipe, 1 an error, 2 a usage error), a message
//! naming the problem, no panic, peak memory under 1 GB, and within seconds.
//!
//! The cases run one after another in one test so that the children's peak RSS
//! (`getrusage(RUSAGE_CHILDREN)`, the largest child so far) can be read after each.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a case may take (a generation of a few tokens, or an error, takes well under).
const CASE_TIMEOUT: Duration = Duration::from_secs(30);
/// The peak resident memory any case may reach.
const MAX_RSS_KB: i64 = 1 << 20;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// What a case feeds the program on stdin.
enum Input {
    Nothing,
    Bytes(Vec<u8>),
    /// An endless stream of zero bytes (as `< /dev/zero`).
    Zeros,
}

/// Where the program's stdout goes.
enum Output {
    Captured,
    /// A pipe whose reader takes this many bytes and then closes it (as `| head -c N`).
    ClosedAfter(usize),
    /// A file (e.g. /dev/full).
    File(&'static str),
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    input: Input,
    output: Output,
    code: i32,
    /// Each must appear in stderr.
    stderr: Vec<&'static str>,
    /// Stdout must be empty (no partial document).
    empty_stdout: bool,
}

fn case(name: &'static str, args: &[&str], code: i32, stderr: &[&'static str]) -> Case {
    Case {
        name,
        args: args.iter().map(|s| s.to_string()).collect(),
        input: Input::Nothing,
        output: Output::Captured,
        code,
        stderr: stderr.to_vec(),
        empty_stdout: false,
    }
}

impl Case {
    fn input(mut self, i: Input) -> Case {
        self.input = i;
        self
    }
    fn output(mut self, o: Output) -> Case {
        self.output = o;
        self
    }
    fn empty_stdout(mut self) -> Case {
        self.empty_stdout = true;
        self
    }
}

struct Outcome {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    secs: f64,
}

fn run(c: &Case) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gemma3"));
    cmd.args(&c.args).stderr(Stdio::piped());
    cmd.stdin(match c.input {
        Input::Nothing => Stdio::null(),
        _ => Stdio::piped(),
    });
    cmd.stdout(match c.output {
        Output::File(p) => std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .into(),
        _ => Stdio::piped(),
    });
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let feeder = child.stdin.take().map(|mut w| {
        let input = match &c.input {
            Input::Bytes(b) => Some(b.clone()),
            _ => None,
        };
        std::thread::spawn(move || match input {
            Some(b) => {
                let _ = w.write_all(&b);
            }
            None => {
                let zeros = vec![0u8; 1 << 16];
                while w.write_all(&zeros).is_ok() {}
            }
        })
    });
    let mut out = child.stdout.take();
    let keep = match c.output {
        Output::ClosedAfter(n) => Some(n),
        _ => None,
    };
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        if let Some(o) = out.as_mut() {
            match keep {
                Some(n) => {
                    let mut buf = vec![0u8; n];
                    let _ = o.read_exact(&mut buf);
                    got = buf;
                }
                None => {
                    let _ = o.read_to_end(&mut got);
                }
            }
        }
        drop(out);
        got
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = t0.elapsed().as_secs_f64();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    Outcome {
        code: status.and_then(|s| s.code()),
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        secs,
    }
}

/// The largest resident set of any child so far, in KB.
fn children_peak_rss_kb() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss())
        .unwrap_or(0)
}

/// A copy of the small fixture GGUF with the metadata value of `key` rewritten by `patch`
/// (given the value's type code and bytes).
fn patched_gguf(dir: &Path, name: &str, key: &str, patch: impl Fn(&mut [u8])) -> String {
    let mut bytes = std::fs::read(shared().join("fixtures/quantize/model-Q8_0.gguf")).unwrap();
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("{key} is not in the fixture"))
        + key.len();
    // The value's type (u32) and then its 4 bytes, for the 32-bit keys patched here.
    patch(&mut bytes[at..at + 8]);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

/// A PNG whose header claims 100000x100000 pixels, over a few bytes of data.
fn huge_png(dir: &Path) -> String {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let body = [kind, data].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let side = 100_000u32.to_be_bytes();
    chunk(
        &mut png,
        b"IHDR",
        &[&side[..], &side, &[8, 2, 0, 0, 0]].concat(),
    );
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut png, b"IEND", &[]);
    let p = dir.join("huge.png");
    std::fs::write(&p, png).unwrap();
    p.display().to_string()
}

#[test]
fn bad_input_table() {
    let dir = std::env::temp_dir().join(format!("gemma3-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let huge = huge_png(&dir);
    let nan_eps = patched_gguf(
        &dir,
        "nan-eps.gguf",
        "gemma3.attention.layer_norm_rms_epsilon",
        |v| {
            assert_eq!(v[..4], 6u32.to_le_bytes(), "an f32 value");
            v[4..].copy_from_slice(&f32::NAN.to_le_bytes());
        },
    );
    let float_ctx = patched_gguf(&dir, "float-ctx.gguf", "gemma3.context_length", |v| {
        assert_eq!(v[..4], 4u32.to_le_bytes(), "a u32 value");
        v[..4].copy_from_slice(&6u32.to_le_bytes());
    });
    let real = std::fs::read(shared().join("fixtures/quantize/model-Q8_0.gguf")).unwrap();
    let truncated = d("truncated.gguf", &real[..real.len() / 3]);
    let binary = d("binary.txt", &[0x66, 0x6f, 0xff, 0xfe, 0x00, 0x80]);
    let bad_jsonl = d("bad.jsonl", b"{\"id\": 1, \"ctx\": \n");
    let gpl = shared().join("reference/gpl-3.txt").display().to_string();
    let image = shared()
        .join("fixtures/tiny-vlm/image.png")
        .display()
        .to_string();
    let mut cases = vec![
        case(
            "an image whose header claims 10 gigapixels",
            &["generate", "--image", &huge, "-n", "4", "hi"],
            1,
            &["huge.png", "100000x100000", "megapixels"],
        ),
        case(
            "a pixel limit below the image",
            &[
                "generate",
                "--image",
                &image,
                "--max-image-pixels",
                "100",
                "hi",
            ],
            1,
            &["image.png", "limit"],
        ),
        case(
            "-n far past the context runs to its end",
            &["generate", "-n", "18446744073709551615", "-c", "48", "hi"],
            0,
            &["context is full"],
        ),
        case(
            "perplexity with a context of 0",
            &["perplexity", "-c", "0", &gpl],
            1,
            &["context of 0"],
        ),
        case(
            "a context beyond the model's",
            &["generate", "-c", "99999999", "hi"],
            1,
            &["99999999", "32768"],
        ),
        case(
            "--threads 1000 is capped at the cores",
            &["generate", "-n", "4", "--threads", "1000", "hi"],
            0,
            &["--threads 1000", "cores"],
        ),
        case(
            "info --tensors into a pipe closed early",
            &["info", "--tensors"],
            0,
            &[],
        )
        .output(Output::ClosedAfter(64)),
        case("tokenize into a pipe closed early", &["tokenize"], 0, &[])
            .input(Input::Bytes("hello world ".repeat(20_000).into_bytes()))
            .output(Output::ClosedAfter(64)),
        case(
            "generate into a full disk",
            &["generate", "-n", "4", "hi"],
            1,
            &["writing to stdout", "No space left"],
        )
        .output(Output::File("/dev/full")),
        case(
            "tokenize --json into a full disk",
            &["tokenize", "--json", "hi"],
            1,
            &["writing to stdout"],
        )
        .output(Output::File("/dev/full")),
        case(
            "logits that fail leave no half document",
            &["logits", "--ids", "2,999999"],
            1,
            &["999999", "vocabulary"],
        )
        .empty_stdout(),
        case(
            "an endless stdin",
            &["generate", "-n", "1"],
            1,
            &["stdin", "limit", "MiB"],
        )
        .input(Input::Zeros),
        case(
            "a data file that is not text",
            &["perplexity", &binary],
            1,
            &["binary.txt", "not UTF-8"],
        ),
        case(
            "an eval file with broken JSON",
            &["eval", "--task", "piqa", "--data", &bad_jsonl],
            1,
            &["bad.jsonl", "line 1"],
        ),
        case(
            "a GGUF whose norm epsilon is NaN",
            &["generate", "-m", &nan_eps, "-n", "2", "hi"],
            1,
            &["epsilon is NaN"],
        ),
        case(
            "a GGUF with a float where an integer belongs",
            &["info", "-m", &float_ctx],
            1,
            &["gemma3.context_length", "not a non-negative integer"],
        ),
        case(
            "a truncated GGUF",
            &["info", "-m", &truncated],
            1,
            &["truncated.gguf"],
        ),
        case(
            "a missing image",
            &["generate", "--image", "/no/such/picture.png", "hi"],
            1,
            &["cannot read image /no/such/picture.png"],
        ),
        case(
            "a missing model",
            &["generate", "-m", "/no/such/model.gguf", "hi"],
            1,
            &["/no/such/model.gguf"],
        ),
        case(
            "an unknown flag",
            &["generate", "--frobnicate"],
            2,
            &["--frobnicate"],
        ),
        case(
            "a chat survives a bad line and outgrows its context",
            &["chat", "-c", "64", "-n", "8", "--greedy"],
            0,
            &["not UTF-8", "skipped", "dropped the oldest turn"],
        )
        .input(Input::Bytes(
            [
                &b"\xff\xfe broken\n"[..],
                b"Tell me about the sea and the sky.\n",
                b"And what about the mountains far away?\n",
                b"And the rivers that run to the sea?\n",
            ]
            .concat(),
        )),
    ];
    // A 5 MB model: every case above must be just as bounded with it.
    cases.push(case(
        "the small fixture model runs",
        &[
            "generate",
            "-m",
            &shared()
                .join("fixtures/quantize/model-Q8_0.gguf")
                .display()
                .to_string(),
            "-n",
            "2",
            "hi",
        ],
        0,
        &[],
    ));
    let mut failures = vec![];
    for c in &cases {
        let o = run(c);
        let rss = children_peak_rss_kb();
        eprintln!(
            "{:<55} exit {:?} in {:.2} s, peak RSS so far {} MB",
            c.name,
            o.code,
            o.secs,
            rss / 1024
        );
        let mut why = vec![];
        if o.code != Some(c.code) {
            why.push(format!("exit {:?}, expected {}", o.code, c.code));
        }
        for s in &c.stderr {
            if !o.stderr.contains(s) {
                why.push(format!("stderr lacks {s:?}"));
            }
        }
        if o.stderr.contains("panicked") || o.stderr.contains("RUST_BACKTRACE") {
            why.push("a panic".into());
        }
        if c.empty_stdout && !o.stdout.is_empty() {
            why.push(format!("{} bytes on stdout", o.stdout.len()));
        }
        if rss > MAX_RSS_KB {
            why.push(format!("peak RSS {} MB", rss / 1024));
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                c.name,
                why.join("; "),
                o.stderr.trim()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
