//! Snapshot codec against JSON+gzip (the format of dagu's distributed agent
//! snapshots) on realistic snapshots of about 4 KiB, 64 KiB and 1 MiB.
//!
//! Run: `cargo bench -p courier-wire --bench codec`. Encoded sizes are printed
//! once per size before the timings.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{Read, Write};
use std::time::Duration;

use courier_wire::{
    AgentConfig, Limits, Memory, ModelDef, Provider, Skill, Snapshot, Soul, ToolPolicy, decode,
    encode,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flate2::Compression;

const WORDS: &[&str] = &[
    "agent", "queue", "worker", "message", "research", "summary", "source", "claim", "evidence",
    "the", "a", "of", "and", "to", "in", "is", "that", "for", "with", "when", "step", "output",
    "cite", "check", "every", "never", "always", "model", "prompt", "tool", "memory", "skill",
    "report", "draft", "review", "latency", "throughput", "broker", "retry", "backoff", "dead",
    "letter", "user", "question", "answer", "context", "window", "token", "budget", "plan",
];

/// Deterministic pseudo-prose: Markdown-ish lines of words from a small vocabulary.
fn prose(seed: u64, bytes: usize) -> String {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = String::with_capacity(bytes + 64);
    let mut line = 0usize;
    while out.len() < bytes {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let word = WORDS[(state >> 33) as usize % WORDS.len()];
        out.push_str(word);
        line += word.len() + 1;
        if line > 72 {
            out.push_str(if (state >> 20) % 5 == 0 { ".\n\n- " } else { ".\n" });
            line = 0;
        } else {
            out.push(' ');
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
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut json).expect("gunzip");
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
