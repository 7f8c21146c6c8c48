//! Snapshot codec against JSON+gzip (the format of dagu's distributed agent
//! snapshots) on realistic snapshots of about 4 KiB, 64 KiB and 1 MiB.
//!
//! Run: `cargo bench -p courier-wire --bench codec`. Encoded sizes are printed
//! once per size before the timings.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Read;
use std::io::Write as _;
use std::time::Duration;

use courier_wire::{
    AgentConfig, Limits, MaxTokensField, Memory, ModelDef, Provider, Skill, Snapshot, Soul, ToolPolicy, decode, encode,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flate2::Compression;

/// A tiny deterministic PRNG (PCG-style LCG), so every run sees the same text.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A vocabulary of 4,000 pronounceable words, shorter ones more frequent.
fn vocabulary() -> Vec<String> {
    const SYLLABLES: &[&str] = &[
        "a", "ka", "to", "ri", "en", "sta", "mo", "lu", "per", "con", "tion", "de", "in", "pro", "ver", "sa", "ne",
        "li", "com", "ex", "re", "ti", "na", "for", "ma", "ble", "ment", "ous", "ly", "ing", "er", "ed", "al", "ist",
    ];
    let mut rng = Lcg(42);
    let mut words: Vec<String> = (0..4000)
        .map(|i| {
            let syllables = 1 + (i / 600).min(4) + rng.below(2) as usize;
            (0..syllables)
                .map(|_| SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize])
                .collect()
        })
        .collect();
    words.dedup();
    words
}

/// Deterministic Markdown-like prose whose word frequencies follow Zipf's
/// law, as natural language does: sentences, paragraphs, headings, bullets.
fn prose(seed: u64, bytes: usize) -> String {
    let vocab = vocabulary();
    // Cumulative Zipf weights (s = 1) for inverse-CDF sampling.
    let mut cumulative = Vec::with_capacity(vocab.len());
    let mut total = 0.0;
    for rank in 1..=vocab.len() {
        total += 1.0 / rank as f64;
        cumulative.push(total);
    }
    let mut rng = Lcg(seed.wrapping_add(7));
    let word = |rng: &mut Lcg| {
        let x = (rng.next() as f64 / (1u64 << 31) as f64) * total;
        &vocab[cumulative.partition_point(|&c| c < x).min(vocab.len() - 1)]
    };
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        match rng.below(12) {
            0 => {
                out.push_str("## ");
                for _ in 0..2 + rng.below(3) {
                    let w = word(&mut rng);
                    out.push_str(&w[..1].to_uppercase());
                    out.push_str(&w[1..]);
                    out.push(' ');
                }
                out.push_str("\n\n");
            }
            1 | 2 => {
                for _ in 0..2 + rng.below(4) {
                    out.push_str("- ");
                    for _ in 0..3 + rng.below(8) {
                        out.push_str(word(&mut rng));
                        out.push(' ');
                    }
                    out.push('\n');
                }
                out.push('\n');
            }
            _ => {
                for _ in 0..2 + rng.below(4) {
                    let n = 6 + rng.below(16);
                    for i in 0..n {
                        let w = word(&mut rng);
                        if i == 0 {
                            out.push_str(&w[..1].to_uppercase());
                            out.push_str(&w[1..]);
                        } else {
                            out.push_str(w);
                        }
                        out.push_str(if i + 1 == n {
                            ". "
                        } else if rng.below(9) == 0 {
                            ", "
                        } else {
                            " "
                        });
                    }
                }
                out.push_str("\n\n");
            }
        }
    }
    out
}

/// A snapshot shaped like a real agent step's, of roughly `target` bytes of text.
fn realistic(target: usize) -> Snapshot {
    let skills_n = (target / 16_384).clamp(2, 24);
    let share = target / (skills_n + 3);
    let skills: BTreeMap<String, Skill> = (0..skills_n)
        .map(|i| {
            let skill = Skill {
                name: format!("Skill {i}"),
                description: prose(i as u64, 80),
                tags: vec!["research".into(), format!("tag-{i}")],
                body: prose(100 + i as u64, share),
            };
            (format!("skill-{i}"), skill)
        })
        .collect();
    let model = ModelDef {
        provider: Provider::OpenaiCompatible,
        model: "qwen2.5:0.5b".into(),
        base_url: Some("http://ollama:11434/v1".into()),
        api_key_env: Some("OLLAMA_API_KEY".into()),
        max_tokens: Some(1024),
        temperature: Some(0.2),
        request_timeout: Some(Duration::from_secs(60)),
        script: Vec::new(),
        max_tokens_field: MaxTokensField::MaxTokens,
        pricing: None,
        limits: Default::default(),
    };
    Snapshot {
        workflow: "research".into(),
        agent: Some(AgentConfig {
            default_model: "local".into(),
            tools: ToolPolicy {
                allowed: vec!["read_skill".into(), "search_skills".into(), "output".into()],
            },
        }),
        models: BTreeMap::from([("local".into(), model)]),
        skills,
        soul: Some(Soul {
            id: "researcher".into(),
            name: "Researcher".into(),
            description: Some("Careful, cites sources".into()),
            body: prose(7, share),
        }),
        memory: Some(Memory {
            global: Some(prose(8, share / 2)),
            workflow: Some(prose(9, share / 2)),
        }),
    }
}

fn json_gzip_encode(snapshot: &Snapshot) -> Vec<u8> {
    let json = serde_json::to_vec(snapshot).expect("json");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&json).expect("gzip");
    gz.finish().expect("gzip")
}

fn json_gzip_decode(bytes: &[u8]) -> Snapshot {
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut json)
        .expect("gunzip");
    serde_json::from_slice(&json).expect("json")
}

fn bench_codec(c: &mut Criterion) {
    let limits = Limits {
        max_compressed: 16 << 20,
        max_decompressed: 64 << 20,
    };
    for (label, target) in [("4KiB", 4 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)] {
        let snapshot = realistic(target);
        let courier = encode(&snapshot, &limits).expect("encode");
        let json_gz = json_gzip_encode(&snapshot);
        let raw = rmp_serde::to_vec_named(&snapshot).expect("msgpack").len();
        eprintln!(
            "size {label}: msgpack body {raw} B, courier frame {} B, json+gzip {} B ({:.1}% of json+gzip)",
            courier.len(),
            json_gz.len(),
            100.0 * courier.len() as f64 / json_gz.len() as f64
        );
        let body = rmp_serde::to_vec_named(&snapshot).expect("msgpack");
        let sweep: Vec<String> = [1, 3, 6, 9, 12, 19]
            .iter()
            .map(|&level| format!("L{level}={}", zstd::bulk::compress(&body, level).expect("zstd").len()))
            .collect();
        eprintln!("  zstd level sweep of the body (bytes): {}", sweep.join(" "));
        let mut group = c.benchmark_group(format!("snapshot-{label}"));
        group.throughput(Throughput::Bytes(raw as u64));
        group.bench_function(BenchmarkId::new("encode", "courier"), |b| {
            b.iter(|| encode(black_box(&snapshot), &limits).expect("encode"))
        });
        group.bench_function(BenchmarkId::new("encode", "json+gzip"), |b| {
            b.iter(|| json_gzip_encode(black_box(&snapshot)))
        });
        group.bench_function(BenchmarkId::new("decode", "courier"), |b| {
            b.iter(|| decode::<Snapshot>(black_box(&courier), &limits).expect("decode"))
        });
        group.bench_function(BenchmarkId::new("decode", "json+gzip"), |b| {
            b.iter(|| json_gzip_decode(black_box(&json_gz)))
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = bench_codec
}
criterion_main!(benches);
