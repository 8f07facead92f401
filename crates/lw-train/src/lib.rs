//! Training. So far: byte-level BPE tokenizers, written as the standard
//! `tokenizer.json` + `tokenizer_config.json` pair every loader reads.

pub mod tokenizer;

pub use tokenizer::{train_tokenizer, TokenizerSpec, TrainError};
