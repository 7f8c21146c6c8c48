//! Cancellations, as every worker learns them from the control stream: the
//! runs and steps cancelled (so their tasks are answered, never run) and the
//! steps running here (so they are stopped).
//!
//! A worker reads the stream from its first retained message, and writes a
//! marker when it connects: once it reads its own marker back it knows every
//! cancellation published before, and only then takes tasks. A worker started
//! after a cancellation therefore never runs the cancelled run's tasks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_amqp::{AmqpError, Broker, Outgoing, Publisher};
use courier_wire::{Control, Limits, SigningKey, Task, decode, encode, headers};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

/// Runs remembered as (partly) cancelled at most; past it, the oldest are
/// forgotten (their tasks have long expired: the stream keeps 3 days).
const MAX_REMEMBERED: usize = 200_000;

/// How long a worker catching up on the stream waits for the next message
/// before it gives up on the connection (and reconnects). Counted per
/// message, not in total: a long stream takes as long as it takes.
const CATCH_UP_IDLE: Duration = Duration::from_secs(30);

/// Bounds on a control message: a run id, a step name and a reason.
const CONTROL_LIMITS: Limits = Limits {
    max_compressed: 64 * 1024,
    max_decompressed: 64 * 1024,
};

/// What is cancelled of one run.
#[derive(Debug)]
struct Cancelled {
    /// The whole run, and why.
    run: Option<String>,
    /// Single steps, and why.
    steps: HashMap<String, String>,
    at: Instant,
}

/// A step running here.
#[derive(Debug)]
struct Running {
    run: Uuid,
    step: String,
    stop: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

#[derive(Debug, Default)]
struct Inner {
    cancelled: HashMap<Uuid, Cancelled>,
    running: HashMap<Uuid, Running>,
}

/// Cancelled runs and steps, and the steps running on this worker.
#[derive(Debug, Default)]
pub struct Cancellations {
    inner: Mutex<Inner>,
}

/// A step registered as running; unregistered when dropped.
#[derive(Debug)]
pub struct Guard<'a> {
    owner: &'a Cancellations,
    task: Uuid,
    /// Cancelled when the step's run or the step is cancelled.
    pub stop: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Guard<'_> {
    /// Why the step was stopped.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "cancelled".into())
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.owner.lock().running.remove(&self.task);
    }
}

impl Cancellations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register `task` as running, or say why it must not run.
    ///
    /// # Errors
    /// The reason its run or step was cancelled.
    pub fn start(&self, task: &Task) -> Result<Guard<'_>, String> {
        let mut inner = self.lock();
        if let Some(reason) = inner
            .cancelled
            .get(&task.run_id)
            .and_then(|c| reason_for(c, &task.step))
        {
            return Err(reason);
        }
        let stop = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        inner.running.insert(
            task.task_id,
            Running {
                run: task.run_id,
                step: task.step.clone(),
                stop: stop.clone(),
                reason: reason.clone(),
            },
        );
        Ok(Guard {
            owner: self,
            task: task.task_id,
            stop,
            reason,
        })
    }

    /// Record a cancellation and stop the matching steps running here;
    /// returns how many were stopped.
    pub fn cancel(&self, run: Uuid, step: Option<&str>, reason: &str) -> usize {
        let mut inner = self.lock();
        if inner.cancelled.len() >= MAX_REMEMBERED && !inner.cancelled.contains_key(&run) {
            forget_oldest(&mut inner.cancelled);
        }
        let entry = inner.cancelled.entry(run).or_insert_with(|| Cancelled {
            run: None,
            steps: HashMap::new(),
            at: Instant::now(),
        });
        match step {
            None => entry.run = Some(reason.to_string()),
            Some(step) => {
                entry.steps.insert(step.to_string(), reason.to_string());
            }
        }
        let mut stopped = 0;
        for running in inner.running.values() {
            if running.run == run && step.is_none_or(|s| s == foreach_step(&running.step) || s == running.step) {
                *running.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.to_string());
                running.stop.cancel();
                stopped += 1;
            }
        }
        stopped
    }
}

/// The reason a task of `step` is cancelled: its run's, its step's, or
/// (an item `name[3]` of a foreach) its foreach step's.
fn reason_for(c: &Cancelled, step: &str) -> Option<String> {
    c.run
        .clone()
        .or_else(|| c.steps.get(step).or_else(|| c.steps.get(foreach_step(step))).cloned())
}

/// The foreach step an item's name (`name[3]`) belongs to; any other name as it is.
fn foreach_step(step: &str) -> &str {
    step.strip_suffix(']')
        .and_then(|s| s.rsplit_once('['))
        .map_or(step, |(base, _)| base)
}

/// Drop the oldest tenth of what is remembered.
fn forget_oldest(cancelled: &mut HashMap<Uuid, Cancelled>) {
    let mut ages: Vec<(Instant, Uuid)> = cancelled.iter().map(|(id, c)| (c.at, *id)).collect();
    ages.sort_unstable();
    for (_, id) in ages.iter().take(MAX_REMEMBERED / 10) {
        cancelled.remove(id);
    }
}

/// Follow the control stream: signal `ready` once this worker's own marker
/// is read back (everything before it is known), then keep applying
/// cancellations until the connection fails.
///
/// # Errors
/// The broker failed, or the marker was not read back in time.
pub async fn follow(
    broker: &Broker,
    publisher: &Publisher,
    worker_id: &str,
    key: Option<&SigningKey>,
    cancellations: &Cancellations,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), AmqpError> {
    let mut consumer = broker.control_consumer(&format!("{worker_id}:control")).await?;
    let nonce = Uuid::now_v7();
    let marker = encode(&Control::Marker { nonce }, &CONTROL_LIMITS).map_err(|_| AmqpError::Closed)?;
    let stream = broker.names().control();
    publisher
        .publish(Outgoing {
            exchange: "",
            routing_key: &stream,
            body: &marker,
            message_id: &nonce.to_string(),
            correlation_id: "",
            headers: Vec::new(),
        })
        .await?;
    let mut ready = Some(ready);
    loop {
        let next = if ready.is_some() {
            match tokio::time::timeout(CATCH_UP_IDLE, consumer.next()).await {
                Ok(next) => next,
                Err(_) => {
                    warn!("the control stream went quiet before this worker's marker came back; reconnecting");
                    return Err(AmqpError::Closed);
                }
            }
        } else {
            consumer.next().await
        };
        let delivery = next.ok_or(AmqpError::Closed)??;
        delivery.ack().await?;
        let message = match decode::<Control>(&delivery.body, &CONTROL_LIMITS) {
            Ok(message) => message,
            Err(e) => {
                warn!(error = %e, "ignoring an undecodable control message");
                continue;
            }
        };
        match message {
            Control::Marker { nonce: seen } => {
                if seen == nonce
                    && let Some(ready) = ready.take()
                {
                    info!("read the control stream up to this worker's marker");
                    let _ = ready.send(());
                }
            }
            Control::Cancel { run_id, step, reason } => {
                if let Some(key) = key
                    && let Err(e) = key.verify("cancellation", &delivery.body, delivery.header_str(headers::SIGNATURE))
                {
                    warn!(error = %e, run = %run_id, "ignoring a cancellation that is not signed by the scheduler");
                    continue;
                }
                let stopped = cancellations.cancel(run_id, step.as_deref(), &reason);
                if stopped > 0 || ready.is_none() {
                    info!(run = %run_id, step = step.as_deref().unwrap_or(""), stopped, %reason, "cancellation received");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use courier_wire::{StepRun, StepSpec};

    use super::*;

    fn task(run: Uuid, step: &str) -> Task {
        Task {
            task_id: Uuid::now_v7(),
            run_id: run,
            workflow: "w".into(),
            step: step.into(),
            attempt: 1,
            spec: StepSpec {
                timeout: Duration::from_secs(1),
                run: StepRun::Echo { text: String::new() },
            },
            upstream: BTreeMap::new(),
            deadline_unix_ms: u64::MAX,
            snapshot: Vec::new(),
            pool: String::new(),
        }
    }

    #[test]
    fn a_cancellation_stops_running_steps_and_refuses_later_tasks() {
        let c = Cancellations::default();
        let (run, other) = (Uuid::now_v7(), Uuid::now_v7());
        let a = task(run, "a");
        let guard = c.start(&a).unwrap();
        let untouched = c.start(&task(other, "a")).unwrap();
        // One step of the run: only that step.
        assert_eq!(c.cancel(run, Some("b"), "not b"), 0);
        assert!(!guard.stop.is_cancelled());
        assert_eq!(c.start(&task(run, "b")).unwrap_err(), "not b");
        // The whole run.
        assert_eq!(c.cancel(run, None, "stop it"), 1);
        assert!(guard.stop.is_cancelled());
        assert_eq!(guard.reason(), "stop it");
        assert!(!untouched.stop.is_cancelled());
        assert_eq!(c.start(&task(run, "c")).unwrap_err(), "stop it");
        drop(guard);
        assert_eq!(c.lock().running.len(), 1, "a finished step is unregistered");
    }

    #[test]
    fn cancelling_a_foreach_step_covers_its_items() {
        let c = Cancellations::default();
        let run = Uuid::now_v7();
        let item = c.start(&task(run, "review[3]")).unwrap();
        let other = c.start(&task(run, "reviewer[0]")).unwrap();
        assert_eq!(c.cancel(run, Some("review"), "enough"), 1);
        assert!(item.stop.is_cancelled());
        assert!(!other.stop.is_cancelled());
        assert_eq!(c.start(&task(run, "review[7]")).unwrap_err(), "enough");
        // One item alone.
        assert_eq!(c.cancel(run, Some("reviewer[1]"), "not that one"), 0);
        assert!(c.start(&task(run, "reviewer[2]")).is_ok());
    }

    #[test]
    fn what_is_remembered_is_bounded() {
        let c = Cancellations::default();
        for _ in 0..MAX_REMEMBERED + 5 {
            c.cancel(Uuid::now_v7(), None, "r");
        }
        let n = c.lock().cancelled.len();
        assert!(n <= MAX_REMEMBERED && n > MAX_REMEMBERED / 2, "{n}");
    }
}
