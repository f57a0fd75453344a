//! Reading text (prompts, data files, JSON side files) with a size limit, so that a huge
//! or endless input (`< /dev/zero`) is an error naming it instead of unbounded memory.

use crate::{FormatError, Result};
use std::io::Read;
use std::path::Path;

/// The most bytes a text input may have: prompts, stdin, data files, tokenizer.json (33 MB
/// for Gemma 3's vocabulary), config and template files.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// Reads the UTF-8 text file at `path`, of at most `limit` bytes.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    utf8(read_bytes(path, limit)?, path)
}

/// Reads UTF-8 text of at most `limit` bytes from `reader` (named `name` in errors: a path,
/// or e.g. "stdin").
pub fn read_text_from(reader: impl Read, name: impl AsRef<Path>, limit: u64) -> Result<String> {
    utf8(
        read_bytes_from(reader, name.as_ref(), limit)?,
        name.as_ref(),
    )
}

/// Reads the file at `path`, of at most `limit` bytes.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|err| FormatError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    read_bytes_from(file, path, limit)
}

/// At most `limit` bytes from `reader` (holding no more than `limit + 1` of an endless one).
fn read_bytes_from(reader: impl Read, name: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|err| FormatError::Io {
            path: name.to_path_buf(),
            err,
        })?;
    if bytes.len() as u64 > limit {
        return Err(FormatError::TooLarge {
            path: name.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

fn utf8(bytes: Vec<u8>, name: &Path) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| FormatError::Malformed {
        path: name.to_path_buf(),
        what: format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// `limit` for people: "64 MiB", or bytes when not a whole number of MiB.
pub(crate) fn show_bytes(limit: u64) -> String {
    match limit % (1 << 20) {
        0 => format!("{} MiB", limit >> 20),
        _ => format!("{limit} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_past_the_limit_is_an_error_naming_it() {
        let endless = std::io::repeat(b'a');
        let e = read_text_from(endless, "stdin", 1000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stdin") && e.contains("1000"), "{e}");
        assert_eq!(read_text_from(&b"abc"[..], "x", 3).unwrap(), "abc");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_named() {
        let e = read_text_from(&b"ab\xffc"[..], "p.txt", 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.txt") && e.contains("offset 2"), "{e}");
    }

    #[test]
    fn a_missing_file_says_so_once() {
        let e = read_text(Path::new("/no/such/file.txt"), 100).unwrap_err();
        let shown = format!("{e}");
        assert!(shown.contains("/no/such/file.txt"), "{shown}");
        assert!(
            std::error::Error::source(&e).is_none(),
            "the OS error would print twice"
        );
    }
}
