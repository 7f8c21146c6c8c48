//! `courier validate`: load a config folder and list every problem, including
//! any step whose snapshot, or whose task with the parameters' defaults,
//! would not fit the size limits.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use courier_config::template::Values;
use courier_config::{AgentStore, Config, ConfigError, ConfigErrors, Step, Workflow, build_snapshot};
use courier_wire::{Limits, Task, encode};

pub fn run(dir: &Path, limits: Limits, task_limits: Limits) -> anyhow::Result<ExitCode> {
    let config = match Config::load(dir) {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // Build every step's snapshot as a submit would, with today's resources.
    let mut errors = Vec::new();
    let mut largest: Option<(usize, String)> = None;
    for wf in config.workflows.values() {
        for step in wf.steps() {
            let built = build_snapshot(&config.store, &wf.name, &step.run)
                .map_err(|e| e.to_string())
                .and_then(|snapshot| encode(&snapshot, &limits).map_err(|e| e.to_string()))
                .and_then(|bytes| task_with_defaults(wf, step, bytes, &task_limits));
            match built {
                Ok(bytes) if largest.as_ref().is_none_or(|(n, _)| bytes.len() > *n) => {
                    largest = Some((bytes.len(), format!("{}/{}", wf.name, step.name)));
                }
                Ok(_) => {}
                Err(e) => errors.push(ConfigError::file(&wf.file, e).step(&step.name)),
            }
        }
    }
    if !errors.is_empty() {
        eprint!("{}", ConfigErrors::located(errors));
        return Ok(ExitCode::FAILURE);
    }
    let steps: usize = config.workflows.values().map(|w| w.steps().len()).sum();
    println!(
        "{}: ok ({} workflows, {steps} steps, {} models, {} skills, {} souls)",
        dir.display(),
        config.workflows.len(),
        config.store.model_ids().count(),
        config.store.skill_ids().len(),
        config.store.soul_ids().count(),
    );
    if let Some((bytes, step)) = largest {
        println!(
            "largest snapshot: {step}, {bytes} bytes (limit {})",
            limits.max_compressed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Encode the step's task as a submit with every parameter's default would
/// (required ones and upstream outputs empty), so a default too large for the
/// task limits is found here rather than at every submit. The snapshot bytes
/// pass through.
fn task_with_defaults(wf: &Workflow, step: &Step, snapshot: Vec<u8>, limits: &Limits) -> Result<Vec<u8>, String> {
    let params: BTreeMap<String, String> = wf
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
        .collect();
    let outputs = BTreeMap::new();
    let spec = step
        .resolve(&Values::lenient(&params, &outputs), limits.max_decompressed)
        .map_err(|e| format!("with its parameters' defaults: {e}"))?;
    let task = Task {
        task_id: uuid::Uuid::nil(),
        run_id: uuid::Uuid::nil(),
        workflow: wf.name.clone(),
        step: step.name.clone(),
        attempt: 1,
        spec,
        upstream: BTreeMap::new(),
        deadline_unix_ms: 0,
        snapshot,
        pool: step.queue.clone(),
    };
    match encode(&task, limits) {
        Ok(_) => Ok(task.snapshot),
        Err(e) => Err(format!(
            "with its parameters' defaults, the step's task is over the task limits: {e}"
        )),
    }
}
