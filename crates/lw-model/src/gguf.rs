//! GGUF files, read and written.
//!
//! The reader parses a memory-mapped file without trusting any count or
//! length in it: every string, array and tensor is checked against the bytes
//! that are actually there before anything is allocated, so a truncated or
//! hostile file is an error that names what is wrong, never a panic or a huge
//! allocation. Tensor data is not copied: a tensor is a byte range of the map.
//!
//! Layout (version 2 and 3): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, the metadata (key string, value type u32, value), the
//! tensor infos (name, dimension count u32, dimensions u64 innermost first,
//! type u32, offset u64 from the start of the data), padding to
//! `general.alignment` (32 by default), then the data.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::error::{FileError, GgufError};
use crate::mmap::Bytes;
use crate::qtype::QType;

const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Arrays inside arrays are legal; nesting deeper than this is not a model.
const MAX_DEPTH: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer type, if its value is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as PyTorch orders them (outermost first): a weight matrix
    /// of `out` rows and `in` columns is `[out, in]`.
    pub shape: Vec<usize>,
    pub qtype: QType,
    /// Byte range of the data within the file.
    pub start: usize,
    pub size: usize,
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(GgufError::MetadataType {
                key: key.into(),
                expected: "a string",
                found: v.type_name(),
            }),
        }
    }

    pub fn uint(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or(GgufError::MetadataType {
                key: key.into(),
                expected: "a non-negative integer",
                found: v.type_name(),
            }),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(GgufError::MetadataType {
                key: key.into(),
                expected: "a bool",
                found: v.type_name(),
            }),
        }
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(GgufError::MetadataType {
                key: key.into(),
                expected: "a number",
                found: v.type_name(),
            }),
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&[Value]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(GgufError::MetadataType {
                key: key.into(),
                expected: "an array",
                found: v.type_name(),
            }),
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(GgufError::MetadataType {
                    key: key.into(),
                    expected: "an array of strings",
                    found: v.type_name(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn require<T>(&self, key: &str, v: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
        v?.ok_or_else(|| GgufError::MissingKey(key.into()))
    }
}

/// Reads little-endian values from a byte slice, every read bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(GgufError::Truncated {
                what: what(),
                offset: self.pos,
                len: self.bytes.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, || what.to_string())?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let s = self.take(len, || what.to_string())?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::Utf8 { what: what.into() })
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<Value, GgufError> {
        let what = || format!("the value of \"{key}\"");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what())?[0]),
            1 => Value::I8(self.array::<1>(&what())?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => Value::Bool(self.array::<1>(&what())?[0] != 0),
            8 => Value::String(self.string(&what())?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(GgufError::Nesting {
                        key: key.into(),
                        max: MAX_DEPTH,
                    });
                }
                let elem = self.u32(&what())?;
                let count = self.u64(&what())?;
                // Every element takes at least one byte: a count beyond the
                // bytes left is a truncated file, found before allocating.
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                if count > self.remaining() {
                    return Err(GgufError::Truncated {
                        what: format!("the {count} elements of \"{key}\""),
                        offset: self.pos,
                        len: self.bytes.len(),
                    });
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(key, elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            ty => {
                return Err(GgufError::ValueType {
                    key: key.into(),
                    ty,
                })
            }
        })
    }
}

/// Parses the header of a GGUF file held in `bytes` and checks that every
/// tensor's data lies within it.
pub fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    if c.take(4, || "the magic".into())
        .map_err(|_| GgufError::Magic)?
        != MAGIC
    {
        return Err(GgufError::Magic);
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_meta = c.u64("the metadata count")?;
    let mut metadata = Vec::new();
    for i in 0..n_meta {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&format!("the type of \"{key}\""))?;
        let value = c.value(&key, ty, 0)?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT as u64,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
            Some(a) => return Err(GgufError::Alignment(a)),
            None => {
                return Err(GgufError::MetadataType {
                    key: "general.alignment".into(),
                    expected: "an integer",
                    found: v.type_name(),
                })
            }
        },
    } as usize;
    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: u32,
        offset: u64,
    }
    let mut raws = Vec::new();
    let mut seen = HashMap::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("the name of tensor {i}"))?;
        let what = format!("the info of tensor \"{name}\"");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(GgufError::TensorShape {
                name,
                reason: format!("{n_dims} dimensions (1 to 4 are allowed)"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty = c.u32(&what)?;
        let offset = c.u64(&what)?;
        if seen.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        raws.push(Raw {
            name,
            dims,
            ty,
            offset,
        });
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raws.len());
    for r in raws {
        let qtype = match QType::from_ggml(r.ty) {
            Some(Ok(q)) => q,
            Some(Err(ty)) => return Err(GgufError::UnsupportedType { name: r.name, ty }),
            None => {
                return Err(GgufError::UnknownType {
                    name: r.name,
                    ty: r.ty,
                })
            }
        };
        let mut elems: u64 = 1;
        for &d in &r.dims {
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= 1 << 40)
                .ok_or_else(|| GgufError::TensorShape {
                    name: r.name.clone(),
                    reason: format!("dimensions {:?} are too large", r.dims),
                })?;
        }
        if elems == 0 {
            return Err(GgufError::TensorShape {
                name: r.name,
                reason: format!("dimensions {:?} hold no elements", r.dims),
            });
        }
        let row = r.dims[0] as usize;
        if !row.is_multiple_of(qtype.block_elems()) {
            return Err(GgufError::TensorShape {
                name: r.name,
                reason: format!(
                    "rows of {row} elements are not whole blocks of {} ({})",
                    qtype.block_elems(),
                    qtype.name()
                ),
            });
        }
        let size = elems as usize / qtype.block_elems() * qtype.block_bytes();
        if r.offset % alignment as u64 != 0 {
            return Err(GgufError::TensorAlignment {
                name: r.name,
                offset: r.offset,
                alignment,
            });
        }
        let start = (data_start as u64).checked_add(r.offset);
        let end = start.and_then(|s| s.checked_add(size as u64));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => tensors.push(TensorInfo {
                name: r.name,
                shape: r.dims.iter().rev().map(|&d| d as usize).collect(),
                qtype,
                start: s as usize,
                size,
            }),
            _ => {
                return Err(GgufError::TensorBounds {
                    name: r.name,
                    offset: r.offset,
                    size,
                    len: bytes.len(),
                })
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
    })
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    header: Header,
    index: HashMap<String, usize>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, crate::ModelError> {
        let file = std::fs::File::open(path).map_err(|e| crate::ModelError::io(path, e))?;
        // SAFETY: mapped read-only; like every mmap-based loader we rely on
        // nobody truncating the file while it is in use.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::ModelError::io(path, e))?;
        let len = map.len();
        Self::with_map(path, map, len)
    }

    /// The file whose first `len` bytes `map` holds.
    fn with_map(path: &Path, map: memmap2::Mmap, len: usize) -> Result<Self, crate::ModelError> {
        let header = parse(&map[..len]).map_err(|source| {
            crate::ModelError::Gguf(FileError {
                path: path.to_path_buf(),
                source,
            })
        })?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            map: Arc::new(map),
            header,
            index,
        })
    }

    /// A GGUF file held in memory (`label` names it in errors): the bytes
    /// are copied into an anonymous map, so tensors are read as from a file.
    pub fn from_bytes(label: &Path, bytes: &[u8]) -> Result<Self, crate::ModelError> {
        let io = |e| crate::ModelError::io(label, e);
        let mut anon = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(io)?;
        anon[..bytes.len()].copy_from_slice(bytes);
        Self::with_map(label, anon.make_read_only().map_err(io)?, bytes.len())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The data of a tensor, shared with the map (no copy).
    pub fn data(&self, info: &TensorInfo) -> Bytes {
        Bytes::Mapped {
            map: self.map.clone(),
            start: info.start,
            len: info.size,
        }
    }

    /// Wraps a metadata error with this file's path.
    pub fn err(&self, source: GgufError) -> crate::ModelError {
        crate::ModelError::Gguf(FileError {
            path: self.path.clone(),
            source,
        })
    }
}

/// A tensor to write: its name, PyTorch-order shape, type and encoded data.
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub qtype: QType,
    pub data: Vec<u8>,
}

fn put_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::String(s) => put_string(w, s),
        Value::Array(items) => {
            // An empty array still needs an element type; u8 is as good as any.
            let elem = items.first().map_or(0, Value::type_id);
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| put_value(w, i))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Writes a version-3 GGUF file with the default alignment.
pub fn write(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[OutTensor],
) -> std::io::Result<()> {
    let mut pos = 0usize;
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut head, k)?;
        head.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut head, v)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_string(&mut head, &t.name)?;
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.qtype.ggml_id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    w.write_all(&head)?;
    pos += head.len();
    let pad = pos.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - pos;
    w.write_all(&vec![0u8; pad])?;
    for t in tensors {
        w.write_all(&t.data)?;
        let pad = t.data.len().div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - t.data.len();
        w.write_all(&vec![0u8; pad])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ];
        let tensors = vec![
            OutTensor {
                name: "w".into(),
                shape: vec![2, 3],
                qtype: QType::F32,
                data: (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect(),
            },
            OutTensor {
                name: "v".into(),
                shape: vec![5],
                qtype: QType::F16,
                data: vec![0; 10],
            },
        ];
        let mut out = Vec::new();
        write(&mut out, &meta, &tensors).unwrap();
        out
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.string("general.architecture").unwrap(), Some("llama"));
        assert_eq!(h.uint("llama.block_count").unwrap(), Some(2));
        assert_eq!(
            h.strings("tokenizer.ggml.tokens").unwrap().unwrap(),
            ["a", "b"]
        );
        assert_eq!(h.tensors[0].shape, [2, 3]);
        assert_eq!(h.tensors[1].shape, [5]);
        let w = &h.tensors[0];
        assert_eq!(w.start % DEFAULT_ALIGNMENT, 0);
        let v: Vec<f32> = bytes[w.start..w.start + w.size]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(matches!(
            h.uint("general.architecture"),
            Err(GgufError::MetadataType { .. })
        ));
    }

    #[test]
    fn a_file_in_memory_reads_as_from_disk() {
        let bytes = sample();
        let file = GgufFile::from_bytes(Path::new("mem.gguf"), &bytes).unwrap();
        assert_eq!(file.header().tensors, parse(&bytes).unwrap().tensors);
        let w = file.tensor("w").unwrap();
        assert_eq!(file.data(w).as_slice(), &bytes[w.start..w.start + w.size]);
        match GgufFile::from_bytes(Path::new("mem.gguf"), &bytes[..10]) {
            Err(err) => assert!(err.to_string().contains("mem.gguf"), "{err}"),
            Ok(_) => panic!("a truncated file in memory was read"),
        }
        assert!(GgufFile::from_bytes(Path::new("empty.gguf"), &[]).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        // Padding after the last tensor's data is optional.
        let full = parse(&bytes).unwrap();
        let end = full.tensors.iter().map(|t| t.start + t.size).max().unwrap();
        assert!(parse(&bytes[..end]).is_ok());
        for n in 0..end {
            if let Ok(h) = parse(&bytes[..n]) {
                panic!("a file cut at {n} of {} bytes parsed: {h:?}", bytes.len());
            }
        }
    }

    /// A file of one tensor named `name` (twice if `twice`) of `shape`,
    /// with `meta` besides.
    fn file_with(meta: Vec<(String, Value)>, shape: Vec<usize>, twice: bool) -> Vec<u8> {
        let one = || OutTensor {
            name: "w".into(),
            shape: shape.clone(),
            qtype: QType::F32,
            data: vec![0; 16],
        };
        let tensors = if twice {
            vec![one(), one()]
        } else {
            vec![one()]
        };
        let mut out = Vec::new();
        write(&mut out, &meta, &tensors).unwrap();
        out
    }

    #[test]
    fn hostile_tensor_infos_are_refused_by_name() {
        let err = |bytes: Vec<u8>| parse(&bytes).unwrap_err().to_string();
        // The product of the dimensions overflows u64.
        let msg = err(file_with(vec![], vec![1 << 40, 1 << 40], false));
        assert!(msg.contains("\"w\"") && msg.contains("too large"), "{msg}");
        // No dimensions, or more than four.
        let msg = err(file_with(vec![], vec![], false));
        assert!(
            msg.contains("\"w\"") && msg.contains("0 dimensions"),
            "{msg}"
        );
        let msg = err(file_with(vec![], vec![1, 1, 1, 1, 4], false));
        assert!(msg.contains("5 dimensions"), "{msg}");
        // The same name twice.
        assert!(matches!(
            parse(&file_with(vec![], vec![4], true)),
            Err(GgufError::DuplicateTensor(n)) if n == "w"
        ));
        // An alignment of 0, or one that is not a power of two.
        for a in [0u32, 3, 48] {
            let meta = vec![("general.alignment".to_string(), Value::U32(a))];
            assert!(
                matches!(parse(&file_with(meta, vec![4], false)), Err(GgufError::Alignment(x)) if x == a as u64),
                "alignment {a}"
            );
        }
        let meta = vec![("general.alignment".to_string(), Value::String("32".into()))];
        assert!(err(file_with(meta, vec![4], false)).contains("general.alignment"));
    }

    #[test]
    fn a_huge_metadata_array_count_is_refused_before_allocating() {
        let meta = vec![(
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(vec![Value::String("a".into())]),
        )];
        let mut bytes = file_with(meta, vec![4], false);
        // magic, version, counts (24 bytes); key length and key; type; the
        // element type; then the element count.
        let at = 24 + 8 + "tokenizer.ggml.tokens".len() + 4 + 4;
        assert_eq!(bytes[at..at + 8], 1u64.to_le_bytes());
        for count in [u64::MAX, 1 << 40] {
            bytes[at..at + 8].copy_from_slice(&count.to_le_bytes());
            let msg = parse(&bytes).unwrap_err().to_string();
            assert!(
                msg.contains("tokenizer.ggml.tokens") && msg.contains("elements"),
                "{msg}"
            );
        }
    }

    #[test]
    fn huge_lengths_are_errors_not_allocations() {
        let mut bytes = sample();
        // The length of the first metadata key.
        bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&bytes), Err(GgufError::Truncated { .. })));
        let mut bytes = sample();
        bytes[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(parse(&bytes).is_err());
    }
}
