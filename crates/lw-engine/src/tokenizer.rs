//! The model's tokenizer: a Hugging Face `tokenizer.json` (with its special
//! tokens and chat template from `tokenizer_config.json`) or a GGUF file's
//! vocabulary (`vocab`); and a streaming decoder that turns tokens into text
//! deltas without ever splitting a UTF-8 character.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value;

use crate::error::EngineError;
use crate::template::ChatTemplate;
use crate::vocab::Vocab;

pub struct Tokenizer {
    inner: Inner,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
}

/// Who turns text into ids.
enum Inner {
    Hf(Box<Hf>),
    Gguf(Box<Vocab>),
}

/// A Hugging Face tokenizer.
struct Hf {
    tokenizer: tokenizers::Tokenizer,
    /// The same, reading special-token text as plain text (made when first
    /// asked for).
    plain: OnceLock<tokenizers::Tokenizer>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| EngineError::file(&cfg_path, e.to_string()))?;
            serde_json::from_str(&text)
                .map_err(|e| EngineError::file(&cfg_path, format!("invalid JSON: {e}")))?
        } else {
            Value::Null
        };
        let path = dir.join("tokenizer.json");
        let tiktoken = dir.join("tokenizer.model");
        let inner = if path.exists() {
            tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| EngineError::file(&path, e.to_string()))?
        } else if crate::tiktoken::is_tiktoken(&tiktoken) {
            // The original GLM-4 checkpoints: a tiktoken rank file, with the
            // special tokens in tokenizer_config.json or GLM-4's own.
            let specials = added_tokens(&cfg);
            let mut t = crate::tiktoken::load(&tiktoken, &specials)?;
            if specials.is_empty() {
                let glm: Vec<tokenizers::AddedToken> = crate::tiktoken::GLM4_SPECIALS
                    .iter()
                    .map(|s| tokenizers::AddedToken::from(s.to_string(), true))
                    .collect();
                t.add_special_tokens(glm)
                    .map_err(|e| EngineError::file(&tiktoken, e.to_string()))?;
            }
            t
        } else {
            return Err(EngineError::file(
                &path,
                "file not found (nor a tiktoken tokenizer.model)",
            ));
        };
        let bos_token = special_token(&cfg, "bos_token");
        let eos_token = special_token(&cfg, "eos_token");
        let template_source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let template_source = match template_source {
            Some(s) => Some(s),
            // Newer checkpoints keep the template in its own file.
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let chat_template = template_source
            .map(|src| {
                ChatTemplate::new(
                    &src,
                    bos_token.as_deref().unwrap_or(""),
                    eos_token.as_deref().unwrap_or(""),
                )
                .map_err(|e| EngineError::file(&cfg_path, e.to_string()))
            })
            .transpose()?;
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(Hf {
                tokenizer: inner,
                plain: OnceLock::new(),
            })),
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// The tokenizer of a GGUF file's vocabulary (no chat template yet).
    pub fn from_vocab(vocab: Vocab) -> Self {
        let name = |id: Option<u32>| id.and_then(|i| vocab.token(i)).map(str::to_string);
        Tokenizer {
            bos_token: name(vocab.bos()),
            eos_token: name(vocab.eos()),
            inner: Inner::Gguf(Box::new(vocab)),
            chat_template: None,
        }
    }

    /// Replaces the chat template (a built-in chat format).
    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// Entries in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(hf) => hf.tokenizer.get_vocab_size(true),
            Inner::Gguf(v) => v.len(),
        }
    }

    /// Encodes text; `add_special_tokens` adds what the tokenizer puts around
    /// a text (a BOS for Llama-style tokenizers). Special-token text in
    /// `text` becomes those tokens: chat prompts carry theirs.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        self.encode_with(text, add_special_tokens, true)
    }

    /// `encode`, with `parse_special` false reading special-token text such
    /// as `<|im_start|>` as plain text.
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let tokenizer = match &self.inner {
            Inner::Gguf(v) => return v.encode(text, add_special_tokens, parse_special),
            Inner::Hf(hf) if parse_special => &hf.tokenizer,
            Inner::Hf(hf) => hf.plain.get_or_init(|| {
                let mut t = hf.tokenizer.clone();
                t.set_encode_special_tokens(true);
                t
            }),
        };
        let enc = tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.decode_with(ids, false)
    }

    /// Decodes ids; special tokens are written out when `keep_special`.
    pub fn decode_with(&self, ids: &[u32], keep_special: bool) -> Result<String, EngineError> {
        match &self.inner {
            Inner::Hf(hf) => hf
                .tokenizer
                .decode(ids, !keep_special)
                .map_err(|e| EngineError::Tokenizer(e.to_string())),
            Inner::Gguf(v) => v.decode(ids, keep_special),
        }
    }

    /// What one token stands for in text (special tokens as their text).
    pub fn piece(&self, id: u32) -> Result<String, EngineError> {
        match &self.inner {
            Inner::Hf(_) => self.decode_with(&[id], true),
            Inner::Gguf(v) => v.piece(id),
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(hf) => hf.tokenizer.token_to_id(token),
            Inner::Gguf(v) => v.id(token),
        }
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Ids besides EOS that end a generation: a GGUF vocabulary's
    /// end-of-turn and end-of-message tokens (`tokenizer.ggml.eot_token_id`,
    /// `eom_token_id`).
    pub fn stop_ids(&self) -> &[u32] {
        match &self.inner {
            Inner::Hf(_) => &[],
            Inner::Gguf(v) => v.stop_ids(),
        }
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Whether both map the same strings to the same ids (added tokens
    /// included).
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        match (&self.inner, &other.inner) {
            (Inner::Gguf(a), Inner::Gguf(b)) => a.token_ids() == b.token_ids(),
            _ => self.token_ids() == other.token_ids(),
        }
    }

    fn token_ids(&self) -> std::collections::HashMap<String, u32> {
        match &self.inner {
            Inner::Hf(hf) => hf.tokenizer.get_vocab(true),
            Inner::Gguf(v) => v.token_ids().clone(),
        }
    }

    /// What each id below [`Tokenizer::id_bound`] stands for, for
    /// structured decoding: its bytes, or its text when it is special (or
    /// stands for no text).
    pub fn token_texts(&self) -> Vec<crate::grammar::TokenText> {
        use crate::grammar::TokenText;
        let bound = self.id_bound() as u32;
        match &self.inner {
            Inner::Gguf(v) => (0..bound)
                .map(|id| match v.token_bytes(id) {
                    Some(b) => TokenText::Bytes(b),
                    None => TokenText::Special(format!("<[{id}]>")),
                })
                .collect(),
            Inner::Hf(hf) => {
                let t = &hf.tokenizer;
                let special: std::collections::HashSet<u32> = t
                    .get_added_tokens_decoder()
                    .iter()
                    .filter(|(_, a)| a.special)
                    .map(|(&id, _)| id)
                    .collect();
                let byte_level =
                    serde_json::to_string(&t.get_decoder()).is_ok_and(|d| d.contains("ByteLevel"));
                (0..bound)
                    .map(|id| match t.id_to_token(id) {
                        Some(text) if !special.contains(&id) => {
                            let bytes = if byte_level {
                                crate::vocab::byte_level_bytes(&text)
                            } else if let Some(b) = crate::vocab::byte_token(&text) {
                                vec![b]
                            } else {
                                text.replace('▁', " ").into_bytes()
                            };
                            if bytes.is_empty() {
                                TokenText::Special(format!("<[{id}]>"))
                            } else {
                                TokenText::Bytes(bytes)
                            }
                        }
                        Some(text) => TokenText::Special(text),
                        None => TokenText::Special(format!("<[{id}]>")),
                    })
                    .collect()
            }
        }
    }

    /// The largest id the tokenizer can produce, plus one.
    pub fn id_bound(&self) -> usize {
        let tokenizer = match &self.inner {
            Inner::Hf(hf) => &hf.tokenizer,
            Inner::Gguf(v) => return v.id_bound(),
        };
        let added = tokenizer.get_added_tokens_decoder();
        let max_added = added.keys().max().map(|&m| m as usize + 1).unwrap_or(0);
        tokenizer.get_vocab_size(false).max(max_added)
    }
}

/// `added_tokens_decoder` of tokenizer_config.json: (id, token) pairs.
fn added_tokens(cfg: &Value) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = cfg
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(id, t)| {
                    Some((id.parse().ok()?, t.get("content")?.as_str()?.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `bos_token` may be a string or an `AddedToken` object with `content`.
fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Turns a growing list of token ids into text deltas. A delta is only
/// released once it is complete: a token that ends in the middle of a
/// multi-byte character (the decoder yields U+FFFD for it) is held back until
/// a later token completes it. Each step decodes a short window that starts a
/// few tokens back (so decoders that treat the first token specially, such as
/// SentencePiece's leading space, see context), which keeps it O(1) per token.
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens before this index have been released as text.
    read: usize,
    /// All text released so far.
    emitted: String,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            emitted: String::new(),
        }
    }

    /// Adds one token; the new complete text, if any, is appended to `out`
    /// (returns whether there was some).
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        out: &mut String,
    ) -> Result<bool, EngineError> {
        self.ids.push(id);
        self.release(tok, false, out)
    }

    /// Releases text still held for an incomplete character (as U+FFFD, like
    /// a full decode) into `out`: the generation ended in the middle of one.
    pub fn finish(&mut self, tok: &Tokenizer, out: &mut String) -> Result<bool, EngineError> {
        if self.read == self.ids.len() {
            return Ok(false);
        }
        self.release(tok, true, out)
    }

    /// Decodes the window and releases what is new past the text already
    /// released; unless `force`, text ending in an incomplete character waits.
    fn release(
        &mut self,
        tok: &Tokenizer,
        force: bool,
        out: &mut String,
    ) -> Result<bool, EngineError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if (!force && now.ends_with('\u{FFFD}')) || now.len() <= before.len() {
            return Ok(false);
        }
        let mut cut = before.len();
        while !now.is_char_boundary(cut) {
            cut += 1;
        }
        let delta = &now[cut..];
        self.prefix = self.read;
        self.read = self.ids.len();
        self.emitted.push_str(delta);
        out.push_str(delta);
        Ok(true)
    }

    /// Text released so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}
