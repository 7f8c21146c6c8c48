//! Task and result messages: what the scheduler publishes and what workers answer.
//!
//! Same rules as the snapshot: named MessagePack fields, new fields get
//! `#[serde(default)]`, unknown fields are ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::frame::Frame;

/// Task format version written by this build.
pub const TASK_VERSION: u8 = 1;
/// Result format version written by this build.
pub const RESULT_VERSION: u8 = 1;

/// The longest a provider's `Retry-After` pauses a model: a longer (or
/// hostile) value is cut to this.
pub const MAX_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(15 * 60);

/// One attempt of one step, self-contained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// UUIDv7, also the AMQP `message_id`.
    pub task_id: Uuid,
    /// The run, also the AMQP `correlation_id`.
    pub run_id: Uuid,
    /// Workflow name.
    pub workflow: String,
    /// Step name.
    pub step: String,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The step with params and upstream outputs substituted.
    pub spec: StepSpec,
    /// Outputs of the upstream steps the step's fields read, by step name
    /// (what its templates were rendered from).
    #[serde(default)]
    pub upstream: BTreeMap<String, String>,
    /// Deadline as milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
    /// The encoded snapshot frame.
    #[serde(with = "serde_bytes")]
    pub snapshot: Vec<u8>,
    /// The worker pool the task is for; a worker refuses it from any other
    /// pool's queue (empty from schedulers older than the field).
    #[serde(default)]
    pub pool: String,
}

impl Frame for Task {
    const KIND: &'static str = "task";
    const MAGIC: [u8; 4] = *b"CTSK";
    const VERSION: u8 = TASK_VERSION;
    const MIN_VERSION: u8 = 1;

    /// Tasks are encoded per dispatch and carry an already-compressed
    /// snapshot: see [`crate::frame::message_zstd_level`]; level 1 above.
    fn zstd_level(body_len: usize) -> i32 {
        crate::frame::message_zstd_level(body_len, 1)
    }
}

/// A resolved step: what to run and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// The step's time budget.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What to run.
    pub run: StepRun,
}

/// What a step runs.
///
/// Decoding is open: a kind this build does not know (written by a newer
/// scheduler) decodes as [`StepRun::Unsupported`], so an older worker answers
/// "upgrade me" instead of refusing the task as undecodable.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepRun {
    /// A process: argv, extra environment.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
    /// An LLM loop with tools over the snapshot.
    Agent(AgentSpec),
    /// No process, no model: the output is the text. For benchmarks and for
    /// passing values between steps.
    Echo {
        /// The step's output.
        text: String,
    },
    /// A step kind this build does not know, by its name; never encoded.
    #[serde(skip)]
    Unsupported {
        /// The kind's name on the wire.
        kind: String,
    },
}

impl StepRun {
    /// The kind's name: `command`, `agent`, `echo`, or an unknown one's.
    pub fn kind(&self) -> &str {
        match self {
            StepRun::Command { .. } => "command",
            StepRun::Agent(_) => "agent",
            StepRun::Echo { .. } => "echo",
            StepRun::Unsupported { kind } => kind,
        }
    }
}

impl<'de> Deserialize<'de> for StepRun {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, IgnoredAny, MapAccess, Visitor};

        #[derive(Deserialize)]
        struct CommandFields {
            argv: Vec<String>,
            #[serde(default)]
            env: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        struct EchoFields {
            text: String,
        }
        struct Kind;
        impl<'de> Visitor<'de> for Kind {
            type Value = StepRun;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a step kind: a map of one kind to its fields")
            }

            /// A kind without fields (none today).
            fn visit_str<E: de::Error>(self, kind: &str) -> Result<StepRun, E> {
                Ok(StepRun::Unsupported { kind: kind.to_string() })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StepRun, A::Error> {
                let kind: String = map
                    .next_key()?
                    .ok_or_else(|| de::Error::custom("a step kind with no name"))?;
                let run = match kind.as_str() {
                    "command" => {
                        let c: CommandFields = map.next_value()?;
                        StepRun::Command {
                            argv: c.argv,
                            env: c.env,
                        }
                    }
                    "agent" => StepRun::Agent(map.next_value()?),
                    "echo" => StepRun::Echo {
                        text: map.next_value::<EchoFields>()?.text,
                    },
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        StepRun::Unsupported { kind }
                    }
                };
                if map.next_key::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("a step has exactly one kind"));
                }
                Ok(run)
            }
        }
        d.deserialize_any(Kind)
    }
}

/// A resolved agent step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// Model ID; `None` means the agent config's default model.
    #[serde(default)]
    pub model: Option<String>,
    /// Soul ID.
    #[serde(default)]
    pub soul: Option<String>,
    /// Skill IDs.
    #[serde(default)]
    pub skills: Vec<String>,
    /// Whether memory is in the snapshot and the prompt.
    #[serde(default)]
    pub memory: bool,
    /// The step's prompt.
    #[serde(default)]
    pub prompt: String,
    /// Extra messages after the prompt.
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    /// Tools enabled for this step.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Bound on model round trips.
    pub max_iterations: u32,
    /// A JSON Schema (as JSON text) the output must match: the `output`
    /// tool takes it as its parameters.
    #[serde(default)]
    pub output_schema: Option<String>,
}

/// A chat message given in a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Message text.
    pub content: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// The step ran and succeeded.
    Succeeded,
    /// The step ran and failed.
    Failed,
    /// The step ran past its timeout and was killed.
    TimedOut,
    /// The task was refused before running (corrupt, oversized, badly signed).
    Rejected,
    /// The run or step was cancelled: the step was stopped, or never started.
    Cancelled,
}

impl TaskStatus {
    /// Every status, in declaration order.
    pub const ALL: &'static [TaskStatus] = &[
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Rejected,
        TaskStatus::Cancelled,
    ];

    /// The name used in results, the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Rejected => "rejected",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

/// A worker's answer for one task attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task answered.
    pub task_id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step: String,
    /// Its attempt.
    pub attempt: u32,
    /// How it ended.
    pub status: TaskStatus,
    /// The step's output (stdout, or the agent's output).
    #[serde(default)]
    pub output: String,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// When the worker started it, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// When it finished, ms since the Unix epoch.
    pub finished_unix_ms: u64,
    /// Which worker ran it.
    pub worker_id: String,
    /// Memory changes the step proposes; the scheduler applies them.
    #[serde(default)]
    pub memory_updates: Vec<MemoryUpdate>,
    /// Agent steps: `provider/model` that answered.
    #[serde(default)]
    pub model: Option<String>,
    /// Agent steps: tokens used.
    #[serde(default)]
    pub usage: Option<TokenUsage>,
    /// Agent steps: the conversation, bounded in size.
    #[serde(default)]
    pub transcript: Vec<TranscriptEntry>,
    /// Agent steps: the provider answered 429 and asked to wait this long
    /// (ms, at most [`MAX_RATE_LIMIT_PAUSE`]). The worker does not retry; the
    /// scheduler pauses the model for the whole fleet and retries the step
    /// after the pause.
    #[serde(default)]
    pub rate_limited_ms: Option<u64>,
}

/// Tokens an agent step used, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Prompt (input) tokens.
    pub input_tokens: u64,
    /// Completion (output) tokens.
    pub output_tokens: u64,
}

/// One turn of an agent step's conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    /// `assistant`, `tool` (a tool's answer) or `call` (a tool call).
    pub role: String,
    /// What was said, or the tool call as `name(arguments)`.
    pub content: String,
}

impl Frame for TaskResult {
    const KIND: &'static str = "result";
    const MAGIC: [u8; 4] = *b"CRES";
    const VERSION: u8 = RESULT_VERSION;
    const MIN_VERSION: u8 = 1;

    /// Results are encoded once per answer: see
    /// [`crate::frame::message_zstd_level`]; zstd's default level above, as
    /// before (a large output must still fit the compressed limit).
    fn zstd_level(body_len: usize) -> i32 {
        crate::frame::message_zstd_level(body_len, crate::frame::DEFAULT_ZSTD_LEVEL)
    }
}

/// Which memory file an update targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryTarget {
    /// `memory/MEMORY.md`.
    Global,
    /// `memory/workflows/<workflow>/MEMORY.md` of the task's workflow.
    Workflow,
}

/// A proposed memory change: text appended to a memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUpdate {
    /// Which file.
    pub target: MemoryTarget,
    /// Markdown to append.
    pub append: String,
}
