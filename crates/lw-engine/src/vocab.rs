//! A GGUF file's vocabulary, read as llama.cpp reads it (`tokenizer.ggml.*`):
//! the tokens with their types and scores; the special tokens, split out of
//! the text before the model sees it; SentencePiece (`llama`) or BPE (`gpt2`,
//! `gemma4`) for the text between them; and each token's piece for decoding.
//! The chat template and the engine's end-of-sequence ids are not kept here.

use std::borrow::Cow;
use std::collections::HashMap;

use lw_model::gguf::{GgufFile, Header, Value};

use crate::error::EngineError;
use crate::pre_tokenizer::{self, Bos, PreTokenizer, Spelling};
use crate::spm::Spm;

/// The tokenizer models this engine runs (`tokenizer.ggml.model`).
const MODELS: &str = "llama (SentencePiece), gpt2 (BPE), gemma4 (BPE)";

/// What llama.cpp's token types (`tokenizer.ggml.token_type`) make of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl Kind {
    fn from_type(t: i64) -> Kind {
        match t {
            1 => Kind::Normal,
            2 => Kind::Unknown,
            3 => Kind::Control,
            4 => Kind::UserDefined,
            5 => Kind::Unused,
            6 => Kind::Byte,
            _ => Kind::Undefined,
        }
    }
}

/// A token found in the text before the model runs: control and unknown
/// tokens only when special-token text is parsed, user-defined ones always.
struct Special {
    id: u32,
    /// Whitespace before it goes with it.
    lstrip: bool,
    /// Whitespace after it goes with it.
    rstrip: bool,
}

enum Model {
    Spm(Spm),
    Bpe {
        /// Splits text into words and merges them; it knows no special tokens.
        words: Box<tokenizers::Tokenizer>,
        spelling: Spelling,
        whole_newline_runs: bool,
    },
}

/// A stretch of the text: plain text, or a special token found in it.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

pub struct Vocab {
    tokens: Vec<String>,
    kinds: Vec<Kind>,
    ids: HashMap<String, u32>,
    /// Longest first, the order llama.cpp looks for them in.
    specials: Vec<Special>,
    model: Model,
    /// SentencePiece: a space before text that starts the input or follows
    /// a special token; decoding takes the first one off again.
    add_space_prefix: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// End-of-turn and end-of-message ids (`eot_token_id`, `eom_token_id`).
    stop: Vec<u32>,
}

impl Vocab {
    pub fn from_gguf(file: &GgufFile) -> Result<Vocab, EngineError> {
        let h = file.header();
        let bad = |reason: String| EngineError::file(file.path(), reason);
        // No pre-tokenizer: SentencePiece.
        let pre = pre_tokenizer_of(h).map_err(bad)?;
        let TokenTable {
            tokens,
            kinds,
            scores,
        } = token_table(h).map_err(bad)?;
        let n = tokens.len();
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
        }
        let id_of = |key: &str, default: Option<u32>| -> Result<Option<u32>, EngineError> {
            // An id past the vocabulary falls back to the default, as in llama.cpp.
            Ok(match h.uint(key).map_err(|e| file.err(e))? {
                Some(id) if (id as usize) < n => Some(id as u32),
                _ => default.filter(|&d| (d as usize) < n),
            })
        };
        let spm_default = |id: u32| Some(id).filter(|_| pre.is_none());
        let bos = id_of("tokenizer.ggml.bos_token_id", spm_default(1))?;
        let eos = id_of("tokenizer.ggml.eos_token_id", spm_default(2))?;
        let unknown = id_of("tokenizer.ggml.unknown_token_id", spm_default(0))?;
        let mut stop = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            stop.extend(id_of(key, None)?);
        }
        stop.dedup();
        let flag = |key: &str| match h.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        let asked = flag("tokenizer.ggml.add_bos_token");
        let add_bos = match pre.map(|p| p.bos) {
            None | Some(Bos::UnlessRefused) => asked.unwrap_or(true),
            Some(Bos::IfAsked) => asked.unwrap_or(false),
            Some(Bos::Always) => true,
        };
        let model = match pre {
            None => Model::Spm(Spm::new(scores, &ids, unknown)),
            Some(pre) => bpe_model(h, &ids, pre).map_err(bad)?,
        };
        Ok(Vocab {
            specials: specials(h, &tokens, &kinds, pre),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(pre.is_none()),
            add_bos: add_bos && bos.is_some(),
            add_eos: flag("tokenizer.ggml.add_eos_token").unwrap_or(false) && eos.is_some(),
            tokens,
            kinds,
            ids,
            model,
            bos,
            eos,
            stop,
        })
    }

    /// Entries in the vocabulary.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// One past the last token that is not unused padding: the ids worth
    /// sampling.
    pub fn id_bound(&self) -> usize {
        self.kinds
            .iter()
            .rposition(|&k| k != Kind::Unused)
            .map_or(0, |i| i + 1)
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    /// Every token with its id (the later of two equal tokens wins).
    pub fn token_ids(&self) -> &HashMap<String, u32> {
        &self.ids
    }

    /// The ids of `text`. `add_special` adds BOS and EOS where the
    /// vocabulary asks for them; `parse_special` turns the text of control
    /// tokens (`<|im_start|>`, `<s>`) into those tokens. User-defined tokens
    /// are always found in the text, as llama.cpp does.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut after_special = true;
        for fragment in self.split_specials(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(t) => {
                    self.encode_text(t, after_special, &mut out)?;
                    after_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Text of `ids`; control and unknown tokens are left out unless
    /// `keep_special`. The space a SentencePiece vocabulary puts before the
    /// text is taken off the first token that yields text.
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String, EngineError> {
        let mut bytes = Vec::new();
        let mut strip_space = self.add_space_prefix;
        for &id in ids {
            let start = bytes.len();
            self.push_piece(id, keep_special, &mut bytes)?;
            if strip_space && bytes.len() > start {
                if bytes[start] == b' ' {
                    bytes.remove(start);
                }
                strip_space = false;
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes token `id` stands for in text; `None` for control,
    /// unknown and unused tokens (which stand for none).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match self.kinds.get(id as usize)? {
            Kind::Control | Kind::Unknown | Kind::Unused => None,
            _ => {
                let mut bytes = Vec::new();
                self.push_piece(id, false, &mut bytes).ok()?;
                (!bytes.is_empty()).then_some(bytes)
            }
        }
    }

    /// What token `id` stands for in text, special tokens included.
    pub fn piece(&self, id: u32) -> Result<String, EngineError> {
        let mut bytes = Vec::new();
        self.push_piece(id, true, &mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The text cut at every special token, longest tokens first, each
    /// token's `lstrip`/`rstrip` taking the whitespace beside it.
    fn split_specials<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(text));
        }
        for special in &self.specials {
            let kind = self.kinds[special.id as usize];
            if !parse_special && matches!(kind, Kind::Control | Kind::Unknown) {
                continue;
            }
            let token = self.tokens[special.id as usize].as_str();
            let mut out = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    out.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(token) {
                    let mut left = &rest[..at];
                    if special.lstrip {
                        left = left.trim_end_matches(is_c_space);
                    }
                    if !left.is_empty() {
                        out.push(Fragment::Text(left));
                    }
                    out.push(Fragment::Token(special.id));
                    rest = &rest[at + token.len()..];
                    if special.rstrip {
                        rest = rest.trim_start_matches(is_c_space);
                    }
                }
                if !rest.is_empty() {
                    out.push(Fragment::Text(rest));
                }
            }
            fragments = out;
        }
        fragments
    }

    /// Appends the tokens of plain text; `after_special` says it starts the
    /// input or follows a special token.
    fn encode_text(
        &self,
        text: &str,
        after_special: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        let (words, spelling, whole_newline_runs) = match &self.model {
            Model::Spm(spm) => {
                spm.encode(&self.ids, text, self.add_space_prefix && after_special, out);
                return Ok(());
            }
            Model::Bpe {
                words,
                spelling,
                whole_newline_runs,
            } => (words, *spelling, *whole_newline_runs),
        };
        let text: Cow<str> = match spelling {
            Spelling::Metaspace => text.replace(' ', "▁").into(),
            _ => text.into(),
        };
        let merge = |words_text: &str, out: &mut Vec<u32>| -> Result<(), EngineError> {
            let enc = words
                .encode(words_text, false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            out.extend_from_slice(enc.get_ids());
            Ok(())
        };
        if !whole_newline_runs {
            return merge(&text, out);
        }
        for run in newline_runs(&text) {
            match self.ids.get(run) {
                Some(&id) if run.starts_with('\n') => out.push(id),
                _ => merge(run, out)?,
            }
        }
        Ok(())
    }

    fn push_piece(
        &self,
        id: u32,
        keep_special: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), EngineError> {
        let i = id as usize;
        let text = self.tokens.get(i).ok_or_else(|| {
            EngineError::Tokenizer(format!(
                "token id {id} is beyond the vocabulary of {} tokens",
                self.tokens.len()
            ))
        })?;
        match self.kinds[i] {
            Kind::Control | Kind::Unknown if keep_special => out.extend_from_slice(text.as_bytes()),
            Kind::UserDefined => out.extend_from_slice(text.as_bytes()),
            Kind::Normal => match &self.model {
                Model::Bpe {
                    spelling: Spelling::Bytes,
                    ..
                } => out.extend(byte_level_bytes(text)),
                Model::Bpe {
                    spelling: Spelling::Plain,
                    ..
                } => out.extend_from_slice(text.as_bytes()),
                _ => out.extend_from_slice(text.replace('▁', " ").as_bytes()),
            },
            Kind::Byte => match byte_token(text) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(text.as_bytes()),
            },
            _ => {}
        }
        Ok(())
    }
}

/// The pre-tokenizer of a BPE vocabulary (`None` for SentencePiece), from
/// `tokenizer.ggml.model` and `tokenizer.ggml.pre`.
fn pre_tokenizer_of(h: &Header) -> Result<Option<&'static PreTokenizer>, String> {
    let text = |key: &str| h.string(key).map_err(|e| e.to_string());
    let model =
        text("tokenizer.ggml.model")?.ok_or("no tokenizer (tokenizer.ggml.model is missing)")?;
    let name = match model {
        "llama" => return Ok(None),
        "gpt2" => text("tokenizer.ggml.pre")?.unwrap_or("default"),
        "gemma4" => "gemma4",
        other => {
            return Err(format!(
                "tokenizer model \"{other}\" (tokenizer.ggml.model) is not supported; supported: {MODELS}"
            ))
        }
    };
    match pre_tokenizer::find(name) {
        Some(pre) => Ok(Some(pre)),
        None => Err(format!(
            "pre-tokenizer \"{name}\" (tokenizer.ggml.pre) is not supported; supported: {}",
            pre_tokenizer::names().join(", ")
        )),
    }
}

/// The tokens (an empty one renamed, as llama.cpp does), their kinds and
/// scores.
struct TokenTable {
    tokens: Vec<String>,
    kinds: Vec<Kind>,
    scores: Vec<f32>,
}

fn token_table(h: &Header) -> Result<TokenTable, String> {
    let tokens: Vec<String> = h
        .require("tokenizer.ggml.tokens", h.strings("tokenizer.ggml.tokens"))
        .map_err(|e| e.to_string())?
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            "" => format!("[EMPTY_{i}]"),
            t => t.to_string(),
        })
        .collect();
    let n = tokens.len();
    let kinds = per_token(h, "tokenizer.ggml.token_type", n, |v| match v {
        Value::I32(t) => Some(i64::from(*t)),
        v => v.as_u64().map(|t| t as i64),
    })?
    .map(|t| t.into_iter().map(Kind::from_type).collect())
    .unwrap_or_else(|| vec![Kind::Normal; n]);
    let scores = per_token(h, "tokenizer.ggml.scores", n, |v| {
        v.as_f64().map(|s| s as f32)
    })?
    .unwrap_or_else(|| vec![0.0; n]);
    Ok(TokenTable {
        tokens,
        kinds,
        scores,
    })
}

/// A BPE vocabulary's model: its merges (`tokenizer.ggml.merges`) under
/// pre-tokenizer `pre`.
fn bpe_model(h: &Header, ids: &HashMap<String, u32>, pre: &PreTokenizer) -> Result<Model, String> {
    let merges = match h
        .strings("tokenizer.ggml.merges")
        .map_err(|e| e.to_string())?
    {
        Some(merges) => merges,
        // Kimi-K2's files may come without merges.
        None if pre.names.contains(&"kimi-k2") => Vec::new(),
        None => return Err("tokenizer.ggml.merges is missing".into()),
    };
    let words = bpe_words(ids, &merges, pre)
        .map_err(|e| format!("the BPE tokenizer it describes does not build: {e}"))?;
    Ok(Model::Bpe {
        words: Box::new(words),
        spelling: pre.spelling,
        whole_newline_runs: pre.whole_newline_runs,
    })
}

/// C's `isspace`: the whitespace llama.cpp strips beside special tokens.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r')
}

/// Maximal runs of newlines and of other characters, in order.
fn newline_runs(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let newline = first == '\n';
        let end = rest
            .find(|c: char| (c == '\n') != newline)
            .unwrap_or(rest.len());
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

/// The byte of a `<0xXX>` token.
pub(crate) fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The bytes a GPT-2 byte-level token stands for (characters outside the map
/// stay as they are).
pub(crate) fn byte_level_bytes(token: &str) -> Vec<u8> {
    use std::sync::OnceLock;
    static TO_BYTE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    let map = TO_BYTE.get_or_init(|| {
        crate::tiktoken::byte_to_unicode()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect()
    });
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match map.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// A per-token array (`tokenizer.ggml.scores`, `token_type`), which must have
/// one entry per token.
fn per_token<T>(
    h: &Header,
    key: &str,
    n: usize,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>, String> {
    let Some(value) = h.get(key) else {
        return Ok(None);
    };
    let Value::Array(items) = value else {
        return Err(format!("{key} is {}, expected an array", value.type_name()));
    };
    if items.len() != n {
        return Err(format!(
            "{key} has {} entries for {n} tokens (tokenizer.ggml.tokens): one per token is expected",
            items.len()
        ));
    }
    items
        .iter()
        .map(|v| {
            convert(v).ok_or_else(|| format!("{key} holds {}, expected numbers", v.type_name()))
        })
        .collect::<Result<Vec<T>, String>>()
        .map(Some)
}

/// The special tokens, longest first, with the whitespace llama.cpp lets
/// some of them take (it sets these by model name: Phi-3's take the spaces
/// after them, the mask tokens of some embedding models those before).
fn specials(
    h: &Header,
    tokens: &[String],
    kinds: &[Kind],
    pre: Option<&PreTokenizer>,
) -> Vec<Special> {
    let text = |key: &str| h.string(key).ok().flatten().unwrap_or("").to_lowercase();
    let (name, arch) = (text("general.name"), text("general.architecture"));
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    let pre_names = pre.map_or(&[][..], |p| p.names);
    let mask = if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
        .iter()
        .any(|n| pre_names.contains(n))
        || ["nomic-bert-moe", "jina-bert-v3"].contains(&arch.as_str())
    {
        Some("<mask>")
    } else if name.contains("modern-bert") {
        Some("[MASK]")
    } else {
        None
    };
    let mut specials: Vec<Special> = kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| matches!(k, Kind::Control | Kind::UserDefined | Kind::Unknown))
        .map(|(i, _)| {
            let t = tokens[i].as_str();
            Special {
                id: i as u32,
                lstrip: mask == Some(t),
                rstrip: phi3 && !["<unk>", "<s>", "<|endoftext|>"].contains(&t),
            }
        })
        .collect();
    specials.sort_by_key(|s| std::cmp::Reverse(tokens[s.id as usize].len()));
    specials
}

/// The word splitter and merger of a BPE vocabulary: the pre-tokenizer's
/// regexes in turn (then GPT-2's byte map, for byte-level vocabularies) and
/// the merges, ranked in file order.
fn bpe_words(
    ids: &HashMap<String, u32>,
    merges: &[&str],
    pre: &PreTokenizer,
) -> Result<tokenizers::Tokenizer, String> {
    use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::pre_tokenizers::PreTokenizerWrapper;
    use tokenizers::SplitDelimiterBehavior;

    let vocab: BpeVocab = ids.iter().map(|(t, &i)| (t.clone(), i)).collect();
    // "a b": the first space after the first byte separates the two parts.
    // A merge whose parts or result are not tokens can never apply.
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            let at = m.bytes().skip(1).position(|b| b == b' ')? + 1;
            let (a, b) = (&m[..at], &m[at + 1..]);
            let known = ids.contains_key(a) && ids.contains_key(b);
            (known && ids.contains_key(&format!("{a}{b}"))).then(|| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .byte_fallback(pre.spelling == Spelling::Metaspace)
        .build()
        .map_err(|e| e.to_string())?;
    let mut steps = pre
        .splits
        .iter()
        .map(|r| {
            Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::from)
            .map_err(|e| format!("split regex {r:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if pre.spelling == Spelling::Bytes {
        steps.push(ByteLevel::new(false, true, false).into());
    }
    let mut words = tokenizers::Tokenizer::new(bpe);
    words.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_runs_alternate() {
        let runs: Vec<&str> = newline_runs("a b\n\ncd\n").collect();
        assert_eq!(runs, ["a b", "\n\n", "cd", "\n"]);
        assert_eq!(newline_runs("").count(), 0);
    }

    #[test]
    fn byte_tokens_and_byte_level_pieces_decode() {
        assert_eq!(byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token("<0xZZ>"), None);
        assert_eq!(byte_level_bytes("Ġhello"), b" hello");
        assert_eq!(byte_level_bytes("Ċ"), b"\n");
    }

    #[test]
    fn every_pre_tokenizer_builds() {
        let ids: HashMap<String, u32> = [("a", 0), ("b", 1), ("ab", 2)]
            .iter()
            .map(|(t, i)| (t.to_string(), *i))
            .collect();
        for pre in pre_tokenizer::PRE_TOKENIZERS {
            let words =
                bpe_words(&ids, &["a b"], pre).unwrap_or_else(|e| panic!("{:?}: {e}", pre.names));
            words
                .encode("ab 1234567 Hello 世界\n\n", false)
                .unwrap_or_else(|e| panic!("{:?}: {e}", pre.names));
        }
    }
}
