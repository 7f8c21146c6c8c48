//! Run control end to end: cancel (runs, steps, queued, delayed and
//! redelivered tasks, workers started later, agent requests in flight), run
//! timeouts, budgets and costs, fleet-wide model and pool limits, a
//! provider's 429 pausing a model for the whole fleet, and priorities.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};

use crate::cluster::Cluster;

/// An OpenAI-compatible model server that answers `output` after `delay`,
/// reporting `tokens` prompt and completion tokens, records when each
/// request came and went and how many were in flight at once, and answers
/// the first queued statuses (429 with Retry-After) before anything else.
#[derive(Clone, Default)]
struct Llm {
    delay: Duration,
    tokens: (u64, u64),
    inner: Arc<Mutex<LlmState>>,
}

#[derive(Default)]
struct LlmState {
    in_flight: usize,
    peak: usize,
    /// (arrived, answered) per request, since the server started.
    requests: Vec<(Instant, Option<Instant>)>,
    /// Statuses to answer first: (status, Retry-After).
    refusals: VecDeque<(u16, Option<&'static str>)>,
}

async fn answer(State(llm): State<Llm>, Json(_body): Json<Value>) -> axum::response::Response {
    let (index, refusal) = {
        let mut s = llm.inner.lock().unwrap();
        s.in_flight += 1;
        s.peak = s.peak.max(s.in_flight);
        s.requests.push((Instant::now(), None));
        (s.requests.len() - 1, s.refusals.pop_front())
    };
    // Counted out when answered, or when the client hangs up (dropped).
    struct Out(Llm, usize);
    impl Drop for Out {
        fn drop(&mut self) {
            let mut s = self.0.inner.lock().unwrap();
            s.in_flight -= 1;
            s.requests[self.1].1 = Some(Instant::now());
        }
    }
    let _out = Out(llm.clone(), index);
    if let Some((status, retry_after)) = refusal {
        let mut response = (
            StatusCode::from_u16(status).unwrap(),
            Json(json!({"error": {"message": "slow down"}})),
        )
            .into_response();
        if let Some(ra) = retry_after {
            response.headers_mut().insert("retry-after", ra.parse().unwrap());
        }
        return response;
    }
    tokio::time::sleep(llm.delay).await;
    let args = json!({"text": "done"}).to_string();
    Json(json!({
        "choices": [{"message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "output", "arguments": args}}]}}],
        "usage": {"prompt_tokens": llm.tokens.0, "completion_tokens": llm.tokens.1}
    }))
    .into_response()
}

impl Llm {
    fn new(delay: Duration, tokens: (u64, u64)) -> Self {
        Self {
            delay,
            tokens,
            inner: Arc::default(),
        }
    }

    /// Serve on a thread of its own; the base URL.
    fn start(&self) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        let llm = self.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new()
                    .route("/v1/chat/completions", post(answer))
                    .with_state(llm);
                axum::serve(listener, app).await.unwrap();
            });
        });
        format!("http://{}/v1", rx.recv().unwrap())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LlmState> {
        self.inner.lock().unwrap()
    }

    /// A model file for this server, with extra YAML (limits, pricing).
    fn model_file(&self, base: &str, extra: &str) -> String {
        format!(
            "provider: openai-compatible\nmodel: m\nbase_url: {base}\nrequest_timeout: 60s\nmax_tokens: 100\n{extra}"
        )
    }
}

/// A workflow of `n` independent agent steps on model `fleet`.
fn agent_steps(n: usize, extra: &str) -> String {
    let mut yaml = format!("{extra}steps:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - name: s{i}\n    timeout: 2m\n    agent: {{model: fleet, prompt: \"step {i}\", tools: [output], max_iterations: 2}}\n"
        ));
    }
    yaml
}

fn cancel(cluster: &Cluster, run: &str, body: Value) -> (StatusCode, Value) {
    let response = cluster
        .http(reqwest::Method::POST, &format!("/api/runs/{run}/cancel"))
        .json(&body)
        .send()
        .unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    (status, response.json().unwrap())
}

/// Whether any process's command line holds `needle`.
fn process_with(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
            .unwrap_or(false)
    })
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn cancel_stops_a_running_step_within_two_seconds_and_the_worker_serves_on() {
    let cluster = Cluster::builder()
        .workers(1)
        .workflow(
            "sleepy",
            "steps:\n  - name: nap\n    command: [\"sleep\", \"61.4242\"]\n    timeout: 5m\n  - name: after\n    depends: [nap]\n    echo: never\n",
        )
        .workflow("quick", "steps:\n  - name: hi\n    echo: hello\n")
        .start();
    let id = cluster.submit("sleepy", &[]).unwrap();
    wait_for("the step's process", Duration::from_secs(20), || {
        process_with("sleep 61.4242")
    });

    let asked = Instant::now();
    let (status, run) = cancel(&cluster, &id, json!({"reason": "changed my mind", "by": "ana"}));
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["error"], "changed my mind");
    assert_eq!(run["cancelled_by"], "api:ana");
    let steps: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["cancelled", "cancelled"]);
    wait_for("the process to be gone", Duration::from_secs(2), || {
        !process_with("sleep 61.4242")
    });
    eprintln!("process gone {:?} after the cancel", asked.elapsed());

    // Idempotent; a finished run is a conflict; an unknown one is not found.
    let (status, again) = cancel(&cluster, &id, json!({}));
    assert_eq!((status, &again["cancelled_by"]), (StatusCode::OK, &json!("api:ana")));
    let quick = cluster.submit("quick", &[]).unwrap();
    let done = cluster.wait_run(&quick, Duration::from_secs(20));
    assert_eq!(done["status"], "succeeded", "the worker serves the next run");
    let (status, body) = cancel(&cluster, &quick, json!({}));
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        body["error"],
        format!("run {quick} already succeeded: there is nothing to cancel")
    );
    let (status, _) = cancel(&cluster, "no-such-run", json!({}));
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The worker's answer for the stopped step is recorded, and changes nothing.
    wait_for("the stopped step's result", Duration::from_secs(10), || {
        cluster.worker_log("w1").contains("step finished status=\"cancelled\"")
    });
    assert_eq!(cluster.run(&id)["status"], "cancelled");

    // The CLI: a clear error for a finished run.
    let (out, _, stderr) = crate::support::run(cluster.courier().args(["cancel", &quick]));
    assert!(!out.status.success());
    assert!(stderr.contains("already succeeded"), "{stderr}");
}

#[test]
fn a_cancelled_runs_queued_redelivered_and_delayed_tasks_never_run() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("started.log");
    let mut yaml = String::from("steps:\n");
    for i in 0..60 {
        yaml.push_str(&format!(
            "  - name: s{i}\n    command: [\"sh\", \"-c\", \"echo s{i} >> {}; sleep 0.4\"]\n",
            log.display()
        ));
    }
    let marker = dir.path().join("failed-once");
    let retry_log = dir.path().join("retried.log");
    let retried = format!(
        "steps:\n  - name: flaky\n    retry: {{limit: 3, backoff: 3s, max_backoff: 3s}}\n    command: [\"sh\", \"-c\", \"if [ -e {m} ]; then echo again >> {r}; else touch {m}; exit 1; fi\"]\n",
        m = marker.display(),
        r = retry_log.display()
    );
    let mut cluster = Cluster::builder()
        .workers(1)
        .concurrency(2)
        .workflow("wide", &yaml)
        .workflow("flaky", &retried)
        .start();

    // A step waiting in a retry delay queue when the run is cancelled.
    let flaky = cluster.submit("flaky", &[]).unwrap();
    wait_for("the first failure", Duration::from_secs(20), || marker.exists());
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = cancel(&cluster, &flaky, json!({"reason": "no retries"}));
    assert_eq!(status, StatusCode::OK);

    // 60 queued steps on one worker of concurrency 2.
    let id = cluster.submit("wide", &[]).unwrap();
    wait_for("two steps started", Duration::from_secs(20), || lines(&log).len() >= 2);
    // The worker dies holding two (they will be redelivered), then the run is cancelled.
    cluster.kill_worker("w1");
    let started_before = lines(&log).len();
    let (status, run) = cancel(&cluster, &id, json!({"reason": "too wide"}));
    assert_eq!(status, StatusCode::OK, "{run}");
    std::thread::sleep(Duration::from_secs(5));
    cluster.start_worker("w2", 2);
    // w2 answers every task (queued, redelivered, delayed) without running one.
    wait_for("the queue to drain", Duration::from_secs(30), || {
        cluster.queue_depth("default") == 0
    });
    std::thread::sleep(Duration::from_secs(4)); // the 3 s retry delay, and more
    assert_eq!(
        lines(&log).len(),
        started_before,
        "no step of the run started after the cancel"
    );
    assert!(lines(&retry_log).is_empty(), "the delayed retry never ran");
    let log_w2 = cluster.worker_log("w2");
    assert!(
        log_w2.contains("answering without running it reason=too wide"),
        "{log_w2}"
    );
    let run = cluster.run(&id);
    assert_eq!(run["status"], "cancelled");
    assert!(
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "cancelled" || s["status"] == "succeeded"),
        "{run:#}"
    );
    assert_eq!(cluster.run(&flaky)["status"], "cancelled");
}

#[test]
fn cancelling_one_step_skips_its_dependents_and_the_rest_finishes() {
    let cluster = Cluster::builder()
        .workers(1)
        .workflow(
            "branches",
            "steps:\n  - name: slow\n    command: [\"sleep\", \"62.4242\"]\n  - name: after-slow\n    depends: [slow]\n    echo: never\n  - name: other\n    command: [\"sleep\", \"1\"]\n",
        )
        .start();
    let id = cluster.submit("branches", &[]).unwrap();
    wait_for("the slow step", Duration::from_secs(20), || {
        process_with("sleep 62.4242")
    });
    let (out, stdout, stderr) = crate::support::run(
        cluster
            .courier()
            .args(["cancel", &id, "--step", "slow", "--reason", "too slow"]),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("step slow of run"), "{stdout}");
    wait_for("the slow step's process to be gone", Duration::from_secs(2), || {
        !process_with("sleep 62.4242")
    });
    let run = cluster.wait_run(&id, Duration::from_secs(20));
    let status = |name: &str| {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(
        (status("slow"), status("after-slow"), status("other")),
        (json!("cancelled"), json!("skipped"), json!("succeeded"))
    );
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["error"], "step(s) cancelled: slow");
}

#[test]
fn an_agent_step_is_aborted_mid_request_by_cancel() {
    let llm = Llm::new(Duration::from_secs(60), (1, 1));
    let base = llm.start();
    let cluster = Cluster::builder()
        .workers(1)
        .concurrency(1)
        .file("agents/models/fleet.yaml", &llm.model_file(&base, ""))
        .workflow("slowagent", &agent_steps(1, ""))
        .workflow("quick", "steps:\n  - name: hi\n    echo: hello\n")
        .start();
    let id = cluster.submit("slowagent", &[]).unwrap();
    wait_for("the model request", Duration::from_secs(20), || {
        llm.state().requests.len() == 1
    });
    let (status, _) = cancel(&cluster, &id, json!({}));
    assert_eq!(status, StatusCode::OK);
    // The request is dropped (the server sees the client hang up), and the
    // worker's only slot is free for the next run.
    wait_for("the request to be dropped", Duration::from_secs(2), || {
        llm.state().requests[0].1.is_some()
    });
    let quick = cluster.submit("quick", &[]).unwrap();
    assert_eq!(cluster.wait_run(&quick, Duration::from_secs(5))["status"], "succeeded");
}

#[test]
fn a_run_timeout_cancels_the_run_and_stops_its_step() {
    let cluster = Cluster::builder()
        .workers(1)
        .workflow(
            "bounded",
            "timeout: 2s\nsteps:\n  - name: nap\n    command: [\"sleep\", \"63.4242\"]\n    timeout: 5m\n",
        )
        .start();
    let started = Instant::now();
    let id = cluster.submit("bounded", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(10));
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(run["cancelled_by"], "timeout");
    assert_eq!(run["error"], "the run's timeout (2s) passed");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    wait_for("the step's process to be gone", Duration::from_secs(3), || {
        !process_with("sleep 63.4242")
    });
}

#[test]
fn a_budget_cancels_the_run_once_spent_and_costs_add_up() {
    // 600 + 100 tokens a request; prices 2 and 10 per million tokens.
    let llm = Llm::new(Duration::ZERO, (600, 100));
    let base = llm.start();
    let model = llm.model_file(&base, "pricing: {input_per_mtok: 2.0, output_per_mtok: 10.0}\n");
    let chain = "budget: {tokens: 1000}\nsteps:\n  - name: a\n    agent: {model: fleet, prompt: a, tools: [output], max_iterations: 2}\n  - name: b\n    depends: [a]\n    agent: {model: fleet, prompt: b, tools: [output], max_iterations: 2}\n  - name: c\n    depends: [b]\n    agent: {model: fleet, prompt: c, tools: [output], max_iterations: 2}\n";
    let cluster = Cluster::builder()
        .workers(1)
        .file("agents/models/fleet.yaml", &model)
        .workflow("spender", chain)
        .workflow("free", &agent_steps(2, ""))
        .start();
    let id = cluster.submit("spender", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(run["cancelled_by"], "budget");
    assert_eq!(run["error"], "budget exceeded: 1400 tokens used, the budget is 1000");
    let statuses: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["succeeded", "succeeded", "cancelled"]);
    assert_eq!(llm.state().requests.len(), 2, "step c never started");
    // Each step: 600 * 2 / 1e6 + 100 * 10 / 1e6 = 0.0022.
    let step_cost = run["steps"][0]["cost"].as_f64().unwrap();
    assert!((step_cost - 0.0022).abs() < 1e-9, "{step_cost}");
    assert!((run["cost"].as_f64().unwrap() - 0.0044).abs() < 1e-9, "{run:#}");
    assert_eq!(
        (run["input_tokens"].as_i64(), run["output_tokens"].as_i64()),
        (Some(1200), Some(200))
    );

    // Without a budget, costs add up across runs; the metrics count them by model.
    let free = cluster.submit("free", &[]).unwrap();
    assert_eq!(cluster.wait_run(&free, Duration::from_secs(30))["status"], "succeeded");
    let metrics = cluster.scheduler_metrics();
    assert!(
        metrics.contains("courier_llm_tokens_total{model=\"fleet\",direction=\"input\"} 2400"),
        "{metrics}"
    );
    let cost: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("courier_llm_cost_total{model=\"fleet\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cost metric: {metrics}"));
    assert!((cost - 0.0088).abs() < 1e-9, "{cost}");
    let (out, stdout, _) = crate::support::run(cluster.courier().args(["runs", &id]));
    assert!(out.status.success());
    assert!(
        stdout.contains("tokens    1200 input + 200 output, cost 0.0044"),
        "{stdout}"
    );
    assert!(stdout.contains("cancelled by budget"), "{stdout}");
}

#[test]
fn a_model_concurrency_limit_holds_across_the_fleet() {
    let llm = Llm::new(Duration::from_millis(400), (10, 10));
    let base = llm.start();
    let cluster = Cluster::builder()
        .workers(2)
        .concurrency(3)
        .file(
            "agents/models/fleet.yaml",
            &llm.model_file(&base, "limits: {concurrency: 2}\n"),
        )
        .workflow("twelve", &agent_steps(12, ""))
        .start();
    let id = cluster.submit("twelve", &[]).unwrap();
    // While held, a step says which limit holds it.
    let run = cluster.run(&id);
    let waiting: Vec<&Value> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "waiting")
        .collect();
    assert_eq!(waiting.len(), 10, "{run:#}");
    assert_eq!(waiting[0]["waiting_on"], "model fleet concurrency (2)");
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let state = llm.state();
    assert_eq!(state.requests.len(), 12);
    assert_eq!(state.peak, 2, "at most (and, with 6 slots, exactly) 2 requests at once");
}

#[test]
fn requests_per_minute_hold_and_a_429_pauses_the_model_fleet_wide() {
    let llm = Llm::new(Duration::ZERO, (10, 10));
    let base = llm.start();
    let paced = Llm::new(Duration::ZERO, (10, 10));
    paced.state().refusals.push_back((429, Some("2")));
    let paced_base = paced.start();
    let cluster = Cluster::builder()
        .workers(2)
        .file(
            "agents/models/fleet.yaml",
            &llm.model_file(&base, "limits: {requests_per_minute: 3}\n"),
        )
        .file("agents/models/paced.yaml", &paced.model_file(&paced_base, ""))
        .workflow("five", &agent_steps(5, ""))
        .workflow(
            "pacedrun",
            &agent_steps(1, "").replace("model: fleet", "model: paced").replace(
                "max_iterations: 2}",
                "max_iterations: 2}\n    retry: {limit: 2, backoff: 100ms, max_backoff: 100ms}",
            ),
        )
        .workflow("pacedmore", &agent_steps(3, "").replace("model: fleet", "model: paced"))
        .start();

    // 3 requests a minute: 3 steps run, 2 wait, naming the limit.
    let id = cluster.submit("five", &[]).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(llm.state().requests.len(), 3);
    let run = cluster.run(&id);
    let waiting: Vec<&Value> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "waiting")
        .collect();
    assert_eq!(waiting.len(), 2, "{run:#}");
    assert_eq!(waiting[0]["waiting_on"], "model fleet requests_per_minute (3)");
    let metrics = cluster.scheduler_metrics();
    assert!(
        metrics.contains("courier_steps_waiting{scope=\"model\",name=\"fleet\",limit=\"requests_per_minute\"} 2"),
        "{metrics}"
    );
    assert_eq!(cancel(&cluster, &id, json!({})).0, StatusCode::OK);

    // A 429 with Retry-After: 2 pauses the model for the whole fleet: the
    // steps of another run wait (saying why), and no request comes for 2 s.
    let first = cluster.submit("pacedrun", &[]).unwrap();
    wait_for("the 429", Duration::from_secs(20), || {
        paced.state().requests.first().is_some_and(|r| r.1.is_some())
    });
    let limited = paced.state().requests[0].1.unwrap();
    wait_for("the scheduler to learn of the 429", Duration::from_secs(5), || {
        cluster.run(&first)["steps"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("429"))
    });
    let more = cluster.submit("pacedmore", &[]).unwrap();
    let held = cluster.run(&more);
    let reason = held["steps"][0]["waiting_on"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.starts_with("model paced paused until ") && reason.ends_with(" (the provider answered 429)"),
        "{held:#}"
    );
    for id in [&first, &more] {
        let run = cluster.wait_run(id, Duration::from_secs(30));
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    let state = paced.state();
    assert_eq!(state.requests.len(), 5, "the 429, its retry, and 3 more");
    let first_after = state.requests[1..]
        .iter()
        .map(|(arrived, _)| *arrived - limited)
        .min()
        .unwrap();
    assert!(
        first_after >= Duration::from_millis(1900),
        "a request came {first_after:?} after the 429"
    );
}

#[test]
fn a_small_run_beside_a_wide_one_takes_the_pools_lane_past_the_wide_runs_backlog() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("order.log");
    let step = |name: &str| {
        format!(
            "  - name: {name}\n    command: [\"sh\", \"-c\", \"echo $0 >> {}; sleep 0.05\", \"{name}\"]\n",
            log.display()
        )
    };
    let wide: String = std::iter::once("steps:\n".to_string())
        .chain((0..40).map(|i| step(&format!("w{i}"))))
        .collect();
    let mut cluster = Cluster::builder()
        .workers(0)
        .file("courier.toml", "[pools.default]\nmax_queued = 3\n")
        .workflow("wide", &wide)
        .workflow("small", &format!("steps:\n{}", step("small")))
        .start();
    let wide = cluster.submit("wide", &[]).unwrap();
    // No worker yet: the broker's queue holds 3 tasks; the other 37 steps
    // wait at the scheduler, naming the limit.
    let at_gate = |run: &Value| {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["waiting_on"] == "pool default max_queued (3)")
            .count()
    };
    wait_for("the wide run to fill the queue", Duration::from_secs(20), || {
        at_gate(&cluster.run(&wide)) == 37
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cluster.queue_depth("default"), 3);
    assert_eq!(at_gate(&cluster.run(&wide)), 37);
    let metrics = cluster.scheduler_metrics();
    assert!(
        metrics.contains("courier_steps_waiting{scope=\"pool\",name=\"default\",limit=\"max_queued\"} 37"),
        "{metrics}"
    );
    // A small run (at most 8 steps, no foreach) does not wait at the
    // pool's gate: its step goes at once to the pool's lane, a queue of its
    // own that workers take from too.
    let small = cluster.submit("small", &[]).unwrap();
    let run = cluster.run(&small);
    assert_eq!(run["steps"][0]["status"], "running", "{run}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cluster.queue_depth("default"), 4);
    // One worker, one step at a time: it takes from both queues, so the
    // small run's step is among the first two it runs, not behind the
    // wide run's three queued (nor its 37 waiting).
    cluster.start_worker("w1", 1);
    for id in [&small, &wide] {
        assert_eq!(cluster.wait_run(id, Duration::from_secs(60))["status"], "succeeded");
    }
    let order = lines(&log);
    assert_eq!(order.len(), 41, "{order:?}");
    let at = order.iter().position(|w| w == "small").unwrap();
    assert!(
        at <= 1,
        "the small run's step ran after {at} of the wide run's: {order:?}"
    );
}

#[test]
fn a_high_priority_run_is_dispatched_before_a_low_priority_backlog() {
    let dir = tempfile::TempDir::new().unwrap();
    let log = dir.path().join("order.log");
    let yaml = format!(
        "params: {{who: ~}}\nsteps:\n  - name: work\n    command: [\"sh\", \"-c\", \"echo $0 >> {}; sleep 0.3\", \"${{who}}\"]\n",
        log.display()
    );
    let cluster = Cluster::builder()
        .workers(1)
        .file("courier.toml", "[pools.default]\nmax_in_flight = 1\n")
        .workflow("job", &yaml)
        .start();
    let mut runs = Vec::new();
    for i in 0..6 {
        let response = cluster
            .http(reqwest::Method::POST, "/api/runs")
            .json(&json!({"workflow": "job", "params": {"who": format!("low{i}")}, "priority": 0}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 201);
        runs.push(response.json::<Value>().unwrap()["id"].as_str().unwrap().to_string());
    }
    let (out, stdout, stderr) =
        crate::support::run(
            cluster
                .courier()
                .args(["submit", "job", "-p", "who=high", "--priority", "9"]),
        );
    assert!(out.status.success(), "{stderr}");
    let high = stdout.split_whitespace().nth(1).unwrap().to_string();
    runs.push(high);
    for id in &runs {
        assert_eq!(cluster.wait_run(id, Duration::from_secs(30))["status"], "succeeded");
    }
    let order = lines(&log);
    let at = order.iter().position(|w| w == "high").unwrap();
    assert!(at <= 1, "the high-priority step ran after {at} low ones: {order:?}");
    // Out of range: a clear refusal.
    let response = cluster
        .http(reqwest::Method::POST, "/api/runs")
        .json(&json!({"workflow": "job", "params": {"who": "x"}, "priority": 10}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().unwrap();
    assert_eq!(
        body["error"],
        "priority 10 is out of range: use 0 (lowest) to 9 (highest); 4 is normal"
    );
}

#[test]
fn an_approval_step_waits_for_a_person_through_the_api_and_the_cli() {
    let gated = "steps:\n  - name: plan\n    echo: the plan\n  - name: gate\n    depends: [plan]\n    approval: {message: \"ship ${plan.output}?\", timeout: 1h}\n  - name: ship\n    depends: [gate]\n    echo: \"shipped (${gate.output})\"\n";
    let token = "it-approval-token";
    let cluster = Cluster::builder()
        .workers(1)
        .env("COURIER_API_TOKEN", token)
        .workflow("gated", gated)
        .start();
    let waiting = |id: &str| {
        wait_for("the approval", Duration::from_secs(20), || {
            cluster.run(id)["steps"][1]["status"] == "waiting_approval"
        });
        cluster.run(id)
    };
    // Approved over the API (with the token): the run goes on with the comment.
    let id = cluster.submit("gated", &[]).unwrap();
    let run = waiting(&id);
    assert_eq!(run["steps"][1]["waiting_on"], "approval: ship the plan?");
    let metrics = cluster.scheduler_metrics();
    assert!(
        metrics.contains("courier_steps_waiting{scope=\"step\",name=\"\",limit=\"approval\"} 1"),
        "{metrics}"
    );
    let unauthenticated = reqwest::blocking::Client::new()
        .post(format!("{}/api/runs/{id}/steps/gate/approve", cluster.api))
        .send()
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let response = cluster
        .http(reqwest::Method::POST, &format!("/api/runs/{id}/steps/gate/approve"))
        .json(&json!({"comment": "go", "by": "ana"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let run = cluster.wait_run(&id, Duration::from_secs(20));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][1]["worker"], "api:ana");
    assert_eq!(run["steps"][2]["output"], "shipped (go)");
    // Again: a conflict.
    let again = cluster
        .http(reqwest::Method::POST, &format!("/api/runs/{id}/steps/gate/reject"))
        .send()
        .unwrap();
    assert_eq!(again.status(), 409);
    // Rejected with the CLI: the run fails, ship never runs.
    let id = cluster.submit("gated", &[]).unwrap();
    waiting(&id);
    let (out, stdout, stderr) =
        crate::support::run(
            cluster
                .courier()
                .args(["reject", &id, "gate", "--comment", "not today"]),
        );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("step gate of run"), "{stdout}");
    let run = cluster.wait_run(&id, Duration::from_secs(20));
    assert_eq!(run["status"], "failed");
    assert!(
        run["steps"][1]["error"].as_str().unwrap().ends_with(": not today"),
        "{run:#}"
    );
    assert_eq!(run["steps"][2]["status"], "skipped");
}
