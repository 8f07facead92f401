//! Typed errors of training: each names the file, line, field or tensor it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}, line {line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("no training files given")]
    NoFiles,
    #[error("a vocabulary of {asked} is too small: the 256 byte tokens and {special} special tokens need {needed}")]
    VocabTooSmall {
        asked: usize,
        special: usize,
        needed: usize,
    },
    #[error("the special token \"{0}\" is given twice")]
    DuplicateSpecial(String),
    #[error("tokenizer training failed: {0}")]
    Train(String),
    #[error("invalid training setting: {0}")]
    Setting(String),
    #[error("the tokenizer in {} has ids up to {tokenizer}, but the model's embedding has {model} rows (vocab_size)", path.display())]
    VocabMismatch {
        path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
    #[error("{0}")]
    Model(#[from] lw_model::ModelError),
    #[error("{0}")]
    Engine(#[from] lw_engine::EngineError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("no usable training data: {0}")]
    NoData(String),
    #[error("the loss is not finite ({loss}) at step {step}")]
    Diverged { step: u64, loss: f32 },
}

pub(crate) fn file_error(path: &Path, e: impl ToString) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
