//! Tensors written to an unnamed temporary file and read back through a memory map: bytes
//! made in memory (weights quantized at load) that, like a model file's, can be handed back
//! to the OS once a repacked copy replaces them ([`crate::Storage::release`]), instead of
//! staying beside it for the life of the process.

use crate::{DType, FormatError, Result, TensorData};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Each tensor starts on this boundary, as in a GGUF file (wider reads stay aligned).
const ALIGN: u64 = 64;

/// Tensors being written to a spill file; [`SpillWriter::finish`] maps them.
pub struct SpillWriter {
    out: BufWriter<File>,
    path: PathBuf,
    pos: u64,
    tensors: Vec<(String, DType, Vec<usize>, Range<usize>)>,
}

impl SpillWriter {
    /// A spill file in `dir`, removed from the directory at once where the OS allows an
    /// open file to lose its name (Unix); elsewhere None: keep the bytes in memory there.
    pub fn new(dir: &Path) -> Result<Option<SpillWriter>> {
        if !cfg!(unix) {
            return Ok(None);
        }
        let path = dir.join(format!(
            ".gemma3-spill-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let io = |err| FormatError::Io {
            path: path.clone(),
            err,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        std::fs::remove_file(&path).map_err(io)?;
        Ok(Some(SpillWriter {
            out: BufWriter::new(file),
            path,
            pos: 0,
            tensors: Vec::new(),
        }))
    }

    /// Appends one tensor: `write` is handed a sink for its bytes, in order.
    pub fn tensor<E: From<FormatError>>(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<usize>,
        write: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let pad = self.pos.next_multiple_of(ALIGN) - self.pos;
        let zeros = [0u8; ALIGN as usize];
        self.put(&zeros[..pad as usize])?;
        let start = self.pos;
        write(&mut |b: &[u8]| self.put(b))?;
        self.tensors.push((
            name.to_string(),
            dtype,
            shape,
            start as usize..self.pos as usize,
        ));
        Ok(())
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).map_err(|err| FormatError::Io {
            path: self.path.clone(),
            err,
        })?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Maps the file and returns its tensors, each checked against its type and shape.
    pub fn finish(self) -> Result<Vec<TensorData>> {
        let path = self.path;
        let io = |err| FormatError::Io {
            path: path.clone(),
            err,
        };
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        let backing: crate::Backing = if self.pos == 0 {
            Arc::new(Vec::<u8>::new())
        } else {
            // SAFETY: the file has no name left and only this process holds it: nothing
            // can change it under the read-only map.
            Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        self.tensors
            .into_iter()
            .map(|(name, dtype, shape, range)| {
                TensorData::new(name, dtype, shape, backing.clone(), range)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_tensors_read_back_their_bytes() {
        let Some(mut w) = SpillWriter::new(&std::env::temp_dir()).unwrap() else {
            return; // no spill files on this OS
        };
        let a: Vec<u8> = (0..34u8).collect(); // one Q8_0 block
        let b: Vec<u8> = (0..16)
            .flat_map(|i: u32| (i as f32).to_le_bytes())
            .collect();
        w.tensor::<FormatError>("a", DType::Q8_0, vec![32], |put| put(&a))
            .unwrap();
        w.tensor::<FormatError>("b", DType::F32, vec![4, 4], |put| {
            put(&b[..10])?;
            put(&b[10..])
        })
        .unwrap();
        let t = w.finish().unwrap();
        assert_eq!(t[0].bytes(), &a[..]);
        assert_eq!(t[1].bytes(), &b[..]);
        assert_eq!(t[1].bytes().as_ptr() as usize % ALIGN as usize, 0);
        assert_eq!(t[1].shape, vec![4, 4]);
    }
}
