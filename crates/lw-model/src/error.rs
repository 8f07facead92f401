//! Typed errors of model loading and the forward pass. Each names the file,
//! tensor or limit it is about.

use std::path::{Path, PathBuf};

use crate::qtype::QType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid model config: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor \"{name}\" not found in {files}")]
    MissingTensor { name: String, files: String },
    #[error("tensor \"{name}\" in {} has shape {actual:?}, expected {expected:?}", path.display())]
    Shape {
        name: String,
        path: PathBuf,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor \"{name}\" in {} has dtype {dtype}, which is not supported (use f32, f16 or bf16)", path.display())]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error("the context is full: {needed} positions needed, the model's context holds {limit}")]
    ContextFull { needed: usize, limit: usize },
    #[error("a {format} KV cache needs a head size that is a multiple of 32; this model's heads hold {head_dim} numbers (use --kv-cache f16)")]
    KvFormat {
        format: &'static str,
        head_dim: usize,
    },
    #[error("token id {id} is outside the model's vocabulary of {vocab} entries")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error(transparent)]
    Gguf(#[from] FileError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What is wrong with a GGUF file (the caller adds the path).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file (the first four bytes are not \"GGUF\")")]
    Magic,
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    Version(u32),
    #[error("truncated: {what} at byte {offset} runs past the end of the file ({len} bytes)")]
    Truncated {
        what: String,
        offset: usize,
        len: usize,
    },
    #[error("metadata \"{key}\": unknown value type {ty}")]
    ValueType { key: String, ty: u32 },
    #[error("metadata \"{key}\": arrays nested deeper than {max} levels")]
    Nesting { key: String, max: usize },
    #[error("{what} is not valid UTF-8")]
    Utf8 { what: String },
    #[error("metadata \"{key}\" is {found}, expected {expected}")]
    MetadataType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("architecture \"{name}\" is not supported (supported: {supported})")]
    Architecture { name: String, supported: String },
    #[error("metadata \"{key}\": {reason}")]
    Metadata { key: String, reason: String },
    #[error("metadata \"{0}\" is missing")]
    MissingKey(String),
    #[error("general.alignment is {0}; it must be a power of two")]
    Alignment(u64),
    #[error("tensor \"{name}\": unknown tensor type {ty}")]
    UnknownType { name: String, ty: u32 },
    #[error(
        "tensor \"{name}\" has type {ty}, which is not supported (supported: {})",
        QType::supported()
    )]
    UnsupportedType { name: String, ty: &'static str },
    #[error("tensor \"{name}\": {reason}")]
    TensorShape { name: String, reason: String },
    #[error("tensor \"{name}\": its {size} bytes at offset {offset} run past the end of the file ({len} bytes)")]
    TensorBounds {
        name: String,
        offset: u64,
        size: usize,
        len: usize,
    },
    #[error("tensor \"{name}\": offset {offset} is not a multiple of the alignment {alignment}")]
    TensorAlignment {
        name: String,
        offset: u64,
        alignment: usize,
    },
    #[error("tensor \"{0}\" appears twice")]
    DuplicateTensor(String),
}

/// A GGUF error with the file it is about.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    pub source: GgufError,
}
