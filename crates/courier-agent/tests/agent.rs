//! Agent steps against local HTTP servers that speak the OpenAI and Anthropic
//! protocols and play scripted replies, including multi-turn tool calls.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use courier_agent::run_step;
use courier_config::{Config, SnapshotStore, build_snapshot};
use courier_wire::{AgentSpec, MemoryTarget, Provider, Snapshot, StepRun, TaskStatus};
use serde_json::{Value, json};

/// What the mock answers next.
#[derive(Clone)]
enum Answer {
    Json(Value),
    Status(u16, Value, Option<&'static str>),
    Raw(&'static str),
    Slow(Duration, Value),
}

#[derive(Clone, Default)]
struct Mock {
    requests: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
    /// Answer given when the queue is empty (a model that never finishes).
    forever: Arc<Mutex<Option<Answer>>>,
}

async fn serve(State(mock): State<Mock>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    mock.requests.lock().unwrap().push((headers, body));
    let next = mock.answers.lock().unwrap().pop_front();
    let answer = next.or_else(|| mock.forever.lock().unwrap().clone());
    match answer {
        Some(Answer::Json(v)) => Json(v).into_response(),
        Some(Answer::Status(code, v, retry_after)) => {
            let mut response = (StatusCode::from_u16(code).unwrap(), Json(v)).into_response();
            if let Some(ra) = retry_after {
                response.headers_mut().insert("retry-after", ra.parse().unwrap());
            }
            response
        }
        Some(Answer::Raw(text)) => ([("content-type", "application/json")], text).into_response(),
        Some(Answer::Slow(delay, v)) => {
            tokio::time::sleep(delay).await;
            Json(v).into_response()
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, "no scripted answer left").into_response(),
    }
}

impl Mock {
    /// Start the server; returns its base URL (`http://127.0.0.1:PORT`).
    async fn start(answers: Vec<Answer>) -> (Mock, String) {
        let mock = Mock::default();
        mock.answers.lock().unwrap().extend(answers);
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(serve))
            .route("/v1/messages", post(serve))
            .with_state(mock.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (mock, format!("http://{addr}"))
    }

    fn requests(&self) -> Vec<(HeaderMap, Value)> {
        self.requests.lock().unwrap().clone()
    }
}

/// An OpenAI chat-completions answer.
fn openai(text: Option<&str>, calls: &[(&str, Value)]) -> Answer {
    let tool_calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| json!({"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": args.to_string()}}))
        .collect();
    let mut message = json!({"role": "assistant", "content": text});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    Answer::Json(
        json!({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 10}}),
    )
}

/// An Anthropic messages answer.
fn anthropic(text: Option<&str>, calls: &[(&str, Value)]) -> Answer {
    let mut content: Vec<Value> = text.iter().map(|t| json!({"type": "text", "text": t})).collect();
    content.extend(calls.iter().enumerate().map(
        |(i, (name, input))| json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": input}),
    ));
    Answer::Json(
        json!({"type": "message", "role": "assistant", "content": content, "stop_reason": "end_turn",
                        "usage": {"input_tokens": 50, "output_tokens": 5}}),
    )
}

/// The worker's environment as a worker hands it to agent steps.
fn env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn example() -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")).unwrap()
}

/// The snapshot of the example `research/analyze` step, its model pointed at `base_url`.
fn research_analyze(provider: Provider, base_url: &str, key_env: Option<&str>) -> (AgentSpec, SnapshotStore) {
    let config = example();
    let step = config.workflows["research"].step("analyze").unwrap();
    let StepRun::Agent(spec) = step.run.clone() else {
        panic!("agent step")
    };
    let mut snapshot: Snapshot = build_snapshot(&config.store, "research", &step.run).unwrap();
    let model = snapshot.models.get_mut("local").unwrap();
    model.provider = provider;
    model.base_url = Some(base_url.to_string());
    model.api_key_env = key_env.map(String::from);
    (spec, SnapshotStore::new(snapshot))
}

fn with_base(provider: Provider, base: &str) -> String {
    match provider {
        Provider::Anthropic => base.to_string(),
        _ => format!("{base}/v1"),
    }
}

#[tokio::test]
async fn the_request_holds_soul_skills_memory_and_the_read_only_notice_and_nothing_else() {
    let (mock, base) = Mock::start(vec![openai(None, &[("output", json!({"text": "done"}))])]).await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    let (_, body) = mock.requests().remove(0);
    let system = body["messages"][0]["content"].as_str().unwrap();
    assert_eq!(body["messages"][0]["role"], "system");
    // The soul first, then skills (names and descriptions), then memory.
    assert!(system.starts_with("You are a careful researcher."), "{system}");
    let skills_at = system.find("# Skills").unwrap();
    let memory_at = system.find("# Memory (read-only)").unwrap();
    assert!(skills_at < memory_at);
    assert!(
        system.contains("- `summarize`: Summarize — Condense a text into five bullet points"),
        "{system}"
    );
    assert!(system.contains("- `cite-sources`: Cite sources —"), "{system}");
    assert!(system.contains(courier_agent::prompt::READ_ONLY_NOTICE), "{system}");
    assert!(
        system.contains("Readers of Courier reports prefer short answers"),
        "{system}"
    );
    assert!(
        system.contains("quorum queues are RabbitMQ's replicated queue type"),
        "{system}"
    );
    // Skill bodies are not up front: they come through read_skill.
    assert!(
        !system.contains("Read the whole text once before writing anything"),
        "{system}"
    );
    // Nothing from resources the step does not reference.
    let everything = body.to_string();
    for foreign in [
        "You are an editor",
        "Outline",
        "The digest goes out every morning",
        "gpt-4o-mini",
    ] {
        assert!(!everything.contains(foreign), "{foreign} leaked into the request");
    }
    // The step's prompt, substituted at dispatch, is the user message; tools are offered.
    assert_eq!(body["messages"][1]["role"], "user");
    assert_eq!(body["model"], "qwen2.5:0.5b");
    let tools: Vec<&str> = body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        [
            "search_skills",
            "read_skill",
            "read_memory",
            "output",
            "propose_memory_update"
        ]
    );
}

#[tokio::test]
async fn search_then_read_then_output_runs_to_the_right_output() {
    for provider in [Provider::OpenaiCompatible, Provider::Anthropic] {
        let reply = if provider == Provider::Anthropic {
            anthropic
        } else {
            openai
        };
        let (mock, base) = Mock::start(vec![
            reply(
                Some("Let me look for a skill."),
                &[("search_skills", json!({"query": "citation sources"}))],
            ),
            reply(None, &[("read_skill", json!({"id": "cite-sources"}))]),
            reply(
                None,
                &[(
                    "output",
                    json!({"text": "Queues decouple producers and consumers [source: notes]."}),
                )],
            ),
        ])
        .await;
        let (spec, store) = research_analyze(provider, &with_base(provider, &base), None);
        let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
        assert_eq!(outcome.status, TaskStatus::Succeeded, "{provider:?}: {outcome:?}");
        assert_eq!(
            outcome.output,
            "Queues decouple producers and consumers [source: notes]."
        );
        let requests = mock.requests();
        assert_eq!(requests.len(), 3);
        let second = requests[1].1.to_string();
        assert!(
            second.contains("`cite-sources`: Cite sources"),
            "{provider:?}: search results reach the model: {second}"
        );
        let third = requests[2].1.to_string();
        assert!(
            third.contains("After each factual sentence add"),
            "{provider:?}: the skill text reaches the model"
        );
        let usage = outcome.usage;
        if provider == Provider::Anthropic {
            assert_eq!((usage.input_tokens, usage.output_tokens), (150, 15));
            assert_eq!(requests[0].0["anthropic-version"], "2023-06-01");
            assert!(
                requests[0].1["system"]
                    .as_str()
                    .unwrap()
                    .starts_with("You are a careful researcher.")
            );
            assert_eq!(requests[0].1["tools"][0]["input_schema"]["required"][0], "query");
        } else {
            assert_eq!((usage.input_tokens, usage.output_tokens), (300, 30));
        }
        assert_eq!(
            outcome.model.as_deref(),
            Some(format!("{}/qwen2.5:0.5b", provider.as_str()).as_str())
        );
        let roles: Vec<&str> = outcome.transcript.iter().map(|e| e.role.as_str()).collect();
        assert_eq!(roles, ["assistant", "call", "tool", "call", "tool", "call", "tool"]);
    }
}

#[tokio::test]
async fn a_write_attempt_is_refused_and_the_model_sees_the_refusal() {
    let (mock, base) = Mock::start(vec![
        openai(
            None,
            &[("write_memory", json!({"scope": "workflow", "text": "remember me"}))],
        ),
        openai(
            None,
            &[(
                "propose_memory_update",
                json!({"scope": "workflow", "text": "- proposed fact"}),
            )],
        ),
        openai(None, &[("output", json!({"text": "ok"}))]),
    ])
    .await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded);
    let second = &mock.requests()[1].1;
    let refusal = second["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(refusal["role"], "tool");
    let text = refusal["content"].as_str().unwrap();
    assert!(
        text.starts_with("error: read-only store: cannot write memory of workflow \"research\""),
        "{text}"
    );
    // The store is unchanged; the proposal travels in the result instead.
    assert!(
        !store
            .snapshot()
            .memory
            .as_ref()
            .unwrap()
            .workflow
            .as_ref()
            .unwrap()
            .contains("remember me")
    );
    assert_eq!(outcome.memory_updates.len(), 1);
    assert_eq!(outcome.memory_updates[0].target, MemoryTarget::Workflow);
    assert_eq!(outcome.memory_updates[0].append, "- proposed fact\n");
}

#[tokio::test]
async fn max_iterations_stops_a_model_that_never_finishes() {
    let (mock, base) = Mock::start(vec![]).await;
    *mock.forever.lock().unwrap() = Some(openai(None, &[("read_memory", json!({}))]));
    let (mut spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    spec.max_iterations = 3;
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(
        outcome.error.as_deref(),
        Some("the agent did not finish within max_iterations (3): it never called output")
    );
    assert_eq!(mock.requests().len(), 3);
    assert!(outcome.memory_updates.is_empty());
}

#[tokio::test]
async fn the_step_timeout_stops_a_slow_model() {
    let (_mock, base) = Mock::start(vec![Answer::Slow(Duration::from_secs(5), json!({}))]).await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_millis(400), &env()).await;
    assert_eq!(outcome.status, TaskStatus::TimedOut);
    assert_eq!(outcome.error.as_deref(), Some("timed out after 400ms"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn http_429_with_retry_after_is_retried() {
    let (mock, base) = Mock::start(vec![
        Answer::Status(429, json!({"error": {"message": "Rate limit reached"}}), Some("1")),
        openai(Some("fine now"), &[]),
    ])
    .await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output, "fine now");
    assert_eq!(mock.requests().len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 was honoured"
    );
}

#[tokio::test]
async fn http_401_fails_at_once_with_the_providers_message() {
    for provider in [Provider::OpenaiCompatible, Provider::Anthropic] {
        let (mock, base) = Mock::start(vec![Answer::Status(
            401,
            json!({"error": {"type": "authentication_error", "message": "Incorrect API key provided"}}),
            None,
        )])
        .await;
        let (spec, store) = research_analyze(provider, &with_base(provider, &base), None);
        let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
        assert_eq!(outcome.status, TaskStatus::Failed);
        assert_eq!(
            outcome.error.unwrap(),
            format!("{} returned HTTP 401: Incorrect API key provided", provider.as_str())
        );
        assert_eq!(mock.requests().len(), 1, "not retried");
    }
}

#[tokio::test]
async fn malformed_json_from_the_provider_fails_the_step_clearly() {
    let (_mock, base) = Mock::start(vec![Answer::Raw("{\"choices\": [")]).await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    let error = outcome.error.unwrap();
    assert!(
        error.starts_with("openai-compatible sent a malformed answer: EOF while parsing"),
        "{error}"
    );
    assert!(error.ends_with("in \"{\"choices\": [\""), "{error}");
}

#[tokio::test]
async fn the_api_key_comes_from_the_workers_environment_variable() {
    // HOME is set in every test environment; its value stands in for a key.
    let home = std::env::var("HOME").unwrap();
    let (mock, base) = Mock::start(vec![openai(Some("hi"), &[]), anthropic(Some("hi"), &[])]).await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        Some("HOME"),
    );
    assert_eq!(
        run_step(&spec, &store, Duration::from_secs(10), &env()).await.status,
        TaskStatus::Succeeded
    );
    let (spec, store) = research_analyze(Provider::Anthropic, &base, Some("HOME"));
    assert_eq!(
        run_step(&spec, &store, Duration::from_secs(10), &env()).await.status,
        TaskStatus::Succeeded
    );
    let requests = mock.requests();
    assert_eq!(requests[0].0["authorization"], format!("Bearer {home}").as_str());
    assert_eq!(requests[1].0["x-api-key"], home.as_str());
}

#[tokio::test]
async fn a_missing_key_variable_fails_the_step_naming_it() {
    let (mock, base) = Mock::start(vec![]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &base, Some("COURIER_TEST_UNSET_KEY_6F1D"));
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(
        outcome.error.as_deref(),
        Some(
            "environment variable COURIER_TEST_UNSET_KEY_6F1D (api_key_env of model \"local\") is not set on this worker"
        )
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn the_scripted_provider_plays_its_replies() {
    let config = example();
    let mut snapshot = build_snapshot(
        &config.store,
        "research",
        &config.workflows["research"].step("write").unwrap().run,
    )
    .unwrap();
    let offline = config.store.model_ids().find(|m| *m == "offline").unwrap().to_string();
    snapshot.models.insert(
        offline.clone(),
        courier_config::AgentStore::model(&config.store, &offline).unwrap(),
    );
    let spec = AgentSpec {
        model: Some(offline),
        prompt: "anything".into(),
        tools: vec!["output".into()],
        max_iterations: 2,
        ..AgentSpec::default()
    };
    let outcome = run_step(&spec, &SnapshotStore::new(snapshot), Duration::from_secs(5), &env()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(
        outcome.output,
        "Offline demo: message queues decouple producers from consumers."
    );
    assert_eq!(outcome.model.as_deref(), Some("scripted/offline-demo"));
}
