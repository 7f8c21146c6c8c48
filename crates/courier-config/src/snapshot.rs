//! Building a step's snapshot from the scheduler's store: only what the step
//! references, deterministically.

use std::collections::BTreeMap;

use courier_wire::{Memory, Snapshot, StepRun};

use crate::store::{AgentStore, MemoryScope, StoreError};

/// The snapshot for one step of `workflow`.
///
/// An agent step gets the agent config, its model (or the default model), its
/// skills, its soul, and memory only when it enables it. A command step needs
/// no resources and gets an empty snapshot.
///
/// # Errors
/// [`StoreError::Missing`] naming the kind and ID of a resource that is gone.
pub fn build_snapshot(store: &dyn AgentStore, workflow: &str, run: &StepRun) -> Result<Snapshot, StoreError> {
    let StepRun::Agent(spec) = run else {
        return Ok(Snapshot {
            workflow: workflow.to_string(),
            ..Snapshot::default()
        });
    };
    let agent = store.agent_config()?;
    let model_id = spec.model.clone().unwrap_or_else(|| agent.default_model.clone());
    let models = BTreeMap::from([(model_id.clone(), store.model(&model_id)?)]);
    let skills = spec
        .skills
        .iter()
        .map(|id| Ok((id.clone(), store.skill(id)?)))
        .collect::<Result<_, StoreError>>()?;
    let soul = spec.soul.as_deref().map(|id| store.soul(id)).transpose()?;
    let memory = if spec.memory {
        Some(Memory {
            global: store.memory(MemoryScope::Global)?,
            workflow: store.memory(MemoryScope::Workflow(workflow))?,
        })
    } else {
        None
    };
    Ok(Snapshot {
        workflow: workflow.to_string(),
        agent: Some(agent),
        models,
        skills,
        soul,
        memory,
    })
}
