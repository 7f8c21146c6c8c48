//! The envelope every Courier message travels in, and the one bounded decoder.
//!
//! A frame is `MAGIC (4) | VERSION (1) | FLAGS (1) | BODY`. The body is
//! MessagePack with named fields, zstd-compressed when `FLAG_ZSTD` is set.
//! Both the frame (compressed) size and the body (decompressed) size are
//! bounded by [`Limits`], at encode and at decode. Decompression happens in
//! exactly one function, [`decompress_capped`], which never allocates past the
//! limit, whatever the zstd frame header claims (clippy.toml bans the other
//! zstd decoders); and the body reaches serde only once [`budget::check`]
//! has bounded the value it decodes into.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::io::Read;

use serde::Serialize;

use crate::budget::{self, MAX_DEPTH, OverBudget};
use serde::de::DeserializeOwned;

/// Length of the fixed header: magic, version byte, flags byte.
pub const HEADER_LEN: usize = 6;
/// Flags bit: the body is a zstd frame.
pub const FLAG_ZSTD: u8 = 0b0000_0001;
/// Every flag bit this build understands.
const KNOWN_FLAGS: u8 = FLAG_ZSTD;
/// Bodies shorter than this are stored uncompressed: zstd would only add bytes.
const COMPRESS_FROM: usize = 256;
/// zstd's own default level: a good size/speed balance.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Bodies up to this size, in messages encoded once per dispatch or per
/// answer (tasks, results), use [`message_zstd_level`]'s fast level.
pub const FAST_UP_TO: usize = 64 * 1024;

/// The zstd level of a message built once per dispatch (a task) or per
/// answer (a result): zstd's fast level -1 up to [`FAST_UP_TO`], `above`
/// past it (where size matters more, and the compressed limit). At -1 zstd still finds repeated strings but stores the rest
/// as it is, without Huffman coding: on 4 KiB bodies that coding is most of
/// level 1's cost (measured with `zstd -b1 -i3 F` against `zstd -b --fast=1
/// -i3 F`: 4 KiB of random base64 compresses at 2.4 GB/s instead of 0.35,
/// decompresses at 33 GB/s instead of 0.7, and stays 4,106 bytes instead of
/// 3,117; 4 KiB of English prose 0.39 GB/s instead of 0.23, 2,664 bytes
/// instead of 1,949). A small message costs the broker per message far more
/// than per byte; a large one is worth the coding.
pub fn message_zstd_level(body_len: usize, above: i32) -> i32 {
    if body_len <= FAST_UP_TO { -1 } else { above }
}

/// Default bound on a whole frame as it travels (compressed): 1 MiB.
pub const DEFAULT_MAX_COMPRESSED: usize = 1024 * 1024;
/// Default bound on a decoded body (decompressed): 8 MiB.
pub const DEFAULT_MAX_DECOMPRESSED: usize = 8 * 1024 * 1024;

/// A message type that travels in a frame.
pub trait Frame: Serialize + DeserializeOwned {
    /// Human name used in errors ("snapshot", "task", "result").
    const KIND: &'static str;
    /// Four magic bytes identifying the message type.
    const MAGIC: [u8; 4];
    /// The version this build writes.
    const VERSION: u8;
    /// The oldest version this build still reads.
    const MIN_VERSION: u8;

    /// zstd level for a body of `body_len` bytes. The level only costs at
    /// encode time: decoding speed barely depends on it.
    fn zstd_level(_body_len: usize) -> i32 {
        DEFAULT_ZSTD_LEVEL
    }
}

/// Size bounds applied when encoding and decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of the whole frame in bytes (header + compressed body).
    pub max_compressed: usize,
    /// Maximum size of the decompressed MessagePack body in bytes.
    pub max_decompressed: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_compressed: DEFAULT_MAX_COMPRESSED,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }
}

/// Which of the two sizes went over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeKind {
    /// The frame as it travels.
    Compressed,
    /// The body after decompression.
    Decompressed,
    /// The value the body decodes into: its string and binary bytes plus
    /// 128 bytes per value (see the `budget` module).
    Decoded,
}

impl fmt::Display for SizeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SizeKind::Compressed => "compressed",
            SizeKind::Decompressed => "decompressed",
            SizeKind::Decoded => "decoded",
        })
    }
}

/// Everything that can be wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the fixed header.
    #[error("{kind} frame too short: {len} bytes, a frame has at least {HEADER_LEN}")]
    TooShort { kind: &'static str, len: usize },
    /// The first four bytes are not this message type's magic.
    #[error("not a {kind} frame: magic bytes {found:02x?}, expected {expected:02x?}")]
    BadMagic {
        kind: &'static str,
        found: [u8; 4],
        expected: [u8; 4],
    },
    /// A version byte outside what this build reads.
    #[error("unsupported {kind} format version {version}: this build reads versions {min} to {max}")]
    UnsupportedVersion {
        kind: &'static str,
        version: u8,
        min: u8,
        max: u8,
    },
    /// Flag bits this build does not understand.
    #[error("{kind} frame has unknown flags {flags:#04x}")]
    UnknownFlags { kind: &'static str, flags: u8 },
    /// A size over its configured limit.
    #[error("{kind} too large: {size} size exceeds the limit of {limit} bytes")]
    TooLarge {
        kind: &'static str,
        size: SizeKind,
        limit: usize,
    },
    /// The zstd body could not be decompressed.
    #[error("corrupt {kind} compression: {detail}")]
    Corrupt { kind: &'static str, detail: String },
    /// The body decompressed but is not a valid message of this type.
    #[error("undecodable {kind} body: {detail}")]
    Undecodable { kind: &'static str, detail: String },
    /// The value could not be serialized (never expected for Courier's types).
    #[error("cannot encode {kind}: {detail}")]
    Encode { kind: &'static str, detail: String },
}

/// What a decoder learned about a frame besides its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// The frame's version byte.
    pub version: u8,
    /// The frame's flags byte.
    pub flags: u8,
    /// Size of the whole frame in bytes.
    pub compressed_len: usize,
    /// Size of the MessagePack body in bytes.
    pub decompressed_len: usize,
}

/// Encode `value` as a frame of the current version.
///
/// The output is deterministic: the same value gives the same bytes (a
/// snapshot's content hash depends on it).
///
/// # Errors
/// [`WireError::TooLarge`] when the body, its decoded size or the frame
/// exceeds `limits`; [`WireError::Encode`] if serialization fails or the value
/// nests deeper than a decoder accepts.
pub fn encode<T: Frame>(value: &T, limits: &Limits) -> Result<Vec<u8>, WireError> {
    encode_with(value, limits, None)
}

/// [`encode`] for a message built once per dispatch or per answer (a task,
/// a result) of `stream` (its workflow and step): a body up to
/// [`FAST_UP_TO`] that fits `limits` as it is travels uncompressed when
/// zstd would not shrink it by 1/[`MIN_SAVING`], and the process's next
/// bodies of the same kind and stream skip the attempt a while ([`Skips`]).
/// Whether such a frame is compressed depends on the stream's recent bodies,
/// so its bytes do; decoders read either form.
///
/// # Errors
/// As [`encode`].
pub fn encode_message<T: Frame>(value: &T, limits: &Limits, stream: &[&str]) -> Result<Vec<u8>, WireError> {
    encode_with(value, limits, Some((&SKIPS, stream)))
}

fn encode_with<T: Frame>(value: &T, limits: &Limits, stream: Option<(&Skips, &[&str])>) -> Result<Vec<u8>, WireError> {
    let reused = SCRATCH.try_with(|cell| {
        // Taken already only should a value's serialization encode a frame.
        let mut scratch = cell.try_borrow_mut().ok()?;
        let (body, packed) = &mut *scratch;
        // Empty already, unless an encode on this thread panicked.
        body.clear();
        let frame = encode_into(value, limits, stream, body, packed);
        for buffer in [body, packed] {
            buffer.clear();
            if buffer.capacity() > SCRATCH_KEPT {
                *buffer = Vec::new();
            }
        }
        Some(frame)
    });
    match reused {
        Ok(Some(frame)) => frame,
        // Taken, or this thread's buffers are gone (a thread ending).
        _ => encode_into(value, limits, stream, &mut Vec::new(), &mut Vec::new()),
    }
}

/// [`encode_with`], its body serialized into `body` and compressed into
/// `packed` (both empty), so that the frame is the encode's one allocation.
fn encode_into<T: Frame>(
    value: &T,
    limits: &Limits,
    stream: Option<(&Skips, &[&str])>,
    body: &mut Vec<u8>,
    packed: &mut Vec<u8>,
) -> Result<Vec<u8>, WireError> {
    rmp_serde::encode::write_named(body, value).map_err(|e| WireError::Encode {
        kind: T::KIND,
        detail: e.to_string(),
    })?;
    if body.len() > limits.max_decompressed {
        return Err(too_large::<T>(SizeKind::Decompressed, limits.max_decompressed));
    }
    within_budget::<T>(body, limits, true)?;
    // A message may travel as it is only where it fits as it is.
    let stream = stream
        .filter(|_| body.len() <= FAST_UP_TO && HEADER_LEN + body.len() <= limits.max_compressed)
        .map(|(skips, parts)| (skips, Skips::key(T::MAGIC, parts)));
    let (flags, payload) = if body.len() < COMPRESS_FROM || stream.is_some_and(|(skips, key)| skips.skip(key)) {
        (0, body.as_slice())
    } else {
        compress(body, T::zstd_level(body.len()), packed).map_err(|e| WireError::Encode {
            kind: T::KIND,
            detail: e.to_string(),
        })?;
        match stream {
            Some((skips, key)) if !skips.record(key, pays(packed.len(), body.len())) => (0, body.as_slice()),
            _ => (FLAG_ZSTD, packed.as_slice()),
        }
    };
    if HEADER_LEN + payload.len() > limits.max_compressed {
        return Err(too_large::<T>(SizeKind::Compressed, limits.max_compressed));
    }
    // Frames are allocated at their exact size: the scheduler keeps many
    // of them in memory, counted by length.
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&T::MAGIC);
    frame.push(T::VERSION);
    frame.push(flags);
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Whether compressing `body_len` bytes to `compressed_len` is worth it for
/// a message: a saving of at least 1/[`MIN_SAVING`].
fn pays(compressed_len: usize, body_len: usize) -> bool {
    compressed_len <= body_len - body_len / MIN_SAVING
}

/// Decode a frame, accepting every version from `T::MIN_VERSION` to `T::VERSION`.
///
/// # Errors
/// A typed [`WireError`] for each way the input can be wrong; never panics,
/// never allocates more than `limits.max_decompressed` (+1 byte) for the body,
/// and refuses a body whose decoded size (see [`SizeKind::Decoded`]) is over
/// that limit before decoding it.
pub fn decode<T: Frame>(frame: &[u8], limits: &Limits) -> Result<T, WireError> {
    decode_with_info(frame, limits).map(|(value, _)| value)
}

/// [`decode`], also returning what the frame header and sizes were.
///
/// # Errors
/// As [`decode`].
pub fn decode_with_info<T: Frame>(frame: &[u8], limits: &Limits) -> Result<(T, FrameInfo), WireError> {
    let (version, flags) = read_header::<T>(frame)?;
    if frame.len() > limits.max_compressed {
        return Err(too_large::<T>(SizeKind::Compressed, limits.max_compressed));
    }
    let raw = &frame[HEADER_LEN..];
    let body: Cow<'_, [u8]> = if flags & FLAG_ZSTD != 0 {
        Cow::Owned(decompress_capped::<T>(raw, limits.max_decompressed)?)
    } else if raw.len() > limits.max_decompressed {
        return Err(too_large::<T>(SizeKind::Decompressed, limits.max_decompressed));
    } else {
        Cow::Borrowed(raw)
    };
    within_budget::<T>(&body, limits, false)?;
    // Every supported version shares the v1 body layout; a future version that
    // changes it dispatches on `version` here.
    let value = rmp_serde::from_slice(&body).map_err(|e| WireError::Undecodable {
        kind: T::KIND,
        detail: e.to_string(),
    })?;
    let info = FrameInfo {
        version,
        flags,
        compressed_len: frame.len(),
        decompressed_len: body.len(),
    };
    Ok((value, info))
}

/// The decoded-size budget, checked the same way at encode and at decode.
fn within_budget<T: Frame>(body: &[u8], limits: &Limits, encoding: bool) -> Result<(), WireError> {
    match budget::check(body, limits.max_decompressed) {
        Ok(()) => Ok(()),
        Err(OverBudget::Size) => Err(too_large::<T>(SizeKind::Decoded, limits.max_decompressed)),
        Err(OverBudget::Depth) => {
            let detail = format!("arrays and maps nested deeper than {MAX_DEPTH} levels");
            Err(if encoding {
                WireError::Encode { kind: T::KIND, detail }
            } else {
                WireError::Undecodable { kind: T::KIND, detail }
            })
        }
    }
}

/// Check magic, version and flags; return the version and flags.
fn read_header<T: Frame>(frame: &[u8]) -> Result<(u8, u8), WireError> {
    let Some(header) = frame.get(..HEADER_LEN) else {
        return Err(WireError::TooShort {
            kind: T::KIND,
            len: frame.len(),
        });
    };
    let found = [header[0], header[1], header[2], header[3]];
    if found != T::MAGIC {
        return Err(WireError::BadMagic {
            kind: T::KIND,
            found,
            expected: T::MAGIC,
        });
    }
    let (version, flags) = (header[4], header[5]);
    if !(T::MIN_VERSION..=T::VERSION).contains(&version) {
        return Err(WireError::UnsupportedVersion {
            kind: T::KIND,
            version,
            min: T::MIN_VERSION,
            max: T::VERSION,
        });
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::UnknownFlags { kind: T::KIND, flags });
    }
    Ok((version, flags))
}

/// The only zstd decompression in Courier.
///
/// A frame that declares its content size (every frame Courier writes) is
/// refused at once when the declaration is over `limit`; otherwise it is
/// decoded in one shot into a buffer of exactly the declared size, which zstd
/// never writes past, so a frame that lies about its size fails instead of
/// growing anything. A frame that declares nothing is streamed through a buffer
/// that grows by doubling but never past `limit + 1` bytes. Both paths cap the
/// zstd window, so a hostile header cannot make the decoder reserve a large
/// window either. Decoder contexts are reused per thread.
#[allow(clippy::disallowed_methods)] // this is the one allowed place
fn decompress_capped<T: Frame>(input: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    let corrupt = |e: std::io::Error| WireError::Corrupt {
        kind: T::KIND,
        detail: e.to_string(),
    };
    let window = zstd::zstd_safe::DParameter::WindowLogMax(window_log_for(limit));
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(input) {
        if declared > limit as u64 {
            return Err(too_large::<T>(SizeKind::Decompressed, limit));
        }
        // `declared <= limit`, so the conversion cannot truncate.
        let mut out = Vec::with_capacity(declared as usize);
        return DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let decompressor = match slot.as_mut() {
                Some(d) => d,
                None => slot.insert(zstd::bulk::Decompressor::new().map_err(corrupt)?),
            };
            decompressor.set_parameter(window).map_err(corrupt)?;
            decompressor.decompress_to_buffer(input, &mut out).map_err(corrupt)?;
            Ok(out)
        });
    }
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input).map_err(corrupt)?;
    decoder.window_log_max(window_log_for(limit)).map_err(corrupt)?;
    let cap = limit.saturating_add(1);
    let mut out = vec![0u8; cap.min(input.len().saturating_mul(4).max(4096))];
    let mut filled = 0;
    loop {
        if filled == out.len() {
            if filled >= cap {
                return Err(too_large::<T>(SizeKind::Decompressed, limit));
            }
            let grown = out.len().saturating_mul(2).min(cap);
            out.reserve_exact(grown - out.len());
            out.resize(grown, 0);
        }
        match decoder.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(corrupt(e)),
        }
    }
    if filled > limit {
        return Err(too_large::<T>(SizeKind::Decompressed, limit));
    }
    out.truncate(filled);
    Ok(out)
}

/// A message travels compressed when zstd saves at least 1/`MIN_SAVING`
/// of it (6%).
const MIN_SAVING: usize = 16;
/// The most messages of a stream in a row that skip compression.
const MAX_SKIP: u32 = 64;
/// Streams remembered; past it, it starts over (every stream's next
/// message is tried again).
const MAX_STREAMS: usize = 1024;

/// Early abort for incompressible messages (random or base64 data,
/// already-compressed bytes), as ZFS aborts compressing blocks that do not
/// shrink: after a message of a stream (a kind, workflow and step) that
/// zstd did not shrink by 1/[`MIN_SAVING`], the next 1, then 2, 4 … up to
/// [`MAX_SKIP`] messages of that stream (from any thread) travel as they
/// are while the attempts keep failing, and every one is compressed again
/// from the first attempt that pays. A steady stream of incompressible messages
/// costs one attempt in 65; a compressible message that comes during its
/// own stream's skip travels larger; other streams are not affected (one
/// step's outputs decide nothing for another's).
struct Skips {
    /// Per stream (a hash of it): messages left to skip, and the last
    /// skip's length.
    streams: std::sync::Mutex<std::collections::BTreeMap<u64, (u32, u32)>>,
}

/// The process's early aborts ([`encode_message`]'s).
static SKIPS: Skips = Skips::new();

impl Skips {
    const fn new() -> Self {
        Self {
            streams: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, (u32, u32)>> {
        self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key of a message kind's stream.
    fn key(magic: [u8; 4], parts: &[&str]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        magic.hash(&mut hasher);
        parts.hash(&mut hasher);
        hasher.finish()
    }

    /// Whether this message of `key` skips compression (counted).
    fn skip(&self, key: u64) -> bool {
        match self.streams().get_mut(&key) {
            Some((left, _)) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    /// How an attempt at a message of `key` went; whether it `paid`.
    fn record(&self, key: u64, paid: bool) -> bool {
        let mut streams = self.streams();
        if paid {
            streams.remove(&key);
            return true;
        }
        if streams.len() >= MAX_STREAMS && !streams.contains_key(&key) {
            streams.clear();
        }
        let (left, last) = streams.entry(key).or_default();
        *last = (*last * 2).clamp(1, MAX_SKIP);
        *left = *last;
        false
    }
}

/// Scratch buffers are kept across encodes up to this capacity each: a
/// task or result of a few KiB then allocates only its frame (its body grew
/// seven times while serialized before, and was compressed into a buffer
/// of its own), and a rare large message leaves no large buffer behind.
const SCRATCH_KEPT: usize = 64 * 1024;

thread_local! {
    /// This thread's buffers for a body being encoded and its compressed form.
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// One reusable zstd decompression context per thread.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// One reusable zstd compression context per thread.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Compress `body` at `level` into `out` (replacing what it held) with
/// this thread's reusable context.
fn compress(body: &[u8], level: i32, out: &mut Vec<u8>) -> std::io::Result<()> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some(c) => c,
            None => slot.insert(zstd::bulk::Compressor::new(level)?),
        };
        compressor.set_compression_level(level)?;
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(body.len()));
        compressor.compress_to_buffer(body, out)?;
        Ok(())
    })
}

/// The smallest zstd window log that can hold `limit` bytes, within zstd's range.
fn window_log_for(limit: usize) -> u32 {
    const ZSTD_WINDOWLOG_MIN: u32 = 10;
    const ZSTD_WINDOWLOG_MAX: u32 = 31;
    let bits = usize::BITS - limit.saturating_sub(1).leading_zeros();
    bits.clamp(ZSTD_WINDOWLOG_MIN, ZSTD_WINDOWLOG_MAX)
}

fn too_large<T: Frame>(size: SizeKind, limit: usize) -> WireError {
    WireError::TooLarge {
        kind: T::KIND,
        size,
        limit,
    }
}

/// BLAKE3 digest of a frame's bytes: the content hash workers cache by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// Hash a frame's bytes.
    pub fn of(frame: &[u8]) -> Self {
        Self(*blake3::hash(frame).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_log_covers_the_limit() {
        assert_eq!(window_log_for(0), 10);
        assert_eq!(window_log_for(1024), 10);
        assert_eq!(window_log_for(1025), 11);
        assert_eq!(window_log_for(DEFAULT_MAX_DECOMPRESSED), 23);
        assert_eq!(window_log_for(DEFAULT_MAX_DECOMPRESSED + 1), 24);
        assert_eq!(window_log_for(usize::MAX), 31);
    }

    /// A message kind, as tasks and results are.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Message(String);

    impl Frame for Message {
        const KIND: &'static str = "message";
        const MAGIC: [u8; 4] = *b"TMSG";
        const VERSION: u8 = 1;
        const MIN_VERSION: u8 = 1;
        fn zstd_level(body_len: usize) -> i32 {
            message_zstd_level(body_len, DEFAULT_ZSTD_LEVEL)
        }
    }

    /// Random alphanumerics: zstd's fast level shrinks them by under 1%.
    fn noise(len: usize, seed: u64) -> String {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..len).map(|_| rng.alphanumeric()).collect()
    }

    fn prose() -> String {
        "the quick brown fox jumps over the lazy dog. ".repeat(100)
    }

    /// The flags of each of `n` messages of `stream` carrying `text`, each
    /// decoded back, the early aborts kept in `skips`.
    fn flags_of(skips: &Skips, text: &str, stream: &[&str], n: usize) -> Vec<u8> {
        let limits = Limits::default();
        (0..n)
            .map(|_| {
                let frame = encode_with(&Message(text.to_string()), &limits, Some((skips, stream))).unwrap();
                assert_eq!(decode::<Message>(&frame, &limits).unwrap(), Message(text.to_string()));
                frame[5]
            })
            .collect()
    }

    #[test]
    fn encodes_on_one_thread_share_its_scratch_buffers_and_keep_none_large() {
        let limits = Limits::default();
        let scratch = || SCRATCH.with(|cell| cell.borrow().0.capacity().max(cell.borrow().1.capacity()));
        // Compressed, stored as it is, then large: each frame is what a
        // fresh encode gives and decodes back to its message, whatever the
        // buffers held before.
        for text in [
            prose(),
            "short".to_string(),
            noise(4096, 9),
            prose().repeat(100),
            prose(),
        ] {
            let frame = encode_with(&Message(text.clone()), &limits, None).unwrap();
            let fresh = encode_into(&Message(text.clone()), &limits, None, &mut Vec::new(), &mut Vec::new()).unwrap();
            assert_eq!(frame, fresh);
            assert_eq!(frame.capacity(), frame.len(), "a frame is allocated at its size");
            assert_eq!(decode::<Message>(&frame, &limits).unwrap(), Message(text.clone()));
            SCRATCH.with(|cell| assert!(cell.borrow().0.is_empty() && cell.borrow().1.is_empty()));
            assert!(
                scratch() <= SCRATCH_KEPT,
                "{} bytes kept after a {}-byte body",
                scratch(),
                text.len()
            );
        }
        assert!(scratch() > 0, "a small body's buffer is kept for the next encode");
        // A failed encode leaves the buffers empty too.
        let tight = Limits {
            max_decompressed: 1024,
            ..Limits::default()
        };
        assert!(encode_with(&Message(prose()), &tight, None).is_err());
        SCRATCH.with(|cell| assert!(cell.borrow().0.is_empty() && cell.borrow().1.is_empty()));
        // One that panicked halfway leaves its bytes behind: the next
        // encode does not start after them.
        assert!(std::panic::catch_unwind(|| encode_with(&Bomb(()), &limits, None)).is_err());
        SCRATCH.with(|cell| assert!(!cell.borrow().0.is_empty(), "the panic left bytes"));
        let text = prose();
        let frame = encode_with(&Message(text.clone()), &limits, None).unwrap();
        assert_eq!(decode::<Message>(&frame, &limits).unwrap(), Message(text));
    }

    /// A message whose serialization panics after writing part of itself.
    #[derive(Debug, serde::Deserialize)]
    struct Bomb(());

    impl serde::Serialize for Bomb {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = serializer.serialize_seq(Some(2))?;
            seq.serialize_element("written before the panic")?;
            panic!("serialization failed halfway")
        }
    }

    impl Frame for Bomb {
        const KIND: &'static str = "bomb";
        const MAGIC: [u8; 4] = *b"TBMB";
        const VERSION: u8 = 1;
        const MIN_VERSION: u8 = 1;
        fn zstd_level(_: usize) -> i32 {
            DEFAULT_ZSTD_LEVEL
        }
    }

    /// A stream's skip state: (messages left to skip, the last skip's length).
    fn state(skips: &Skips, stream: &[&str]) -> Option<(u32, u32)> {
        skips.streams().get(&Skips::key(Message::MAGIC, stream)).copied()
    }

    #[test]
    fn incompressible_messages_of_a_stream_travel_as_they_are_and_skip_the_attempt_a_growing_while() {
        let skips = Skips::new();
        let (a, b) = (&["wf", "a"][..], &["wf", "b"][..]);
        let noise = noise(4096, 1);
        let mut states = Vec::new();
        for _ in 0..7 {
            assert_eq!(flags_of(&skips, &noise, a, 1), vec![0], "incompressible: as it is");
            states.push(state(&skips, a).unwrap());
        }
        // Tried, skipped once, tried, skipped twice, tried: skips of 1, 2, 4.
        assert_eq!(states, vec![(1, 1), (0, 1), (2, 2), (1, 2), (0, 2), (4, 4), (3, 4)]);
        assert!(flags_of(&skips, &noise, a, 200).iter().all(|f| *f == 0));
        assert_eq!(
            state(&skips, a).map(|(_, last)| last),
            Some(MAX_SKIP),
            "skips grow up to 64"
        );
        // Another stream is not affected: its prose is compressed at once.
        assert_eq!(flags_of(&skips, &prose(), b, 2), vec![FLAG_ZSTD; 2]);
        assert_eq!(state(&skips, b), None);
        // Prose in the skipping stream travels larger until the next
        // attempt, which pays: compressed from then on, the state gone.
        let left = state(&skips, a).unwrap().0 as usize;
        let mut expected = vec![0; left];
        expected.extend([FLAG_ZSTD; 2]);
        assert_eq!(flags_of(&skips, &prose(), a, left + 2), expected);
        assert_eq!(state(&skips, a), None);
        // Plain `encode` (snapshots) ignores it all: always compressed, the
        // same bytes every time.
        assert_eq!(flags_of(&skips, &noise, a, 1), vec![0]);
        let once = encode(&Message(noise.clone()), &Limits::default()).unwrap();
        assert_eq!(once[5], FLAG_ZSTD);
        assert_eq!(encode(&Message(noise.clone()), &Limits::default()).unwrap(), once);
    }

    #[test]
    fn a_message_travels_as_it_is_only_below_the_saving_and_where_it_fits() {
        let skips = Skips::new();
        let limits = Limits::default();
        let stream = &["wf", "s"][..];
        // A repeated chunk of `share` characters in 4,096: zstd saves about that.
        let with_repeat = |share: usize| {
            let chunk = noise(share, 2);
            format!("{chunk}{}{chunk}", noise(4096 - 2 * share, 3))
        };
        for (share, pays_off) in [(100, false), (600, true)] {
            let text = with_repeat(share);
            let body = rmp_serde::to_vec_named(&Message(text.clone())).unwrap();
            let mut compressed = Vec::new();
            compress(&body, Message::zstd_level(body.len()), &mut compressed).unwrap();
            assert_eq!(
                pays(compressed.len(), body.len()),
                pays_off,
                "{share}: {} of {}",
                compressed.len(),
                body.len()
            );
            let frame = encode_with(&Message(text), &limits, Some((&skips, &["wf", &share.to_string()]))).unwrap();
            assert_eq!(frame[5], if pays_off { FLAG_ZSTD } else { 0 }, "{share}");
        }
        // With the stream skipping, a body past FAST_UP_TO is still
        // compressed, and so is one that fits the limit only compressed.
        let _ = flags_of(&skips, &noise(4096, 4), stream, 1);
        assert_eq!(state(&skips, stream), Some((1, 1)));
        let large = encode_with(&Message(noise(FAST_UP_TO + 1, 5)), &limits, Some((&skips, stream))).unwrap();
        assert_eq!(large[5], FLAG_ZSTD);
        let tight = Limits {
            max_compressed: 3000,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        };
        let frame = encode_with(&Message(prose()), &tight, Some((&skips, stream))).unwrap();
        assert_eq!(frame[5], FLAG_ZSTD);
        assert_eq!(decode::<Message>(&frame, &tight).unwrap(), Message(prose()));
        assert_eq!(state(&skips, stream), Some((1, 1)), "neither touched the stream's skip");
    }

    #[test]
    fn a_bounded_number_of_streams_is_remembered() {
        let skips = Skips::new();
        let noise = noise(300, 6);
        for i in 0..=MAX_STREAMS {
            let _ = flags_of(&skips, &noise, &["wf", &i.to_string()], 1);
        }
        let remembered = skips.streams().len();
        assert_eq!(remembered, 1, "full at {MAX_STREAMS}: started over");
    }

    #[test]
    fn encode_message_shares_its_early_aborts_across_threads() {
        let stream = ["wf", "across-threads"];
        let text = noise(4096, 7);
        let flag = std::thread::spawn(move || encode_message(&Message(text), &Limits::default(), &stream).unwrap()[5]);
        assert_eq!(flag.join().unwrap(), 0);
        assert_eq!(state(&SKIPS, &stream), Some((1, 1)), "seen from another thread");
    }
}
