//! What the OpenAI-compatible routes send, as types: completions and their
//! streamed chunks (chat and text), usage, errors and the model list.

use lw_core::{FinishReason, GenerationStats};
use serde::Serialize;

/// Chat or text completion.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Chat,
    Text,
}

impl Kind {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }
    }

    fn object(self, streamed: bool) -> &'static str {
        match (self, streamed) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }
}

/// OpenAI's name for why a generation ended.
pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// A completion, or one chunk of a streamed one.
#[derive(Serialize, Debug)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The one choice of a completion (`n` is always 1).
#[derive(Serialize, Debug)]
#[serde(untagged)]
pub enum Choice {
    Message {
        index: u32,
        message: AssistantMessage,
        finish_reason: Option<&'static str>,
    },
    Delta {
        index: u32,
        delta: Delta,
        finish_reason: Option<&'static str>,
    },
    Text {
        index: u32,
        text: String,
        logprobs: Option<()>,
        finish_reason: Option<&'static str>,
    },
}

#[derive(Serialize, Debug)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// A streamed chat chunk's change: the role first, then text.
#[derive(Serialize, Debug, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Token counts; speculative decoding's guesses in the fields OpenAI
/// reports for predicted outputs.
#[derive(Serialize, Debug)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptDetails,
    pub completion_tokens_details: CompletionDetails,
}

#[derive(Serialize, Debug)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

#[derive(Serialize, Debug)]
pub struct CompletionDetails {
    pub accepted_prediction_tokens: usize,
    pub rejected_prediction_tokens: usize,
}

impl From<&GenerationStats> for Usage {
    fn from(s: &GenerationStats) -> Self {
        Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.generated_tokens,
            total_tokens: s.prompt_tokens + s.generated_tokens,
            prompt_tokens_details: PromptDetails {
                cached_tokens: s.cached_prompt_tokens,
            },
            completion_tokens_details: CompletionDetails {
                accepted_prediction_tokens: s.accepted_draft_tokens,
                rejected_prediction_tokens: s.draft_tokens - s.accepted_draft_tokens,
            },
        }
    }
}

/// One response's fixed fields: what every chunk of it repeats.
#[derive(Clone, Debug)]
pub struct Header {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Header {
    fn with(&self, streamed: bool, choices: Vec<Choice>, usage: Option<Usage>) -> Completion<'_> {
        Completion {
            id: &self.id,
            object: self.kind.object(streamed),
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    /// The whole answer, not streamed.
    pub fn answer(
        &self,
        text: String,
        finish: FinishReason,
        stats: &GenerationStats,
    ) -> Completion<'_> {
        let finish_reason = Some(finish_name(finish));
        let choice = match self.kind {
            Kind::Chat => Choice::Message {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
                finish_reason,
            },
            Kind::Text => Choice::Text {
                index: 0,
                text,
                logprobs: None,
                finish_reason,
            },
        };
        self.with(false, vec![choice], Some(stats.into()))
    }

    /// A streamed chunk: the opening one of a chat (its role), text, or
    /// the closing one (the finish reason).
    pub fn chunk(&self, delta: Delta, finish: Option<FinishReason>) -> Completion<'_> {
        let finish_reason = finish.map(finish_name);
        let choice = match self.kind {
            Kind::Chat => Choice::Delta {
                index: 0,
                delta,
                finish_reason,
            },
            Kind::Text => Choice::Text {
                index: 0,
                text: delta.content.unwrap_or_default(),
                logprobs: None,
                finish_reason,
            },
        };
        self.with(true, vec![choice], None)
    }

    /// The last chunk of a stream that asked for usage: no choices.
    pub fn usage_chunk(&self, stats: &GenerationStats) -> Completion<'_> {
        self.with(true, Vec::new(), Some(stats.into()))
    }
}

/// `{"error": {...}}`, OpenAI's shape.
#[derive(Serialize, Debug)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize, Debug)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// `GET /v1/models`.
#[derive(Serialize, Debug)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
}

#[derive(Serialize, Debug)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// The health route's answer: the model served and the scheduler's load.
#[derive(Serialize, Clone, Debug)]
pub struct Health {
    pub status: &'static str,
    pub model: String,
    pub running: usize,
    pub waiting: usize,
    /// Generations finished since the server started.
    pub finished: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, to_value};

    fn header(kind: Kind) -> Header {
        Header {
            kind,
            id: "x".into(),
            created: 7,
            model: "m".into(),
        }
    }

    #[test]
    fn chat_chunks_have_openai_shapes() {
        let h = header(Kind::Chat);
        let open = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        assert_eq!(
            to_value(h.chunk(open, None)).unwrap(),
            json!({"id": "x", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
        );
        let end = to_value(h.chunk(Delta::default(), Some(FinishReason::ContextFull))).unwrap();
        assert_eq!(end["choices"][0]["delta"], json!({}));
        assert_eq!(end["choices"][0]["finish_reason"], "length");
        let stats = GenerationStats {
            prompt_tokens: 5,
            generated_tokens: 3,
            cached_prompt_tokens: 2,
            draft_tokens: 4,
            accepted_draft_tokens: 1,
            ..Default::default()
        };
        let u = to_value(h.usage_chunk(&stats)).unwrap();
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["total_tokens"], 8);
        assert_eq!(u["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(
            u["usage"]["completion_tokens_details"],
            json!({"accepted_prediction_tokens": 1, "rejected_prediction_tokens": 3})
        );
    }

    #[test]
    fn text_answers_carry_null_logprobs_and_no_delta() {
        let h = header(Kind::Text);
        let v = to_value(h.answer("hi".into(), FinishReason::Stop, &GenerationStats::default()))
            .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["choices"],
            json!([{"index": 0, "text": "hi", "logprobs": null, "finish_reason": "stop"}])
        );
        let c = to_value(h.chunk(
            Delta {
                role: None,
                content: Some("a".into()),
            },
            None,
        ))
        .unwrap();
        assert_eq!(c["choices"][0]["text"], "a");
        assert!(c.get("usage").is_none());
    }
}
