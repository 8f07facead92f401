//! Shared types of longwriter: chat messages, generation parameters, and
//! word counting.
//!
//! This crate sits at the bottom of the workspace; it knows nothing about
//! tensors, tokenizers, HTTP or files.

pub mod compare;
pub mod fs;
pub mod rng;
pub mod words;

use serde::{Deserialize, Serialize};

pub use fs::{write_atomic, WriteError};
pub use rng::Rng;
pub use words::Counter;

/// Who said a message in a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a chat, in the shape chat templates expect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0.0 = off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already seen (1.0 = off).
    pub repetition_penalty: f32,
    /// Same seed, same prompt, same parameters: same tokens.
    pub seed: u64,
    /// Subtracted once from the logit of every token already generated
    /// (OpenAI's `presence_penalty`; 0 = off).
    #[serde(default)]
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per time it was
    /// generated (OpenAI's `frequency_penalty`; 0 = off).
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids (OpenAI's `logit_bias`).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// DRY ("don't repeat yourself"): a token that would extend a repeat
    /// of `dry_allowed_length` or more tokens of the history loses
    /// `dry_multiplier · dry_base^(length − dry_allowed_length)` from its
    /// logit (0 = off).
    #[serde(default)]
    pub dry_multiplier: f32,
    #[serde(default = "dry_base")]
    pub dry_base: f32,
    #[serde(default = "dry_allowed_length")]
    pub dry_allowed_length: usize,
    /// How many of the last tokens are searched for repeats (0 = all).
    #[serde(default)]
    pub dry_penalty_last_n: usize,
    /// A repeat never runs across a token whose text contains one of these.
    #[serde(default = "dry_sequence_breakers")]
    pub dry_sequence_breakers: Vec<String>,
}

fn dry_base() -> f32 {
    1.75
}

fn dry_allowed_length() -> usize {
    2
}

/// The usual breakers: new line, colon, quote, asterisk.
pub fn dry_sequence_breakers() -> Vec<String> {
    ["\n", ":", "\"", "*"].map(String::from).to_vec()
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            dry_multiplier: 0.0,
            dry_base: dry_base(),
            dry_allowed_length: dry_allowed_length(),
            dry_penalty_last_n: 0,
            dry_sequence_breakers: dry_sequence_breakers(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Limits and stopping rules of one generation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    /// The most tokens to generate; `None` runs to the end of the context.
    pub max_tokens: Option<usize>,
    /// Generation stops before any of these strings; they are not emitted.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Decode without speculation even where the engine speculates (the
    /// output is the same; only the speed differs).
    #[serde(default)]
    pub no_speculation: bool,
    /// No end-of-sequence token before this many tokens (end-of-turn ids
    /// are masked until then, as vLLM's `min_tokens`).
    #[serde(default)]
    pub min_tokens: usize,
    /// A formal language the output must belong to; every token is drawn
    /// from those that keep the text inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// Length control: past this many tokens, the generation ends at the
    /// next sentence or paragraph end (an end-of-sequence token is forced
    /// there). `max_tokens` stays the hard cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_after: Option<usize>,
}

/// A formal language for structured decoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "source", rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON Schema (its JSON text): the output is one JSON value that
    /// the schema accepts.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// A regular expression the whole output matches.
    Regex(String),
    /// A grammar in llama.cpp's GBNF (`root ::= ...`).
    Gbnf(String),
    /// A grammar in the Lark-like syntax of llguidance.
    Lark(String),
}

impl Constraint {
    /// What kind of constraint it is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::JsonObject => "JSON object",
            Constraint::Regex(_) => "regular expression",
            Constraint::Gbnf(_) => "GBNF grammar",
            Constraint::Lark(_) => "Lark grammar",
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The context window is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Figures of one generation, for people and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries were reused instead of computed.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Tokens guessed by speculative decoding, and how many of them the
    /// model kept.
    #[serde(default)]
    pub draft_tokens: usize,
    #[serde(default)]
    pub accepted_draft_tokens: usize,
    /// Time the decoding path spent on grammar masks (structured decoding):
    /// waiting for a mask computed ahead, or computing it, and applying it.
    #[serde(default)]
    pub mask_seconds: f64,
    /// Time spent computing grammar masks, most of it ahead of the
    /// decoding path (while the model computed the logits).
    #[serde(default)]
    pub mask_compute_seconds: f64,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(
            self.prompt_tokens - self.cached_prompt_tokens,
            self.prefill_seconds,
        )
    }
    /// Share of drafted tokens the model kept (speculative decoding).
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.draft_tokens > 0)
            .then(|| self.accepted_draft_tokens as f64 / self.draft_tokens as f64)
    }
    /// Decode speed counts the tokens after the first, which prefill produced.
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_seconds)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}
