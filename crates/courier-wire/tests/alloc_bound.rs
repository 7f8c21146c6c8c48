//! The decoder never allocates past its limit, whatever the frame claims.
//!
//! This binary installs a capping global allocator: while a hostile frame is
//! decoded, any allocation past the budget fails and aborts the test. It holds
//! one test so that nothing else allocates concurrently.

use std::alloc::System;
use std::io::Read;

use cap::Cap;
use courier_wire::{FLAG_ZSTD, Limits, SizeKind, Snapshot, WireError, decode};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Decoding limit used here: 1 MiB decompressed.
const LIMIT: usize = 1 << 20;
/// What decoding may use beyond the limit: the capped zstd window (the same
/// 1 MiB) plus zstd's contexts and small bookkeeping.
const OVERHEAD: usize = (1 << 20) + (512 << 10);

fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = b"CSNP\x01".to_vec();
    frame.push(FLAG_ZSTD);
    frame.extend_from_slice(body);
    frame
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
        ALLOCATOR
            .set_limit(before + LIMIT + OVERHEAD)
            .expect("set allocation budget");
        let result = decode::<Snapshot>(bomb, &limits);
        ALLOCATOR.set_limit(usize::MAX).expect("lift budget");
        assert_eq!(&result.unwrap_err(), expected, "{name} bomb");
        assert!(ALLOCATOR.allocated() <= before + 64, "{name} bomb leaked memory");
    }
}
