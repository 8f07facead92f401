//! Typed errors of the engine; each names the file, model or limit involved.

use std::path::{Path, PathBuf};

use lw_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}: the model has no chat template (tokenizer_config.json has no `chat_template`); run without --chat for a raw completion")]
    NoChatTemplate(PathBuf),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens, but the model's context holds {limit}; shorten the prompt (at least one position must remain for the answer)")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("the tokenizer ({}) has {tokenizer} entries but the model's embedding ({}) has only {model} rows: they do not belong together", tokenizer_path.display(), config_path.display())]
    VocabMismatch {
        tokenizer_path: PathBuf,
        config_path: PathBuf,
        tokenizer: usize,
        model: usize,
    },
    #[error("the KV cache for {positions} positions ({dtype}) needs {:.2} GB, but only {:.2} GB of memory is available; ask for fewer tokens (--max-tokens), use --kv-cache f16 (or q8_0), or a smaller context", *bytes as f64 / 1e9, *available as f64 / 1e9)]
    KvCacheTooLarge {
        positions: usize,
        bytes: u64,
        available: u64,
        dtype: &'static str,
    },
    #[error("the draft model ({}) does not share the tokenizer of the model ({}): speculative decoding needs the same token ids in both", draft.display(), target.display())]
    DraftTokenizer { draft: PathBuf, target: PathBuf },
    #[error("model \"{model}\" not found: no such file or directory, and not a hub id of the form org/name")]
    ModelNotFound { model: String },
    #[error("could not download \"{model}\" from the Hugging Face hub: {reason}\n  The hub may be unreachable from here. Pass a local model directory instead (--model /path/to/dir with config.json, *.safetensors and tokenizer.json), or use an OpenAI-compatible server (--api-base URL).")]
    Hub { model: String, reason: String },
    #[error("{0}")]
    Grammar(String),
    #[error("a batched decoding step failed: {0}")]
    Step(String),
    #[error("the generation was cancelled")]
    Cancelled,
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineError {
    pub fn file(path: &Path, reason: impl Into<String>) -> Self {
        EngineError::File {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
