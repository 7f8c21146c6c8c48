//! Behaviour of the frame codec: round trips, determinism, golden fixtures,
//! forward compatibility and hostile input.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use courier_wire::{
    AgentConfig, AgentSpec, ChatMessage, ContentHash, FLAG_ZSTD, Frame, HEADER_LEN, Limits, MaxTokensField, Memory,
    MemoryTarget, MemoryUpdate, ModelDef, Provider, ScriptedReply, ScriptedToolCall, SizeKind, Skill, Snapshot, Soul,
    StepRun, StepSpec, Task, TaskResult, TaskStatus, ToolPolicy, WireError, decode, decode_with_info, encode,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

fn fixture_snapshot() -> Snapshot {
    Snapshot {
        workflow: "research".into(),
        agent: Some(AgentConfig {
            default_model: "local".into(),
            tools: ToolPolicy {
                allowed: vec!["read_skill".into(), "output".into()],
            },
        }),
        models: BTreeMap::from([(
            "local".into(),
            ModelDef {
                provider: Provider::Scripted,
                model: "echo-1".into(),
                base_url: Some("http://127.0.0.1:9/v1".into()),
                api_key_env: Some("LOCAL_API_KEY".into()),
                max_tokens: Some(512),
                temperature: Some(0.25),
                request_timeout: Some(Duration::from_secs(30)),
                script: vec![ScriptedReply {
                    text: None,
                    tool_calls: vec![ScriptedToolCall {
                        name: "output".into(),
                        arguments: serde_json::json!({"text": "done"}),
                    }],
                }],
                max_tokens_field: MaxTokensField::MaxTokens,
                pricing: None,
                limits: Default::default(),
            },
        )]),
        skills: BTreeMap::from([(
            "summarize".into(),
            Skill {
                name: "Summarize".into(),
                description: "Condense a source into five bullet points".into(),
                tags: vec!["writing".into()],
                body: "# Summarize\n\nRead the source twice. Keep claims with their citations.\n".repeat(4),
            },
        )]),
        soul: Some(Soul {
            id: "researcher".into(),
            name: "Researcher".into(),
            description: Some("Careful and sourced".into()),
            body: "You are a careful researcher. You cite every claim.\n".into(),
        }),
        memory: Some(Memory {
            global: Some("- The team prefers short answers.\n".into()),
            workflow: Some("- RabbitMQ quorum queues need 3 nodes for HA.\n".into()),
        }),
    }
}

fn fixture_task() -> Task {
    Task {
        task_id: Uuid::parse_str("01936f5e-8a3c-7d2e-9b1a-4c5d6e7f8091").expect("uuid"),
        run_id: Uuid::parse_str("01936f5e-8a3c-7d2e-9b1a-000000000001").expect("uuid"),
        workflow: "research".into(),
        step: "summarize".into(),
        attempt: 2,
        spec: StepSpec {
            timeout: Duration::from_secs(90),
            run: StepRun::Agent(AgentSpec {
                model: None,
                soul: Some("researcher".into()),
                skills: vec!["summarize".into()],
                memory: true,
                prompt: "Summarize message queues".into(),
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Be brief.".into(),
                }],
                tools: vec!["read_skill".into(), "output".into()],
                max_iterations: 6,
                output_schema: None,
            }),
        },
        upstream: BTreeMap::from([("gather".into(), "three sources".into())]),
        deadline_unix_ms: 1_764_000_000_000,
        // The committed frame, not a fresh encoding: golden values must not
        // depend on today's encoder (its zstd level may change).
        snapshot: std::fs::read(fixture_path("snapshot-v1.bin")).expect("snapshot fixture"),
        // Added after version 1: absent from the golden frame, so empty.
        pool: String::new(),
    }
}

fn fixture_command_task() -> Task {
    Task {
        spec: StepSpec {
            timeout: Duration::from_millis(1500),
            run: StepRun::Command {
                argv: vec!["echo".into(), "hi".into()],
                env: BTreeMap::from([("LANG".into(), "C".into())]),
            },
        },
        snapshot: std::fs::read(fixture_path("snapshot-v1-empty.bin")).expect("snapshot fixture"),
        ..fixture_task()
    }
}

fn fixture_result() -> TaskResult {
    TaskResult {
        task_id: Uuid::parse_str("01936f5e-8a3c-7d2e-9b1a-4c5d6e7f8091").expect("uuid"),
        run_id: Uuid::parse_str("01936f5e-8a3c-7d2e-9b1a-000000000001").expect("uuid"),
        step: "summarize".into(),
        attempt: 2,
        status: TaskStatus::Succeeded,
        output: "Queues decouple producers from consumers.".into(),
        error: None,
        started_unix_ms: 1_764_000_000_100,
        finished_unix_ms: 1_764_000_000_900,
        worker_id: "worker-a".into(),
        memory_updates: vec![MemoryUpdate {
            target: MemoryTarget::Workflow,
            append: "- Learned: prefer quorum queues.\n".into(),
        }],
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    }
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Golden frames of every released version. They were written once by this
/// test (with `COURIER_BLESS=1` and no file present) and must never be
/// regenerated: later versions must keep decoding them.
fn golden<T: Frame + PartialEq + std::fmt::Debug>(name: &str, expected: &T) {
    let path = fixture_path(name);
    if !path.exists() && std::env::var_os("COURIER_BLESS").is_some() {
        std::fs::write(&path, encode(expected, &Limits::default()).expect("encode")).expect("write");
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("golden fixture {name}: {e}"));
    let decoded: T = decode(&bytes, &Limits::default()).expect("golden fixture decodes");
    assert_eq!(&decoded, expected, "golden fixture {name}");
}

#[test]
fn golden_v1_fixtures_decode() {
    golden("snapshot-v1.bin", &fixture_snapshot());
    golden(
        "snapshot-v1-empty.bin",
        &Snapshot {
            workflow: "fanout".into(),
            ..Snapshot::default()
        },
    );
    golden("task-v1.bin", &fixture_task());
    golden("task-v1-command.bin", &fixture_command_task());
    golden("result-v1.bin", &fixture_result());
}

#[test]
fn golden_v1_fixtures_cover_both_body_encodings() {
    let compressed = std::fs::read(fixture_path("snapshot-v1.bin")).expect("fixture");
    let plain = std::fs::read(fixture_path("snapshot-v1-empty.bin")).expect("fixture");
    assert_eq!(&compressed[..5], b"CSNP\x01");
    assert_eq!(compressed[5], FLAG_ZSTD);
    assert_eq!(plain[5], 0);
}

#[test]
fn round_trips_every_message_type() {
    let limits = Limits::default();
    let s = fixture_snapshot();
    assert_eq!(decode::<Snapshot>(&encode(&s, &limits).unwrap(), &limits).unwrap(), s);
    let t = fixture_task();
    assert_eq!(decode::<Task>(&encode(&t, &limits).unwrap(), &limits).unwrap(), t);
    let t = fixture_command_task();
    assert_eq!(decode::<Task>(&encode(&t, &limits).unwrap(), &limits).unwrap(), t);
    let r = fixture_result();
    assert_eq!(decode::<TaskResult>(&encode(&r, &limits).unwrap(), &limits).unwrap(), r);
}

#[test]
fn encoding_is_byte_identical_across_rebuilds() {
    let a = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    let b = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    assert_eq!(a, b);
    assert_eq!(ContentHash::of(&a), ContentHash::of(&b));
    assert_eq!(ContentHash::of(&a).to_hex().len(), 64);
}

#[test]
fn decode_reports_sizes_and_version() {
    let frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    let (_, info) = decode_with_info::<Snapshot>(&frame, &Limits::default()).unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.flags, FLAG_ZSTD);
    assert_eq!(info.compressed_len, frame.len());
    let body = rmp_serde::to_vec_named(&fixture_snapshot()).unwrap();
    assert_eq!(info.decompressed_len, body.len());
    assert!(info.compressed_len < info.decompressed_len);
}

// --- forward compatibility -------------------------------------------------

/// A "newer" snapshot: every v1 field plus one this build does not know.
#[derive(Serialize, Deserialize)]
struct SnapshotWithExtra {
    workflow: String,
    agent: Option<AgentConfig>,
    models: BTreeMap<String, ModelDef>,
    skills: BTreeMap<String, Skill>,
    soul: Option<Soul>,
    memory: Option<Memory>,
    embeddings_index: Vec<u32>,
}

impl Frame for SnapshotWithExtra {
    const KIND: &'static str = "snapshot";
    const MAGIC: [u8; 4] = Snapshot::MAGIC;
    const VERSION: u8 = Snapshot::VERSION;
    const MIN_VERSION: u8 = Snapshot::MIN_VERSION;
}

/// An "older" snapshot: only the required field, every optional one missing.
#[derive(Serialize, Deserialize)]
struct SnapshotMinimal {
    workflow: String,
}

impl Frame for SnapshotMinimal {
    const KIND: &'static str = "snapshot";
    const MAGIC: [u8; 4] = Snapshot::MAGIC;
    const VERSION: u8 = Snapshot::VERSION;
    const MIN_VERSION: u8 = Snapshot::MIN_VERSION;
}

#[test]
fn decode_ignores_unknown_fields() {
    let s = fixture_snapshot();
    let newer = SnapshotWithExtra {
        workflow: s.workflow.clone(),
        agent: s.agent.clone(),
        models: s.models.clone(),
        skills: s.skills.clone(),
        soul: s.soul.clone(),
        memory: s.memory.clone(),
        embeddings_index: vec![1, 2, 3],
    };
    let frame = encode(&newer, &Limits::default()).unwrap();
    assert_eq!(decode::<Snapshot>(&frame, &Limits::default()).unwrap(), s);
}

#[test]
fn decode_defaults_missing_optional_fields() {
    let frame = encode(&SnapshotMinimal { workflow: "old".into() }, &Limits::default()).unwrap();
    let decoded: Snapshot = decode(&frame, &Limits::default()).unwrap();
    assert_eq!(
        decoded,
        Snapshot {
            workflow: "old".into(),
            ..Snapshot::default()
        }
    );
}

// --- kinds and providers from a newer build ----------------------------------

/// A task as a newer scheduler might write it: a step kind (`browser`) and,
/// in its snapshot, a provider (`gemini`) this build does not know.
#[derive(Serialize, Deserialize)]
struct FutureTask {
    task_id: Uuid,
    run_id: Uuid,
    workflow: String,
    step: String,
    attempt: u32,
    spec: FutureSpec,
    upstream: BTreeMap<String, String>,
    deadline_unix_ms: u64,
    #[serde(with = "serde_bytes")]
    snapshot: Vec<u8>,
    pool: String,
}

#[derive(Serialize, Deserialize)]
struct FutureSpec {
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    run: FutureRun,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FutureRun {
    Browser { url: String, actions: Vec<String> },
}

#[derive(Serialize, Deserialize)]
struct FutureSnapshot {
    workflow: String,
    models: BTreeMap<String, FutureModel>,
}

#[derive(Serialize, Deserialize)]
struct FutureModel {
    provider: String,
    model: String,
}

impl Frame for FutureTask {
    const KIND: &'static str = "task";
    const MAGIC: [u8; 4] = Task::MAGIC;
    const VERSION: u8 = Task::VERSION;
    const MIN_VERSION: u8 = Task::MIN_VERSION;
}

impl Frame for FutureSnapshot {
    const KIND: &'static str = "snapshot";
    const MAGIC: [u8; 4] = Snapshot::MAGIC;
    const VERSION: u8 = Snapshot::VERSION;
    const MIN_VERSION: u8 = Snapshot::MIN_VERSION;
}

/// The golden frame of a future kind (written once, with `COURIER_BLESS=1`,
/// never regenerated): today's decoder must read it, the kind and the
/// provider as `Unsupported`, so a worker answers "upgrade it" rather than
/// dead-lettering the task as undecodable (see ARCHITECTURE.md).
#[test]
fn a_step_kind_and_a_provider_from_a_newer_build_decode_as_unsupported() {
    let path = fixture_path("task-v1-future-kind.bin");
    if !path.exists() && std::env::var_os("COURIER_BLESS").is_some() {
        let snapshot = FutureSnapshot {
            workflow: "browse".into(),
            models: BTreeMap::from([(
                "gemini-pro".into(),
                FutureModel {
                    provider: "gemini".into(),
                    model: "gemini-2.5-pro".into(),
                },
            )]),
        };
        let task = FutureTask {
            snapshot: encode(&snapshot, &Limits::default()).unwrap(),
            spec: FutureSpec {
                timeout: Duration::from_secs(60),
                run: FutureRun::Browser {
                    url: "https://example.com".into(),
                    actions: vec!["click #go".into()],
                },
            },
            task_id: fixture_task().task_id,
            run_id: fixture_task().run_id,
            workflow: "browse".into(),
            step: "look".into(),
            attempt: 1,
            upstream: BTreeMap::new(),
            deadline_unix_ms: 1_764_000_000_000,
            pool: "default".into(),
        };
        std::fs::write(&path, encode(&task, &Limits::default()).unwrap()).unwrap();
    }
    let bytes = std::fs::read(&path).expect("golden fixture task-v1-future-kind.bin");
    let task: Task = decode(&bytes, &Limits::default()).expect("a future kind decodes");
    assert_eq!(task.spec.run, StepRun::Unsupported { kind: "browser".into() });
    assert_eq!(
        (task.step.as_str(), task.attempt, task.pool.as_str()),
        ("look", 1, "default")
    );
    let snapshot: Snapshot = decode(&task.snapshot, &Limits::default()).expect("a future provider decodes");
    assert_eq!(snapshot.models["gemini-pro"].provider, Provider::Unsupported);
    // Never written by this build.
    let mut unsupported = task.clone();
    unsupported.snapshot.clear();
    assert!(encode(&unsupported, &Limits::default()).is_err());
}

#[test]
fn a_step_with_two_kinds_or_none_is_refused() {
    #[derive(Serialize)]
    struct Spec {
        #[serde(with = "humantime_serde")]
        timeout: Duration,
        run: BTreeMap<String, BTreeMap<String, String>>,
    }
    let two = BTreeMap::from([
        (
            "echo".to_string(),
            BTreeMap::from([("text".to_string(), "a".to_string())]),
        ),
        ("browser".to_string(), BTreeMap::new()),
    ]);
    for run in [two, BTreeMap::new()] {
        let body = rmp_serde::to_vec_named(&Spec {
            timeout: Duration::from_secs(1),
            run,
        })
        .unwrap();
        assert!(rmp_serde::from_slice::<StepSpec>(&body).is_err());
    }
}

// --- hostile input -----------------------------------------------------------

#[test]
fn decode_rejects_short_input() {
    for len in 0..HEADER_LEN {
        let err = decode::<Snapshot>(&b"CSNP\x01\x01"[..len], &Limits::default()).unwrap_err();
        assert_eq!(err, WireError::TooShort { kind: "snapshot", len });
    }
}

#[test]
fn decode_rejects_wrong_magic() {
    let frame = encode(&fixture_result(), &Limits::default()).unwrap();
    let err = decode::<Snapshot>(&frame, &Limits::default()).unwrap_err();
    assert_eq!(
        err,
        WireError::BadMagic {
            kind: "snapshot",
            found: *b"CRES",
            expected: *b"CSNP",
        }
    );
    assert_eq!(
        err.to_string(),
        "not a snapshot frame: magic bytes [43, 52, 45, 53], expected [43, 53, 4e, 50]"
    );
}

#[test]
fn decode_rejects_unknown_version() {
    let mut frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    for version in [0u8, 2, 255] {
        frame[4] = version;
        let err = decode::<Snapshot>(&frame, &Limits::default()).unwrap_err();
        assert_eq!(
            err,
            WireError::UnsupportedVersion {
                kind: "snapshot",
                version,
                min: 1,
                max: 1,
            }
        );
    }
    frame[4] = 7;
    assert_eq!(
        decode::<Snapshot>(&frame, &Limits::default()).unwrap_err().to_string(),
        "unsupported snapshot format version 7: this build reads versions 1 to 1"
    );
}

#[test]
fn decode_rejects_unknown_flags() {
    let mut frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    frame[5] |= 0b1000_0000;
    let err = decode::<Snapshot>(&frame, &Limits::default()).unwrap_err();
    assert_eq!(
        err,
        WireError::UnknownFlags {
            kind: "snapshot",
            flags: 0x81
        }
    );
}

#[test]
fn every_truncation_of_a_real_snapshot_is_a_typed_error() {
    let frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    for cut in 0..frame.len() {
        let err = decode::<Snapshot>(&frame[..cut], &Limits::default()).unwrap_err();
        match err {
            WireError::TooShort { len, .. } => assert!(cut < HEADER_LEN && len == cut),
            WireError::Corrupt { .. } | WireError::Undecodable { .. } => assert!(cut >= HEADER_LEN),
            other => panic!("truncation at {cut} gave {other:?}"),
        }
    }
}

#[test]
fn every_truncation_of_an_uncompressed_result_is_a_typed_error() {
    let small = TaskResult {
        output: "ok".into(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
        ..fixture_result()
    };
    let frame = encode(&small, &Limits::default()).unwrap();
    assert_eq!(frame[5], 0, "a small result travels uncompressed");
    for cut in HEADER_LEN..frame.len() {
        let err = decode::<TaskResult>(&frame[..cut], &Limits::default()).unwrap_err();
        assert!(
            matches!(err, WireError::Undecodable { kind: "result", .. }),
            "cut {cut}: {err:?}"
        );
    }
}

#[test]
fn encode_refuses_a_body_over_the_decompressed_limit() {
    let limits = Limits {
        max_compressed: 1 << 20,
        max_decompressed: 100,
    };
    let err = encode(&fixture_snapshot(), &limits).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Decompressed,
            limit: 100
        }
    );
    assert_eq!(
        err.to_string(),
        "snapshot too large: decompressed size exceeds the limit of 100 bytes"
    );
}

#[test]
fn encode_refuses_a_frame_over_the_compressed_limit() {
    let limits = Limits {
        max_compressed: 64,
        max_decompressed: 1 << 20,
    };
    let err = encode(&fixture_snapshot(), &limits).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Compressed,
            limit: 64
        }
    );
}

#[test]
fn decode_refuses_a_frame_over_the_compressed_limit() {
    let frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    let limits = Limits {
        max_compressed: frame.len() - 1,
        ..Limits::default()
    };
    let err = decode::<Snapshot>(&frame, &limits).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Compressed,
            limit: frame.len() - 1
        }
    );
}

#[test]
fn decode_refuses_a_body_over_the_decompressed_limit() {
    let frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
    let body_len = rmp_serde::to_vec_named(&fixture_snapshot()).unwrap().len();
    let limits = Limits {
        max_decompressed: body_len - 1,
        ..Limits::default()
    };
    assert_eq!(
        decode::<Snapshot>(&frame, &limits).unwrap_err(),
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Decompressed,
            limit: body_len - 1
        }
    );
    // At exactly the body's size it decompresses, and then the decoded-size
    // budget (string bytes plus 128 bytes a value) refuses it.
    let limits = Limits {
        max_decompressed: body_len,
        ..Limits::default()
    };
    assert_eq!(
        decode::<Snapshot>(&frame, &limits).unwrap_err(),
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Decoded,
            limit: body_len
        }
    );
}

/// A snapshot body: `{workflow: "w", agent: {default_model: "m", tools: {allowed: [n × ""]}}}`.
fn empty_strings_body(n: u32) -> Vec<u8> {
    let mut body = rmp_serde::to_vec_named(&Snapshot {
        workflow: "w".into(),
        agent: Some(AgentConfig {
            default_model: "m".into(),
            tools: ToolPolicy { allowed: vec![] },
        }),
        ..Snapshot::default()
    })
    .unwrap();
    // Replace the trailing fields after `allowed` with an array32 of n empty
    // strings; `allowed: []` (0x90) is followed by models/skills/soul/memory.
    let at = body.windows(8).position(|w| w == b"allowed\x90").unwrap() + 7;
    let tail = body.split_off(at + 1);
    body.pop();
    body.push(0xdd);
    body.extend(n.to_be_bytes());
    body.extend(std::iter::repeat_n(0xa0, n as usize));
    body.extend(tail);
    body
}

#[test]
fn many_small_values_are_refused_by_their_decoded_size() {
    // 8 million empty strings: 8 MB of body (under the limit), 322 bytes of
    // frame, and 190 MiB of `String`s had it been decoded.
    let frame = frame_around(
        FLAG_ZSTD,
        &zstd::bulk::compress(&empty_strings_body(8_000_000), 19).unwrap(),
    );
    assert!(frame.len() < 1024, "{}", frame.len());
    let err = decode::<Snapshot>(&frame, &Limits::default()).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Decoded,
            limit: 8 << 20
        }
    );
    assert_eq!(
        err.to_string(),
        "snapshot too large: decoded size exceeds the limit of 8388608 bytes"
    );
    // The same shape with a few values decodes.
    let small = decode::<Snapshot>(&frame_around(0, &empty_strings_body(3)), &Limits::default()).unwrap();
    assert_eq!(small.agent.unwrap().tools.allowed, ["", "", ""]);
}

#[test]
fn encode_refuses_what_decode_would_refuse() {
    let mut task = fixture_task();
    task.upstream = (0..40_000).map(|i| (i.to_string(), String::new())).collect();
    let err = encode(&task, &Limits::default()).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLarge {
            kind: "task",
            size: SizeKind::Decoded,
            limit: 8 << 20
        }
    );
}

#[test]
fn nesting_past_64_levels_is_undecodable() {
    // Tool-call arguments are JSON: the one place a sender chooses the depth.
    let nested = (0..100).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
    let mut snapshot = fixture_snapshot();
    let model = snapshot.models.values_mut().next().unwrap();
    model.script = vec![ScriptedReply {
        text: None,
        tool_calls: vec![ScriptedToolCall {
            name: "output".into(),
            arguments: nested,
        }],
    }];
    let body = rmp_serde::to_vec_named(&snapshot).unwrap();
    let err = decode::<Snapshot>(
        &frame_around(FLAG_ZSTD, &zstd::bulk::compress(&body, 3).unwrap()),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        WireError::Undecodable {
            kind: "snapshot",
            detail: "arrays and maps nested deeper than 64 levels".into()
        }
    );
    assert_eq!(
        encode(&snapshot, &Limits::default()).unwrap_err().to_string(),
        "cannot encode snapshot: arrays and maps nested deeper than 64 levels"
    );
}

fn frame_around(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = b"CSNP\x01".to_vec();
    frame.push(flags);
    frame.extend_from_slice(body);
    frame
}

#[test]
fn zstd_bomb_is_refused_at_the_limit() {
    // 256 MiB of zeros compresses to a few KiB; the frame header declares its size.
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    let err = decode::<Snapshot>(&frame_around(FLAG_ZSTD, &bomb), &Limits::default()).unwrap_err();
    assert_eq!(
        err,
        WireError::TooLarge {
            kind: "snapshot",
            size: SizeKind::Decompressed,
            limit: 8 << 20
        }
    );
}

#[test]
fn zstd_frame_that_lies_about_its_size_fails_without_growing() {
    // The first frame declares 10 bytes; a second frame follows with 1 MiB.
    let mut body = zstd::bulk::compress(&[1u8; 10], 3).unwrap();
    body.extend(zstd::bulk::compress(&vec![2u8; 1 << 20], 3).unwrap());
    let err = decode::<Snapshot>(&frame_around(FLAG_ZSTD, &body), &Limits::default()).unwrap_err();
    assert_eq!(
        err,
        WireError::Corrupt {
            kind: "snapshot",
            detail: "Destination buffer is too small".into()
        }
    );
}

#[test]
fn zstd_frame_demanding_a_huge_window_is_refused() {
    // A streamed frame (no declared size) with a 1 GiB window.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.window_log(30).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.write_all(&[7u8; 4096]).unwrap();
    let frame = frame_around(FLAG_ZSTD, &enc.finish().unwrap());
    let err = decode::<Snapshot>(&frame, &Limits::default()).unwrap_err();
    match err {
        WireError::Corrupt { kind, detail } => {
            assert_eq!(kind, "snapshot");
            assert!(detail.contains("too much memory"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn garbage_after_a_valid_header_is_corrupt_compression() {
    let err = decode::<Snapshot>(&frame_around(FLAG_ZSTD, b"definitely not zstd"), &Limits::default()).unwrap_err();
    assert!(matches!(err, WireError::Corrupt { kind: "snapshot", .. }), "{err:?}");
}

#[test]
fn valid_msgpack_of_the_wrong_shape_is_undecodable() {
    let body = rmp_serde::to_vec_named(&vec![1u32, 2, 3]).unwrap();
    let err = decode::<Snapshot>(&frame_around(0, &body), &Limits::default()).unwrap_err();
    assert!(
        matches!(err, WireError::Undecodable { kind: "snapshot", .. }),
        "{err:?}"
    );
    // A task missing required fields is undecodable too, naming the field.
    let body = rmp_serde::to_vec_named(&SnapshotMinimal { workflow: "x".into() }).unwrap();
    let mut frame = b"CTSK\x01\x00".to_vec();
    frame.extend_from_slice(&body);
    let err = decode::<Task>(&frame, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("missing field"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Fuzz target: arbitrary bytes never panic the decoder.
    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode::<Snapshot>(&bytes, &Limits::default());
        let _ = decode::<Task>(&bytes, &Limits::default());
        let _ = decode::<TaskResult>(&bytes, &Limits::default());
    }

    /// Fuzz target: bytes behind a valid header reach zstd and MessagePack.
    #[test]
    fn decoder_never_panics_behind_a_valid_header(
        flags in prop_oneof![Just(0u8), Just(FLAG_ZSTD)],
        body in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let _ = decode::<Snapshot>(&frame_around(flags, &body), &Limits::default());
    }

    /// Random bit flips in a real snapshot give a value or a typed error, never a panic.
    #[test]
    fn bit_flips_in_a_real_snapshot_never_panic(flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..8)) {
        let mut frame = encode(&fixture_snapshot(), &Limits::default()).unwrap();
        for (at, bit) in flips {
            let i = at % frame.len();
            frame[i] ^= 1 << bit;
        }
        match decode::<Snapshot>(&frame, &Limits::default()) {
            Ok(_) | Err(WireError::BadMagic { .. } | WireError::UnsupportedVersion { .. }
                | WireError::UnknownFlags { .. } | WireError::Corrupt { .. }
                | WireError::Undecodable { .. } | WireError::TooLarge { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }
}
