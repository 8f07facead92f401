//! `longwriter serve`: an OpenAI-compatible HTTP API over the local engine.
//!
//! Handlers are thin: parse, call the engine, map the result. Errors leave in
//! OpenAI's JSON shape from one place ([`ApiError`]). The engine runs one
//! request at a time on a blocking thread; consecutive requests share its KV
//! cache prefix.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lw_core::{FinishReason, GenerationParams, Message, Role, SamplingParams};
use lw_engine::{Engine, EngineError};
use serde::Deserialize;
use serde_json::{json, Value};

/// What the server is configured with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The name `/v1/models` lists.
    pub model_name: String,
    /// Bearer token required on `/v1` routes, if any.
    pub api_key: Option<String>,
    /// Largest `max_tokens` a request may ask for.
    pub max_new_tokens: usize,
}

struct AppState {
    engine: Mutex<Engine>,
    opts: ServeOptions,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
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

/// The routes, over one engine.
pub fn router(engine: Engine, opts: ServeOptions) -> Router {
    let state = Arc::new(AppState {
        engine: Mutex::new(engine),
        opts,
    });
    let v1 = Router::new()
        .route("/models", get(models))
        .route("/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .nest("/v1", v1)
        .with_state(state)
}

async fn require_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.opts.api_key {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "invalid_request_error",
                code: Some("invalid_api_key"),
                message: "missing or wrong API key (send Authorization: Bearer KEY)".into(),
            }
            .into_response();
        }
    }
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

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequestIn {
    messages: Vec<ChatMessageIn>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    n: Option<usize>,
    stream_options: Option<Value>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // Any content type: some clients omit `application/json`.
    let req: ChatRequestIn = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
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
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(state.opts.max_new_tokens);
    if max_tokens > state.opts.max_new_tokens {
        return Err(ApiError::bad_request(format!(
            "max_tokens {max_tokens} is above this server's limit of {}",
            state.opts.max_new_tokens
        )));
    }
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.unwrap_or(1.0),
            seed: req.seed.unwrap_or_else(now),
            ..Default::default()
        },
        max_tokens: Some(max_tokens),
        stop: match req.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
        ignore_eos: false,
    };
    let id = format!("chatcmpl-{}", now());
    let model = state.opts.model_name.clone();
    if !req.stream {
        let st = state.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut engine = st.engine.lock().unwrap_or_else(|p| p.into_inner());
            let ids = engine.encode_chat(&messages)?;
            engine.generate(&ids, &params, |_| true)
        })
        .await
        .map_err(|e| ApiError::bad_request(format!("generation task failed: {e}")))??;
        let body = json!({
            "id": id, "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text}, "finish_reason": finish_name(out.finish_reason)}],
            "usage": usage(&out.stats),
        });
        return Ok(Json(body).into_response());
    }
    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // Prompt errors (too long, bad template) are answered before the stream opens.
    let ids = {
        let engine = state.engine.lock().unwrap_or_else(|p| p.into_inner());
        let ids = engine.encode_chat(&messages)?;
        if ids.len() >= engine.context_length() {
            return Err(EngineError::PromptTooLong {
                tokens: ids.len(),
                limit: engine.context_length(),
            }
            .into());
        }
        ids
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(64);
    let st = state.clone();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    tokio::task::spawn_blocking(move || {
        let _ = tx.blocking_send(chunk(json!({"role": "assistant", "content": ""}), None));
        let mut engine = st.engine.lock().unwrap_or_else(|p| p.into_inner());
        // A closed channel means the client left: stop generating.
        let result = engine.generate(&ids, &params, |d| {
            tx.blocking_send(chunk(json!({"content": d}), None)).is_ok()
        });
        match result {
            Ok(out) => {
                let _ = tx.blocking_send(chunk(json!({}), Some(finish_name(out.finish_reason))));
                if include_usage {
                    let mut u = chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&out.stats);
                    let _ = tx.blocking_send(u);
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(
                    json!({"error": {"message": e.to_string(), "type": "server_error"}}),
                );
            }
        }
    });
    let events = futures_util::stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(v) => Some((
                Ok::<_, Infallible>(Event::default().data(v.to_string())),
                (rx, false),
            )),
            None => Some((Ok(Event::default().data("[DONE]")), (rx, true))),
        }
    });
    Ok(Sse::new(events).into_response())
}

fn usage(s: &lw_core::GenerationStats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens},
    })
}

/// Serves `router` on `listener` until Ctrl-C.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// Binds `host:port` (port 0 picks a free one), calls `on_ready` with the
/// bound address, and serves until Ctrl-C, on a runtime of its own.
pub fn run(
    engine: Engine,
    opts: ServeOptions,
    host: &str,
    port: u16,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port)).await?;
        on_ready(listener.local_addr()?);
        serve(listener, router(engine, opts)).await
    })
}
