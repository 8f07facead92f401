//! Training. So far: byte-level BPE tokenizers, written as the standard
//! `tokenizer.json` + `tokenizer_config.json` pair every loader reads, and
//! corpora tokenized into memory-mapped token shards.

pub mod shards;
pub mod tokenizer;

pub use shards::{tokenize_corpus, write_shard, CorpusSummary, Shard};
pub use tokenizer::{train_tokenizer, TokenizerSpec, TrainError};
