//! `courier validate`: load a config folder and list every problem, including
//! any step whose snapshot would not fit the size limits.

use std::path::Path;
use std::process::ExitCode;

use courier_config::{AgentStore, Config, ConfigError, ConfigErrors, build_snapshot};
use courier_wire::{Limits, encode};

pub fn run(dir: &Path, limits: Limits) -> anyhow::Result<ExitCode> {
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
        for step in &wf.steps {
            let built = build_snapshot(&config.store, &wf.name, &step.run)
                .map_err(|e| e.to_string())
                .and_then(|snapshot| encode(&snapshot, &limits).map_err(|e| e.to_string()));
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
    let steps: usize = config.workflows.values().map(|w| w.steps.len()).sum();
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
