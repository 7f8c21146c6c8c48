//! Workflows: `config/workflows/NAME.yaml`, parsed and validated at load so
//! nothing can fail for a config reason on a worker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use courier_wire::{AgentSpec, ChatMessage, StepRun, StepSpec};
use serde::Deserialize;

use crate::condition::Condition;
use crate::error::ConfigError;
use crate::store::{Catalog, KNOWN_TOOLS, is_slug, slug_error};
use crate::template::{self, Ref};
use crate::yaml;

/// Queue used when neither the workflow nor the step names one.
pub const DEFAULT_QUEUE: &str = "default";
/// Step timeout when the step gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest step timeout a workflow may set. Workers ask the broker to let a
/// delivery stay unacknowledged this long plus a margin (a task is acked only
/// after its step), so no valid step is ever cut by the consumer timeout.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Agent loop bound when the step gives none.
pub const DEFAULT_MAX_ITERATIONS: u32 = 8;
/// Longest delay between attempts a retry policy may ask for.
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
/// Most attempts a retry policy may ask for.
pub const MAX_RETRY_LIMIT: u32 = 100;

/// A validated workflow.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// Name, equal to the file stem.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Free text.
    pub description: Option<String>,
    /// Parameters and their defaults; `None` means required at submit.
    pub params: BTreeMap<String, Option<String>>,
    /// Cron schedule (5 fields, or 6 with seconds).
    pub schedule: Option<Schedule>,
    /// Steps in file order (read through [`Workflow::steps`]: the index
    /// over them is built once, at load).
    steps: Vec<Step>,
    /// The longest a run may take: past it, the run is cancelled.
    pub timeout: Option<Duration>,
    /// What a run may spend: past it, the run is cancelled.
    pub budget: Budget,
    /// Runs of this workflow dispatching at once; more wait.
    pub max_active_runs: Option<u32>,
    /// Steps of this workflow's runs dispatched at once; more wait.
    pub max_active_steps: Option<u32>,
    /// Position of each step by name, and the positions of the steps that
    /// depend on it: so a result costs the same in a run of any width.
    graph: Graph,
}

/// Lookups over the steps, built once at load.
#[derive(Debug, Clone, Default)]
struct Graph {
    by_name: std::collections::HashMap<String, usize>,
    dependents: Vec<Vec<usize>>,
}

impl Graph {
    fn new(steps: &[Step]) -> Self {
        let by_name: std::collections::HashMap<String, usize> =
            steps.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let mut dependents = vec![Vec::new(); steps.len()];
        for (i, s) in steps.iter().enumerate() {
            for d in &s.depends {
                if let Some(&up) = by_name.get(d) {
                    dependents[up].push(i);
                }
            }
        }
        Self { by_name, dependents }
    }
}

/// A run's spending limit; unset means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Input plus output tokens of every agent step.
    #[serde(default)]
    pub tokens: Option<u64>,
    /// Cost of every agent step, from its model's `pricing`.
    #[serde(default)]
    pub cost: Option<f64>,
}

/// A parsed cron schedule with its source text.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The text as written.
    pub pattern: String,
    /// The parsed expression.
    pub cron: croner::Cron,
}

/// A validated step; its templates are resolved at dispatch by [`Step::resolve`].
#[derive(Debug, Clone)]
pub struct Step {
    /// Name, unique in the workflow.
    pub name: String,
    /// Steps that must succeed first.
    pub depends: Vec<String>,
    /// Time budget of one attempt.
    pub timeout: Duration,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Worker pool (the step's, else the workflow's, else `default`).
    pub queue: String,
    /// What to run, with `${...}` templates still in place. For an approval
    /// step: the message (`Echo`), shown while it waits, never dispatched.
    pub run: StepRun,
    /// Set for a step that waits for a person's approval instead of running.
    pub approval: Option<Approval>,
    /// Set for a step that runs once per item of a JSON array.
    pub foreach: Option<Foreach>,
    /// Set for a step that starts another workflow as a child run.
    pub workflow: Option<SubWorkflow>,
    /// Run the step only when this is true (else it is skipped).
    pub when: Option<Condition>,
    /// What a skipped dependency does to this step.
    pub on_skipped: OnSkipped,
    /// The upstream steps whose outputs its fields and condition read (its
    /// `foreach` array aside: see [`Step::items`]).
    pub reads: BTreeSet<String>,
}

/// `foreach: "${plan.json.files}"`: the step runs once per item of the JSON
/// array the template renders to, each item its own task (`step[index]`),
/// at most `max_concurrent` at a time; its output is the array of the
/// items' outputs, in item order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreach {
    /// The template that renders to the array.
    pub items: String,
    /// Items running at once.
    pub max_concurrent: u32,
    /// Most items accepted: a longer array fails the step.
    pub max_items: u32,
    /// A failed item leaves `null` in the output instead of failing the step.
    pub continue_on_failure: bool,
}

/// `workflow: {name, params}`: the step starts workflow `name` as a child
/// run, its params rendered from this run's; the step's output is the
/// child's step outputs as a JSON object (`${step.json.merge}`), and
/// cancelling the parent cancels the child.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubWorkflow {
    /// The child workflow.
    pub name: String,
    /// Its params, as templates over this run's params and upstream outputs.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

/// How deep sub-workflows may nest at run time (cycles are refused at load;
/// this bounds what a config changed under running runs could do).
pub const MAX_WORKFLOW_DEPTH: u32 = 8;

/// Steps a workflow may have: its graph is checked at load in time that
/// grows with their number times the references between them.
pub const MAX_STEPS: usize = 20_000;

/// Items of a `foreach` running at once when the step gives no `max_concurrent`.
pub const DEFAULT_MAX_CONCURRENT: u32 = 10;
/// Items a `foreach` accepts when the step gives no `max_items`.
pub const DEFAULT_MAX_ITEMS: u32 = 10_000;
/// The most `max_items` may be.
pub const MAX_ITEMS: u32 = 100_000;
/// The most `max_concurrent` may be.
pub const MAX_CONCURRENT: u32 = 10_000;

/// `depends_on_skipped`: what a step does when a dependency was skipped
/// (its `when` was false, or it was itself skipped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSkipped {
    /// Skip this step too (the default): skips propagate downstream.
    #[default]
    Skip,
    /// Run anyway, as if the skipped dependency had succeeded with an empty output.
    Run,
}

/// `approval: {message, timeout}`: the step waits until `courier approve`
/// (it succeeds, the comment as its output) or `courier reject` (it fails),
/// or fails at its timeout. No worker is involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Approval {
    /// How long the step waits for a decision.
    pub timeout: Duration,
}

/// How long an approval waits when its step gives no timeout.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest an approval may wait.
pub const MAX_APPROVAL_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalFile {
    message: String,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

/// How often and how far apart a failed step is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RetryPolicy {
    /// Further attempts after the first (0 = no retry).
    #[serde(default)]
    pub limit: u32,
    /// Delay before the first retry; doubles each time.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    /// Upper bound on the delay.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            limit: 0,
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

#[derive(Deserialize)]
struct WorkflowFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, serde_yaml_ng::Value>,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    budget: Budget,
    #[serde(default)]
    max_active_runs: Option<u32>,
    #[serde(default)]
    max_active_steps: Option<u32>,
    steps: Vec<StepFile>,
}

#[derive(Deserialize)]
struct StepFile {
    name: String,
    #[serde(default)]
    depends: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    retry: RetryPolicy,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    agent: Option<AgentFile>,
    #[serde(default)]
    echo: Option<String>,
    #[serde(default)]
    approval: Option<ApprovalFile>,
    #[serde(default)]
    workflow: Option<SubWorkflow>,
    #[serde(default)]
    foreach: Option<String>,
    #[serde(default)]
    max_concurrent: Option<u32>,
    #[serde(default)]
    max_items: Option<u32>,
    #[serde(default)]
    continue_on_failure: bool,
    #[serde(default)]
    when: Option<String>,
    #[serde(default)]
    depends_on_skipped: OnSkipped,
}

#[derive(Deserialize)]
struct AgentFile {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    soul: Option<String>,
    #[serde(default)]
    skills: Vec<String>,
    #[serde(default)]
    memory: MemoryFile,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default = "default_max_iterations")]
    max_iterations: u32,
    #[serde(default)]
    output_schema: Option<serde_yaml_ng::Value>,
}

#[derive(Default, Deserialize)]
struct MemoryFile {
    #[serde(default)]
    enabled: bool,
}

fn default_max_iterations() -> u32 {
    DEFAULT_MAX_ITERATIONS
}

/// Why a submit was refused before anything was published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A parameter the workflow does not declare.
    #[error("workflow \"{workflow}\" has no parameter \"{param}\" (it has: {declared})")]
    Unknown {
        workflow: String,
        param: String,
        declared: String,
    },
    /// A required parameter was not given.
    #[error("workflow \"{workflow}\" needs parameter \"{param}\": pass --param {param}=VALUE")]
    Missing { workflow: String, param: String },
}

impl Workflow {
    /// Parse and validate one workflow file against the agent resources.
    ///
    /// # Errors
    /// Every problem found, each naming the file, the step and the field.
    pub fn load(path: &Path, catalog: &Catalog) -> Result<Self, Vec<ConfigError>> {
        let text = crate::files::read_text(path).map_err(|e| vec![ConfigError::file(path, e.to_string())])?;
        Self::parse(path, &text, catalog)
    }

    /// Parse and validate workflow text; `path` names it in errors and gives its name.
    ///
    /// # Errors
    /// Every problem found, each naming the file, the step and the field.
    pub fn parse(path: &Path, text: &str, catalog: &Catalog) -> Result<Self, Vec<ConfigError>> {
        let (file, unknown): (WorkflowFile, _) = yaml::parse(path, text).map_err(|e| vec![e])?;
        let mut errors: Vec<ConfigError> = unknown
            .into_iter()
            .map(
                |field| match field.strip_prefix("steps.").and_then(|r| r.split_once('.')) {
                    Some((i, rest)) => {
                        let step = i
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| file.steps.get(i))
                            .map(|s| s.name.clone());
                        let err = yaml::unknown_field(path, rest.to_string());
                        match step {
                            Some(step) => err.step(step),
                            None => err,
                        }
                    }
                    None => yaml::unknown_field(path, field),
                },
            )
            .collect();
        let err = |message: String| ConfigError::file(path, message);

        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = file.name.clone().unwrap_or_else(|| stem.clone());
        if !is_slug(&name) {
            errors.push(err(slug_error(&name)).field("name"));
        } else if name != stem {
            errors.push(err(format!("name \"{name}\" must match the file name \"{stem}.yaml\"")).field("name"));
        }

        let mut params = BTreeMap::new();
        for (key, value) in &file.params {
            let default = match value {
                serde_yaml_ng::Value::Null => None,
                serde_yaml_ng::Value::String(s) => Some(s.clone()),
                serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
                serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
                _ => {
                    errors.push(
                        err("a default must be a string, number or boolean (or ~ for required)".into())
                            .field(format!("params.{key}")),
                    );
                    None
                }
            };
            if !is_param_name(key) {
                errors.push(
                    err(format!("\"{key}\" is not a parameter name: use letters, digits and _"))
                        .field(format!("params.{key}")),
                );
            }
            params.insert(key.clone(), default);
        }

        let schedule = file
            .schedule
            .as_ref()
            .and_then(|pattern| match croner::Cron::from_str(pattern) {
                Ok(cron) => Some(Schedule {
                    pattern: pattern.clone(),
                    cron,
                }),
                Err(e) => {
                    errors.push(err(format!("bad cron expression \"{pattern}\": {e}")).field("schedule"));
                    None
                }
            });

        if schedule.is_some()
            && let Some((missing, _)) = params.iter().find(|(_, default)| default.is_none())
        {
            errors.push(
                err(format!(
                    "a scheduled run has no one to pass parameters: give \"{missing}\" a default"
                ))
                .field("schedule"),
            );
        }

        let workflow_queue = file.queue.clone().unwrap_or_else(|| DEFAULT_QUEUE.to_string());
        if !is_slug(&workflow_queue) {
            errors.push(err(slug_error(&workflow_queue)).field("queue"));
        }
        if file.steps.is_empty() {
            errors.push(err("a workflow needs at least one step".into()).field("steps"));
        }
        if file.timeout.is_some_and(|t| t.is_zero()) {
            errors.push(err("a timeout must be greater than zero".into()).field("timeout"));
        }
        if file.budget.tokens == Some(0) {
            errors.push(err("a token budget must be greater than zero".into()).field("budget.tokens"));
        }
        if file.budget.cost.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
            errors.push(err("a cost budget must be a positive number".into()).field("budget.cost"));
        }
        for (field, value) in [
            ("max_active_runs", file.max_active_runs),
            ("max_active_steps", file.max_active_steps),
        ] {
            if value == Some(0) {
                errors.push(err("a limit must be at least 1 (leave it out for none)".into()).field(field));
            }
        }

        let mut seen = BTreeSet::new();
        let mut steps = Vec::new();
        for s in &file.steps {
            let step_err = |field: &str, message: String| err(message).step(&s.name).field(field);
            if !is_slug(&s.name) {
                errors.push(step_err("name", slug_error(&s.name)));
            }
            if !seen.insert(s.name.as_str()) {
                errors.push(step_err("name", format!("duplicate step name \"{}\"", s.name)));
            }
            let queue = s.queue.clone().unwrap_or_else(|| workflow_queue.clone());
            if s.queue.is_some() && !is_slug(&queue) {
                errors.push(step_err("queue", slug_error(&queue)));
            }
            let timeout = s.timeout.unwrap_or(DEFAULT_TIMEOUT);
            if timeout.is_zero() {
                errors.push(step_err("timeout", "a timeout must be greater than zero".into()));
            }
            if timeout > MAX_STEP_TIMEOUT {
                errors.push(step_err(
                    "timeout",
                    format!(
                        "a timeout may be at most {}h (workers hold the task unacknowledged while it runs)",
                        MAX_STEP_TIMEOUT.as_secs() / 3600
                    ),
                ));
            }
            if s.retry.limit > MAX_RETRY_LIMIT {
                errors.push(step_err("retry.limit", format!("at most {MAX_RETRY_LIMIT} retries")));
            }
            if s.retry.max_backoff > MAX_BACKOFF {
                errors.push(step_err("retry.max_backoff", "max_backoff may be at most 24h".into()));
            }
            if s.retry.backoff > s.retry.max_backoff {
                errors.push(step_err("retry.backoff", "backoff is longer than max_backoff".into()));
            }
            let kinds = usize::from(s.command.is_some())
                + usize::from(s.agent.is_some())
                + usize::from(s.echo.is_some())
                + usize::from(s.approval.is_some())
                + usize::from(s.workflow.is_some());
            if kinds != 1 {
                errors.push(step_err(
                    "command",
                    "a step has exactly one of `command`, `agent`, `echo`, `approval` and `workflow`".into(),
                ));
                continue;
            }
            if let Some(sub) = &s.workflow {
                if s.timeout.is_some() {
                    errors.push(step_err(
                        "timeout",
                        "a sub-workflow step has no timeout of its own: give the child workflow a `timeout`".into(),
                    ));
                }
                if s.foreach.is_some() {
                    errors.push(step_err("workflow", "a foreach step cannot start sub-workflows".into()));
                }
                if s.retry.limit > 0 {
                    errors.push(step_err(
                        "retry",
                        "a sub-workflow step is not retried: retry its steps".into(),
                    ));
                }
                if !is_slug(&sub.name) {
                    errors.push(step_err("workflow.name", slug_error(&sub.name)));
                }
            }
            if (s.echo.is_some() || s.approval.is_some() || s.workflow.is_some()) && !s.env.is_empty() {
                errors.push(step_err("env", "`env` applies to command steps only".into()));
            }
            let approval = s.approval.as_ref().map(|a| Approval {
                timeout: a.timeout.unwrap_or(DEFAULT_APPROVAL_TIMEOUT),
            });
            if let Some(a) = &approval {
                if a.timeout.is_zero() || a.timeout > MAX_APPROVAL_TIMEOUT {
                    errors.push(step_err(
                        "approval.timeout",
                        "an approval's timeout must be above zero and at most 30 days".into(),
                    ));
                }
                if s.retry.limit > 0 {
                    errors.push(step_err("retry", "an approval step is decided once: no retry".into()));
                }
            }
            let foreach = check_foreach(s, &mut |field, message| errors.push(step_err(field, message)));
            let when = s.when.as_ref().and_then(|w| match Condition::parse(w) {
                Ok(c) => Some(c),
                Err(m) => {
                    errors.push(step_err("when", m));
                    None
                }
            });
            if [template::ITEM, template::INDEX].contains(&s.name.as_str()) {
                errors.push(step_err(
                    "name",
                    format!("\"{}\" is reserved for foreach items", s.name),
                ));
            }
            let run = match (&s.command, &s.agent, &s.echo) {
                // Never dispatched: the child run does the work.
                _ if s.workflow.is_some() => StepRun::Echo { text: String::new() },
                _ if s.approval.is_some() => StepRun::Echo {
                    text: s.approval.as_ref().map(|a| a.message.clone()).unwrap_or_default(),
                },
                (_, _, Some(text)) => StepRun::Echo { text: text.clone() },
                (Some(argv), _, None) => {
                    if argv.is_empty() || argv[0].is_empty() {
                        errors.push(step_err(
                            "command",
                            "the command is empty: give a program and its arguments".into(),
                        ));
                    }
                    StepRun::Command {
                        argv: argv.clone(),
                        env: s.env.clone(),
                    }
                }
                (None, Some(a), None) => {
                    if !s.env.is_empty() {
                        errors.push(step_err("env", "`env` applies to command steps only".into()));
                    }
                    check_agent(a, catalog, &mut |field, message| errors.push(step_err(field, message)));
                    StepRun::Agent(AgentSpec {
                        model: a.model.clone(),
                        soul: a.soul.clone(),
                        skills: a.skills.clone(),
                        memory: a.memory.enabled,
                        prompt: a.prompt.clone(),
                        messages: a.messages.clone(),
                        tools: a.tools.clone(),
                        max_iterations: a.max_iterations,
                        output_schema: a.output_schema.as_ref().and_then(|schema| {
                            let checked = serde_json::to_value(schema)
                                .map_err(|e| format!("not a JSON value: {e}"))
                                .and_then(|json| crate::output_schema::check_schema(&json).map(|()| json));
                            match checked {
                                Ok(json) => Some(json.to_string()),
                                Err(m) => {
                                    errors.push(step_err("agent.output_schema", m));
                                    None
                                }
                            }
                        }),
                    })
                }
                (None, None, None) => continue,
            };
            steps.push(Step {
                name: s.name.clone(),
                depends: s.depends.clone(),
                timeout,
                retry: s.retry,
                queue,
                run,
                approval,
                foreach,
                workflow: s.workflow.clone(),
                when,
                on_skipped: s.depends_on_skipped,
                reads: BTreeSet::new(),
            });
        }

        if steps.len() > MAX_STEPS {
            errors.push(ConfigError::file(
                path,
                format!(
                    "{} steps: a workflow has at most {MAX_STEPS} (a foreach step runs any number of items)",
                    steps.len()
                ),
            ));
        } else {
            check_graph(path, &steps, &params, &mut errors);
        }
        for step in &mut steps {
            step.reads = step.outputs_read();
        }
        if steps.iter().any(|s| s.foreach.is_some()) {
            for p in [template::ITEM, template::INDEX]
                .into_iter()
                .filter(|p| params.contains_key(*p))
            {
                errors.push(
                    err(format!(
                        "\"{p}\" means the current item in a foreach step: rename the parameter"
                    ))
                    .field(format!("params.{p}")),
                );
            }
        }

        if errors.is_empty() {
            Ok(Self {
                name,
                file: path.to_path_buf(),
                description: file.description,
                params,
                schedule,
                timeout: file.timeout,
                budget: file.budget,
                max_active_runs: file.max_active_runs,
                max_active_steps: file.max_active_steps,
                graph: Graph::new(&steps),
                steps,
            })
        } else {
            Err(errors)
        }
    }

    /// The steps, in file order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// A step by name.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.graph.by_name.get(name).map(|&i| &self.steps[i])
    }

    /// The steps that depend on `name` directly, in file order.
    pub fn dependents(&self, name: &str) -> impl Iterator<Item = &Step> {
        let positions = self
            .graph
            .by_name
            .get(name)
            .map_or(&[][..], |&i| &self.graph.dependents[i]);
        positions.iter().map(|&i| &self.steps[i])
    }

    /// Merge submitted parameters over the defaults.
    ///
    /// # Errors
    /// An unknown parameter, or a required one not given.
    pub fn resolve_params(&self, given: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, ParamError> {
        if let Some(unknown) = given.keys().find(|k| !self.params.contains_key(*k)) {
            let declared = self.params.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(ParamError::Unknown {
                workflow: self.name.clone(),
                param: unknown.clone(),
                declared: if declared.is_empty() { "none".into() } else { declared },
            });
        }
        self.params
            .iter()
            .map(|(k, default)| match given.get(k).or(default.as_ref()) {
                Some(v) => Ok((k.clone(), v.clone())),
                None => Err(ParamError::Missing {
                    workflow: self.name.clone(),
                    param: k.clone(),
                }),
            })
            .collect()
    }
}

/// Longest single argument or `NAME=value` a process may be started with
/// (Linux's `MAX_ARG_STRLEN`, 32 pages, with its terminating NUL).
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// Most bytes a command's arguments and environment together may take, with
/// room under Linux's usual 2 MiB `ARG_MAX` for the sandbox's own variables.
pub const MAX_EXEC_BYTES: usize = 1024 * 1024;

/// A command that the kernel would refuse to start ("Argument list too long")
/// is refused here, where the error can name the argument, instead of failing
/// on a worker.
fn check_exec_size(argv: &[String], env: &BTreeMap<String, String>) -> Result<(), String> {
    for (i, arg) in argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(format!(
                "argument {i} of the command holds a NUL byte once substituted, which a process argument cannot"
            ));
        }
        if arg.len() > MAX_ARG_BYTES {
            return Err(format!(
                "argument {i} of the command is {} bytes once substituted; a process argument holds at most {MAX_ARG_BYTES} (Linux's MAX_ARG_STRLEN)",
                arg.len()
            ));
        }
    }
    for (name, value) in env {
        if value.contains('\0') {
            return Err(format!(
                "environment variable {name} of the command holds a NUL byte once substituted, which a variable cannot"
            ));
        }
        if name.len() + 1 + value.len() > MAX_ARG_BYTES {
            return Err(format!(
                "environment variable {name} of the command is {} bytes once substituted; one variable holds at most {MAX_ARG_BYTES}",
                name.len() + 1 + value.len()
            ));
        }
    }
    let total: usize =
        argv.iter().map(|a| a.len() + 1).sum::<usize>() + env.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>();
    if total > MAX_EXEC_BYTES {
        return Err(format!(
            "the command's arguments and environment are {total} bytes once substituted, more than {MAX_EXEC_BYTES}"
        ));
    }
    Ok(())
}

impl Step {
    /// The items of a `foreach` step, from its template rendered with the
    /// run's params and upstream outputs (at most `max_bytes` of text).
    ///
    /// # Errors
    /// A message: the step is no foreach, the text is not a JSON array, or
    /// it has more than `max_items` items.
    pub fn items(
        &self,
        params: &BTreeMap<String, String>,
        outputs: &BTreeMap<String, String>,
        max_bytes: usize,
    ) -> Result<Vec<serde_json::Value>, String> {
        let f = self.foreach.as_ref().ok_or("not a foreach step")?;
        let values = template::Values::new(params, outputs, None);
        let text = template::render(&f.items, &values, &mut template::Budget::new(max_bytes))?;
        let shown = |t: &str| {
            let mut cut: String = t.chars().take(80).collect();
            if cut.len() < t.len() {
                cut.push('…');
            }
            cut
        };
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Array(items)) if items.len() > f.max_items as usize => Err(format!(
                "foreach: {} items, more than max_items ({})",
                items.len(),
                f.max_items
            )),
            Ok(serde_json::Value::Array(items)) => Ok(items),
            Ok(_) | Err(_) => Err(format!(
                "foreach: \"{}\" gave {:?}, which is not a JSON array",
                f.items,
                shown(&text)
            )),
        }
    }

    /// The step with params, upstream outputs (and its item, in a foreach)
    /// substituted, ready for a task, its fields together at most `max_bytes`
    /// (the task's decoded size limit: a task over it could not be sent anyway).
    ///
    /// # Errors
    /// A message naming a value that was not given (load-time validation makes
    /// this impossible when the params came from [`Workflow::resolve_params`]
    /// and the outputs hold every dependency's output), a `.json` reference
    /// into an output that is not JSON, or the size limit.
    pub fn resolve(&self, values: &template::Values<'_>, max_bytes: usize) -> Result<StepSpec, String> {
        let budget = std::cell::Cell::new(template::Budget::new(max_bytes));
        let r = |s: &String| {
            let mut left = budget.get();
            let rendered = template::render(s, values, &mut left);
            budget.set(left);
            rendered
        };
        let run = match &self.run {
            StepRun::Command { argv, env } => {
                let argv: Vec<String> = argv.iter().map(r).collect::<Result<_, _>>()?;
                let env: BTreeMap<String, String> = env
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), r(v)?)))
                    .collect::<Result<_, String>>()?;
                check_exec_size(&argv, &env)?;
                StepRun::Command { argv, env }
            }
            StepRun::Agent(a) => StepRun::Agent(AgentSpec {
                prompt: r(&a.prompt)?,
                messages: a
                    .messages
                    .iter()
                    .map(|m| {
                        Ok(ChatMessage {
                            role: m.role.clone(),
                            content: r(&m.content)?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                ..a.clone()
            }),
            StepRun::Echo { text } => StepRun::Echo { text: r(text)? },
            StepRun::Unsupported { kind } => return Err(format!("this build has no step kind \"{kind}\"")),
        };
        Ok(StepSpec {
            timeout: self.timeout,
            run,
        })
    }

    /// The steps whose outputs the step's fields and condition read.
    fn outputs_read(&self) -> BTreeSet<String> {
        let fields = self.templates().into_iter().filter(|(field, _)| field != "foreach");
        let mut reads: BTreeSet<String> = fields
            .flat_map(|(_, text)| template::refs(text).unwrap_or_default())
            .filter_map(|r| match r {
                Ref::Output(s) | Ref::Json(s, _) => Some(s.to_string()),
                Ref::Param(_) | Ref::Item(_) => None,
            })
            .collect();
        if let Some(c) = &self.when {
            reads.extend(c.steps.iter().cloned());
        }
        reads
    }

    /// The steps whose outputs the `foreach` array reads.
    pub fn items_read(&self) -> BTreeSet<String> {
        let text = self.foreach.as_ref().map_or("", |f| f.items.as_str());
        template::refs(text)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| match r {
                Ref::Output(s) | Ref::Json(s, _) => Some(s.to_string()),
                Ref::Param(_) | Ref::Item(_) => None,
            })
            .collect()
    }

    /// Every template string of the step, with the field it sits in
    /// (`foreach` last).
    fn templates(&self) -> Vec<(String, &str)> {
        let mut all = match &self.workflow {
            Some(sub) => sub
                .params
                .iter()
                .map(|(k, v)| (format!("workflow.params.{k}"), v.as_str()))
                .collect(),
            None => self.run_templates(),
        };
        if let Some(f) = &self.foreach {
            all.push(("foreach".to_string(), f.items.as_str()));
        }
        all
    }

    fn run_templates(&self) -> Vec<(String, &str)> {
        match &self.run {
            StepRun::Command { argv, env } => argv
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("command.{i}"), a.as_str()))
                .chain(env.iter().map(|(k, v)| (format!("env.{k}"), v.as_str())))
                .collect(),
            StepRun::Agent(a) => std::iter::once(("agent.prompt".to_string(), a.prompt.as_str()))
                .chain(
                    a.messages
                        .iter()
                        .enumerate()
                        .map(|(i, m)| (format!("agent.messages.{i}.content"), m.content.as_str())),
                )
                .collect(),
            StepRun::Echo { text } if self.approval.is_some() => vec![("approval.message".to_string(), text.as_str())],
            StepRun::Echo { text } => vec![("echo".to_string(), text.as_str())],
            StepRun::Unsupported { .. } => Vec::new(),
        }
    }
}

/// The `foreach` fields of a step, checked; `None` (and an error for any
/// of its companion fields) when the step has no `foreach`.
fn check_foreach(s: &StepFile, report: &mut dyn FnMut(&str, String)) -> Option<Foreach> {
    let Some(items) = &s.foreach else {
        for (field, set) in [
            ("max_concurrent", s.max_concurrent.is_some()),
            ("max_items", s.max_items.is_some()),
            ("continue_on_failure", s.continue_on_failure),
        ] {
            if set {
                report(field, "applies to foreach steps only".into());
            }
        }
        return None;
    };
    if s.approval.is_some() {
        report("foreach", "an approval step cannot be a foreach".into());
    }
    let max_concurrent = s.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
    if !(1..=MAX_CONCURRENT).contains(&max_concurrent) {
        report("max_concurrent", format!("must be from 1 to {MAX_CONCURRENT}"));
    }
    let max_items = s.max_items.unwrap_or(DEFAULT_MAX_ITEMS);
    if !(1..=MAX_ITEMS).contains(&max_items) {
        report("max_items", format!("must be from 1 to {MAX_ITEMS}"));
    }
    if items.trim().is_empty() {
        report(
            "foreach",
            "give the array to go over, e.g. \"${plan.json.files}\"".into(),
        );
    }
    Some(Foreach {
        items: items.clone(),
        max_concurrent,
        max_items,
        continue_on_failure: s.continue_on_failure,
    })
}

fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_agent(a: &AgentFile, catalog: &Catalog, report: &mut dyn FnMut(&str, String)) {
    if let Some(model) = &a.model
        && !catalog.models.contains(model)
    {
        report("agent.model", format!("unknown model \"{model}\""));
    }
    if let Some(soul) = &a.soul
        && !catalog.souls.contains(soul)
    {
        report("agent.soul", format!("unknown soul \"{soul}\""));
    }
    for (i, skill) in a.skills.iter().enumerate() {
        if !catalog.skills.contains(skill) {
            report(&format!("agent.skills.{i}"), format!("unknown skill \"{skill}\""));
        }
    }
    for (i, tool) in a.tools.iter().enumerate() {
        if !KNOWN_TOOLS.contains(&tool.as_str()) {
            report(
                &format!("agent.tools.{i}"),
                format!("unknown tool \"{tool}\"; known tools: {}", KNOWN_TOOLS.join(", ")),
            );
        } else if let Some(allowed) = &catalog.tools_allowed
            && !allowed.contains(tool)
        {
            report(
                &format!("agent.tools.{i}"),
                format!("tool \"{tool}\" is not allowed by the agent config's tool policy"),
            );
        }
    }
    if a.output_schema.is_some() && !a.tools.iter().any(|t| t == "output") {
        report(
            "agent.output_schema",
            "a structured output is given through the output tool: add output to tools".into(),
        );
    }
    if a.max_iterations == 0 {
        report("agent.max_iterations", "must be at least 1".into());
    }
    if a.prompt.trim().is_empty() && a.messages.is_empty() {
        report("agent.prompt", "an agent step needs a prompt or messages".into());
    }
    for (i, m) in a.messages.iter().enumerate() {
        if !["system", "user", "assistant"].contains(&m.role.as_str()) {
            report(
                &format!("agent.messages.{i}.role"),
                format!("unknown role \"{}\": use system, user or assistant", m.role),
            );
        }
    }
}

/// Dependencies exist, form no cycle, and templates only name declared params
/// and upstream steps. Every problem is reported: a cycle is searched for
/// among the known dependencies even when others are unknown.
fn check_graph(path: &Path, steps: &[Step], params: &BTreeMap<String, Option<String>>, errors: &mut Vec<ConfigError>) {
    let index: BTreeMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    for s in steps {
        for (i, dep) in s.depends.iter().enumerate() {
            let e = |m: String| ConfigError::file(path, m).step(&s.name).field(format!("depends.{i}"));
            if dep == &s.name {
                errors.push(e("a step cannot depend on itself".into()));
            } else if !index.contains_key(dep.as_str()) {
                errors.push(e(format!("unknown step \"{dep}\"")));
            }
        }
    }
    if let Some(cycle) = find_cycle(steps, &index) {
        errors.push(
            ConfigError::file(path, format!("dependency cycle: {}", cycle.join(" -> ")))
                .step(&cycle[0])
                .field("depends"),
        );
    }
    for s in steps {
        // Most references name a dependency; the ancestors (a walk of the
        // graph) are gathered only for one that does not, once per step.
        let mut ancestors_of_s = None;
        let mut upstream = |o: &str| {
            s.depends.iter().any(|d| d == o)
                || ancestors_of_s
                    .get_or_insert_with(|| ancestors(s, steps, &index))
                    .contains(o)
        };
        if let Some(c) = &s.when {
            let e = |m: String| ConfigError::file(path, m).step(&s.name).field("when");
            for p in c.params.iter().filter(|p| !params.contains_key(*p)) {
                errors.push(e(format!("unknown parameter \"{p}\" in params.{p}")));
            }
            for o in c.steps.iter().filter(|o| !upstream(o.as_str())) {
                errors.push(e(format!(
                    "steps.{o} names a step that is not upstream of \"{}\" (add it to depends)",
                    s.name
                )));
            }
        }
        for (field, text) in s.templates() {
            let e = |m: String| ConfigError::file(path, m).step(&s.name).field(field.clone());
            match template::refs(text) {
                Err(m) => errors.push(e(m)),
                Ok(refs) => {
                    // `${item}` and `${index}` mean the item in a foreach
                    // step's fields, not in the array it goes over.
                    let in_item = s.foreach.is_some() && field != "foreach";
                    for r in refs {
                        match r {
                            Ref::Param(p) if in_item && [template::ITEM, template::INDEX].contains(&p) => {}
                            Ref::Param(p) if !in_item && [template::ITEM, template::INDEX].contains(&p) => {
                                errors.push(e(format!("\"${{{p}}}\" is only known in the fields of a foreach step")))
                            }
                            Ref::Param(p) if !params.contains_key(p) => {
                                errors.push(e(format!("unknown parameter \"{p}\" in \"${{{p}}}\"")))
                            }
                            Ref::Item(_) if !in_item => {
                                errors.push(e("\"${item...}\" is only known in the fields of a foreach step".into()))
                            }
                            Ref::Output(o) if !upstream(o) => errors.push(e(format!(
                                "\"${{{o}.output}}\" names a step that is not upstream of \"{}\" (add it to depends)",
                                s.name
                            ))),
                            Ref::Json(o, path) if !upstream(o) => {
                                let path = if path.is_empty() {
                                    String::new()
                                } else {
                                    format!(".{path}")
                                };
                                errors.push(e(format!(
                                    "\"${{{o}.json{path}}}\" names a step that is not upstream of \"{}\" (add it to depends)",
                                    s.name
                                )))
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}

/// A dependency cycle, as the steps along it; found without recursion (a
/// chain of tens of thousands of steps would overflow the stack).
fn find_cycle(steps: &[Step], index: &BTreeMap<&str, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; steps.len()];
    // The open path: each step with the next of its dependencies to visit.
    let mut path: Vec<(usize, usize)> = Vec::new();
    for root in 0..steps.len() {
        if marks[root] != Mark::New {
            continue;
        }
        marks[root] = Mark::Open;
        path.push((root, 0));
        while let Some(&mut (n, ref mut next)) = path.last_mut() {
            let Some(dep) = steps[n].depends.get(*next) else {
                marks[n] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            // Self and unknown dependencies are reported by `check_graph` itself.
            let Some(&d) = index.get(dep.as_str()).filter(|&&d| d != n) else {
                continue;
            };
            match marks[d] {
                Mark::Open => {
                    let start = path.iter().position(|&(x, _)| x == d).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..].iter().map(|&(i, _)| steps[i].name.clone()).collect();
                    cycle.push(steps[d].name.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    marks[d] = Mark::Open;
                    path.push((d, 0));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

fn ancestors<'a>(step: &Step, steps: &'a [Step], index: &BTreeMap<&str, usize>) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = step.depends.iter().map(String::as_str).collect();
    while let Some(name) = todo.pop() {
        let Some(&i) = index.get(name) else { continue };
        let s = &steps[i];
        if seen.insert(s.name.as_str()) {
            todo.extend(s.depends.iter().map(String::as_str));
        }
    }
    seen
}
