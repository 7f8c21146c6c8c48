//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>)
//! for tasks: every step of a run is one trace, whose ID is the run ID, so a
//! step's logs on any worker join the scheduler's logs of that run.

use std::fmt;

use uuid::Uuid;

/// A parsed or built `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace ID, never all zeros.
    pub trace_id: [u8; 16],
    /// 8-byte ID of the parent span (the task), never all zeros.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-traceid-parentid-flags` with the right field lengths.
    #[error("malformed traceparent {0:?}")]
    Malformed(String),
    /// Version `ff`, which the specification forbids.
    #[error("traceparent version ff is invalid")]
    InvalidVersion,
    /// An all-zero trace or parent ID.
    #[error("traceparent has an all-zero {0}")]
    Zero(&'static str),
}

impl TraceParent {
    /// The trace context of one task: trace ID = run ID, parent ID = the last
    /// 8 bytes of the task ID (the random part of a UUIDv7), sampled. The
    /// same task always gets the same value, also when republished.
    pub fn for_task(run_id: Uuid, task_id: Uuid) -> Self {
        let mut trace_id = *run_id.as_bytes();
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        let mut parent_id = [0; 8];
        parent_id.copy_from_slice(&task_id.as_bytes()[8..]);
        if parent_id == [0; 8] {
            parent_id[7] = 1;
        }
        Self {
            trace_id,
            parent_id,
            flags: 1,
        }
    }

    /// The trace ID of every step of run `run_id`, as logs show it.
    pub fn run_trace_id(run_id: Uuid) -> String {
        Self::for_task(run_id, run_id).trace_id_hex()
    }

    /// The trace ID as 32 lowercase hex digits (what logs show).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The parent span ID as 16 lowercase hex digits.
    pub fn parent_id_hex(&self) -> String {
        hex::encode(self.parent_id)
    }

    /// Parse a header value. Version `00` must be exactly 55 characters;
    /// later versions may append fields, which are ignored.
    ///
    /// # Errors
    /// [`TraceParentError`] naming what is wrong.
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let malformed = || TraceParentError::Malformed(value.chars().take(80).collect());
        let bytes = value.as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(malformed());
        }
        let version = lower_hex::<1>(&value[0..2]).ok_or_else(malformed)?[0];
        if version == 0xff {
            return Err(TraceParentError::InvalidVersion);
        }
        if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(malformed());
        }
        let trace_id = lower_hex::<16>(&value[3..35]).ok_or_else(malformed)?;
        let parent_id = lower_hex::<8>(&value[36..52]).ok_or_else(malformed)?;
        let flags = lower_hex::<1>(&value[53..55]).ok_or_else(malformed)?[0];
        if trace_id == [0; 16] {
            return Err(TraceParentError::Zero("trace-id"));
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::Zero("parent-id"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

/// `traceparent` header value, version 00.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Into a buffer of its exact length: one per published task.
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let hex = |bytes: &[u8], to: &mut [u8]| hex::encode_to_slice(bytes, to).map_err(|_| fmt::Error);
        hex(&self.trace_id, &mut out[3..35])?;
        hex(&self.parent_id, &mut out[36..52])?;
        hex(&[self.flags], &mut out[53..55])?;
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// Decode exactly `N` bytes of lowercase hex (the specification forbids
/// upper case).
fn lower_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_context_round_trips_and_carries_the_run_id() {
        let run = Uuid::now_v7();
        let task = Uuid::now_v7();
        let tp = TraceParent::for_task(run, task);
        let header = tp.to_string();
        assert_eq!(header.len(), 55);
        assert!(header.starts_with(&format!("00-{}-", run.simple())));
        assert!(header.ends_with("-01"));
        assert_eq!(TraceParent::parse(&header), Ok(tp));
        assert_eq!(tp.trace_id_hex(), run.simple().to_string());
        assert_eq!(TraceParent::for_task(run, task), tp, "deterministic");
    }

    #[test]
    fn the_specification_example_parses() {
        let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
    }

    #[test]
    fn a_later_version_may_append_fields() {
        let tp = TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds");
        assert_eq!(tp.unwrap().flags, 1);
    }

    #[test]
    fn invalid_values_are_refused_with_the_reason() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
        ] {
            assert!(
                matches!(TraceParent::parse(bad), Err(TraceParentError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            TraceParent::parse(&good.replacen("00", "ff", 1)),
            Err(TraceParentError::InvalidVersion)
        );
        assert_eq!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(TraceParentError::Zero("trace-id"))
        );
        assert_eq!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Err(TraceParentError::Zero("parent-id"))
        );
    }
}
