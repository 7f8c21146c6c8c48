//! `courier validate`: load a config folder and list every problem.

use std::path::Path;
use std::process::ExitCode;

use courier_config::Config;

pub fn run(dir: &Path) -> anyhow::Result<ExitCode> {
    match Config::load(dir) {
        Ok(config) => {
            let steps: usize = config.workflows.values().map(|w| w.steps.len()).sum();
            println!(
                "{}: ok ({} workflows, {steps} steps, {} models, {} skills, {} souls)",
                dir.display(),
                config.workflows.len(),
                config.store.model_ids().count(),
                courier_config::AgentStore::skill_ids(&config.store).len(),
                config.store.soul_ids().count(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprint!("{errors}");
            Ok(ExitCode::FAILURE)
        }
    }
}
