//! `courier submit`, `courier cancel` and `courier runs`: the scheduler's
//! HTTP API from a terminal.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use courier_scheduler::db::{RunStatus, StepStatus};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Run {
    id: String,
    workflow: String,
    status: RunStatus,
    created_ms: i64,
    finished_ms: Option<i64>,
    error: Option<String>,
    #[serde(default)]
    cancelled_by: Option<String>,
    #[serde(default)]
    input_tokens: i64,
    #[serde(default)]
    output_tokens: i64,
    #[serde(default)]
    cost: f64,
    #[serde(default)]
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
struct Step {
    name: String,
    status: StepStatus,
    attempts: i64,
    output: Option<String>,
    error: Option<String>,
    worker: Option<String>,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input_tokens: Option<i64>,
    #[serde(default)]
    output_tokens: Option<i64>,
    #[serde(default)]
    cost: Option<f64>,
    #[serde(default)]
    waiting_on: Option<String>,
    /// Output and transcript left out of the run's view (their bytes).
    #[serde(default)]
    left_out_bytes: Option<i64>,
}

/// The HTTP client of every CLI command (30 s timeout).
pub fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// The scheduler's API as the CLI reaches it: its URL, the token it sends
/// (`api_token`), one HTTP client.
#[derive(Debug)]
pub struct Api {
    url: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// The API of `api_url`, with `api_token` when set.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(settings: &crate::settings::Settings) -> anyhow::Result<Self> {
        Ok(Self {
            url: settings.api_url.trim_end_matches('/').to_string(),
            token: settings.api_token().map(String::from),
            http: client()?,
        })
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.with_token(self.http.get(format!("{}{path}", self.url)))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.with_token(self.http.post(format!("{}{path}", self.url)))
    }

    fn with_token(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Send a request; its answer as a value, or the API's error message.
    async fn read<T: serde::de::DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let api = &self.url;
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the scheduler at {api} (is `courier scheduler` running?)"))?;
        let status = response.status();
        let body = response.text().await.context("reading the scheduler's answer")?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(body);
            bail!("{message}");
        }
        serde_json::from_str(&body).with_context(|| format!("unexpected answer from {api}"))
    }
}

/// Parse `k=v` parameters.
pub fn parse_params(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("--param takes KEY=VALUE, not \"{p}\""))
        })
        .collect()
}

pub async fn submit(
    api: &Api,
    workflow: &str,
    params: BTreeMap<String, String>,
    priority: Option<u8>,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    let mut body = serde_json::json!({ "workflow": workflow, "params": params });
    if let Some(priority) = priority {
        body["priority"] = priority.into();
    }
    let run: Run = api.read(api.post("/api/runs").json(&body)).await?;
    crate::term::out!("run {} ({}) submitted", run.id, run.workflow);
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    // On a terminal, a live line (done/running/failed, elapsed) stays under
    // the step transitions; elsewhere it is hidden and only the lines print.
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} done · {msg}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut seen: HashMap<String, StepStatus> = HashMap::new();
    let run = loop {
        let run: Run = api.read(api.get(&format!("/api/runs/{}", run.id))).await?;
        for step in &run.steps {
            if seen.get(&step.name) != Some(&step.status) {
                let attempt = if step.attempts > 1 {
                    format!(" (attempt {})", step.attempts)
                } else {
                    String::new()
                };
                bar.suspend(|| crate::term::out!("  {:<9} {}{attempt}", step.status, step.name));
                seen.insert(step.name.clone(), step.status);
            }
        }
        let count = |status: StepStatus| run.steps.iter().filter(|s| s.status == status).count();
        let (failed, skipped) = (count(StepStatus::Failed), count(StepStatus::Skipped));
        bar.set_length(run.steps.len() as u64);
        bar.set_position((count(StepStatus::Succeeded) + failed + skipped) as u64);
        bar.set_message(format!(
            "{} running · {failed} failed · {skipped} skipped",
            count(StepStatus::Running)
        ));
        if run.status != RunStatus::Running {
            break run;
        }
        if let Some(waiting) = run.steps.iter().find_map(|s| s.waiting_on.as_deref()) {
            bar.set_message(format!("waiting on {waiting}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    crate::term::out!(
        "run {} {} in {:.1}s",
        run.id,
        run.status,
        started.elapsed().as_secs_f64()
    );
    for step in &run.steps {
        match (&step.output, &step.error) {
            (Some(output), _) if step.status == StepStatus::Succeeded => {
                crate::term::out!("\n[{}]\n{output}", step.name)
            }
            (None, _) if step.left_out_bytes.is_some() => crate::term::out!(
                "\n[{}] {} bytes of output and transcript, left out of the run's view (GET /api/runs/{}/steps/{})",
                step.name,
                step.left_out_bytes.unwrap_or(0),
                run.id,
                step.name
            ),
            (_, Some(error)) => crate::term::out!("\n[{}] {}: {error}", step.name, step.status),
            _ => {}
        }
    }
    Ok(if run.status == RunStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Approve or reject a step waiting for approval; says what became of it.
pub async fn decide(
    api: &Api,
    run: &str,
    step: &str,
    approve: bool,
    comment: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut body = serde_json::json!({ "by": who() });
    if let Some(comment) = comment {
        body["comment"] = comment.into();
    }
    let verb = if approve { "approve" } else { "reject" };
    let run: Run = api
        .read(api.post(&format!("/api/runs/{run}/steps/{step}/{verb}")).json(&body))
        .await?;
    print_step(&run, step);
    Ok(ExitCode::SUCCESS)
}

/// Who the CLI says acts (`by`, recorded with cancels and decisions).
fn who() -> String {
    std::env::var("USER").unwrap_or_else(|_| "cli".into())
}

/// What became of one step of a run, and of the run.
fn print_step(run: &Run, step: &str) {
    let status = run
        .steps
        .iter()
        .find(|s| s.name == step)
        .map_or("?", |s| s.status.as_str());
    crate::term::out!("step {step} of run {} {status}; the run is {}", run.id, run.status);
}

/// Cancel a run, or one step of it; says what became of it.
pub async fn cancel(api: &Api, run: &str, step: Option<&str>, reason: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut body = serde_json::json!({ "by": who() });
    if let Some(step) = step {
        body["step"] = step.into();
    }
    if let Some(reason) = reason {
        body["reason"] = reason.into();
    }
    let run: Run = api
        .read(api.post(&format!("/api/runs/{run}/cancel")).json(&body))
        .await?;
    match step {
        Some(step) => print_step(&run, step),
        None => crate::term::out!(
            "run {} {} by {}",
            run.id,
            run.status,
            run.cancelled_by.as_deref().unwrap_or("?")
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn runs(
    api: &Api,
    id: Option<&str>,
    json: bool,
    filters: &[(&str, Option<String>)],
) -> anyhow::Result<ExitCode> {
    if let Some(id) = id {
        let value: serde_json::Value = api.read(api.get(&format!("/api/runs/{id}"))).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(ExitCode::SUCCESS);
        }
        let run: Run = serde_json::from_value(value)?;
        crate::term::out!("run       {}", run.id);
        crate::term::out!("workflow  {}", run.workflow);
        crate::term::out!("status    {}", run.status);
        crate::term::out!("duration  {}", duration(Some(run.created_ms), run.finished_ms));
        if let Some(error) = &run.error {
            crate::term::out!("error     {error}");
        }
        if let Some(by) = &run.cancelled_by {
            crate::term::out!("cancelled by {by}");
        }
        if run.input_tokens + run.output_tokens > 0 {
            crate::term::out!(
                "tokens    {} input + {} output, cost {:.4}",
                run.input_tokens,
                run.output_tokens,
                run.cost
            );
        }
        crate::term::out!(
            "\n{:<24} {:<10} {:>8} {:>9}  {:<20} OUTPUT / ERROR",
            "STEP",
            "STATUS",
            "ATTEMPTS",
            "DURATION",
            "WORKER"
        );
        for s in &run.steps {
            let waiting = s.waiting_on.as_ref().map(|w| format!("waiting on {w}"));
            let left_out = s
                .left_out_bytes
                .map(|n| format!("({n} bytes of output and transcript left out of the run's view)"));
            let detail = waiting
                .as_deref()
                .or(s.error.as_deref())
                .or(s.output.as_deref())
                .or(left_out.as_deref())
                .unwrap_or("");
            crate::term::out!(
                "{:<24} {:<10} {:>8} {:>9}  {:<20} {}",
                s.name,
                s.status,
                s.attempts,
                duration(s.started_ms, s.finished_ms),
                s.worker.as_deref().unwrap_or("-"),
                one_line(detail, 80)
            );
        }
        for s in run.steps.iter().filter(|s| s.model.is_some()) {
            crate::term::out!(
                "\n{}: model {}, {} input + {} output tokens{} (transcript: courier runs {} --json)",
                s.name,
                s.model.as_deref().unwrap_or("-"),
                s.input_tokens.unwrap_or(0),
                s.output_tokens.unwrap_or(0),
                s.cost.map(|c| format!(", cost {c:.4}")).unwrap_or_default(),
                run.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let query: Vec<(&str, String)> = filters.iter().filter_map(|(k, v)| v.clone().map(|v| (*k, v))).collect();
    let runs = list_runs(api, &query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        print_runs(&runs)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs, newest first, filtered by `query` (`workflow`, `status`, `limit`),
/// as the API returns them (for `--json`).
pub async fn list_runs(api: &Api, query: &[(&str, String)]) -> anyhow::Result<serde_json::Value> {
    api.read(api.get("/api/runs").query(query)).await
}

/// A table of the runs [`list_runs`] returned, one line each.
///
/// # Errors
/// The API returned something that is not a list of runs.
pub fn print_runs(runs: &serde_json::Value) -> anyhow::Result<()> {
    let runs: Vec<Run> = serde_json::from_value(runs.clone()).context("unexpected list of runs")?;
    crate::term::out!(
        "{:<38} {:<20} {:<10} {:>9} {:>9} {:>9}  ERROR",
        "RUN",
        "WORKFLOW",
        "STATUS",
        "DURATION",
        "TOKENS",
        "COST"
    );
    for r in runs {
        crate::term::out!(
            "{:<38} {:<20} {:<10} {:>9} {:>9} {:>9.4}  {}",
            r.id,
            r.workflow,
            r.status,
            duration(Some(r.created_ms), r.finished_ms),
            r.input_tokens + r.output_tokens,
            r.cost,
            one_line(r.error.as_deref().unwrap_or(""), 60)
        );
    }
    Ok(())
}

fn duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.2}s", (e - s) as f64 / 1000.0),
        (Some(_), None) => "…".into(),
        _ => "-".into(),
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}
