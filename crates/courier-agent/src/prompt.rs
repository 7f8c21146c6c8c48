//! The system prompt, assembled only from the mounted snapshot: the soul
//! first, then the step's skills (names and descriptions; full text through a
//! tool), then memory marked as read-only context.

use courier_config::{AgentStore, MemoryScope, SnapshotStore};
use courier_wire::AgentSpec;

/// The sentence that marks memory as read-only context.
pub const READ_ONLY_NOTICE: &str = "This memory comes from earlier runs and is read-only context: you cannot change it, \
     and there is no file or store here to write it to.";

/// The system prompt for `spec` over `store`.
pub fn system(store: &SnapshotStore, spec: &AgentSpec) -> String {
    let enabled = |tool: &str| spec.tools.iter().any(|t| t == tool);
    let mut out = String::new();
    if let Some(soul) = &store.snapshot().soul {
        out.push_str(soul.body.trim());
        out.push_str("\n\n");
    }
    if !spec.skills.is_empty() {
        out.push_str("# Skills\n");
        if enabled("read_skill") {
            out.push_str("Only names and descriptions are shown here: read a skill in full with the read_skill tool");
            out.push_str(if enabled("search_skills") {
                " (find one with search_skills).\n"
            } else {
                ".\n"
            });
        }
        for id in &spec.skills {
            if let Ok(skill) = store.skill(id) {
                out.push_str(&format!("- `{id}`: {} — {}\n", skill.name, skill.description));
            }
        }
        out.push('\n');
    }
    if spec.memory {
        out.push_str("# Memory (read-only)\n");
        out.push_str(READ_ONLY_NOTICE);
        if enabled("propose_memory_update") {
            out.push_str(
                " If you learn something worth remembering, propose it with the propose_memory_update tool; \
                 it is reviewed and applied only after this step succeeds.",
            );
        }
        out.push('\n');
        let workflow = store.snapshot().workflow.clone();
        for (title, scope) in [
            ("Global", MemoryScope::Global),
            ("Workflow", MemoryScope::Workflow(&workflow)),
        ] {
            if let Ok(Some(text)) = store.memory(scope) {
                out.push_str(&format!("## {title}\n{}\n", text.trim()));
            }
        }
        out.push('\n');
    }
    out.push_str("# Finishing\n");
    out.push_str(if enabled("output") {
        "When you are done, call the output tool with your final answer.\n"
    } else {
        "When you are done, reply with your final answer.\n"
    });
    out
}
