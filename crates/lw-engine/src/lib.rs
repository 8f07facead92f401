//! The local LLM engine: resolves a model (local directory or hub download),
//! loads its tokenizer and chat template, samples, and runs the generation
//! loop with KV-cache reuse across requests.
//!
//! It speaks tokens and text; it knows nothing of HTTP or writing runs.

pub mod batch;
mod decode;
mod engine;
pub mod error;
pub mod gbnf;
pub mod gguf;
pub mod grammar;
mod model;
pub mod pre_tokenizer;
pub mod sampler;
pub mod sequence;
pub mod source;
pub mod speculative;
pub mod spm;
mod stop;
pub mod template;
pub mod tiktoken;
pub mod tokenizer;
pub mod vocab;

pub use batch::{BatchEvent, BatchOptions, Batcher, Busy};
pub use decode::Generation;
pub use engine::Engine;
pub use error::EngineError;
pub use grammar::{Grammars, Guide, TokenText};
pub use model::{available_memory, LoadOptions, Model};
pub use sampler::Sampler;
pub use sequence::Sequence;
pub use source::{
    load_tokenizer, resolve_model, resolve_model_or_tiny, shipped_tiny, DEFAULT_MODEL, TINY_NAMES,
};
pub use speculative::Speculation;
pub use stop::StopMatcher;
pub use template::{ChatFormat, ChatTemplate, TemplateInputs};
pub use tokenizer::{StreamDecoder, Tokenizer};
