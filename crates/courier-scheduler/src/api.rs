//! The scheduler's HTTP API: submit runs, read runs, health, metrics.
//!
//! ```text
//! POST /api/runs            {"workflow": "...", "params": {...}, "priority": 0-9}  -> 201 run
//! GET  /api/runs            ?workflow=&status=&limit=(50, at most 1000)&before=<run id>
//!                                                                -> [run], newest first, at most about
//!                                                                   8 MiB of params; before= the last
//!                                                                   id of a page gives the next
//! GET  /api/runs/{id}                                            -> run with steps (outputs and
//!                                                                   transcripts up to 16 MiB in all)
//! GET  /api/runs/{id}/steps/{step}                               -> one step whole; 404
//! POST /api/runs/{id}/cancel {"step": "...", "reason": "...", "by": "..."} (all optional)
//!                                                                -> 200 run; 404; 409 already ended
//! POST /api/runs/{id}/steps/{step}/approve {"comment": "...", "by": "..."} (optional)
//! POST /api/runs/{id}/steps/{step}/reject  {"comment": "...", "by": "..."}
//!                                                                -> 200 run; 404; 409 not waiting
//! GET  /api/workflows                                            -> [{name, params, steps, schedule}]
//! GET  /healthz                                                  -> {"status": "ok"|"standby"|"degraded", "broker": bool, "leader": bool}
//! GET  /metrics                                                  -> Prometheus text
//! ```
//! Every answer but `/metrics` is JSON; errors are `{"error": "..."}` with
//! 400 (bad input), 401 (no or wrong token), 404 (unknown), 405, 408 (a body
//! that did not arrive in time), 409 (cancelling what already ended), 413 (a
//! body over 2 MiB), 415 (not JSON, or sent with a `Content-Encoding`), 422
//! (JSON of the wrong shape, such as an unknown field or a param given twice)
//! or 500. An identifier an error quotes is cut at 64 characters.
//!
//! With a token set, `/api/...` and `/metrics` need `Authorization: Bearer
//! <token>`, compared in constant time; `/healthz` stays open.
//! [`metrics_router`] serves `/metrics` and `/healthz` without the token, for
//! a listener that only Prometheus reaches.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::db::RunStatus;
use crate::engine::{CancelError, DecideError, NORMAL_PRIORITY, SubmitError};

/// The API router; `token`, when set, guards everything but `/healthz`,
/// unknown paths included (so they cannot be told apart without it).
/// Without it, an API listening on `loopback` only answers requests that
/// name it by IP address or `localhost` (see [`require_token`]); one
/// listening beyond (`api_allow_anonymous`) answers any.
pub fn router(shared: Arc<Shared>, token: Option<String>, loopback: bool, ops: crate::ui::Operations) -> Router {
    let guarded = Router::new()
        .route("/api/runs", get(list_runs).post(submit))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/steps/{step}", get(get_step))
        .route("/api/runs/{id}/cancel", post(cancel))
        .route("/api/runs/{id}/steps/{step}/approve", post(approve))
        .route("/api/runs/{id}/steps/{step}/reject", post(reject))
        .route("/api/workflows", get(workflows))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // An empty token would let an empty header in: it counts as none.
        .layer(middleware::from_fn_with_state(
            Arc::new((token.clone().filter(|t| !t.is_empty()), loopback)),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(health))
        .merge(guarded)
        .with_state(shared.clone())
        .merge(crate::ui::router(shared, token, loopback, ops))
        // Every route's wrong method, `/healthz` and the UI's included.
        .method_not_allowed_fallback(method_not_allowed)
}

/// `/metrics` and `/healthz` alone, unauthenticated.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .fallback(not_found)
        .with_state(shared)
}

async fn require_token(State(access): State<Arc<(Option<String>, bool)>>, request: Request, next: Next) -> Response {
    let (token, loopback) = (access.0.as_deref(), access.1);
    let Some(token) = token else {
        // On loopback without a token, a page on a rebound DNS name
        // (same-origin for the browser) must not reach the API.
        if loopback && !crate::ui::host_allowed_without_token(request.headers()) {
            return ApiError(
                StatusCode::FORBIDDEN,
                "without api_token the API answers only at an IP address or localhost: set api_token to use a host name"
                    .into(),
            )
            .into_response();
        }
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110, 11.1).
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .unwrap_or_default();
    if same_secret(given, token) {
        return next.run(request).await;
    }
    let mut response = ApiError(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API token: send Authorization: Bearer <token> (the CLI sends api_token / COURIER_API_TOKEN)"
            .into(),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// Whether `given` is `secret`, in time that depends on neither: their
/// digests are compared, so not even the secret's length shows.
pub(crate) fn same_secret(given: &str, secret: &str) -> bool {
    let digest = |s: &str| courier_wire::ContentHash::of(s.as_bytes());
    bool::from(digest(given).0.ct_eq(&digest(secret).0))
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint".into(),
    )
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(e.status(), e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(e.status(), e.body_text())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    workflow: String,
    /// A param given twice is refused, not settled by whichever came last.
    #[serde(
        default,
        deserialize_with = "serde_with::As::<serde_with::MapPreventDuplicates<serde_with::Same, serde_with::Same>>::deserialize"
    )]
    params: BTreeMap<String, String>,
    /// Any integer: one out of range is refused with the engine's message.
    #[serde(default = "normal")]
    priority: i64,
}

fn normal() -> i64 {
    NORMAL_PRIORITY.into()
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<SubmitBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let priority = u8::try_from(body.priority).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            SubmitError::Priority(body.priority).to_string(),
        )
    })?;
    let engine = shared.engine.clone();
    let result = tokio::task::spawn_blocking(move || {
        engine
            .submit(&body.workflow, &body.params, priority)
            .map(|run| (serde_json::to_vec(&run), run.id, body.workflow))
    })
    .await
    .map_err(internal)?;
    match result {
        Ok((json, run, workflow)) => {
            shared.metrics.runs_submitted.inc();
            shared.outbox.notify_one();
            tracing::info!(run = %run, trace_id = %crate::engine::trace_id(&run), workflow = %workflow, "run submitted");
            let mut answer = json_answer(json)?;
            *answer.status_mut() = StatusCode::CREATED;
            Ok(answer)
        }
        Err(e @ SubmitError::UnknownWorkflow { .. }) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ SubmitError::Db(_)) => Err(internal(e)),
        Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

/// A filter left empty (`?status=`, as a form sends it) is no filter.
#[derive(Deserialize)]
struct ListQuery {
    #[serde(
        default,
        deserialize_with = "serde_with::As::<serde_with::NoneAsEmptyString>::deserialize"
    )]
    workflow: Option<String>,
    #[serde(
        default,
        deserialize_with = "serde_with::As::<serde_with::NoneAsEmptyString>::deserialize"
    )]
    status: Option<String>,
    #[serde(
        default,
        deserialize_with = "serde_with::As::<serde_with::NoneAsEmptyString>::deserialize"
    )]
    before: Option<String>,
    #[serde(
        default,
        deserialize_with = "serde_with::As::<serde_with::NoneAsEmptyString>::deserialize"
    )]
    limit: Option<usize>,
}

async fn list_runs(
    State(shared): State<Arc<Shared>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(50).min(1000);
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            let known: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("unknown status {} (known: {})", crate::quoted(s), known.join(", ")),
            )
        })?),
    };
    let engine = shared.engine.clone();
    let runs = tokio::task::spawn_blocking(move || {
        engine
            .with_db(|db| {
                if let Some(before) = q.before.as_deref()
                    && !db.has_run(before)?
                {
                    return Ok(Err(before.to_string()));
                }
                db.runs_within(
                    q.workflow.as_deref(),
                    status,
                    q.before.as_deref(),
                    limit,
                    crate::db::MAX_LIST_BYTES,
                )
                .map(Ok)
            })
            .map(|runs| runs.map(|runs| serde_json::to_vec(&runs)))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?
    .map_err(|before| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no run {}, given as the before= cursor", crate::quoted(&before)),
        )
    })?;
    json_answer(runs)
}

/// A JSON answer serialized on a blocking thread: runs' views, lists and
/// steps can be megabytes, and the async threads are shared with the
/// result intake and the outbox (see ARCHITECTURE.md).
fn json_answer(json: serde_json::Result<Vec<u8>>) -> Result<Response, ApiError> {
    Ok(([(header::CONTENT_TYPE, "application/json")], json.map_err(internal)?).into_response())
}

async fn get_run(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let engine = shared.engine.clone();
    let lookup = id.clone();
    let found = tokio::task::spawn_blocking(move || {
        engine
            .with_db(|db| db.run(&lookup))
            .map(|run| run.map(|run| serde_json::to_vec(&run)))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    match found {
        Some(json) => json_answer(json),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no run {}", crate::quoted(&id)),
        )),
    }
}

/// One step of a run whole: its output and transcript even when a run's
/// view leaves them out (`left_out_bytes`).
async fn get_step(
    State(shared): State<Arc<Shared>>,
    Path((id, step)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let engine = shared.engine.clone();
    let (run, name) = (id.clone(), step.clone());
    let found = tokio::task::spawn_blocking(move || {
        engine
            .with_db(|db| db.step(&run, &name))
            .map(|view| view.map(|view| serde_json::to_vec(&view)))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    match found {
        Some(json) => json_answer(json),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no step {} in run {}", crate::quoted(&step), crate::quoted(&id)),
        )),
    }
}

/// Longest `reason` or `by` a cancellation may carry.
const MAX_CANCEL_TEXT: usize = 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    step: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    by: Option<String>,
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // An empty body is a cancellation with nothing to add.
    let body: CancelBody = optional_json(&headers, &body)?;
    for (field, text) in [("reason", &body.reason), ("by", &body.by)] {
        if text.as_ref().is_some_and(|t| t.len() > MAX_CANCEL_TEXT) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("\"{field}\" is longer than {MAX_CANCEL_TEXT} bytes"),
            ));
        }
    }
    let by = format!("api:{}", body.by.as_deref().unwrap_or("anonymous"));
    let reason = body.reason.unwrap_or_else(|| format!("cancelled by {by}"));
    let engine = shared.engine.clone();
    let result = tokio::task::spawn_blocking(move || engine.cancel(&id, body.step.as_deref(), &by, &reason))
        .await
        .map_err(internal)?;
    match result {
        Ok(done) => {
            shared.count(&done.applied);
            shared.controls.notify_one();
            if done.applied.dispatched > 0 {
                shared.outbox.notify_one();
            }
            Ok(Json(done.run).into_response())
        }
        Err(e @ (CancelError::NotFound(_) | CancelError::NoStep { .. })) => {
            Err(ApiError(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e @ (CancelError::Finished { .. } | CancelError::StepFinished { .. })) => {
            Err(ApiError(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e @ CancelError::Db(_)) => Err(internal(e)),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    by: Option<String>,
}

async fn approve(
    State(shared): State<Arc<Shared>>,
    Path((id, step)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    decide(shared, id, step, true, (headers, body)).await
}

async fn reject(
    State(shared): State<Arc<Shared>>,
    Path((id, step)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    decide(shared, id, step, false, (headers, body)).await
}

/// A JSON body that may be left out: an empty one is `T::default()`;
/// anything else is JSON and says so in its Content-Type (never dropped
/// for a wrong header: a form-encoded `{"step": ...}` must not cancel the
/// whole run).
fn optional_json<T: serde::de::DeserializeOwned + Default>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")));
    if !json {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`".into(),
        ));
    }
    Ok(Json::<T>::from_bytes(body)?.0)
}

/// Longest comment an approval decision may carry (it becomes the step's output).
const MAX_COMMENT: usize = 64 * 1024;

async fn decide(
    shared: Arc<Shared>,
    id: String,
    step: String,
    approve: bool,
    (headers, body): (HeaderMap, Bytes),
) -> Result<Response, ApiError> {
    let body: DecideBody = optional_json(&headers, &body)?;
    if body.comment.as_ref().is_some_and(|c| c.len() > MAX_COMMENT) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("\"comment\" is longer than {MAX_COMMENT} bytes"),
        ));
    }
    if body.by.as_ref().is_some_and(|b| b.len() > MAX_CANCEL_TEXT) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("\"by\" is longer than {MAX_CANCEL_TEXT} bytes"),
        ));
    }
    let by = format!("api:{}", body.by.as_deref().unwrap_or("anonymous"));
    let comment = body
        .comment
        .unwrap_or_else(|| if approve { "approved" } else { "rejected" }.to_string());
    let engine = shared.engine.clone();
    let result = tokio::task::spawn_blocking(move || engine.decide(&id, &step, approve, &by, &comment))
        .await
        .map_err(internal)?;
    match result {
        Ok((run, applied)) => {
            shared.count(&applied);
            shared.outbox.notify_one();
            if applied.cancelled_runs > 0 {
                shared.controls.notify_one();
            }
            Ok(Json(run).into_response())
        }
        Err(e @ (DecideError::NotFound(_) | DecideError::NoStep { .. })) => {
            Err(ApiError(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e @ DecideError::NotWaiting { .. }) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e @ DecideError::Db(_)) => Err(internal(e)),
    }
}

async fn workflows(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let list: Vec<serde_json::Value> = shared
        .engine
        .config()
        .workflows
        .values()
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "description": w.description,
                "params": w.params,
                "schedule": w.schedule.as_ref().map(|s| &s.pattern),
                "steps": w.steps().iter().map(|s| &s.name).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(serde_json::Value::Array(list))
}

/// Healthy: leading and connected to the broker, or standing by (another
/// scheduler leads; this one serves the API).
async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let broker = shared.broker_connected.load(std::sync::atomic::Ordering::Relaxed);
    let leader = shared.leading.load(std::sync::atomic::Ordering::Relaxed);
    let (status, text) = match (leader, broker) {
        (true, true) => (StatusCode::OK, "ok"),
        (false, _) if shared.engine.shares_database() => (StatusCode::OK, "standby"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
    };
    (
        status,
        Json(serde_json::json!({ "status": text, "broker": broker, "leader": leader })),
    )
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let engine = shared.engine.clone();
    let (counts, waiting) = tokio::task::spawn_blocking(move || {
        engine.with_db(|db| Ok::<_, crate::db::DbError>((db.run_counts()?, db.waiting_counts()?)))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    // Every status, 0 when no run has it (a status that emptied reads 0,
    // not its last count).
    let counts: std::collections::HashMap<RunStatus, i64> = counts.into_iter().collect();
    for status in RunStatus::ALL {
        let n = counts.get(status).copied().unwrap_or(0);
        shared
            .metrics
            .runs
            .get_or_create(&crate::metrics::Status {
                status: status.as_str().into(),
            })
            .set(n);
    }
    // By limit (scope, name, kind): `waiting_on` texts carry times.
    let mut by_limit: std::collections::HashMap<crate::metrics::Limit, i64> = std::collections::HashMap::new();
    for (reason, n) in waiting {
        let (scope, name, limit) = crate::engine::waiting_labels(&reason);
        *by_limit
            .entry(crate::metrics::Limit {
                scope: scope.into(),
                name,
                limit,
            })
            .or_default() += n;
    }
    shared.metrics.steps_waiting.clear();
    for (labels, n) in by_limit {
        shared.metrics.steps_waiting.get_or_create(&labels).set(n);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &shared.registry).map_err(internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
