//! The web UI: server-rendered pages (maud, which escapes every value) over
//! the same engine as the HTTP API, kept live by Server-Sent Events and a
//! little plain JavaScript (`ui/app.js`), in the one binary.
//!
//! With `api_token` set, the UI asks for it once: a login form sets an
//! HttpOnly, SameSite=Strict session cookie, signed with the token
//! (HMAC-SHA256, 12 hours), so any scheduler sharing the token accepts it.
//! Every form that changes something carries a CSRF token derived from the
//! session, and every POST must come from the UI's own origin. Pages are
//! served with a Content-Security-Policy that allows scripts and styles from
//! the UI alone: a step's output (untrusted text) is escaped, and could not
//! run a script even if it were not.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use courier_wire::SigningKey;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::db::{RunStatus, RunView, StepStatus, StepView};
use crate::engine::{CancelError, DecideError, NORMAL_PRIORITY, SubmitError, now_ms};

/// How long a session cookie lasts.
const SESSION_MS: i64 = 12 * 3600 * 1000;
/// The session cookie's name.
const COOKIE: &str = "courier_session";
/// Live streams open at once, at most (each reads the database twice a second).
const MAX_STREAMS: usize = 32;
/// A live stream ends after this long (the browser reconnects by itself).
const STREAM_LIFE: Duration = Duration::from_secs(3600);
/// Runs the runs page lists.
const RUNS_SHOWN: usize = 200;
/// Dead letters the page shows (and can requeue), the oldest first.
const DEAD_SHOWN: u32 = 100;
/// Longest form field accepted (a param value, a comment).
const MAX_FIELD: usize = 64 * 1024;

/// The UI's script and styles, served from the binary.
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Where the UI reads dead letters and queue statistics.
#[derive(Debug, Clone)]
pub struct Operations {
    /// The broker (a URL or a list of the nodes').
    pub amqp_url: String,
    pub names: courier_amqp::Names,
    /// RabbitMQ's management API, for the queues page.
    pub management_url: Option<String>,
}

/// What the UI's routes share besides the engine.
#[derive(Debug)]
struct Ui {
    ops: Operations,
    /// One dead-letter operation at a time (each takes the whole queue).
    dead: tokio::sync::Mutex<()>,
    shared: Arc<Shared>,
    /// Signs sessions and CSRF tokens (from the API token); `None`: the UI
    /// is open (an API without a token, on loopback or allowed anonymous).
    key: Option<SigningKey>,
    token: Option<String>,
    /// Listening on loopback only: without a token, requests must name it
    /// by IP address or `localhost`.
    loopback: bool,
    streams: AtomicUsize,
}

/// The UI's routes: `/` and `/ui/...`.
pub fn router(shared: Arc<Shared>, token: Option<String>, loopback: bool, ops: Operations) -> Router {
    let token = token.filter(|t| !t.is_empty());
    let ui = Arc::new(Ui {
        ops,
        loopback,
        dead: tokio::sync::Mutex::new(()),
        shared,
        key: token.as_ref().map(|t| SigningKey::new("ui", t.as_bytes().to_vec())),
        token,
        streams: AtomicUsize::new(0),
    });
    let guarded = Router::new()
        .route("/ui/runs", get(runs_page))
        .route("/ui/runs/live", get(runs_live))
        .route("/ui/runs/{id}", get(run_page))
        .route("/ui/runs/{id}/live", get(run_live))
        .route("/ui/runs/{id}/cancel", post(cancel))
        .route("/ui/runs/{id}/steps/{step}/{decision}", post(decide))
        .route("/ui/workflows", get(workflows_page))
        .route("/ui/dead", get(dead_page))
        .route("/ui/dead/{id}/requeue", post(requeue_dead))
        .route("/ui/queues", get(queues_page))
        .route("/ui/workflows/{name}/runs", post(submit))
        .route("/ui/logout", post(logout))
        .layer(middleware::from_fn_with_state(ui.clone(), require_session));
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/app.js", get(|| async { asset("text/javascript", APP_JS) }))
        .route("/ui/app.css", get(|| async { asset("text/css", APP_CSS) }))
        .merge(guarded)
        .layer(middleware::from_fn(security_headers))
        .with_state(ui)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response()
}

/// Headers on every UI answer: scripts, styles and connections from the UI
/// alone, no framing, no sniffing, no referrer to other sites.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Outputs are not kept by the browser (the back button after logout).
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// The session a request carries, if valid: its cookie value.
fn session(ui: &Ui, headers: &HeaderMap) -> Option<String> {
    let key = ui.key.as_ref()?;
    // Every cookie of that name: one planted beside ours cannot hide it.
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")))
        .find(|value| {
            let Some((expiry, mac)) = value.split_once('.') else {
                return false;
            };
            let Ok(expiry_ms) = expiry.parse::<i64>() else {
                return false;
            };
            let expected = key.sign(format!("session:{expiry_ms}").as_bytes());
            expiry_ms > now_ms() && bool::from(mac.as_bytes().ct_eq(expected.as_bytes()))
        })
        .map(str::to_string)
}

/// The CSRF token forms carry for a session (`-` when the UI is open).
fn csrf_for(ui: &Ui, session: Option<&str>) -> String {
    match (&ui.key, session) {
        (Some(key), Some(session)) => key.sign(format!("csrf:{session}").as_bytes()),
        _ => "-".into(),
    }
}

/// A POST from elsewhere than the UI's own pages: refused. Browsers send
/// `Origin` on every POST (and `Sec-Fetch-Site`); a request with neither
/// (not a browser) passes this check and still needs the session and the
/// CSRF token when a token is set.
fn cross_site(headers: &HeaderMap) -> bool {
    // Browsers that send it say it best.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site != "same-origin" && site != "none";
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) != Some(host),
        (Some(_), None) => true,
        _ => false,
    }
}

/// A top-level navigation the user made (following a link, typing the
/// address), not an embedding or a fetch: browsers say so in
/// `Sec-Fetch-User` (a script may still navigate for a few seconds after
/// any click on its page).
fn user_navigation(headers: &HeaderMap) -> bool {
    let is = |name: &str, value: &str| headers.get(name).and_then(|v| v.to_str().ok()) == Some(value);
    is("sec-fetch-mode", "navigate") && is("sec-fetch-dest", "document") && is("sec-fetch-user", "?1")
}

/// Without a token, the UI answers only to an IP address or `localhost`:
/// a page on a rebound DNS name (same-origin for the browser) is refused.
pub(crate) fn host_allowed_without_token(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = if host.starts_with('[') {
        host.split(']').next().map(|h| &h[1..]).unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok()
}

async fn require_session(State(ui): State<Arc<Ui>>, request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST && cross_site(request.headers()) {
        return page_error(StatusCode::FORBIDDEN, "cross-site request refused");
    }
    if ui.key.is_none() && ui.loopback && !host_allowed_without_token(request.headers()) {
        return page_error(
            StatusCode::FORBIDDEN,
            "without api_token the UI answers only at an IP address or localhost: set api_token to use a host name",
        );
    }
    if ui.key.is_none() || session(&ui, request.headers()).is_some() {
        return next.run(request).await;
    }
    if request.method() == axum::http::Method::GET && !request.uri().path().ends_with("/live") {
        return Redirect::to("/ui/login").into_response();
    }
    page_error(StatusCode::UNAUTHORIZED, "log in first")
}

/// A page refused: its status and what to tell the user.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        page_error(self.0, &self.1)
    }
}

/// The CSRF token a form sent must be the session's.
fn check_csrf(ui: &Ui, headers: &HeaderMap, sent: &str) -> Result<(), Refusal> {
    if ui.key.is_none() {
        return Ok(());
    }
    let expected = csrf_for(ui, session(ui, headers).as_deref());
    if bool::from(sent.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(Refusal(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong: reload the page".into(),
        ))
    }
}

fn layout(title: &str, csrf: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Courier" }
                link rel="stylesheet" href="/ui/app.css";
                script src="/ui/app.js" defer {}
            }
            body {
                header {
                    nav {
                        a.brand href="/ui/runs" { "Courier" }
                        a href="/ui/runs" { "Runs" }
                        a href="/ui/workflows" { "Workflows" }
                        a href="/ui/dead" { "Dead letters" }
                        a href="/ui/queues" { "Queues" }
                        @if csrf != "-" {
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn page_error(status: StatusCode, message: &str) -> Response {
    let body = layout(
        "Error",
        "-",
        html! {
            h1 { "Error" }
            p.error role="alert" { (message) }
            p { a href="/ui/runs" { "Back to the runs" } }
        },
    );
    (status, body).into_response()
}

async fn login_page(State(ui): State<Arc<Ui>>) -> Response {
    if ui.key.is_none() {
        return Redirect::to("/ui/runs").into_response();
    }
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let body = layout(
        "Log in",
        "-",
        html! {
            h1 { "Log in" }
            @if let Some(error) = error { p.error role="alert" { (error) } }
            form method="post" action="/ui/login" {
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
        },
    );
    (status, body).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(ui): State<Arc<Ui>>, headers: HeaderMap, form: Form<LoginForm>) -> Response {
    if cross_site(&headers) {
        return page_error(StatusCode::FORBIDDEN, "cross-site request refused");
    }
    let (Some(key), Some(token)) = (&ui.key, &ui.token) else {
        return Redirect::to("/ui/runs").into_response();
    };
    if !crate::api::same_secret(&form.token, token) {
        return login_form(StatusCode::UNAUTHORIZED, Some("wrong token"));
    }
    let expiry = now_ms() + SESSION_MS;
    let value = format!("{expiry}.{}", key.sign(format!("session:{expiry}").as_bytes()));
    let cookie = format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_MS / 1000
    );
    let mut response = Redirect::to("/ui/runs").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(ui): State<Arc<Ui>>, headers: HeaderMap, form: Form<CsrfForm>) -> Response {
    if let Err(refused) = check_csrf(&ui, &headers, &form.csrf) {
        return refused.into_response();
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("courier_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

#[derive(Deserialize, Default)]
struct RunsQuery {
    workflow: Option<String>,
    status: Option<String>,
}

impl RunsQuery {
    fn status(&self) -> Option<RunStatus> {
        self.status.as_deref().and_then(RunStatus::parse)
    }

    fn workflow(&self) -> Option<&str> {
        self.workflow.as_deref().filter(|w| !w.is_empty())
    }
}

/// Read the database off the runtime's threads.
async fn read<T: Send + 'static>(
    ui: &Ui,
    f: impl FnOnce(&mut crate::db::Db) -> Result<T, crate::db::DbError> + Send + 'static,
) -> Result<T, Refusal> {
    let engine = ui.shared.engine.clone();
    match tokio::task::spawn_blocking(move || engine.with_db(f)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "UI: database read failed");
            Err(Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the database failed; see the scheduler's log".into(),
            ))
        }
        Err(_) => Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())),
    }
}

async fn runs_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let (workflow, status) = (q.workflow().map(str::to_string), q.status());
    let runs = match read(&ui, move |db| db.run_summaries(workflow.as_deref(), status, RUNS_SHOWN)).await {
        Ok(runs) => runs,
        Err(e) => return e.into_response(),
    };
    let csrf = csrf_for(&ui, session(&ui, &headers).as_deref());
    let names: Vec<&String> = ui.shared.engine.config().workflows.keys().collect();
    let rows = run_rows(&runs).into_string();
    let mut live = format!("/ui/runs/live?v={}&", version(&rows));
    if let Some(w) = q.workflow() {
        let _ = write!(live, "workflow={}&", urlencode(w));
    }
    if let Some(s) = q.status() {
        let _ = write!(live, "status={s}");
    }
    let body = html! {
        h1 { "Runs" }
        form.filters method="get" action="/ui/runs" {
            label for="workflow" { "Workflow" }
            select #workflow name="workflow" {
                option value="" { "all" }
                @for name in &names {
                    option value=(name) selected[q.workflow() == Some(name.as_str())] { (name) }
                }
            }
            label for="status" { "Status" }
            select #status name="status" {
                option value="" { "all" }
                @for s in RunStatus::ALL {
                    option value=(s) selected[q.status() == Some(*s)] { (s) }
                }
            }
            button type="submit" { "Filter" }
        }
        div.scroll {
            table #runs data-live=(live) {
                thead { tr { th { "Run" } th { "Workflow" } th { "Status" } th { "Started" } th { "Duration" } th title="with its sub-workflows' runs" { "Tokens" } th title="with its sub-workflows' runs" { "Cost" } } }
                tbody #rows { (PreEscaped(&rows)) }
            }
        }
    };
    layout("Runs", &csrf, body).into_response()
}

fn run_rows(runs: &[crate::db::RunSummary]) -> Markup {
    html! {
        @if runs.is_empty() { tr { td colspan="7" { "No runs yet." } } }
        @for run in runs {
            tr {
                td { a href={ "/ui/runs/" (run.id) } { code { (run.id) } } }
                td { (run.workflow) }
                td { span class={ "status st-" (run.status) } { (run.status) } }
                td { (time(run.created_ms)) }
                td { (duration(run.created_ms, run.finished_ms)) }
                td.num { (run.tokens) }
                td.num { (format!("{:.4}", run.cost)) }
            }
        }
    }
}

async fn runs_live(
    State(ui): State<Arc<Ui>>,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
    v: Result<Query<LiveQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let shown = v.map(|Query(v)| v.v).unwrap_or_default();
    let (workflow, status) = (q.workflow().map(str::to_string), q.status());
    stream(ui, Duration::from_secs(1), shown, move |ui| {
        let workflow = workflow.clone();
        async move {
            let runs = read(&ui, move |db| db.run_summaries(workflow.as_deref(), status, RUNS_SHOWN))
                .await
                .ok()?;
            Some((run_rows(&runs).into_string(), false))
        }
    })
}

/// A live stream: every `every`, `render` gives the fragment (and whether
/// it is the last one: the run ended); a fragment is sent when it changed.
fn stream<F, Fut>(ui: Arc<Ui>, every: Duration, shown: String, render: F) -> Response
where
    F: Fn(Arc<Ui>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<(String, bool)>> + Send,
{
    if ui.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        ui.streams.fetch_sub(1, Ordering::Relaxed);
        return page_error(StatusCode::SERVICE_UNAVAILABLE, "too many live pages open");
    }
    struct Open(Arc<Ui>);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let started = tokio::time::Instant::now();
    // The first look is at once: the page may be older than the stream.
    let state = (Open(ui), render, shown, false, true);
    let events = futures_lite::stream::unfold(state, move |(open, render, last, done, first)| async move {
        if done || started.elapsed() > STREAM_LIFE {
            return None;
        }
        let mut first = first;
        loop {
            if !first {
                tokio::time::sleep(every).await;
            }
            first = false;
            let (fragment, ended) = render(open.0.clone()).await?;
            let now = version(&fragment);
            if now != last || ended {
                let event = Event::default()
                    .event(if ended { "end" } else { "update" })
                    .data(&fragment);
                return Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (open, render, now, ended, false),
                ));
            }
            if started.elapsed() > STREAM_LIFE {
                return None;
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

async fn run_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let lookup = id.clone();
    let found = match read(&ui, move |db| Ok((db.run(&lookup)?, db.child_runs(&lookup)?))).await {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let (Some(run), children) = found else {
        return page_error(StatusCode::NOT_FOUND, &format!("no run {}", crate::quoted(&id)));
    };
    let csrf = csrf_for(&ui, session(&ui, &headers).as_deref());
    let Some((run, fragment)) = render_run(&ui, run, children, csrf.clone()).await else {
        return page_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    };
    let live = if run.status == RunStatus::Running {
        format!("/ui/runs/{}/live?v={}", run.id, version(&fragment))
    } else {
        String::new()
    };
    let body = html! {
        h1 { "Run " code { (run.id) } }
        div #live data-live=(live) { (PreEscaped(&fragment)) }
    };
    layout(&format!("Run {}", run.id), &csrf, body).into_response()
}

async fn run_live(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    v: Result<Query<LiveQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let csrf = csrf_for(&ui, session(&ui, &headers).as_deref());
    let shown = v.map(|Query(v)| v.v).unwrap_or_default();
    // The last fragment, by the fingerprint it was read at: the run is read
    // again only when its fingerprint changes (a step's label of what holds
    // it, or an error noted after its end, shows with the next change).
    let last: Arc<std::sync::Mutex<Option<(String, String, bool)>>> = Arc::default();
    stream(ui, Duration::from_millis(500), shown, move |ui| {
        let (id, csrf, last) = (id.clone(), csrf.clone(), last.clone());
        async move {
            let lookup = id.clone();
            let print = read(&ui, move |db| db.run_fingerprint(&lookup)).await.ok()??;
            if let Some((seen, fragment, ended)) =
                last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
                && *seen == print
            {
                return Some((fragment.clone(), *ended));
            }
            let lookup = id.clone();
            let (run, children) = read(&ui, move |db| Ok((db.run(&lookup)?, db.child_runs(&lookup)?)))
                .await
                .ok()?;
            let (run, fragment) = render_run(&ui, run?, children, csrf).await?;
            let ended = run.status != RunStatus::Running;
            *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((print, fragment.clone(), ended));
            Some((fragment, ended))
        }
    })
}

/// [`run_fragment`] on a blocking thread: a run's view holds up to 16 MiB
/// of outputs, and the async threads are shared with the result intake
/// and the outbox (see ARCHITECTURE.md).
async fn render_run(
    ui: &Arc<Ui>,
    run: RunView,
    children: Vec<(String, String, RunStatus)>,
    csrf: String,
) -> Option<(RunView, String)> {
    let ui = ui.clone();
    tokio::task::spawn_blocking(move || {
        let fragment = run_fragment(&ui, &run, &children, &csrf).into_string();
        (run, fragment)
    })
    .await
    .ok()
}

/// Everything on a run's page that changes: its summary, buttons, graph,
/// steps, child runs.
fn run_fragment(ui: &Ui, run: &RunView, children: &[(String, String, RunStatus)], csrf: &str) -> Markup {
    let running = run.status == RunStatus::Running;
    html! {
        dl.summary {
            dt { "Workflow" } dd { (run.workflow) }
            dt { "Status" } dd { span #run-status class={ "status st-" (run.status) } { (run.status) } }
            dt { "Started" } dd { (time(run.created_ms)) }
            dt { "Duration" } dd { (duration(run.created_ms, run.finished_ms)) }
            dt { "Tokens" } dd { (run.input_tokens) " in, " (run.output_tokens) " out" }
            dt { "Cost" } dd { (format!("{:.4}", run.cost)) }
            dt { "Priority" } dd { (run.priority) }
            @if let Some(parent) = &run.parent_run {
                dt { "Parent" } dd { a href={ "/ui/runs/" (parent) } { code { (parent) } } " step " (run.parent_step.as_deref().unwrap_or("")) }
            }
            @if let Some(error) = &run.error { dt { "Error" } dd.error { (error) } }
            @if let Some(by) = &run.cancelled_by { dt { "Cancelled by" } dd { (by) } }
        }
        @if running {
            form.inline method="post" action={ "/ui/runs/" (run.id) "/cancel" } {
                input type="hidden" name="csrf" value=(csrf);
                button.danger type="submit" { "Cancel run" }
            }
        }
        h2 { "Graph" }
        div.scroll { (graph(ui, run)) }
        h2 { "Steps" }
        div.scroll {
            table #steps {
                thead { tr { th { "Step" } th { "Status" } th { "Attempts" } th { "Worker" } th { "Started" } th { "Duration" } th { "Output / error" } } }
                tbody {
                    @for step in &run.steps { (step_row(run, step, csrf)) }
                }
            }
        }
        @if !children.is_empty() {
            h2 { "Child runs" }
            ul {
                @for (id, workflow, status) in children {
                    li { a href={ "/ui/runs/" (id) } { code { (id) } } " " (workflow) " " span class={ "status st-" (status) } { (status) } }
                }
            }
        }
    }
}

fn step_row(run: &RunView, step: &StepView, csrf: &str) -> Markup {
    let item = step.name.ends_with(']');
    html! {
        tr id={ "step-" (step.name) } class=[item.then_some("item")] {
            th scope="row" { (step.name) }
            td { span class={ "status st-" (step.status) } { (step.status) }
                @if let Some(w) = &step.waiting_on { br; small { (w) } } }
            td.num { (step.attempts) }
            td { (step.worker.as_deref().unwrap_or("")) }
            td { (step.started_ms.map(time).unwrap_or_default()) }
            td { (step.started_ms.map(|s| duration(s, step.finished_ms)).unwrap_or_default()) }
            td.output {
                @if let Some(output) = &step.output { (preview("out", output)) }
                @if let Some(n) = step.left_out_bytes { small { (n) " bytes of output and transcript, left out of the run's view (GET /api/runs/…/steps/" (step.name) ")" } }
                @if let Some(error) = &step.error { (preview("error", error)) }
                @if let Some(model) = &step.model {
                    small { (model) ": " (step.input_tokens.unwrap_or(0)) " in, " (step.output_tokens.unwrap_or(0)) " out"
                        @if let Some(cost) = step.cost { ", cost " (format!("{cost:.4}")) } }
                }
                @if let Some(transcript) = &step.transcript { (transcript_view(transcript)) }
                @if step.status == StepStatus::WaitingApproval && run.status == RunStatus::Running {
                    form.inline.decide method="post" action={ "/ui/runs/" (run.id) "/steps/" (urlencode(&step.name)) "/approve" } {
                        input type="hidden" name="csrf" value=(csrf);
                        label { "Comment " input type="text" name="comment" maxlength="1000"; }
                        button type="submit" { "Approve" }
                        button.danger type="submit" formaction={ "/ui/runs/" (run.id) "/steps/" (urlencode(&step.name)) "/reject" } { "Reject" }
                    }
                }
            }
        }
    }
}

/// Text shown on a page at most, per output, error or message (the API
/// has it all: `GET /api/runs/{id}`).
const PREVIEW_BYTES: usize = 4096;
/// Transcript messages shown at most.
const PREVIEW_MESSAGES: usize = 50;

/// The start of a long text, and how much was left out.
fn preview(class: &str, text: &str) -> Markup {
    let mut end = text.len().min(PREVIEW_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    html! {
        pre class=(class) { (&text[..end]) }
        @if end < text.len() { small { "… " (text.len() - end) " more bytes (the whole text: GET /api/runs/…)" } }
    }
}

/// An agent step's conversation: each message's role and content, tool
/// calls shown as their JSON.
fn transcript_view(transcript: &serde_json::Value) -> Markup {
    let messages = transcript.as_array().map(Vec::as_slice).unwrap_or_default();
    html! {
        details.transcript {
            summary { "Transcript (" (messages.len()) " messages)" }
            @if messages.len() > PREVIEW_MESSAGES { p { small { "The last " (PREVIEW_MESSAGES) " messages." } } }
            ol {
                @for m in &messages[messages.len().saturating_sub(PREVIEW_MESSAGES)..] {
                    li {
                        strong { (m["role"].as_str().unwrap_or("?")) }
                        @match &m["content"] {
                            serde_json::Value::String(text) => (preview("msg", text)),
                            serde_json::Value::Null => {},
                            other => (preview("msg", &serde_json::to_string_pretty(other).unwrap_or_default())),
                        }
                        @for (key, value) in m.as_object().into_iter().flatten().filter(|(k, _)| *k != "role" && *k != "content") {
                            (preview("msg", &format!("{key}: {}", serde_json::to_string_pretty(value).unwrap_or_default())))
                        }
                    }
                }
            }
        }
    }
}

/// The run's DAG as an SVG, layered: each step one column right of its
/// deepest dependency; foreach items shown through their step.
fn graph(ui: &Ui, run: &RunView) -> Markup {
    let Some(wf) = ui.shared.engine.config().workflows.get(&run.workflow) else {
        return html! { p { "The workflow is no longer configured: no graph." } };
    };
    let status: HashMap<&str, StepStatus> = run
        .steps
        .iter()
        .filter(|s| !s.name.ends_with(']'))
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    // Steps are in dependency order (validated at load): one pass.
    let mut layer: BTreeMap<&str, usize> = BTreeMap::new();
    for step in wf.steps() {
        let depth = step
            .depends
            .iter()
            .filter_map(|d| layer.get(d.as_str()))
            .map(|d| d + 1)
            .max()
            .unwrap_or(0);
        layer.insert(&step.name, depth);
    }
    let (w, h, gap_x, gap_y) = (170, 28, 60, 12);
    let mut rows_in: BTreeMap<usize, usize> = BTreeMap::new();
    let mut at: HashMap<&str, (usize, usize)> = HashMap::new();
    for step in wf.steps() {
        let l = layer[step.name.as_str()];
        let row = rows_in.entry(l).or_default();
        at.insert(&step.name, (10 + l * (w + gap_x), 10 + *row * (h + gap_y)));
        *row += 1;
    }
    let width = 20 + (rows_in.len().max(1)) * (w + gap_x);
    let height = 20 + rows_in.values().max().copied().unwrap_or(1) * (h + gap_y);
    let mut edges = String::new();
    for step in wf.steps() {
        let (x2, y2) = at[step.name.as_str()];
        for d in &step.depends {
            if let Some(&(x1, y1)) = at.get(d.as_str()) {
                let _ = write!(
                    edges,
                    "<path class=\"edge\" d=\"M{} {} C{} {} {} {} {} {}\"/>",
                    x1 + w,
                    y1 + h / 2,
                    x1 + w + gap_x / 2,
                    y1 + h / 2,
                    x2 - gap_x / 2,
                    y2 + h / 2,
                    x2,
                    y2 + h / 2
                );
            }
        }
    }
    html! {
        svg.dag xmlns="http://www.w3.org/2000/svg" width=(width) height=(height) viewBox={ "0 0 " (width) " " (height) } role="img" aria-label="the run's steps and their dependencies" {
            (PreEscaped(edges))
            @for step in wf.steps() {
                @let (x, y) = at[step.name.as_str()];
                @let st = status.get(step.name.as_str()).copied();
                g class={ "node st-" (st.map_or("pending", StepStatus::as_str)) } {
                    title { (step.name) ": " (st.map_or("pending", StepStatus::as_str)) }
                    rect x=(x) y=(y) width=(w) height=(h) rx="4" {}
                    text x=(x + 8) y=(y + 18) { (truncate(&step.name, 22)) }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: String,
}

async fn cancel(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_csrf(&ui, &headers, &form.csrf) {
        return refused.into_response();
    }
    let engine = ui.shared.engine.clone();
    let run = id.clone();
    let result =
        tokio::task::spawn_blocking(move || engine.cancel(&run, None, "ui", "cancelled from the web UI")).await;
    match result {
        Ok(Ok(done)) => {
            ui.shared.count(&done.applied);
            ui.shared.controls.notify_one();
            ui.shared.outbox.notify_one();
            Redirect::to(&format!("/ui/runs/{id}")).into_response()
        }
        Ok(Err(e @ CancelError::NotFound(_))) => page_error(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ CancelError::Db(_))) => {
            tracing::error!(error = %e, "UI: cancel failed");
            page_error(StatusCode::INTERNAL_SERVER_ERROR, "the database failed")
        }
        Ok(Err(e)) => page_error(StatusCode::CONFLICT, &e.to_string()),
        Err(_) => page_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn decide(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path((id, step, decision)): Path<(String, String, String)>,
    form: Form<DecideForm>,
) -> Response {
    if let Err(refused) = check_csrf(&ui, &headers, &form.csrf) {
        return refused.into_response();
    }
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return page_error(StatusCode::NOT_FOUND, "no such decision"),
    };
    if form.comment.len() > MAX_FIELD {
        return page_error(StatusCode::BAD_REQUEST, "the comment is too long");
    }
    let comment = if form.comment.is_empty() {
        if approve { "approved" } else { "rejected" }.to_string()
    } else {
        form.comment.clone()
    };
    let engine = ui.shared.engine.clone();
    let run = id.clone();
    let result = tokio::task::spawn_blocking(move || engine.decide(&run, &step, approve, "ui", &comment)).await;
    match result {
        Ok(Ok((_, applied))) => {
            ui.shared.count(&applied);
            ui.shared.outbox.notify_one();
            ui.shared.controls.notify_one();
            Redirect::to(&format!("/ui/runs/{id}")).into_response()
        }
        Ok(Err(e @ (DecideError::NotFound(_) | DecideError::NoStep { .. }))) => {
            page_error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Ok(Err(e @ DecideError::NotWaiting { .. })) => page_error(StatusCode::CONFLICT, &e.to_string()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "UI: decision failed");
            page_error(StatusCode::INTERNAL_SERVER_ERROR, "the database failed")
        }
        Err(_) => page_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn workflows_page(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    let csrf = csrf_for(&ui, session(&ui, &headers).as_deref());
    let workflows = &ui.shared.engine.config().workflows;
    let body = html! {
        h1 { "Workflows" }
        @for wf in workflows.values() {
            section.workflow id={ "wf-" (wf.name) } {
                h2 { (wf.name) }
                @if let Some(d) = &wf.description { p { (d) } }
                @if let Some(s) = &wf.schedule { p { "Schedule: " code { (s.pattern) } } }
                p { "Steps: " @for (i, step) in wf.steps().iter().enumerate() {
                    @if i > 0 { ", " } code { (step.name) } } }
                form.submit method="post" action={ "/ui/workflows/" (wf.name) "/runs" } {
                    input type="hidden" name="csrf" value=(csrf);
                    @for (param, default) in &wf.params {
                        label for={ "p-" (wf.name) "-" (param) } { (param) @if default.is_none() { " (required)" } }
                        input id={ "p-" (wf.name) "-" (param) } type="text" name={ "param." (param) }
                            value=[default.as_deref()] required[default.is_none()] maxlength="65536";
                    }
                    label for={ "prio-" (wf.name) } { "Priority (0–9)" }
                    input id={ "prio-" (wf.name) } type="number" name="priority" min="0" max="9" value=(NORMAL_PRIORITY);
                    button type="submit" { "Start a run" }
                }
            }
        }
    };
    layout("Workflows", &csrf, body).into_response()
}

async fn submit(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let sent_csrf = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    if let Err(refused) = check_csrf(&ui, &headers, sent_csrf) {
        return refused.into_response();
    }
    if fields.len() > 256 || fields.iter().any(|(k, v)| k.len() > 256 || v.len() > MAX_FIELD) {
        return page_error(StatusCode::BAD_REQUEST, "too many or too long fields");
    }
    // A field the form does not have, or one of its own given twice, is
    // refused, as the API refuses an unknown field.
    for (k, _) in &fields {
        let known = k == "csrf" || k == "priority" || k.starts_with("param.");
        if !known {
            return page_error(StatusCode::BAD_REQUEST, &format!("unknown field {}", crate::quoted(k)));
        }
        if !k.starts_with("param.") && fields.iter().filter(|(other, _)| other == k).count() > 1 {
            return page_error(
                StatusCode::BAD_REQUEST,
                &format!("the field {} is given twice", crate::quoted(k)),
            );
        }
    }
    // A param given twice is refused, as the API does, not settled by
    // whichever came last.
    let mut params = BTreeMap::new();
    for (k, v) in &fields {
        if let Some(name) = k.strip_prefix("param.")
            && params.insert(name.to_string(), v.clone()).is_some()
        {
            return page_error(
                StatusCode::BAD_REQUEST,
                &format!("the param {} is given twice", crate::quoted(name)),
            );
        }
    }
    let priority = match fields.iter().find(|(k, _)| k == "priority").map(|(_, v)| v.trim()) {
        None | Some("") => NORMAL_PRIORITY,
        Some(p) => match p.parse::<u8>() {
            Ok(p) => p,
            Err(_) => return page_error(StatusCode::BAD_REQUEST, "the priority must be a number from 0 to 9"),
        },
    };
    let engine = ui.shared.engine.clone();
    let result = tokio::task::spawn_blocking(move || engine.submit(&name, &params, priority)).await;
    match result {
        Ok(Ok(run)) => {
            ui.shared.metrics.runs_submitted.inc();
            ui.shared.outbox.notify_one();
            tracing::info!(run = %run.id, workflow = %run.workflow, "run submitted from the web UI");
            Redirect::to(&format!("/ui/runs/{}", run.id)).into_response()
        }
        Ok(Err(e @ SubmitError::UnknownWorkflow { .. })) => page_error(StatusCode::NOT_FOUND, &e.to_string()),
        Ok(Err(e @ SubmitError::Db(_))) => {
            tracing::error!(error = %e, "UI: submit failed");
            page_error(StatusCode::INTERNAL_SERVER_ERROR, "the database failed")
        }
        Ok(Err(e)) => page_error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(_) => page_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

/// A connection to the broker for one dead-letter operation.
async fn broker(ui: &Ui) -> Result<courier_amqp::Broker, Refusal> {
    courier_amqp::Broker::connect(&ui.ops.amqp_url, ui.ops.names.clone(), "courier-ui")
        .await
        .map_err(|e| Refusal(StatusCode::BAD_GATEWAY, format!("cannot reach the broker: {e}")))
}

async fn dead_page(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    // Reading takes the dead letters off their queue (and gives them back,
    // which counts as a delivery): another site must not make a browser
    // do it, over and over. A link the user follows from another site
    // (RabbitMQ's management UI, say) gets a page that reads nothing, with
    // a link of this site's own to follow.
    let csrf = csrf_for(&ui, session(&ui, &headers).as_deref());
    if cross_site(&headers) {
        if !user_navigation(&headers) {
            return page_error(StatusCode::FORBIDDEN, "cross-site request refused");
        }
        let body = html! {
            h1 { "Dead letters" }
            p { "Reading them takes them off their queue for a moment: " a href="/ui/dead" { "show the dead letters" } "." }
        };
        return layout("Dead letters", &csrf, body).into_response();
    }
    let _one = ui.dead.lock().await;
    let broker = match broker(&ui).await {
        Ok(broker) => broker,
        Err(refused) => return refused.into_response(),
    };
    let (taken, letters) = match crate::ops::DeadLetters::open(&broker, DEAD_SHOWN).await {
        Ok(mut letters) => (letters.all().await, Some(letters)),
        Err(e) => (Err(e), None),
    };
    let body = match &taken {
        Ok(dead) => html! {
            h1 { "Dead letters" }
            p { "The oldest " (dead.len()) " in " code { (ui.ops.names.dead()) } " (at most " (DEAD_SHOWN) " shown; `courier dead list` shows them all)" }
            div.scroll { table #dead {
                thead { tr { th { "Task" } th { "Run" } th { "Pool" } th { "Attempt" } th { "Bytes" } th { "Reason" } th {} } }
                tbody {
                    @if dead.is_empty() { tr { td colspan="7" { "None." } } }
                    @for d in dead {
                        tr {
                            td { code { (d.id()) } }
                            td { a href={ "/ui/runs/" (urlencode(d.run_id())) } { code { (d.run_id()) } } }
                            td { (d.pool()) }
                            td.num { (d.attempt().map(|a| a.to_string()).unwrap_or_default()) }
                            td.num { (d.bytes()) }
                            td { pre.error { (d.reason()) } }
                            td { @if !d.is_result() {
                                form.inline method="post" action={ "/ui/dead/" (urlencode(d.id())) "/requeue" } {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button type="submit" { "Requeue" }
                                }
                            } }
                        }
                    }
                }
            } }
        },
        Err(e) => html! { h1 { "Dead letters" } p.error role="alert" { "cannot read them: " (e) } },
    };
    if let Some(letters) = letters {
        // Unacknowledged: they go back to the queue.
        letters.close().await;
    }
    let _ = broker.close().await;
    layout("Dead letters", &csrf, body).into_response()
}

async fn requeue_dead(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_csrf(&ui, &headers, &form.csrf) {
        return refused.into_response();
    }
    let _one = ui.dead.lock().await;
    let broker = match broker(&ui).await {
        Ok(broker) => broker,
        Err(refused) => return refused.into_response(),
    };
    let outcome = async {
        let mut letters = crate::ops::DeadLetters::open(&broker, DEAD_SHOWN)
            .await
            .map_err(|e| e.to_string())?;
        // A refused result carries its task's id: the task is looked for
        // past it.
        let mut found = None;
        let mut read = Ok(());
        loop {
            match letters.next(|d| d.id() == id && !d.is_result()).await {
                Ok(Some(d)) if d.id() == id && !d.is_result() => {
                    found = Some(d);
                    break;
                }
                Ok(Some(d)) if d.id() == id => found = Some(d),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    read = Err(e.to_string());
                    break;
                }
            }
        }
        let result = match (read, found) {
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(format!("no dead-lettered task \"{id}\"")),
            (Ok(()), Some(d)) if d.is_result() => Err(format!(
                "\"{id}\" is a refused result, not a task: it cannot be requeued"
            )),
            (Ok(()), Some(d)) => {
                async {
                    // Taken with its body (above).
                    let body = d.body().ok_or("the dead letter was read without its body")?;
                    let publisher = broker.publisher(16).await.map_err(|e| e.to_string())?;
                    let sent = crate::ops::requeue(&broker, &publisher, &d, body)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = publisher.close().await;
                    sent
                }
                .await
            }
        };
        letters.close().await;
        result
    }
    .await;
    let _ = broker.close().await;
    match outcome {
        Ok(()) => {
            tracing::info!(task = %id, "dead-lettered task requeued from the web UI");
            Redirect::to("/ui/dead").into_response()
        }
        Err(e) => page_error(StatusCode::CONFLICT, &e),
    }
}

async fn queues_page(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    let csrf = csrf_for(&ui, session(&ui, &headers).as_deref());
    let queues = match &ui.ops.management_url {
        Some(url) => crate::ops::queues(url, &ui.ops.amqp_url, ui.ops.names.namespace()).await,
        None => Err("management_url is not set".to_string()),
    };
    let body = html! {
        h1 { "Queues" }
        @match &queues {
            Ok(queues) => div.scroll { table #queues {
                thead { tr { th { "Queue" } th { "Ready" } th { "Unacked" } th { "Consumers" } th { "In/s" } th { "Out/s" } th { "Ack/s" } } }
                tbody {
                    @if queues.is_empty() { tr { td colspan="7" { "No queues of this namespace yet." } } }
                    @for q in queues {
                        tr {
                            td { code { (q.name) } }
                            td.num { (q.ready) } td.num { (q.unacked) } td.num { (q.consumers) }
                            td.num { (format!("{:.1}", q.publish_rate)) }
                            td.num { (format!("{:.1}", q.deliver_rate)) }
                            td.num { (format!("{:.1}", q.ack_rate)) }
                        }
                    }
                }
            } },
            Err(e) => p.error role="alert" { (e) },
        }
    };
    layout("Queues", &csrf, body).into_response()
}

/// The version of a rendered fragment, so a stream sends only what changed
/// since the page (or its last update) was rendered.
fn version(fragment: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fragment.hash(&mut h);
    format!("{:016x}", h.finish())
}

#[derive(Deserialize, Default)]
struct LiveQuery {
    /// The version of the fragment the page shows.
    #[serde(default)]
    v: String,
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut short: String = text.chars().take(max - 1).collect();
        short.push('…');
        short
    }
}

/// A time as UTC `YYYY-MM-DD HH:MM:SS`.
fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// How long something took; "running" while it runs (no clock in a live
/// fragment, so it changes only when something happens).
fn duration(start_ms: i64, end_ms: Option<i64>) -> String {
    let Some(end) = end_ms else {
        return "running".into();
    };
    let ms = (end - start_ms).max(0);
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_from_another_origin_is_cross_site() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(!cross_site(&h), "no Origin: not a browser's cross-site POST");
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(cross_site(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&h), "the browser's own word");
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }

    #[test]
    fn without_a_token_only_addresses_and_localhost_are_answered() {
        let host = |h: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_static(h));
            host_allowed_without_token(&m)
        };
        assert!(host("127.0.0.1:8080") && host("localhost:8080") && host("[::1]:8080") && host("10.0.0.5"));
        assert!(!host("evil.example:8080") && !host("rebind.attacker.test"));
    }

    #[test]
    fn durations_and_names_read_well() {
        assert_eq!(duration(0, None), "running");
        assert_eq!(duration(0, Some(250)), "250 ms");
        assert_eq!(duration(0, Some(1500)), "1.5 s");
        assert_eq!(duration(0, Some(185_000)), "3 min 5 s");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(urlencode("a b&c"), "a%20b%26c");
    }
}
