//! The whole config folder: agent resources and workflows, validated together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ConfigError, ConfigErrors};
use crate::store::FsStore;
use crate::workflow::{MAX_WORKFLOW_DEPTH, Workflow};

/// A loaded and validated config folder.
#[derive(Debug)]
pub struct Config {
    /// The folder it came from.
    pub dir: PathBuf,
    /// Agent resources (`agents/`).
    pub store: FsStore,
    /// Workflows (`workflows/*.yaml`) by name.
    pub workflows: BTreeMap<String, Workflow>,
}

impl Config {
    /// Load `dir/agents` and every `dir/workflows/*.yaml`, reporting every
    /// problem at once.
    ///
    /// # Errors
    /// All problems found, each naming its file, step and field.
    pub fn load(dir: &Path) -> Result<Self, ConfigErrors> {
        // Workflows are checked even when resources have errors: all in one pass.
        let (store, catalog) = FsStore::load_with_catalog(&dir.join("agents"));
        let (store, mut errors) = match store {
            Ok(store) => (Some(store), Vec::new()),
            Err(errors) => (None, errors),
        };
        let workflows_dir = dir.join("workflows");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&workflows_dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect(),
            Err(e) => {
                errors.push(ConfigError::file(&workflows_dir, format!("cannot read folder: {e}")));
                Vec::new()
            }
        };
        files.sort();
        let mut workflows = BTreeMap::new();
        for file in files {
            match Workflow::load(&file, &catalog) {
                Ok(w) => {
                    workflows.insert(w.name.clone(), w);
                }
                Err(e) => errors.extend(e),
            }
        }
        check_sub_workflows(&workflows, &mut errors);
        check_runs_started(&workflows, &mut errors);
        check_depth(&workflows, &mut errors);
        match store {
            Some(store) if errors.is_empty() => Ok(Self {
                dir: dir.to_path_buf(),
                store,
                workflows,
            }),
            _ => Err(ConfigErrors::located(errors)),
        }
    }
}

/// `workflow:` steps name a workflow that exists, give it only params it
/// declares and every one it requires, and no workflow starts itself,
/// directly or through others.
fn check_sub_workflows(workflows: &BTreeMap<String, Workflow>, errors: &mut Vec<ConfigError>) {
    for wf in workflows.values() {
        for step in wf.steps() {
            let Some(sub) = &step.workflow else { continue };
            let e = |field: &str, m: String| ConfigError::file(&wf.file, m).step(&step.name).field(field.to_string());
            let Some(child) = workflows.get(&sub.name) else {
                let known = workflows.keys().cloned().collect::<Vec<_>>().join(", ");
                errors.push(e(
                    "workflow.name",
                    format!("unknown workflow \"{}\" (known: {known})", sub.name),
                ));
                continue;
            };
            for k in sub.params.keys().filter(|k| !child.params.contains_key(*k)) {
                errors.push(e(
                    &format!("workflow.params.{k}"),
                    format!("workflow \"{}\" has no parameter \"{k}\"", sub.name),
                ));
            }
            for (k, _) in child
                .params
                .iter()
                .filter(|(k, default)| default.is_none() && !sub.params.contains_key(*k))
            {
                errors.push(e(
                    "workflow.params",
                    format!("workflow \"{}\" needs parameter \"{k}\"", sub.name),
                ));
            }
            if let Some(cycle) = cycle_through(workflows, &wf.name, &sub.name) {
                errors.push(e(
                    "workflow.name",
                    format!("sub-workflow cycle: {} -> {}", wf.name, cycle.join(" -> ")),
                ));
            }
        }
    }
}

/// Most runs one submitted run may start in all, itself included: each
/// `workflow:` step starts a run of its workflow, which starts its own, so
/// ten such steps on each of eight levels would be a hundred million runs.
pub const MAX_RUNS_PER_SUBMIT: u64 = 1_000;

/// No workflow starts more than [`MAX_RUNS_PER_SUBMIT`] runs in all.
fn check_runs_started(workflows: &BTreeMap<String, Workflow>, errors: &mut Vec<ConfigError>) {
    let mut memo = BTreeMap::new();
    for wf in workflows.values() {
        let runs = runs_started(workflows, &wf.name, &mut memo, &mut Vec::new());
        if runs > MAX_RUNS_PER_SUBMIT {
            errors.push(ConfigError::file(
                &wf.file,
                format!(
                    "a run of workflow \"{}\" would start {runs} runs in all through its sub-workflows \
                     (each `workflow:` step starts a run, which starts its own); at most {MAX_RUNS_PER_SUBMIT}",
                    wf.name
                ),
            ));
        }
    }
}

/// No workflow's sub-workflows nest deeper than a run may start them
/// ([`MAX_WORKFLOW_DEPTH`]): such a chain would load, and fail only at run
/// time, deep inside it.
fn check_depth(workflows: &BTreeMap<String, Workflow>, errors: &mut Vec<ConfigError>) {
    let mut memo = BTreeMap::new();
    for wf in workflows.values() {
        let levels = levels(workflows, &wf.name, &mut memo, &mut Vec::new());
        if levels > MAX_WORKFLOW_DEPTH + 1 {
            // The chain, from each workflow's deepest sub-workflow.
            let mut chain = vec![wf.name.as_str()];
            while let Some((_, Some(next))) = chain.last().and_then(|n| memo.get(*n)) {
                chain.push(next.as_str());
            }
            errors.push(ConfigError::file(
                &wf.file,
                format!(
                    "sub-workflows of workflow \"{}\" nest {} deep ({}); at most {MAX_WORKFLOW_DEPTH}",
                    wf.name,
                    levels - 1,
                    chain.join(" -> ")
                ),
            ));
        }
    }
}

/// The longest chain of runs a run of `name` starts through `workflow:`
/// steps, itself included; `memo` keeps each workflow's, with its deepest
/// sub-workflow. A cycle (an error of its own) adds nothing.
fn levels(
    workflows: &BTreeMap<String, Workflow>,
    name: &str,
    memo: &mut BTreeMap<String, (u32, Option<String>)>,
    visiting: &mut Vec<String>,
) -> u32 {
    if let Some((n, _)) = memo.get(name) {
        return *n;
    }
    if visiting.iter().any(|v| v == name) {
        return 0;
    }
    visiting.push(name.to_string());
    let mut deepest = (0, None);
    for step in workflows.get(name).map(|w| w.steps()).unwrap_or_default() {
        if let Some(sub) = &step.workflow {
            let below = levels(workflows, &sub.name, memo, visiting);
            if below > deepest.0 {
                deepest = (below, Some(sub.name.clone()));
            }
        }
    }
    visiting.pop();
    let n = deepest.0.saturating_add(1);
    memo.insert(name.to_string(), (n, deepest.1));
    n
}

/// Runs a run of `name` starts, itself included, saturating; a cycle (an
/// error of its own) counts nothing more.
fn runs_started(
    workflows: &BTreeMap<String, Workflow>,
    name: &str,
    memo: &mut BTreeMap<String, u64>,
    visiting: &mut Vec<String>,
) -> u64 {
    if let Some(&n) = memo.get(name) {
        return n;
    }
    if visiting.iter().any(|v| v == name) {
        return 0;
    }
    visiting.push(name.to_string());
    let mut runs: u64 = 1;
    for step in workflows.get(name).map(|w| w.steps()).unwrap_or_default() {
        if let Some(sub) = &step.workflow {
            runs = runs.saturating_add(runs_started(workflows, &sub.name, memo, visiting));
        }
    }
    visiting.pop();
    memo.insert(name.to_string(), runs);
    runs
}

/// The path from `from` back to `start` through `workflow:` steps, if any.
fn cycle_through(workflows: &BTreeMap<String, Workflow>, start: &str, from: &str) -> Option<Vec<String>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![vec![from.to_string()]];
    while let Some(path) = todo.pop() {
        let last = path.last()?.clone();
        if last == start {
            return Some(path);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for step in workflows.get(&last).map(|w| w.steps()).unwrap_or_default() {
            if let Some(sub) = &step.workflow {
                let mut next = path.clone();
                next.push(sub.name.clone());
                todo.push(next);
            }
        }
    }
    None
}
