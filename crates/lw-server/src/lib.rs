//! `longwriter serve`: an OpenAI-compatible HTTP API over the local engine,
//! long-writing jobs, and a web page.
//!
//! Handlers are thin: parse, submit to the batching scheduler, map the
//! result. Errors leave in OpenAI's JSON shape from one place ([`ApiError`]).
//! Generations share the model through continuous batching; a client that
//! disconnects drops its receiver, which frees its sequence at the next step.

mod conn;
mod error;
mod job_wire;
mod jobs;
mod longwrite;
mod openai;
mod page;
pub mod store;
mod wire;

pub use conn::ConnLimits;
pub use error::ApiError;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lw_engine::{BatchOptions, Batcher, Engine};

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
    /// Header deadline and connection limit.
    pub conn: ConnLimits,
}

struct AppState {
    batcher: Batcher,
    jobs: Arc<Jobs>,
    opts: ServeOptions,
}

/// The API key a request came with ("" without auth): jobs belong to it.
#[derive(Clone)]
struct Owner(String);

/// The routes, over one scheduler and job manager.
pub fn router(batcher: Batcher, jobs: Arc<Jobs>, opts: ServeOptions) -> Router {
    let limit = opts.max_body_bytes;
    let state = Arc::new(AppState {
        batcher,
        jobs,
        opts,
    });
    let v1 = Router::new()
        .route("/models", get(openai::models))
        .route("/chat/completions", post(openai::chat_completions))
        .route("/completions", post(openai::completions))
        .route(
            "/longwrite",
            post(longwrite::create_job).get(longwrite::list_jobs),
        )
        .route("/longwrite/{id}", get(longwrite::get_job))
        .route("/longwrite/{id}/events", get(longwrite::job_events))
        .route("/longwrite/{id}/cancel", post(longwrite::cancel_job))
        .route("/longwrite/{id}/document", get(longwrite::job_document))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    // llama.cpp's and vLLM's tokenizer route, beside /v1: clients measure
    // the served model's tokens per word with it.
    let tools = Router::new()
        .route("/tokenize", post(tokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(tools)
        .route("/", get(page::index))
        .route("/health", get(health))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> Json<wire::Health> {
    let load = state.batcher.load();
    Json(wire::Health {
        status: "ok",
        model: state.opts.model_name.clone(),
        running: load.running.load(Ordering::SeqCst),
        waiting: load.waiting.load(Ordering::SeqCst),
        finished: load.finished.load(Ordering::SeqCst),
    })
}

/// `POST /tokenize` `{"content", "add_special"}` (llama.cpp's fields;
/// vLLM's `prompt` and `add_special_tokens` too) → `{"tokens", "count"}`.
async fn tokenize(State(state): State<Arc<AppState>>, raw: axum::body::Bytes) -> Response {
    // Any content type, as llama.cpp reads it.
    let body: serde_json::Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => return ApiError::bad_request(format!("not JSON: {e}")).into_response(),
    };
    let Some(text) = body
        .get("content")
        .or_else(|| body.get("prompt"))
        .and_then(|v| v.as_str())
    else {
        return ApiError::bad_request("\"content\" must be a string").into_response();
    };
    let special = body
        .get("add_special")
        .or_else(|| body.get("add_special_tokens"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    match state.batcher.model().tokenizer().encode(text, special) {
        Ok(ids) => Json(serde_json::json!({"tokens": ids, "count": ids.len()})).into_response(),
        Err(e) => ApiError::bad_request(e.to_string()).into_response(),
    }
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

/// Serves `router` on `listener` within `limits` until Ctrl-C.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
) -> std::io::Result<()> {
    conn::serve_until(listener, app, limits, async {
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
        let limits = opts.conn.clone();
        serve(listener, router(batcher, jobs, opts), limits).await?;
        Ok(())
    })
}
