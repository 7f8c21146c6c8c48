//! Courier's wire formats: the snapshot, task and result frames, and the one
//! bounded codec they all go through.
//!
//! **Architecture invariant:** this crate does no I/O. It turns values into
//! bytes and bytes into values, within [`Limits`], names every way the bytes
//! can be wrong ([`WireError`]), and signs and verifies bodies ([`SigningKey`]).

mod budget;
mod control;
mod frame;
pub mod headers;
mod signature;
mod snapshot;
mod task;
mod trace;

pub use control::Control;
pub use frame::{
    ContentHash, DEFAULT_MAX_COMPRESSED, DEFAULT_MAX_DECOMPRESSED, DEFAULT_ZSTD_LEVEL, FLAG_ZSTD, Frame, FrameInfo,
    HEADER_LEN, Limits, SizeKind, WireError, decode, decode_with_info, encode, encode_message,
};
pub use signature::{SignatureError, SigningKey};
pub use snapshot::{
    AgentConfig, MaxTokensField, Memory, ModelDef, ModelLimits, Pricing, Provider, SNAPSHOT_VERSION, ScriptedReply,
    ScriptedToolCall, Skill, Snapshot, Soul, ToolPolicy,
};
pub use task::{
    AgentSpec, ChatMessage, MAX_RATE_LIMIT_PAUSE, MemoryTarget, MemoryUpdate, RESULT_VERSION, StepRun, StepSpec,
    TASK_VERSION, Task, TaskResult, TaskStatus, TokenUsage, TranscriptEntry,
};
pub use trace::{TraceParent, TraceParentError};

/// A duration as messages show it: whole seconds (`60s`), else milliseconds
/// (`300ms`).
pub fn humanize(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
