//! Training on the engine's model code: byte-level BPE tokenizers, token
//! shards, pretraining from scratch and supervised fine-tuning (full or LoRA)
//! with checkpoints in the Hugging Face layout the engine loads.

pub mod attention;
pub mod data;
pub mod error;
pub mod gemm;
pub mod lora;
pub mod model;
pub mod ops;
pub mod presets;
pub mod shards;
mod storage;
pub mod tokenizer;
pub mod train;

pub use data::{
    read_conversations, tokenize_conversation, LossMode, PackStats, PretrainData, SftData,
    Tokenized,
};
pub use error::TrainError;
pub use model::{Batch, LoraSpec, Rng, TrainModel};
pub use shards::{tokenize_corpus, write_shard, CorpusSummary, Shard};
pub use tokenizer::{train_tokenizer, TokenizerSpec};
pub use train::{
    gradients, train, BatchSource, OptimSpec, StepLog, TrainEvent, TrainSpec, TrainSummary,
};
