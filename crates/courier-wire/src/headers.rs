//! AMQP header names of the task and result contract (DESIGN.md, "Tasks and results").
//!
//! Properties carry the rest: `message_id` = task id, `correlation_id` = run id.

/// The attempt number, from 1 (integer).
pub const ATTEMPT: &str = "x-courier-attempt";
/// Hex BLAKE3 of the task's snapshot frame (string).
pub const SNAPSHOT_HASH: &str = "x-courier-snapshot-hash";
/// Hex HMAC-SHA256 of the message body, when a signing key is configured (string).
pub const SIGNATURE: &str = "x-courier-signature";
/// Why a message was dead-lettered (string).
pub const DEAD_REASON: &str = "x-courier-dead-reason";
/// What a dead-lettered message is when it is not a task: `result` (string).
pub const KIND: &str = "x-courier-kind";
/// The pool (task queue) a dead-lettered task came from (string).
pub const POOL: &str = "x-courier-pool";
/// W3C trace context of the task (string, `00-<trace-id>-<parent-id>-<flags>`;
/// see [`crate::TraceParent`]).
pub const TRACEPARENT: &str = "traceparent";
