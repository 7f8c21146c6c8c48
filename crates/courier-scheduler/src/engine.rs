//! The run engine: turns submissions and results into state changes and
//! outbox tasks, each in one SQLite transaction.
//!
//! **Invariant:** a result is applied once. A result whose task row is no
//! longer `dispatched` (already applied, or unknown) changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_config::{
    AgentStore, Config, MemoryScope, PROPOSE_MEMORY_TOOL, ParamError, Step, StoreError, Workflow, build_snapshot,
};
use courier_wire::{
    ContentHash, Limits, MemoryTarget, MemoryUpdate, StepRun, Task, TaskResult, TaskStatus, WireError, encode,
};
use rusqlite::Transaction;
use uuid::Uuid;

use crate::db::{Db, DbError, OutboxTask, RunView, TaskRow, run_status, step_status, tx};

/// Why a submission was refused; nothing was stored or published.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No workflow of that name.
    #[error("unknown workflow \"{name}\" (known: {known})")]
    UnknownWorkflow { name: String, known: String },
    /// Bad or missing parameters.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// A resource the step needs is gone.
    #[error("step \"{step}\": {source}")]
    Snapshot {
        step: String,
        #[source]
        source: StoreError,
    },
    /// The step's snapshot or task is over its size limit.
    #[error("step \"{step}\": {source}")]
    TooLarge {
        step: String,
        #[source]
        source: WireError,
    },
    /// A step's templates could not be resolved.
    #[error("step \"{step}\": {message}")]
    Template { step: String, message: String },
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// Counts from applying a batch of results.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Results refused as impossible for their task (index in the batch, and
    /// why): they changed nothing. A real worker never sends one.
    pub refused: Vec<(usize, Refused)>,
    /// Results that changed state.
    pub applied: usize,
    /// Results already applied (or for unknown tasks): ignored.
    pub duplicates: usize,
    /// Tasks written to the outbox.
    pub dispatched: usize,
    /// Attempts scheduled again after a failure.
    pub retried: usize,
    /// Runs that finished.
    pub finished_runs: usize,
    /// Memory proposals of succeeded steps that could not be written.
    pub memory_not_written: usize,
}

/// Why a result was refused: it cannot be the answer to the task it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its run, step or attempt is not the task's.
    #[error("the result does not match task {task}: it names {claimed}, the task is {actual}")]
    Mismatch {
        task: String,
        claimed: String,
        actual: String,
    },
    /// It proposes memory updates, but its step cannot.
    #[error(
        "the result of task {task} proposes memory updates, but step \"{step}\" is not an agent step with the propose_memory_update tool"
    )]
    MemoryNotAllowed { task: String, step: String },
}

impl Refused {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Mismatch { .. } => "mismatch",
            Refused::MemoryNotAllowed { .. } => "memory_not_allowed",
        }
    }
}

/// Bounds the engine puts on what it publishes.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Snapshot frames.
    pub snapshot: Limits,
    /// Task frames (which embed the snapshot).
    pub task: Limits,
    /// The longest a task may wait for a worker once due; it expires after
    /// that (plus its step's timeout).
    pub max_queue_wait: Duration,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            snapshot: Limits::default(),
            task: Limits::default(),
            max_queue_wait: DEFAULT_MAX_QUEUE_WAIT,
        }
    }
}

/// How long a task may wait for a worker by default: a day.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(24 * 3600);

/// An encoded snapshot and its hash, cached per (workflow, step).
#[derive(Debug)]
struct EncodedSnapshot {
    bytes: Vec<u8>,
    hash: String,
}

/// The engine: config, database, snapshot cache.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    db: Mutex<Db>,
    limits: EngineLimits,
    snapshots: Mutex<HashMap<(String, String), Arc<EncodedSnapshot>>>,
    /// Encoded tasks committed to the outbox and not yet published, by task
    /// id, with their total size (bounded by [`MAX_KEPT_BODY_BYTES`]).
    bodies: Mutex<(HashMap<String, Vec<u8>>, usize)>,
}

/// Memory for encoded tasks waiting to be published; past it, the outbox
/// rebuilds tasks from the database instead, so a burst of submissions cannot
/// grow the scheduler without bound.
pub const MAX_KEPT_BODY_BYTES: usize = 64 * 1024 * 1024;

/// What a transaction produced that is acted on after it commits.
#[derive(Debug, Default)]
struct Effects {
    /// Tasks written: (task id, encoded body).
    written: Vec<(String, Vec<u8>)>,
    /// Memory proposals of succeeded steps.
    memory: Vec<MemoryWrite>,
}

/// A memory proposal to append once its step's success is committed.
#[derive(Debug)]
struct MemoryWrite {
    run: String,
    step: String,
    workflow: String,
    update: MemoryUpdate,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Engine {
    /// An engine over a loaded config and an open database.
    pub fn new(config: Config, db: Db, limits: EngineLimits) -> Self {
        Self {
            config,
            db: Mutex::new(db),
            limits,
            snapshots: Mutex::new(HashMap::new()),
            bodies: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// Act on a committed transaction: keep task bodies for the outbox
    /// (within the budget) and apply memory proposals to the store. A
    /// proposal that cannot be written is recorded as the step's error (the
    /// step stays succeeded); returns how many were not written.
    fn after_commit(&self, effects: Effects) -> usize {
        let mut not_written = 0;
        if !effects.memory.is_empty() {
            for write in &effects.memory {
                let scope = match write.update.target {
                    MemoryTarget::Global => MemoryScope::Global,
                    MemoryTarget::Workflow => MemoryScope::Workflow(&write.workflow),
                };
                match self.config.store.append_memory(scope, &write.update.append) {
                    Ok(()) => tracing::info!(workflow = %write.workflow, ?write.update.target, "memory updated"),
                    Err(e) => {
                        not_written += 1;
                        let error = format!("the step's memory update was not written: {e}");
                        tracing::error!(run = %write.run, step = %write.step, %error, "memory update failed");
                        let noted = self
                            .with_db(|db| db.transaction(|t| tx::set_step_error(t, &write.run, &write.step, &error)));
                        if let Err(e) = noted {
                            tracing::error!(error = %e, "cannot record the failed memory update");
                        }
                    }
                }
            }
            // Later snapshots must carry the new memory.
            self.invalidate_snapshots();
        }
        let mut kept = self.bodies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, body) in effects.written {
            if kept.1 + body.len() > MAX_KEPT_BODY_BYTES {
                break;
            }
            kept.1 += body.len();
            kept.0.insert(id, body);
        }
        not_written
    }

    /// The encoded task and its snapshot hash for an outbox row: the body kept
    /// since commit, or, after a restart, the task rebuilt with the same id and
    /// attempt from the run's params and upstream outputs.
    ///
    /// # Errors
    /// The run, workflow or step is gone, or the task cannot be built any more.
    pub fn task_body(&self, row: &OutboxTask) -> Result<(Vec<u8>, String), SubmitError> {
        let kept = {
            let mut kept = self.bodies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let body = kept.0.remove(&row.task_id);
            kept.1 -= body.as_ref().map_or(0, Vec::len);
            body
        };
        if let Some(body) = kept {
            return Ok((body, row.snapshot_hash.clone()));
        }
        self.with_db(|db| {
            db.transaction(|t| {
                let gone = |what: String| SubmitError::Template {
                    step: row.step.clone(),
                    message: what,
                };
                let (workflow, _) =
                    tx::run(t, &row.run_id)?.ok_or_else(|| gone(format!("run {} is gone", row.run_id)))?;
                let wf = self
                    .config
                    .workflows
                    .get(&workflow)
                    .ok_or_else(|| SubmitError::UnknownWorkflow {
                        name: workflow.clone(),
                        known: self.config.workflows.keys().cloned().collect::<Vec<_>>().join(", "),
                    })?;
                let step = wf
                    .step(&row.step)
                    .ok_or_else(|| gone(format!("no longer in workflow \"{workflow}\"")))?;
                let params: BTreeMap<String, String> =
                    serde_json::from_str(&tx::run_params(t, &row.run_id)?).unwrap_or_default();
                let upstream = outputs(t, &row.run_id, wf, step)?;
                let attempt = Attempt {
                    task_id: parse_uuid(&row.task_id),
                    number: row.attempt,
                    due_ms: row.not_before_ms,
                };
                let task = self.plan_task(wf, step, parse_uuid(&row.run_id), attempt, &params, &upstream)?;
                Ok((task.body, task.snapshot_hash))
            })
        })
    }

    /// The loaded configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Use the database.
    pub fn with_db<T>(&self, f: impl FnOnce(&mut Db) -> T) -> T {
        let mut db = self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut db)
    }

    /// Every worker pool some step uses.
    pub fn pools(&self) -> Vec<String> {
        let pools: BTreeSet<String> = self
            .config
            .workflows
            .values()
            .flat_map(|w| w.steps.iter().map(|s| s.queue.clone()))
            .chain(std::iter::once(courier_config::DEFAULT_QUEUE.to_string()))
            .collect();
        pools.into_iter().collect()
    }

    /// Start a run: validate, plan, and write the first tasks to the outbox.
    ///
    /// # Errors
    /// [`SubmitError`]; on error nothing is stored or published.
    pub fn submit(&self, workflow: &str, given: &BTreeMap<String, String>) -> Result<RunView, SubmitError> {
        let wf = self
            .config
            .workflows
            .get(workflow)
            .ok_or_else(|| SubmitError::UnknownWorkflow {
                name: workflow.to_string(),
                known: self.config.workflows.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let params = wf.resolve_params(given)?;
        let run_id = Uuid::now_v7();
        let now = now_ms();
        // Build every first task before touching the database: a missing
        // resource or an oversized task fails the submit with nothing stored.
        let first: Vec<(&Step, PlannedTask)> = wf
            .steps
            .iter()
            .filter(|s| s.depends.is_empty())
            .map(|s| {
                Ok((
                    s,
                    self.plan_task(wf, s, run_id, Attempt::first(now), &params, &BTreeMap::new())?,
                ))
            })
            .collect::<Result<_, SubmitError>>()?;
        let params_json = serde_json::to_string(&params).unwrap_or_else(|_| "{}".into());
        let run = run_id.to_string();
        let (effects, view) = self.with_db(|db| {
            let effects = db.transaction(|t| {
                tx::insert_run(t, &run, &wf.name, &params_json, now)?;
                for (i, s) in wf.steps.iter().enumerate() {
                    tx::insert_step(t, &run, &s.name, i, &s.queue)?;
                }
                let mut effects = Effects::default();
                for (step, task) in first {
                    write_task(t, &run, step, task, now, &mut effects)?;
                }
                Ok::<_, DbError>(effects)
            })?;
            Ok::<_, DbError>((effects, db.run(&run)?.ok_or(DbError::QueryReturnedNoRows)?))
        })?;
        self.after_commit(effects);
        Ok(view)
    }

    /// Apply a batch of results in one transaction.
    ///
    /// # Errors
    /// The database failed; nothing of the batch was applied.
    pub fn apply(&self, results: &[TaskResult]) -> Result<Applied, DbError> {
        let now = now_ms();
        let (applied, effects) = self.with_db(|db| {
            db.transaction(|t| {
                let mut applied = Applied::default();
                let mut effects = Effects::default();
                for (i, result) in results.iter().enumerate() {
                    if let Err(refused) = self.apply_one(t, result, now, &mut applied, &mut effects)? {
                        tracing::warn!(task = %result.task_id, error = %refused, "result refused; nothing changed");
                        applied.refused.push((i, refused));
                    }
                }
                Ok::<_, DbError>((applied, effects))
            })
        })?;
        let mut applied = applied;
        applied.memory_not_written = self.after_commit(effects);
        Ok(applied)
    }

    /// Apply one result: `Ok(Err(_))` when it was refused (nothing changed).
    fn apply_one(
        &self,
        t: &Transaction<'_>,
        r: &TaskResult,
        now: i64,
        applied: &mut Applied,
        effects: &mut Effects,
    ) -> Result<Result<(), Refused>, DbError> {
        let task_id = r.task_id.to_string();
        let Some(row) = tx::task(t, &task_id)? else {
            tracing::warn!(task = %task_id, "result for an unknown task; ignored");
            applied.duplicates += 1;
            return Ok(Ok(()));
        };
        if let Err(refused) = self.check(t, &task_id, &row, r)? {
            return Ok(Err(refused));
        }
        if row.status != "dispatched" {
            tracing::debug!(task = %task_id, "duplicate result; ignored");
            applied.duplicates += 1;
            return Ok(Ok(()));
        }
        self.apply_to_run(t, r, &row, now, applied, effects)?;
        Ok(Ok(()))
    }

    /// Whether `r` can be the answer to the task `row`: the same run, step
    /// and attempt, and memory proposals only from an agent step that may make them.
    fn check(
        &self,
        t: &Transaction<'_>,
        task_id: &str,
        row: &TaskRow,
        r: &TaskResult,
    ) -> Result<Result<(), Refused>, DbError> {
        let run = r.run_id.to_string();
        if (run.as_str(), r.step.as_str(), r.attempt) != (row.run_id.as_str(), row.step.as_str(), row.attempt) {
            let describe = |run: &str, step: &str, attempt: u32| format!("run {run} step \"{step}\" attempt {attempt}");
            return Ok(Err(Refused::Mismatch {
                task: task_id.to_string(),
                claimed: describe(&run, &r.step, r.attempt),
                actual: describe(&row.run_id, &row.step, row.attempt),
            }));
        }
        if !r.memory_updates.is_empty() {
            let workflow = tx::run(t, &row.run_id)?.map(|(workflow, _)| workflow);
            let step = workflow
                .as_ref()
                .and_then(|w| self.config.workflows.get(w)?.step(&row.step));
            let may_propose = step.is_some_and(
                |s| matches!(&s.run, StepRun::Agent(a) if a.tools.iter().any(|t| t == PROPOSE_MEMORY_TOOL)),
            );
            if !may_propose {
                return Ok(Err(Refused::MemoryNotAllowed {
                    task: task_id.to_string(),
                    step: row.step.clone(),
                }));
            }
        }
        Ok(Ok(()))
    }

    fn apply_to_run(
        &self,
        t: &Transaction<'_>,
        r: &TaskResult,
        row: &TaskRow,
        now: i64,
        applied: &mut Applied,
        effects: &mut Effects,
    ) -> Result<(), DbError> {
        let task_id = r.task_id.to_string();
        applied.applied += 1;
        tx::finish_task(t, &task_id, r.status.as_str(), now)?;
        let run = row.run_id.clone();
        let Some((workflow, run_state)) = tx::run(t, &run)? else {
            return Ok(());
        };
        if run_state != run_status::RUNNING {
            return Ok(());
        }
        let Some(wf) = self.config.workflows.get(&workflow) else {
            let error = format!("workflow \"{workflow}\" is no longer configured");
            tx::finish_run(t, &run, run_status::FAILED, Some(&error), now)?;
            applied.finished_runs += 1;
            return Ok(());
        };
        let Some(step) = wf.step(&row.step) else {
            return Ok(());
        };
        let run_uuid = parse_uuid(&run);
        // Params are parsed only when a task has to be planned.
        let mut params: Option<BTreeMap<String, String>> = None;
        let mut params = |t: &Transaction<'_>| -> Result<BTreeMap<String, String>, DbError> {
            if params.is_none() {
                params = Some(serde_json::from_str(&tx::run_params(t, &run)?).unwrap_or_default());
            }
            Ok(params.clone().unwrap_or_default())
        };
        let mut states = Statuses::new(&run);
        // Only an agent step has a model, tokens and a transcript to record.
        if let (Some(model), StepRun::Agent(_)) = (&r.model, &step.run) {
            let usage = r.usage.unwrap_or_default();
            let transcript = serde_json::to_string(&r.transcript).unwrap_or_else(|_| "[]".into());
            tx::record_agent(
                t,
                &run,
                &step.name,
                model,
                (usage.input_tokens, usage.output_tokens),
                &transcript,
            )?;
        }

        match r.status {
            TaskStatus::Succeeded => {
                let worker = Some(r.worker_id.as_str());
                tx::finish_step(
                    t,
                    &run,
                    &step.name,
                    step_status::SUCCEEDED,
                    Some(&r.output),
                    None,
                    worker,
                    now,
                )?;
                states.set(&step.name, step_status::SUCCEEDED);
                effects.memory.extend(r.memory_updates.iter().map(|u| MemoryWrite {
                    run: run.clone(),
                    step: step.name.clone(),
                    workflow: workflow.clone(),
                    update: u.clone(),
                }));
                // Dispatch every dependent whose dependencies all succeeded.
                for s in wf.steps.iter().filter(|s| s.depends.contains(&step.name)) {
                    if states.get(t, &s.name)? != step_status::PENDING {
                        continue;
                    }
                    let mut ready = true;
                    for d in &s.depends {
                        ready &= states.get(t, d)? == step_status::SUCCEEDED;
                    }
                    if !ready {
                        continue;
                    }
                    let upstream = outputs(t, &run, wf, s)?;
                    match self.plan_task(wf, s, run_uuid, Attempt::first(now), &params(t)?, &upstream) {
                        Ok(task) => {
                            write_task(t, &run, s, task, now, effects)?;
                            states.set(&s.name, step_status::RUNNING);
                            applied.dispatched += 1;
                        }
                        Err(e) => fail_step(t, wf, &run, &s.name, &e.to_string(), "scheduler", now, &mut states)?,
                    }
                }
            }
            failed => {
                let error = r.error.clone().unwrap_or_else(|| failed.as_str().to_string());
                let retryable = failed != TaskStatus::Rejected;
                if retryable && row.attempt <= step.retry.limit {
                    let attempt = row.attempt + 1;
                    let delay = backoff(step, row.attempt);
                    let upstream = outputs(t, &run, wf, step)?;
                    let next = Attempt {
                        task_id: Uuid::now_v7(),
                        number: attempt,
                        due_ms: now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    };
                    match self.plan_task(wf, step, run_uuid, next, &params(t)?, &upstream) {
                        Ok(task) => {
                            tx::note_step_error(t, &run, &step.name, &error, &r.worker_id)?;
                            write_task(t, &run, step, task, now, effects)?;
                            applied.retried += 1;
                            tracing::info!(run = %run, trace_id = %trace_id(&run), step = %step.name, attempt, delay_ms = delay.as_millis() as u64, %error, "retrying step");
                            return Ok(());
                        }
                        Err(e) => {
                            let error = format!("{error}; retry impossible: {e}");
                            fail_step(t, wf, &run, &step.name, &error, &r.worker_id, now, &mut states)?;
                        }
                    }
                } else {
                    fail_step(t, wf, &run, &step.name, &error, &r.worker_id, now, &mut states)?;
                }
            }
        }

        // Finish the run when nothing is pending or running.
        if tx::open_steps(t, &run)? == 0 {
            let failed = tx::failed_steps(t, &run)?;
            if failed.is_empty() {
                tx::finish_run(t, &run, run_status::SUCCEEDED, None, now)?;
                tracing::info!(run = %run, trace_id = %trace_id(&run), status = run_status::SUCCEEDED, "run finished");
            } else {
                let error = format!("step(s) failed: {}", failed.join(", "));
                tx::finish_run(t, &run, run_status::FAILED, Some(&error), now)?;
                tracing::info!(run = %run, trace_id = %trace_id(&run), status = run_status::FAILED, %error, "run finished");
            }
            applied.finished_runs += 1;
        }
        Ok(())
    }

    /// Resolve a step and encode its task, with the cached snapshot. The
    /// task's deadline is its due time, plus the longest it may wait for a
    /// worker, plus the step's timeout: a worker refuses it after that (so a
    /// replayed task is refused too).
    fn plan_task(
        &self,
        wf: &Workflow,
        step: &Step,
        run_id: Uuid,
        attempt: Attempt,
        params: &BTreeMap<String, String>,
        upstream: &BTreeMap<String, String>,
    ) -> Result<PlannedTask, SubmitError> {
        let spec = step
            .resolve(params, upstream, self.limits.task.max_decompressed)
            .map_err(|message| SubmitError::Template {
                step: step.name.clone(),
                message,
            })?;
        let snapshot = self.snapshot(wf, step)?;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let task = Task {
            task_id: attempt.task_id,
            run_id,
            workflow: wf.name.clone(),
            step: step.name.clone(),
            attempt: attempt.number,
            deadline_unix_ms: u64::try_from(attempt.due_ms)
                .unwrap_or(0)
                .saturating_add(millis(self.limits.max_queue_wait))
                .saturating_add(millis(spec.timeout)),
            spec,
            upstream: upstream.clone(),
            snapshot: snapshot.bytes.clone(),
            pool: step.queue.clone(),
        };
        let body = encode(&task, &self.limits.task).map_err(|source| SubmitError::TooLarge {
            step: step.name.clone(),
            source,
        })?;
        Ok(PlannedTask {
            task_id: attempt.task_id.to_string(),
            attempt: attempt.number,
            due_ms: attempt.due_ms,
            snapshot_hash: snapshot.hash.clone(),
            body,
        })
    }

    /// The step's encoded snapshot: built once, then served from the cache.
    fn snapshot(&self, wf: &Workflow, step: &Step) -> Result<Arc<EncodedSnapshot>, SubmitError> {
        let key = (wf.name.clone(), step.name.clone());
        if let Some(hit) = self
            .snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(hit.clone());
        }
        let snapshot =
            build_snapshot(&self.config.store, &wf.name, &step.run).map_err(|source| SubmitError::Snapshot {
                step: step.name.clone(),
                source,
            })?;
        let bytes = encode(&snapshot, &self.limits.snapshot).map_err(|source| SubmitError::TooLarge {
            step: step.name.clone(),
            source,
        })?;
        let encoded = Arc::new(EncodedSnapshot {
            hash: ContentHash::of(&bytes).to_hex(),
            bytes,
        });
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, encoded.clone());
        Ok(encoded)
    }

    /// Forget cached snapshots (after the resources they hold changed).
    pub fn invalidate_snapshots(&self) {
        self.snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// Which attempt a task is, and when it is due.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    task_id: Uuid,
    number: u32,
    due_ms: i64,
}

impl Attempt {
    /// A step's first attempt, due now.
    fn first(now: i64) -> Self {
        Self {
            task_id: Uuid::now_v7(),
            number: 1,
            due_ms: now,
        }
    }
}

/// An encoded task ready for the outbox.
#[derive(Debug)]
struct PlannedTask {
    task_id: String,
    attempt: u32,
    due_ms: i64,
    snapshot_hash: String,
    body: Vec<u8>,
}

fn write_task(
    t: &Transaction<'_>,
    run: &str,
    step: &Step,
    task: PlannedTask,
    now: i64,
    effects: &mut Effects,
) -> Result<(), DbError> {
    tx::insert_task(
        t,
        &task.task_id,
        run,
        &step.name,
        task.attempt,
        &step.queue,
        &task.snapshot_hash,
        task.due_ms,
        now,
    )?;
    tx::start_step(t, run, &step.name, task.attempt, now)?;
    effects.written.push((task.task_id, task.body));
    Ok(())
}

/// Fail a step and skip everything downstream of it.
#[allow(clippy::too_many_arguments)]
fn fail_step(
    t: &Transaction<'_>,
    wf: &Workflow,
    run: &str,
    name: &str,
    error: &str,
    worker: &str,
    now: i64,
    states: &mut Statuses<'_>,
) -> Result<(), DbError> {
    tx::finish_step(t, run, name, step_status::FAILED, None, Some(error), Some(worker), now)?;
    states.set(name, step_status::FAILED);
    let mut failed = vec![name.to_string()];
    while let Some(up) = failed.pop() {
        for s in wf.steps.iter().filter(|s| s.depends.contains(&up)) {
            if states.get(t, &s.name)? == step_status::PENDING {
                let why = format!("upstream step \"{up}\" failed");
                tx::finish_step(t, run, &s.name, step_status::SKIPPED, None, Some(&why), None, now)?;
                states.set(&s.name, step_status::SKIPPED);
                failed.push(s.name.clone());
            }
        }
    }
    Ok(())
}

/// Step statuses of one run, read on first use and kept up to date.
struct Statuses<'a> {
    run: &'a str,
    known: BTreeMap<String, String>,
}

impl<'a> Statuses<'a> {
    fn new(run: &'a str) -> Self {
        Self {
            run,
            known: BTreeMap::new(),
        }
    }

    fn get(&mut self, t: &Transaction<'_>, name: &str) -> Result<String, DbError> {
        if let Some(status) = self.known.get(name) {
            return Ok(status.clone());
        }
        let status = tx::step_status(t, self.run, name)?.unwrap_or_default();
        self.known.insert(name.to_string(), status.clone());
        Ok(status)
    }

    fn set(&mut self, name: &str, status: &str) {
        self.known.insert(name.to_string(), status.to_string());
    }
}

/// Outputs of every succeeded ancestor of `step`, read from the database.
fn outputs(t: &Transaction<'_>, run: &str, wf: &Workflow, step: &Step) -> Result<BTreeMap<String, String>, DbError> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = step.depends.iter().map(String::as_str).collect();
    while let Some(name) = todo.pop() {
        if !seen.insert(name) {
            continue;
        }
        if let Some(output) = tx::step_output(t, run, name)? {
            out.insert(name.to_string(), output);
        }
        if let Some(s) = wf.step(name) {
            todo.extend(s.depends.iter().map(String::as_str));
        }
    }
    Ok(out)
}

/// Delay before attempt `failed_attempt + 1`: `backoff * 2^(n-1)`, at most
/// `max_backoff`, with up to 20% jitter subtracted so retries of many steps
/// do not arrive together.
fn backoff(step: &Step, failed_attempt: u32) -> Duration {
    let exp = step
        .retry
        .backoff
        .saturating_mul(1u32 << failed_attempt.saturating_sub(1).min(20));
    let capped = exp.min(step.retry.max_backoff);
    let jitter = fastrand::u32(0..=20); // percent
    capped.saturating_sub(capped * jitter / 100)
}

/// The W3C trace ID of a run (its tasks carry it in `traceparent`), for logs.
pub(crate) fn trace_id(run: &str) -> String {
    courier_wire::TraceParent::run_trace_id(parse_uuid(run))
}

fn parse_uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap_or(Uuid::nil())
}
