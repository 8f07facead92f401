//! `longwriter serve`: an OpenAI-compatible HTTP API over the local engine,
//! long-writing jobs, and a web page.
//!
//! Handlers are thin: parse, submit to the batching scheduler, map the
//! result. Errors leave in OpenAI's JSON shape from one place ([`ApiError`]).
//! Generations share the model through continuous batching; a client that
//! disconnects drops its receiver, which frees its sequence at the next step.

mod jobs;
mod page;
pub mod store;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use lw_core::{FinishReason, GenerationParams, Message, Role, SamplingParams};
use lw_engine::{BatchEvent, BatchOptions, Batcher, Engine, EngineError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

pub use jobs::Jobs;
pub use store::{JobStore, StoreError};

/// What the server is configured with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The name `/v1/models` lists.
    pub model_name: String,
    /// Other names requests may use for it.
    pub model_aliases: Vec<String>,
    /// Bearer tokens accepted on `/v1` routes; none means no auth.
    pub api_keys: Vec<String>,
    /// Largest `max_tokens` a request may ask for.
    pub max_new_tokens: usize,
    /// Longest prompt accepted, in tokens (`None`: the model's context).
    pub max_prompt_tokens: Option<usize>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Long-writing jobs one key may have queued or running at once.
    pub max_jobs_per_key: usize,
    /// Batching limits.
    pub batch: BatchOptions,
    /// Where the job store lives.
    pub data_dir: PathBuf,
}

struct AppState {
    batcher: Batcher,
    jobs: Arc<Jobs>,
    opts: ServeOptions,
}

/// The API key a request came with ("" without auth): jobs belong to it.
#[derive(Clone)]
struct Owner(String);

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some(code),
            message,
        )
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<lw_engine::Busy> for ApiError {
    fn from(e: lw_engine::Busy) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("server_busy"),
            e.to_string(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(e.to_string())
    }
}

/// A JSON body of any content type (some clients omit `application/json`),
/// with a too-large body answered as 413 in OpenAI's shape.
fn parse_body<T: DeserializeOwned>(
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                Some("request_too_large"),
                "the request body is larger than this server accepts (see --max-body-bytes)",
            )
        } else {
            ApiError::new(status, "invalid_request_error", None, e.body_text())
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::PromptTooLong { .. } => ApiError {
                status: StatusCode::BAD_REQUEST,
                kind: "invalid_request_error",
                code: Some("context_length_exceeded"),
                message: e.to_string(),
            },
            EngineError::EmptyPrompt
            | EngineError::Template(_)
            | EngineError::NoChatTemplate(_) => ApiError::bad_request(e.to_string()),
            other => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "server_error",
                code: None,
                message: other.to_string(),
            },
        }
    }
}

/// The routes, over one scheduler and job manager.
pub fn router(batcher: Batcher, jobs: Arc<Jobs>, opts: ServeOptions) -> Router {
    let limit = opts.max_body_bytes;
    let state = Arc::new(AppState {
        batcher,
        jobs,
        opts,
    });
    let v1 = Router::new()
        .route("/models", get(models))
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/longwrite", post(create_job).get(list_jobs))
        .route("/longwrite/{id}", get(get_job))
        .route("/longwrite/{id}/events", get(job_events))
        .route("/longwrite/{id}/cancel", post(cancel_job))
        .route("/longwrite/{id}/document", get(job_document))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(page::index))
        .route("/health", get(health))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let load = state.batcher.load();
    Json(json!({
        "status": "ok",
        "model": state.opts.model_name,
        "running": load.running.load(Ordering::SeqCst),
        "waiting": load.waiting.load(Ordering::SeqCst),
    }))
}

async fn require_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let owner = if state.opts.api_keys.is_empty() {
        String::new()
    } else {
        match given {
            Some(k) if state.opts.api_keys.iter().any(|x| x == k) => k.to_string(),
            _ => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    Some("invalid_api_key"),
                    "missing or wrong API key (send Authorization: Bearer KEY)",
                )
                .into_response()
            }
        }
    };
    request.extensions_mut().insert(Owner(owner));
    next.run(request).await
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.opts.model_name, "object": "model", "created": 0, "owned_by": "longwriter"}],
    }))
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    content: String,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
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
struct Common {
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
}

#[derive(Deserialize)]
struct ChatRequestIn {
    messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionRequestIn {
    prompt: OneOrMany,
    #[serde(flatten)]
    common: Common,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A unique id for responses and jobs: time, process and a counter.
fn new_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    format!(
        "{prefix}-{:x}{:04x}{n:x}",
        nanos,
        std::process::id() & 0xffff
    )
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// Checks the shared fields and turns them into generation parameters.
fn generation_params(state: &AppState, c: &Common) -> Result<GenerationParams, ApiError> {
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
    Ok(GenerationParams {
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: c.seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            }),
            ..Default::default()
        },
        max_tokens: Some(max_tokens),
        stop: c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default(),
        ignore_eos: false,
        no_speculation: c.speculate == Some(false),
    })
}

fn check_sampling(temperature: f32, top_p: f32) -> Result<(), ApiError> {
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
fn check_prompt_length(state: &AppState, ids: &[u32]) -> Result<(), ApiError> {
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

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(
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
    let ids = state.batcher.model().encode_chat(&messages)?;
    generate(state, ids, params, &req.common, Kind::Chat).await
}

async fn completions(
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
async fn generate(
    state: Arc<AppState>,
    ids: Vec<u32>,
    params: GenerationParams,
    common: &Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    check_prompt_length(&state, &ids)?;
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let model = state.opts.model_name.clone();
    let created = now();
    let mut rx = state.batcher.submit(ids, params)?;
    if !common.stream {
        // Dropping this future (the client left) drops `rx`: the sequence ends.
        let out = loop {
            match rx.recv().await {
                Some(BatchEvent::Delta(_)) => {}
                Some(BatchEvent::Done(r)) => break r?,
                None => return Err(ApiError::internal("the engine stopped")),
            }
        };
        let choice = match kind {
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": finish_name(out.finish_reason)})
            }
            Kind::Text => {
                json!({"index": 0, "text": out.text, "logprobs": null, "finish_reason": finish_name(out.finish_reason)})
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let body = json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice],
            "usage": usage(&out.stats),
        });
        return Ok(Json(body).into_response());
    }
    let include_usage = common
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk = move |text: Option<&str>, finish: Option<&str>, first: bool| -> Value {
        let choice = match kind {
            Kind::Chat => {
                let delta = match (first, text) {
                    (true, _) => json!({"role": "assistant", "content": ""}),
                    (false, Some(t)) => json!({"content": t}),
                    (false, None) => json!({}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    // States: 0 opening chunk, 1 streaming, 2 [DONE] next, 3 over.
    let mut pending: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    if kind == Kind::Chat {
        pending.push_back(chunk(None, None, true).to_string());
    }
    let events = futures_util::stream::unfold(
        (rx, pending, false),
        move |(mut rx, mut pending, mut over)| {
            let chunk = chunk.clone();
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
                    match rx.recv().await {
                        Some(BatchEvent::Delta(d)) => {
                            pending.push_back(chunk(Some(&d), None, false).to_string())
                        }
                        Some(BatchEvent::Done(Ok(out))) => {
                            pending.push_back(
                                chunk(None, Some(finish_name(out.finish_reason)), false)
                                    .to_string(),
                            );
                            if include_usage {
                                let mut u = chunk(None, None, false);
                                u["choices"] = json!([]);
                                u["usage"] = usage(&out.stats);
                                pending.push_back(u.to_string());
                            }
                            pending.push_back("[DONE]".into());
                            over = true;
                        }
                        Some(BatchEvent::Done(Err(e))) => {
                            let e = ApiError::from(e);
                            pending.push_back(json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": e.code}}).to_string());
                            pending.push_back("[DONE]".into());
                            over = true;
                        }
                        None => {
                            pending.push_back("[DONE]".into());
                            over = true;
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(events).into_response())
}

fn usage(s: &lw_core::GenerationStats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens},
        // Speculative decoding's guesses, in the fields OpenAI reports for
        // predicted outputs.
        "completion_tokens_details": {
            "accepted_prediction_tokens": s.accepted_draft_tokens,
            "rejected_prediction_tokens": s.draft_tokens - s.accepted_draft_tokens,
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobIn {
    instruction: String,
    /// Words asked for (characters for Chinese); else read from the instruction.
    length: Option<u32>,
    mode: Option<String>,
    language: Option<String>,
    /// A plan to use instead of asking the model for one (AgentWrite's format).
    plan: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
}

async fn create_job(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: JobIn = parse_body(body)?;
    let instruction = req.instruction.trim().to_string();
    if instruction.is_empty() {
        return Err(ApiError::bad_request("`instruction` must not be empty"));
    }
    let mode: lw_write::Mode = req
        .mode
        .as_deref()
        .unwrap_or("agentwrite")
        .parse()
        .map_err(ApiError::bad_request)?;
    let language = match req.language.as_deref() {
        None | Some("") | Some("auto") => lw_write::Language::detect(&instruction),
        Some(l) => l.parse().map_err(ApiError::bad_request)?,
    };
    if req.length == Some(0) {
        return Err(ApiError::bad_request("`length` must be at least 1"));
    }
    let asked_words = req
        .length
        .or_else(|| lw_write::requested_length(&instruction));
    let plan = match req.plan.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(
            lw_write::parse_plan(text, asked_words)
                .map_err(|e| ApiError::bad_request(format!("`plan` is not usable: {e}")))?,
        ),
    };
    let (temperature, top_p) = (req.temperature.unwrap_or(0.7), req.top_p.unwrap_or(0.8));
    check_sampling(temperature, top_p)?;
    let open = state.jobs.open_count(&owner);
    if open >= state.opts.max_jobs_per_key {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("too_many_jobs"),
            format!(
                "this key already has {open} jobs queued or running (limit {}); wait for one to finish or cancel one",
                state.opts.max_jobs_per_key
            ),
        ));
    }
    let request = lw_write::Request {
        instruction,
        asked_words,
        language,
        mode,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: req.seed.unwrap_or_else(now),
            ..Default::default()
        },
        model: state.opts.model_name.clone(),
    };
    let id = new_id("lw");
    let jobs = state.jobs.clone();
    let created = now();
    let (id2, owner2) = (id.clone(), owner.clone());
    tokio::task::spawn_blocking(move || {
        jobs.submit(id2, &owner2, created, &request, plan.as_ref())
    })
    .await
    .map_err(|e| ApiError::internal(format!("job start failed: {e}")))??;
    let job = find_job(&state, &owner, &id).await?;
    let sections = state.jobs.store().sections(&id)?;
    Ok((
        StatusCode::CREATED,
        Json(state.jobs.describe(&job, &sections, None)),
    )
        .into_response())
}

/// A job of `owner`'s (others' jobs are not found, not forbidden).
async fn find_job(state: &AppState, owner: &str, id: &str) -> Result<store::JobRow, ApiError> {
    match state.jobs.store().get(id)? {
        Some(j) if j.owner == owner => Ok(j),
        _ => Err(ApiError::not_found(
            "job_not_found",
            format!("no job \"{id}\""),
        )),
    }
}

async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
) -> Result<Json<Value>, ApiError> {
    let jobs = state.jobs.store().list(Some(&owner), 200)?;
    let data: Vec<Value> = jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id, "created": j.created, "status": j.status.as_str(),
                "instruction": j.request.instruction, "asked_words": j.request.asked_words,
                "planned_words": j.plan.as_ref().map(|p| p.total_words()),
                "delivered_words": j.state.sections.iter().map(|s| s.delivered_words).sum::<usize>(),
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn get_job(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    Ok(Json(state.jobs.subscribe(&job)?.snapshot))
}

async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    let cancelling = state.jobs.cancel(&id);
    Ok(Json(
        json!({"id": id, "cancelling": cancelling, "status": job.status.as_str()}),
    ))
}

async fn job_document(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    let text = match job.document {
        Some(d) if job.status == store::Status::Finished => d,
        _ => state
            .jobs
            .store()
            .sections(&id)?
            .into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>()
            .join("\n\n"),
    };
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/markdown; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.md\""),
            ),
        ],
        text,
    )
        .into_response())
}

/// SSE: a `snapshot` event (the job so far), then `plan`, `section_start`,
/// `delta`, `section_done`, and one of `finished`, `failed`, `cancelled`.
async fn job_events(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    let sub = state.jobs.subscribe(&job)?;
    let mut first = sub.snapshot;
    first["type"] = json!("snapshot");
    let terminal = |v: &Value| {
        matches!(
            v["type"].as_str(),
            Some("finished" | "failed" | "cancelled")
        )
    };
    let events = futures_util::stream::unfold(
        (Some(first), sub.events, false),
        move |(first, mut rx, over)| async move {
            if let Some(f) = first {
                let done = rx.is_none();
                return Some((
                    Ok::<_, Infallible>(Event::default().data(f.to_string())),
                    (None, rx, done),
                ));
            }
            if over {
                return None;
            }
            let r = rx.as_mut()?;
            loop {
                match r.recv().await {
                    Ok(v) => {
                        let end = terminal(&v);
                        return Some((Ok(Event::default().data(v.to_string())), (None, rx, end)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

/// Serves `router` on `listener` until Ctrl-C.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// Errors of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Opens the job store, starts the scheduler, resumes unfinished jobs, binds
/// `host:port` (port 0 picks a free one), calls `on_ready` with the bound
/// address and the number of resumed jobs, and serves until Ctrl-C.
pub fn run(
    engine: Engine,
    opts: ServeOptions,
    host: &str,
    port: u16,
    on_ready: impl FnOnce(std::net::SocketAddr, usize),
) -> Result<(), ServeError> {
    let store = Arc::new(JobStore::open(&opts.data_dir)?);
    let batcher = Batcher::start(engine, opts.batch.clone());
    let jobs = Jobs::new(store, batcher.clone(), opts.model_name.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port)).await?;
        let resumed = jobs.resume_open()?;
        on_ready(listener.local_addr()?, resumed);
        serve(listener, router(batcher, jobs, opts)).await?;
        Ok(())
    })
}
