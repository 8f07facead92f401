//! The OpenAI-compatible routes: models, chat and text completions (plain
//! or streamed), through the batching scheduler.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lw_core::{Constraint, GenerationParams, Message, Role, SamplingParams};
use lw_engine::BatchEvent;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::{parse_body, ApiError};
use crate::wire::{self, Kind};
use crate::{new_id, now, AppState};

pub(crate) async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(wire::ModelList {
        object: "list",
        data: vec![wire::ModelCard {
            id: &state.opts.model_name,
            object: "model",
            created: 0,
            owned_by: "longwriter",
        }],
    })
    .into_response()
}

#[derive(Deserialize)]
pub(crate) struct ChatMessageIn {
    role: String,
    content: String,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The fields chat and text completions share.
#[derive(Deserialize)]
pub(crate) struct Common {
    model: Option<String>,
    /// `false` decodes this request without speculation where the server
    /// speculates (same text; for comparing speed, or when drafting does
    /// not pay for a prompt).
    speculate: Option<bool>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    n: Option<usize>,
    stream_options: Option<Value>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Divides positive logits (multiplies negative ones) of every token
    /// in the prompt or the answer so far (transformers' and vLLM's
    /// `repetition_penalty`; llama.cpp's name `repeat_penalty` is read as
    /// the same, over the whole sequence rather than its last 64 tokens).
    repetition_penalty: Option<f32>,
    repeat_penalty: Option<f32>,
    /// Token id (as a string key, OpenAI's form) → bias in [-100, 100].
    logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// No end of the answer before this many tokens (vLLM's field).
    min_tokens: Option<usize>,
    /// Length control (longwriter's field, which `write` sends): past this
    /// many answer tokens the answer ends at the next sentence or paragraph
    /// end; `max_tokens` stays the cap.
    end_after_tokens: Option<usize>,
    /// DRY, with llama.cpp's server's field names.
    dry_multiplier: Option<f32>,
    dry_base: Option<f32>,
    dry_allowed_length: Option<usize>,
    dry_penalty_last_n: Option<usize>,
    dry_sequence_breakers: Option<Vec<String>>,
    /// OpenAI's structured output: `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"schema": ..., "strict": ...}}`.
    response_format: Option<Value>,
    /// llama.cpp's server's fields: a GBNF grammar, or a JSON Schema.
    grammar: Option<String>,
    json_schema: Option<Value>,
}

#[derive(Deserialize)]
pub(crate) struct ChatRequestIn {
    messages: Vec<ChatMessageIn>,
    /// Variables for the chat template, as vLLM and SGLang take them
    /// (`{"enable_thinking": false}` for Qwen3 and other reasoning models).
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
pub(crate) struct CompletionRequestIn {
    prompt: OneOrMany,
    #[serde(flatten)]
    common: Common,
}

/// Checks the shared fields and turns them into generation parameters.
pub(crate) fn generation_params(
    state: &AppState,
    c: &Common,
) -> Result<GenerationParams, ApiError> {
    if let Some(m) = &c.model {
        if m != &state.opts.model_name && !state.opts.model_aliases.contains(m) {
            return Err(ApiError::not_found(
                "model_not_found",
                format!(
                    "the model \"{m}\" does not exist here; this server serves \"{}\"",
                    state.opts.model_name
                ),
            ));
        }
    }
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(state.opts.max_new_tokens);
    if max_tokens == 0 {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    if max_tokens > state.opts.max_new_tokens {
        return Err(ApiError::bad_request(format!(
            "max_tokens {max_tokens} is above this server's limit of {}",
            state.opts.max_new_tokens
        )));
    }
    let (temperature, top_p) = (c.temperature.unwrap_or(1.0), c.top_p.unwrap_or(1.0));
    check_sampling(temperature, top_p)?;
    let (presence_penalty, frequency_penalty) = (
        c.presence_penalty.unwrap_or(0.0),
        c.frequency_penalty.unwrap_or(0.0),
    );
    for (name, v) in [
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::bad_request(format!(
                "{name} {v} is outside [-2, 2]"
            )));
        }
    }
    let repetition_penalty = repetition_penalty(c)?;
    let logit_bias = logit_bias(state, c.logit_bias.as_ref())?;
    let min_tokens = c.min_tokens.unwrap_or(0);
    let defaults = SamplingParams::default();
    let dry_multiplier = c.dry_multiplier.unwrap_or(0.0);
    let dry_base = c.dry_base.unwrap_or(defaults.dry_base);
    let dry_ok = dry_multiplier.is_finite()
        && dry_multiplier >= 0.0
        && dry_base.is_finite()
        && dry_base >= 1.0;
    if !dry_ok {
        return Err(ApiError::bad_request(format!(
            "dry_multiplier {dry_multiplier} must be at least 0 and dry_base {dry_base} at least 1"
        )));
    }
    if min_tokens > max_tokens {
        return Err(ApiError::bad_request(format!(
            "min_tokens {min_tokens} is above max_tokens {max_tokens}"
        )));
    }
    let constraint = constraint(state, c)?;
    Ok(GenerationParams {
        constraint,
        end_after: c.end_after_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: c.seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            }),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
            dry_multiplier,
            dry_base,
            dry_allowed_length: c.dry_allowed_length.unwrap_or(defaults.dry_allowed_length),
            dry_penalty_last_n: c.dry_penalty_last_n.unwrap_or(0),
            dry_sequence_breakers: c
                .dry_sequence_breakers
                .clone()
                .unwrap_or(defaults.dry_sequence_breakers),
            ..Default::default()
        },
        min_tokens,
        max_tokens: Some(max_tokens),
        stop: c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default(),
        ignore_eos: false,
        no_speculation: c.speculate == Some(false),
    })
}

/// `repetition_penalty` or `repeat_penalty` (1 = off): positive and
/// finite, and the same where a request names both.
fn repetition_penalty(c: &Common) -> Result<f32, ApiError> {
    let (name, v) = match (c.repetition_penalty, c.repeat_penalty) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::bad_request(format!(
                "repetition_penalty {a} and repeat_penalty {b} differ (they are one setting)"
            )))
        }
        (Some(a), _) => ("repetition_penalty", a),
        (None, Some(b)) => ("repeat_penalty", b),
        (None, None) => ("repetition_penalty", 1.0),
    };
    if !(v.is_finite() && v > 0.0) {
        return Err(ApiError::bad_request(format!(
            "{name} {v} must be above 0 (1 = off)"
        )));
    }
    Ok(v)
}

/// The structured-decoding constraint of `response_format`, `grammar` or
/// `json_schema` (one of them), checked by compiling it.
fn constraint(state: &AppState, c: &Common) -> Result<Option<Constraint>, ApiError> {
    let mut found: Vec<(&str, Constraint)> = Vec::new();
    if let Some(rf) = &c.response_format {
        let kind = rf.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "text" => {}
            "json_object" => found.push((
                "response_format",
                // llama.cpp's server also takes a schema here.
                match rf.get("schema") {
                    Some(schema) => Constraint::JsonSchema(schema.to_string()),
                    None => Constraint::JsonObject,
                },
            )),
            "json_schema" => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "response_format of type json_schema needs json_schema.schema",
                        )
                    })?;
                found.push((
                    "response_format",
                    Constraint::JsonSchema(schema.to_string()),
                ));
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "response_format type \"{other}\" is not one of text, json_object, json_schema"
                )))
            }
        }
    }
    if let Some(g) = &c.grammar {
        found.push(("grammar", Constraint::Gbnf(g.clone())));
    }
    if let Some(schema) = &c.json_schema {
        found.push(("json_schema", Constraint::JsonSchema(schema.to_string())));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::bad_request(format!(
            "give one of response_format, grammar and json_schema, not {}",
            names.join(" and ")
        )));
    }
    let Some((field, constraint)) = found.pop() else {
        return Ok(None);
    };
    let model = state.batcher.model();
    model
        .grammars()
        .and_then(|g| g.check(&constraint))
        .map_err(|e| ApiError::bad_request(format!("{field}: invalid {e}")))?;
    Ok(Some(constraint))
}

/// OpenAI's `logit_bias`: token ids (string keys) below the vocabulary's
/// size, biases in [-100, 100].
fn logit_bias(
    state: &AppState,
    bias: Option<&std::collections::BTreeMap<String, f32>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let vocab = state.batcher.model().id_bound();
    bias.into_iter()
        .flatten()
        .map(|(id, &b)| {
            let token = id
                .parse::<u32>()
                .ok()
                .filter(|&t| (t as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "logit_bias: \"{id}\" is not a token id of this model (0..{vocab})"
                    ))
                })?;
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::bad_request(format!(
                    "logit_bias: {b} for token {id} is outside [-100, 100]"
                )));
            }
            Ok((token, b))
        })
        .collect()
}

pub(crate) fn check_sampling(temperature: f32, top_p: f32) -> Result<(), ApiError> {
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature {temperature} is outside [0, 2]"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "top_p {top_p} is outside (0, 1]"
        )));
    }
    Ok(())
}

/// The model's own check (the one the scheduler applies), then this
/// server's --max-prompt-tokens.
pub(crate) fn check_prompt_length(state: &AppState, ids: &[u32]) -> Result<(), ApiError> {
    state.batcher.model().check_prompt(ids)?;
    if let Some(limit) = state.opts.max_prompt_tokens {
        if ids.len() > limit {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
                format!(
                    "the prompt has {} tokens; this server accepts at most {limit} (--max-prompt-tokens)",
                    ids.len()
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequestIn = parse_body(body)?;
    let params = generation_params(&state, &req.common)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(ApiError::bad_request(format!("unknown role \"{other}\""))),
        };
        messages.push(Message::new(role, m.content.clone()));
    }
    let model = state.batcher.model();
    let mut inputs = model.template_inputs(true, None);
    for (name, value) in req.chat_template_kwargs.iter().flatten() {
        inputs = inputs
            .with_json_var(name, value)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let ids = model.encode_chat_with(&messages, &inputs)?;
    generate(state, ids, params, &req.common, Kind::Chat).await
}

pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequestIn = parse_body(body)?;
    let params = generation_params(&state, &req.common)?;
    let prompts = req.prompt.into_vec();
    let [prompt] = prompts.as_slice() else {
        return Err(ApiError::bad_request(
            "`prompt` must be one string (batches of prompts are not supported)",
        ));
    };
    let ids = state.batcher.model().encode_raw(prompt)?;
    generate(state, ids, params, &req.common, Kind::Text).await
}

/// Runs one generation through the scheduler, plain or as an SSE stream.
pub(crate) async fn generate(
    state: Arc<AppState>,
    ids: Vec<u32>,
    params: GenerationParams,
    common: &Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    check_prompt_length(&state, &ids)?;
    let head = wire::Header {
        kind,
        id: new_id(kind.id_prefix()),
        created: now(),
        model: state.opts.model_name.clone(),
    };
    let rx = state.batcher.submit(ids, params)?;
    if !common.stream {
        return complete(rx, head).await;
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(stream(rx, head, include_usage))
}

/// The whole completion, once the sequence ends.
async fn complete(
    mut rx: mpsc::UnboundedReceiver<BatchEvent>,
    head: wire::Header,
) -> Result<Response, ApiError> {
    // Dropping this future (the client left) drops `rx`: the sequence ends.
    let out = loop {
        match rx.recv().await {
            Some(BatchEvent::Delta(_)) => {}
            Some(BatchEvent::Done(r)) => break r?,
            None => return Err(ApiError::internal("the engine stopped")),
        }
    };
    let body = head.answer(out.text, out.finish_reason, &out.stats);
    Ok(Json(body).into_response())
}

/// The completion as SSE chunks: (chat) an opening chunk with the role,
/// one chunk per text delta, a closing chunk with the finish reason, the
/// usage when asked for, then `[DONE]`.
fn stream(
    rx: mpsc::UnboundedReceiver<BatchEvent>,
    head: wire::Header,
    include_usage: bool,
) -> Response {
    let mut pending: VecDeque<String> = VecDeque::new();
    if head.kind == Kind::Chat {
        let open = wire::Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        pending.push_back(to_json(&head.chunk(open, None)));
    }
    let events = futures_util::stream::unfold(
        (rx, pending, false),
        move |(mut rx, mut pending, mut over)| {
            let head = head.clone();
            async move {
                loop {
                    if let Some(data) = pending.pop_front() {
                        return Some((
                            Ok::<_, Infallible>(Event::default().data(data)),
                            (rx, pending, over),
                        ));
                    }
                    if over {
                        return None;
                    }
                    over = chunks_for(rx.recv().await, &head, include_usage, &mut pending);
                }
            }
        },
    );
    Sse::new(events).into_response()
}

/// Queues the chunks for what the scheduler sent (`None`: it stopped);
/// returns whether the stream is over.
fn chunks_for(
    event: Option<BatchEvent>,
    head: &wire::Header,
    include_usage: bool,
    pending: &mut VecDeque<String>,
) -> bool {
    match event {
        Some(BatchEvent::Delta(d)) => {
            let delta = wire::Delta {
                role: None,
                content: Some(d),
            };
            pending.push_back(to_json(&head.chunk(delta, None)));
            return false;
        }
        Some(BatchEvent::Done(Ok(out))) => {
            let end = head.chunk(wire::Delta::default(), Some(out.finish_reason));
            pending.push_back(to_json(&end));
            if include_usage {
                pending.push_back(to_json(&head.usage_chunk(&out.stats)));
            }
        }
        Some(BatchEvent::Done(Err(e))) => {
            pending.push_back(to_json(&ApiError::from(e).body()));
        }
        None => {}
    }
    pending.push_back("[DONE]".into());
    true
}

/// A wire type as JSON text (plain structs with string keys: cannot fail).
fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn common(fields: Value) -> Common {
        serde_json::from_value(fields).unwrap()
    }

    #[test]
    fn the_repetition_penalty_is_read_under_either_name_and_checked() {
        let read = |v: Value| repetition_penalty(&common(v)).map_err(|e| format!("{e:?}"));
        assert_eq!(read(json!({})).unwrap(), 1.0);
        assert_eq!(read(json!({"repetition_penalty": 1.05})).unwrap(), 1.05);
        assert_eq!(read(json!({"repeat_penalty": 1.3})).unwrap(), 1.3);
        assert_eq!(
            read(json!({"repeat_penalty": 1.2, "repetition_penalty": 1.2})).unwrap(),
            1.2
        );
        let both = read(json!({"repeat_penalty": 1.1, "repetition_penalty": 1.2})).unwrap_err();
        assert!(both.contains("differ"), "{both}");
        for bad in [0.0, -1.0] {
            let e = read(json!({"repetition_penalty": bad})).unwrap_err();
            assert!(
                e.contains("repetition_penalty") && e.contains("must be above 0"),
                "{e}"
            );
            let e = read(json!({"repeat_penalty": bad})).unwrap_err();
            assert!(
                e.contains("repeat_penalty") && e.contains("must be above 0"),
                "{e}"
            );
        }
    }
}
