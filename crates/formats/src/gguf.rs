//! GGUF (versions 2 and 3): metadata, tensor infos and memory-mapped tensor data.
//!
//! The header is parsed from the mapped bytes with every length checked against what is
//! left in the file before anything is allocated, so a truncated or lying file gives an
//! error naming the problem instead of a panic or a huge allocation.

use crate::{Backing, DType, FormatError, Result, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A metadata value. Arrays may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value for an error message: its type and (short) value; an array only by its
    /// length.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::String(s) if s.chars().count() > 40 => {
                format!("the string {:?}...", s.chars().take(40).collect::<String>())
            }
            MetaValue::String(s) => format!("the string {s:?}"),
            MetaValue::Array(a) => format!("an array of {} values", a.len()),
            other => format!("{other:?}"),
        }
    }

    /// Any integer type as u64 (negative values refused).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short rendering for `info` (arrays summarised).
    pub fn summary(&self) -> String {
        match self {
            MetaValue::String(s) if s.len() > 60 => {
                format!("{:?}…", &s[..s.floor_char_boundary(60)])
            }
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(a) if a.len() > 8 => format!("[{} values]", a.len()),
            MetaValue::Array(a) => format!(
                "[{}]",
                a.iter().map(|v| v.summary()).collect::<Vec<_>>().join(", ")
            ),
            MetaValue::U8(v) => v.to_string(),
            MetaValue::I8(v) => v.to_string(),
            MetaValue::U16(v) => v.to_string(),
            MetaValue::I16(v) => v.to_string(),
            MetaValue::U32(v) => v.to_string(),
            MetaValue::I32(v) => v.to_string(),
            MetaValue::U64(v) => v.to_string(),
            MetaValue::I64(v) => v.to_string(),
            MetaValue::F32(v) => v.to_string(),
            MetaValue::F64(v) => v.to_string(),
            MetaValue::Bool(v) => v.to_string(),
        }
    }
}

/// Where a tensor lies and what it holds, as declared in the header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub size: u64,
}

/// An open GGUF file: parsed header plus the mapped bytes.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    /// Metadata keys in file order (the map above is sorted).
    pub metadata_order: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    backing: Backing,
}

const MAX_DIMS: u32 = 4;
// Bounds that no real file reaches; they only stop absurd headers early.
const MAX_NAME: u64 = 1 << 16;
const MAX_NESTING: u32 = 8;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = (self.pos as u64).checked_add(n);
        match end {
            Some(e) if e <= self.b.len() as u64 => {
                let s = &self.b[self.pos..e as usize];
                self.pos = e as usize;
                Ok(s)
            }
            _ => Err(FormatError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                needed: (self.pos as u64).saturating_add(n),
                len: self.b.len() as u64,
            }),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        // Token texts are sometimes not valid UTF-8 (byte pieces); keep them lossily.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn malformed(&self, what: String) -> FormatError {
        FormatError::Malformed {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => {
                let b = self.arr::<1>(key)?[0];
                if b > 1 {
                    return Err(self.malformed(format!("metadata {key}: bool byte {b}")));
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(self.malformed(format!("metadata {key}: arrays nested too deep")));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(self.malformed(format!(
                            "metadata {key}: unknown array element type {ety}"
                        )))
                    }
                };
                // Every element takes at least `min` bytes: a count the file cannot hold is a lie.
                if n.checked_mul(min)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(FormatError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("metadata {key}: array of {n} elements"),
                        needed: (self.pos as u64).saturating_add(n.saturating_mul(min)),
                        len: self.b.len() as u64,
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            _ => return Err(self.malformed(format!("metadata {key}: unknown value type {ty}"))),
        })
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |err| FormatError::Io {
            path: path.to_path_buf(),
            err,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a model file changed underneath a running process
        // is outside what any reader can defend against (llama.cpp maps the same way).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_backing(path, Arc::new(map))
    }

    /// Parses GGUF bytes already in memory (tests, embedded files).
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::from_backing(path.as_ref(), Arc::new(bytes))
    }

    fn from_backing(path: &Path, backing: Backing) -> Result<Self> {
        let b: &[u8] = (*backing).as_ref();
        let mut c = Cursor { b, pos: 0, path };
        let magic: [u8; 4] = c.arr("the magic number")?;
        if &magic != b"GGUF" {
            return Err(FormatError::BadMagic {
                path: path.to_path_buf(),
                magic,
            });
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        // A key-value pair takes at least 12 bytes, a tensor info at least 24.
        let left = c.remaining() as u64;
        if n_kv.saturating_mul(12) > left || n_tensors.saturating_mul(24) > left {
            return Err(c.malformed(format!(
                "header claims {n_kv} metadata entries and {n_tensors} tensors, more than its {} bytes can hold",
                b.len()
            )));
        }
        let mut metadata = BTreeMap::new();
        let mut metadata_order = Vec::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            if key.len() as u64 > MAX_NAME {
                return Err(c.malformed(format!("metadata key {i} is {} bytes long", key.len())));
            }
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_none() {
                metadata_order.push(key);
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(c.malformed(format!(
                        "general.alignment is {}, not a power of two",
                        v.summary()
                    )))
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor info {i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.malformed(format!(
                    "tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ty = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let dtype = DType::from_ggml_id(ty).ok_or_else(|| FormatError::Tensor {
                name: name.clone(),
                what: format!(
                    "has ggml type {ty} ({}), which this reader does not support",
                    DType::ggml_name(ty)
                ),
            })?;
            raw.push((name, dims, dtype, offset));
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = b.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, dtype, offset) in raw {
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= file_len.saturating_mul(8))
                .ok_or_else(|| FormatError::Tensor {
                    name: name.clone(),
                    what: format!("dimensions {dims:?} are larger than the file could hold"),
                })?;
            let be = dtype.block_elems() as u64;
            if dims[0] % be != 0 {
                return Err(FormatError::Tensor {
                    name,
                    what: format!(
                        "row length {} is not a multiple of the {dtype} block size {be}",
                        dims[0]
                    ),
                });
            }
            let size = numel / be * dtype.block_bytes() as u64;
            if offset % alignment != 0 {
                return Err(FormatError::Tensor {
                    name,
                    what: format!("data offset {offset} is not aligned to {alignment}"),
                });
            }
            let start = data_offset.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(size));
            match end {
                Some(e) if e <= file_len => {}
                _ => {
                    return Err(FormatError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("tensor {name} ({dtype} {dims:?})"),
                        needed: data_offset.saturating_add(offset).saturating_add(size),
                        len: file_len,
                    })
                }
            }
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset: data_offset + offset,
                size,
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            metadata_order,
            tensors,
            alignment,
            data_offset,
            backing,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's data, shape in outermost-first order.
    pub fn tensor(&self, name: &str) -> Result<TensorData> {
        let t = self.tensor_info(name).ok_or_else(|| FormatError::Tensor {
            name: name.to_string(),
            what: format!("is missing from {}", self.path.display()),
        })?;
        self.tensor_from_info(t)
    }

    pub fn tensor_from_info(&self, t: &TensorInfo) -> Result<TensorData> {
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        TensorData::new(
            t.name.clone(),
            t.dtype,
            shape,
            self.backing.clone(),
            t.offset as usize..(t.offset + t.size) as usize,
        )
    }

    pub fn file_size(&self) -> u64 {
        (*self.backing).as_ref().len() as u64
    }
}

/// Tensor data and headers are padded to this many bytes (GGUF's default alignment).
const ALIGNMENT: usize = 32;

/// Builds GGUF v3 files: metadata in insertion order, then tensor infos, then the data,
/// each tensor padded to [`ALIGNMENT`]. Small files (tests) are built in memory with
/// [`tensor`](Self::tensor) and [`to_bytes`](Self::to_bytes); large ones declare their
/// tensors with [`tensor_info`](Self::tensor_info) and stream the data through
/// [`start`](Self::start), one tensor after another, so nothing is held whole in memory.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(String, MetaValue)>,
    tensors: Vec<PlannedTensor>,
}

struct PlannedTensor {
    name: String,
    /// ggml order (innermost first).
    dims: Vec<u64>,
    dtype: DType,
    size: usize,
    /// The bytes, for files built in memory.
    data: Option<Vec<u8>>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a metadata entry.
    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.kv.push((key.to_string(), v));
        self
    }
    /// Sets a metadata entry, moving it to the end if it was there (as ggml's `gguf_set_*`).
    pub fn set_meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.kv.retain(|(k, _)| k != key);
        self.meta(key, v)
    }
    /// Adds a tensor with its bytes; `shape` is outermost first.
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.tensor_info(name, shape, dtype);
        if let Some(t) = self.tensors.last_mut() {
            t.size = data.len();
            t.data = Some(data);
        }
        self
    }
    /// Declares a tensor whose bytes will be streamed later (see [`start`](Self::start)).
    /// Its size follows from `shape` and `dtype`; a row that is not whole blocks counts as
    /// an error when the data is written.
    pub fn tensor_info(&mut self, name: &str, shape: &[usize], dtype: DType) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        let size = dtype
            .row_bytes(*shape.last().unwrap_or(&1))
            .map_or(0, |rb| rb * rows);
        self.tensors.push(PlannedTensor {
            name: name.to_string(),
            dims,
            dtype,
            size,
            data: None,
        });
        self
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend(x.to_le_bytes()),
            MetaValue::I16(x) => out.extend(x.to_le_bytes()),
            MetaValue::U32(x) => out.extend(x.to_le_bytes()),
            MetaValue::I32(x) => out.extend(x.to_le_bytes()),
            MetaValue::U64(x) => out.extend(x.to_le_bytes()),
            MetaValue::I64(x) => out.extend(x.to_le_bytes()),
            MetaValue::F32(x) => out.extend(x.to_le_bytes()),
            MetaValue::F64(x) => out.extend(x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::String(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            MetaValue::Array(a) => {
                let ety = a.first().map(Self::type_id).unwrap_or(4);
                out.extend(ety.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for e in a {
                    Self::put_value(out, e);
                }
            }
        }
    }
    fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// The header: magic, counts, metadata, tensor infos, padded to the data start.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            Self::put_value(&mut out, &MetaValue::String(k.clone()));
            out.extend(Self::type_id(v).to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            Self::put_value(&mut out, &MetaValue::String(t.name.clone()));
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.dtype.ggml_id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += t.size.div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
        out
    }

    /// Writes the header to `out` and returns a stream that takes the tensors' bytes in
    /// the order they were declared.
    pub fn start<W: std::io::Write>(&self, mut out: W) -> std::io::Result<GgufStream<W>> {
        out.write_all(&self.header())?;
        Ok(GgufStream {
            out,
            sizes: self
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.size))
                .collect(),
            current: 0,
            written: 0,
        })
    }

    /// The whole file in memory (every tensor must have been given its bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = self.start(Vec::new()).expect("writing to memory");
        for t in &self.tensors {
            s.write_data(t.data.as_deref().unwrap_or_default())
                .expect("tensor sizes were declared with their data");
        }
        s.finish().expect("every tensor was written")
    }
}

/// The data section of a GGUF file being written: tensors' bytes in declaration order, in
/// pieces of any size; padding is added as each tensor completes.
pub struct GgufStream<W: std::io::Write> {
    out: W,
    sizes: Vec<(String, usize)>,
    current: usize,
    written: usize,
}

impl<W: std::io::Write> GgufStream<W> {
    /// Appends bytes of the current tensor (a tensor may come in several pieces).
    pub fn write_data(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        if bytes.is_empty() && self.current < self.sizes.len() && self.sizes[self.current].1 == 0 {
            return self.end_tensor();
        }
        while !bytes.is_empty() {
            let Some((name, size)) = self.sizes.get(self.current) else {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "more tensor data than the GGUF header declared",
                ));
            };
            let take = (size - self.written).min(bytes.len());
            if take == 0 {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("tensor {name} declared with no data"),
                ));
            }
            self.out.write_all(&bytes[..take])?;
            self.written += take;
            bytes = &bytes[take..];
            if self.written == *size {
                self.end_tensor()?;
            }
        }
        Ok(())
    }

    fn end_tensor(&mut self) -> std::io::Result<()> {
        let size = self.sizes[self.current].1;
        let pad = size.div_ceil(ALIGNMENT) * ALIGNMENT - size;
        self.out.write_all(&[0u8; ALIGNMENT][..pad])?;
        self.current += 1;
        self.written = 0;
        Ok(())
    }

    /// Checks that every declared tensor was written, flushes, and hands back the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.current != self.sizes.len() {
            let name = &self.sizes[self.current].0;
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("tensor {name} and those after it were not written"),
            ));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}
