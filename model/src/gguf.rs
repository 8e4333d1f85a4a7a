//! GGUF v2/v3 reader over a memory map.
//!
//! Every length, count and offset read from the file is checked against the bytes that are
//! actually there before anything is allocated or sliced, so a truncated or hostile file gives
//! [`ModelError::GgufParse`] with the byte offset, never a panic or an out-of-bounds read.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// No real model has tensors of more than four dimensions; anything larger is corruption.
const TENSOR_DIMS_MAX: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 32-bit float.
    F32(f32),
    /// 64-bit float.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first (GGML order: `dims[0]` is the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata, tensor table and the mapped bytes.
#[derive(Debug)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata, keyed by name.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    /// The whole file, mapped read-only and shared with the weights that borrow from it.
    pub mmap: Arc<Mmap>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::GgufParse {
            offset: self.pos as u64,
            reason: reason.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            return Err(self.err(format!(
                "file truncated: {what} needs {n} bytes but only {remaining} remain"
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let start = self.pos;
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .map_err(|_| self.err(format!("{what}: length {len} too large")))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| ModelError::GgufParse {
            offset: start as u64,
            reason: format!("{what} is not valid UTF-8: {e}"),
        })
    }
    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("{key}: invalid bool byte {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(self.err(format!("{key}: nested arrays are not supported")));
                }
                let item_ty = self.u32(key)?;
                let count = self.u64(key)?;
                // Each item takes at least one byte, so a count beyond the remaining bytes is a lie.
                let remaining = (self.bytes.len() - self.pos) as u64;
                if count > remaining {
                    return Err(self.err(format!(
                        "{key}: array of {count} items cannot fit in the {remaining} bytes left (file truncated?)"
                    )));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1, key)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format!("{key}: unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; Arbor never writes model files while they are mapped,
        // and every access is bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(Arc::new(mmap))
    }

    /// Parses GGUF bytes that are already mapped.
    pub fn parse(mmap: Arc<Mmap>) -> Result<Self> {
        let (version, metadata, tensors) = parse_bytes(&mmap)?;
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            mmap,
        })
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset as usize..(info.offset + info.size) as usize]
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| ModelError::metadata(key, "missing"))?
            .as_u64()
            .ok_or_else(|| ModelError::metadata(key, "expected an unsigned integer"))
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .ok_or_else(|| ModelError::metadata(key, "missing"))?
            .as_f64()
            .ok_or_else(|| ModelError::metadata(key, "expected a number"))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| ModelError::metadata(key, "missing"))?
            .as_str()
            .ok_or_else(|| ModelError::metadata(key, "expected a string"))
    }
}

type Parsed = (u32, BTreeMap<String, MetaValue>, Vec<TensorInfo>);

/// Parses the header, metadata and tensor table of GGUF bytes, validating tensor extents.
pub fn parse_bytes(bytes: &[u8]) -> Result<Parsed> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.array::<4>("magic")?;
    if &magic != GGUF_MAGIC {
        return Err(ModelError::GgufParse {
            offset: 0,
            reason: format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
        });
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::GgufParse {
            offset: 4,
            reason: format!("GGUF version {version} is not supported (supported: 2, 3)"),
        });
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    let remaining = (bytes.len() - r.pos) as u64;
    if n_tensors > remaining || n_kv > remaining {
        return Err(r.err(format!(
            "header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold (file truncated?)"
        )));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, 0, &key)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(ModelError::metadata(
                    "general.alignment",
                    format!("{v:?} is not a power of two"),
                ))
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let info_offset = r.pos as u64;
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > TENSOR_DIMS_MAX {
            return Err(ModelError::GgufParse {
                offset: info_offset,
                reason: format!(
                    "tensor `{name}` has {n_dims} dimensions (1..={TENSOR_DIMS_MAX} allowed)"
                ),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let ty_id = r.u32(&name)?;
        let rel_offset = r.u64(&name)?;
        raw.push((info_offset, name, dims, ty_id, rel_offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for (info_offset, name, dims, ty_id, rel_offset) in raw {
        let ty = GgmlType::from_id(ty_id).ok_or_else(|| ModelError::UnsupportedType {
            name: name.clone(),
            ty: format!("ggml type id {ty_id}"),
        })?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| ModelError::GgufParse {
                offset: info_offset,
                reason: format!("tensor `{name}`: dimensions {dims:?} overflow"),
            })?;
        let block = ty.block_elems() as u64;
        if dims[0] % block != 0 {
            return Err(ModelError::tensor(
                &name,
                format!(
                    "row length {} is not a multiple of the {ty:?} block size {block}",
                    dims[0]
                ),
            ));
        }
        let size = n_elements / block * ty.block_bytes() as u64;
        if rel_offset % alignment != 0 {
            return Err(ModelError::tensor(
                &name,
                format!("data offset {rel_offset} is not aligned to {alignment}"),
            ));
        }
        let offset = data_start.checked_add(rel_offset).filter(|o| {
            o.checked_add(size)
                .is_some_and(|end| end <= bytes.len() as u64)
        });
        let Some(offset) = offset else {
            return Err(ModelError::tensor(
                &name,
                format!(
                    "data [{} .. +{size}) lies beyond the end of the file ({} bytes): truncated download?",
                    data_start.saturating_add(rel_offset),
                    bytes.len()
                ),
            ));
        };
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size,
        });
    }
    Ok((version, metadata, tensors))
}
