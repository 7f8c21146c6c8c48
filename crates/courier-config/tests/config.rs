//! Loading and validating config folders, building snapshots, and the stores.
//!
//! Each test copies the repository's example `config/` into a temporary folder
//! and changes what it needs.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use courier_config::{
    AgentStore, Config, ConfigError, FsStore, MemoryScope, ParamError, SnapshotStore, StoreError, build_snapshot,
};
use courier_wire::{AgentSpec, Limits, Snapshot, StepRun, decode, encode};
use tempfile::TempDir;

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of the example config folder.
fn fixture() -> TempDir {
    let dir = TempDir::new().unwrap();
    copy_dir(&example_dir(), dir.path());
    dir
}

/// Drop the example workflows, leaving the agent resources.
fn without_workflows(dir: &TempDir) {
    std::fs::remove_dir_all(dir.path().join("workflows")).unwrap();
    std::fs::create_dir(dir.path().join("workflows")).unwrap();
}

fn write(dir: &TempDir, rel: &str, text: &str) -> PathBuf {
    let path = dir.path().join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// Load and return the error messages, each as displayed.
fn errors(dir: &TempDir) -> Vec<String> {
    match Config::load(dir.path()) {
        Ok(_) => panic!("expected the config to be rejected"),
        Err(e) => {
            e.0.iter()
                .map(|e| e.to_string().replace(&dir.path().display().to_string(), ""))
                .collect()
        }
    }
}

/// A workflow file with the given steps and an error expected in it.
fn workflow_errors(steps_yaml: &str) -> Vec<String> {
    let dir = fixture();
    write(
        &dir,
        "workflows/t.yaml",
        &format!("params:\n  topic: x\nsteps:\n{steps_yaml}"),
    );
    errors(&dir)
}

#[test]
fn example_config_loads() {
    let config = Config::load(&example_dir()).unwrap();
    assert_eq!(
        config.workflows.keys().collect::<Vec<_>>(),
        ["digest", "fanout", "research", "triage"]
    );
    let research = &config.workflows["research"];
    assert_eq!(research.params, BTreeMap::from([("topic".to_string(), None)]));
    assert_eq!(
        config.workflows["digest"].schedule.as_ref().unwrap().pattern,
        "0 7 * * *"
    );
}

#[test]
fn unknown_dependency_is_named() {
    let e = workflow_errors("  - name: a\n    command: [echo]\n    depends: [ghost]\n");
    assert_eq!(
        e,
        ["/workflows/t.yaml:6: step \"a\": field \"depends.0\": unknown step \"ghost\""]
    );
}

#[test]
fn dependency_cycle_is_shown_as_a_path() {
    let e = workflow_errors(
        "  - name: a\n    command: [echo]\n    depends: [c]\n  - name: b\n    command: [echo]\n    depends: [a]\n  - name: c\n    command: [echo]\n    depends: [b]\n",
    );
    assert_eq!(
        e,
        ["/workflows/t.yaml:6: step \"a\": field \"depends\": dependency cycle: a -> c -> b -> a"]
    );
}

#[test]
fn a_cycle_is_reported_alongside_unknown_dependencies_and_templates() {
    let e = workflow_errors(
        "  - name: a\n    command: [echo, \"${c.output}\"]\n    depends: [b, ghost]\n  - name: b\n    command: [echo, \"${nope}\"]\n    depends: [a]\n  - name: c\n    command: [echo]\n    depends: [c]\n",
    );
    assert_eq!(
        e,
        [
            "/workflows/t.yaml:6: step \"a\": field \"depends.1\": unknown step \"ghost\"",
            "/workflows/t.yaml:12: step \"c\": field \"depends.0\": a step cannot depend on itself",
            "/workflows/t.yaml:6: step \"a\": field \"depends\": dependency cycle: a -> b -> a",
            "/workflows/t.yaml:5: step \"a\": field \"command.1\": \"${c.output}\" names a step that is not upstream of \"a\" (add it to depends)",
            "/workflows/t.yaml:8: step \"b\": field \"command.1\": unknown parameter \"nope\" in \"${nope}\"",
        ]
    );
}

#[test]
fn self_dependency_is_refused() {
    let e = workflow_errors("  - name: a\n    command: [echo]\n    depends: [a]\n");
    assert_eq!(
        e,
        ["/workflows/t.yaml:6: step \"a\": field \"depends.0\": a step cannot depend on itself"]
    );
}

#[test]
fn duplicate_step_names_are_refused() {
    let e = workflow_errors("  - name: a\n    command: [echo]\n  - name: a\n    command: [echo]\n");
    assert_eq!(
        e,
        ["/workflows/t.yaml:6: step \"a\": field \"name\": duplicate step name \"a\""]
    );
}

#[test]
fn unknown_model_soul_and_skill_are_named() {
    let e = workflow_errors(
        "  - name: a\n    agent:\n      model: gpt-9\n      soul: pirate\n      skills: [summarize, juggling]\n      prompt: hi\n",
    );
    assert_eq!(
        e,
        [
            "/workflows/t.yaml:6: step \"a\": field \"agent.model\": unknown model \"gpt-9\"",
            "/workflows/t.yaml:7: step \"a\": field \"agent.soul\": unknown soul \"pirate\"",
            "/workflows/t.yaml:8: step \"a\": field \"agent.skills.1\": unknown skill \"juggling\"",
        ]
    );
}

#[test]
fn bad_cron_is_refused() {
    let dir = fixture();
    write(
        &dir,
        "workflows/t.yaml",
        "schedule: \"61 * * * *\"\nsteps:\n  - name: a\n    command: [echo]\n",
    );
    let e = errors(&dir);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("/workflows/t.yaml:1: field \"schedule\": bad cron expression \"61 * * * *\""),
        "{e:?}"
    );
}

#[test]
fn a_scheduled_workflow_needs_defaults_for_every_param() {
    let dir = fixture();
    write(
        &dir,
        "workflows/t.yaml",
        "schedule: \"0 * * * *\"\nparams:\n  who: ~\nsteps:\n  - name: a\n    echo: hi\n",
    );
    assert_eq!(
        errors(&dir),
        [
            "/workflows/t.yaml:1: field \"schedule\": a scheduled run has no one to pass parameters: give \"who\" a default"
        ]
    );
}

#[test]
fn bad_duration_is_refused_with_its_line() {
    let e = workflow_errors("  - name: a\n    command: [echo]\n    timeout: soon\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("/workflows/t.yaml:6: steps[0].timeout: "), "{e:?}");
    assert!(e[0].contains("line 6"), "{e:?}");
}

#[test]
fn a_timeout_beyond_the_maximum_is_refused() {
    let e = workflow_errors("  - name: a\n    command: [echo]\n    timeout: 25h\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].ends_with(
            "step \"a\": field \"timeout\": a timeout may be at most 24h (workers hold the task unacknowledged while it runs)"
        ),
        "{e:?}"
    );
    let dir = fixture();
    write(
        &dir,
        "workflows/t.yaml",
        "steps:\n  - name: a\n    command: [echo]\n    timeout: 24h\n",
    );
    assert!(Config::load(dir.path()).is_ok(), "24h is allowed");
}

#[test]
fn yaml_syntax_error_gives_the_line() {
    let dir = fixture();
    write(
        &dir,
        "workflows/t.yaml",
        "steps:\n  - name: a\n    command: [echo\n  - name: b\n",
    );
    let e = errors(&dir);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("/workflows/t.yaml:4: "), "{e:?}");
}

#[test]
fn bad_ids_are_refused() {
    let e = workflow_errors("  - name: Fetch_Data\n    command: [echo]\n    queue: GPU\n");
    assert_eq!(
        e,
        [
            "/workflows/t.yaml:4: step \"Fetch_Data\": field \"name\": \"Fetch_Data\" is not a valid ID: use lower-case letters, digits and single hyphens (at most 128 characters)",
            "/workflows/t.yaml:6: step \"Fetch_Data\": field \"queue\": \"GPU\" is not a valid ID: use lower-case letters, digits and single hyphens (at most 128 characters)",
        ]
    );
    let dir = fixture();
    write(&dir, "agents/souls/Bad..Soul.md", "---\nname: x\n---\n");
    assert_eq!(
        errors(&dir),
        [
            "/agents/souls/Bad..Soul.md: \"Bad..Soul\" is not a valid ID: use lower-case letters, digits and single hyphens (at most 128 characters)"
        ]
    );
}

#[test]
fn workflow_name_must_match_its_file() {
    let dir = fixture();
    write(
        &dir,
        "workflows/t.yaml",
        "name: other\nsteps:\n  - name: a\n    command: [echo]\n",
    );
    assert_eq!(
        errors(&dir),
        ["/workflows/t.yaml:1: field \"name\": name \"other\" must match the file name \"t.yaml\""]
    );
}

#[test]
fn unknown_field_names_its_step() {
    let e = workflow_errors("  - name: a\n    command: [echo]\n    retries: 3\n");
    assert_eq!(e, ["/workflows/t.yaml:6: step \"a\": field \"retries\": unknown field"]);
}

#[test]
fn a_step_needs_exactly_one_of_command_and_agent() {
    // Neither: the line is the step's, as there is no field to point at.
    let e = workflow_errors("  - name: a\n    timeout: 1s\n");
    assert_eq!(
        e,
        [
            "/workflows/t.yaml:4: step \"a\": field \"command\": a step has exactly one of `command`, `agent`, `echo`, `approval` and `workflow`"
        ]
    );
    let e = workflow_errors("  - name: a\n    command: [echo]\n    agent: {prompt: hi}\n");
    assert_eq!(
        e,
        [
            "/workflows/t.yaml:5: step \"a\": field \"command\": a step has exactly one of `command`, `agent`, `echo`, `approval` and `workflow`"
        ]
    );
}

#[test]
fn templates_must_name_declared_params_and_upstream_steps() {
    let e = workflow_errors(
        "  - name: a\n    command: [echo, \"${nope}\"]\n  - name: b\n    command: [echo, \"${a.output}\", \"${c.output}\"]\n  - name: c\n    command: [echo]\n",
    );
    assert_eq!(
        e,
        [
            "/workflows/t.yaml:5: step \"a\": field \"command.1\": unknown parameter \"nope\" in \"${nope}\"",
            "/workflows/t.yaml:7: step \"b\": field \"command.1\": \"${a.output}\" names a step that is not upstream of \"b\" (add it to depends)",
            "/workflows/t.yaml:7: step \"b\": field \"command.2\": \"${c.output}\" names a step that is not upstream of \"b\" (add it to depends)",
        ]
    );
}

#[test]
fn tools_must_be_allowed_by_the_policy() {
    let dir = fixture();
    without_workflows(&dir);
    write(
        &dir,
        "agents/config.yaml",
        "default_model: local\ntools:\n  allowed: [output]\n",
    );
    write(
        &dir,
        "workflows/t.yaml",
        "steps:\n  - name: a\n    agent:\n      prompt: hi\n      tools: [output, read_memory, shell]\n",
    );
    assert_eq!(
        errors(&dir),
        [
            "/workflows/t.yaml:5: step \"a\": field \"agent.tools.1\": tool \"read_memory\" is not allowed by the agent config's tool policy",
            "/workflows/t.yaml:5: step \"a\": field \"agent.tools.2\": unknown tool \"shell\"; known tools: read_skill, search_skills, read_memory, output, propose_memory_update",
        ]
    );
}

#[test]
fn an_api_key_in_a_model_file_is_refused() {
    let dir = fixture();
    write(
        &dir,
        "agents/models/openai.yaml",
        "provider: openai-compatible\nmodel: gpt-4o\napi_key: sk-live-123\n",
    );
    assert_eq!(
        errors(&dir),
        [
            "/agents/models/openai.yaml:3: field \"api_key\": API keys never go in files: set `api_key_env` to the NAME of an environment variable"
        ]
    );
}

#[test]
fn api_key_env_must_be_a_variable_name() {
    let dir = fixture();
    write(
        &dir,
        "agents/models/openai.yaml",
        "provider: openai-compatible\nmodel: gpt-4o\napi_key_env: sk-live-123\n",
    );
    assert_eq!(
        errors(&dir),
        [
            "/agents/models/openai.yaml:3: field \"api_key_env\": \"sk-live-123\" is not an environment variable name (expected e.g. OPENAI_API_KEY)"
        ]
    );
}

#[test]
fn skill_without_front_matter_is_refused() {
    let dir = fixture();
    write(&dir, "agents/skills/summarize/SKILL.md", "# Just a body\n");
    assert_eq!(
        errors(&dir),
        ["/agents/skills/summarize/SKILL.md: missing YAML front matter (--- name, description ---)"]
    );
}

#[test]
fn unknown_default_model_is_named() {
    let dir = fixture();
    let example = std::fs::read_to_string(example_dir().join("agents/config.yaml")).unwrap();
    write(
        &dir,
        "agents/config.yaml",
        &example.replace("default_model: local", "default_model: gpt-9"),
    );
    assert_eq!(
        errors(&dir),
        ["/agents/config.yaml:3: field \"default_model\": unknown model \"gpt-9\""]
    );
}

#[test]
fn resource_and_workflow_errors_are_reported_in_one_pass() {
    let dir = fixture();
    // A broken soul the research workflow refers to, and a broken workflow.
    write(
        &dir,
        "agents/souls/editor.md",
        "---\nname: Editor\nmood: grumpy\n---\nBody\n",
    );
    write(
        &dir,
        "workflows/t.yaml",
        "steps:\n  - name: a\n    agent: {soul: editor, skills: [ghost], prompt: hi}\n",
    );
    assert_eq!(
        errors(&dir),
        [
            "/agents/souls/editor.md:3: field \"mood\": unknown field",
            // No "unknown soul \"editor\"": it is there, only broken.
            "/workflows/t.yaml:3: step \"a\": field \"agent.skills.0\": unknown skill \"ghost\"",
        ]
    );
    // A config.yaml that does not load: tools are checked only against the known ones.
    write(&dir, "agents/config.yaml", "default_model: [not, a, string]\n");
    write(&dir, "agents/souls/editor.md", "---\nname: Editor\n---\nBody\n");
    write(
        &dir,
        "workflows/t.yaml",
        "steps:\n  - name: a\n    agent: {tools: [output, shell], prompt: hi}\n",
    );
    let e = errors(&dir);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with("/agents/config.yaml:1: default_model: invalid type"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("/workflows/t.yaml:3: step \"a\": field \"agent.tools.1\": unknown tool \"shell\""),
        "{e:?}"
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let dir = fixture();
    write(
        &dir,
        "workflows/t1.yaml",
        "steps:\n  - name: a\n    command: [echo]\n    depends: [x]\n",
    );
    write(&dir, "workflows/t2.yaml", "steps:\n  - name: a\n    command: []\n");
    let e = errors(&dir);
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn params_merge_defaults_and_refuse_unknown_or_missing() {
    let config = Config::load(&example_dir()).unwrap();
    let research = &config.workflows["research"];
    let given = BTreeMap::from([("topic".to_string(), "queues".to_string())]);
    assert_eq!(research.resolve_params(&given).unwrap(), given);
    assert_eq!(
        research.resolve_params(&BTreeMap::new()).unwrap_err(),
        ParamError::Missing {
            workflow: "research".into(),
            param: "topic".into()
        }
    );
    let err = research
        .resolve_params(&BTreeMap::from([("topik".to_string(), "x".to_string())]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "workflow \"research\" has no parameter \"topik\" (it has: topic)"
    );
}

#[test]
fn resolve_substitutes_params_and_upstream_outputs() {
    let config = Config::load(&example_dir()).unwrap();
    let research = &config.workflows["research"];
    let params = BTreeMap::from([("topic".to_string(), "queues".to_string())]);
    let outputs = BTreeMap::from([("gather".to_string(), "NOTES".to_string())]);
    let spec = research
        .step("analyze")
        .unwrap()
        .resolve(&courier_config::template::Values::new(&params, &outputs, None), 1 << 20)
        .unwrap();
    let StepRun::Agent(agent) = spec.run else {
        panic!("agent step")
    };
    assert_eq!(agent.prompt, "Research \"queues\". Start from these notes:\nNOTES\n");
}

#[test]
fn a_command_the_kernel_could_not_start_is_refused_when_resolved() {
    let dir = fixture();
    write(
        &dir,
        "workflows/big.yaml",
        "params:\n  a: x\n  b: x\nsteps:\n  - name: s\n    command: [\"echo\", \"${a}\", \"${a}\"]\n    env:\n      B: \"${b}\"\n",
    );
    let config = Config::load(dir.path()).unwrap();
    let step = config.workflows["big"].step("s").unwrap();
    let resolve = |a: usize, b: usize| {
        let params = BTreeMap::from([("a".to_string(), "x".repeat(a)), ("b".to_string(), "y".repeat(b))]);
        step.resolve(
            &courier_config::template::Values::new(&params, &BTreeMap::new(), None),
            8 << 20,
        )
        .map(|_| ())
    };
    // At the kernel's limit for one string, it passes.
    assert_eq!(resolve(131_071, 131_069), Ok(()));
    // A NUL byte cannot be passed at all.
    let nul = |a: &str, b: &str| {
        let params = BTreeMap::from([("a".to_string(), a.to_string()), ("b".to_string(), b.to_string())]);
        step.resolve(
            &courier_config::template::Values::new(&params, &BTreeMap::new(), None),
            8 << 20,
        )
        .map(|_| ())
    };
    assert_eq!(
        nul("x\0y", "z").unwrap_err(),
        "argument 1 of the command holds a NUL byte once substituted, which a process argument cannot"
    );
    assert_eq!(
        nul("x", "\0").unwrap_err(),
        "environment variable B of the command holds a NUL byte once substituted, which a variable cannot"
    );
    assert_eq!(
        resolve(131_072, 1).unwrap_err(),
        "argument 1 of the command is 131072 bytes once substituted; a process argument holds at most 131071 (Linux's MAX_ARG_STRLEN)"
    );
    assert_eq!(
        resolve(1, 131_070).unwrap_err(),
        "environment variable B of the command is 131072 bytes once substituted; one variable holds at most 131071"
    );
    // Each string under the limit, all of them together over the total.
    let params = BTreeMap::from([("a".to_string(), "x".repeat(100_000)), ("b".to_string(), "y".into())]);
    let many = format!(
        "params:\n  a: x\nsteps:\n  - name: s\n    command: [{}]\n",
        ["\"${a}\""; 11].join(", ")
    );
    write(&dir, "workflows/many.yaml", &many);
    let config = Config::load(dir.path()).unwrap();
    let err = config.workflows["many"]
        .step("s")
        .unwrap()
        .resolve(
            &courier_config::template::Values::new(&params, &BTreeMap::new(), None),
            8 << 20,
        )
        .unwrap_err();
    assert_eq!(
        err,
        "the command's arguments and environment are 1100011 bytes once substituted, more than 1048576"
    );
}

// --- snapshots ---------------------------------------------------------------

fn step_run(config: &Config, workflow: &str, step: &str) -> StepRun {
    config.workflows[workflow].step(step).unwrap().run.clone()
}

#[test]
fn snapshot_holds_only_what_the_step_references() {
    let config = Config::load(&example_dir()).unwrap();
    // research/write: soul editor, skill outline, default model, no memory.
    let s = build_snapshot(&config.store, "research", &step_run(&config, "research", "write")).unwrap();
    assert_eq!(s.models.keys().collect::<Vec<_>>(), ["local"]);
    assert_eq!(s.skills.keys().collect::<Vec<_>>(), ["outline"]);
    assert_eq!(s.soul.as_ref().unwrap().id, "editor");
    assert_eq!(s.memory, None);
    // research/analyze enables memory: global plus this workflow's only.
    let s = build_snapshot(&config.store, "research", &step_run(&config, "research", "analyze")).unwrap();
    let memory = s.memory.unwrap();
    assert!(memory.global.unwrap().contains("short answers"));
    assert!(memory.workflow.unwrap().contains("quorum queues"));
    assert_eq!(s.soul.unwrap().id, "researcher");
    assert_eq!(s.skills.keys().collect::<Vec<_>>(), ["cite-sources", "summarize"]);
    // A command step carries nothing.
    let s = build_snapshot(&config.store, "fanout", &step_run(&config, "fanout", "split")).unwrap();
    assert_eq!(
        s,
        Snapshot {
            workflow: "fanout".into(),
            ..Snapshot::default()
        }
    );
}

#[test]
fn snapshot_of_a_missing_resource_names_it() {
    let config = Config::load(&example_dir()).unwrap();
    for (spec, expected) in [
        (
            AgentSpec {
                model: Some("gone".into()),
                ..AgentSpec::default()
            },
            "unknown model \"gone\"",
        ),
        (
            AgentSpec {
                soul: Some("gone".into()),
                ..AgentSpec::default()
            },
            "unknown soul \"gone\"",
        ),
        (
            AgentSpec {
                skills: vec!["summarize".into(), "gone".into()],
                ..AgentSpec::default()
            },
            "unknown skill \"gone\"",
        ),
    ] {
        let err = build_snapshot(&config.store, "research", &StepRun::Agent(spec)).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
}

#[test]
fn snapshot_rebuilds_are_byte_identical() {
    let a = Config::load(&example_dir()).unwrap();
    let b = Config::load(fixture().path()).unwrap();
    let run = step_run(&a, "research", "analyze");
    let bytes_a = encode(&build_snapshot(&a.store, "research", &run).unwrap(), &Limits::default()).unwrap();
    let bytes_b = encode(&build_snapshot(&b.store, "research", &run).unwrap(), &Limits::default()).unwrap();
    assert_eq!(bytes_a, bytes_b);
}

#[test]
fn a_model_travels_with_the_name_of_its_key_variable_only() {
    // The process-level proof (key set in the environment, bytes scanned) is
    // tests/it/cli.rs; here: the model definition holds a name, not a value.
    let dir = fixture();
    without_workflows(&dir);
    write(
        &dir,
        "agents/config.yaml",
        "default_model: openai\ntools:\n  allowed: [output]\n",
    );
    let config = Config::load(dir.path()).unwrap();
    let run = StepRun::Agent(AgentSpec {
        max_iterations: 1,
        ..AgentSpec::default()
    });
    let snapshot = build_snapshot(&config.store, "research", &run).unwrap();
    assert_eq!(snapshot.models["openai"].api_key_env.as_deref(), Some("OPENAI_API_KEY"));
    let decoded: Snapshot = decode(&encode(&snapshot, &Limits::default()).unwrap(), &Limits::default()).unwrap();
    assert_eq!(decoded, snapshot);
}

// --- stores ------------------------------------------------------------------

#[test]
fn snapshot_store_reads_and_refuses_every_write() {
    let config = Config::load(&example_dir()).unwrap();
    let snapshot = build_snapshot(&config.store, "research", &step_run(&config, "research", "analyze")).unwrap();
    let store = SnapshotStore::new(snapshot);
    assert_eq!(store.skill("summarize").unwrap().name, "Summarize");
    assert_eq!(store.soul("researcher").unwrap().name, "Researcher");
    assert!(store.memory(MemoryScope::Workflow("research")).unwrap().is_some());
    assert_eq!(
        store.skill("outline").unwrap_err().to_string(),
        "skill \"outline\" is not in this step's snapshot"
    );
    for scope in [MemoryScope::Global, MemoryScope::Workflow("research")] {
        let err = store.append_memory(scope, "- new fact\n").unwrap_err();
        assert!(matches!(err, StoreError::ReadOnly { .. }));
        assert!(err.to_string().starts_with("read-only store: cannot write "), "{err}");
    }
}

#[test]
fn snapshot_store_without_memory_says_so() {
    let config = Config::load(&example_dir()).unwrap();
    let snapshot = build_snapshot(&config.store, "research", &step_run(&config, "research", "write")).unwrap();
    let store = SnapshotStore::new(snapshot);
    assert_eq!(
        store.memory(MemoryScope::Global).unwrap_err().to_string(),
        "memory \"MEMORY.md\" is not in this step's snapshot"
    );
}

#[test]
fn fs_store_appends_memory_to_disk() {
    let dir = fixture();
    let store = FsStore::load(&dir.path().join("agents")).unwrap();
    store
        .append_memory(MemoryScope::Workflow("fanout"), "- counted words\n")
        .unwrap();
    store.append_memory(MemoryScope::Global, "- learned\n").unwrap();
    let on_disk = std::fs::read_to_string(dir.path().join("agents/memory/workflows/fanout/MEMORY.md")).unwrap();
    assert_eq!(on_disk, "- counted words\n");
    let global = std::fs::read_to_string(dir.path().join("agents/memory/MEMORY.md")).unwrap();
    assert!(global.ends_with("short answers with sources.\n- learned\n"), "{global}");
    assert_eq!(store.memory(MemoryScope::Global).unwrap().unwrap(), global);
}

#[test]
fn fs_store_refuses_a_proposal_or_an_append_over_its_bound_and_takes_one_up_to_it() {
    use courier_config::{MAX_MEMORY_BYTES, MAX_PROPOSAL_BYTES};
    let dir = fixture();
    let store = FsStore::load(&dir.path().join("agents")).unwrap();
    let path = dir.path().join("agents/memory/workflows/fanout/MEMORY.md");
    let scope = MemoryScope::Workflow("fanout");
    let err = store
        .append_memory(scope, &"é".repeat(MAX_PROPOSAL_BYTES / 2 + 1))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ProposalTooLarge { size } if size == MAX_PROPOSAL_BYTES + 2),
        "{err}"
    );
    assert!(!path.exists(), "nothing written");
    // Filled to exactly its bound, one proposal at most at a time.
    let proposal = "m".repeat(MAX_PROPOSAL_BYTES - 1) + "\n";
    for _ in 0..MAX_MEMORY_BYTES / MAX_PROPOSAL_BYTES {
        store.append_memory(scope, &proposal).unwrap();
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, MAX_MEMORY_BYTES);
    let err = store.append_memory(scope, "x").unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "memory of workflow \"fanout\" would hold {} bytes with this proposal, at most {MAX_MEMORY_BYTES}: \
             not written (trim ",
            MAX_MEMORY_BYTES + 1
        )),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, MAX_MEMORY_BYTES);
    // What is on disk still loads: the scheduler starts again.
    let again = FsStore::load(&dir.path().join("agents")).unwrap();
    assert_eq!(again.memory(scope).unwrap().unwrap().len(), MAX_MEMORY_BYTES);
}

#[test]
fn config_error_display_names_file_line_step_and_field() {
    let e = ConfigError {
        file: "w.yaml".into(),
        line: Some(3),
        step: Some("a".into()),
        field: Some("timeout".into()),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "w.yaml:3: step \"a\": field \"timeout\": bad");
}

#[test]
fn files_that_are_not_regular_or_too_large_are_refused_by_name() {
    let dir = fixture();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("workflows/zero.yaml")).unwrap();
    let fifo = dir.path().join("workflows/fifo.yaml");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    write(
        &dir,
        "workflows/huge.yaml",
        &"#".repeat(courier_config::files::MAX_FILE_BYTES as usize + 1),
    );
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("agents/souls/zero.md")).unwrap();
    assert_eq!(
        errors(&dir),
        [
            "/agents/souls/zero.md: not a regular file (a device): refusing to read it",
            "/workflows/fifo.yaml: not a regular file (a FIFO): refusing to read it",
            "/workflows/huge.yaml: larger than 2097152 bytes: refusing to read it",
            "/workflows/zero.yaml: not a regular file (a device): refusing to read it",
        ]
    );
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let dir = fixture();
    // Flow and block nesting, in a field and under an unknown key.
    let flow = format!(
        "steps:\n  - name: a\n    command: {}{}\n",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    write(&dir, "workflows/flow.yaml", &flow);
    let block = format!(
        "steps:\n  - name: a\n    echo: hi\n    extra:\n      {}x\n",
        "- ".repeat(50_000)
    );
    write(&dir, "workflows/block.yaml", &block);
    // Brackets inside quotes and comments are text, not nesting.
    let quoted = format!(
        "steps:\n  - name: a  # {}\n    command: [\"{}\", '{}']\n",
        "[".repeat(100),
        "[".repeat(100),
        "{".repeat(100)
    );
    write(&dir, "workflows/quoted.yaml", &quoted);
    let started = std::time::Instant::now();
    assert_eq!(
        errors(&dir),
        [
            "/workflows/block.yaml:5: nested deeper than 64 levels: refusing to parse it",
            "/workflows/flow.yaml:3: nested deeper than 64 levels: refusing to parse it",
        ]
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn thousands_of_errors_are_counted_and_the_first_hundred_located_quickly() {
    let dir = fixture();
    let mut yaml = String::from("steps:\n");
    for i in 0..4000 {
        yaml.push_str(&format!(
            "  - name: s{i}\n    depends: [nope{i}]\n    command: [echo]\n"
        ));
    }
    write(&dir, "workflows/many.yaml", &yaml);
    let started = std::time::Instant::now();
    let Err(errors) = Config::load(dir.path()) else {
        panic!("accepted")
    };
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((errors.0.len(), errors.1), (100, 3900));
    assert_eq!(errors.0[99].line, Some(300));
    let shown = errors.to_string();
    assert!(shown.starts_with("4000 errors in the configuration:\n"), "{shown}");
    assert!(
        shown.ends_with("  ... and 3900 more (the first 100 are shown)\n"),
        "{shown}"
    );
}

#[test]
fn a_base_url_that_carries_credentials_is_refused() {
    for (url, expected) in [
        (
            "http://user:sk-secret@example.com/v1",
            "a base_url must not carry credentials",
        ),
        (
            "https://example.com/v1?api_key=sk-secret",
            "a base_url must not carry credentials",
        ),
        (
            "ftp://example.com/v1",
            "\"ftp://example.com/v1\" is not an http or https URL",
        ),
        ("not a url", "\"not a url\" is not a URL"),
    ] {
        let dir = fixture();
        write(
            &dir,
            "agents/models/local.yaml",
            &format!("provider: ollama\nmodel: qwen2.5:0.5b\nbase_url: \"{url}\"\n"),
        );
        let found = errors(&dir);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("/agents/models/local.yaml:3: field \"base_url\": ") && found[0].contains(expected),
            "{url}: {found:?}"
        );
    }
}

#[test]
fn run_control_fields_are_checked_and_named() {
    let dir = fixture();
    without_workflows(&dir);
    write(
        &dir,
        "workflows/t.yaml",
        "timeout: 0s\nbudget: {tokens: 0, cost: -1}\nmax_active_runs: 0\nmax_active_steps: 0\nsteps:\n  - name: a\n    echo: hi\n",
    );
    write(
        &dir,
        "agents/models/openai.yaml",
        "provider: openai-compatible\nmodel: gpt-4o\npricing: {input_per_mtok: -0.5, output_per_mtok: .nan}\nlimits: {concurrency: 0, requests_per_minute: 0, tokens_per_minute: 0}\n",
    );
    let errors = errors(&dir);
    let mut fields: Vec<&str> = errors
        .iter()
        .map(|e| {
            e.split("field \"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or(e)
        })
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "budget.cost",
            "budget.tokens",
            "limits.concurrency",
            "limits.requests_per_minute",
            "limits.tokens_per_minute",
            "max_active_runs",
            "max_active_steps",
            "pricing.input_per_mtok",
            "pricing.output_per_mtok",
            "timeout",
        ],
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.ends_with("field \"max_active_runs\": a limit must be at least 1 (leave it out for none)")),
        "{errors:#?}"
    );
    // Unknown keys inside the new maps are refused too.
    let dir = fixture();
    without_workflows(&dir);
    write(
        &dir,
        "workflows/t.yaml",
        "budget: {dollars: 3}\nsteps:\n  - name: a\n    echo: hi\n",
    );
    let unknown = self::errors(&dir);
    assert!(unknown.iter().any(|e| e.contains("dollars")), "{unknown:#?}");
}

#[test]
fn run_control_fields_load() {
    let dir = fixture();
    without_workflows(&dir);
    write(
        &dir,
        "workflows/t.yaml",
        "timeout: 10m\nbudget: {tokens: 5000, cost: 0.25}\nmax_active_runs: 2\nmax_active_steps: 8\nsteps:\n  - name: a\n    echo: hi\n",
    );
    write(
        &dir,
        "agents/models/openai.yaml",
        "provider: openai-compatible\nmodel: gpt-4o\npricing: {input_per_mtok: 2.5, output_per_mtok: 10}\nlimits: {concurrency: 4, tokens_per_minute: 30000}\n",
    );
    let config = Config::load(dir.path()).unwrap();
    let wf = &config.workflows["t"];
    assert_eq!(wf.timeout, Some(std::time::Duration::from_secs(600)));
    assert_eq!((wf.budget.tokens, wf.budget.cost), (Some(5000), Some(0.25)));
    assert_eq!((wf.max_active_runs, wf.max_active_steps), (Some(2), Some(8)));
    use courier_config::AgentStore as _;
    let model = config.store.model("openai").unwrap();
    assert_eq!(model.pricing.unwrap().cost(1_000_000, 100_000), 3.5);
    assert_eq!(
        (
            model.limits.concurrency,
            model.limits.requests_per_minute,
            model.limits.tokens_per_minute
        ),
        (Some(4), None, Some(30000))
    );
}

#[test]
fn a_retry_backoff_over_a_day_is_refused() {
    let errors = workflow_errors("  - name: a\n    retry: {limit: 1, backoff: 1s, max_backoff: 48h}\n    echo: hi\n");
    assert_eq!(
        errors,
        ["/workflows/t.yaml:5: step \"a\": field \"retry.max_backoff\": max_backoff may be at most 24h"]
    );
}

#[test]
fn an_approval_step_is_checked() {
    let errors = workflow_errors(
        "  - name: a\n    approval: {message: ok?, timeout: 0s}\n    retry: {limit: 1}\n  - name: b\n    approval: {message: ok?}\n    echo: also\n  - name: c\n    approval: {message: \"ship ${nope.output}?\"}\n",
    );
    assert!(
        errors.iter().any(|e| e.contains(
            "step \"a\": field \"approval.timeout\": an approval's timeout must be above zero and at most 30 days"
        )),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("step \"a\": field \"retry\": an approval step is decided once: no retry")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains(
            "step \"b\": field \"command\": a step has exactly one of `command`, `agent`, `echo`, `approval` and `workflow`"
        )),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("step \"c\"") && e.contains("nope")),
        "{errors:#?}"
    );
}

#[test]
fn foreach_fields_are_checked() {
    let errors = workflow_errors(
        "  - name: plan\n    echo: '[1]'\n  - name: a\n    depends: [plan]\n    foreach: '${plan.json.files}'\n    max_concurrent: 0\n    max_items: 200000\n    echo: '${item.path} ${index}'\n  - name: b\n    max_concurrent: 2\n    echo: '${item}'\n  - name: c\n    foreach: '${other.json}'\n    echo: x\n  - name: item\n    echo: x\n  - name: d\n    foreach: '[1]'\n    approval: {message: ok?}\n",
    );
    for expected in [
        "/workflows/t.yaml:9: step \"a\": field \"max_concurrent\": must be from 1 to 10000",
        "/workflows/t.yaml:10: step \"a\": field \"max_items\": must be from 1 to 100000",
        "/workflows/t.yaml:13: step \"b\": field \"max_concurrent\": applies to foreach steps only",
        "/workflows/t.yaml:14: step \"b\": field \"echo\": \"${item}\" is only known in the fields of a foreach step",
        "/workflows/t.yaml:16: step \"c\": field \"foreach\": \"${other.json}\" names a step that is not upstream of \"c\" (add it to depends)",
        "/workflows/t.yaml:18: step \"item\": field \"name\": \"item\" is reserved for foreach items",
        "/workflows/t.yaml:21: step \"d\": field \"foreach\": an approval step cannot be a foreach",
    ] {
        assert!(
            errors.iter().any(|e| e == expected),
            "missing {expected}\nin {errors:#?}"
        );
    }
    assert!(
        !errors.iter().any(|e| e.contains("step \"a\": field \"echo\"")),
        "{errors:#?}"
    );
}

#[test]
fn when_conditions_are_parsed_and_checked_at_load() {
    let errors = workflow_errors(
        "  - name: plan\n    echo: x\n  - name: a\n    depends: [plan]\n    when: steps.plan.json.n >\n    echo: x\n  - name: b\n    when: steps.plan.output == 'x'\n    echo: x\n  - name: c\n    when: params.nope == 'x' || env.HOME == ''\n    echo: x\n  - name: d\n    depends: [plan]\n    when: params.topic == 'x' && steps.plan.json.n > 1\n    depends_on_skipped: run\n    echo: x\n",
    );
    let has = |prefix: &str, text: &str| errors.iter().any(|e| e.starts_with(prefix) && e.contains(text));
    assert!(
        has(
            "/workflows/t.yaml:8: step \"a\": field \"when\": ",
            "not a CEL expression: 1:20: Syntax error"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            "/workflows/t.yaml:11: step \"b\": field \"when\": ",
            "steps.plan names a step that is not upstream of \"b\" (add it to depends)"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            "/workflows/t.yaml:14: step \"c\": field \"when\": ",
            "unknown name \"env\""
        ),
        "{errors:#?}"
    );
    assert!(!errors.iter().any(|e| e.contains("step \"d\"")), "{errors:#?}");
}

#[test]
fn sub_workflow_steps_are_checked_against_the_workflows_they_start() {
    let dir = fixture();
    write(
        &dir,
        "workflows/outer.yaml",
        "steps:\n  - name: a\n    workflow: {name: nope}\n  - name: b\n    workflow: {name: inner, params: {extra: x}}\n",
    );
    write(
        &dir,
        "workflows/retrying.yaml",
        "steps:\n  - name: c\n    workflow: {name: inner, params: {topic: x}}\n    retry: {limit: 1}\n",
    );
    write(
        &dir,
        "workflows/inner.yaml",
        "params: {topic: ~}\nsteps:\n  - name: back\n    workflow: {name: outer}\n",
    );
    let errors = errors(&dir);
    for expected in [
        "/workflows/outer.yaml:3: step \"a\": field \"workflow.name\": unknown workflow \"nope\"",
        "/workflows/outer.yaml:5: step \"b\": field \"workflow.params.extra\": workflow \"inner\" has no parameter \"extra\"",
        "/workflows/outer.yaml:5: step \"b\": field \"workflow.params\": workflow \"inner\" needs parameter \"topic\"",
        "/workflows/retrying.yaml:4: step \"c\": field \"retry\": a sub-workflow step is not retried: retry its steps",
        "/workflows/inner.yaml:4: step \"back\": field \"workflow.name\": sub-workflow cycle: inner -> outer -> inner",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "missing {expected}\nin {errors:#?}"
        );
    }
}

#[test]
fn a_workflow_whose_sub_workflows_would_start_too_many_runs_is_refused_at_load() {
    let dir = fixture();
    // w0 starts ten w1, each ten w2, each ten w3: 1 + 10 + 100 + 1,000 runs.
    let ten = |child: &str| {
        (0..10)
            .map(|i| format!("  - name: s{i}\n    workflow: {{name: {child}}}\n"))
            .collect::<String>()
    };
    write(&dir, "workflows/w0.yaml", &format!("steps:\n{}", ten("w1")));
    write(&dir, "workflows/w1.yaml", &format!("steps:\n{}", ten("w2")));
    write(&dir, "workflows/w2.yaml", &format!("steps:\n{}", ten("w3")));
    write(&dir, "workflows/w3.yaml", "steps:\n  - name: leaf\n    echo: x\n");
    let errors = errors(&dir);
    let too_many: Vec<&String> = errors.iter().filter(|e| e.contains("runs in all")).collect();
    assert_eq!(too_many.len(), 1, "{errors:#?}");
    assert!(
        too_many[0].ends_with(
            "/workflows/w0.yaml: a run of workflow \"w0\" would start 1111 runs in all through its sub-workflows \
             (each `workflow:` step starts a run, which starts its own); at most 1000"
        ),
        "{too_many:#?}"
    );
    // One level less (111 runs) loads.
    std::fs::remove_file(dir.path().join("workflows/w0.yaml")).unwrap();
    Config::load(dir.path()).unwrap();
}

#[test]
fn a_long_chain_of_steps_is_checked_without_recursion_and_a_workflow_has_at_most_its_steps() {
    use courier_config::MAX_STEPS;
    let chain = |n: usize, back_to_start: bool| {
        let mut yaml = String::from("steps:\n  - name: s0\n    echo: x\n");
        for i in 1..n {
            // Each reads its dependency's output; the last one also reads the first's.
            let extra = if i == n - 1 { " ${s0.output}" } else { "" };
            yaml.push_str(&format!(
                "  - name: s{i}\n    depends: [s{}]\n    echo: '${{s{}.output}}{extra}'\n",
                i - 1,
                i - 1
            ));
        }
        if back_to_start {
            yaml = yaml.replacen(
                "  - name: s0\n",
                &format!("  - name: s0\n    depends: [s{}]\n", n - 1),
                1,
            );
        }
        yaml
    };
    // Run on a thread with a small stack: a recursive search overflowed it.
    let checked = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(move || {
            let dir = fixture();
            write(&dir, "workflows/chain.yaml", &chain(MAX_STEPS, false));
            Config::load(dir.path()).unwrap();
            write(&dir, "workflows/chain.yaml", &chain(MAX_STEPS, true));
            let cycle = errors(&dir);
            assert!(
                cycle
                    .iter()
                    .any(|e| e.contains("dependency cycle: s0 -> s19999 -> s19998")),
                "{:?}",
                &cycle[..cycle.len().min(3)]
            );
            write(&dir, "workflows/chain.yaml", &chain(MAX_STEPS + 1, false));
            errors(&dir)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(
        checked,
        ["/workflows/chain.yaml: 20001 steps: a workflow has at most 20000 (a foreach step runs any number of items)"]
    );
}

#[test]
fn an_output_schema_is_checked_at_load() {
    let errors = workflow_errors(
        "  - name: a\n    agent:\n      prompt: p\n      tools: [output]\n      output_schema: {type: string}\n  - name: b\n    agent:\n      prompt: p\n      tools: [read_skill]\n      output_schema: {type: object}\n  - name: c\n    agent:\n      prompt: p\n      tools: [output]\n      output_schema: {type: object, properties: {x: {type: 12}}}\n",
    );
    let has = |step: &str, text: &str| {
        errors
            .iter()
            .any(|e| e.contains(&format!("step \"{step}\": field \"agent.output_schema\": {text}")))
    };
    assert!(has("a", "the schema must describe an object"), "{errors:#?}");
    assert!(
        has("b", "a structured output is given through the output tool"),
        "{errors:#?}"
    );
    assert!(has("c", "not a valid JSON Schema"), "{errors:#?}");
}

#[test]
fn sub_workflows_nesting_deeper_than_a_run_may_start_them_are_refused_at_load() {
    let dir = fixture();
    // n0 -> n1 -> ... -> n9: nine levels below n0, one more than runs may go.
    for i in 0..10 {
        let steps = if i < 9 {
            format!("steps:\n  - name: k\n    workflow: {{name: n{}}}\n", i + 1)
        } else {
            "steps:\n  - name: k\n    echo: deep\n".to_string()
        };
        write(&dir, &format!("workflows/n{i}.yaml"), &steps);
    }
    let errors = errors(&dir);
    let deep: Vec<_> = errors.iter().filter(|e| e.contains("nest")).collect();
    assert_eq!(deep.len(), 1, "{errors:#?}");
    assert!(
        deep[0].ends_with(
            "sub-workflows of workflow \"n0\" nest 9 deep (n0 -> n1 -> n2 -> n3 -> n4 -> n5 -> n6 -> n7 -> n8 -> n9); at most 8"
        ),
        "{errors:#?}"
    );
    // Eight levels load.
    std::fs::remove_file(dir.path().join("workflows/n0.yaml")).unwrap();
    Config::load(dir.path()).unwrap();
}
