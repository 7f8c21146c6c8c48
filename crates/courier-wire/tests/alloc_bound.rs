//! The decoder never allocates past its limit, whatever the frame claims and
//! whatever shape its body has.
//!
//! This binary installs a capping global allocator: while a hostile frame is
//! decoded, any allocation past the budget fails and aborts the test. It holds
//! one test so that nothing else allocates concurrently.

use std::alloc::System;
use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use cap::Cap;
use courier_wire::{
    AgentConfig, FLAG_ZSTD, Frame, Limits, SizeKind, Snapshot, StepRun, StepSpec, Task, ToolPolicy, WireError, decode,
    encode,
};
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Decoding limit used here: 1 MiB decompressed.
const LIMIT: usize = 1 << 20;
/// What decoding may use beyond the limit: the capped zstd window (the same
/// 1 MiB) plus zstd's contexts and small bookkeeping.
const OVERHEAD: usize = (1 << 20) + (512 << 10);

fn frame(body: &[u8]) -> Vec<u8> {
    frame_of::<Snapshot>(body)
}

fn frame_of<T: Frame>(body: &[u8]) -> Vec<u8> {
    let mut frame = T::MAGIC.to_vec();
    frame.push(T::VERSION);
    frame.push(FLAG_ZSTD);
    frame.extend_from_slice(body);
    frame
}

/// A snapshot whose tool policy allows `n` empty strings: `n` bytes of body.
fn empty_strings(n: usize) -> Snapshot {
    Snapshot {
        workflow: "w".into(),
        agent: Some(AgentConfig {
            default_model: "m".into(),
            tools: ToolPolicy {
                allowed: vec![String::new(); n],
            },
        }),
        ..Snapshot::default()
    }
}

/// A task with `n` upstream outputs, all empty: about 8 bytes of body each.
fn many_outputs(n: usize) -> Task {
    Task {
        task_id: Uuid::nil(),
        run_id: Uuid::nil(),
        workflow: "w".into(),
        step: "s".into(),
        attempt: 1,
        spec: StepSpec {
            timeout: Duration::from_secs(1),
            run: StepRun::Echo { text: String::new() },
        },
        upstream: (0..n)
            .map(|i| (i.to_string(), String::new()))
            .collect::<BTreeMap<_, _>>(),
        deadline_unix_ms: 0,
        snapshot: Vec::new(),
        pool: String::new(),
    }
}

/// Encode without the codec's checks, as a hostile sender would.
fn hostile<T: Frame>(value: &T) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(value).expect("serialize");
    assert!(body.len() <= LIMIT, "a body under the decompressed limit");
    frame_of::<T>(&zstd::bulk::compress(&body, 1).expect("compress"))
}

/// Run `f` with at most `budget` bytes of allocation on top of what is live.
fn within<R>(budget: usize, f: impl FnOnce() -> R) -> R {
    let before = ALLOCATOR.allocated();
    ALLOCATOR.set_limit(before + budget).expect("set allocation budget");
    let result = f();
    ALLOCATOR.set_limit(usize::MAX).expect("lift budget");
    result
}

#[test]
fn decompression_bombs_stay_within_the_allocation_budget() {
    let limits = Limits {
        max_compressed: 1 << 20,
        max_decompressed: LIMIT,
    };
    // Level 1 keeps the zstd window (512 KiB) under the decoder's window cap,
    // so these bombs reach the output cap.
    // Declares 512 MiB in its header and produces it.
    let declared = frame(&zstd::bulk::compress(&vec![0u8; 512 << 20], 1).expect("compress"));
    // Declares nothing (streamed) and produces 512 MiB.
    let mut streamed = zstd::stream::Encoder::new(Vec::new(), 1).expect("encoder");
    std::io::copy(&mut std::io::repeat(b'x').take(512 << 20), &mut streamed).expect("copy");
    let streamed = frame(&streamed.finish().expect("finish"));
    // Demands a 1 GiB window: refused before any window is allocated.
    let mut wide = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
    wide.window_log(30).expect("window");
    wide.long_distance_matching(true).expect("ldm");
    std::io::copy(&mut std::io::repeat(b'y').take(4 << 20), &mut wide).expect("copy");
    let wide = frame(&wide.finish().expect("finish"));

    // Declares 16 bytes, then a second frame produces 512 MiB.
    let mut liar = zstd::bulk::compress(&[1u8; 16], 1).expect("compress");
    liar.extend(zstd::bulk::compress(&vec![0u8; 512 << 20], 1).expect("compress"));
    let liar = frame(&liar);
    // The one-shot path keeps a decoder context per thread: create it before
    // measuring so it is not counted as a leak.
    let small = frame(&zstd::bulk::compress(&[0u8; 16], 1).expect("compress"));
    assert!(
        decode::<Snapshot>(&small, &limits).is_err(),
        "16 zero bytes are not a snapshot"
    );

    let too_large = WireError::TooLarge {
        kind: "snapshot",
        size: SizeKind::Decompressed,
        limit: LIMIT,
    };
    let too_wide = WireError::Corrupt {
        kind: "snapshot",
        detail: "Frame requires too much memory for decoding".into(),
    };
    for (name, bomb, expected) in [
        ("declared", &declared, &too_large),
        ("streamed", &streamed, &too_large),
        ("wide-window", &wide, &too_wide),
        (
            "liar",
            &liar,
            &WireError::Corrupt {
                kind: "snapshot",
                detail: "Destination buffer is too small".into(),
            },
        ),
    ] {
        let before = ALLOCATOR.allocated();
        let result = within(LIMIT + OVERHEAD, || decode::<Snapshot>(bomb, &limits));
        assert_eq!(&result.unwrap_err(), expected, "{name} bomb");
        assert!(ALLOCATOR.allocated() <= before + 64, "{name} bomb leaked memory");
    }

    // Bodies under the decompressed limit whose values would take far more
    // memory than their bytes: refused by the decoded-size budget.
    let decoded = |kind| WireError::TooLarge {
        kind,
        size: SizeKind::Decoded,
        limit: LIMIT,
    };
    // 1 million empty strings: 1 MB of body, 24 MB of `String`s.
    let strings = hostile(&empty_strings(1_000_000));
    let result = within(LIMIT + OVERHEAD, || decode::<Snapshot>(&strings, &limits));
    assert_eq!(result.unwrap_err(), decoded("snapshot"), "empty-strings bomb");
    // 120,000 upstream outputs: under 1 MB of body, 10+ MB of map.
    let outputs = hostile(&many_outputs(120_000));
    let result = within(LIMIT + OVERHEAD, || decode::<Task>(&outputs, &limits));
    assert_eq!(result.unwrap_err(), decoded("task"), "many-outputs bomb");

    // The largest such bodies the encoder accepts decode within the budget.
    let per_string = 128 + 1;
    let strings = encode(&empty_strings(LIMIT / per_string - 64), &limits).expect("encode under the budget");
    let decoded = within(LIMIT + OVERHEAD, || decode::<Snapshot>(&strings, &limits));
    assert!(decoded.is_ok(), "{decoded:?}");
    drop(decoded);
    let per_output = 2 * 128 + 5;
    let outputs = encode(&many_outputs(LIMIT / per_output - 64), &limits).expect("encode under the budget");
    let decoded = within(LIMIT + OVERHEAD, || decode::<Task>(&outputs, &limits));
    assert!(decoded.is_ok(), "{decoded:?}");
}
