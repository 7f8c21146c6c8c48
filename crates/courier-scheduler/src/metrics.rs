//! The scheduler's Prometheus metrics: names and help text in one place.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label for a status (task result status or run status): low cardinality.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub status: String,
}

/// Label for why a result was refused: low cardinality.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Labels for tokens: model ID and direction (input, output).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Tokens {
    pub model: String,
    pub direction: String,
}

/// Labels for a limit holding steps: scope (model, pool, workflow, step),
/// name (empty for a step's retry backoff) and the limit.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub scope: String,
    pub name: String,
    pub limit: String,
}

/// Label for a model ID.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Model {
    pub model: String,
}

/// Every metric the scheduler exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub tasks_published: Counter,
    pub results_received: Family<Status, Counter>,
    pub results_duplicate: Counter,
    pub results_refused: Family<Reason, Counter>,
    pub tasks_retried: Counter,
    pub tasks_lost: Counter,
    pub memory_not_written: Counter,
    pub runs_submitted: Counter,
    pub runs_finished: Counter,
    pub outbox_pending: Gauge,
    pub runs: Family<Status, Gauge>,
    pub runs_cancelled: Counter,
    pub llm_tokens: Family<Tokens, Counter>,
    pub llm_cost: Family<Model, Counter<f64, AtomicU64>>,
    pub steps_waiting: Family<Limit, Gauge>,
}

impl Metrics {
    /// Every labelled counter at 0 for the labels known at start (result
    /// statuses, refusal reasons, the config's models), so the first
    /// increment shows in `rate()`.
    pub fn initialize<'m>(&self, models: impl Iterator<Item = &'m str>) {
        for status in courier_wire::TaskStatus::ALL {
            let _ = self.results_received.get_or_create(&Status {
                status: status.as_str().into(),
            });
        }
        for reason in ["unsigned", "forged", "undecodable", "mismatch", "memory_not_allowed"] {
            let _ = self.results_refused.get_or_create(&Reason { reason: reason.into() });
        }
        for model in models {
            for direction in ["input", "output"] {
                let _ = self.llm_tokens.get_or_create(&Tokens {
                    model: model.into(),
                    direction: direction.into(),
                });
            }
            let _ = self.llm_cost.get_or_create(&Model { model: model.into() });
        }
    }

    /// Register every metric under the `courier_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "courier_tasks_published",
            "Tasks confirmed by the broker",
            self.tasks_published.clone(),
        );
        registry.register(
            "courier_results_received",
            "Results received, by status (duplicates included)",
            self.results_received.clone(),
        );
        registry.register(
            "courier_results_duplicate",
            "Duplicate results ignored",
            self.results_duplicate.clone(),
        );
        registry.register(
            "courier_results_refused",
            "Results refused and dead-lettered, by reason (unsigned, forged, undecodable, mismatch, memory_not_allowed)",
            self.results_refused.clone(),
        );
        registry.register(
            "courier_tasks_retried",
            "Failed attempts scheduled again",
            self.tasks_retried.clone(),
        );
        registry.register(
            "courier_tasks_lost",
            "Tasks the broker dead-lettered at their queue's delivery limit (the worker holding each was lost every time), whose attempts failed",
            self.tasks_lost.clone(),
        );
        registry.register(
            "courier_memory_updates_failed",
            "Memory proposals of succeeded steps that could not be written (the step's error says why)",
            self.memory_not_written.clone(),
        );
        registry.register("courier_runs_submitted", "Runs started", self.runs_submitted.clone());
        registry.register(
            "courier_runs_finished",
            "Runs that reached a final state (succeeded, failed or cancelled)",
            self.runs_finished.clone(),
        );
        registry.register(
            "courier_outbox_pending",
            "Tasks written but not yet confirmed by the broker",
            self.outbox_pending.clone(),
        );
        registry.register("courier_runs", "Runs in the database, by status", self.runs.clone());
        registry.register(
            "courier_runs_cancelled",
            "Runs cancelled: by a person (API, CLI, UI; the run or its last open step), their timeout or their budget",
            self.runs_cancelled.clone(),
        );
        registry.register(
            "courier_llm_tokens",
            "Tokens agent steps used, by model ID and direction (input, output), from results",
            self.llm_tokens.clone(),
        );
        registry.register(
            "courier_llm_cost",
            "What agent steps cost, by model ID, from the model's pricing",
            self.llm_cost.clone(),
        );
        registry.register(
            "courier_steps_waiting",
            "Steps waiting, by what holds them (scope: model, pool, workflow, or step for a retry's backoff; name; limit)",
            self.steps_waiting.clone(),
        );
    }
}
