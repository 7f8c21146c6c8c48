//! Courier's agent steps: an LLM loop with tools, run from a mounted snapshot
//! alone.
//!
//! **Invariant:** everything the prompt and the tools see comes from the
//! [`SnapshotStore`]; nothing can be written through it. Memory changes leave
//! only as proposals in the result, applied by the scheduler.

pub mod prompt;
pub mod provider;
pub mod tools;

use std::collections::BTreeMap;
use std::time::Duration;

use courier_config::{AgentStore, SnapshotStore};
use courier_wire::{AgentSpec, MemoryUpdate, TaskStatus, TokenUsage, TranscriptEntry};

use crate::provider::{ChatModel, ChatRequest, Message};
use crate::tools::Answer;

/// Largest transcript kept in a result, in bytes of content.
pub const MAX_TRANSCRIPT_BYTES: usize = 64 * 1024;
/// Largest single transcript entry, in bytes.
const MAX_ENTRY_BYTES: usize = 4 * 1024;

/// How an agent step ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Succeeded, failed or timed out.
    pub status: TaskStatus,
    /// The final answer.
    pub output: String,
    /// Why it failed.
    pub error: Option<String>,
    /// `provider/model`.
    pub model: Option<String>,
    /// Tokens used over every round trip.
    pub usage: TokenUsage,
    /// The conversation, bounded.
    pub transcript: Vec<TranscriptEntry>,
    /// Memory the model proposed (kept only if the step succeeds).
    pub memory_updates: Vec<MemoryUpdate>,
    /// The provider answered 429 and asked to wait this long.
    pub rate_limited: Option<Duration>,
}

/// What the loop has gathered so far; survives a timeout.
#[derive(Debug, Default)]
struct State {
    usage: TokenUsage,
    transcript: Vec<TranscriptEntry>,
    transcript_bytes: usize,
    proposals: Vec<MemoryUpdate>,
    output: Option<String>,
    rate_limited: Option<Duration>,
}

impl State {
    fn note(&mut self, role: &str, content: &str) {
        if self.transcript_bytes >= MAX_TRANSCRIPT_BYTES {
            return;
        }
        let mut content = content.to_string();
        if content.len() > MAX_ENTRY_BYTES {
            let mut cut = MAX_ENTRY_BYTES;
            while !content.is_char_boundary(cut) {
                cut -= 1;
            }
            content.truncate(cut);
            content.push('…');
        }
        self.transcript_bytes += content.len();
        if self.transcript_bytes >= MAX_TRANSCRIPT_BYTES {
            content = "(transcript truncated)".into();
        }
        self.transcript.push(TranscriptEntry {
            role: role.into(),
            content,
        });
    }
}

/// Run an agent step within `timeout`, or until `stop` completes (the step
/// is cancelled: the loop is dropped, an HTTP request in flight included);
/// API keys are read from `worker_env` (see [`provider::connect`]).
pub async fn run_step(
    spec: &AgentSpec,
    store: &SnapshotStore,
    timeout: Duration,
    worker_env: &BTreeMap<String, String>,
    stop: impl std::future::Future<Output = ()>,
) -> Outcome {
    let failed = |error: String, model: Option<String>| Outcome {
        status: TaskStatus::Failed,
        output: String::new(),
        error: Some(error),
        model,
        usage: TokenUsage::default(),
        transcript: Vec::new(),
        memory_updates: Vec::new(),
        rate_limited: None,
    };
    let model_id = match (&spec.model, store.agent_config()) {
        (Some(id), _) => id.clone(),
        (None, Ok(agent)) => agent.default_model,
        (None, Err(e)) => return failed(e.to_string(), None),
    };
    let def = match store.model(&model_id) {
        Ok(def) => def,
        Err(e) => return failed(e.to_string(), None),
    };
    let label = format!("{}/{}", def.provider.as_str(), def.model);
    let mut model = match provider::connect(&model_id, &def, worker_env) {
        Ok(m) => m,
        Err(e) => return failed(e.to_string(), Some(label)),
    };
    let mut state = State::default();
    let deadline = tokio::time::Instant::now() + timeout;
    let ended = tokio::select! {
        ended = tokio::time::timeout_at(deadline, run_loop(&mut model, spec, store, &mut state, deadline)) => Some(ended),
        () = stop => None,
    };
    let (status, error) = match ended {
        Some(Ok(Ok(()))) => (TaskStatus::Succeeded, None),
        Some(Ok(Err(e))) => (TaskStatus::Failed, Some(e)),
        Some(Err(_)) => (
            TaskStatus::TimedOut,
            Some(format!("timed out after {}", courier_wire::humanize(timeout))),
        ),
        None => (TaskStatus::Cancelled, Some("cancelled".to_string())),
    };
    let succeeded = status == TaskStatus::Succeeded;
    Outcome {
        status,
        output: state.output.unwrap_or_default(),
        error,
        model: Some(label),
        usage: state.usage,
        transcript: state.transcript,
        memory_updates: if succeeded { state.proposals } else { Vec::new() },
        rate_limited: state.rate_limited,
    }
}

async fn run_loop<M: ChatModel>(
    model: &mut M,
    spec: &AgentSpec,
    store: &SnapshotStore,
    state: &mut State,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let mut system = prompt::system(store, spec);
    let mut messages = Vec::new();
    if !spec.prompt.trim().is_empty() {
        messages.push(Message::User(spec.prompt.clone()));
    }
    for m in &spec.messages {
        match m.role.as_str() {
            "system" => {
                system.push('\n');
                system.push_str(&m.content);
            }
            "assistant" => messages.push(Message::Assistant {
                text: Some(m.content.clone()),
                calls: Vec::new(),
            }),
            _ => messages.push(Message::User(m.content.clone())),
        }
    }
    let schema = spec.output_schema.as_deref();
    let tools = tools::specs(&spec.tools, schema);
    // Why the last `output` call was refused, for the error if none succeeds.
    let mut refused_output: Option<String> = None;
    for _ in 0..spec.max_iterations {
        let request = ChatRequest {
            system: system.clone(),
            messages: messages.clone(),
            tools: tools.clone(),
            deadline,
        };
        let reply = match model.complete(&request).await {
            Ok(reply) => reply,
            Err(e) => {
                if let provider::ProviderError::RateLimited { wait, .. } = &e {
                    state.rate_limited = Some(*wait);
                }
                return Err(e.to_string());
            }
        };
        state.usage.input_tokens += reply.usage.input_tokens;
        state.usage.output_tokens += reply.usage.output_tokens;
        if let Some(text) = &reply.text {
            state.note("assistant", text);
        }
        if reply.calls.is_empty() {
            if reply.truncated {
                return Err(
                    "the model's answer was cut off at its token limit (max_tokens): refusing half an answer".into(),
                );
            }
            // A plain answer is the final answer (with a schema, only a
            // matching one: else the model is told, and tries again).
            let text = reply.text.filter(|t| !t.trim().is_empty());
            match (text, schema) {
                (None, _) => return Err("the model answered with neither text nor a tool call".into()),
                (Some(text), None) => {
                    state.output = Some(text);
                    return Ok(());
                }
                (Some(text), Some(schema)) => match courier_config::output_schema::validate(schema, text.trim()) {
                    Ok(()) => {
                        state.output = Some(text.trim().to_string());
                        return Ok(());
                    }
                    Err(why) => {
                        let ask = format!("{why}. Give your final answer with the output tool.");
                        state.note("user", &ask);
                        refused_output = Some(why);
                        messages.push(Message::Assistant {
                            text: Some(text),
                            calls: Vec::new(),
                        });
                        messages.push(Message::User(ask));
                        continue;
                    }
                },
            }
        }
        // Cut off with tool calls: a call whose arguments were cut gets an
        // error answer below, and the model can make it again.
        messages.push(Message::Assistant {
            text: reply.text.clone(),
            calls: reply.calls.clone(),
        });
        for call in &reply.calls {
            state.note("call", &format!("{}({})", call.name, call.sent));
            let content = match tools::call(call, &spec.tools, schema, store, &mut state.proposals) {
                Answer::Output(text) => {
                    state.output = Some(text);
                    "output recorded".to_string()
                }
                Answer::Text(text) => {
                    if call.name == tools::OUTPUT {
                        refused_output = Some(text.clone());
                    }
                    text
                }
            };
            state.note("tool", &content);
            messages.push(Message::Tool {
                call_id: call.id.clone(),
                name: call.name.clone(),
                content,
            });
        }
        if state.output.is_some() {
            return Ok(());
        }
    }
    Err(match refused_output {
        Some(why) => format!(
            "the agent did not finish within max_iterations ({}): its last output call was refused ({why})",
            spec.max_iterations
        ),
        None => format!(
            "the agent did not finish within max_iterations ({}): it never called output",
            spec.max_iterations
        ),
    })
}
