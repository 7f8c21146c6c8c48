//! The offline CLI: `validate` and `snapshot build|inspect`.

use crate::support::{copy_dir, courier, example_config, run};

#[test]
fn validate_accepts_the_example_config() {
    let (out, stdout, _) = run(courier().args(["validate", "--config-dir"]).arg(example_config()));
    assert!(out.status.success());
    let (summary, largest) = stdout.split_once('\n').unwrap();
    assert!(
        summary.ends_with(": ok (4 workflows, 14 steps, 5 models, 3 skills, 2 souls)"),
        "{stdout}"
    );
    assert!(
        largest.starts_with("largest snapshot: research/analyze, ") && largest.ends_with(" bytes (limit 1048576)\n"),
        "{stdout}"
    );
}

#[test]
fn validate_builds_every_snapshot_within_the_schedulers_limits() {
    let dir = tempfile::TempDir::new().unwrap();
    copy_dir(&example_config(), dir.path());
    // The limit the scheduler would use, from courier.toml: agent steps' snapshots
    // (several hundred bytes) do not fit, command steps' (tens of bytes) do.
    std::fs::write(dir.path().join("courier.toml"), "snapshot_max_compressed = 300\n").unwrap();
    let (out, stdout, stderr) = run(courier().args(["validate", "--config-dir"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let too_large = |file: &str, step: &str| {
        format!(
            "{}/workflows/{file}: step \"{step}\": snapshot too large: compressed size exceeds the limit of 300 bytes\n",
            dir.path().display()
        )
    };
    assert_eq!(
        stderr,
        format!(
            "5 errors in the configuration:\n  {}  {}  {}  {}  {}",
            too_large("digest.yaml:7", "digest"),
            too_large("research.yaml:9", "analyze"),
            too_large("research.yaml:22", "write"),
            too_large("triage.yaml:12", "plan"),
            too_large("triage.yaml:27", "review"),
        )
    );
    // A flag overrides the file, as it does for the scheduler.
    let (out, stdout, _) = run(courier()
        .args(["validate", "--max-compressed", "4096", "--config-dir"])
        .arg(dir.path()));
    assert!(out.status.success());
    assert!(stdout.ends_with(" bytes (limit 4096)\n"), "{stdout}");
}

#[test]
fn settings_for_a_pools_lane_are_refused_as_not_a_pool() {
    let dir = tempfile::TempDir::new().unwrap();
    copy_dir(&example_config(), dir.path());
    std::fs::write(
        dir.path().join("courier.toml"),
        "[pools.default]\nmax_queued = 1\n[pools.\"default.lane\"]\nmax_queued = 50\n",
    )
    .unwrap();
    let (out, stdout, stderr) = run(courier().args(["validate", "--config-dir"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.starts_with("error: pools.default.lane: a pool's name is a slug"),
        "{stderr}"
    );
}

#[test]
fn validate_checks_parameter_defaults_against_the_task_limits() {
    let dir = tempfile::TempDir::new().unwrap();
    copy_dir(&example_config(), dir.path());
    // A 1.5 MB default used six times: 9 MB of fields, over the 4 MiB limit
    // set here, found while rendering, before anything that large is built.
    let yaml = format!(
        "params:\n  big: \"{}\"\nsteps:\n  - name: a\n    command: [echo{}]\n",
        "x".repeat(1_500_000),
        ", \"${big}\"".repeat(6)
    );
    std::fs::write(dir.path().join("workflows/big.yaml"), yaml).unwrap();
    std::fs::write(dir.path().join("courier.toml"), "task_max_decompressed = 4194304\n").unwrap();
    let (out, _, stderr) = run(courier().args(["validate", "--config-dir"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr,
        format!(
            "1 error in the configuration:\n  {}/workflows/big.yaml:4: step \"a\": with its parameters' defaults: the step's fields, with their values substituted, exceed 4194304 bytes\n",
            dir.path().display()
        )
    );
}

#[test]
fn validate_lists_every_error_and_exits_non_zero() {
    let dir = tempfile::TempDir::new().unwrap();
    copy_dir(&example_config(), dir.path());
    std::fs::write(
        dir.path().join("workflows/broken.yaml"),
        "steps:\n  - name: a\n    command: [echo]\n    depends: [nope]\n  - name: b\n    agent: {soul: ghost, prompt: hi}\n",
    )
    .unwrap();
    let (out, _, stderr) = run(courier().args(["validate", "--config-dir"]).arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.starts_with("2 errors in the configuration:\n"), "{stderr}");
    assert!(
        stderr.contains("broken.yaml:4: step \"a\": field \"depends.0\": unknown step \"nope\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("broken.yaml:6: step \"b\": field \"agent.soul\": unknown soul \"ghost\""),
        "{stderr}"
    );
}

#[test]
fn snapshot_build_then_inspect_shows_what_the_step_carries() {
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("analyze.snap");
    let (out, stdout, stderr) = run(courier()
        .args(["snapshot", "build", "research", "--step", "analyze", "--config-dir"])
        .arg(example_config())
        .arg("-o")
        .arg(&file));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("blake3:"), "{stdout}");

    let (out, stdout, _) = run(courier().args(["snapshot", "inspect"]).arg(&file));
    assert!(out.status.success());
    assert!(stdout.contains("format version: 1\n"), "{stdout}");
    assert!(
        stdout.contains("models:         local (ollama qwen2.5:0.5b)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("skills:         cite-sources, summarize\n"), "{stdout}");
    assert!(stdout.contains("soul:           researcher\n"), "{stdout}");
    assert!(
        stdout.contains("memory:         global 81 bytes, workflow 97 bytes\n"),
        "{stdout}"
    );

    let (out, stdout, _) = run(courier().args(["snapshot", "inspect", "--json"]).arg(&file));
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["soul"], "researcher");
    assert_eq!(json["skills"], serde_json::json!(["cite-sources", "summarize"]));
    assert_eq!(
        json["compressed_bytes"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    assert!(json["content_hash"].as_str().unwrap().starts_with("blake3:"));
}

#[test]
fn snapshot_build_is_reproducible() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut hashes = Vec::new();
    for name in ["a.snap", "b.snap"] {
        let file = dir.path().join(name);
        let (out, _, _) = run(courier()
            .args(["snapshot", "build", "digest", "--step", "digest", "--config-dir"])
            .arg(example_config())
            .arg("-o")
            .arg(&file));
        assert!(out.status.success());
        hashes.push(std::fs::read(&file).unwrap());
    }
    assert_eq!(hashes[0], hashes[1]);
}

#[test]
fn snapshot_inspect_of_corrupt_input_fails_with_the_typed_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let good = dir.path().join("good.snap");
    let (out, _, _) = run(courier()
        .args(["snapshot", "build", "research", "--step", "analyze", "--config-dir"])
        .arg(example_config())
        .arg("-o")
        .arg(&good));
    assert!(out.status.success());
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short", bytes[..3].to_vec(), "snapshot frame too short: 3 bytes"),
        (
            "magic",
            [b"JSON".as_slice(), &bytes[4..]].concat(),
            "not a snapshot frame: magic bytes",
        ),
        (
            "version",
            [&bytes[..4], &[9u8], &bytes[5..]].concat(),
            "unsupported snapshot format version 9: this build reads versions 1 to 1",
        ),
        (
            "truncated",
            bytes[..bytes.len() / 2].to_vec(),
            "corrupt snapshot compression",
        ),
    ];
    for (name, content, expected) in cases {
        let file = dir.path().join(format!("{name}.snap"));
        std::fs::write(&file, content).unwrap();
        let (out, _, stderr) = run(courier().args(["snapshot", "inspect"]).arg(&file));
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    // A size limit below the snapshot's is enforced when reading too.
    let (out, _, stderr) = run(courier()
        .args(["snapshot", "inspect", "--max-decompressed", "100"])
        .arg(&good));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("snapshot too large: decompressed size exceeds the limit of 100 bytes"),
        "{stderr}"
    );
}

#[test]
fn snapshot_build_of_an_oversized_step_fails_naming_the_limit() {
    let dir = tempfile::TempDir::new().unwrap();
    let (out, _, stderr) = run(courier()
        .args([
            "snapshot",
            "build",
            "research",
            "--step",
            "analyze",
            "--max-compressed",
            "200",
            "--config-dir",
        ])
        .arg(example_config())
        .arg("-o")
        .arg(dir.path().join("x.snap")));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("snapshot too large: compressed size exceeds the limit of 200 bytes"),
        "{stderr}"
    );
    assert!(!dir.path().join("x.snap").exists());
}

#[test]
fn an_api_key_in_the_environment_never_reaches_the_snapshot() {
    const SECRET: &str = "sk-test-4f9d2c81e7b3a6059d1c";
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("config");
    copy_dir(&example_config(), &config);
    std::fs::write(config.join("agents/config.yaml"), "default_model: openai\ntools:\n  allowed: [read_skill, search_skills, read_memory, output, propose_memory_update]\n").unwrap();
    let file = dir.path().join("s.snap");
    let (out, _, stderr) = run(courier()
        .env("OPENAI_API_KEY", SECRET)
        .args(["snapshot", "build", "research", "--step", "write", "--config-dir"])
        .arg(&config)
        .arg("-o")
        .arg(&file));
    assert!(out.status.success(), "{stderr}");
    let (_, inspect, _) = run(courier().args(["snapshot", "inspect", "--json"]).arg(&file));
    assert!(inspect.contains("\"id\": \"openai\""), "{inspect}");
    // Neither the frame nor anything decoded from it holds the key.
    let frame = std::fs::read(&file).unwrap();
    let body = decoded_as_json(&frame);
    for bytes in [&frame, &body] {
        assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()));
    }
    assert!(body.windows(14).any(|w| w == b"OPENAI_API_KEY"));
}

/// Everything a frame holds, decompressed and written out as JSON.
fn decoded_as_json(frame: &[u8]) -> Vec<u8> {
    let snapshot: courier_wire::Snapshot = courier_wire::decode(frame, &courier_wire::Limits::default()).unwrap();
    serde_json::to_vec(&snapshot).unwrap()
}

#[test]
fn dev_starts_a_scheduler_and_workers_that_run_the_triage_example_and_stops_them() {
    use std::io::BufRead;
    let dir = tempfile::TempDir::new().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = format!("http://127.0.0.1:{port}");
    let namespace = format!("it-dev-{}", uuid::Uuid::now_v7().simple());
    let with_env = |cmd: &mut std::process::Command| {
        cmd.env("COURIER_CONFIG_DIR", example_config())
            .env("COURIER_DATA_DIR", dir.path())
            .env("COURIER_NAMESPACE", &namespace)
            .env("COURIER_API_LISTEN", format!("127.0.0.1:{port}"))
            .env("COURIER_API_URL", &api);
    };
    let mut dev = courier();
    with_env(&mut dev);
    // Started without api_url: it finds the scheduler where it listens, and
    // says what the CLI needs to find it too.
    dev.env_remove("COURIER_API_URL");
    let mut dev = dev
        .args(["dev", "--workers", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(dev.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.starts_with(&format!(
            "courier dev: the scheduler answers on {api} and 2 worker(s) run. Try: COURIER_API_URL={api} courier submit"
        )),
        "{line}"
    );
    // The offline agent example, end to end, through the started processes.
    let mut submit = courier();
    with_env(&mut submit);
    let (out, stdout, stderr) = run(submit.args(["submit", "triage"]));
    assert!(out.status.success(), "{stderr}");
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();
    // It waits for its approval, then it is approved from another command.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut approve = courier();
        with_env(&mut approve);
        let (out, _, stderr) = run(approve.args(["approve", &id, "approve"]));
        if out.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stderr}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut show = courier();
        with_env(&mut show);
        let shown = run(show.args(["runs", &id, "--json"])).1;
        let run: serde_json::Value = serde_json::from_str(&shown).unwrap();
        if run["status"] == "succeeded" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{run:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // SIGTERM (as Ctrl-C would): everything stops.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(dev.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = dev.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        reqwest::blocking::get(format!("{api}/healthz")).is_err(),
        "the scheduler stopped too"
    );
    // Its queues go (idle quorum queues left behind slow the broker down).
    crate::cluster::block_on(async {
        let names = courier_amqp::Names::new(namespace.clone());
        let broker = courier_amqp::Broker::connect(&crate::cluster::amqp_url(), names, "it-dev-cleanup")
            .await
            .unwrap();
        broker.delete_topology(&["default".to_string()]).await.unwrap();
        let _ = broker.close().await;
    });
}

#[test]
fn dev_says_how_to_start_rabbitmq_when_it_is_not_running() {
    let (out, _, stderr) = run(courier()
        .env("COURIER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .args(["dev"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("error: RabbitMQ is not reachable at 127.0.0.1:1 (")
            && stderr.contains("rabbitmq-server -detached"),
        "{stderr}"
    );
}
