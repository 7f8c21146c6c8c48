//! The dispatch path end to end: one scheduler and three workers as real
//! processes against the real RabbitMQ.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::support::run;

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {run:#}"))
}

#[test]
fn fan_out_fan_in_completes_with_outputs_passed_downstream() {
    let cluster = Cluster::builder().start();
    let id = cluster
        .submit("fanout", &[("text", "one two three four five six seven")])
        .unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "split")["output"], "7");
    assert_eq!(step(&run, "count-a")["output"], "2");
    assert_eq!(step(&run, "count-c")["output"], "3");
    assert_eq!(step(&run, "merge")["output"], "7");
    for s in run["steps"].as_array().unwrap() {
        assert_eq!(s["status"], "succeeded");
        assert_eq!(s["attempts"], 1);
    }
}

#[test]
fn two_hundred_parallel_steps_spread_over_all_three_workers() {
    let mut yaml = String::from("steps:\n");
    for i in 0..200 {
        yaml.push_str(&format!(
            "  - name: s{i}\n    command: [\"sh\", \"-c\", \"sleep 0.05; echo {i}\"]\n    timeout: 30s\n"
        ));
    }
    let cluster = Cluster::builder().workflow("wide", &yaml).start();
    let id = cluster.submit("wide", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(120));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
    for (i, s) in run["steps"].as_array().unwrap().iter().enumerate() {
        assert_eq!(s["status"], "succeeded");
        assert_eq!(s["output"], i.to_string());
        *per_worker.entry(s["worker"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(
        per_worker.keys().collect::<Vec<_>>(),
        ["w1", "w2", "w3"],
        "{per_worker:?}"
    );
    assert_eq!(per_worker.values().sum::<usize>(), 200);
}

#[test]
fn a_failing_step_fails_the_run_with_its_stderr_and_skips_dependents() {
    let yaml = r#"
steps:
  - name: ok
    command: ["echo", "fine"]
  - name: broken
    command: ["sh", "-c", "echo 'disk on fire' >&2; exit 2"]
  - name: after
    depends: [broken]
    command: ["echo", "never"]
  - name: after-after
    depends: [after, ok]
    command: ["echo", "never"]
"#;
    let cluster = Cluster::builder().workflow("fails", yaml).start();
    let id = cluster.submit("fails", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "failed");
    assert_eq!(run["error"], "step(s) failed: broken");
    assert_eq!(step(&run, "ok")["status"], "succeeded");
    assert_eq!(step(&run, "broken")["status"], "failed");
    assert_eq!(step(&run, "broken")["error"], "exit status 2: disk on fire");
    assert_eq!(step(&run, "after")["status"], "skipped");
    assert_eq!(step(&run, "after")["error"], "upstream step \"broken\" failed");
    assert_eq!(step(&run, "after-after")["status"], "skipped");
}

#[test]
fn a_timed_out_step_is_killed_and_reported() {
    let yaml = r#"
steps:
  - name: slow
    command: ["sleep", "30"]
    timeout: 500ms
"#;
    let cluster = Cluster::builder().workers(1).workflow("slow", yaml).start();
    let id = cluster.submit("slow", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "failed");
    assert_eq!(step(&run, "slow")["error"], "timed out after 500ms");
}

#[test]
fn a_retry_policy_runs_the_step_again_after_its_backoff_through_a_delay_queue() {
    // Fails on the first two attempts (a file counts them, with the time of
    // each), succeeds on the third.
    let cluster_dir = tempfile::TempDir::new().unwrap();
    let log = cluster_dir.path().join("attempts");
    let yaml = format!(
        r#"
steps:
  - name: flaky
    command: ["sh", "-c", "date +%s%3N >> {l}; [ $(wc -l < {l}) -ge 3 ] && echo third-time-lucky || exit 1"]
    retry: {{limit: 2, backoff: 600ms, max_backoff: 10s}}
"#,
        l = log.display()
    );
    let cluster = Cluster::builder().workers(1).workflow("flaky", &yaml).start();
    let id = cluster.submit("flaky", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "flaky")["attempts"], 3);
    assert_eq!(step(&run, "flaky")["output"], "third-time-lucky");
    // Backoff 600 ms then 1200 ms, each minus at most 20% jitter.
    let times: Vec<i64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let (first_gap, second_gap) = (times[1] - times[0], times[2] - times[1]);
    assert!((480..3_000).contains(&first_gap), "first retry after {first_gap} ms");
    assert!((960..4_000).contains(&second_gap), "second retry after {second_gap} ms");
    assert!(cluster.worker_log("w1").matches("running step").count() == 3);
}

#[test]
fn a_task_over_the_size_limit_is_refused_at_submit_and_nothing_is_published() {
    let yaml = "steps:\n  - name: big\n    echo: hi\n    retry: {limit: 3, backoff: 100ms}\n";
    let cluster = Cluster::builder()
        .workers(1)
        .workflow("nonretry", yaml)
        .env("COURIER_TASK_MAX_DECOMPRESSED", "64")
        .start();
    let id = cluster.submit("nonretry", &[]);
    let error = id.unwrap_err();
    assert!(
        error.starts_with("step \"big\": task too large: decompressed size exceeds the limit of 64 bytes"),
        "{error}"
    );
    assert_eq!(cluster.queue_depth("default"), 0);
}

#[test]
fn a_run_survives_a_scheduler_restart() {
    let yaml = r#"
steps:
  - name: first
    command: ["sh", "-c", "sleep 1.5; echo one"]
  - name: second
    depends: [first]
    command: ["sh", "-c", "echo \"$0 two\"", "${first.output}"]
"#;
    let mut cluster = Cluster::builder().workers(2).workflow("restart", yaml).start();
    let id = cluster.submit("restart", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    cluster.kill_scheduler();
    // The first step finishes while no scheduler runs; its result waits in the queue.
    std::thread::sleep(Duration::from_secs(2));
    cluster.start_scheduler();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "second")["output"], "one two");
}

#[test]
fn submit_errors_are_clear_and_publish_nothing() {
    let cluster = Cluster::builder().workers(0).start();
    assert_eq!(
        cluster.submit("nope", &[]).unwrap_err(),
        "unknown workflow \"nope\" (known: digest, fanout, research, triage)"
    );
    assert_eq!(
        cluster.submit("research", &[]).unwrap_err(),
        "workflow \"research\" needs parameter \"topic\": pass --param topic=VALUE"
    );
    assert_eq!(
        cluster
            .submit("research", &[("topic", "x"), ("colour", "red")])
            .unwrap_err(),
        "workflow \"research\" has no parameter \"colour\" (it has: topic)"
    );
    // Through the API: a misspelt field is refused, not ignored; a value the
    // kernel could not pass as a process argument is refused at submit, not
    // on a worker.
    let post = |body: Value| {
        let response = reqwest::blocking::Client::new()
            .post(format!("{}/api/runs", cluster.api))
            .json(&body)
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().unwrap()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let (status, error) = post(serde_json::json!({"workflow": "fanout", "parms": {"text": "a"}}));
    assert_eq!(status, 422, "{error}");
    assert!(error.contains("unknown field `parms`"), "{error}");
    // A param given twice is refused (serde_json's Value cannot hold both:
    // the body is written by hand); so is a compressed body.
    let raw = |body: &'static str, encoding: Option<&str>| {
        let mut request = reqwest::blocking::Client::new()
            .post(format!("{}/api/runs", cluster.api))
            .header("content-type", "application/json")
            .body(body);
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let response = request.send().unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().unwrap()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let (status, error) = raw(r#"{"workflow": "fanout", "params": {"text": "a", "text": "b"}}"#, None);
    assert_eq!(status, 422, "{error}");
    assert!(error.contains("invalid entry: found duplicate key"), "{error}");
    let (status, error) = raw(r#"{"workflow": "fanout", "params": {"text": "a"}}"#, Some("gzip"));
    assert_eq!(status, 415, "{error}");
    assert_eq!(error, "a Content-Encoding is not accepted: send the body uncompressed");
    let (status, error) = post(serde_json::json!({"workflow": "fanout", "params": {"text": "x".repeat(200_000)}}));
    assert_eq!(status, 400, "{error}");
    assert_eq!(
        error,
        "step \"split\": argument 3 of the command is 200000 bytes once substituted; a process argument holds at most 131071 (Linux's MAX_ARG_STRLEN)"
    );
    // The CLI shows the same message and exits non-zero.
    let (out, _, stderr) = run(cluster.courier().args(["submit", "research", "--wait"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr,
        "error: workflow \"research\" needs parameter \"topic\": pass --param topic=VALUE\n"
    );
    // Nothing was published and no run was recorded.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cluster.queue_depth("default"), 0);
    let runs: Value = reqwest::blocking::get(format!("{}/api/runs", cluster.api))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(runs, serde_json::json!([]));
}

#[test]
fn submit_wait_prints_progress_and_outputs_and_runs_shows_history() {
    let cluster = Cluster::builder()
        .workers(1)
        .workflow("broken", "steps:\n  - name: fail\n    command: [\"false\"]\n")
        .start();
    let (out, stdout, stderr) = run(cluster
        .courier()
        .args(["submit", "fanout", "--wait", "-p", "text=a b c d e f"]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded merge\n"), "{stdout}");
    assert!(stdout.contains("\n[merge]\n6\n"), "{stdout}");
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();

    let (out, stdout, _) = run(cluster.courier().args(["runs"]));
    assert!(out.status.success());
    assert!(
        stdout.contains(&id) && stdout.contains("fanout") && stdout.contains("succeeded"),
        "{stdout}"
    );

    let (out, stdout, _) = run(cluster.courier().args(["runs", &id]));
    assert!(out.status.success());
    assert!(stdout.contains("status    succeeded"), "{stdout}");
    assert!(stdout.contains("merge"), "{stdout}");

    let (out, stdout, _) = run(cluster.courier().args(["runs", "--json", "--status", "succeeded"]));
    assert!(out.status.success());
    let runs: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1);

    // An unknown run is a clear error.
    let (out, _, stderr) = run(cluster.courier().args(["runs", "no-such-run"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr, "error: no run \"no-such-run\"\n");

    // A failed run makes `submit --wait` exit non-zero, naming the error.
    let (out, stdout, stderr) = run(cluster.courier().args(["submit", "broken", "--wait"]));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains(" failed in "), "{stdout}");
    assert!(stdout.contains("[fail] failed: "), "{stdout}");
    // Off a terminal there is no live line: nothing is redrawn.
    assert!(!stderr.contains('\r') && !stderr.contains("done ·"), "{stderr:?}");

    // Paging: each page's last id gives the next page; an unknown cursor is an error.
    let page = |query: &str| {
        let response = reqwest::blocking::get(format!("{}/api/runs?{query}", cluster.api)).unwrap();
        (response.status().as_u16(), response.json::<Value>().unwrap())
    };
    let (_, first) = page("limit=1");
    assert_eq!(first[0]["workflow"], "broken", "{first:#}");
    let (_, second) = page(&format!("limit=1&before={}", first[0]["id"].as_str().unwrap()));
    assert_eq!(second.as_array().unwrap().len(), 1);
    assert_eq!(second[0]["id"], id.as_str(), "{second:#}");
    // A run without agent steps costs nothing, shown as 0.0 (not -0.0).
    let one: Value = reqwest::blocking::get(format!("{}/api/runs/{id}", cluster.api))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(one["cost"].to_string(), "0.0");
    let (_, third) = page(&format!("limit=1&before={id}"));
    assert_eq!(third, serde_json::json!([]));
    let (status, error) = page("before=no-such-run");
    assert_eq!(status, 404);
    assert_eq!(error["error"], "no run \"no-such-run\", given as the before= cursor");
    // A long cursor or run ID is not echoed whole.
    let (status, error) = page(&format!("before={}", "z".repeat(5000)));
    assert_eq!(status, 404);
    assert_eq!(
        error["error"],
        format!(
            "no run \"{}…\" (5000 bytes in all), given as the before= cursor",
            "z".repeat(64)
        )
    );
    let missing: Value = reqwest::blocking::get(format!("{}/api/runs/{}", cluster.api, "y".repeat(3000)))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        missing["error"],
        format!("no run \"{}…\" (3000 bytes in all)", "y".repeat(64))
    );
    let (out, stdout, _) =
        run(cluster
            .courier()
            .args(["runs", "--json", "--before", first[0]["id"].as_str().unwrap()]));
    assert!(out.status.success());
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), second);
}

#[test]
fn submit_wait_on_a_terminal_redraws_a_live_progress_line() {
    let cluster = Cluster::builder().workers(1).start();
    // `script` runs the command on a pseudo-terminal, as a person would.
    let courier = cluster.courier();
    let mut on_tty = std::process::Command::new("script");
    for (key, value) in courier.get_envs() {
        if let Some(value) = value {
            on_tty.env(key, value);
        }
    }
    let line = format!(
        "{} submit fanout --wait -p 'text=a b c'",
        courier.get_program().to_string_lossy()
    );
    let out = on_tty
        .args(["-qec", &line, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("\x1b[2K"),
        "the live line is erased and redrawn in place: {screen:?}"
    );
    assert!(screen.contains("done · "), "{screen:?}");
    assert!(screen.contains("running · "), "{screen:?}");
    assert!(screen.contains("succeeded merge"), "{screen:?}");
    assert!(screen.contains("\n[merge]\n3"), "{screen:?}");
}

#[test]
fn a_worker_given_sigterm_finishes_its_step_and_exits_zero() {
    let yaml = r#"
steps:
  - name: long
    command: ["sh", "-c", "sleep 1.5; echo done"]
"#;
    let mut cluster = Cluster::builder().workers(1).workflow("long", yaml).start();
    let id = cluster.submit("long", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = cluster.terminate_worker("w1");
    assert_eq!(status.code(), Some(0), "{}", cluster.logs());
    // Its result was published and acked before it exited: the run completes
    // with no worker left, and nothing waits for redelivery.
    let run = cluster.wait_run(&id, Duration::from_secs(10));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "long")["attempts"], 1);
    assert_eq!(cluster.queue_depth("default"), 0, "{}", cluster.logs());
}

#[test]
fn a_cron_schedule_fires_runs() {
    // Every second (croner's optional seconds field).
    let yaml = "schedule: \"* * * * * *\"\nsteps:\n  - name: tick\n    echo: tock\n";
    let cluster = Cluster::builder().workers(1).workflow("tick", yaml).start();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let runs: Value = reqwest::blocking::get(format!("{}/api/runs?workflow=tick&status=succeeded", cluster.api))
            .unwrap()
            .json()
            .unwrap();
        if runs.as_array().unwrap().len() >= 2 {
            assert_eq!(
                step(&cluster.run(runs[0]["id"].as_str().unwrap()), "tick")["output"],
                "tock"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled runs: {runs:#}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn settings_layer_file_then_environment_then_flags() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("config");
    crate::support::copy_dir(&crate::support::example_config(), &config);
    std::fs::write(config.join("courier.toml"), "api_url = \"http://127.0.0.1:9\"\n").unwrap();
    let cli = || {
        let mut cmd = crate::support::courier();
        cmd.env("COURIER_CONFIG_DIR", &config).arg("runs");
        cmd
    };
    let (_, _, stderr) = run(&mut cli());
    assert!(
        stderr.contains("cannot reach the scheduler at http://127.0.0.1:9 "),
        "{stderr}"
    );
    let (_, _, stderr) = run(cli().env("COURIER_API_URL", "http://127.0.0.1:10"));
    assert!(stderr.contains("at http://127.0.0.1:10 "), "{stderr}");
    let (_, _, stderr) = run(cli()
        .env("COURIER_API_URL", "http://127.0.0.1:10")
        .args(["--api-url", "http://127.0.0.1:11"]));
    assert!(stderr.contains("at http://127.0.0.1:11 "), "{stderr}");
    // Unknown keys in courier.toml are errors; services exit with EX_CONFIG.
    std::fs::write(config.join("courier.toml"), "amqp_uri = \"amqp://x\"\n").unwrap();
    let mut worker = crate::support::courier();
    worker.env("COURIER_CONFIG_DIR", &config).arg("worker");
    let (out, _, stderr) = run(&mut worker);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("unknown field: found `amqp_uri`"), "{stderr}");
}

/// A step's output and error are anyone's to write: the CLI shows escape
/// sequences in them, never sends them to the terminal.
#[test]
fn escape_sequences_in_a_steps_output_and_error_are_printed_escaped() {
    let cluster = Cluster::builder()
        .workers(1)
        .workflow(
            "esc",
            concat!(
                "steps:\n",
                "  - name: loud\n",
                "    command: [\"sh\", \"-c\", \"printf 'ok\\\\033]0;pwned\\\\007\\\\033[2Jline2\\\\342\\\\200\\\\217'\"]\n",
                "  - name: bad\n",
                "    depends: [loud]\n",
                "    command: [\"sh\", \"-c\", \"printf '\\\\033[31mRED' >&2; exit 3\"]\n",
            ),
        )
        .start();
    let (out, stdout, stderr) = run(cluster.courier().args(["submit", "esc", "--wait"]));
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    let id = stdout.split_whitespace().nth(1).unwrap().to_string();
    let (_, shown, _) = run(cluster.courier().args(["runs", &id]));
    for printed in [&stdout, &shown] {
        assert!(!printed.contains('\u{1b}') && !printed.contains('\u{7}'), "{printed:?}");
    }
    assert!(
        stdout.contains("ok\\u{1b}]0;pwned\\u{7}\\u{1b}[2Jline2\\u{200f}"),
        "{stdout}"
    );
    assert!(stdout.contains("\\u{1b}[31mRED"), "{stdout}");
    // `--json` is JSON, with them escaped as JSON escapes them.
    let (_, json, _) = run(cluster.courier().args(["runs", &id, "--json"]));
    let parsed: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        step(&parsed, "loud")["output"],
        "ok\u{1b}]0;pwned\u{7}\u{1b}[2Jline2\u{200f}"
    );
    // The API keeps them as they were.
    let run_json = cluster.run(&id);
    assert_eq!(
        step(&run_json, "loud")["output"],
        "ok\u{1b}]0;pwned\u{7}\u{1b}[2Jline2\u{200f}"
    );
}

/// A command's output past `output_max_bytes` fails its step, naming the
/// limit, instead of passing a cut output on as the step's (a trailing
/// newline, not part of the output, does not count).
#[test]
fn a_step_writing_more_than_output_max_bytes_fails_naming_the_limit() {
    let cluster = Cluster::builder()
        .workers(1)
        .env("COURIER_OUTPUT_MAX_BYTES", "1000")
        .workflow(
            "big",
            concat!(
                "steps:\n",
                "  - name: fits\n",
                "    command: [\"sh\", \"-c\", \"head -c 1000 /dev/zero | tr '\\\\0' x; echo\"]\n",
                "  - name: over\n",
                "    depends: [fits]\n",
                "    command: [\"sh\", \"-c\", \"head -c 1001 /dev/zero | tr '\\\\0' x\"]\n",
            ),
        )
        .start();
    let id = cluster.submit("big", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(step(&run, "fits")["status"], "succeeded", "{run:#}");
    assert_eq!(step(&run, "fits")["output"].as_str().unwrap().len(), 1000);
    assert_eq!(step(&run, "over")["status"], "failed", "{run:#}");
    let error = step(&run, "over")["error"].as_str().unwrap();
    assert!(error.contains("more than output_max_bytes (1000 bytes)"), "{error}");
}
