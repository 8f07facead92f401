//! Typed errors of model loading and the forward pass. Each names the file,
//! tensor or limit it is about.

use std::path::{Path, PathBuf};

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
    Gguf(#[from] crate::gguf::FileError),
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
