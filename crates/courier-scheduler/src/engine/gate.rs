//! Keeps each pool's broker queue short, so a backlog waits at the
//! scheduler, where runs take turns, and not in the broker's first-come
//! first-served queue (where a small run waits behind a wide one).
//! A pool's lane (its second queue, for small runs' tasks) has a gate of its
//! own, under the lane's key: the gates are keyed by routing key. The lane's
//! limit is the pool's `max_queued` up to [`LANE_MAX_QUEUED`], and so is the
//! pool's own while its lane is busy (steps wait at the lane's gate, or a
//! task was dispatched or a step held there in the last [`LANE_QUIET`]):
//! small runs' tasks and results cross a broker that a wide backlog keeps
//! busy, and their time there grows with the pool's queue (measured beside
//! a 10,000-step run: p50 25-35 ms with 64 queued, 60-78 ms with 256),
//! while a wide backlog with no small run beside it goes faster with the
//! longer queue (15-35% more tasks a second, 8% fewer of the scheduler's
//! instructions).
//!
//! A pool's gate estimates the tasks waiting in its queue: those dispatched
//! and not yet confirmed by the broker, plus the broker's count when last
//! read and what it confirmed since. At its limit (`pools.<name>.max_queued`,
//! or the lane's as above) the gate shuts: new steps of the pool wait, `waiting_on` naming it, and
//! admission lets them go in turn as the queue empties. The scheduler's gate
//! loop reads the broker's count while a gate is shut or steps wait at it.
//! A gate whose count cannot be read (the broker refuses the read) goes
//! blind until a read succeeds: it counts only the tasks the broker has not
//! confirmed yet, trading its order for its pool's progress (and a broker
//! that is down, confirming nothing, still gets no more than the limit).
//! The estimate is an estimate, so the limit is not exact: the count of a
//! read can miss a task confirmed while it was answered, and what a
//! transaction dispatched stays counted if it rolls back, until the outbox
//! is next empty (then nothing is unpublished: the count is reset).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tokio::sync::Notify;

/// A pool's `max_queued` when its settings give none: at 3,000 tasks a
/// second, about 85 ms of work for its workers.
pub const DEFAULT_MAX_QUEUED: u32 = 256;

/// A lane's limit at most (a smaller `max_queued` is the lane's too), and
/// its pool's while the lane is busy: at 3,000 tasks a second, about 20 ms.
pub const LANE_MAX_QUEUED: u32 = 64;

/// How long a lane stays busy after its last task dispatched or step held:
/// meanwhile its pool's queue is kept to the lane's limit. Long enough that
/// small runs coming every few seconds find the short queue (with 1 s, one
/// every 2 s beside a wide run took p50 50 ms against 28 ms with 64 queued).
pub const LANE_QUIET: std::time::Duration = std::time::Duration::from_secs(10);

/// The gates of every pool the config names (none for a limit of 0).
#[derive(Debug)]
pub struct Gates {
    pools: HashMap<String, Gate>,
    /// Dispatches counted, ever.
    seq: std::sync::atomic::AtomicU64,
    /// Told when a gate shuts or a step waits at one.
    wake: Notify,
    /// The clock of the gates' `busy_until`.
    epoch: std::time::Instant,
    /// How long a lane stays busy ([`LANE_QUIET`]; ms).
    quiet_ms: i64,
    /// Retries waiting out their backoff: when each is due, and its pool
    /// (whose gate then holds it). In memory: after a restart the clock's
    /// full pass finds them.
    due: std::sync::Mutex<std::collections::BinaryHeap<std::cmp::Reverse<(i64, String)>>>,
}

impl Default for Gates {
    fn default() -> Self {
        Self::new([])
    }
}

#[derive(Debug)]
struct Gate {
    /// The pool, and whether this is its lane's gate.
    pool: String,
    lane: bool,
    /// The pool's `max_queued`, or the lane's limit for the lane.
    limit: i64,
    /// The limit while the pool's lane is busy: the lane's.
    busy_limit: i64,
    /// A pool's gate: its lane is busy until then (ms on the gates' clock).
    busy_until: AtomicI64,
    /// Tasks dispatched through the gate and not yet published.
    unpublished: AtomicI64,
    /// Tasks estimated ready in the broker's queue.
    ready: AtomicI64,
    /// Steps wait at this gate: new ones wait behind them.
    holding: AtomicBool,
    /// The broker's count could not be read: the gate counts only what the
    /// broker has not confirmed, until a read succeeds (one that cannot
    /// count must not stall its pool).
    blind: AtomicBool,
}

impl Gate {
    fn queued(&self) -> i64 {
        self.unpublished.load(Ordering::Relaxed) + self.ready.load(Ordering::Relaxed)
    }

    /// What counts against the limit: the estimate, or while blind only
    /// the tasks not yet confirmed (so a broker that confirms nothing, being
    /// down, is sent no more than the limit).
    fn counted(&self) -> i64 {
        if self.blind.load(Ordering::Relaxed) {
            self.unpublished.load(Ordering::Relaxed)
        } else {
            self.queued()
        }
    }

    /// Its limit now (`now` on the gates' clock).
    fn limit_at(&self, now: i64) -> i64 {
        if now < self.busy_until.load(Ordering::Relaxed) {
            self.busy_limit
        } else {
            self.limit
        }
    }

    /// At its limit.
    fn full(&self, now: i64) -> bool {
        self.counted() >= self.limit_at(now)
    }

    /// Room for half its limit at least: worth a pass for the steps waiting
    /// at it, which fills it again (a pass per task or two would cost a
    /// transaction each).
    fn refills(&self, now: i64) -> bool {
        let limit = self.limit_at(now);
        self.counted() <= limit - (limit / 2).max(1)
    }

    /// Steps wait here and it has room for them.
    fn open_holding(&self, now: i64) -> bool {
        self.holding.load(Ordering::Relaxed) && self.refills(now)
    }
}

impl Gates {
    /// Gates of the given limits, one for each pool's queue and one for its
    /// lane's ([`courier_amqp::lane_key`], the pool's limit up to
    /// [`LANE_MAX_QUEUED`]); pools with a limit of 0 have none.
    pub fn new(limits: impl IntoIterator<Item = (String, u32)>) -> Self {
        Self::with_quiet(limits, LANE_QUIET)
    }

    /// The same, a lane staying busy for `quiet` after its last use.
    pub fn with_quiet(limits: impl IntoIterator<Item = (String, u32)>, quiet: std::time::Duration) -> Self {
        let pools = limits
            .into_iter()
            .filter(|(_, limit)| *limit > 0)
            .flat_map(|(pool, limit)| [(pool.clone(), true, limit), (pool, false, limit)])
            .map(|(pool, lane, limit)| {
                let key = if lane {
                    courier_amqp::lane_key(&pool)
                } else {
                    pool.clone()
                };
                let busy_limit = i64::from(limit.min(LANE_MAX_QUEUED));
                let gate = Gate {
                    pool,
                    lane,
                    limit: if lane { busy_limit } else { i64::from(limit) },
                    busy_limit,
                    busy_until: AtomicI64::new(0),
                    unpublished: AtomicI64::new(0),
                    ready: AtomicI64::new(0),
                    holding: AtomicBool::new(false),
                    blind: AtomicBool::new(false),
                };
                (key, gate)
            })
            .collect();
        Self {
            pools,
            seq: Default::default(),
            wake: Notify::new(),
            epoch: std::time::Instant::now(),
            quiet_ms: i64::try_from(quiet.as_millis()).unwrap_or(i64::MAX),
            due: Default::default(),
        }
    }

    /// Now on the gates' clock (ms).
    fn now(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// A task was dispatched or a step held at `g`, or steps still wait
    /// there: if it is a lane's, the lane is busy for [`LANE_QUIET`] from
    /// now, and its pool's queue is kept to the lane's limit meanwhile.
    fn lane_used(&self, g: &Gate) {
        if g.lane
            && let Some(pool) = self.pools.get(&g.pool)
        {
            pool.busy_until
                .store(self.now().saturating_add(self.quiet_ms), Ordering::Relaxed);
        }
    }

    /// The limit of a pool's gate (its `max_queued`, a lane's up to
    /// [`LANE_MAX_QUEUED`]), if it has one.
    pub fn limit(&self, pool: &str) -> Option<i64> {
        self.pools.get(pool).map(|g| g.limit)
    }

    /// The limits of a gate as a step held there names them: `256`, or for
    /// a pool whose lane's is lower `256; 64 while its lane is busy`.
    pub fn described(&self, pool: &str) -> Option<String> {
        self.pools.get(pool).map(|g| {
            if g.busy_limit < g.limit {
                format!("{}; {} while its lane is busy", g.limit, g.busy_limit)
            } else {
                g.limit.to_string()
            }
        })
    }

    /// Whether a pool's queue is at its limit.
    pub fn shut(&self, pool: &str) -> bool {
        self.pools.get(pool).is_some_and(|g| g.full(self.now()))
    }

    /// Whether a new step of the pool may go, taking a place in its queue:
    /// not if the gate is shut or steps already wait at it (a new one takes
    /// its turn among them).
    pub fn admits(&self, pool: &str) -> bool {
        let Some(g) = self.pools.get(pool) else {
            return true;
        };
        if g.holding.load(Ordering::Relaxed) || g.full(self.now()) {
            // A lane's step held: the lane is busy (a dispatch marks it too).
            self.lane_used(g);
            return false;
        }
        self.dispatched(pool);
        true
    }

    /// Whether any pool has a gate.
    pub fn any(&self) -> bool {
        !self.pools.is_empty()
    }

    /// A step of the pool waits at its gate.
    pub fn held(&self, pool: &str) {
        if let Some(g) = self.pools.get(pool) {
            self.lane_used(g);
            if !g.holding.swap(true, Ordering::Relaxed) {
                self.wake.notify_one();
            }
        }
    }

    /// A step of the pool waits at its gate from `at_ms` (a retry's due
    /// time) on: see [`Gates::hold_due`].
    pub fn hold_at(&self, pool: &str, at_ms: i64) {
        if self.pools.contains_key(pool) {
            let mut due = self.due.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            due.push(std::cmp::Reverse((at_ms, pool.to_string())));
        }
    }

    /// The gates of the retries due by `now_ms` hold them now.
    pub fn hold_due(&self, now_ms: i64) {
        let mut due = self.due.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while due.peek().is_some_and(|std::cmp::Reverse((at, _))| *at <= now_ms) {
            if let Some(std::cmp::Reverse((_, pool))) = due.pop() {
                self.held(&pool);
            }
        }
    }

    /// The gates an admission pass that stopped before reading every
    /// waiting step must read the steps of, from their own turn order: those
    /// with room for steps waiting there (`holding`, or any with room for a
    /// full pass: a standby wrote steps the leader was not told of). Their
    /// steps lie further on than the pass read, behind any number waiting at
    /// other, shut gates (of higher priority or earlier turns). With each,
    /// its pool, whether it is the lane's, and its room.
    pub fn to_reach(&self, full: bool) -> Vec<(&str, &str, bool, usize)> {
        let now = self.now();
        self.pools
            .iter()
            .filter(|(_, g)| g.refills(now) && (full || g.holding.load(Ordering::Relaxed)))
            .map(|(key, g)| {
                let room = usize::try_from(g.limit_at(now) - g.counted()).unwrap_or(0);
                (key.as_str(), g.pool.as_str(), g.lane, room)
            })
            .collect()
    }

    /// An admission pass is over: steps of the gates in `held` wait at
    /// them, and new steps of those gates wait behind them; at the other
    /// gates none does if the pass read every waiting step (`complete`) or
    /// every one of theirs (`drained`); otherwise some may, further on.
    pub fn passed(
        &self,
        held: &std::collections::BTreeSet<String>,
        complete: bool,
        drained: &std::collections::BTreeSet<&str>,
    ) {
        for (key, g) in &self.pools {
            if held.contains(key) {
                self.held(key);
            } else if complete || drained.contains(key.as_str()) {
                g.holding.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Whether a gate holding steps (within reach) is open: a pass must
    /// reach them.
    pub fn open_holding(&self) -> bool {
        let now = self.now();
        self.pools.values().any(|g| g.open_holding(now))
    }

    /// A task was dispatched to the pool's queue by admission, which saw the
    /// gate open.
    pub fn dispatched(&self, pool: &str) {
        if let Some(g) = self.pools.get(pool) {
            self.seq.fetch_add(1, Ordering::Relaxed);
            g.unpublished.fetch_add(1, Ordering::Relaxed);
            self.lane_used(g);
            if g.full(self.now()) {
                self.wake.notify_one();
            }
        }
    }

    /// The broker confirmed a task of the pool: in its queue (`to_queue`),
    /// or in a delay queue. Tasks the gate did not count (from another
    /// scheduler, or before a restart) leave its count of unpublished ones
    /// at 0.
    pub fn sent(&self, pool: &str, to_queue: bool) {
        if let Some(g) = self.pools.get(pool) {
            let _ = g
                .unpublished
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some((n - 1).max(0)));
            if to_queue {
                g.ready.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The outbox has nothing left to publish, and no dispatch was counted
    /// since its last read (`seen`, from [`Gates::seq`] before that read):
    /// no task is unpublished (those counted and not sent were cancelled
    /// first, or their transaction rolled back).
    pub fn outbox_empty(&self, seen: u64) {
        if self.seq.load(Ordering::Relaxed) != seen {
            return;
        }
        for g in self.pools.values() {
            g.unpublished.store(0, Ordering::Relaxed);
        }
    }

    /// How many dispatches the gates have counted.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// The pools whose broker count should be read: shut, or holding steps.
    /// With each, its estimate of ready tasks now (to give back to
    /// [`Gates::observed`]).
    pub fn to_read(&self) -> Vec<(String, i64)> {
        let now = self.now();
        self.pools
            .iter()
            .filter(|(_, g)| g.full(now) || g.holding.load(Ordering::Relaxed) || g.blind.load(Ordering::Relaxed))
            .map(|(pool, g)| (pool.clone(), g.ready.load(Ordering::Relaxed)))
            .collect()
    }

    /// The broker counted `ready` tasks in the pool's queue, read when the
    /// estimate was `before`: what was published since stays counted.
    /// Whether steps wait at the gate and it is open now.
    pub fn observed(&self, pool: &str, ready: u32, before: i64) -> bool {
        let Some(g) = self.pools.get(pool) else {
            return false;
        };
        g.ready.fetch_add(i64::from(ready) - before, Ordering::Relaxed);
        g.blind.store(false, Ordering::Relaxed);
        self.still_held(g);
        g.open_holding(self.now())
    }

    /// The pool's count could not be read: its gate goes blind (counts
    /// only the tasks not yet confirmed) until a read succeeds. Whether
    /// steps wait at it and it has room for them.
    pub fn unread(&self, pool: &str) -> bool {
        let Some(g) = self.pools.get(pool) else {
            return false;
        };
        g.blind.store(true, Ordering::Relaxed);
        self.still_held(g);
        g.open_holding(self.now())
    }

    /// A lane whose steps still wait (its count read while it holds them,
    /// every few ms by the gate loop) stays busy: a shut lane runs no pass
    /// that would mark it.
    fn still_held(&self, g: &Gate) {
        if g.holding.load(Ordering::Relaxed) {
            self.lane_used(g);
        }
    }

    /// Wait until a gate shuts or a step waits at one.
    pub async fn shutting(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_shuts_at_its_limit_and_opens_on_the_brokers_count() {
        let gates = Gates::new([("default".to_string(), 3), ("off".to_string(), 0)]);
        assert_eq!((gates.limit("default"), gates.limit("off")), (Some(3), None));
        for _ in 0..3 {
            assert!(!gates.shut("default"));
            assert!(gates.admits("default") && gates.admits("off"));
        }
        assert!(gates.shut("default") && !gates.admits("default"));
        assert!(!gates.shut("off") && gates.admits("off"));
        assert!(Gates::new([("default".to_string(), 1)]).admits("default"));
        // Until published, they count whatever the broker says.
        let [(pool, before)] = gates.to_read().try_into().unwrap();
        assert_eq!((pool.as_str(), before), ("default", 0));
        assert!(!gates.observed("default", 0, before));
        assert!(gates.shut("default"));
        for to_queue in [true, true, false] {
            gates.sent("default", to_queue);
        }
        assert!(gates.to_read().is_empty(), "2 < 3: open, and no step waits");
        gates.held("default");
        let [(_, before)] = gates.to_read().try_into().unwrap();
        assert_eq!(before, 2, "two published to the queue, one to a delay queue");
        // One more published while the count was read: it stays counted.
        gates.sent("default", true);
        assert!(gates.observed("default", 1, before), "1 + 1 < 3, and a step waits");
        assert!(!gates.shut("default"));
        assert!(!gates.admits("default"), "new steps wait behind the held one");
        gates.passed(&["default".to_string()].into(), false, &Default::default());
        assert!(!gates.admits("default"), "a pass held steps at the gate");
        assert!(gates.open_holding());
        gates.passed(&Default::default(), false, &Default::default());
        assert!(!gates.admits("default"), "a pass that did not read them all");
        gates.passed(&Default::default(), true, &Default::default());
        assert!(gates.to_read().is_empty());
        assert!(gates.admits("default"));
        assert_eq!(gates.to_read().len(), 1, "its queue is full again");
        gates.outbox_empty(gates.seq() - 1);
        assert_eq!(gates.to_read().len(), 1, "a dispatch the outbox did not see yet");
        gates.outbox_empty(gates.seq());
        assert!(gates.to_read().is_empty(), "that task was cancelled before it went");
    }

    #[test]
    fn a_pass_reads_the_steps_of_each_gate_with_room_for_those_waiting_there() {
        let gates = Gates::new([("default".to_string(), 4), ("gpu".to_string(), 2)]);
        let lane = courier_amqp::lane_key("default");
        // The pool's queue is full of a wide backlog's tasks, and steps wait
        // at its gate; small runs' steps wait at the lane's, which has room.
        for _ in 0..4 {
            assert!(gates.admits("default"));
        }
        gates.held("default");
        gates.held(&lane);
        assert_eq!(gates.to_reach(false), [(lane.as_str(), "default", true, 4)]);
        assert!(gates.admits("gpu"));
        let mut full = gates.to_reach(true);
        full.sort();
        assert_eq!(
            full,
            [
                (lane.as_str(), "default", true, 4),
                ("gpu", "gpu", false, 1),
                ("gpu.lane", "gpu", true, 2)
            ],
            "a full pass reads every gate with room, holding or not"
        );
        // A pass read every step waiting at the lane's gate and held none.
        let default: std::collections::BTreeSet<String> = ["default".to_string()].into();
        gates.passed(&default, false, &[lane.as_str()].into());
        assert!(gates.admits(&lane), "none waits at the lane's gate");
        assert!(!gates.admits("default"));
        assert!(gates.to_reach(false).is_empty(), "the pool's gate is shut");
    }

    #[test]
    fn a_pools_queue_is_kept_to_its_lanes_limit_while_the_lane_is_busy() {
        let quiet = std::time::Duration::from_millis(50);
        let gates = Gates::with_quiet([("default".to_string(), 100), ("small".to_string(), 3)], quiet);
        let lane = courier_amqp::lane_key("default");
        assert_eq!((gates.limit("default"), gates.limit(&lane)), (Some(100), Some(64)));
        assert_eq!((gates.limit("small"), gates.limit("small.lane")), (Some(3), Some(3)));
        assert_eq!(gates.described("default").unwrap(), "100; 64 while its lane is busy");
        assert_eq!(gates.described("small").unwrap(), "3");
        for _ in 0..70 {
            assert!(gates.admits("default"));
        }
        assert!(!gates.shut("default"), "70 of 100 while the lane is quiet");
        assert!(gates.admits(&lane), "a small run's task");
        assert!(gates.shut("default"), "70 of 64 while the lane is busy");
        assert!(!gates.admits("default"));
        assert!(!gates.shut(&lane), "1 of 64");
        std::thread::sleep(quiet * 2);
        assert!(!gates.shut("default"), "quiet again: 70 of 100");
        // Steps held at the lane's gate keep it busy for as long as they
        // wait there, its count read (by the gate loop) while they do.
        gates.held(&lane);
        assert!(gates.shut("default"));
        for _ in 0..2 {
            std::thread::sleep(quiet * 2);
            let (_, before) = gates.to_read().into_iter().find(|(key, _)| *key == lane).unwrap();
            assert!(!gates.observed(&lane, 64, before), "the lane's queue is full");
            assert!(gates.shut("default"), "steps still wait at the lane");
        }
        // None waits there any more: quiet once the time has passed.
        gates.passed(&Default::default(), true, &Default::default());
        std::thread::sleep(quiet * 2);
        assert!(!gates.shut("default"));
        assert!(gates.admits("default"));
    }

    #[test]
    fn a_gate_that_cannot_read_its_count_counts_only_what_is_unconfirmed_until_a_read_succeeds() {
        let gates = Gates::new([("default".to_string(), 2)]);
        assert!(gates.admits("default") && gates.admits("default"));
        gates.held("default");
        assert!(!gates.unread("default"), "two unconfirmed: shut even blind");
        assert!(gates.shut("default"), "a broker that confirms nothing gets no more");
        gates.sent("default", true);
        gates.sent("default", true);
        assert!(
            !gates.shut("default") && gates.open_holding(),
            "blind: what is confirmed is not counted"
        );
        gates.passed(&Default::default(), true, &Default::default());
        assert!(gates.admits("default"));
        // Still read, and what was confirmed meanwhile is in the estimate.
        let [(_, before)] = gates.to_read().try_into().unwrap();
        assert_eq!(before, 2);
        assert!(!gates.observed("default", 5, before));
        assert!(gates.shut("default"), "the count read: 5 ready, shut again");
    }

    #[test]
    fn a_retry_holds_its_gate_from_when_it_is_due() {
        let gates = Gates::new([("default".to_string(), 4), ("off".to_string(), 0)]);
        gates.hold_at("default", 1_000);
        gates.hold_at("off", 500);
        gates.hold_due(999);
        assert!(gates.admits("default"), "not due yet: new steps go");
        gates.hold_due(1_000);
        assert!(
            !gates.admits("default") && gates.open_holding(),
            "due: it takes its turn first"
        );
        assert!(
            gates.due.lock().unwrap().is_empty(),
            "a pool without a gate keeps nothing"
        );
    }

    #[test]
    fn a_gate_holding_steps_opens_for_them_once_half_its_queue_is_free() {
        let gates = Gates::new([("default".to_string(), 4)]);
        gates.held("default");
        let [(_, before)] = gates.to_read().try_into().unwrap();
        assert!(!gates.observed("default", 3, before), "3 of 4: not worth a pass");
        assert!(!gates.shut("default") && !gates.open_holding());
        let [(_, before)] = gates.to_read().try_into().unwrap();
        assert!(gates.observed("default", 2, before), "2 of 4: a pass fills it");
        assert!(gates.open_holding());
    }
}
