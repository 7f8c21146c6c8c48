//! LLM providers behind one trait: OpenAI-compatible chat completions
//! (OpenAI, vLLM, llama.cpp, LM Studio, Ollama's `/v1`), the Anthropic
//! Messages API, and `scripted` replies listed in the model file.
//!
//! HTTP providers retry 5xx (honouring `Retry-After`, in seconds or as an HTTP
//! date, as long as the step has that much time left), return a 429 at once
//! with its `Retry-After` (the scheduler pauses the model for the whole fleet
//! and retries the step: workers retrying on their own would burst together),
//! fail at once on other 4xx with the provider's error text, and name
//! malformed answers. Every
//! error names the provider as the model file does (`ollama`, not
//! `openai-compatible`), carries its cause chain ("timed out after 60s", the
//! DNS failure with the host), and has the API key masked if the provider
//! echoed it.

use std::collections::BTreeMap;
use std::time::Duration;

use courier_wire::{ModelDef, Provider as ProviderKind, ScriptedReply, TokenUsage};
use serde_json::{Value, json};

/// Default timeout of one provider request.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a model is paused after a 429 that gives no `Retry-After`.
pub const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(10);

/// Retries of one request after 5xx or a network error.
const MAX_RETRIES: u32 = 3;

/// A message of the conversation, provider-neutral.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The user (the step's prompt and messages).
    User(String),
    /// The model's turn: text and tool calls.
    Assistant { text: Option<String>, calls: Vec<ToolCall> },
    /// A tool's answer to one call.
    Tool {
        call_id: String,
        name: String,
        content: String,
    },
}

/// A tool call requested by the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Provider-assigned id, echoed back with the result.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Arguments, parsed; `Value::Null` when what was sent is not JSON.
    pub arguments: Value,
    /// The arguments as the model sent them (a JSON string's text, or an
    /// object's JSON), for the transcript and the next request.
    pub sent: String,
}

impl ToolCall {
    /// A call whose arguments came as text (OpenAI's protocol), parsed here.
    pub fn from_text(id: String, name: String, sent: String) -> Self {
        let arguments = serde_json::from_str(&sent).unwrap_or(Value::Null);
        Self {
            id,
            name,
            arguments,
            sent,
        }
    }

    /// A call whose arguments came as a JSON value.
    pub fn from_value(id: String, name: String, arguments: Value) -> Self {
        Self {
            id,
            name,
            sent: arguments.to_string(),
            arguments,
        }
    }
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Tool name.
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
    /// JSON schema of its arguments.
    pub parameters: Value,
}

/// One request to the model.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// System prompt.
    pub system: String,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    pub tools: Vec<ToolSpec>,
    /// When the step's time is up: no request or retry wait goes past it.
    pub deadline: tokio::time::Instant,
}

/// The model's answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reply {
    /// Text, if any.
    pub text: Option<String>,
    /// Tool calls, in order.
    pub calls: Vec<ToolCall>,
    /// Tokens used by this request.
    pub usage: TokenUsage,
    /// The answer was cut off at the token limit (`finish_reason: length`,
    /// `stop_reason: max_tokens`).
    pub truncated: bool,
}

/// Why a provider request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The model's provider is newer than this worker.
    #[error("this worker does not support the provider of model \"{model}\"; upgrade it")]
    Unsupported { model: String },
    /// The API key variable named by the model is not set on this worker.
    #[error("environment variable {var} (api_key_env of model \"{model}\") is not set on this worker")]
    MissingKey { var: String, model: String },
    /// The provider asked to wait longer than the step has left.
    #[error("{provider} asked to retry after {wait}, but the step has only {left} left")]
    NoTimeToRetry {
        provider: &'static str,
        wait: String,
        left: String,
    },
    /// The provider answered 429: the worker does not retry, the scheduler
    /// pauses the model for the whole fleet for `wait` and retries the step.
    #[error("{provider} answered HTTP 429 (rate limited; wait {}): {message}", courier_wire::humanize(*wait))]
    RateLimited {
        provider: &'static str,
        wait: Duration,
        message: String,
    },
    /// The provider refused the request (4xx other than 429).
    #[error("{provider} returned HTTP {status}: {message}")]
    Refused {
        provider: &'static str,
        status: u16,
        message: String,
    },
    /// Still failing after the retries (5xx or network errors).
    #[error("{provider} failed after {attempts} attempts: {last}")]
    Exhausted {
        provider: &'static str,
        attempts: u32,
        last: String,
    },
    /// The answer was not what the protocol says.
    #[error("{provider} sent a malformed answer: {detail}")]
    Malformed { provider: &'static str, detail: String },
    /// The scripted model ran out of replies.
    #[error("the scripted model has no reply left (it lists {0})")]
    ScriptExhausted(usize),
}

/// A chat model.
pub trait ChatModel: Send {
    /// One round trip.
    fn complete(&mut self, request: &ChatRequest) -> impl Future<Output = Result<Reply, ProviderError>> + Send;
}

/// The provider for a model definition, with its key read now from the
/// worker's environment as it started (`worker_env`: the worker keeps it in
/// memory, out of its process environment, so steps cannot read it).
///
/// # Errors
/// [`ProviderError::MissingKey`] when `api_key_env` names an unset variable.
pub fn connect(
    model_id: &str,
    def: &ModelDef,
    worker_env: &BTreeMap<String, String>,
) -> Result<AnyModel, ProviderError> {
    if def.provider == ProviderKind::Unsupported {
        return Err(ProviderError::Unsupported {
            model: model_id.to_string(),
        });
    }
    let key = match &def.api_key_env {
        Some(var) => Some(worker_env.get(var).cloned().ok_or_else(|| ProviderError::MissingKey {
            var: var.clone(),
            model: model_id.to_string(),
        })?),
        None => None,
    };
    let http = || {
        reqwest::Client::builder()
            .build()
            .map_err(|e| ProviderError::Malformed {
                provider: def.provider.as_str(),
                detail: e.to_string(),
            })
    };
    let endpoint = |key| {
        Ok::<_, ProviderError>(Endpoint {
            provider: def.provider.as_str(),
            http: http()?,
            key,
            request_timeout: def.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        })
    };
    let base_url = def
        .base_url
        .clone()
        .unwrap_or_else(|| default_base_url(def.provider).to_string());
    Ok(match def.provider {
        ProviderKind::OpenaiCompatible | ProviderKind::Ollama => AnyModel::OpenAi(OpenAi {
            endpoint: endpoint(key)?,
            base_url,
            def: def.clone(),
        }),
        ProviderKind::Anthropic => AnyModel::Anthropic(Anthropic {
            endpoint: endpoint(key)?,
            base_url,
            def: def.clone(),
        }),
        ProviderKind::Scripted | ProviderKind::Unsupported => AnyModel::Scripted(Scripted {
            replies: def.script.clone(),
            next: 0,
        }),
    })
}

fn default_base_url(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::OpenaiCompatible => "https://api.openai.com/v1",
        ProviderKind::Ollama => "http://localhost:11434/v1",
        ProviderKind::Anthropic => "https://api.anthropic.com",
        ProviderKind::Scripted | ProviderKind::Unsupported => "",
    }
}

/// Any of the providers.
#[derive(Debug)]
pub enum AnyModel {
    /// OpenAI-compatible chat completions.
    OpenAi(OpenAi),
    /// Anthropic Messages.
    Anthropic(Anthropic),
    /// Scripted replies.
    Scripted(Scripted),
}

impl ChatModel for AnyModel {
    async fn complete(&mut self, request: &ChatRequest) -> Result<Reply, ProviderError> {
        match self {
            AnyModel::OpenAi(m) => m.complete(request).await,
            AnyModel::Anthropic(m) => m.complete(request).await,
            AnyModel::Scripted(m) => m.complete(request).await,
        }
    }
}

/// An HTTP provider's connection: client, endpoint, key, and how long one
/// request may take.
#[derive(Debug)]
struct Endpoint {
    provider: &'static str,
    http: reqwest::Client,
    key: Option<String>,
    request_timeout: Duration,
}

impl Endpoint {
    /// POST JSON, retrying 5xx and network errors within the step's
    /// deadline (a 429 returns at once: the scheduler paces the fleet); the
    /// answer's JSON.
    async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: &Value,
        deadline: tokio::time::Instant,
    ) -> Result<Value, ProviderError> {
        let provider = self.provider;
        let mut last = String::new();
        for attempt in 0..=MAX_RETRIES {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let timeout = self.request_timeout.min(left);
            let mut request = self.http.post(url).json(body).timeout(timeout);
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let backoff = Duration::from_millis(500 * 2u64.pow(attempt));
            let wait = match request.send().await {
                Err(e) => {
                    last = self.mask(&describe(&e, timeout));
                    backoff
                }
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(retry_after);
                    let text = response.text().await.map_err(|e| ProviderError::Malformed {
                        provider,
                        detail: self.mask(&describe(&e, timeout)),
                    })?;
                    if status.is_success() {
                        return serde_json::from_str(&text).map_err(|e| ProviderError::Malformed {
                            provider,
                            detail: self.mask(&format!("{e} in {}", excerpt(&text))),
                        });
                    }
                    let message = self.mask(&error_message(&text));
                    if status.as_u16() == 429 {
                        return Err(ProviderError::RateLimited {
                            provider,
                            wait: retry_after
                                .unwrap_or(DEFAULT_RATE_LIMIT_PAUSE)
                                .min(courier_wire::MAX_RATE_LIMIT_PAUSE),
                            message,
                        });
                    }
                    if !status.is_server_error() {
                        return Err(ProviderError::Refused {
                            provider,
                            status: status.as_u16(),
                            message,
                        });
                    }
                    last = format!("HTTP {}: {message}", status.as_u16());
                    match retry_after {
                        Some(wait) => {
                            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                            if wait > left {
                                return Err(ProviderError::NoTimeToRetry {
                                    provider,
                                    wait: courier_wire::humanize(wait),
                                    left: courier_wire::humanize(left),
                                });
                            }
                            wait
                        }
                        None => backoff,
                    }
                }
            };
            if attempt == MAX_RETRIES {
                break;
            }
            tracing::warn!(provider, error = %last, attempt = attempt + 1, wait_ms = wait.as_millis() as u64, "provider request failed; retrying");
            tokio::time::sleep_until((tokio::time::Instant::now() + wait).min(deadline)).await;
        }
        Err(ProviderError::Exhausted {
            provider,
            attempts: MAX_RETRIES + 1,
            last,
        })
    }

    /// `text` with the API key replaced, should the provider have echoed it.
    fn mask(&self, text: &str) -> String {
        match &self.key {
            Some(key) if key.len() >= 4 => text.replace(key.as_str(), "***"),
            _ => text.to_string(),
        }
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(1e9)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A request error with its cause chain: "timed out after 60s", or what the
/// connection failed on (the DNS failure naming the host, a refused port).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {}", courier_wire::humanize(timeout));
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The provider's own error text (`{"error": {"message": ...}}` in both
/// protocols), else the body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(String::from))
        .unwrap_or_else(|| excerpt(body))
}

fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    format!("\"{s}\"")
}

fn malformed(provider: &'static str, detail: impl Into<String>) -> ProviderError {
    ProviderError::Malformed {
        provider,
        detail: detail.into(),
    }
}

/// OpenAI-compatible chat completions.
#[derive(Debug)]
pub struct OpenAi {
    endpoint: Endpoint,
    base_url: String,
    def: ModelDef,
}

impl ChatModel for OpenAi {
    async fn complete(&mut self, request: &ChatRequest) -> Result<Reply, ProviderError> {
        let p = self.endpoint.provider;
        let mut messages = vec![json!({"role": "system", "content": request.system})];
        for m in &request.messages {
            messages.push(match m {
                Message::User(text) => json!({"role": "user", "content": text}),
                Message::Assistant { text, calls } => {
                    let mut msg = json!({"role": "assistant", "content": text});
                    if !calls.is_empty() {
                        msg["tool_calls"] = calls
                            .iter()
                            .map(|c| {
                                json!({"id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": c.sent}})
                            })
                            .collect();
                    }
                    msg
                }
                Message::Tool { call_id, content, .. } => {
                    json!({"role": "tool", "tool_call_id": call_id, "content": content})
                }
            });
        }
        let mut body = json!({"model": self.def.model, "messages": messages});
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
                .collect();
        }
        if let Some(max) = self.def.max_tokens {
            body[self.def.max_tokens_field.as_str()] = json!(max);
        }
        if let Some(t) = self.def.temperature {
            body["temperature"] = json!(t);
        }
        let headers: Vec<(&str, String)> = self
            .endpoint
            .key
            .iter()
            .map(|k| ("authorization", format!("Bearer {k}")))
            .collect();
        let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
        let answer = self.endpoint.post(&url, &headers, &body, request.deadline).await?;
        let choice = &answer["choices"][0];
        let message = &choice["message"];
        if !message.is_object() {
            return Err(malformed(p, "no choices[0].message"));
        }
        let mut calls = Vec::new();
        for c in message["tool_calls"].as_array().into_iter().flatten() {
            let name = c["function"]["name"]
                .as_str()
                .ok_or_else(|| malformed(p, "a tool call without a name"))?;
            let id = c["id"].as_str().unwrap_or(name).to_string();
            // The protocol says a JSON string; some servers send the object.
            calls.push(match &c["function"]["arguments"] {
                Value::String(text) => ToolCall::from_text(id, name.to_string(), text.clone()),
                Value::Null => ToolCall::from_value(id, name.to_string(), json!({})),
                value => ToolCall::from_value(id, name.to_string(), value.clone()),
            });
        }
        Ok(Reply {
            text: message["content"].as_str().filter(|s| !s.is_empty()).map(String::from),
            calls,
            usage: TokenUsage {
                input_tokens: answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                output_tokens: answer["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            },
            truncated: choice["finish_reason"] == "length",
        })
    }
}

/// The Anthropic Messages API.
#[derive(Debug)]
pub struct Anthropic {
    endpoint: Endpoint,
    base_url: String,
    def: ModelDef,
}

impl ChatModel for Anthropic {
    async fn complete(&mut self, request: &ChatRequest) -> Result<Reply, ProviderError> {
        let p = self.endpoint.provider;
        let mut messages: Vec<Value> = Vec::new();
        for m in &request.messages {
            let (role, block) = match m {
                Message::User(text) => ("user", vec![json!({"type": "text", "text": text})]),
                Message::Assistant { text, calls } => {
                    let mut blocks: Vec<Value> = text.iter().map(|t| json!({"type": "text", "text": t})).collect();
                    blocks.extend(
                        calls
                            .iter()
                            .map(|c| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments})),
                    );
                    ("assistant", blocks)
                }
                Message::Tool { call_id, content, .. } => (
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": call_id, "content": content})],
                ),
            };
            // Consecutive turns of one role merge (tool results of one reply).
            match messages.last_mut() {
                Some(last) if last["role"] == role => {
                    if let Some(content) = last["content"].as_array_mut() {
                        content.extend(block);
                    }
                }
                _ => messages.push(json!({"role": role, "content": block})),
            }
        }
        let mut body = json!({
            "model": self.def.model,
            "max_tokens": self.def.max_tokens.unwrap_or(1024),
            "system": request.system,
            "messages": messages,
        });
        if !request.tools.is_empty() {
            body["tools"] = request
                .tools
                .iter()
                .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
                .collect();
        }
        if let Some(t) = self.def.temperature {
            body["temperature"] = json!(t);
        }
        let mut headers = vec![("anthropic-version", "2023-06-01".to_string())];
        if let Some(k) = &self.endpoint.key {
            headers.push(("x-api-key", k.clone()));
        }
        let url = format!("{}/v1/messages", self.base_url.trim_end_matches('/'));
        let answer = self.endpoint.post(&url, &headers, &body, request.deadline).await?;
        let content = answer["content"]
            .as_array()
            .ok_or_else(|| malformed(p, "no content array"))?;
        let mut text = String::new();
        let mut calls = Vec::new();
        for block in content {
            match block["type"].as_str() {
                Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
                Some("tool_use") => calls.push(ToolCall::from_value(
                    block["id"].as_str().unwrap_or_default().to_string(),
                    block["name"]
                        .as_str()
                        .ok_or_else(|| malformed(p, "a tool_use block without a name"))?
                        .to_string(),
                    block["input"].clone(),
                )),
                _ => {}
            }
        }
        Ok(Reply {
            text: (!text.is_empty()).then_some(text),
            calls,
            usage: TokenUsage {
                input_tokens: answer["usage"]["input_tokens"].as_u64().unwrap_or(0),
                output_tokens: answer["usage"]["output_tokens"].as_u64().unwrap_or(0),
            },
            truncated: answer["stop_reason"] == "max_tokens",
        })
    }
}

/// Replies listed in the model file, in order: for tests and offline demos.
#[derive(Debug)]
pub struct Scripted {
    replies: Vec<ScriptedReply>,
    next: usize,
}

impl ChatModel for Scripted {
    async fn complete(&mut self, _request: &ChatRequest) -> Result<Reply, ProviderError> {
        let reply = self
            .replies
            .get(self.next)
            .ok_or(ProviderError::ScriptExhausted(self.replies.len()))?;
        let n = self.next;
        self.next += 1;
        Ok(Reply {
            text: reply.text.clone(),
            calls: reply
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, c)| ToolCall::from_value(format!("scripted-{n}-{i}"), c.name.clone(), c.arguments.clone()))
                .collect(),
            usage: TokenUsage::default(),
            truncated: false,
        })
    }
}
