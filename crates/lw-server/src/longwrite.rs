//! The long-writing job routes: create, list, read, cancel, the document
//! and the event stream of a job.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use lw_core::SamplingParams;
use serde::Deserialize;

use crate::error::{parse_body, ApiError};
use crate::job_wire::{CancelAnswer, Job, JobEvent, JobList, JobSummary};
use crate::openai::check_sampling;
use crate::store::{self};
use crate::{new_id, now, AppState, Owner};

/// The longest piece a job may ask for (LongWriter's outputs run to
/// 10,000–20,000 words); beyond it a request is refused, not queued.
const MAX_WORDS: u32 = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobIn {
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

pub(crate) async fn create_job(
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
    if let Some(n) = asked_words.filter(|&n| n > MAX_WORDS) {
        return Err(ApiError::bad_request(format!(
            "{n} words asked (`length` or the instruction's own): at most {MAX_WORDS} are written"
        )));
    }
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
            // As `write` does.
            dry_multiplier: lw_write::SECTION_DRY_MULTIPLIER,
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
pub(crate) async fn find_job(
    state: &AppState,
    owner: &str,
    id: &str,
) -> Result<store::JobRow, ApiError> {
    match state.jobs.store().get(id)? {
        Some(j) if j.owner == owner => Ok(j),
        _ => Err(ApiError::not_found(
            "job_not_found",
            format!("no job \"{id}\""),
        )),
    }
}

pub(crate) async fn list_jobs(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
) -> Result<Json<JobList>, ApiError> {
    let jobs = state.jobs.store().list(Some(&owner), 200)?;
    Ok(Json(JobList {
        object: "list",
        data: jobs.iter().map(JobSummary::of).collect(),
    }))
}

pub(crate) async fn get_job(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Job>, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    Ok(Json(state.jobs.subscribe(&job)?.snapshot))
}

pub(crate) async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<CancelAnswer>, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    let cancelling = state.jobs.cancel(&id);
    Ok(Json(CancelAnswer {
        id,
        cancelling,
        status: job.status.as_str(),
    }))
}

pub(crate) async fn job_document(
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
pub(crate) async fn job_events(
    State(state): State<Arc<AppState>>,
    Extension(Owner(owner)): Extension<Owner>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, &owner, &id).await?;
    let sub = state.jobs.subscribe(&job)?;
    let first = JobEvent::Snapshot(Box::new(sub.snapshot));
    let events = futures_util::stream::unfold(
        (Some(first), sub.events, false),
        move |(first, mut rx, over)| async move {
            if let Some(f) = first {
                let done = rx.is_none();
                return Some((Ok::<_, Infallible>(sse_event(&f)), (None, rx, done)));
            }
            if over {
                return None;
            }
            let r = rx.as_mut()?;
            loop {
                match r.recv().await {
                    Ok(v) => {
                        let end = v.event.is_terminal();
                        return Some((Ok(sse_event(&v)), (None, rx, end)));
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

/// An SSE event whose data is `value` as JSON.
fn sse_event(value: &impl serde::Serialize) -> Event {
    // These types are plain structs and enums with string keys, which
    // serialize without failing.
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}
