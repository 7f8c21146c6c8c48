//! Agent steps end to end: the `research` example through RabbitMQ with a
//! scheduler and workers, its model an OpenAI-compatible server run here.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};

use crate::cluster::Cluster;

const KEY: &str = "sk-it-2c9e41f7b8d03a5e6f";

/// An OpenAI-compatible model that checks the key, tries to write memory,
/// proposes a memory update once it saw the refusal, then answers.
async fn model(headers: HeaderMap, Json(body): Json<Value>) -> axum::response::Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KEY}")) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "bad key"}}))).into_response();
    }
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let system = messages[0]["content"].as_str().unwrap_or_default();
    let last_tool = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "tool")
        .and_then(|m| m["content"].as_str());
    let call = |name: &str, args: Value| {
        json!({"choices": [{"message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": args.to_string()}}]}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 4}})
    };
    let reply = if system.starts_with("You are an editor") {
        let analysis = messages[1]["content"].as_str().unwrap_or_default();
        call(
            "output",
            json!({"text": format!("BRIEF from: {}", analysis.lines().last().unwrap_or_default())}),
        )
    } else {
        match last_tool {
            None => call("write_memory", json!({"scope": "workflow", "text": "sneaky"})),
            Some(t) if t.starts_with("error: read-only store") => call(
                "propose_memory_update",
                json!({"scope": "workflow", "text": "- learned in the e2e run"}),
            ),
            Some(_) => call("output", json!({"text": "ANALYSIS of the notes"})),
        }
    };
    Json(reply).into_response()
}

/// Start the model server on its own thread; returns its base URL.
fn start_model() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send addr");
            let app = axum::Router::new().route("/v1/chat/completions", post(model));
            axum::serve(listener, app).await.expect("serve");
        });
    });
    format!("http://{}/v1", rx.recv().expect("model server address"))
}

#[test]
fn the_research_example_runs_its_agent_steps_and_memory_learns_through_the_scheduler() {
    let base = start_model();
    let model = format!(
        "provider: openai-compatible\nmodel: test-model\nbase_url: {base}\napi_key_env: COURIER_IT_LLM_KEY\nrequest_timeout: 10s\n"
    );
    let cluster = Cluster::builder()
        .workers(2)
        .file("agents/models/local.yaml", &model)
        .env("COURIER_IT_LLM_KEY", KEY)
        .tap()
        .start();
    let id = cluster.submit("research", &[("topic", "message queues")]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", cluster.logs());
    let steps = run["steps"].as_array().unwrap();
    let analyze = &steps[1];
    assert_eq!(analyze["output"], "ANALYSIS of the notes");
    assert_eq!(analyze["model"], "openai-compatible/test-model");
    assert_eq!(
        (analyze["input_tokens"].as_i64(), analyze["output_tokens"].as_i64()),
        (Some(120), Some(12))
    );
    let transcript = analyze["transcript"].to_string();
    assert!(
        transcript.contains("read-only store: cannot write memory"),
        "{transcript}"
    );
    assert_eq!(steps[2]["output"], "BRIEF from: ANALYSIS of the notes");

    // The proposal landed in the scheduler's memory file; "sneaky" did not.
    let memory =
        std::fs::read_to_string(cluster.config_dir.join("agents/memory/workflows/research/MEMORY.md")).unwrap();
    assert!(memory.ends_with("- learned in the e2e run\n"), "{memory}");
    assert!(!memory.contains("sneaky"));

    // No published message (tasks with their snapshots, results) holds the key.
    let bodies = cluster.tapped();
    assert!(bodies.len() >= 6, "3 tasks and 3 results, got {}", bodies.len());
    for body in bodies {
        assert!(!body.windows(KEY.len()).any(|w| w == KEY.as_bytes()));
        let text = decoded(&body);
        assert!(!text.contains(KEY), "{text}");
    }

    // `courier runs <id>` shows the model and tokens.
    let (out, stdout, _) = crate::support::run(cluster.courier().args(["runs", &id]));
    assert!(out.status.success());
    assert!(
        stdout.contains("analyze: model openai-compatible/test-model, 120 input + 12 output tokens"),
        "{stdout}"
    );
}

/// Everything a task or result frame holds, snapshot included, as text.
fn decoded(body: &[u8]) -> String {
    let limits = courier_wire::Limits::default();
    if let Ok(task) = courier_wire::decode::<courier_wire::Task>(body, &limits) {
        let snapshot: courier_wire::Snapshot = courier_wire::decode(&task.snapshot, &limits).unwrap();
        return format!("{task:?} {snapshot:?}");
    }
    let result: courier_wire::TaskResult = courier_wire::decode(body, &limits).unwrap();
    format!("{result:?}")
}
