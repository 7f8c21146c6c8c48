//! The snapshot: everything one step needs from the agent resources, and nothing else.
//!
//! These types are also what the scheduler parses its resource files into, so
//! a resource means the same thing on disk and on the wire. Collections are
//! `BTreeMap`s so encoding is deterministic. Every field added after version 1
//! must carry `#[serde(default)]`; unknown fields are ignored by the decoder.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::Frame;

/// Snapshot format version written by this build.
pub const SNAPSHOT_VERSION: u8 = 1;

/// The resources one step needs, embedded in its task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The workflow the step belongs to (names its memory section).
    pub workflow: String,
    /// Agent configuration; absent for command steps, which need none.
    #[serde(default)]
    pub agent: Option<AgentConfig>,
    /// The models the step uses, by ID.
    #[serde(default)]
    pub models: BTreeMap<String, ModelDef>,
    /// The step's skills, by ID.
    #[serde(default)]
    pub skills: BTreeMap<String, Skill>,
    /// The step's soul, if it names one.
    #[serde(default)]
    pub soul: Option<Soul>,
    /// Memory, present only when the step enables it.
    #[serde(default)]
    pub memory: Option<Memory>,
}

impl Frame for Snapshot {
    const KIND: &'static str = "snapshot";
    const MAGIC: [u8; 4] = *b"CSNP";
    const VERSION: u8 = SNAPSHOT_VERSION;
    const MIN_VERSION: u8 = 1;

    /// Snapshots are built once per step and cached, then decoded by every
    /// task: spend encode time on size. Level 19 up to 128 KiB (about 1 ms per
    /// 4 KiB), level 9 above (about 20 MB/s). `cargo bench -p courier-wire`
    /// prints the level sweep behind this choice.
    fn zstd_level(body_len: usize) -> i32 {
        if body_len <= 128 * 1024 { 19 } else { 9 }
    }
}

/// `config/agents/config.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Model used by agent steps that name none.
    pub default_model: String,
    /// Which tools steps may enable.
    #[serde(default)]
    pub tools: ToolPolicy,
}

/// The tools agent steps may enable; a step enables a subset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolPolicy {
    /// Tool names steps may enable.
    #[serde(default)]
    pub allowed: Vec<String>,
}

/// An LLM provider protocol.
///
/// Decoding is open: a provider this build does not know (in a snapshot
/// from a newer scheduler) decodes as [`Provider::Unsupported`], so an older
/// worker fails the step with "upgrade me" instead of refusing the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// OpenAI chat completions and compatible servers (vLLM, llama.cpp, LM Studio).
    OpenaiCompatible,
    /// Anthropic Messages API.
    Anthropic,
    /// Ollama, through its OpenAI-compatible `/v1` endpoint.
    Ollama,
    /// Replies listed in the model file: for tests and offline demos.
    Scripted,
    /// A provider this build does not know; never encoded.
    #[serde(skip)]
    Unsupported,
}

impl<'de> Deserialize<'de> for Provider {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(Provider::KNOWN
            .into_iter()
            .find(|p| p.as_str() == name)
            .unwrap_or(Provider::Unsupported))
    }
}

impl Provider {
    /// Every provider this build speaks.
    pub const KNOWN: [Provider; 4] = [
        Provider::OpenaiCompatible,
        Provider::Anthropic,
        Provider::Ollama,
        Provider::Scripted,
    ];

    /// The name used in model files.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenaiCompatible => "openai-compatible",
            Provider::Anthropic => "anthropic",
            Provider::Ollama => "ollama",
            Provider::Scripted => "scripted",
            Provider::Unsupported => "unsupported",
        }
    }
}

/// `config/agents/models/<id>.yaml`. Holds the NAME of the environment variable
/// with the API key, never a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDef {
    /// Provider protocol.
    pub provider: Provider,
    /// Model name as the provider knows it.
    pub model: String,
    /// Provider endpoint.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of the worker environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Maximum tokens to generate per request.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Timeout of one provider request.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Replies of the `scripted` provider, in order.
    #[serde(default)]
    pub script: Vec<ScriptedReply>,
    /// The request field that carries `max_tokens` (OpenAI-compatible
    /// providers): OpenAI's reasoning models take `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens_field: MaxTokensField,
    /// Prices, for the cost of each step and run (the scheduler's concern).
    #[serde(default)]
    pub pricing: Option<Pricing>,
    /// Fleet-wide limits the scheduler enforces at dispatch.
    #[serde(default)]
    pub limits: ModelLimits,
}

/// What a model costs, in the currency of the user's choice, per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// Price of a million prompt (input) tokens.
    #[serde(default)]
    pub input_per_mtok: f64,
    /// Price of a million completion (output) tokens.
    #[serde(default)]
    pub output_per_mtok: f64,
}

impl Pricing {
    /// The cost of `input` prompt and `output` completion tokens.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_mtok + output as f64 * self.output_per_mtok) / 1_000_000.0
    }
}

/// Limits on a model that hold across the whole fleet; unset means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Steps using the model at once.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Steps started per rolling minute.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens (estimated at dispatch, corrected by results) per rolling minute.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl ModelLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.concurrency.is_some() || self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }
}

/// Which request field carries a model's token limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    /// `max_tokens`: most servers, and OpenAI's older models.
    #[default]
    MaxTokens,
    /// `max_completion_tokens`: OpenAI's reasoning models refuse `max_tokens`.
    MaxCompletionTokens,
}

impl MaxTokensField {
    /// The field's name in a request.
    pub fn as_str(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// One reply of the `scripted` provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScriptedReply {
    /// Assistant text.
    #[serde(default)]
    pub text: Option<String>,
    /// Tool calls, in order.
    #[serde(default)]
    pub tool_calls: Vec<ScriptedToolCall>,
}

/// A tool call in a scripted reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptedToolCall {
    /// Tool name.
    pub name: String,
    /// Tool arguments.
    #[serde(default)]
    pub arguments: serde_json::Value,
}

/// `config/agents/skills/<id>/SKILL.md`: front matter plus Markdown body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skill {
    /// Display name.
    pub name: String,
    /// One-line description shown to the model up front.
    pub description: String,
    /// Search tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Markdown body, read through a tool.
    #[serde(default)]
    pub body: String,
}

/// `config/agents/souls/<id>.md`: front matter plus Markdown body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Soul {
    /// The soul's ID.
    #[serde(default)]
    pub id: String,
    /// Display name.
    pub name: String,
    /// Short description.
    #[serde(default)]
    pub description: Option<String>,
    /// Markdown body: the persona, placed first in the prompt.
    #[serde(default)]
    pub body: String,
}

/// Memory sections carried when a step enables memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// `memory/MEMORY.md`.
    #[serde(default)]
    pub global: Option<String>,
    /// `memory/workflows/<workflow>/MEMORY.md`.
    #[serde(default)]
    pub workflow: Option<String>,
}
