//! The agent's tools, over the read-only store mounted from the snapshot.
//!
//! Tools are offered per step (within the agent config's policy, checked at
//! load). Any attempt to write through the store is refused with the store's
//! read-only error, which the model sees as the tool's answer.

use courier_config::{AgentStore, MAX_PROPOSAL_BYTES, MAX_PROPOSALS, MemoryScope, SnapshotStore};
use courier_wire::{MemoryTarget, MemoryUpdate};
use serde_json::{Value, json};

use crate::provider::{ToolCall, ToolSpec};

/// Largest tool answer handed back to the model.
const MAX_ANSWER: usize = 32 * 1024;

/// The tool that gives the final answer.
pub const OUTPUT: &str = "output";

/// The specs of the tools enabled for a step, in the order given.
/// The enabled tools' specs; with an output schema, the `output` tool takes
/// the schema as its parameters.
pub fn specs(enabled: &[String], output_schema: Option<&str>) -> Vec<ToolSpec> {
    let schema = output_schema.and_then(|s| serde_json::from_str::<Value>(s).ok());
    enabled
        .iter()
        .filter_map(|name| spec(name))
        .map(|mut spec| {
            if let (OUTPUT, Some(schema)) = (spec.name, &schema) {
                spec.description =
                    "Give your final answer, as an object matching these parameters. This ends the step.";
                spec.parameters = schema.clone();
            }
            spec
        })
        .collect()
}

fn spec(name: &str) -> Option<ToolSpec> {
    let scope = json!({"type": "string", "enum": ["global", "workflow"]});
    Some(match name {
        "read_skill" => ToolSpec {
            name: "read_skill",
            description: "Read the full text of one of your skills.",
            parameters: json!({"type": "object", "properties": {"id": {"type": "string", "description": "the skill's id"}}, "required": ["id"]}),
        },
        "search_skills" => ToolSpec {
            name: "search_skills",
            description: "Find skills whose name, description, tags or text match the query.",
            parameters: json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
        },
        "read_memory" => ToolSpec {
            name: "read_memory",
            description: "Read memory (read-only): global, this workflow's, or both when no scope is given.",
            parameters: json!({"type": "object", "properties": {"scope": scope}}),
        },
        "output" => ToolSpec {
            name: "output",
            description: "Give your final answer. This ends the step.",
            parameters: json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
        },
        "propose_memory_update" => ToolSpec {
            name: "propose_memory_update",
            description: "Propose text to append to memory. Applied by the scheduler only after this step succeeds.",
            parameters: json!({"type": "object", "properties": {"scope": scope, "text": {"type": "string"}}, "required": ["scope", "text"]}),
        },
        _ => return None,
    })
}

/// What a tool call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Text for the model.
    Text(String),
    /// The step's final output.
    Output(String),
}

/// Run one tool call.
pub fn call(
    call: &ToolCall,
    enabled: &[String],
    output_schema: Option<&str>,
    store: &SnapshotStore,
    proposals: &mut Vec<MemoryUpdate>,
) -> Answer {
    let arg = |key: &str| call.arguments.get(key).and_then(Value::as_str).map(str::trim);
    let workflow = store.snapshot().workflow.clone();
    let scope = |s: Option<&str>| match s {
        Some("global") => Some((MemoryTarget::Global, MemoryScope::Global)),
        Some("workflow") => Some((MemoryTarget::Workflow, MemoryScope::Workflow(workflow.as_str()))),
        _ => None,
    };
    // Writes are refused by the store itself, whatever the tool is called.
    if is_write(&call.name) {
        let target = scope(arg("scope")).map_or(MemoryScope::Global, |(_, s)| s);
        return Answer::Text(match store.append_memory(target, arg("text").unwrap_or_default()) {
            Err(e) => format!("error: {e}"),
            Ok(()) => "written".into(),
        });
    }
    if !call.arguments.is_object() {
        let mut sent: String = call.sent.chars().take(200).collect();
        if call.sent.chars().count() > 200 {
            sent.push('…');
        }
        return Answer::Text(format!(
            "error: the arguments of {} must be a JSON object; you sent: {sent}",
            call.name
        ));
    }
    if !enabled.iter().any(|t| t == &call.name) {
        return Answer::Text(format!(
            "error: tool \"{}\" is not available in this step (available: {})",
            call.name,
            enabled.join(", ")
        ));
    }
    let text = match call.name.as_str() {
        "read_skill" => match arg("id") {
            None => "error: read_skill needs an \"id\"".into(),
            Some(id) => match store.skill(id) {
                Ok(skill) => format!("# {} ({id})\n{}\n\n{}", skill.name, skill.description, skill.body),
                Err(e) => format!("error: {e}; your skills are: {}", store.skill_ids().join(", ")),
            },
        },
        "search_skills" => search(store, arg("query").unwrap_or_default()),
        "read_memory" => {
            let scopes: Vec<(&str, MemoryScope<'_>)> = match arg("scope") {
                Some("global") => vec![("global", MemoryScope::Global)],
                Some("workflow") => vec![("workflow", MemoryScope::Workflow(&workflow))],
                _ => vec![
                    ("global", MemoryScope::Global),
                    ("workflow", MemoryScope::Workflow(&workflow)),
                ],
            };
            let mut text = String::new();
            for (name, s) in scopes {
                match store.memory(s) {
                    Ok(m) => text.push_str(&format!(
                        "## {name} memory (read-only)\n{}\n",
                        m.as_deref().unwrap_or("(empty)")
                    )),
                    Err(e) => text.push_str(&format!("error: {e}\n")),
                }
            }
            text
        }
        OUTPUT if output_schema.is_some() => {
            let output = call.arguments.to_string();
            match courier_config::output_schema::validate(output_schema.unwrap_or_default(), &output) {
                Ok(()) => return Answer::Output(output),
                Err(why) => format!("error: {why}; nothing was recorded: call output again with a matching object"),
            }
        }
        OUTPUT => match call.arguments.get("text") {
            Some(Value::String(text)) if !text.trim().is_empty() => return Answer::Output(text.clone()),
            Some(Value::String(_)) => "error: output needs a non-empty \"text\"; nothing was recorded".into(),
            Some(other) => format!("error: output's \"text\" must be a string, not {other}; nothing was recorded"),
            None => "error: output needs \"text\" (your final answer, a string); nothing was recorded".into(),
        },
        "propose_memory_update" => match (scope(arg("scope")), arg("text")) {
            (Some(_), Some(text)) if !text.is_empty() && proposals.len() >= MAX_PROPOSALS => {
                format!("error: a step makes at most {MAX_PROPOSALS} memory proposals; nothing was recorded")
            }
            (Some(_), Some(text)) if !text.is_empty() && proposed(proposals) + text.len() + 1 > MAX_PROPOSAL_BYTES => {
                format!(
                    "error: a step proposes at most {MAX_PROPOSAL_BYTES} bytes of memory in all; {} are left, \
                 this proposal holds {}; nothing was recorded",
                    MAX_PROPOSAL_BYTES - proposed(proposals),
                    text.len() + 1
                )
            }
            (Some((target, _)), Some(text)) if !text.is_empty() => {
                proposals.push(MemoryUpdate {
                    target,
                    append: format!("{text}\n"),
                });
                "proposal recorded: the scheduler appends it to memory after this step succeeds".into()
            }
            _ => "error: propose_memory_update needs \"scope\" (global or workflow) and non-empty \"text\"".into(),
        },
        other => format!("error: unknown tool \"{other}\""),
    };
    Answer::Text(bounded(text))
}

/// Bytes of memory proposed so far.
fn proposed(proposals: &[MemoryUpdate]) -> usize {
    proposals.iter().map(|p| p.append.len()).sum()
}

/// Tool names that try to change the store.
fn is_write(name: &str) -> bool {
    ["write_", "update_", "append_", "save_", "delete_", "edit_"]
        .iter()
        .any(|p| name.starts_with(p))
        && name != "propose_memory_update"
}

fn search(store: &SnapshotStore, query: &str) -> String {
    let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
    let mut hits: Vec<(usize, String)> = store
        .skill_ids()
        .into_iter()
        .filter_map(|id| {
            let skill = store.skill(&id).ok()?;
            let hay = format!(
                "{id} {} {} {} {}",
                skill.name,
                skill.description,
                skill.tags.join(" "),
                skill.body
            )
            .to_lowercase();
            let score = words.iter().filter(|w| hay.contains(w.as_str())).count();
            (score > 0 || words.is_empty())
                .then(|| (score, format!("- `{id}`: {} — {}", skill.name, skill.description)))
        })
        .collect();
    hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    if hits.is_empty() {
        format!("no skill matches \"{query}\"")
    } else {
        hits.into_iter().map(|(_, line)| line).collect::<Vec<_>>().join("\n")
    }
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_ANSWER {
        let mut cut = MAX_ANSWER;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n(truncated)");
    }
    text
}
