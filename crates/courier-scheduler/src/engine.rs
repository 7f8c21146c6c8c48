//! The run engine: turns submissions, results, cancellations and the clock
//! into state changes and outbox tasks, each in one SQLite transaction.
//!
//! **Invariant:** a result is applied once. A result whose task row is no
//! longer `dispatched` (already applied, or unknown) changes nothing; one for
//! a cancelled run or step is recorded (its task row, its tokens and cost)
//! and changes nothing else.
//!
//! **Invariant:** limits are enforced here, at dispatch, from counts in the
//! database: a step that a limit holds is `waiting` (its `waiting_on` names
//! the limit) and [`Engine::admit`] dispatches waiting steps, highest
//! priority first, as the limits allow.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::db::Tx;
use courier_config::output_schema;
use courier_config::template::{Item, Values};
use courier_config::{
    AgentStore, Config, MAX_PROPOSAL_BYTES, MAX_PROPOSALS, MemoryScope, OnSkipped, PROPOSE_MEMORY_TOOL, ParamError,
    Step, StoreError, Workflow, build_snapshot,
};
use courier_wire::{
    ContentHash, Limits, MemoryTarget, MemoryUpdate, ModelLimits, Pricing, StepRun, Task, TaskResult, TaskStatus,
    WireError, encode, encode_message,
};
use uuid::Uuid;

use crate::db::tx::{self, NewTask, RunRow};

mod flow;
pub mod gate;
use crate::db::{Db, DbError, OutboxTask, RunStatus, RunView, StepStatus, TaskRow};
use flow::{item_value, step_of};

/// Why a submission was refused; nothing was stored or published.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No workflow of that name.
    #[error("unknown workflow {} (known: {known})", crate::quoted(name))]
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
    /// The priority is out of range.
    #[error("priority {0} is out of range: use 0 (lowest) to {MAX_PRIORITY} (highest); {NORMAL_PRIORITY} is normal")]
    Priority(i64),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// Why a cancellation was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No run of that id.
    #[error("no run {}", crate::quoted(.0))]
    NotFound(String),
    /// The run already ended.
    #[error("run {run} already {status}: there is nothing to cancel")]
    Finished { run: String, status: RunStatus },
    /// The run has no step of that name.
    #[error("run {run} has no step {}", crate::quoted(step))]
    NoStep { run: String, step: String },
    /// The step already ended.
    #[error("step \"{step}\" of run {run} already {status}: there is nothing to cancel")]
    StepFinished {
        run: String,
        step: String,
        status: StepStatus,
    },
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// Why an approval decision was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No run of that id.
    #[error("no run {}", crate::quoted(.0))]
    NotFound(String),
    /// The run has no step of that name.
    #[error("run {run} has no step {}", crate::quoted(step))]
    NoStep { run: String, step: String },
    /// The step is not waiting for approval (or its run ended).
    #[error("step \"{step}\" of run {run} is {status}, not waiting for approval")]
    NotWaiting {
        run: String,
        step: String,
        status: StepStatus,
    },
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// What a cancellation did.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// The run as it is now.
    pub run: RunView,
    /// What it did, counted as a pass of results is: runs cancelled (none
    /// when it was already cancelled; one when the step cancelled was its
    /// run's last open one) and their children, and waiting steps it let go
    /// (their slots were freed).
    pub applied: Applied,
}

/// Lowest to highest priority: 0 to this.
pub const MAX_PRIORITY: u8 = 9;

/// The most steps a workflow has for its runs to be small: their tasks take
/// their pools' lanes, so that they do not wait behind wide runs' tasks in
/// the broker (see `courier_amqp::lane_key`).
pub const LANE_STEPS: usize = 8;

/// Whether a workflow's runs are small: at most [`LANE_STEPS`] steps, none a
/// `foreach` (whose items are steps too).
pub fn small(wf: &Workflow) -> bool {
    wf.steps().len() <= LANE_STEPS && wf.steps().iter().all(|s| s.foreach.is_none())
}

/// The routing key of the tasks a workflow's step of `pool` sends, also
/// their gate's key: the pool, or its lane for a small run.
fn route<'a>(wf: &Workflow, pool: &'a str) -> std::borrow::Cow<'a, str> {
    if small(wf) {
        courier_amqp::lane_key(pool).into()
    } else {
        pool.into()
    }
}
/// The priority of a run that asks for none.
pub const NORMAL_PRIORITY: u8 = 4;

/// Counts from applying a batch of results (or a tick of the clock).
#[derive(Debug, Default, Clone, PartialEq)]
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
    /// Runs that ended (succeeded, failed or cancelled).
    pub finished_runs: usize,
    /// Runs cancelled (by their timeout or budget here), among those.
    pub cancelled_runs: usize,
    /// Memory proposals of succeeded steps that could not be written.
    pub memory_not_written: usize,
    /// What agent steps spent: (model ID, input tokens, output tokens, cost).
    pub spend: Vec<(String, u64, u64, Option<f64>)>,
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
#[derive(Debug, Clone)]
pub struct EngineLimits {
    /// Snapshot frames.
    pub snapshot: Limits,
    /// Task frames (which embed the snapshot).
    pub task: Limits,
    /// The longest a task may wait for a worker once due; it expires after
    /// that (plus its step's timeout).
    pub max_queue_wait: Duration,
    /// Tasks without a result per pool at most (`pools.<name>.max_in_flight`).
    pub pool_in_flight: BTreeMap<String, u32>,
    /// Tasks waiting in a pool's broker queue at most
    /// (`pools.<name>.max_queued`; 0: no limit; its lane's and, while the
    /// lane is busy, its own up to [`gate::LANE_MAX_QUEUED`]), see [`gate`].
    pub pool_queued: BTreeMap<String, u32>,
    /// The same, for pools `pool_queued` does not name.
    pub default_queued: u32,
    /// How long a pool's lane stays busy after its last use
    /// ([`gate::LANE_QUIET`]).
    pub lane_quiet: Duration,
    /// How long after its deadline a task without a result counts as lost.
    pub lost_task_grace: Duration,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            snapshot: Limits::default(),
            task: Limits::default(),
            max_queue_wait: DEFAULT_MAX_QUEUE_WAIT,
            pool_in_flight: BTreeMap::new(),
            pool_queued: BTreeMap::new(),
            default_queued: 0,
            lane_quiet: gate::LANE_QUIET,
            lost_task_grace: LOST_TASK_GRACE,
        }
    }
}

/// How long a task may wait for a worker by default: a day.
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A dispatched task with no result this long after its deadline is lost:
/// its step is failed as timed out (the worker that had it died, or it was
/// refused without an answer).
pub const LOST_TASK_GRACE: Duration = Duration::from_secs(60);

/// How often the tasks in flight are scanned for lost ones (more often when
/// the grace is shorter).
const LOST_TASK_SCAN: Duration = Duration::from_secs(10);

/// How often the clock runs an admission pass past the gates' early stop
/// (see `Engine::admission`): steps of other pools behind a backlog at
/// shut gates wait this long at most for one.
const FULL_ADMISSION: Duration = Duration::from_secs(5);

/// Waiting steps looked at per admission pass, at most.
const ADMIT_BATCH: usize = 10_000;

/// Waiting steps read at a time in an admission pass, the first time;
/// each chunk after it is twice the one before, up to [`ADMIT_CHUNK`].
const ADMIT_FIRST: usize = 32;

/// Waiting steps read at a time in an admission pass, at most.
const ADMIT_CHUNK: usize = 256;
const _: () = assert!(ADMIT_FIRST >= 2 && ADMIT_FIRST <= ADMIT_CHUNK);

/// Turns of one priority (see `Engine::turn`).
const TURNS: i64 = 1 << 40;

/// Tokens an agent request is assumed to produce when its model gives no `max_tokens`.
const DEFAULT_OUTPUT_ESTIMATE: i64 = 1024;

/// An encoded snapshot and its hash, cached per (workflow, step).
#[derive(Debug)]
struct EncodedSnapshot {
    bytes: Vec<u8>,
    hash: String,
}

/// What the engine needs of a model: its prices and limits.
#[derive(Debug, Clone)]
struct ModelTerms {
    pricing: Option<Pricing>,
    limits: ModelLimits,
    max_tokens: Option<u32>,
}

/// The engine: config, database, snapshot cache.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    db: Mutex<Db>,
    limits: EngineLimits,
    models: HashMap<String, ModelTerms>,
    /// The agent config's default model, for agent steps that name none.
    default_model: Option<String>,
    /// When the tasks in flight were last scanned for lost ones (ms).
    lost_scan: AtomicI64,
    /// When the clock last ran a full admission pass (ms).
    full_admission: AtomicI64,
    snapshots: Mutex<HashMap<(String, String), Arc<EncodedSnapshot>>>,
    /// What is kept for the outbox from commit to publish.
    outbox: Mutex<Outbox>,
    /// This scheduler publishes the outbox (it leads): only then are bodies
    /// kept for the publisher.
    publishing: std::sync::atomic::AtomicBool,
    /// The database is PostgreSQL, shared with other schedulers.
    shared_db: bool,
    /// Submitted runs waiting to be written (see [`Engine::write_queued`]).
    queued: Mutex<Vec<QueuedRun>>,
    /// Each pool's broker queue kept short (while this scheduler publishes).
    gates: gate::Gates,
    /// A limit counted over what runs is configured (`max_active_*`, a
    /// pool's `max_in_flight`, a model's): a finished task may free a
    /// place for a waiting step.
    counted_limits: bool,
}

/// A submitted run, planned, waiting for whichever submitter holds the
/// database next to write it with every other one waiting then: one
/// transaction (one commit, and the pages they share written once) for
/// all the runs submitted while the previous one committed.
#[derive(Debug)]
struct QueuedRun {
    workflow: String,
    run: String,
    params: BTreeMap<String, String>,
    priority: u8,
    deadline: Option<i64>,
    /// The cron tick it is the run of, if any (fired once across schedulers).
    tick: Option<i64>,
    /// When it was submitted: its runs' and first steps' times.
    now: i64,
    /// Its first tasks, by the index of their step in the workflow.
    first: Vec<(usize, PlannedTask)>,
    /// Told once the transaction that wrote it ended: whether it started.
    written: std::sync::mpsc::SyncSender<Result<bool, DbError>>,
}

/// Memory for encoded tasks waiting to be published; past it, the outbox
/// rebuilds tasks from the database instead, so a burst of submissions cannot
/// grow the scheduler without bound.
pub const MAX_KEPT_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A task ready to publish: its outbox row (with the hash of the snapshot
/// its body carries) and its encoded body.
pub type ReadyTask = (OutboxTask, Vec<u8>);

/// What the engine keeps for the outbox from commit to publish, so that the
/// publisher need not read back what was just written.
#[derive(Debug, Default)]
struct Outbox {
    /// Encoded tasks committed and not yet published, by task id.
    bodies: HashMap<String, Vec<u8>>,
    /// Their total size (at most [`MAX_KEPT_BODY_BYTES`]).
    bytes: usize,
    /// The rows of the tasks committed since the outbox last read the
    /// database, in commit order, each with its body in `bodies`.
    fresh: std::collections::VecDeque<OutboxTask>,
    /// `fresh` holds every task the outbox has yet to see: it may take
    /// them instead of reading the database. Set by a read that found the
    /// whole outbox; cleared when a task is committed without its body kept
    /// (over the budget), when the outbox asks (`Engine::outbox_incomplete`:
    /// a new broker connection, a delay queue refused), and never set with a
    /// database shared with other schedulers (their tasks are not here).
    complete: bool,
    /// Raised by each `Engine::outbox_incomplete`: a read begun before
    /// (by an outbox loop since stopped, say) speaks for nothing now.
    generation: u64,
}

/// Rows kept for the outbox at most (each with its body, within
/// [`MAX_KEPT_BODY_BYTES`]): past them, the outbox reads the database.
const MAX_FRESH_ROWS: usize = 65_536;

/// What a transaction produced that is acted on after it commits.
#[derive(Debug, Default)]
struct Effects {
    /// Tasks written: their outbox row and encoded body, as many bodies as
    /// fit in [`MAX_KEPT_BODY_BYTES`] (the outbox builds the others again):
    /// a foreach starting 10,000 items of 300 KiB each holds 16 MiB, not 3 GB.
    written: Vec<(OutboxTask, Vec<u8>)>,
    /// Bytes of the bodies in `written`.
    written_bytes: usize,
    /// A task was written whose body is not in `written`.
    unkept: bool,
    /// Runs' priorities, as read in this transaction (for outbox rows).
    priorities: HashMap<String, u8>,
    /// Memory proposals of succeeded steps.
    memory: Vec<MemoryWrite>,
    /// Steps were put to wait, or slots were freed: run admission.
    admit: bool,
    /// Tasks cancelled before they were published: their kept bodies go.
    dropped: Vec<String>,
    /// Child runs that ended: (child, parent run, parent step), for the
    /// parent's step to go on (in the same transaction).
    children_done: Vec<(String, String, String)>,
    /// The run whose last results may have ended its last open step: it is
    /// ended (if nothing is left open) when a result of another run comes
    /// and at the end of the batch, not after each result (see
    /// `end_finished_runs`; a result that spent tokens ends its run at once).
    maybe_done: Option<String>,
    /// The next turn of each run (and pool) that started waiting (see
    /// `Engine::turn`).
    turns: HashMap<(String, String), i64>,
    /// Steps ended, by run: each run's count of open steps goes down by
    /// them in one statement, before the count is read and before the
    /// commit (see `end_step`).
    closed: HashMap<String, i64>,
}

/// A run to create: by a submit, or by a `workflow:` step (`parent`: its
/// run, its step, and the child's depth).
struct NewRun<'a> {
    id: &'a str,
    params: &'a BTreeMap<String, String>,
    priority: u8,
    deadline: Option<i64>,
    parent: Option<(&'a str, &'a str, u32)>,
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

/// One transaction's context: the run being changed and what it produced.
struct Change<'a, 't> {
    t: &'a Tx<'t>,
    gates: &'a gate::Gates,
    now: i64,
    applied: &'a mut Applied,
    effects: &'a mut Effects,
}

impl Engine {
    /// An engine over a loaded config and an open database.
    pub fn new(config: Config, db: Db, limits: EngineLimits) -> Self {
        use courier_config::AgentStore as _;
        let db_shared = db.is_shared();
        let default_model = config.store.agent_config().ok().map(|a| a.default_model);
        let models: HashMap<String, ModelTerms> = config
            .store
            .model_ids()
            .filter_map(|id| {
                let def = config.store.model(id).ok()?;
                Some((
                    id.to_string(),
                    ModelTerms {
                        pricing: def.pricing,
                        limits: def.limits,
                        max_tokens: def.max_tokens,
                    },
                ))
            })
            .collect();
        // The pools the broker has queues for (see `Engine::pools`).
        let gates = gate::Gates::with_quiet(
            pools_of(&config).into_iter().map(|pool| {
                let limit = limits.pool_queued.get(&pool).copied().unwrap_or(limits.default_queued);
                (pool, limit)
            }),
            limits.lane_quiet,
        );
        let counted_limits = !limits.pool_in_flight.is_empty()
            || models.values().any(|m| m.limits.any())
            || config
                .workflows
                .values()
                .any(|wf| wf.max_active_runs.is_some() || wf.max_active_steps.is_some());
        Self {
            gates,
            counted_limits,
            config,
            db: Mutex::new(db),
            limits,
            models,
            default_model,
            lost_scan: AtomicI64::new(0),
            full_admission: AtomicI64::new(0),
            snapshots: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Outbox::default()),
            publishing: std::sync::atomic::AtomicBool::new(true),
            shared_db: db_shared,
            queued: Mutex::new(Vec::new()),
        }
    }

    /// Whether the database is PostgreSQL, shared with other schedulers.
    pub fn shares_database(&self) -> bool {
        self.shared_db
    }

    /// Whether this scheduler publishes the outbox. One that does not (it
    /// waits to lead) keeps no encoded tasks: the leader rebuilds them.
    /// A scheduler that starts publishing (it leads now, after another did)
    /// reads the memory files again, which the other may have appended to,
    /// and builds its snapshots afresh.
    pub fn set_publishing(&self, on: bool) {
        let was = self.publishing.swap(on, std::sync::atomic::Ordering::Relaxed);
        if was != on {
            // What it counted unpublished, another may have published.
            self.gates.outbox_empty(self.gates.seq());
        }
        if !on {
            *self.kept() = Outbox::default();
        } else if !was && self.shared_db {
            self.config.store.reload_memory();
            self.invalidate_snapshots();
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where the outbox's reads stand: taken before a read of the database,
    /// and given back with it to [`Engine::outbox_read`].
    pub fn outbox_generation(&self) -> u64 {
        self.kept().generation
    }

    /// The outbox read the database (under its lock, so no commit came
    /// between), and found `rows` (the whole outbox unless `full`; tasks
    /// awaiting confirms are left out of reads, their bodies taken). The
    /// fresh rows committed before are among them, or beyond a full read:
    /// forgotten. After a whole read, the bodies of anything else will never
    /// be sent (such as tasks another scheduler cancelled), and from then on
    /// the fresh rows are every task to publish. A read begun before the
    /// last [`Engine::outbox_incomplete`] (`generation`) changes nothing:
    /// false, and its rows are not to be published.
    pub fn outbox_read(&self, rows: &[OutboxTask], full: bool, generation: u64) -> bool {
        let mut kept = self.kept();
        if kept.generation != generation {
            return false;
        }
        kept.fresh.clear();
        kept.complete = !full && !self.shared_db;
        if !full {
            let waiting: HashSet<&str> = rows.iter().map(|r| r.task_id.as_str()).collect();
            let Outbox { bodies, bytes, .. } = &mut *kept;
            bodies.retain(|id, body| {
                let keep = waiting.contains(id.as_str());
                if !keep {
                    *bytes -= body.len();
                }
                keep
            });
        }
        true
    }

    /// The outbox must read the database before it takes fresh rows again:
    /// a broker connection starts (what was published unconfirmed on the
    /// last one goes again), a task could not be routed yet, or confirmed
    /// tasks could not be marked published.
    pub fn outbox_incomplete(&self) {
        let mut kept = self.kept();
        kept.complete = false;
        kept.generation += 1;
    }

    /// Up to `max` tasks committed since the outbox last read the database,
    /// oldest first, with their bodies, and whether more
    /// are left; `None` when the outbox must read the database instead (see
    /// [`Outbox::complete`]).
    pub fn take_fresh(&self, max: usize) -> Option<(Vec<ReadyTask>, bool)> {
        let mut kept = self.kept();
        if !kept.complete {
            return None;
        }
        let mut due = Vec::with_capacity(max.min(kept.fresh.len()));
        while due.len() < max {
            let Some(row) = kept.fresh.pop_front() else { break };
            let Some(body) = kept.bodies.remove(&row.task_id) else {
                // Not expected (a dropped task leaves `fresh` too): the
                // database has it, so read it there.
                kept.complete = false;
                return Some((due, true));
            };
            kept.bytes -= body.len();
            due.push((row, body));
        }
        let more = !kept.fresh.is_empty();
        Some((due, more))
    }

    /// Keep the rows and bodies of a committed transaction's new tasks for
    /// the outbox (within the budget), and forget those of tasks it
    /// cancelled. Called with the database still held: the outbox reads its
    /// rows under the same lock, so it never finds a committed task whose
    /// body is not kept yet (it would build the task again).
    fn keep_bodies(&self, written: Vec<(OutboxTask, Vec<u8>)>, unkept: bool, dropped: &[String]) {
        let mut kept = self.kept();
        let kept = &mut *kept;
        for id in dropped {
            if let Some(body) = kept.bodies.remove(id) {
                kept.bytes -= body.len();
            }
        }
        // A task written and dropped in one transaction (its run failed or
        // was cancelled later in it) is never sent.
        let dropped: HashSet<&str> = dropped.iter().map(String::as_str).collect();
        if !dropped.is_empty() {
            kept.fresh.retain(|row| !dropped.contains(row.task_id.as_str()));
        }
        if !self.publishing.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        kept.complete &= !unkept;
        let written = written
            .into_iter()
            .filter(|(row, _)| !dropped.contains(row.task_id.as_str()));
        for (row, body) in written {
            if kept.bytes + body.len() > MAX_KEPT_BODY_BYTES || kept.fresh.len() >= MAX_FRESH_ROWS {
                kept.complete = false;
                break;
            }
            kept.bytes += body.len();
            kept.bodies.insert(row.task_id.clone(), body);
            // Rows another scheduler's outbox could not be handed anyway.
            if !self.shared_db {
                kept.fresh.push_back(row);
            }
        }
    }

    /// Act on a committed transaction once the database is free again:
    /// apply memory proposals to the store, each step's (each foreach
    /// item's) within [`MAX_PROPOSALS`] and [`MAX_PROPOSAL_BYTES`] in all.
    /// A proposal that is not written is recorded as its step's error, the
    /// first such reason once per step (the step stays succeeded); returns
    /// how many were not written.
    fn after_commit(&self, effects: Effects) -> usize {
        if effects.memory.is_empty() {
            return 0;
        }
        let mut not_written = 0;
        // A step's proposals are consecutive: its count and bytes so far,
        // and why the first of them not written was not, with how many.
        let mut step: Option<(&str, &str)> = None;
        let (mut count, mut bytes) = (0, 0);
        let mut errors: Vec<(&str, &str, String, usize)> = Vec::new();
        for write in &effects.memory {
            let this = (write.run.as_str(), write.step.as_str());
            if step != Some(this) {
                (step, count, bytes) = (Some(this), 0, 0);
            }
            count += 1;
            bytes += write.update.append.len();
            let scope = match write.update.target {
                MemoryTarget::Global => MemoryScope::Global,
                MemoryTarget::Workflow => MemoryScope::Workflow(&write.workflow),
            };
            let written = if count > MAX_PROPOSALS {
                Err(format!("a step makes at most {MAX_PROPOSALS} memory proposals"))
            } else if bytes > MAX_PROPOSAL_BYTES {
                Err(format!(
                    "a step proposes at most {MAX_PROPOSAL_BYTES} bytes of memory in all"
                ))
            } else {
                self.config
                    .store
                    .append_memory(scope, &write.update.append)
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(()) => tracing::info!(workflow = %write.workflow, ?write.update.target, "memory updated"),
                Err(e) => {
                    not_written += 1;
                    match errors.last_mut() {
                        Some((run, name, _, more)) if (*run, *name) == this => *more += 1,
                        _ => errors.push((this.0, this.1, e, 0)),
                    }
                }
            }
        }
        // Later snapshots must carry the new memory.
        self.invalidate_snapshots();
        if !errors.is_empty() {
            let noted = self.with_db(|db| {
                db.transaction(|t| {
                    for (run, name, error, more) in &errors {
                        let mut error = format!("the step's memory update was not written: {error}");
                        if *more > 0 {
                            error.push_str(&format!(" (and {more} more of its proposals were not written)"));
                        }
                        tracing::error!(%run, step = %name, %error, "memory update failed");
                        tx::set_step_error(t, run, name, &error)?;
                    }
                    Ok::<_, DbError>(())
                })
            });
            if let Err(e) = noted {
                tracing::error!(error = %e, "cannot record the failed memory updates");
            }
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
            let mut kept = self.kept();
            let body = kept.bodies.remove(&row.task_id);
            kept.bytes -= body.as_ref().map_or(0, Vec::len);
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
                let run = tx::run(t, &row.run_id)?.ok_or_else(|| gone(format!("run {} is gone", row.run_id)))?;
                let wf = self.workflow(&run.workflow)?;
                let (step, index) = step_of(wf, &row.step)
                    .filter(|(s, index)| {
                        s.approval.is_none() && s.workflow.is_none() && (s.foreach.is_none() || index.is_some())
                    })
                    .ok_or_else(|| {
                        gone(format!(
                            "no longer a step to run in workflow \"{}\" (gone, or now an approval, a foreach or a sub-workflow)",
                            run.workflow
                        ))
                    })?;
                let item = item_value(t, &row.run_id, &row.step, index)?;
                let params = run_params(t, &row.run_id)?;
                let upstream = outputs(t, &row.run_id, step)?;
                let attempt = Attempt {
                    task_id: parse_uuid(&row.task_id),
                    number: row.attempt,
                    due_ms: row.not_before_ms,
                    run_deadline_ms: run.deadline_ms,
                };
                let task = self.plan_task(
                    wf,
                    step,
                    (&row.step, item.as_ref()),
                    parse_uuid(&row.run_id),
                    attempt,
                    &params,
                    &upstream,
                )?;
                Ok((task.body, task.snapshot_hash))
            })
        })
    }

    fn workflow(&self, name: &str) -> Result<&Workflow, SubmitError> {
        self.config
            .workflows
            .get(name)
            .ok_or_else(|| SubmitError::UnknownWorkflow {
                name: name.to_string(),
                known: self.config.workflows.keys().cloned().collect::<Vec<_>>().join(", "),
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

    /// Run `f` in one transaction with a fresh [`Change`] at `now`, then act
    /// on what it produced ([`Engine::after_commit`]); `f`'s value and the counts.
    fn change<T, E: From<DbError>>(
        &self,
        now: i64,
        f: impl FnOnce(&mut Change<'_, '_>) -> Result<T, E>,
    ) -> Result<(T, Applied), E> {
        let (value, mut applied, effects) = self.with_db(|db| self.transact(db, now, f))?;
        applied.memory_not_written = self.after_commit(effects);
        Ok((value, applied))
    }

    /// [`Engine::change`]'s transaction, on the database already held:
    /// what is acted on after the commit is returned, not done.
    fn transact<T, E: From<DbError>>(
        &self,
        db: &mut Db,
        now: i64,
        f: impl FnOnce(&mut Change<'_, '_>) -> Result<T, E>,
    ) -> Result<(T, Applied, Effects), E> {
        db.transaction(|t| {
            let mut applied = Applied::default();
            let mut effects = Effects::default();
            let mut c = Change {
                t,
                gates: &self.gates,
                now,
                applied: &mut applied,
                effects: &mut effects,
            };
            let value = f(&mut c)?;
            debug_assert!(c.effects.maybe_done.is_none(), "apply_batch ends what it deferred");
            self.settle_children(&mut c)?;
            for (run, n) in std::mem::take(&mut c.effects.closed) {
                tx::close_steps(c.t, &run, n)?;
            }
            Ok::<_, E>((value, applied, effects))
        })
        .map(|(value, applied, mut effects)| {
            self.keep_bodies(std::mem::take(&mut effects.written), effects.unkept, &effects.dropped);
            (value, applied, effects)
        })
    }

    /// Every worker pool some step uses.
    pub fn pools(&self) -> Vec<String> {
        pools_of(&self.config)
    }

    /// The pools' gates: their broker queues kept short.
    pub fn gates(&self) -> &gate::Gates {
        &self.gates
    }

    /// Start a run at `priority` (0 to [`MAX_PRIORITY`]): validate, plan, and
    /// write the first tasks to the outbox (or hold them, when a limit applies).
    ///
    /// # Errors
    /// [`SubmitError`]; on error nothing is stored or published.
    pub fn submit(
        &self,
        workflow: &str,
        given: &BTreeMap<String, String>,
        priority: u8,
    ) -> Result<RunView, SubmitError> {
        Ok(self
            .submit_once(workflow, given, priority, None)?
            .ok_or(DbError::no_row())?)
    }

    /// Start the run of `workflow`'s cron tick `tick_ms` (its scheduled
    /// time), unless that tick was fired already, by this scheduler or
    /// another sharing the database: `None` then.
    ///
    /// # Errors
    /// As [`Engine::submit`].
    pub fn submit_scheduled(&self, workflow: &str, tick_ms: i64) -> Result<Option<RunView>, SubmitError> {
        self.submit_once(workflow, &BTreeMap::new(), NORMAL_PRIORITY, Some(tick_ms))
    }

    fn submit_once(
        &self,
        workflow: &str,
        given: &BTreeMap<String, String>,
        priority: u8,
        tick_ms: Option<i64>,
    ) -> Result<Option<RunView>, SubmitError> {
        if priority > MAX_PRIORITY {
            return Err(SubmitError::Priority(priority.into()));
        }
        let wf = self.workflow(workflow)?;
        let params = wf.resolve_params(given)?;
        let run_id = Uuid::now_v7();
        let now = now_ms();
        let deadline = wf.timeout.map(|t| now.saturating_add(millis(t)));
        // Build every first task before touching the database: a missing
        // resource or an oversized task fails the submit with nothing stored.
        let first = self.plan_first(wf, run_id, &params, now, deadline)?;
        let run = run_id.to_string();
        let (written, answer) = std::sync::mpsc::sync_channel(1);
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(QueuedRun {
                workflow: wf.name.clone(),
                run: run.clone(),
                params,
                priority,
                deadline,
                tick: tick_ms,
                now,
                first,
                written,
            });
        if let Some(effects) = self.with_db(|db| self.write_queued(db)) {
            self.after_commit(effects);
        }
        // Written by this thread or by one that held the database first
        // (whose thread, should it panic, drops every sender it took).
        let started = answer
            .recv()
            .map_err(|_| DbError::new("engine", "the transaction writing this run was aborted (see the log)"))??;
        if !started {
            return Ok(None);
        }
        crate::trace::run_started(&run, workflow, now);
        Ok(Some(self.with_db(|db| db.run(&run))?.ok_or(DbError::no_row())?))
    }

    /// Write every queued run in one transaction and tell each submitter
    /// how it went. When that transaction fails, each run is written again
    /// in a transaction of its own, so one run that cannot be stored fails
    /// only its own submit. Nothing queued (another submitter wrote them):
    /// `None`; else what to act on after the commits.
    fn write_queued(&self, db: &mut Db) -> Option<Effects> {
        let batch = std::mem::take(&mut *self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if batch.len() > 1 {
            // Tasks are copied for the attempt: the runs may be written again.
            match self.write_runs(db, batch.iter().map(|queued| (queued, queued.first.clone()))) {
                Ok((started, effects)) => {
                    for (queued, started) in batch.iter().zip(started) {
                        let _ = queued.written.send(Ok(started));
                    }
                    return Some(effects);
                }
                Err(e) => {
                    tracing::warn!(runs = batch.len(), error = %e, "runs submitted together could not be written together; writing each alone");
                }
            }
        }
        let mut effects: Option<Effects> = None;
        for mut queued in batch {
            let first = std::mem::take(&mut queued.first);
            match self.write_runs(db, std::iter::once((&queued, first))) {
                Ok((started, more)) => {
                    let _ = queued.written.send(Ok(started.first() == Some(&true)));
                    match &mut effects {
                        Some(all) => all.memory.extend(more.memory),
                        None => effects = Some(more),
                    }
                }
                Err(e) => {
                    let _ = queued.written.send(Err(e));
                }
            }
        }
        effects
    }

    /// Write `runs`, each with its first tasks, in one transaction, then
    /// admit what waits; whether each was started (a cron tick fired
    /// already is not), and what to act on after the commit.
    fn write_runs<'q>(
        &self,
        db: &mut Db,
        runs: impl Iterator<Item = (&'q QueuedRun, Vec<(usize, PlannedTask)>)>,
    ) -> Result<(Vec<bool>, Effects), DbError> {
        let (started, _, effects) = self.transact(db, now_ms(), |c| {
            let started = runs
                .map(|(queued, first)| self.write_one(c, queued, first))
                .collect::<Result<Vec<_>, DbError>>()?;
            c.now = now_ms();
            if c.effects.admit {
                self.admit_in(c)?;
            }
            Ok::<_, DbError>(started)
        })?;
        Ok((started, effects))
    }

    /// Write one queued run in the transaction `c`, with its first tasks,
    /// unless its cron tick was fired already: whether it was.
    fn write_one(
        &self,
        c: &mut Change<'_, '_>,
        queued: &QueuedRun,
        first: Vec<(usize, PlannedTask)>,
    ) -> Result<bool, DbError> {
        let wf = self
            .workflow(&queued.workflow)
            .map_err(|e| DbError::new("engine", e.to_string()))?;
        c.now = queued.now;
        if let Some(tick) = queued.tick
            && !tx::claim_tick(c.t, &wf.name, tick, &queued.run)?
        {
            return Ok(false);
        }
        let new = NewRun {
            id: &queued.run,
            params: &queued.params,
            priority: queued.priority,
            deadline: queued.deadline,
            parent: None,
        };
        self.create_run(c, wf, &new, first)?;
        Ok(true)
    }

    /// The first tasks of a new run, built before anything is written (so a
    /// missing resource or an oversized task refuses a submit with nothing
    /// stored); a first step with a condition, items or a child run starts
    /// in the transaction.
    fn plan_first(
        &self,
        wf: &Workflow,
        run_id: Uuid,
        params: &BTreeMap<String, String>,
        now: i64,
        deadline: Option<i64>,
    ) -> Result<Vec<(usize, PlannedTask)>, SubmitError> {
        wf.steps()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.depends.is_empty() && !flow::starts_in_transaction(s))
            .map(|(i, s)| {
                let attempt = Attempt::first(now, deadline);
                let task = self.plan_task(wf, s, (&s.name, None), run_id, attempt, params, &BTreeMap::new())?;
                Ok((i, task))
            })
            .collect()
    }

    /// Write a new run: its row, its steps, its first tasks (held when a
    /// limit applies), and start its other first steps.
    fn create_run(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        new: &NewRun<'_>,
        first: Vec<(usize, PlannedTask)>,
    ) -> Result<(), DbError> {
        let t = c.t;
        let (run, params, now) = (new.id, new.params, c.now);
        // Admitted at once only with room and nobody already waiting to be.
        let admitted = match wf.max_active_runs {
            Some(max) => {
                tx::active_runs_by_workflow(t)?.get(&wf.name).copied().unwrap_or(0) < i64::from(max)
                    && !tx::unadmitted_runs(t, &wf.name)?
            }
            None => true,
        };
        let params_json = serde_json::to_string(params).unwrap_or_else(|_| "{}".into());
        tx::insert_run(
            t,
            &tx::RunInsert {
                id: run,
                workflow: &wf.name,
                params_json: &params_json,
                priority: new.priority,
                deadline_ms: new.deadline,
                admitted,
                steps: wf.steps().len(),
                parent: new.parent,
            },
            now,
        )?;
        let run_row = RunRow {
            workflow: wf.name.clone(),
            status: RunStatus::Running,
            admitted,
            deadline_ms: new.deadline,
            priority: new.priority,
        };
        c.effects.priorities.insert(run.to_string(), new.priority);
        // Steps in workflow order, inserted together, then their first tasks
        // together: a first step dispatched at once is inserted running, a
        // held one waiting in its turn (one write, not an insert and an
        // update); approvals are marked so once their rows exist. Whether
        // one is held (`held`) depends on the run and the limits
        // configured, not on step rows.
        let mut first = first.into_iter().peekable();
        let mut rows = Vec::with_capacity(wf.steps().len());
        let (mut approvals, mut dispatched) = (Vec::new(), Vec::new());
        let mut reasons = Vec::new();
        let lane = small(wf);
        for (i, step) in wf.steps().iter().enumerate() {
            let mut row = tx::NewStep {
                name: &step.name,
                position: i,
                queue: &step.queue,
                depends: step.depends.len(),
                started_ms: None,
                waiting: None,
                lane,
            };
            if let Some((_, task)) = first.next_if(|(f, _)| *f == i) {
                row.depends = 0;
                if let Some(approval) = &step.approval {
                    approvals.push((step, approval.timeout));
                } else if let Some(reason) = self.held(c, wf, &run_row, step, true)? {
                    reasons.push((rows.len(), reason, self.turn(c, run, &step.queue)?));
                    c.effects.admit = true;
                } else {
                    row.started_ms = Some(now);
                    dispatched.push((step, step.name.as_str(), task));
                }
            }
            rows.push(row);
        }
        for (i, reason, turn) in &reasons {
            rows[*i].waiting = Some((reason.as_deref(), *turn));
        }
        tx::insert_steps(t, run, &rows)?;
        for (step, timeout) in approvals {
            let message = self.approval_message(step, params, &BTreeMap::new());
            tx::await_approval(
                t,
                run,
                &step.name,
                &shown(&message),
                now.saturating_add(millis(timeout)),
                now,
            )?;
        }
        write_tasks(c, run, dispatched.into_iter(), false)?;
        let mut states = Statuses::new(run);
        let mut run_params = Some(params.clone());
        for step in wf
            .steps()
            .iter()
            .filter(|s| s.depends.is_empty() && flow::starts_in_transaction(s))
        {
            self.start(c, wf, &run_row, step, &mut states, &mut run_params)?;
        }
        finish_if_done(c, run)
    }

    /// Cancel a run, or one step of it (its dependents are skipped): what
    /// is not finished becomes `cancelled`, its unpublished tasks are never
    /// published, and every worker is told (through the control stream) to
    /// stop what it runs and to answer the rest as cancelled. `by` and
    /// `reason` are recorded. Cancelling what is already cancelled changes
    /// nothing and succeeds.
    ///
    /// # Errors
    /// [`CancelError`]: unknown run or step, or it already ended otherwise.
    pub fn cancel(&self, run: &str, step: Option<&str>, by: &str, reason: &str) -> Result<Cancelled, CancelError> {
        let ((), applied) = self.change(now_ms(), |c| {
            let row = tx::run(c.t, run)?.ok_or_else(|| CancelError::NotFound(run.to_string()))?;
            match step {
                None => match row.status {
                    RunStatus::Running => cancel_run(c, run, by, reason)?,
                    RunStatus::Cancelled => {}
                    status => {
                        return Err(CancelError::Finished {
                            run: run.to_string(),
                            status,
                        });
                    }
                },
                Some(name) => {
                    let status = tx::step_status(c.t, run, name)?.ok_or_else(|| CancelError::NoStep {
                        run: run.to_string(),
                        step: name.to_string(),
                    })?;
                    match status {
                        s if s.is_open() => {
                            let wf = self.config.workflows.get(&row.workflow);
                            self.cancel_step(c, wf, run, name, reason)?;
                            finish_if_done(c, run)?;
                        }
                        StepStatus::Cancelled => {}
                        status => {
                            return Err(CancelError::StepFinished {
                                run: run.to_string(),
                                step: name.to_string(),
                                status,
                            });
                        }
                    }
                }
            }
            // Slots were freed: steps held by limits may go.
            if c.effects.admit {
                self.admit_in(c)?;
            }
            Ok(())
        })?;
        let view = self
            .with_db(|db| db.run(run))?
            .ok_or_else(|| CancelError::NotFound(run.to_string()))?;
        Ok(Cancelled { run: view, applied })
    }

    /// Cancel one open step and skip what depends on it.
    fn cancel_step(
        &self,
        c: &mut Change<'_, '_>,
        wf: Option<&Workflow>,
        run: &str,
        name: &str,
        reason: &str,
    ) -> Result<(), DbError> {
        end_step(c, run, name, StepStatus::Cancelled, None, Some(reason), None)?;
        // A foreach step's items go with it (the control names the step: a
        // worker stops its items too).
        for item in tx::open_items(c.t, run, name)? {
            end_step(c, run, &item, StepStatus::Cancelled, None, Some(reason), None)?;
        }
        let dropped = tx::cancel_unpublished(c.t, run, Some(name), c.now)?;
        c.effects.dropped.extend(dropped);
        tx::insert_control(c.t, run, Some(name), reason, c.now)?;
        c.effects.admit = true;
        cancel_children(
            c,
            run,
            Some(name),
            &format!("its step {name} of run {run} was cancelled: {reason}"),
        )?;
        if let Some(wf) = wf {
            skip_downstream(c, wf, run, name, "was cancelled", &mut Statuses::new(run))?;
            // One item of a foreach: its step goes on (or ends) without it.
            if let Some((step, Some(_))) = step_of(wf, name) {
                self.advance_foreach(c, wf, run, step, &mut Statuses::new(run), &mut None)?;
            }
        }
        tracing::info!(%run, step = %name, reason = %reason.escape_debug(), "step cancelled");
        Ok(())
    }

    /// Apply a batch of results in one transaction, then admit waiting steps.
    ///
    /// # Errors
    /// The database failed; nothing of the batch was applied.
    pub fn apply(&self, results: &[TaskResult]) -> Result<Applied, DbError> {
        let (refused, mut applied) = self.change(now_ms(), |c| {
            let refused = self.apply_batch(c, results)?;
            if c.applied.applied > 0 || c.effects.admit {
                self.admit_in(c)?;
            }
            Ok::<_, DbError>(refused)
        })?;
        applied.refused = refused;
        Ok(applied)
    }

    /// What the clock decides: cancel runs past their timeout and fail the
    /// steps of tasks lost past their deadline (when `expire`: only once the
    /// results already waiting have been applied), and admit waiting steps
    /// whose limits (a rolling minute, a provider's pause) have eased.
    ///
    /// # Errors
    /// The database failed; nothing changed.
    pub fn tick(&self, expire: bool) -> Result<Applied, DbError> {
        let now = now_ms();
        let ((), applied) = self.change(now, |c| {
            let overdue = if expire { tx::overdue_runs(c.t, now)? } else { Vec::new() };
            for (run, workflow) in overdue {
                let reason = timeout_reason(self.config.workflows.get(&workflow));
                cancel_run(c, &run, "timeout", &reason)?;
            }
            let overdue = if expire { tx::approvals_overdue(c.t, now)? } else { Vec::new() };
            for (run, name) in overdue {
                let Some(run_row) = tx::run(c.t, &run)? else { continue };
                let Some(wf) = self.config.workflows.get(&run_row.workflow) else {
                    let error = format!("workflow \"{}\" is no longer configured", run_row.workflow);
                    fail_run(c, &run, &error)?;
                    continue;
                };
                let timeout = wf
                    .step(&name)
                    .and_then(|s| s.approval)
                    .map_or_else(|| "its".to_string(), |a| courier_wire::humanize(a.timeout));
                let error = format!("no decision within the approval's timeout ({timeout})");
                fail_step(c, wf, &run, &name, &error, "scheduler", &mut Statuses::new(&run))?;
                finish_if_done(c, &run)?;
            }
            let grace = self.limits.lost_task_grace;
            let cutoff = now.saturating_sub(millis(grace));
            // Over the tasks in flight: every LOST_TASK_SCAN, not every tick.
            let every = millis(LOST_TASK_SCAN.min(grace));
            let scan = expire && now - self.lost_scan.load(Ordering::Relaxed) >= every;
            let lost = if scan {
                self.lost_scan.store(now, Ordering::Relaxed);
                tx::lost_tasks(c.t, cutoff)?
            } else {
                Vec::new()
            };
            let timed_out: Vec<TaskResult> = lost
                .into_iter()
                .map(|lost| {
                    tracing::warn!(task = %lost.task_id, run = %lost.run, step = %lost.step, "no result by the task's deadline; failing the attempt");
                    let error = format!(
                        "no result by the task's deadline (plus {}): the worker that had it stopped, or refused it unanswered",
                        courier_wire::humanize(grace)
                    );
                    scheduler_result(
                        parse_uuid(&lost.task_id),
                        parse_uuid(&lost.run),
                        lost.step,
                        lost.attempt,
                        TaskStatus::TimedOut,
                        error,
                    )
                })
                .collect();
            self.apply_batch(c, &timed_out)?;
            // Every FULL_ADMISSION, a pass past the gates' early stop.
            let full = now - self.full_admission.load(Ordering::Relaxed) >= millis(FULL_ADMISSION);
            if full {
                self.full_admission.store(now, Ordering::Relaxed);
            }
            self.gates.hold_due(c.now);
            self.admission(c, full)
        })?;
        Ok(applied)
    }

    /// Approve (`approve`) or reject a step waiting for approval: approved,
    /// it succeeds with the comment as its output and its dependents start;
    /// rejected, it fails with the comment and what depends on it is
    /// skipped. `by` and the time are recorded (the step's worker and end).
    ///
    /// # Errors
    /// [`DecideError`]: unknown run or step, or a step not waiting for approval.
    pub fn decide(
        &self,
        run: &str,
        step: &str,
        approve: bool,
        by: &str,
        comment: &str,
    ) -> Result<(RunView, Applied), DecideError> {
        let ((), applied) = self.change(now_ms(), |c| {
            let row = tx::run(c.t, run)?.ok_or_else(|| DecideError::NotFound(run.to_string()))?;
            // Past the run's timeout the run ends, whatever the decision.
            if row.status == RunStatus::Running && row.deadline_ms.is_some_and(|d| c.now >= d) {
                let wf = self.config.workflows.get(&row.workflow);
                cancel_run(c, run, "timeout", &timeout_reason(wf))?;
                return Ok(());
            }
            let status = tx::step_status(c.t, run, step)?.ok_or_else(|| DecideError::NoStep {
                run: run.to_string(),
                step: step.to_string(),
            })?;
            let wf = self.config.workflows.get(&row.workflow);
            let Some((wf, s)) = wf
                .and_then(|wf| Some((wf, wf.step(step)?)))
                .filter(|_| status == StepStatus::WaitingApproval && row.status == RunStatus::Running)
            else {
                return Err(DecideError::NotWaiting {
                    run: run.to_string(),
                    step: step.to_string(),
                    status,
                });
            };
            let mut states = Statuses::new(run);
            if approve {
                let decision = scheduler_result(
                    Uuid::nil(),
                    parse_uuid(run),
                    step.to_string(),
                    0,
                    TaskStatus::Succeeded,
                    String::new(),
                );
                let decision = TaskResult {
                    output: comment.to_string(),
                    error: None,
                    worker_id: by.to_string(),
                    ..decision
                };
                self.succeed(c, wf, &row, s, &decision, &mut states)?;
            } else {
                let error = format!("rejected by {by}: {comment}");
                fail_step(c, wf, run, step, &error, by, &mut states)?;
            }
            finish_if_done(c, run)?;
            if c.effects.admit {
                self.admit_in(c)?;
            }
            tracing::info!(%run, %step, approve, by = %by.escape_debug(), "approval decided");
            Ok(())
        })?;
        let view = self
            .with_db(|db| db.run(run))?
            .ok_or_else(|| DecideError::NotFound(run.to_string()))?;
        Ok((view, applied))
    }

    /// An approval step's message with the run's params and upstream outputs
    /// substituted (as written, if that fails: it only shows).
    fn approval_message(
        &self,
        step: &Step,
        params: &BTreeMap<String, String>,
        upstream: &BTreeMap<String, String>,
    ) -> String {
        match step.resolve(&Values::new(params, upstream, None), self.limits.task.max_decompressed) {
            Ok(spec) => match spec.run {
                StepRun::Echo { text } => text,
                _ => String::new(),
            },
            Err(_) => match &step.run {
                StepRun::Echo { text } => text.clone(),
                _ => String::new(),
            },
        }
    }

    /// Count again the dependencies still to succeed of every pending step
    /// of every open run, from the workflows as loaded now (they were
    /// counted from the config of their submit, which may have changed
    /// since), and start the steps that are ready. A run the config can no
    /// longer move on (its workflow gone, a pending step gone or waiting on
    /// a step the run lacks) fails, saying why; on PostgreSQL, whose other
    /// schedulers may run a newer config (a rolling deploy), it is only
    /// logged. Run at start and on taking the lead; costs one pass over the
    /// open runs' open steps. What it changed.
    ///
    /// # Errors
    /// The database failed; nothing changed.
    pub fn reconcile(&self) -> Result<Applied, DbError> {
        let ((), applied) = self.change(now_ms(), |c| {
            let shared = c.t.is_postgres();
            let stuck = |c: &mut Change<'_, '_>, run: &str, error: &str| {
                if shared {
                    tracing::error!(
                        %run, %error,
                        "this run cannot move on under this scheduler's config; if every scheduler runs it, cancel the run"
                    );
                    Ok(())
                } else {
                    fail_run(c, run, error)
                }
            };
            'runs: for (run, workflow) in tx::running_runs(c.t)? {
                let Some(run_row) = tx::run(c.t, &run)? else {
                    continue;
                };
                let Some(wf) = self.config.workflows.get(&workflow) else {
                    stuck(c, &run, &format!("workflow \"{workflow}\" is no longer configured"))?;
                    continue;
                };
                // Its steps' gate as this config routes them (an edit may
                // have made its workflow small or not; a database from
                // before `steps.lane` counts every step as its pool's).
                tx::set_lane(c.t, &run, small(wf))?;
                let mut states = Statuses::new(&run);
                let mut params = None;
                for (name, status) in tx::open_steps(c.t, &run)? {
                    if status != StepStatus::Pending {
                        continue;
                    }
                    let Some((step, index)) = step_of(wf, &name) else {
                        let error = format!("step \"{name}\" of workflow \"{}\" is no longer configured", wf.name);
                        stuck(c, &run, &error)?;
                        continue 'runs;
                    };
                    // A foreach item waits for its step, not for dependencies.
                    if index.is_some() {
                        continue;
                    }
                    let mut left = 0;
                    let (mut skipped_by, mut missing) = (None, None);
                    for d in &step.depends {
                        let done = match states.get(c.t, d)? {
                            Some(StepStatus::Succeeded) => true,
                            // Counted as done when this step runs anyway.
                            Some(StepStatus::Skipped) if step.on_skipped == OnSkipped::Run => true,
                            Some(StepStatus::Skipped) => {
                                skipped_by = Some(d);
                                false
                            }
                            None => {
                                missing = missing.or(Some(d));
                                false
                            }
                            _ => false,
                        };
                        if !done {
                            left += 1;
                        }
                    }
                    if let Some(d) = missing {
                        let error = format!(
                            "step \"{name}\" now depends on \"{d}\", a step this run does not have \
                             (workflow \"{}\" changed since it started)",
                            wf.name
                        );
                        stuck(c, &run, &error)?;
                        continue 'runs;
                    }
                    // The config changed to skip with a skipped dependency.
                    if let Some(d) = skipped_by {
                        let why = format!("upstream step \"{d}\" was skipped");
                        self.skip(c, wf, &run_row, step, &why, &mut states, &mut params)?;
                        continue;
                    }
                    tx::set_pending_deps(c.t, &run, &name, left)?;
                    if left == 0 {
                        self.start(c, wf, &run_row, step, &mut states, &mut params)?;
                    }
                }
                finish_if_done(c, &run)?;
            }
            Ok::<_, DbError>(())
        })?;
        Ok(applied)
    }

    /// Admit waiting steps now (for tests and tools; results, cancellations,
    /// decisions and the clock admit on their own); how many were dispatched.
    ///
    /// # Errors
    /// The database failed.
    pub fn admit(&self) -> Result<usize, DbError> {
        let ((), applied) = self.change(now_ms(), |c| self.admit_in(c))?;
        Ok(applied.dispatched)
    }

    /// Apply a batch of results in order; those refused (nothing changed
    /// for them), by index and why.
    fn apply_batch(&self, c: &mut Change<'_, '_>, results: &[TaskResult]) -> Result<Vec<(usize, Refused)>, DbError> {
        let mut refused = Vec::new();
        for (i, result) in results.iter().enumerate() {
            // A run's end waits only through consecutive results of that run.
            let mut buf = Uuid::encode_buffer();
            let run = &*result.run_id.hyphenated().encode_lower(&mut buf);
            if c.effects.maybe_done.as_deref().is_some_and(|pending| pending != run) {
                end_finished_runs(c)?;
            }
            if let Err(why) = self.apply_one(c, result)? {
                tracing::warn!(task = %result.task_id, error = %why, "result refused; nothing changed");
                refused.push((i, why));
            }
        }
        end_finished_runs(c)?;
        Ok(refused)
    }

    /// Apply one result: `Ok(Err(_))` when it was refused (nothing changed).
    fn apply_one(&self, c: &mut Change<'_, '_>, r: &TaskResult) -> Result<Result<(), Refused>, DbError> {
        let task_id = r.task_id.to_string();
        let used = r.usage.map(|u| {
            let (input, output) = reported(u);
            i64::try_from(input + output).unwrap_or(i64::MAX)
        });
        // The common case ends the task in one statement; memory proposals
        // are checked against the step before anything is written.
        if r.memory_updates.is_empty() {
            let run = r.run_id.to_string();
            if tx::finish_dispatched_task(c.t, &task_id, (&run, &r.step, r.attempt), r.status, used, c.now)? {
                let row = TaskRow {
                    run_id: run,
                    step: r.step.clone(),
                    attempt: r.attempt,
                    dispatched: true,
                };
                self.apply_to_run(c, r, &row)?;
                return Ok(Ok(()));
            }
        }
        // Otherwise the task as it is tells why: unknown, another attempt's,
        // already answered, or memory proposals from a step that may not.
        let Some(row) = tx::task(c.t, &task_id)? else {
            tracing::warn!(task = %task_id, "result for an unknown task; ignored");
            c.applied.duplicates += 1;
            return Ok(Ok(()));
        };
        if let Err(refused) = self.check(c.t, &task_id, &row, r)? {
            return Ok(Err(refused));
        }
        if !row.dispatched {
            tracing::debug!(task = %task_id, "duplicate result; ignored");
            c.applied.duplicates += 1;
            return Ok(Ok(()));
        }
        tx::finish_dispatched_task(
            c.t,
            &task_id,
            (&row.run_id, &row.step, row.attempt),
            r.status,
            used,
            c.now,
        )?;
        self.apply_to_run(c, r, &row)?;
        Ok(Ok(()))
    }

    /// Whether `r` can be the answer to the task `row`: the same run, step
    /// and attempt, and memory proposals only from an agent step that may make them.
    fn check(&self, t: &Tx<'_>, task_id: &str, row: &TaskRow, r: &TaskResult) -> Result<Result<(), Refused>, DbError> {
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
            let workflow = tx::run(t, &row.run_id)?.map(|run| run.workflow);
            let step = workflow
                .as_ref()
                .and_then(|w| Some(step_of(self.config.workflows.get(w)?, &row.step)?.0));
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

    /// Apply an attempt's result (its task already ended) to its run: record
    /// what it spent; then, if its run and step still wait for it, act on what it
    /// says (a success, a cancellation, a failure to retry or not) and
    /// enforce the budgets it spent against.
    fn apply_to_run(&self, c: &mut Change<'_, '_>, r: &TaskResult, row: &TaskRow) -> Result<(), DbError> {
        c.applied.applied += 1;
        c.effects.admit = true;
        let run = row.run_id.as_str();
        let Some((wf, run_row, step_status, (step, index))) = self.result_target(c, row)? else {
            return Ok(());
        };
        // Money spent is recorded whatever became of the run.
        self.record_spend(c, run, &row.step, step, r)?;
        if run_row.status != RunStatus::Running || step_status != Some(StepStatus::Running) {
            tracing::debug!(%run, step = %step.name, "result for a cancelled run or step: recorded, nothing else");
            // What it spent counts against the budgets still: the run's, if
            // it goes on without the step, and its ancestors'.
            if r.model.is_some() && matches!(step.run, StepRun::Agent(_)) {
                return self.enforce_budgets(c, run, wf, true);
            }
            return Ok(());
        }
        self.note_rate_limit(c, step, r)?;
        // A step that ended past the run's timeout (by the worker's clock: a
        // result applied late after an outage still counts when it ended)
        // cancels the run whatever it says: it was stopped at its task's
        // deadline, which is the run's.
        let finished = i64::try_from(r.finished_unix_ms).unwrap_or(i64::MAX);
        if run_row.deadline_ms.is_some_and(|d| finished >= d) {
            return cancel_run(c, run, "timeout", &timeout_reason(Some(wf)));
        }
        let checked = checked_output(step, r);
        let r = checked.as_ref().unwrap_or(r);
        let mut states = Statuses::new(run);
        match (r.status, index) {
            (TaskStatus::Succeeded, None) => self.succeed(c, wf, &run_row, step, r, &mut states)?,
            (TaskStatus::Succeeded, Some(_)) => {
                self.record_success(c, wf, run, &row.step, &r.output, &r.worker_id, &r.memory_updates)?;
                self.advance_foreach(c, wf, run, step, &mut states, &mut None)?;
            }
            (TaskStatus::Cancelled, _) => {
                let reason = r.error.clone().unwrap_or_else(|| "cancelled".into());
                self.cancel_step(c, Some(wf), run, &row.step, &reason)?;
            }
            _ => {
                self.fail_or_retry(c, wf, &run_row, (step, &row.step, index), row, r, &mut states)?;
                if index.is_some() {
                    self.advance_foreach(c, wf, run, step, &mut states, &mut None)?;
                }
            }
        }
        self.enforce_budgets(c, run, wf, r.model.is_some())
    }

    /// The workflow, run, step status, and step (and foreach item index) a
    /// result is for; `None` when its run is gone or its step is no longer
    /// configured (which fails the run, if it still runs).
    #[allow(clippy::type_complexity)]
    fn result_target<'w>(
        &'w self,
        c: &mut Change<'_, '_>,
        row: &TaskRow,
    ) -> Result<Option<(&'w Workflow, RunRow, Option<StepStatus>, (&'w Step, Option<usize>))>, DbError> {
        let Some((run_row, step_status)) = tx::run_and_step(c.t, &row.run_id, &row.step)? else {
            return Ok(None);
        };
        if !c.effects.priorities.contains_key(&row.run_id) {
            c.effects.priorities.insert(row.run_id.clone(), run_row.priority);
        }
        let found = self
            .config
            .workflows
            .get(&run_row.workflow)
            .and_then(|wf| Some((wf, step_of(wf, &row.step)?)));
        let Some((wf, step)) = found else {
            // A run whose end waits (`end_finished_runs`) ends first: it is
            // not failed for a step it no longer runs.
            end_finished_runs(c)?;
            if tx::run(c.t, &row.run_id)?.is_some_and(|r| r.status == RunStatus::Running) {
                let error = format!(
                    "step \"{}\" of workflow \"{}\" is no longer configured",
                    row.step, run_row.workflow
                );
                fail_run(c, &row.run_id, &error)?;
            }
            return Ok(None);
        };
        Ok(Some((wf, run_row, step_status, step)))
    }

    /// A 429 from the step's provider pauses its model fleet-wide.
    fn note_rate_limit(&self, c: &mut Change<'_, '_>, step: &Step, r: &TaskResult) -> Result<(), DbError> {
        if let (Some(ms), Some(model)) = (r.rate_limited_ms, self.step_model(step)) {
            let ms = ms.min(millis(courier_wire::MAX_RATE_LIMIT_PAUSE).unsigned_abs());
            let until = c.now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX));
            tx::pause_model(c.t, model, until, "the provider answered 429")?;
            tracing::warn!(%model, pause_ms = ms, "model paused fleet-wide after a 429");
        }
        Ok(())
    }

    /// Cancel the run if it spent past its budget, or else end it if nothing
    /// is left open; a child run's spending (`spent`) counts against its
    /// ancestors' budgets too.
    fn enforce_budgets(&self, c: &mut Change<'_, '_>, run: &str, wf: &Workflow, spent: bool) -> Result<(), DbError> {
        if !self.enforce_budget(c, run, wf)? {
            if spent {
                // Its ancestors' budgets come next and may cancel them with
                // their running children: the run ends first if it is done.
                if c.effects.maybe_done.as_deref() == Some(run) {
                    c.effects.maybe_done = None;
                }
                finish_if_done(c, run)?;
            } else if c.effects.maybe_done.as_deref() != Some(run) {
                end_finished_runs(c)?;
                c.effects.maybe_done = Some(run.to_string());
            }
        }
        if spent {
            for (ancestor, workflow) in tx::ancestors(c.t, run)? {
                if let Some(awf) = self.config.workflows.get(&workflow) {
                    self.enforce_budget(c, &ancestor, awf)?;
                }
            }
        }
        Ok(())
    }

    /// Record an agent step's model, tokens, cost and transcript.
    fn record_spend(
        &self,
        c: &mut Change<'_, '_>,
        run: &str,
        name: &str,
        step: &Step,
        r: &TaskResult,
    ) -> Result<(), DbError> {
        let (Some(label), StepRun::Agent(_)) = (&r.model, &step.run) else {
            return Ok(());
        };
        let (input, output) = reported(r.usage.unwrap_or_default());
        let model = self.step_model(step).unwrap_or_default();
        let cost = self
            .models
            .get(model)
            .and_then(|m| m.pricing)
            .map(|p| p.cost(input, output));
        let transcript = serde_json::to_string(&r.transcript).unwrap_or_else(|_| "[]".into());
        tx::record_agent(c.t, run, name, label, (input, output), cost, &transcript)?;
        c.applied.spend.push((model.to_string(), input, output, cost));
        Ok(())
    }

    /// Cancel the run when it has spent more than its budget; `true` if it did.
    fn enforce_budget(&self, c: &mut Change<'_, '_>, run: &str, wf: &Workflow) -> Result<bool, DbError> {
        if wf.budget.tokens.is_none() && wf.budget.cost.is_none() {
            return Ok(false);
        }
        if tx::run(c.t, run)?.map(|r| r.status) != Some(RunStatus::Running) {
            return Ok(false);
        }
        let (tokens, cost) = tx::run_spend(c.t, run)?;
        let over = match (wf.budget.tokens, wf.budget.cost) {
            (Some(max), _) if u64::try_from(tokens).unwrap_or(0) > max => {
                Some(format!("budget exceeded: {tokens} tokens used, the budget is {max}"))
            }
            (_, Some(max)) if cost > max => Some(format!("budget exceeded: cost {cost:.4} spent, the budget is {max}")),
            _ => None,
        };
        let Some(reason) = over else { return Ok(false) };
        cancel_run(c, run, "budget", &reason)?;
        Ok(true)
    }

    /// A step succeeded: record it and start (or hold) every dependent
    /// whose dependencies all succeeded.
    fn succeed(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        step: &Step,
        r: &TaskResult,
        states: &mut Statuses<'_>,
    ) -> Result<(), DbError> {
        let run = states.run;
        self.record_success(c, wf, run, &step.name, &r.output, &r.worker_id, &r.memory_updates)?;
        states.set(&step.name, StepStatus::Succeeded);
        self.release_dependents(c, wf, run_row, step, states, &mut None)
    }

    /// Record a step (or item) as succeeded with `output`, and queue its
    /// memory proposals for after the commit.
    #[allow(clippy::too_many_arguments)]
    fn record_success(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run: &str,
        name: &str,
        output: &str,
        worker: &str,
        memory: &[MemoryUpdate],
    ) -> Result<(), DbError> {
        end_step(c, run, name, StepStatus::Succeeded, Some(output), None, Some(worker))?;
        c.effects.memory.extend(memory.iter().map(|u| MemoryWrite {
            run: run.to_string(),
            step: name.to_string(),
            workflow: wf.name.clone(),
            update: u.clone(),
        }));
        Ok(())
    }

    /// `step` succeeded (or was skipped, for a dependent that runs anyway):
    /// each dependent counts down its dependencies still to succeed, and
    /// starts when none is left. A result costs the same whatever the run's width.
    fn release_dependents(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        step: &Step,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let run = states.run;
        for s in wf.dependents(&step.name) {
            let Some((status, pending)) = tx::dependency_done(c.t, run, &s.name)? else {
                continue;
            };
            if status != StepStatus::Pending {
                continue;
            }
            let ready = match pending {
                Some(left) => left == 0,
                // A step of a run started before the counters: look.
                None => {
                    let mut ready = true;
                    for d in &s.depends {
                        ready &= states.get(c.t, d)? == Some(StepStatus::Succeeded);
                    }
                    ready
                }
            };
            if ready {
                self.start(c, wf, run_row, s, states, params)?;
            }
        }
        Ok(())
    }

    /// Start a step whose dependencies all succeeded: dispatch its first
    /// attempt, or hold it when a limit applies; a step whose task cannot be
    /// built fails. `params` caches the run's params across calls.
    fn start(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        s: &Step,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let run = states.run;
        if let Some(condition) = &s.when {
            let upstream = outputs(c.t, run, s)?;
            match condition.eval(run_params_once(c.t, run, params)?, &upstream) {
                Ok(true) => {}
                Ok(false) => {
                    let why = format!("when: {} is false", condition.source);
                    return self.skip(c, wf, run_row, s, &why, states, params);
                }
                Err(e) => return fail_step(c, wf, run, &s.name, &format!("when: {e}"), "scheduler", states),
            }
        }
        if s.foreach.is_some() {
            return self.start_foreach(c, wf, s, states, params);
        }
        if s.workflow.is_some() {
            return self.start_child(c, wf, run_row, s, states, params);
        }
        if let Some(approval) = &s.approval {
            let upstream = outputs(c.t, run, s)?;
            let message = self.approval_message(s, run_params_once(c.t, run, params)?, &upstream);
            let message = shown(&message);
            let deadline = c.now.saturating_add(millis(approval.timeout));
            tx::await_approval(c.t, run, &s.name, &message, deadline, c.now)?;
            states.set(&s.name, StepStatus::WaitingApproval);
            return Ok(());
        }
        if let Some(reason) = self.held(c, wf, run_row, s, true)? {
            let turn = self.turn(c, run, &s.queue)?;
            tx::wait_step(c.t, run, &s.name, reason.as_deref(), None, turn)?;
            states.set(&s.name, StepStatus::Waiting);
            c.effects.admit = true;
            return Ok(());
        }
        let upstream = outputs(c.t, run, s)?;
        let attempt = Attempt::first(c.now, run_row.deadline_ms);
        let planned = self.plan_task(
            wf,
            s,
            (&s.name, None),
            parse_uuid(run),
            attempt,
            run_params_once(c.t, run, params)?,
            &upstream,
        );
        match planned {
            Ok(task) => {
                write_task(c, run, s, &s.name, task, true)?;
                states.set(&s.name, StepStatus::Running);
                Ok(())
            }
            Err(e) => fail_step(c, wf, run, &s.name, &e.to_string(), "scheduler", states),
        }
    }

    /// A step's attempt failed: schedule the next attempt after its backoff
    /// (or after the provider's pause), or fail the step for good.
    #[allow(clippy::too_many_arguments)]
    fn fail_or_retry(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        (step, name, index): (&Step, &str, Option<usize>),
        row: &TaskRow,
        r: &TaskResult,
        states: &mut Statuses<'_>,
    ) -> Result<(), DbError> {
        let run = states.run;
        let error = r.error.clone().unwrap_or_else(|| r.status.as_str().to_string());
        let retryable = r.status != TaskStatus::Rejected;
        if !(retryable && row.attempt <= step.retry.limit) {
            return fail_step(c, wf, run, name, &error, &r.worker_id, states);
        }
        let attempt = row.attempt + 1;
        let pause = Duration::from_millis(r.rate_limited_ms.unwrap_or(0)).min(courier_wire::MAX_RATE_LIMIT_PAUSE);
        let delay = backoff(step, row.attempt).max(pause);
        let due = c.now.saturating_add(millis(delay));
        // A step under limits (or on a paused model) retries through
        // admission, which applies them all, priorities included.
        if self.held(c, wf, run_row, step, delay.is_zero())?.is_some() {
            // Its gate holds it from when it is due (the clock's pass alone
            // might not reach it behind another pool's backlog for 5 s).
            self.gates.hold_at(&route(wf, &step.queue), due);
            let why = format!("retry after {}", courier_wire::humanize(delay));
            let turn = self.turn(c, run, &step.queue)?;
            tx::wait_step(c.t, run, name, Some(&why), Some(due), turn)?;
            tx::note_step_error(c.t, run, name, &error, &r.worker_id)?;
            c.applied.retried += 1;
            c.effects.admit = true;
            tracing::info!(run = %run, step = %name, attempt, delay_ms = delay.as_millis() as u64, %error, "retrying step through admission");
            return Ok(());
        }
        let upstream = outputs(c.t, run, step)?;
        let next = Attempt {
            task_id: Uuid::now_v7(),
            number: attempt,
            due_ms: due,
            run_deadline_ms: run_row.deadline_ms,
        };
        let params = run_params(c.t, run)?;
        let item = item_value(c.t, run, name, index)?;
        match self.plan_task(
            wf,
            step,
            (name, item.as_ref()),
            parse_uuid(run),
            next,
            &params,
            &upstream,
        ) {
            Ok(task) => {
                write_task(c, run, step, name, task, true)?;
                // After the write, which clears the error of a step it starts.
                tx::note_step_error(c.t, run, name, &error, &r.worker_id)?;
                c.applied.retried += 1;
                tracing::info!(run = %run, trace_id = %trace_id(run), step = %name, attempt, delay_ms = delay.as_millis() as u64, %error, "retrying step");
                Ok(())
            }
            Err(e) => {
                let error = format!("{error}; retry impossible: {e}");
                fail_step(c, wf, run, name, &error, &r.worker_id, states)
            }
        }
    }

    /// A model request's tokens, estimated: the prompt (4 bytes a token) and
    /// the most the model may answer.
    fn estimate_tokens(&self, prompt_bytes: usize, model: &str) -> i64 {
        let answer = self
            .models
            .get(model)
            .and_then(|t| t.max_tokens)
            .map_or(DEFAULT_OUTPUT_ESTIMATE, i64::from);
        i64::try_from(prompt_bytes / 4)
            .unwrap_or(i64::MAX)
            .saturating_add(answer)
    }

    /// The model ID an agent step uses (its own, else the agent default).
    fn step_model<'a>(&'a self, step: &'a Step) -> Option<&'a str> {
        match &step.run {
            StepRun::Agent(a) => a.model.as_deref().or(self.default_model.as_deref()),
            _ => None,
        }
    }

    /// The turn of a run's step of `pool` that starts waiting (start-time
    /// fair queueing): one after the run's last waiting step in that pool, and not
    /// before the virtual time of its priority in that pool, the latest
    /// turn dispatched there. So runs take turns, one step each, the older first among
    /// equal turns; a run that starts waiting beside others gets the next
    /// turn; and a step waits for a bounded number of others, since later
    /// steps never get a turn before the virtual time, which only grows.
    /// Priority p's turns are `(9 - p) * TURNS` onwards, so higher
    /// priorities come first in turn order. Two indexed reads per run per
    /// transaction.
    fn turn(&self, c: &mut Change<'_, '_>, run: &str, pool: &str) -> Result<i64, DbError> {
        let key = (run.to_string(), pool.to_string());
        let turn = match c.effects.turns.get(&key) {
            Some(&next) => next,
            None => {
                let priority = run_priority(c, run)?.min(MAX_PRIORITY);
                let base = i64::from(MAX_PRIORITY - priority) * TURNS;
                let now = tx::virtual_time(c.t, priority, pool)?.unwrap_or(base).max(base);
                // After the run's last waiting step in the pool (each pool's
                // turns are on its own clock).
                tx::after_last_turn(c.t, run, pool)?.unwrap_or(now).max(now)
            }
        };
        c.effects.turns.insert(key, turn + 1);
        Ok(turn)
    }

    /// Whether a gate (by its routing key) holds its steps now: shut, or
    /// this scheduler does not publish (its gates know nothing of the
    /// broker's queues; the leader admits within a tick of its clock).
    fn gate_shut(&self, key: &str) -> bool {
        self.gates.limit(key).is_some() && (!self.publishing.load(Ordering::Relaxed) || self.gates.shut(key))
    }

    /// The gate's reason, if it holds a step of a small run or not
    /// (`route`) at admission (it is shut).
    fn gate_holds(&self, wf: &Workflow, step: &Step) -> Option<(String, String)> {
        let key = route(wf, &step.queue);
        self.gates.limit(&key)?;
        self.gate_shut(&key)
            .then(|| (gate_reason(&self.gates, &key), key.into_owned()))
    }

    /// Whether a ready step must wait for admission (`Some`): a limit
    /// applies to it (or its model is paused), or its run is not yet
    /// admitted; with the reason when it is its pool's gate (admission
    /// names the others). It reads
    /// none of the run's steps or tasks (counting is `admit_in`'s):
    /// `create_run` decides every first step before writing any.
    /// A step `due_now` that waits at its pool's gate marks it holding (new
    /// steps wait behind it); a retry waiting out its backoff does not.
    fn held(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run: &RunRow,
        step: &Step,
        due_now: bool,
    ) -> Result<Option<Option<String>>, DbError> {
        if !run.admitted || wf.max_active_steps.is_some() || self.limits.pool_in_flight.contains_key(&step.queue) {
            return Ok(Some(None));
        }
        if let Some(model) = self.step_model(step)
            && (self.models.get(model).is_some_and(|m| m.limits.any()) || tx::model_pause(c.t, model, c.now)?.is_some())
        {
            return Ok(Some(None));
        }
        // Last: the step goes now unless its pool's gate holds it (it takes
        // a place in the queue); then the gate is named at once.
        let key = route(wf, &step.queue);
        if self.gates.limit(&key).is_none() {
            return Ok(None);
        }
        let publishing = self.publishing.load(Ordering::Relaxed);
        if publishing && self.gates.admits(&key) {
            return Ok(None);
        }
        if publishing && due_now {
            self.gates.held(&key);
        }
        Ok(Some(Some(gate_reason(&self.gates, &key))))
    }

    /// Dispatch waiting steps, highest priority first, as every limit allows;
    /// a step still held gets the limit named in `waiting_on`. A step whose
    /// workflow or step left the config fails its run.
    ///
    /// When the gates are the only limits configured and no gate holding
    /// steps has room to refill, no pass is worth it (steps waiting out a
    /// retry's backoff or a model's pause, or written by a standby, are the
    /// clock's): nothing is read. The gate loop admits once a gate has room.
    fn admit_in(&self, c: &mut Change<'_, '_>) -> Result<(), DbError> {
        self.gates.hold_due(c.now);
        let shut = !self.publishing.load(Ordering::Relaxed) || !self.gates.open_holding();
        if !self.counted_limits && self.gates.any() && shut {
            return Ok(());
        }
        self.admission(c, false)
    }

    /// An admission pass: waiting steps in turn order, a chunk at a time.
    /// Unless `full` (the clock's, every [`FULL_ADMISSION`]), it stops
    /// after a chunk that dispatched nothing once the gates of every pool
    /// it met are shut: a backlog at the gates costs a chunk per pass, not
    /// a read of every waiting step. A pass that stopped before the end
    /// then reads, from their own turn order (an index of each pool's and
    /// lane's waiting steps), the steps further on of each gate with room
    /// for those waiting there (`Gates::to_reach`), chunk after chunk while
    /// it has room: they are not held behind any number of steps at shut
    /// gates. Each part reads at most [`ADMIT_BATCH`] rows, so steps behind
    /// more than that many held by other limits (a model's concurrency) at
    /// an open gate wait for a pass that reaches them.
    fn admission(&self, c: &mut Change<'_, '_>, full: bool) -> Result<(), DbError> {
        let mut counts = Counts::default();
        let mut met = BTreeSet::new();
        let (mut after, mut read, mut size) = (None::<(i64, String, String)>, 0, ADMIT_FIRST / 2);
        let complete = loop {
            let key = after.as_ref().map(|(t, r, n)| (*t, r.as_str(), n.as_str()));
            // A first chunk small: behind shut gates it is all a pass reads;
            // and a pass that fills a gate reads little past what it takes.
            size = (size * 2).min(ADMIT_CHUNK).min(ADMIT_BATCH - read);
            let chunk = tx::waiting_steps(c.t, c.now, key, size)?;
            let end = chunk.len() < size;
            read += chunk.len();
            if let Some(w) = chunk.last() {
                after = Some((w.turn, w.run.clone(), w.step.clone()));
            }
            if !chunk.is_empty() {
                met.extend(chunk.iter().map(|w| match self.config.workflows.get(&w.workflow) {
                    Some(wf) => route(wf, &w.queue).into_owned(),
                    None => w.queue.clone(),
                }));
                self.admit_each(c, &mut counts, chunk)?;
                // Nothing further can go but at gates the pass did not meet:
                // every pool met is shut.
                if !full && met.iter().all(|p| self.gate_shut(p)) {
                    break false;
                }
            }
            if end || read >= ADMIT_BATCH {
                break end;
            }
        };
        let mut drained = BTreeSet::new();
        if !complete && self.publishing.load(Ordering::Relaxed) {
            let mut reached = 0;
            for (gate, pool, lane, room) in self.gates.to_reach(full) {
                // Chunks of the gate's steps, as long as it has room (steps
                // held by other limits take none) and the gates their bound.
                let mut from = after.clone();
                let mut size = room.clamp(1, ADMIT_CHUNK);
                while reached < ADMIT_BATCH && !self.gates.shut(gate) {
                    let key = from.as_ref().map(|(t, r, n)| (*t, r.as_str(), n.as_str()));
                    size = size.min(ADMIT_BATCH - reached);
                    let steps = tx::waiting_at(c.t, c.now, (pool, lane), key, size)?;
                    reached += steps.len();
                    let end = steps.len() < size;
                    if let Some(w) = steps.last() {
                        from = Some((w.turn, w.run.clone(), w.step.clone()));
                    }
                    self.admit_each(c, &mut counts, steps)?;
                    if end {
                        drained.insert(gate);
                        break;
                    }
                    size = (size * 2).min(ADMIT_CHUNK);
                }
            }
        }
        for ((priority, pool), turn) in &counts.turned {
            tx::advance_virtual_time(c.t, *priority, pool, *turn)?;
        }
        c.gates.passed(&counts.gated, complete, &drained);
        Ok(())
    }

    /// [`Engine::admit_in`]'s pass over the waiting steps, in their turn.
    fn admit_each(
        &self,
        c: &mut Change<'_, '_>,
        counts: &mut Counts,
        waiting: Vec<tx::WaitingStep>,
    ) -> Result<(), DbError> {
        for w in waiting {
            let Some((wf, (step, index))) = self
                .config
                .workflows
                .get(&w.workflow)
                .and_then(|wf| Some((wf, step_of(wf, &w.step)?)))
            else {
                let error = format!(
                    "step \"{}\" of workflow \"{}\" is no longer configured",
                    w.step, w.workflow
                );
                counts.changed();
                fail_run(c, &w.run, &error)?;
                continue;
            };
            if index.is_none() && (step.approval.is_some() || step.foreach.is_some() || step.workflow.is_some()) {
                // The config made it an approval, a foreach or a sub-workflow
                // since it started waiting.
                let Some(mut run_row) = tx::run(c.t, &w.run)?.filter(|r| r.status == RunStatus::Running) else {
                    continue;
                };
                // A child run is a run: it waits for its parent's admission.
                if step.workflow.is_some() && !run_row.admitted {
                    if !counts.admitted_runs.contains(&w.run)
                        && let Some(max) = wf.max_active_runs
                        && counts.runs(c.t)?.get(&wf.name).copied().unwrap_or(0) >= i64::from(max)
                    {
                        let reason = format!("workflow {} max_active_runs ({max})", wf.name);
                        if w.waiting_on.as_deref() != Some(reason.as_str()) {
                            tx::set_waiting_on(c.t, &w.run, &w.step, &reason)?;
                        }
                        continue;
                    }
                    tx::admit_run(c.t, &w.run)?;
                    counts.admitted(&wf.name, &w.run);
                    run_row.admitted = true;
                }
                counts.changed();
                self.start(c, wf, &run_row, step, &mut Statuses::new(&w.run), &mut None)?;
                finish_if_done(c, &w.run)?;
                continue;
            }
            let model = self.step_model(step);
            let terms = model.and_then(|m| self.models.get(m));
            let mut held = self.limit_reached(c, counts, wf, &w, step, model, terms)?;
            // The token window, first from the step's template (no planning
            // for a step that clearly does not fit), then from its task.
            if held.is_none()
                && let (Some(model), Some(limit)) = (model, terms.and_then(|t| t.limits.tokens_per_minute))
            {
                let (_, used) = counts.window(c.t, model, c.now)?;
                let want = self.estimate_tokens(step_prompt_len(step), model);
                if used > 0 && used.saturating_add(want) > i64::try_from(limit).unwrap_or(i64::MAX) {
                    let reason = format!("model {model} tokens_per_minute ({limit})");
                    counts.blocked.insert(model.to_string(), reason.clone());
                    held = Some(reason);
                }
            }
            let mut planned = None;
            if held.is_none() {
                let Some(Running { deadline_ms, params }) = counts.running(c.t, &w.run)? else {
                    continue;
                };
                let upstream = outputs(c.t, &w.run, step)?;
                let attempt = Attempt {
                    number: w.attempts + 1,
                    ..Attempt::first(c.now, deadline_ms)
                };
                let item = item_value(c.t, &w.run, &w.step, index)?;
                let unit = (w.step.as_str(), item.as_ref());
                match self.plan_task(wf, step, unit, parse_uuid(&w.run), attempt, &params, &upstream) {
                    Ok(task) => {
                        if let (Some(model), Some(limit)) = (model, terms.and_then(|t| t.limits.tokens_per_minute)) {
                            let (_, used) = counts.window(c.t, model, c.now)?;
                            let want = task.tokens.unwrap_or(0);
                            // One step larger than the whole limit still runs, alone in its minute.
                            if used > 0 && used.saturating_add(want) > i64::try_from(limit).unwrap_or(i64::MAX) {
                                let reason = format!("model {model} tokens_per_minute ({limit})");
                                // Smaller, lower-priority steps do not pass it in this pass.
                                counts.blocked.insert(model.to_string(), reason.clone());
                                held = Some(reason);
                            }
                        }
                        planned = Some(task);
                    }
                    Err(e) => {
                        counts.changed();
                        let mut states = Statuses::new(&w.run);
                        fail_step(c, wf, &w.run, &w.step, &e.to_string(), "scheduler", &mut states)?;
                        if index.is_some() {
                            self.advance_foreach(c, wf, &w.run, step, &mut states, &mut None)?;
                        }
                        finish_if_done(c, &w.run)?;
                        continue;
                    }
                }
            }
            if let Some(reason) = held {
                if w.waiting_on.as_deref() != Some(reason.as_str()) {
                    tx::set_waiting_on(c.t, &w.run, &w.step, &reason)?;
                }
                continue;
            }
            let Some(task) = planned else { continue };
            // A step this pass ended already (an item skipped as its foreach
            // failed) is left as it is: no task.
            if !tx::start_waiting_step(c.t, &w.run, &w.step, task.attempt, c.now)? {
                continue;
            }
            if !w.admitted && !counts.admitted_runs.contains(&w.run) {
                tx::admit_run(c.t, &w.run)?;
                counts.admitted(&wf.name, &w.run);
            }
            counts.took(&wf.name, &step.queue, model, &task);
            let priority = MAX_PRIORITY.saturating_sub(u8::try_from(w.turn / TURNS).unwrap_or(MAX_PRIORITY));
            let turned = counts.turned.entry((priority, w.queue.clone())).or_insert(w.turn);
            *turned = (*turned).max(w.turn);
            c.gates.dispatched(&route(wf, &step.queue));
            write_task(c, &w.run, step, &w.step, task, false)?;
        }
        Ok(())
    }

    /// The limit that holds a waiting step now, if any (all but the token
    /// window, which needs the planned task).
    #[allow(clippy::too_many_arguments)]
    fn limit_reached(
        &self,
        c: &mut Change<'_, '_>,
        counts: &mut Counts,
        wf: &Workflow,
        w: &tx::WaitingStep,
        step: &Step,
        model: Option<&str>,
        terms: Option<&ModelTerms>,
    ) -> Result<Option<String>, DbError> {
        let count = |map: &HashMap<String, i64>, key: &str| map.get(key).copied().unwrap_or(0);
        if !w.admitted
            && !counts.admitted_runs.contains(&w.run)
            && let Some(max) = wf.max_active_runs
            && count(counts.runs(c.t)?, &wf.name) >= i64::from(max)
        {
            return Ok(Some(format!("workflow {} max_active_runs ({max})", wf.name)));
        }
        if let Some(max) = wf.max_active_steps
            && count(counts.steps(c.t)?, &wf.name) >= i64::from(max)
        {
            return Ok(Some(format!("workflow {} max_active_steps ({max})", wf.name)));
        }
        if let Some(max) = self.limits.pool_in_flight.get(&step.queue)
            && count(counts.pools(c.t)?, &step.queue) >= i64::from(*max)
        {
            return Ok(Some(format!("pool {} max_in_flight ({max})", step.queue)));
        }
        if let Some((reason, key)) = self.gate_holds(wf, step) {
            counts.gated.insert(key);
            return Ok(Some(reason));
        }
        let Some(model) = model else { return Ok(None) };
        if let Some(reason) = counts.blocked.get(model) {
            return Ok(Some(reason.clone()));
        }
        if let Some((until, why)) = counts.pause(c.t, model, c.now)? {
            let until = chrono::DateTime::from_timestamp_millis(until).map_or_else(
                || until.to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
            return Ok(Some(format!("model {model} paused until {until} ({why})")));
        }
        let Some(limits) = terms.map(|t| t.limits) else {
            return Ok(None);
        };
        if let Some(max) = limits.concurrency
            && count(counts.models(c.t)?, model) >= i64::from(max)
        {
            return Ok(Some(format!("model {model} concurrency ({max})")));
        }
        if let Some(max) = limits.requests_per_minute {
            let (requests, _) = counts.window(c.t, model, c.now)?;
            if requests >= i64::from(max) {
                return Ok(Some(format!("model {model} requests_per_minute ({max})")));
            }
        }
        Ok(None)
    }

    /// Resolve a step and encode its task, with the cached snapshot. The
    /// task's deadline is its due time, plus the longest it may wait for a
    /// worker, plus the step's timeout, and never after its run's deadline:
    /// a worker refuses it after that (so a replayed task is refused too).
    /// `unit` is the task's step name and, for a foreach item, the item.
    #[allow(clippy::too_many_arguments)]
    fn plan_task(
        &self,
        wf: &Workflow,
        step: &Step,
        (name, item): (&str, Option<&Item>),
        run_id: Uuid,
        attempt: Attempt,
        params: &BTreeMap<String, String>,
        upstream: &BTreeMap<String, String>,
    ) -> Result<PlannedTask, SubmitError> {
        let values = Values::new(params, upstream, item);
        let spec = step
            .resolve(&values, self.limits.task.max_decompressed)
            .map_err(|message| SubmitError::Template {
                step: name.to_string(),
                message,
            })?;
        let snapshot = self.snapshot(wf, step)?;
        let mut deadline = attempt
            .due_ms
            .saturating_add(millis(self.limits.max_queue_wait))
            .saturating_add(millis(spec.timeout));
        if let Some(run_deadline) = attempt.run_deadline_ms {
            deadline = deadline.min(run_deadline);
        }
        let model = self.step_model(step).map(str::to_string);
        let tokens = match (&spec.run, &model) {
            (StepRun::Agent(a), Some(m)) => Some(self.estimate_tokens(prompt_len(a), m)),
            _ => None,
        };
        let task = Task {
            task_id: attempt.task_id,
            run_id,
            workflow: wf.name.clone(),
            step: name.to_string(),
            attempt: attempt.number,
            deadline_unix_ms: u64::try_from(deadline).unwrap_or(0),
            spec,
            upstream: upstream.clone(),
            snapshot: snapshot.bytes.clone(),
            pool: step.queue.clone(),
        };
        // Its stream, for the early abort of incompressible messages: its
        // workflow and step (a foreach item's step, not the item).
        let stream = [wf.name.as_str(), step.name.as_str()];
        let body = encode_message(&task, &self.limits.task, &stream).map_err(|source| SubmitError::TooLarge {
            step: name.to_string(),
            source,
        })?;
        Ok(PlannedTask {
            task_id: attempt.task_id.to_string(),
            attempt: attempt.number,
            due_ms: attempt.due_ms,
            deadline_ms: deadline,
            model,
            tokens,
            snapshot_hash: snapshot.hash.clone(),
            body,
            lane: small(wf),
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

/// What admission counts, read once per pass and kept up to date as it dispatches.
#[derive(Debug, Default)]
struct Counts {
    pools: Option<HashMap<String, i64>>,
    models: Option<HashMap<String, i64>>,
    steps: Option<HashMap<String, i64>>,
    runs: Option<HashMap<String, i64>>,
    /// Runs admitted during this pass.
    admitted_runs: BTreeSet<String>,
    /// Per model: tasks due in the last minute, and their tokens.
    windows: HashMap<String, (i64, i64)>,
    /// Per model: its pause, if any (read once per pass).
    pauses: HashMap<String, Option<(i64, String)>>,
    /// Models a higher-priority step is held on by the token window.
    blocked: HashMap<String, String>,
    /// Pools whose gate held a step in this pass.
    gated: BTreeSet<String>,
    /// Per priority and pool, the latest turn dispatched in this pass.
    turned: BTreeMap<(u8, String), i64>,
    /// Per run met in this pass: its deadline and parameters if it runs
    /// (read once: a wide run's steps come in turn after turn).
    running: HashMap<String, Option<Running>>,
}

/// What planning a waiting step needs of its run, if it runs.
#[derive(Debug, Clone)]
struct Running {
    deadline_ms: Option<i64>,
    params: Rc<BTreeMap<String, String>>,
}

impl Counts {
    /// Tasks in flight by pool, read from the database when first needed
    /// in the pass (and counted on from there); likewise by model, running
    /// steps and active runs by workflow. A pass that meets no such limit
    /// reads none.
    fn pools(&mut self, t: &Tx<'_>) -> Result<&HashMap<String, i64>, DbError> {
        loaded(&mut self.pools, || tx::in_flight_by_pool(t))
    }

    fn models(&mut self, t: &Tx<'_>) -> Result<&HashMap<String, i64>, DbError> {
        loaded(&mut self.models, || tx::in_flight_by_model(t))
    }

    fn steps(&mut self, t: &Tx<'_>) -> Result<&HashMap<String, i64>, DbError> {
        loaded(&mut self.steps, || tx::running_steps_by_workflow(t))
    }

    fn runs(&mut self, t: &Tx<'_>) -> Result<&HashMap<String, i64>, DbError> {
        loaded(&mut self.runs, || tx::active_runs_by_workflow(t))
    }

    /// A run of `workflow` was admitted in this pass.
    fn admitted(&mut self, workflow: &str, run: &str) {
        if let Some(runs) = &mut self.runs {
            *runs.entry(workflow.to_string()).or_default() += 1;
        }
        self.admitted_runs.insert(run.to_string());
    }

    /// A run's deadline and parameters, if it is running.
    fn running(&mut self, t: &Tx<'_>, run: &str) -> Result<Option<Running>, DbError> {
        if let Some(known) = self.running.get(run) {
            return Ok(known.clone());
        }
        let read = match tx::run(t, run)?.filter(|r| r.status == RunStatus::Running) {
            Some(row) => Some(Running {
                deadline_ms: row.deadline_ms,
                params: Rc::new(run_params(t, run)?),
            }),
            None => None,
        };
        self.running.insert(run.to_string(), read.clone());
        Ok(read)
    }

    /// This pass changed `run` (failed it, or started a step of it another
    /// way), and through it perhaps others (a failed parent cancels its
    /// children): read every run again when next met.
    fn changed(&mut self) {
        self.running.clear();
    }

    /// A model's pause: until when, and why.
    fn pause(&mut self, t: &Tx<'_>, model: &str, now: i64) -> Result<Option<(i64, String)>, DbError> {
        if let Some(p) = self.pauses.get(model) {
            return Ok(p.clone());
        }
        let p = tx::model_pause(t, model, now)?;
        self.pauses.insert(model.to_string(), p.clone());
        Ok(p)
    }

    /// A model's rolling minute: (tasks, tokens).
    fn window(&mut self, t: &Tx<'_>, model: &str, now: i64) -> Result<(i64, i64), DbError> {
        if let Some(w) = self.windows.get(model) {
            return Ok(*w);
        }
        let w = tx::model_window(t, model, now - 60_000)?;
        self.windows.insert(model.to_string(), w);
        Ok(w)
    }

    /// A task was dispatched: count it everywhere.
    fn took(&mut self, workflow: &str, pool: &str, model: Option<&str>, task: &PlannedTask) {
        // Counts not read yet will be read with this task in them.
        let add = |map: &mut Option<HashMap<String, i64>>, key: &str| {
            if let Some(map) = map {
                *map.entry(key.to_string()).or_default() += 1;
            }
        };
        add(&mut self.steps, workflow);
        add(&mut self.pools, pool);
        if let Some(model) = model {
            add(&mut self.models, model);
            if let Some(w) = self.windows.get_mut(model) {
                w.0 += 1;
                w.1 += task.tokens.unwrap_or(0);
            }
        }
    }
}

/// The counts in `slot`, read by `read` the first time.
fn loaded(
    slot: &mut Option<HashMap<String, i64>>,
    read: impl FnOnce() -> Result<HashMap<String, i64>, DbError>,
) -> Result<&HashMap<String, i64>, DbError> {
    if slot.is_none() {
        *slot = Some(read()?);
    }
    Ok(slot.get_or_insert_default())
}

/// Which attempt a task is, and when it is due.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    task_id: Uuid,
    number: u32,
    due_ms: i64,
    /// The run's deadline, which no task of it outlives.
    run_deadline_ms: Option<i64>,
}

impl Attempt {
    /// A step's first attempt, due now.
    fn first(now: i64, run_deadline_ms: Option<i64>) -> Self {
        Self {
            task_id: Uuid::now_v7(),
            number: 1,
            due_ms: now,
            run_deadline_ms,
        }
    }
}

/// An encoded task ready for the outbox.
#[derive(Debug, Clone)]
struct PlannedTask {
    task_id: String,
    attempt: u32,
    due_ms: i64,
    deadline_ms: i64,
    model: Option<String>,
    tokens: Option<i64>,
    snapshot_hash: String,
    body: Vec<u8>,
    /// Its run is small: it goes to its pool's lane.
    lane: bool,
}

/// Bytes of an approval's message kept for display.
const MAX_SHOWN_MESSAGE: usize = 4096;

/// Every worker pool some step of `config` uses, and the default one.
fn pools_of(config: &Config) -> Vec<String> {
    let pools: BTreeSet<String> = config
        .workflows
        .values()
        .flat_map(|w| w.steps().iter().map(|s| s.queue.clone()))
        .chain(std::iter::once(courier_config::DEFAULT_QUEUE.to_string()))
        .collect();
    pools.into_iter().collect()
}

/// `text`, cut at [`MAX_SHOWN_MESSAGE`] bytes (on a character boundary).
fn shown(text: &str) -> String {
    if text.len() <= MAX_SHOWN_MESSAGE {
        return text.to_string();
    }
    let mut cut = MAX_SHOWN_MESSAGE;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// A result the scheduler writes for a task itself (lost past its deadline,
/// or impossible to dispatch), as if from a worker named `scheduler`.
pub fn scheduler_result(
    task_id: Uuid,
    run_id: Uuid,
    step: String,
    attempt: u32,
    status: TaskStatus,
    error: String,
) -> TaskResult {
    let now = u64::try_from(now_ms()).unwrap_or(0);
    TaskResult {
        task_id,
        run_id,
        step,
        attempt,
        status,
        output: String::new(),
        error: Some(error),
        started_unix_ms: now,
        finished_unix_ms: now,
        worker_id: "scheduler".into(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    }
}

/// Bytes of an agent step's prompt and messages.
fn prompt_len(a: &courier_wire::AgentSpec) -> usize {
    a.prompt.len() + a.messages.iter().map(|m| m.content.len()).sum::<usize>()
}

/// Bytes of a step's prompt as written (templates unresolved); 0 for other steps.
fn step_prompt_len(step: &Step) -> usize {
    match &step.run {
        StepRun::Agent(a) => prompt_len(a),
        _ => 0,
    }
}

/// Tokens a result may report per direction at most: more is a lie (or a
/// bug) that would overflow the sums budgets are checked against.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000_000;

/// A result's token usage, each direction capped at [`MAX_REPORTED_TOKENS`].
fn reported(usage: courier_wire::TokenUsage) -> (u64, u64) {
    (
        usage.input_tokens.min(MAX_REPORTED_TOKENS),
        usage.output_tokens.min(MAX_REPORTED_TOKENS),
    )
}

/// The limit a `waiting_on` text names, as low-cardinality metric labels:
/// (scope, name, limit), e.g. ("model", "openai", "concurrency"); a retry
/// waiting out its backoff is ("step", "", "retry_backoff"), a step waiting
/// for approval ("step", "", "approval").
pub fn waiting_labels(reason: &str) -> (&'static str, String, String) {
    let mut words = reason.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("retry"), _, _) => ("step", String::new(), "retry_backoff".into()),
        (Some("approval"), _, _) => ("step", String::new(), "approval".into()),
        (Some(scope @ ("workflow" | "pool" | "model")), Some(name), Some(limit)) => {
            let scope = match scope {
                "workflow" => "workflow",
                "pool" => "pool",
                _ => "model",
            };
            (scope, name.to_string(), limit.to_string())
        }
        _ => ("", String::new(), String::new()),
    }
}

/// Why a run past its deadline is cancelled.
fn timeout_reason(wf: Option<&Workflow>) -> String {
    match wf.and_then(|w| w.timeout) {
        Some(timeout) => format!("the run's timeout ({}) passed", courier_wire::humanize(timeout)),
        // A child run without a timeout of its own has its parent's deadline.
        None => "the run's deadline passed".to_string(),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The run's params, read at most once per change: `cache` keeps them
/// across the steps a change starts.
fn run_params_once<'c>(
    t: &Tx<'_>,
    run: &str,
    cache: &'c mut Option<BTreeMap<String, String>>,
) -> Result<&'c BTreeMap<String, String>, DbError> {
    if cache.is_none() {
        *cache = Some(run_params(t, run)?);
    }
    Ok(cache.get_or_insert_with(BTreeMap::new))
}

fn run_params(t: &Tx<'_>, run: &str) -> Result<BTreeMap<String, String>, DbError> {
    Ok(serde_json::from_str(&tx::run_params(t, run)?).unwrap_or_default())
}

/// Write a task for `step` (`name` is the step's, or its item's) to the
/// outbox, and mark the step running (`start`), unless it was inserted so.
fn write_task(
    c: &mut Change<'_, '_>,
    run: &str,
    step: &Step,
    name: &str,
    task: PlannedTask,
    start: bool,
) -> Result<(), DbError> {
    write_tasks(c, run, std::iter::once((step, name, task)), start)
}

/// Write tasks of `run` to the outbox (of its `step`s, for the step or
/// foreach item `name`) together; with `start`, each step (or item) starts
/// the task's attempt.
fn write_tasks<'s>(
    c: &mut Change<'_, '_>,
    run: &str,
    tasks: impl Iterator<Item = (&'s Step, &'s str, PlannedTask)>,
    start: bool,
) -> Result<(), DbError> {
    let tasks: Vec<_> = tasks.collect();
    let rows: Vec<NewTask<'_>> = tasks
        .iter()
        .map(|(step, name, task)| NewTask {
            task_id: &task.task_id,
            run,
            step: name,
            attempt: task.attempt,
            queue: &step.queue,
            snapshot_hash: &task.snapshot_hash,
            not_before_ms: task.due_ms,
            deadline_ms: task.deadline_ms,
            model: task.model.as_deref(),
            tokens: task.tokens,
        })
        .collect();
    tx::insert_tasks(c.t, &rows, c.now)?;
    drop(rows);
    let priority = run_priority(c, run)?;
    for (step, name, task) in tasks {
        if start {
            tx::start_step(c.t, run, name, task.attempt, c.now)?;
        }
        if c.effects.written_bytes + task.body.len() <= MAX_KEPT_BODY_BYTES {
            c.effects.written_bytes += task.body.len();
            let row = OutboxTask {
                task_id: task.task_id,
                run_id: run.to_string(),
                step: name.to_string(),
                queue: step.queue.clone(),
                attempt: task.attempt,
                snapshot_hash: task.snapshot_hash,
                not_before_ms: task.due_ms,
                priority,
                lane: task.lane,
            };
            c.effects.written.push((row, task.body));
        } else {
            c.effects.unkept = true;
        }
        c.applied.dispatched += 1;
    }
    Ok(())
}

/// What a step held at its gate waits on (its `waiting_on`): the gate's
/// key names the pool, or the pool's lane (`default.lane`), and its limits
/// (`256; 64 while its lane is busy`).
fn gate_reason(gates: &gate::Gates, key: &str) -> String {
    format!("pool {key} max_queued ({})", gates.described(key).unwrap_or_default())
}

/// The run's priority (for its tasks' outbox rows), read once per
/// transaction unless the transaction already knows it.
fn run_priority(c: &mut Change<'_, '_>, run: &str) -> Result<u8, DbError> {
    if let Some(&priority) = c.effects.priorities.get(run) {
        return Ok(priority);
    }
    let priority = tx::run(c.t, run)?.map_or(NORMAL_PRIORITY, |r| r.priority);
    c.effects.priorities.insert(run.to_string(), priority);
    Ok(priority)
}

/// A successful agent result whose output does not match the step's
/// `output_schema`, turned into a failure naming why (checked here too:
/// whatever a worker, an old one say, answered, a step cannot succeed with
/// an output that does not match); `None` when it stands as it is.
fn checked_output(step: &Step, r: &TaskResult) -> Option<TaskResult> {
    let (StepRun::Agent(a), TaskStatus::Succeeded) = (&step.run, r.status) else {
        return None;
    };
    let why = output_schema::validate(a.output_schema.as_deref()?, &r.output).err()?;
    Some(TaskResult {
        status: TaskStatus::Failed,
        error: Some(why),
        ..r.clone()
    })
}

/// Cancel a running run (one that already ended is left as it is): open
/// steps cancelled, unpublished tasks dropped, workers told, its running
/// child runs cancelled with it.
fn cancel_run(c: &mut Change<'_, '_>, run: &str, by: &str, reason: &str) -> Result<(), DbError> {
    if tx::run(c.t, run)?.map(|r| r.status) != Some(RunStatus::Running) {
        return Ok(());
    }
    for (name, _) in tx::open_steps(c.t, run)? {
        end_step(c, run, &name, StepStatus::Cancelled, None, Some(reason), None)?;
    }
    let dropped = tx::cancel_unpublished(c.t, run, None, c.now)?;
    c.effects.dropped.extend(dropped);
    end_run(c, run, RunStatus::Cancelled, Some(reason), Some(by))?;
    tx::insert_control(c.t, run, None, reason, c.now)?;
    cancel_children(c, run, None, &format!("its parent run {run} was cancelled: {reason}"))?;
    c.effects.admit = true;
    tracing::info!(%run, trace_id = %trace_id(run), by = %by.escape_debug(), reason = %reason.escape_debug(), "run cancelled");
    Ok(())
}

/// Cancel the running child runs of a run (of one of its steps).
fn cancel_children(c: &mut Change<'_, '_>, run: &str, step: Option<&str>, reason: &str) -> Result<(), DbError> {
    for child in tx::running_children(c.t, run, step)? {
        cancel_run(c, &child, "parent", reason)?;
    }
    Ok(())
}

/// End a run, counted (every run that ends ends here); a child run's parent
/// step is told (see [`Engine::settle_children`]).
fn end_run(
    c: &mut Change<'_, '_>,
    run: &str,
    status: RunStatus,
    error: Option<&str>,
    by: Option<&str>,
) -> Result<(), DbError> {
    if let Some((parent, step)) = tx::finish_run(c.t, run, status, error, by, c.now)? {
        c.effects.children_done.push((run.to_string(), parent, step));
    }
    c.applied.finished_runs += 1;
    if status == RunStatus::Cancelled {
        c.applied.cancelled_runs += 1;
    }
    Ok(())
}

/// Fail a running run: its open steps skipped, its tasks not yet sent
/// dropped, workers told to stop those running, its children cancelled.
fn fail_run(c: &mut Change<'_, '_>, run: &str, error: &str) -> Result<(), DbError> {
    // Once: several of its steps may find the reason in one pass.
    if tx::run(c.t, run)?.map(|r| r.status) != Some(RunStatus::Running) {
        return Ok(());
    }
    cancel_children(c, run, None, &format!("its parent run {run} failed: {error}"))?;
    for (name, _) in tx::open_steps(c.t, run)? {
        end_step(c, run, &name, StepStatus::Skipped, None, Some(error), None)?;
    }
    // Its tasks not yet sent are never sent, and workers stop those running.
    let dropped = tx::cancel_unpublished(c.t, run, None, c.now)?;
    c.effects.dropped.extend(dropped);
    tx::insert_control(c.t, run, None, error, c.now)?;
    end_run(c, run, RunStatus::Failed, Some(error), None)?;
    tracing::error!(%run, %error, "run failed");
    Ok(())
}

/// Fail a step and skip everything downstream of it.
fn fail_step(
    c: &mut Change<'_, '_>,
    wf: &Workflow,
    run: &str,
    name: &str,
    error: &str,
    worker: &str,
    states: &mut Statuses<'_>,
) -> Result<(), DbError> {
    end_step(c, run, name, StepStatus::Failed, None, Some(error), Some(worker))?;
    states.set(name, StepStatus::Failed);
    skip_downstream(c, wf, run, name, "failed", states)
}

/// Skip every pending or waiting step downstream of `name`.
fn skip_downstream(
    c: &mut Change<'_, '_>,
    wf: &Workflow,
    run: &str,
    name: &str,
    what: &str,
    states: &mut Statuses<'_>,
) -> Result<(), DbError> {
    let mut ended = vec![name.to_string()];
    while let Some(up) = ended.pop() {
        for s in wf.dependents(&up) {
            if matches!(
                states.get(c.t, &s.name)?,
                Some(StepStatus::Pending | StepStatus::Waiting)
            ) {
                let why = format!("upstream step \"{up}\" {what}");
                end_step(c, run, &s.name, StepStatus::Skipped, None, Some(&why), None)?;
                states.set(&s.name, StepStatus::Skipped);
                ended.push(s.name.clone());
            }
        }
    }
    Ok(())
}

/// End the run that the last results left possibly with nothing open,
/// if they did. Results of one run often come together in a batch, so
/// their run's count of open steps is read once for them instead of once
/// per result. Its end waits only while the results that follow are of the
/// same run (`apply_batch` ends it before any other run's result, and a
/// result that spent tokens ends its run at once, before its ancestors'
/// budgets are checked): a run whose last open step ended has no step left
/// running, so such a later result is recorded and changes nothing else, as
/// it would once the run had ended (a result for a step no longer in the
/// config ends the run first, see `result_target`), and no other run reads
/// it meanwhile.
fn end_finished_runs(c: &mut Change<'_, '_>) -> Result<(), DbError> {
    match c.effects.maybe_done.take() {
        Some(run) => finish_if_done(c, &run),
        None => Ok(()),
    }
}

/// An open step of `run` reaches a final state (one already final is left
/// as it is). Its run's count of open steps is not written for each step:
/// the ends are counted and written together when `finish_if_done` reads
/// the count, and before the commit. `tx::finish_step` alone leaves the
/// count too high.
#[allow(clippy::too_many_arguments)]
fn end_step(
    c: &mut Change<'_, '_>,
    run: &str,
    name: &str,
    status: StepStatus,
    output: Option<&str>,
    error: Option<&str>,
    worker: Option<&str>,
) -> Result<(), DbError> {
    if tx::finish_step(c.t, run, name, status, output, error, worker, c.now)? {
        match c.effects.closed.get_mut(run) {
            Some(n) => *n += 1,
            None => {
                c.effects.closed.insert(run.to_string(), 1);
            }
        }
    }
    Ok(())
}

/// Finish the run when no step is open: failed if a step failed, else
/// cancelled if a step was cancelled, else succeeded.
fn finish_if_done(c: &mut Change<'_, '_>, run: &str) -> Result<(), DbError> {
    if let Some(n) = c.effects.closed.remove(run) {
        tx::close_steps(c.t, run, n)?;
    }
    if !matches!(tx::open_step_count(c.t, run)?, Some((open, RunStatus::Running)) if open <= 0) {
        return Ok(());
    }
    let (failed, cancelled) = tx::failed_and_cancelled(c.t, run)?;
    let (status, error) = if !failed.is_empty() {
        (
            RunStatus::Failed,
            Some(format!("step(s) failed: {}", failed.join(", "))),
        )
    } else if !cancelled.is_empty() {
        (
            RunStatus::Cancelled,
            Some(format!("step(s) cancelled: {}", cancelled.join(", "))),
        )
    } else {
        (RunStatus::Succeeded, None)
    };
    end_run(c, run, status, error.as_deref(), None)?;
    tracing::info!(run = %run, trace_id = %trace_id(run), %status, error = error.as_deref().unwrap_or(""), "run finished");
    Ok(())
}

/// Step statuses of one run, read on first use and kept up to date.
struct Statuses<'a> {
    run: &'a str,
    known: BTreeMap<String, Option<StepStatus>>,
}

impl<'a> Statuses<'a> {
    fn new(run: &'a str) -> Self {
        Self {
            run,
            known: BTreeMap::new(),
        }
    }

    fn get(&mut self, t: &Tx<'_>, name: &str) -> Result<Option<StepStatus>, DbError> {
        if let Some(status) = self.known.get(name) {
            return Ok(*status);
        }
        let status = tx::step_status(t, self.run, name)?;
        self.known.insert(name.to_string(), status);
        Ok(status)
    }

    fn set(&mut self, name: &str, status: StepStatus) {
        self.known.insert(name.to_string(), Some(status));
    }
}

/// The outputs `step` reads (its templates' and its condition's), from
/// the database: only those, so an item or a step costs what it reads, not
/// what its ancestors wrote.
fn outputs(t: &Tx<'_>, run: &str, step: &Step) -> Result<BTreeMap<String, String>, DbError> {
    outputs_of(t, run, &step.reads)
}

/// The outputs of the named steps of a run (a skipped step's is empty).
fn outputs_of(t: &Tx<'_>, run: &str, names: &BTreeSet<String>) -> Result<BTreeMap<String, String>, DbError> {
    let mut out = BTreeMap::new();
    for name in names {
        if let Some(output) = tx::step_output(t, run, name)? {
            out.insert(name.clone(), output);
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
