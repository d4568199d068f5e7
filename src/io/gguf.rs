//! GGUF files (llama.cpp's checkpoint format), versions 2 and 3: header,
//! metadata, tensor infos and tensor data, dequantized to host tensors on
//! load. [`llama`] maps a GGUF Llama model to [`crate::model::LlamaWeights`].
//!
//! Layout (all little-endian): magic `GGUF`, u32 version, u64 tensor count,
//! u64 metadata count; metadata entries (string key, u32 value type, value);
//! tensor infos (string name, u32 n_dims, u64 dims innermost first, u32 ggml
//! type, u64 offset relative to the data section); padding to
//! `general.alignment` (default 32); the data section.

pub mod dequant;
pub mod llama;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;

use crate::tensor::{DType, HostTensor};
pub use dequant::GgmlType;

/// Alignment of the data section and of each tensor when the file does not
/// set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// A u8.
    U8(u8),
    /// An i8.
    I8(i8),
    /// A u16.
    U16(u16),
    /// An i16.
    I16(i16),
    /// A u32.
    U32(u32),
    /// An i32.
    I32(i32),
    /// An f32.
    F32(f32),
    /// A bool.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(Vec<GgufValue>),
    /// A u64.
    U64(u64),
    /// An i64.
    I64(i64),
    /// An f64.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// Tensor name (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF lists them: innermost (contiguous) first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub kind: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Dimensions outermost first (row-major, as HF and [`HostTensor`] use).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
}

/// Everything before the data section.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Metadata in key order.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
}

/// A little-endian cursor over the header bytes; every read checks bounds.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!(
                "unexpected end of file reading {n} bytes at offset {} (file has {})",
                self.pos,
                self.bytes.len()
            );
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count that must be satisfiable by the bytes left, at `min_size` bytes each.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            bail!(
                "{what} count {n} at offset {} exceeds the file size",
                self.pos - 8
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let at = self.pos;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .with_context(|| format!("string at offset {at} is not valid UTF-8"))
    }

    fn value(&mut self, kind: u32) -> Result<GgufValue> {
        Ok(match kind {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.array::<1>()?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => self.array_value()?,
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => bail!(
                "unknown metadata value type {other} at offset {}",
                self.pos - 4
            ),
        })
    }

    fn array_value(&mut self) -> Result<GgufValue> {
        let elem = self.u32()?;
        let n = self.count(1, "array length")?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(elem)?);
        }
        Ok(GgufValue::Array(items))
    }

    fn tensor_info(&mut self) -> Result<GgufTensorInfo> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims > 8 {
            bail!("tensor '{name}' claims {n_dims} dimensions");
        }
        let dims = (0..n_dims)
            .map(|_| self.u64())
            .collect::<Result<Vec<_>>>()?;
        let kind = GgmlType::from_id(self.u32()?);
        let offset = self.u64()?;
        Ok(GgufTensorInfo {
            name,
            dims,
            kind,
            offset,
        })
    }
}

impl GgufHeader {
    /// Parses the header from the start of a GGUF file.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor { bytes, pos: 0 };
        if c.take(4)? != b"GGUF" {
            bail!("not a GGUF file (the first four bytes are not 'GGUF')");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (versions 2 and 3 are)");
        }
        let n_tensors = c.count(8, "tensor")?;
        let n_kv = c.count(8, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let kind = c.u32()?;
            let value = c
                .value(kind)
                .with_context(|| format!("metadata key '{key}'"))?;
            metadata.insert(key, value);
        }
        let tensors = (0..n_tensors)
            .map(|_| c.tensor_info())
            .collect::<Result<Vec<_>>>()?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .context("general.alignment must be a power of two")?,
        };
        let data_offset = (c.pos as u64).next_multiple_of(alignment);
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// The parsed header.
    pub header: GgufHeader,
}

impl GgufFile {
    /// Maps and parses `path`; a malformed header is reported as a corrupt file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only map; checkpoints are not modified while loaded.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let header = GgufHeader::parse(&mmap).with_context(|| {
            format!(
                "{} is truncated or corrupt GGUF; re-download it",
                path.display()
            )
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            header,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored bytes of one tensor, bounds-checked against the file.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let len = info.kind.byte_size(info.numel()).with_context(|| {
            format!(
                "{}: tensor '{}' has ggml type {}, which quantbench cannot read (supported: {})",
                self.path.display(),
                info.name,
                info.kind,
                GgmlType::SUPPORTED
            )
        })?;
        let range = self
            .header
            .data_offset
            .checked_add(info.offset)
            .and_then(|s| Some((s, s.checked_add(len as u64)?)))
            .filter(|&(_, e)| e <= self.mmap.len() as u64);
        let Some((start, end)) = range else {
            bail!(
                "{} is truncated or corrupt: tensor '{}' (offset {}, {len} bytes) lies past the end of the {}-byte file; re-download it",
                self.path.display(),
                info.name,
                info.offset,
                self.mmap.len()
            );
        };
        Ok(&self.mmap[start as usize..end as usize])
    }

    /// Reads one tensor as a host tensor (dims reversed to outermost first).
    /// F16 and BF16 keep their dtype; quantized types are dequantized to F32.
    pub fn read_tensor(&self, info: &GgufTensorInfo) -> Result<HostTensor> {
        let bytes = self.tensor_bytes(info)?;
        let data = dequant::dequantize(info.kind, bytes, info.numel())
            .with_context(|| format!("{}: tensor '{}'", self.path.display(), info.name))?;
        let dtype = match info.kind {
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        HostTensor::new(info.shape(), dtype, data)
    }
}
