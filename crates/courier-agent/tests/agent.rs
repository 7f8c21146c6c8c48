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
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
        let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
async fn memory_proposals_are_bounded_in_size_and_count_and_the_model_is_told() {
    let big = "x".repeat(courier_config::MAX_PROPOSAL_BYTES);
    let many: Vec<(&str, Value)> = (0..=courier_config::MAX_PROPOSALS)
        .map(|i| {
            (
                "propose_memory_update",
                json!({"scope": "global", "text": format!("- fact {i}")}),
            )
        })
        .collect();
    let (mock, base) = Mock::start(vec![
        openai(
            None,
            &[("propose_memory_update", json!({"scope": "global", "text": big}))],
        ),
        openai(None, &many),
        openai(None, &[("output", json!({"text": "ok"}))]),
    ])
    .await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    let answers = |request: usize| -> Vec<String> {
        mock.requests()[request].1["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    };
    let first = answers(1);
    assert_eq!(
        first.last().unwrap(),
        &format!(
            "error: a step proposes at most {max} bytes of memory in all; {max} are left, this proposal holds {}; \
             nothing was recorded",
            courier_config::MAX_PROPOSAL_BYTES + 1,
            max = courier_config::MAX_PROPOSAL_BYTES,
        )
    );
    let second = answers(2);
    assert_eq!(
        second.last().unwrap(),
        &format!(
            "error: a step makes at most {} memory proposals; nothing was recorded",
            courier_config::MAX_PROPOSALS
        )
    );
    // The first MAX_PROPOSALS of the second turn, none of the oversized one.
    assert_eq!(outcome.memory_updates.len(), courier_config::MAX_PROPOSALS);
    assert_eq!(outcome.memory_updates[0].append, "- fact 0\n");
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
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
    let outcome = run_step(
        &spec,
        &store,
        Duration::from_millis(400),
        &env(),
        std::future::pending(),
    )
    .await;
    assert_eq!(outcome.status, TaskStatus::TimedOut);
    assert_eq!(outcome.error.as_deref(), Some("timed out after 400ms"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn http_429_returns_at_once_with_its_retry_after_for_the_scheduler() {
    // The worker does not retry a 429: the scheduler pauses the model for the
    // whole fleet and retries the step.
    let (mock, base) = Mock::start(vec![
        Answer::Status(429, json!({"error": {"message": "Rate limit reached"}}), Some("7")),
        openai(Some("never asked"), &[]),
    ])
    .await;
    let (spec, store) = research_analyze(
        Provider::OpenaiCompatible,
        &with_base(Provider::OpenaiCompatible, &base),
        None,
    );
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.rate_limited, Some(Duration::from_secs(7)));
    assert_eq!(
        outcome.error.as_deref(),
        Some("openai-compatible answered HTTP 429 (rate limited; wait 7s): Rate limit reached")
    );
    assert_eq!(mock.requests().len(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
    // Without Retry-After, the default pause.
    let (_mock, base) = Mock::start(vec![Answer::Status(429, json!({}), None)]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    assert_eq!(
        outcome.rate_limited,
        Some(courier_agent::provider::DEFAULT_RATE_LIMIT_PAUSE)
    );
}

#[tokio::test]
async fn a_cancelled_step_is_aborted_mid_request() {
    let (mock, base) = Mock::start(vec![]).await;
    *mock.forever.lock().unwrap() = Some(Answer::Slow(Duration::from_secs(30), json!({})));
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let started = Instant::now();
    let stop = tokio::time::sleep(Duration::from_millis(500));
    let outcome = run_step(&spec, &store, Duration::from_secs(60), &env(), stop).await;
    assert_eq!(outcome.status, TaskStatus::Cancelled, "{outcome:?}");
    assert_eq!(outcome.error.as_deref(), Some("cancelled"));
    assert_eq!(mock.requests().len(), 1, "the request was in flight");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
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
        let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
        run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending())
            .await
            .status,
        TaskStatus::Succeeded
    );
    let (spec, store) = research_analyze(Provider::Anthropic, &base, Some("HOME"));
    assert_eq!(
        run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending())
            .await
            .status,
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
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
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
    let outcome = run_step(
        &spec,
        &SnapshotStore::new(snapshot),
        Duration::from_secs(5),
        &env(),
        std::future::pending(),
    )
    .await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(
        outcome.output,
        "Offline demo: message queues decouple producers from consumers."
    );
    assert_eq!(outcome.model.as_deref(), Some("scripted/offline-demo"));
}

/// `research/analyze` with its model changed by `edit`.
fn research_analyze_with(
    provider: Provider,
    base_url: &str,
    edit: impl FnOnce(&mut courier_wire::ModelDef),
) -> (AgentSpec, SnapshotStore) {
    let (spec, store) = research_analyze(provider, base_url, None);
    let mut snapshot = store.snapshot().clone();
    edit(snapshot.models.get_mut("local").unwrap());
    (spec, SnapshotStore::new(snapshot))
}

fn openai_base(base: &str) -> String {
    with_base(Provider::OpenaiCompatible, base)
}

#[tokio::test]
async fn an_output_call_without_valid_text_is_an_error_the_model_sees() {
    // Missing text, a number, an empty string, unparseable arguments: each is
    // answered with an error, and the step fails saying why.
    let calls = [
        json!({}).to_string(),
        json!({"text": 42}).to_string(),
        json!({"text": "  "}).to_string(),
        "{\"text\": \"cut".to_string(),
    ];
    let answers: Vec<Answer> = calls
        .iter()
        .map(|args| {
            Answer::Json(
                json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "output", "arguments": args}}]},
                "finish_reason": "tool_calls"}]}),
            )
        })
        .collect();
    let (mock, base) = Mock::start(answers).await;
    let (mut spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    spec.max_iterations = 4;
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    assert_eq!(outcome.output, "");
    assert_eq!(
        outcome.error.as_deref(),
        Some(
            "the agent did not finish within max_iterations (4): its last output call was refused (error: the arguments of output must be a JSON object; you sent: {\"text\": \"cut)"
        )
    );
    let answers: Vec<String> = outcome
        .transcript
        .iter()
        .filter(|e| e.role == "tool")
        .map(|e| e.content.clone())
        .collect();
    assert_eq!(
        answers,
        [
            "error: output needs \"text\" (your final answer, a string); nothing was recorded",
            "error: output's \"text\" must be a string, not 42; nothing was recorded",
            "error: output needs a non-empty \"text\"; nothing was recorded",
            "error: the arguments of output must be a JSON object; you sent: {\"text\": \"cut",
        ]
    );
    // The model saw each refusal as the tool's answer.
    let last = &mock.requests()[3].1["messages"];
    let tool = last
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert_eq!(tool["content"], answers[2]);
}

#[tokio::test]
async fn an_answer_cut_off_at_the_token_limit_fails_the_step() {
    let cut_openai = Answer::Json(
        json!({"choices": [{"message": {"role": "assistant", "content": "Message queues are a way to"},
        "finish_reason": "length"}], "usage": {"prompt_tokens": 10, "completion_tokens": 8}}),
    );
    let cut_anthropic = Answer::Json(
        json!({"content": [{"type": "text", "text": "Message queues are a way to"}],
        "stop_reason": "max_tokens", "usage": {"input_tokens": 10, "output_tokens": 8}}),
    );
    for (provider, answer) in [
        (Provider::OpenaiCompatible, cut_openai),
        (Provider::Anthropic, cut_anthropic),
    ] {
        let (_mock, base) = Mock::start(vec![answer]).await;
        let (spec, store) = research_analyze(provider, &with_base(provider, &base), None);
        let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
        assert_eq!(outcome.status, TaskStatus::Failed, "{provider:?}");
        assert_eq!(
            outcome.error.as_deref(),
            Some("the model's answer was cut off at its token limit (max_tokens): refusing half an answer")
        );
        assert_eq!(outcome.output, "");
    }
}

#[tokio::test]
async fn a_cut_off_tool_call_is_answered_with_an_error_and_the_loop_goes_on() {
    let cut = Answer::Json(
        json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "output", "arguments": "{\"text\": \"half"}}]},
        "finish_reason": "length"}]}),
    );
    let (_mock, base) = Mock::start(vec![cut, openai(None, &[("output", json!({"text": "whole"}))])]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output, "whole");
}

#[tokio::test]
async fn tool_arguments_sent_as_an_object_are_accepted_and_kept_as_sent() {
    let object_args = Answer::Json(
        json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "output", "arguments": {"text": "from an object"}}}]},
        "finish_reason": "tool_calls"}]}),
    );
    let (_mock, base) = Mock::start(vec![object_args]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output, "from an object");
    let call = outcome.transcript.iter().find(|e| e.role == "call").unwrap();
    assert_eq!(call.content, "output({\"text\":\"from an object\"})");
}

#[tokio::test]
async fn retry_after_is_honoured_up_to_the_steps_remaining_time() {
    let busy = || Answer::Status(503, json!({"error": {"message": "slow down"}}), Some("45"));
    // Below: the step has 40 s; waiting 45 s is pointless, so it fails at once.
    let (mock, base) = Mock::start(vec![busy()]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_secs(40), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    let error = outcome.error.unwrap();
    assert!(
        error.starts_with("openai-compatible asked to retry after 45s, but the step has only 39"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(mock.requests().len(), 1);
    // Above: 45 s are waited in full (not cut to 30 s), then it succeeds.
    let (mock, base) = Mock::start(vec![busy(), openai(Some("after the wait"), &[])]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_secs(60), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output, "after the wait");
    assert!(started.elapsed() >= Duration::from_secs(45), "{:?}", started.elapsed());
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured_and_the_last_attempt_does_not_sleep() {
    let at = std::time::SystemTime::now() + Duration::from_secs(2);
    let date: &'static str = Box::leak(httpdate::fmt_http_date(at).into_boxed_str());
    let (mock, base) = Mock::start(vec![
        Answer::Status(503, json!({"error": {"message": "overloaded"}}), Some(date)),
        openai(Some("ok"), &[]),
    ])
    .await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    // HTTP dates have whole seconds: the wait is between 1 and 2 s.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mock.requests().len(), 2);

    // Four 503s with Retry-After: 1: three waits, none after the last.
    let busy = || Answer::Status(503, json!({"error": {"message": "overloaded"}}), Some("1"));
    let (mock, base) = Mock::start(vec![busy(), busy(), busy(), busy()]).await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    let started = Instant::now();
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    let elapsed = started.elapsed();
    assert_eq!(
        outcome.error.as_deref(),
        Some("openai-compatible failed after 4 attempts: HTTP 503: overloaded")
    );
    assert_eq!(mock.requests().len(), 4);
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_millis(3800),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn errors_say_what_timed_out_or_failed_and_which_provider() {
    // A request timeout, on a model of the `ollama` provider.
    let (_mock, base) = Mock::start(vec![]).await;
    *_mock.forever.lock().unwrap() = Some(Answer::Slow(Duration::from_secs(5), json!({})));
    let (spec, store) = research_analyze_with(Provider::Ollama, &openai_base(&base), |m| {
        m.request_timeout = Some(Duration::from_millis(300));
    });
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    assert_eq!(
        outcome.error.as_deref(),
        Some("ollama failed after 4 attempts: timed out after 300ms")
    );
    // A host that does not resolve is named, with the resolver's answer.
    let (spec, store) = research_analyze(Provider::Anthropic, "http://courier-no-such-host.invalid", None);
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    let error = outcome.error.unwrap();
    assert!(error.starts_with("anthropic failed after 4 attempts: "), "{error}");
    assert!(error.contains("courier-no-such-host.invalid"), "{error}");
    assert!(error.contains("dns error"), "{error}");
    // A port nothing listens on: the refusal, with the address tried.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &format!("http://127.0.0.1:{port}/v1"), None);
    let outcome = run_step(&spec, &store, Duration::from_secs(20), &env(), std::future::pending()).await;
    let error = outcome.error.unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(error.contains("Connection refused"), "{error}");
}

#[tokio::test]
async fn an_api_key_echoed_by_the_provider_is_masked() {
    let key = "sk-it-echoed-7f2a9c";
    let (_mock, base) = Mock::start(vec![Answer::Status(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {key}. Check it.")}}),
        None,
    )])
    .await;
    let (spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), Some("IT_ECHO_KEY"));
    let env = BTreeMap::from([("IT_ECHO_KEY".to_string(), key.to_string())]);
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env, std::future::pending()).await;
    assert_eq!(
        outcome.error.as_deref(),
        Some("openai-compatible returned HTTP 401: Incorrect API key provided: ***. Check it.")
    );
}

#[tokio::test]
async fn a_model_file_can_ask_for_max_completion_tokens() {
    let (mock, base) = Mock::start(vec![openai(Some("a"), &[]), openai(Some("b"), &[])]).await;
    for field in [
        courier_wire::MaxTokensField::MaxCompletionTokens,
        courier_wire::MaxTokensField::MaxTokens,
    ] {
        let (spec, store) = research_analyze_with(Provider::OpenaiCompatible, &openai_base(&base), |m| {
            m.max_tokens = Some(300);
            m.max_tokens_field = field;
        });
        let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
        assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    }
    let requests = mock.requests();
    assert_eq!(requests[0].1["max_completion_tokens"], 300);
    assert!(requests[0].1.get("max_tokens").is_none());
    assert_eq!(requests[1].1["max_tokens"], 300);
    assert!(requests[1].1.get("max_completion_tokens").is_none());
}

#[tokio::test]
async fn a_structured_output_that_breaks_its_schema_goes_back_to_the_model_and_a_matching_one_passes() {
    let schema = json!({
        "type": "object",
        "properties": {"severity": {"enum": ["low", "high"]}, "files": {"type": "array", "items": {"type": "string"}}},
        "required": ["severity", "files"]
    });
    let call = |args: Value| {
        Answer::Json(
            json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "output", "arguments": args.to_string()}}]},
            "finish_reason": "tool_calls"}]}),
        )
    };
    let plain = |text: &str| {
        Answer::Json(json!({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}))
    };
    let (mock, base) = Mock::start(vec![
        call(json!({"severity": "urgent", "files": ["a.rs"]})),
        plain("it is high, trust me"),
        call(json!({"severity": "high", "files": ["a.rs", "b.rs"]})),
    ])
    .await;
    let (mut spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    spec.max_iterations = 4;
    spec.output_schema = Some(schema.to_string());
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.output, r#"{"files":["a.rs","b.rs"],"severity":"high"}"#);
    let requests = mock.requests();
    // The output tool takes the schema as its parameters.
    let tools = requests[0].1["tools"].as_array().unwrap();
    let output = tools.iter().find(|t| t["function"]["name"] == "output").unwrap();
    assert_eq!(output["function"]["parameters"], schema);
    // The violation came back as the tool's answer, the plain answer as a user message.
    let second = requests[1].1["messages"].as_array().unwrap();
    let tool = second.iter().rev().find(|m| m["role"] == "tool").unwrap();
    let refusal = tool["content"].as_str().unwrap();
    assert!(
        refusal.starts_with("error: the output does not match the step's output_schema: at /severity"),
        "{refusal}"
    );
    let third = requests[2].1["messages"].as_array().unwrap();
    let told = third.last().unwrap();
    assert_eq!(told["role"], "user");
    assert!(
        told["content"].as_str().unwrap().starts_with("the output is not JSON"),
        "{told}"
    );

    // A model that never matches: the step fails, saying why.
    let (_mock, base) = Mock::start(vec![call(json!({"severity": "low"})), call(json!({"severity": "low"}))]).await;
    let (mut spec, store) = research_analyze(Provider::OpenaiCompatible, &openai_base(&base), None);
    spec.max_iterations = 2;
    spec.output_schema = Some(schema.to_string());
    let outcome = run_step(&spec, &store, Duration::from_secs(10), &env(), std::future::pending()).await;
    assert_eq!(outcome.status, TaskStatus::Failed);
    let error = outcome.error.unwrap();
    assert!(
        error.contains("its last output call was refused") && error.contains("\"files\" is a required property"),
        "{error}"
    );
}
