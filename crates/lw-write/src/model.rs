//! The interface AgentWrite reaches models through, and the in-process
//! implementation on the local engine.

use lw_core::{Constraint, FinishReason, GenerationParams, Message, SamplingParams};
use serde::{Deserialize, Serialize};

/// One chat completion to run.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// A grammar or schema the answer must follow (where the backend
    /// supports structured decoding; otherwise the answer is checked after).
    pub constraint: Option<Constraint>,
    /// Length control: no end before this many tokens…
    pub min_tokens: usize,
    /// …and past this many, an end at the next sentence end (local
    /// engine only).
    pub end_after: Option<usize>,
}

/// What a completion produced and what it cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens the backend reused from an earlier request.
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.cached_prompt_tokens += other.cached_prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }

    /// What was spent since `earlier` (a snapshot of the same running total).
    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_sub(earlier.prompt_tokens),
            cached_prompt_tokens: self
                .cached_prompt_tokens
                .saturating_sub(earlier.cached_prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_sub(earlier.completion_tokens),
        }
    }

    /// Prompt tokens actually computed (not reused).
    pub fn prefilled_tokens(&self) -> usize {
        self.prompt_tokens - self.cached_prompt_tokens
    }
}

/// Bytes a backend's requests and answers took over the network (their
/// bodies: JSON sent, the event stream received).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

impl Traffic {
    /// What was moved since `earlier` (a snapshot of the same total).
    pub fn since(self, earlier: Traffic) -> Traffic {
        Traffic {
            sent: self.sent.saturating_sub(earlier.sent),
            received: self.received.saturating_sub(earlier.received),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatResponse {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Why a call to a model failed. None of these ever becomes document text.
#[derive(Debug, thiserror::Error)]
pub enum ModelCallError {
    #[error("the prompt ({prompt_tokens} tokens) plus the answer ({max_tokens} tokens) exceed the model's context of {context} tokens")]
    ContextLength {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("the server refused: the prompt is longer than the model's context ({0})")]
    ContextLengthServer(String),
    #[error("the model refused (content filter): {0}")]
    ContentFilter(String),
    /// The server refused the request itself (HTTP 4xx other than 429):
    /// retrying the same request cannot help.
    #[error("{message}")]
    Refused { status: u16, message: String },
    #[error("stopped by the user")]
    Cancelled,
    #[error("{0}")]
    Backend(String),
}

/// A chat model: the local engine or a server.
pub trait LanguageModel {
    /// A name for people and run records.
    fn name(&self) -> String;

    /// Tokens per word (per character for Chinese) of this model's
    /// tokenizer, measured on sample prose; `None` where the tokenizer is
    /// out of reach (a server).
    fn tokens_per_word(&self, _lang: crate::length::Language) -> Option<f64> {
        None
    }

    /// The prompt's length in tokens and the model's context, where both
    /// are known (the local engine); the writer keeps the text so far
    /// inside the context with them.
    fn prompt_room(&self, _messages: &[Message]) -> Option<(usize, usize)> {
        None
    }

    /// The model's parameter count, where known (the local engine), for
    /// compute estimates (2 × parameters per token).
    fn parameters(&self) -> Option<u64> {
        None
    }

    /// Bytes moved over the network so far (nothing for the local engine).
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }

    /// Runs one chat completion, streaming text deltas to `on_text`
    /// (`false` from it cancels).
    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError>;
}

/// The in-process engine. Consecutive requests share the KV cache of their
/// longest common token prefix, so a growing document is computed about once.
pub struct LocalModel {
    engine: lw_engine::Engine,
    name: String,
}

impl LocalModel {
    pub fn new(engine: lw_engine::Engine, name: impl Into<String>) -> Self {
        LocalModel {
            engine,
            name: name.into(),
        }
    }

    pub fn engine(&self) -> &lw_engine::Engine {
        &self.engine
    }
}

impl LanguageModel for LocalModel {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn tokens_per_word(&self, lang: crate::length::Language) -> Option<f64> {
        measured_tokens_per_word(&self.engine, lang)
    }

    fn prompt_room(&self, messages: &[Message]) -> Option<(usize, usize)> {
        prompt_room(&self.engine, messages)
    }

    fn parameters(&self) -> Option<u64> {
        Some(self.engine.model().config().parameter_count() as u64)
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let (ids, params) = local_request(&self.engine, request)?;
        let out = self.engine.generate(&ids, &params, |d| on_text(d));
        local_response(out)
    }
}

/// Sample prose for measuring a tokenizer: plain narrative, as sections are.
const SAMPLE_EN: &str = "The river had always been the first thing the town saw in the morning. \
Before the bakers lit their ovens, before the bells, the water was already moving under the old \
stone bridge, carrying leaves and the last of the night's cold down towards the sea. People said \
you could tell the season by its colour: brown and fast in spring, green and slow in August, grey \
in the weeks before the first snow. Mara had crossed that bridge every day of her life, and she \
had never once thought about where the water went.";
const SAMPLE_ZH: &str = "小镇每天早晨最先看到的总是那条河。面包师还没有点起炉火，钟声还没有响起，\
河水就已经在古老的石桥下流动，把落叶和夜里最后的寒意带向大海。人们说，看河水的颜色就能知道季节：\
春天浑黄湍急，八月碧绿舒缓，初雪前的几个星期则是一片灰色。玛拉一生中每天都要走过那座桥，\
却从来没有想过河水流向了哪里。";

/// Tokens per word (English) or per character (Chinese) on the sample
/// prose, from `count`, a tokenizer's token count of a text.
pub(crate) fn tokens_per_word_by(
    lang: crate::length::Language,
    count: impl FnOnce(&str) -> Option<usize>,
) -> Option<f64> {
    let text = match lang {
        crate::length::Language::English => SAMPLE_EN,
        crate::length::Language::Chinese => SAMPLE_ZH,
    };
    let tokens = count(text)? as f64;
    let words = lw_core::Counter::Unicode.count(text) as f64;
    (words > 0.0 && tokens > 0.0).then(|| tokens / words)
}

/// [`tokens_per_word_by`] with `model`'s tokenizer.
fn measured_tokens_per_word(
    model: &lw_engine::Model,
    lang: crate::length::Language,
) -> Option<f64> {
    tokens_per_word_by(lang, |t| model.encode_raw(t).ok().map(|ids| ids.len()))
}

fn prompt_room(model: &lw_engine::Model, messages: &[Message]) -> Option<(usize, usize)> {
    let ids = model.encode_chat(messages).ok()?;
    Some((ids.len(), model.context_length()))
}

/// Token ids and generation parameters of a request for the local engine,
/// refused when prompt plus answer would not fit its context.
fn local_request(
    engine: &lw_engine::Model,
    request: &ChatRequest,
) -> Result<(Vec<u32>, GenerationParams), ModelCallError> {
    let ids = engine
        .encode_chat(&request.messages)
        .map_err(|e| ModelCallError::Backend(e.to_string()))?;
    let context = engine.context_length();
    if ids.len() + request.max_tokens > context {
        return Err(ModelCallError::ContextLength {
            prompt_tokens: ids.len(),
            max_tokens: request.max_tokens,
            context,
        });
    }
    let params = GenerationParams {
        sampling: request.sampling.clone(),
        max_tokens: Some(request.max_tokens),
        stop: request.stop.clone(),
        ignore_eos: false,
        no_speculation: false,
        min_tokens: request.min_tokens.min(request.max_tokens),
        constraint: request.constraint.clone(),
        end_after: request.end_after,
    };
    Ok((ids, params))
}

/// A local generation as the writer sees it.
fn local_response(
    out: Result<lw_engine::Generation, lw_engine::EngineError>,
) -> Result<ChatResponse, ModelCallError> {
    let out = match out {
        Err(lw_engine::EngineError::Cancelled) => return Err(ModelCallError::Cancelled),
        other => other.map_err(|e| ModelCallError::Backend(e.to_string()))?,
    };
    if out.finish_reason == FinishReason::Cancelled {
        return Err(ModelCallError::Cancelled);
    }
    Ok(ChatResponse {
        text: out.text,
        finish_reason: out.finish_reason,
        usage: Usage {
            prompt_tokens: out.stats.prompt_tokens,
            cached_prompt_tokens: out.stats.cached_prompt_tokens,
            completion_tokens: out.stats.generated_tokens,
        },
    })
}

/// The local engine behind the batching scheduler, shared with other
/// requests (the server's jobs run through this). A full queue is waited
/// out, not reported: a writing run is background work.
pub struct BatchedModel {
    batcher: lw_engine::Batcher,
    name: String,
}

impl BatchedModel {
    pub fn new(batcher: lw_engine::Batcher, name: impl Into<String>) -> Self {
        BatchedModel {
            batcher,
            name: name.into(),
        }
    }
}

impl LanguageModel for BatchedModel {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn tokens_per_word(&self, lang: crate::length::Language) -> Option<f64> {
        measured_tokens_per_word(self.batcher.model(), lang)
    }

    fn prompt_room(&self, messages: &[Message]) -> Option<(usize, usize)> {
        prompt_room(self.batcher.model(), messages)
    }

    fn parameters(&self) -> Option<u64> {
        Some(self.batcher.model().model().config().parameter_count() as u64)
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let engine = self.batcher.model().clone();
        let (ids, params) = local_request(&engine, request)?;
        let out = loop {
            match self
                .batcher
                .generate_blocking(ids.clone(), params.clone(), |d| on_text(d))
            {
                Ok(result) => break result,
                Err(_busy) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        };
        local_response(out)
    }
}
