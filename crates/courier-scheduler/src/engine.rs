//! The run engine: turns submissions and results into state changes and
//! outbox tasks, each in one SQLite transaction.
//!
//! **Invariant:** a result is applied once. A result whose task row is no
//! longer `dispatched` (already applied, or unknown) changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_config::{Config, ParamError, Step, StoreError, Workflow, build_snapshot};
use courier_wire::{ContentHash, Limits, Task, TaskResult, TaskStatus, WireError, encode};
use rusqlite::Transaction;
use uuid::Uuid;

use crate::db::{Db, DbError, RunView, run_status, step_status, tx};

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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
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
}

/// Size bounds the engine enforces before anything is published.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineLimits {
    /// Snapshot frames.
    pub snapshot: Limits,
    /// Task frames (which embed the snapshot).
    pub task: Limits,
}

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
        }
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
            .map(|s| Ok((s, self.plan_task(wf, s, run_id, 1, &params, &BTreeMap::new())?)))
            .collect::<Result<_, SubmitError>>()?;
        let params_json = serde_json::to_string(&params).unwrap_or_else(|_| "{}".into());
        let run = run_id.to_string();
        self.with_db(|db| {
            db.transaction(|t| {
                tx::insert_run(t, &run, &wf.name, &params_json, now)?;
                for (i, s) in wf.steps.iter().enumerate() {
                    tx::insert_step(t, &run, &s.name, i, &s.queue)?;
                }
                for (step, task) in &first {
                    write_task(t, &run, step, task, now, now)?;
                }
                Ok::<_, DbError>(())
            })?;
            Ok(db.run(&run)?.ok_or(DbError::QueryReturnedNoRows)?)
        })
    }

    /// Apply a batch of results in one transaction.
    ///
    /// # Errors
    /// The database failed; nothing of the batch was applied.
    pub fn apply(&self, results: &[TaskResult]) -> Result<Applied, DbError> {
        let now = now_ms();
        self.with_db(|db| {
            db.transaction(|t| {
                let mut applied = Applied::default();
                for result in results {
                    self.apply_one(t, result, now, &mut applied)?;
                }
                Ok(applied)
            })
        })
    }

    fn apply_one(&self, t: &Transaction<'_>, r: &TaskResult, now: i64, applied: &mut Applied) -> Result<(), DbError> {
        let task_id = r.task_id.to_string();
        let Some(row) = tx::task(t, &task_id)? else {
            tracing::warn!(task = %task_id, "result for an unknown task; ignored");
            applied.duplicates += 1;
            return Ok(());
        };
        if row.status != "dispatched" {
            tracing::debug!(task = %task_id, "duplicate result; ignored");
            applied.duplicates += 1;
            return Ok(());
        }
        applied.applied += 1;
        tx::finish_task(t, &task_id, r.status.as_str(), now)?;
        let run = row.run_id.clone();
        let Some((workflow, params_json, run_state)) = tx::run(t, &run)? else {
            return Ok(());
        };
        if run_state != run_status::RUNNING {
            return Ok(());
        }
        let steps = tx::steps(t, &run)?;
        let Some(wf) = self.config.workflows.get(&workflow) else {
            tx::finish_run(
                t,
                &run,
                run_status::FAILED,
                Some(&format!("workflow \"{workflow}\" is no longer configured")),
                now,
            )?;
            applied.finished_runs += 1;
            return Ok(());
        };
        let Some(step) = wf.step(&row.step) else {
            return Ok(());
        };
        let params: BTreeMap<String, String> = serde_json::from_str(&params_json).unwrap_or_default();
        let mut states: BTreeMap<String, (String, Option<String>)> = steps
            .iter()
            .map(|s| (s.name.clone(), (s.status.clone(), s.output.clone())))
            .collect();

        match r.status {
            TaskStatus::Succeeded => {
                tx::finish_step(
                    t,
                    &run,
                    &step.name,
                    step_status::SUCCEEDED,
                    Some(&r.output),
                    None,
                    Some(&r.worker_id),
                    now,
                )?;
                states.insert(
                    step.name.clone(),
                    (step_status::SUCCEEDED.into(), Some(r.output.clone())),
                );
            }
            failed => {
                let error = r.error.clone().unwrap_or_else(|| failed.as_str().to_string());
                let retryable = failed != TaskStatus::Rejected;
                if retryable && row.attempt <= step.retry.limit {
                    let attempt = row.attempt + 1;
                    let delay = backoff(step, row.attempt);
                    match self.plan_task(
                        wf,
                        step,
                        parse_uuid(&run),
                        attempt,
                        &params,
                        &outputs(wf, step, &states),
                    ) {
                        Ok(task) => {
                            tx::note_step_error(t, &run, &step.name, &error, &r.worker_id)?;
                            write_task(
                                t,
                                &run,
                                step,
                                &task,
                                now,
                                now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                            )?;
                            applied.retried += 1;
                            tracing::info!(run = %run, step = %step.name, attempt, delay_ms = delay.as_millis() as u64, %error, "retrying step");
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

        // Dispatch every step whose dependencies all succeeded.
        let run_uuid = parse_uuid(&run);
        for s in &wf.steps {
            let pending = states.get(&s.name).is_some_and(|(st, _)| st == step_status::PENDING);
            let ready = s
                .depends
                .iter()
                .all(|d| states.get(d).is_some_and(|(st, _)| st == step_status::SUCCEEDED));
            if !(pending && ready) {
                continue;
            }
            match self.plan_task(wf, s, run_uuid, 1, &params, &outputs(wf, s, &states)) {
                Ok(task) => {
                    write_task(t, &run, s, &task, now, now)?;
                    states.insert(s.name.clone(), (step_status::RUNNING.into(), None));
                    applied.dispatched += 1;
                }
                Err(e) => fail_step(t, wf, &run, &s.name, &e.to_string(), "scheduler", now, &mut states)?,
            }
        }

        // Finish the run when nothing is pending or running.
        let open = states
            .values()
            .any(|(st, _)| st == step_status::PENDING || st == step_status::RUNNING);
        if !open {
            let failed: Vec<&String> = states
                .iter()
                .filter(|(_, (st, _))| st == step_status::FAILED)
                .map(|(name, _)| name)
                .collect();
            if failed.is_empty() {
                tx::finish_run(t, &run, run_status::SUCCEEDED, None, now)?;
            } else {
                let names = failed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
                tx::finish_run(
                    t,
                    &run,
                    run_status::FAILED,
                    Some(&format!("step(s) failed: {names}")),
                    now,
                )?;
            }
            applied.finished_runs += 1;
        }
        Ok(())
    }

    /// Resolve a step and encode its task, with the cached snapshot.
    fn plan_task(
        &self,
        wf: &Workflow,
        step: &Step,
        run_id: Uuid,
        attempt: u32,
        params: &BTreeMap<String, String>,
        upstream: &BTreeMap<String, String>,
    ) -> Result<PlannedTask, SubmitError> {
        let spec = step
            .resolve(params, upstream)
            .map_err(|message| SubmitError::Template {
                step: step.name.clone(),
                message,
            })?;
        let snapshot = self.snapshot(wf, step)?;
        let task_id = Uuid::now_v7();
        let task = Task {
            task_id,
            run_id,
            workflow: wf.name.clone(),
            step: step.name.clone(),
            attempt,
            deadline_unix_ms: u64::try_from(now_ms()).unwrap_or(0)
                + u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
            spec,
            upstream: upstream.clone(),
            snapshot: snapshot.bytes.clone(),
        };
        let body = encode(&task, &self.limits.task).map_err(|source| SubmitError::TooLarge {
            step: step.name.clone(),
            source,
        })?;
        Ok(PlannedTask {
            task_id: task_id.to_string(),
            attempt,
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

/// An encoded task ready for the outbox.
#[derive(Debug)]
struct PlannedTask {
    task_id: String,
    attempt: u32,
    snapshot_hash: String,
    body: Vec<u8>,
}

fn write_task(
    t: &Transaction<'_>,
    run: &str,
    step: &Step,
    task: &PlannedTask,
    now: i64,
    not_before: i64,
) -> Result<(), DbError> {
    tx::insert_task(
        t,
        &task.task_id,
        run,
        &step.name,
        task.attempt,
        &step.queue,
        &task.snapshot_hash,
        &task.body,
        not_before,
        now,
    )?;
    tx::start_step(t, run, &step.name, task.attempt, now)
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
    states: &mut BTreeMap<String, (String, Option<String>)>,
) -> Result<(), DbError> {
    tx::finish_step(t, run, name, step_status::FAILED, None, Some(error), Some(worker), now)?;
    states.insert(name.to_string(), (step_status::FAILED.into(), None));
    let mut failed = vec![name.to_string()];
    while let Some(up) = failed.pop() {
        for s in wf.steps.iter().filter(|s| s.depends.contains(&up)) {
            if states.get(&s.name).is_some_and(|(st, _)| st == step_status::PENDING) {
                let why = format!("upstream step \"{up}\" failed");
                tx::finish_step(t, run, &s.name, step_status::SKIPPED, None, Some(&why), None, now)?;
                states.insert(s.name.clone(), (step_status::SKIPPED.into(), None));
                failed.push(s.name.clone());
            }
        }
    }
    Ok(())
}

/// Outputs of every succeeded ancestor of `step`.
fn outputs(
    wf: &Workflow,
    step: &Step,
    states: &BTreeMap<String, (String, Option<String>)>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo: Vec<&str> = step.depends.iter().map(String::as_str).collect();
    while let Some(name) = todo.pop() {
        if out.contains_key(name) {
            continue;
        }
        if let Some((_, Some(output))) = states.get(name) {
            out.insert(name.to_string(), output.clone());
        }
        if let Some(s) = wf.step(name) {
            todo.extend(s.depends.iter().map(String::as_str));
        }
    }
    out
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

fn parse_uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap_or(Uuid::nil())
}
