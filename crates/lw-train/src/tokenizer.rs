//! `longwriter tokenizer train`: a byte-level BPE vocabulary learned from
//! text files (or the `text` fields of JSONL files) with the `tokenizers`
//! crate's trainer. Every byte is in the
//! base alphabet, so any text (Chinese, emoji, code) encodes and decodes
//! back exactly. The special tokens come first (ids 0, 1, 2, …) and the chat
//! template is ChatML, which the special tokens spell.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{file_error, TrainError};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerBuilder,
};

/// What to train.
#[derive(Debug, Clone)]
pub struct TokenizerSpec {
    /// Entries in the vocabulary, special tokens and the 256 bytes included.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
    /// Special tokens, in id order. The first is the end-of-text (padding)
    /// token; the template uses `<|im_start|>` and `<|im_end|>`.
    pub special_tokens: Vec<String>,
    /// `model_max_length` written to tokenizer_config.json.
    pub max_length: usize,
}

impl Default for TokenizerSpec {
    fn default() -> Self {
        TokenizerSpec {
            vocab_size: 8192,
            min_frequency: 2,
            special_tokens: vec![
                "<|endoftext|>".into(),
                "<|im_start|>".into(),
                "<|im_end|>".into(),
            ],
            max_length: 32768,
        }
    }
}

/// ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message, and
/// `<|im_start|>assistant\n` to ask for an answer.
pub const CHAT_TEMPLATE: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

/// Trains on `files` and writes `out/tokenizer.json` and
/// `out/tokenizer_config.json`. Returns the vocabulary size reached (smaller
/// than asked when the text has too few distinct pairs).
pub fn train_tokenizer(
    files: &[PathBuf],
    spec: &TokenizerSpec,
    out: &Path,
) -> Result<usize, TrainError> {
    if files.is_empty() {
        return Err(TrainError::NoFiles);
    }
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| file_error(f, e))?;
        if !meta.is_file() {
            return Err(file_error(f, "not a file"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for s in &spec.special_tokens {
        if !seen.insert(s) {
            return Err(TrainError::DuplicateSpecial(s.clone()));
        }
    }
    let needed = 256 + spec.special_tokens.len();
    if spec.vocab_size < needed {
        return Err(TrainError::VocabTooSmall {
            asked: spec.vocab_size,
            special: spec.special_tokens.len(),
            needed,
        });
    }
    let specials: Vec<AddedToken> = spec
        .special_tokens
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(spec.vocab_size)
        .min_frequency(spec.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default().into())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(ByteLevel::default().trim_offsets(false).into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| TrainError::Train(e.to_string()))?;
    // The same documents `data tokenize` sees: a JSONL file's "text" fields,
    // not its JSON syntax.
    let mut docs = Vec::new();
    for f in files {
        docs.extend(crate::shards::documents(f)?);
    }
    tokenizer
        .train(&mut trainer, docs.iter())
        .map_err(|e| TrainError::Train(e.to_string()))?;
    std::fs::create_dir_all(out).map_err(|e| file_error(out, e))?;
    let tok_path = out.join("tokenizer.json");
    tokenizer
        .save(&tok_path, true)
        .map_err(|e| file_error(&tok_path, e))?;
    let vocab = tokenizer.get_vocab_size(true);
    let mut added = Map::new();
    for s in &spec.special_tokens {
        let id = tokenizer
            .token_to_id(s)
            .ok_or_else(|| TrainError::Train(format!("special token {s} has no id")))?;
        added.insert(
            id.to_string(),
            json!({"content": s, "lstrip": false, "rstrip": false, "normalized": false, "single_word": false, "special": true}),
        );
    }
    let eos = if spec.special_tokens.iter().any(|s| s == "<|im_end|>") {
        "<|im_end|>".to_string()
    } else {
        spec.special_tokens.first().cloned().unwrap_or_default()
    };
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": Value::Null,
        "eos_token": eos,
        "pad_token": spec.special_tokens.first(),
        "model_max_length": spec.max_length,
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    });
    let cfg_path = out.join("tokenizer_config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).expect("json"))
        .map_err(|e| file_error(&cfg_path, e))?;
    Ok(vocab)
}
