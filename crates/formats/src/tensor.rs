//! A tensor's bytes as they lie in its file, with its type and shape.

use crate::{DType, FormatError, Result};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// What tensor bytes live in: a memory map of the model file, or (for tests and converted
/// weights) an owned buffer.
pub type Backing = Arc<dyn Storage>;

/// Bytes that tensors borrow.
pub trait Storage: AsRef<[u8]> + Send + Sync {
    /// Says that bytes `range` will not be read for a while: a file map hands those pages
    /// back to the OS (they are read again from the file if touched). Owned memory keeps them.
    fn release(&self, _range: Range<usize>) {}
}

impl Storage for Vec<u8> {}

impl Storage for memmap2::Mmap {
    #[cfg(unix)]
    fn release(&self, range: Range<usize>) {
        const PAGE: usize = 4096;
        // Only whole pages inside the range: neighbours may share the edge pages.
        let start = range.start.div_ceil(PAGE) * PAGE;
        let end = range.end / PAGE * PAGE;
        if end > start {
            // SAFETY: DONTNEED on a private read-only file map drops the pages from this
            // process; later reads fault them back in from the file, unchanged.
            let _ = unsafe {
                self.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// A tensor in its stored format. `shape` is outermost first (PyTorch order), so a weight
/// matrix is `[rows, cols]` with each row contiguous; GGUF's `ne` order is reversed on load.
#[derive(Clone)]
pub struct TensorData {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    backing: Backing,
    range: Range<usize>,
}

impl fmt::Debug for TensorData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {:?}", self.name, self.dtype, self.shape)
    }
}

impl TensorData {
    /// Wraps bytes `range` of `backing`, checking that they hold exactly `shape` of `dtype`.
    pub fn new(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        backing: Backing,
        range: Range<usize>,
    ) -> Result<Self> {
        let err = |what: String| FormatError::Tensor {
            name: name.clone(),
            what,
        };
        let inner = *shape.last().unwrap_or(&1);
        let rows = shape[..shape.len().saturating_sub(1)]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
        let row_bytes = dtype.row_bytes(inner).ok_or_else(|| {
            err(format!(
                "row length {inner} is not a multiple of the {dtype} block size {}",
                dtype.block_elems()
            ))
        })?;
        let need = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
        if range.len() != need {
            return Err(err(format!(
                "{dtype} {shape:?} needs {need} bytes but {} are stored",
                range.len()
            )));
        }
        if range.end > (*backing).as_ref().len() {
            return Err(err(format!(
                "data runs to byte {} past the end of the file ({} bytes)",
                range.end,
                (*backing).as_ref().len()
            )));
        }
        Ok(TensorData {
            name,
            dtype,
            shape,
            backing,
            range,
        })
    }

    /// A tensor over its own bytes (converted or quantized weights).
    pub fn owned(name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len();
        TensorData::new(name.to_string(), dtype, shape, Arc::new(bytes), 0..len)
    }

    /// The first `n` rows (outermost dimension) of this tensor, sharing its bytes.
    pub fn first_rows(&self, n: usize) -> Result<Self> {
        let mut shape = self.shape.clone();
        let outer = shape.first_mut().ok_or_else(|| FormatError::Tensor {
            name: self.name.clone(),
            what: "has no rows".into(),
        })?;
        if n > *outer {
            return Err(FormatError::Tensor {
                name: self.name.clone(),
                what: format!("has {outer} rows, fewer than {n}"),
            });
        }
        let per_row = self.range.len() / (*outer).max(1);
        *outer = n;
        let start = self.range.start;
        TensorData::new(
            self.name.clone(),
            self.dtype,
            shape,
            self.backing.clone(),
            start..start + n * per_row,
        )
    }

    /// An owned f32 tensor (tests, small converted weights).
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData::owned(name, DType::F32, shape, bytes)
    }

    /// Hands the pages of bytes `range` of this tensor back to the OS (see
    /// [`Storage::release`]): for weights read from a repacked copy instead.
    pub fn release_byte_range(&self, range: Range<usize>) {
        let start = self.range.start + range.start.min(self.range.len());
        let end = self.range.start + range.end.min(self.range.len());
        self.backing.release(start..end)
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.backing).as_ref()[self.range.clone()]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of the innermost dimension.
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Product of all but the innermost dimension.
    pub fn rows(&self) -> usize {
        self.numel() / self.cols().max(1)
    }

    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols()).unwrap_or(0)
    }

    /// Bytes of row `i` (rows are whole blocks, checked at construction).
    pub fn row(&self, i: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes()[i * rb..(i + 1) * rb]
    }

    /// Every value as f32, dequantizing as ggml defines each block type.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        crate::quant::dequantize(self.dtype, self.bytes(), &mut out);
        out
    }

    /// Checks the shape against what the model expects.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(FormatError::Tensor {
                name: self.name.clone(),
                what: format!("has shape {:?}, expected {:?}", self.shape, shape),
            });
        }
        Ok(())
    }
}
