//! The workflow language's flow: `when` conditions (a false one skips the
//! step, and skips propagate), `foreach` steps (one task per item, at most
//! `max_concurrent` at a time, the outputs gathered in item order) and
//! `workflow:` steps (a child run; its outputs are the step's).
//!
//! **Invariant:** a foreach item is a step row of its own, `name[index]`,
//! dispatched, retried and cancelled like any step; its foreach step counts
//! its items (`tx::Items`), so an item's result costs the same whatever the
//! number of items, and the outputs are read once, when the last item ends.

use std::collections::BTreeMap;

use crate::db::Tx;
use courier_config::template::{self, Item, Values};
use courier_config::{MAX_WORKFLOW_DEPTH, OnSkipped, Step, Workflow};
use serde_json::Value;

use super::{
    Attempt, Change, Engine, NewRun, Statuses, end_step, fail_run, fail_step, finish_if_done, millis, outputs,
    outputs_of, parse_uuid, run_params_once, write_task,
};
use crate::db::tx::{self, RunRow};
use crate::db::{DbError, RunStatus, StepStatus};

/// The step a step row names: a step of the workflow, or an item
/// (`name[index]`) of one of its foreach steps, with its index.
pub(super) fn step_of<'w>(wf: &'w Workflow, name: &str) -> Option<(&'w Step, Option<usize>)> {
    if let Some(step) = wf.step(name) {
        return Some((step, None));
    }
    let (base, index) = name.strip_suffix(']')?.rsplit_once('[')?;
    let step = wf.step(base).filter(|s| s.foreach.is_some())?;
    Some((step, Some(index.parse().ok()?)))
}

/// Whether a step's output is structured (an agent step with an
/// `output_schema`, checked on every result): kept as JSON when gathered.
fn structured(s: &Step) -> bool {
    matches!(&s.run, courier_wire::StepRun::Agent(a) if a.output_schema.is_some())
}

/// Whether a first step starts inside its run's first transaction (its
/// condition, items or child run depend on the run) rather than being
/// planned before it.
pub(super) fn starts_in_transaction(s: &Step) -> bool {
    s.foreach.is_some() || s.when.is_some() || s.workflow.is_some()
}

/// The item of a foreach item's row (`None` for any other step).
pub(super) fn item_value(t: &Tx<'_>, run: &str, name: &str, index: Option<usize>) -> Result<Option<Item>, DbError> {
    let Some(index) = index else { return Ok(None) };
    let value = tx::item(t, run, name)?.map_or(Value::Null, |json| serde_json::from_str(&json).unwrap_or(Value::Null));
    Ok(Some(Item { index, value }))
}

impl Engine {
    /// Skip `s` (its condition is false) and, through the graph, what
    /// depends on it: a dependent is skipped too unless it says
    /// `depends_on_skipped: run`, in which case the skipped step counts as
    /// done (with an empty output) and it starts when its other
    /// dependencies allow.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn skip(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        s: &Step,
        why: &str,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let run = states.run;
        let mut todo = vec![(s, why.to_string())];
        while let Some((step, why)) = todo.pop() {
            end_step(c, run, &step.name, StepStatus::Skipped, None, Some(&why), None)?;
            states.set(&step.name, StepStatus::Skipped);
            tracing::debug!(%run, step = %step.name, %why, "step skipped");
            for d in wf.dependents(&step.name) {
                if states.get(c.t, &d.name)? != Some(StepStatus::Pending) {
                    continue;
                }
                match d.on_skipped {
                    OnSkipped::Skip => {
                        // Marked now, so a step below two skipped ones is pushed once.
                        states.set(&d.name, StepStatus::Skipped);
                        todo.push((d, format!("upstream step \"{}\" was skipped", step.name)));
                    }
                    OnSkipped::Run => {
                        let Some((_, pending)) = tx::dependency_done(c.t, run, &d.name)? else {
                            continue;
                        };
                        if pending.unwrap_or(0) == 0 {
                            self.start(c, wf, run_row, d, states, params)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A foreach step's dependencies are done: read its items, write one
    /// row per item, and start the first `max_concurrent` of them. An
    /// empty array succeeds at once with `[]`; anything but an array of at
    /// most `max_items` fails the step.
    pub(super) fn start_foreach(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        s: &Step,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let run = states.run;
        let upstream = outputs_of(c.t, run, &s.items_read())?;
        let given = run_params_once(c.t, run, params)?;
        let items = match s.items(given, &upstream, self.limits.task.max_decompressed) {
            Ok(items) => items,
            Err(e) => return fail_step(c, wf, run, &s.name, &e, "scheduler", states),
        };
        let items: Vec<String> = items.iter().map(Value::to_string).collect();
        tx::start_foreach(c.t, run, &s.name, &items, c.now)?;
        states.set(&s.name, StepStatus::Running);
        tracing::debug!(%run, step = %s.name, items = items.len(), "foreach started");
        self.advance_foreach(c, wf, run, s, states, params)
    }

    /// Move a foreach step on after one of its items ended (or at its
    /// start): skip the items not started after a failure (unless
    /// `continue_on_failure`), start items up to `max_concurrent`, and
    /// finish the step when no item is left.
    pub(super) fn advance_foreach(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run: &str,
        s: &Step,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let Some(f) = &s.foreach else { return Ok(()) };
        if tx::step_status(c.t, run, &s.name)? != Some(StepStatus::Running) {
            return Ok(());
        }
        let Some(run_row) = tx::run(c.t, run)?.filter(|r| r.status == RunStatus::Running) else {
            return Ok(());
        };
        let mut upstream = None;
        loop {
            let Some(items) = tx::items(c.t, run, &s.name)? else {
                return Ok(());
            };
            // Not started: never taken, or taken but held by a limit (all
            // may be taken, and some held, when the failure comes).
            if items.failed > 0
                && !f.continue_on_failure
                && tx::skip_unstarted_items(c.t, run, &s.name, "not started: an earlier item failed", c.now)? > 0
            {
                continue;
            }
            if items.left <= 0 {
                return self.finish_foreach(c, wf, &run_row, s, states, params);
            }
            if items.next >= items.total || items.active >= i64::from(f.max_concurrent) {
                return Ok(());
            }
            let Some((index, value)) = tx::take_item(c.t, run, &s.name, items.next)? else {
                continue;
            };
            let index = usize::try_from(index).unwrap_or(0);
            let name = format!("{}[{index}]", s.name);
            if let Some(reason) = self.held(c, wf, &run_row, s, true)? {
                let turn = self.turn(c, run, &s.queue)?;
                tx::wait_step(c.t, run, &name, reason.as_deref(), None, turn)?;
                c.effects.admit = true;
                continue;
            }
            if upstream.is_none() {
                upstream = Some(outputs(c.t, run, s)?);
            }
            let item = Item {
                index,
                value: serde_json::from_str(&value).unwrap_or(Value::Null),
            };
            let planned = self.plan_task(
                wf,
                s,
                (&name, Some(&item)),
                parse_uuid(run),
                Attempt::first(c.now, run_row.deadline_ms),
                run_params_once(c.t, run, params)?,
                upstream.as_ref().unwrap_or(&BTreeMap::new()),
            );
            match planned {
                Ok(task) => write_task(c, run, s, &name, task, true)?,
                Err(e) => {
                    let error = e.to_string();
                    let scheduler = Some("scheduler");
                    // Taken, it counts as started: its end frees its place
                    // (a pending item's end would not, and the step stalls).
                    tx::start_step(c.t, run, &name, 1, c.now)?;
                    end_step(c, run, &name, StepStatus::Failed, None, Some(&error), scheduler)?;
                }
            }
        }
    }

    /// Every item of a foreach step ended: it succeeds with the JSON array
    /// of the items' outputs in item order (`null` for an item that failed,
    /// with `continue_on_failure`), or fails naming the first failed item.
    fn finish_foreach(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        s: &Step,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let run = states.run;
        let max = self.limits.task.max_decompressed;
        let total_bytes = tx::outputs_size(c.t, run, Some(&s.name))?;
        if total_bytes > max {
            let error = format!(
                "the items' outputs together are {total_bytes} bytes: more than a task may carry ({max} bytes)"
            );
            return fail_step(c, wf, run, &s.name, &error, "scheduler", states);
        }
        let results = tx::item_results(c.t, run, &s.name)?;
        let total = results.len();
        let mut failed = Vec::new();
        let mut not_started = 0;
        let mut array = Vec::with_capacity(total);
        // Structured outputs (checked against their schema) are kept as JSON.
        let structured = structured(s);
        for (i, (status, output, error)) in results.into_iter().enumerate() {
            match status {
                StepStatus::Succeeded => {
                    let output = output.unwrap_or_default();
                    array.push(match serde_json::from_str(&output) {
                        Ok(json) if structured => json,
                        _ => Value::String(output),
                    });
                }
                StepStatus::Skipped => {
                    not_started += 1;
                    array.push(Value::Null);
                }
                other => {
                    failed.push((i, error.unwrap_or_else(|| other.as_str().to_string())));
                    array.push(Value::Null);
                }
            }
        }
        let continue_on_failure = s.foreach.as_ref().is_some_and(|f| f.continue_on_failure);
        let summary = |failed: &[(usize, String)]| {
            let (i, first) = &failed[0];
            let more = if not_started > 0 {
                format!(" ({not_started} not started)")
            } else {
                String::new()
            };
            format!(
                "{} of {total} items failed{more}; first, {}[{i}]: {first}",
                failed.len(),
                s.name
            )
        };
        if !failed.is_empty() && !continue_on_failure {
            return fail_step(c, wf, run, &s.name, &summary(&failed), "scheduler", states);
        }
        let output = Value::Array(array).to_string();
        if output.len() > max {
            let error = format!(
                "the items' outputs together are {} bytes: more than a task may carry ({max} bytes)",
                output.len()
            );
            return fail_step(c, wf, run, &s.name, &error, "scheduler", states);
        }
        self.record_success(c, wf, run, &s.name, &output, "scheduler", &[])?;
        if !failed.is_empty() {
            tx::set_step_error(c.t, run, &s.name, &format!("{} (null in the output)", summary(&failed)))?;
        }
        states.set(&s.name, StepStatus::Succeeded);
        tracing::debug!(%run, step = %s.name, items = total, failed = failed.len(), "foreach finished");
        self.release_dependents(c, wf, run_row, s, states, params)
    }

    /// A `workflow:` step's dependencies are done: start its child run with
    /// the params rendered, at this run's priority, within this run's
    /// deadline. A child that cannot start (too deep, unknown, bad params,
    /// a task that cannot be built) fails the step.
    pub(super) fn start_child(
        &self,
        c: &mut Change<'_, '_>,
        wf: &Workflow,
        run_row: &RunRow,
        s: &Step,
        states: &mut Statuses<'_>,
        params: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), DbError> {
        let run = states.run;
        let Some(sub) = &s.workflow else { return Ok(()) };
        // A run not yet admitted starts no child: admission starts it.
        if !run_row.admitted {
            let turn = self.turn(c, run, &s.queue)?;
            tx::wait_step(c.t, run, &s.name, None, None, turn)?;
            states.set(&s.name, StepStatus::Waiting);
            c.effects.admit = true;
            return Ok(());
        }
        let given = run_params_once(c.t, run, params)?;
        let (priority, depth) = tx::lineage(c.t, run)?;
        let upstream = outputs(c.t, run, s)?;
        let planned = (|| {
            if depth >= MAX_WORKFLOW_DEPTH {
                return Err(format!(
                    "sub-workflows nest at most {MAX_WORKFLOW_DEPTH} deep: not starting \"{}\" from a run {depth} deep",
                    sub.name
                ));
            }
            let child_wf = self
                .config
                .workflows
                .get(&sub.name)
                .ok_or_else(|| format!("workflow \"{}\" is no longer configured", sub.name))?;
            let values = Values::new(given, &upstream, None);
            let mut budget = template::Budget::new(self.limits.task.max_decompressed);
            let rendered = sub
                .params
                .iter()
                .map(|(k, v)| Ok((k.clone(), template::render(v, &values, &mut budget)?)))
                .collect::<Result<BTreeMap<_, _>, String>>()?;
            let child_params = child_wf.resolve_params(&rendered).map_err(|e| e.to_string())?;
            let child_id = uuid::Uuid::now_v7();
            let own = child_wf.timeout.map(|t| c.now.saturating_add(millis(t)));
            let deadline = match (own, run_row.deadline_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = self
                .plan_first(child_wf, child_id, &child_params, c.now, deadline)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((child_wf, child_id.to_string(), child_params, deadline, first))
        })();
        let (child_wf, child, child_params, deadline, first) = match planned {
            Ok(planned) => planned,
            Err(e) => {
                return fail_step(c, wf, run, &s.name, &format!("sub-workflow: {e}"), "scheduler", states);
            }
        };
        tx::await_child(c.t, run, &s.name, &child, c.now)?;
        states.set(&s.name, StepStatus::Running);
        let new = NewRun {
            id: &child,
            params: &child_params,
            priority,
            deadline,
            parent: Some((run, &s.name, depth + 1)),
        };
        tracing::info!(%run, step = %s.name, %child, workflow = %child_wf.name, "child run started");
        self.create_run(c, child_wf, &new, first)?;
        c.effects.admit = true;
        Ok(())
    }

    /// Tell the parents of child runs that ended in this transaction.
    /// Admission may end more runs (a held step that cannot be planned), so
    /// this goes on until none is left to settle.
    pub(super) fn settle_children(&self, c: &mut Change<'_, '_>) -> Result<(), DbError> {
        while !c.effects.children_done.is_empty() {
            while let Some((child, run, step)) = c.effects.children_done.pop() {
                self.child_ended(c, &child, &run, &step)?;
            }
            self.admit_in(c)?;
        }
        Ok(())
    }

    /// A child run ended: its parent step succeeds with the child's step
    /// outputs as a JSON object (`{"step": "output", ...}`, `null` for a
    /// step without one), or fails with the child's error.
    fn child_ended(&self, c: &mut Change<'_, '_>, child: &str, run: &str, step: &str) -> Result<(), DbError> {
        let Some(run_row) = tx::run(c.t, run)?.filter(|r| r.status == RunStatus::Running) else {
            return Ok(());
        };
        if tx::step_status(c.t, run, step)? != Some(StepStatus::Running) {
            return Ok(());
        }
        let Some((wf, s)) = self
            .config
            .workflows
            .get(&run_row.workflow)
            .and_then(|wf| Some((wf, wf.step(step)?)))
        else {
            let error = format!(
                "step \"{step}\" of workflow \"{}\" is no longer configured",
                run_row.workflow
            );
            return fail_run(c, run, &error);
        };
        let Some((child_workflow, status, error)) = tx::run_end(c.t, child)? else {
            return Ok(());
        };
        let mut states = Statuses::new(run);
        let by = format!("run {child}");
        let max = self.limits.task.max_decompressed;
        let total = tx::outputs_size(c.t, child, None)?;
        if status == RunStatus::Succeeded && total > max {
            let error =
                format!("the child run's outputs together are {total} bytes: more than a task may carry ({max} bytes)");
            fail_step(c, wf, run, step, &error, &by, &mut states)?;
        } else if status == RunStatus::Succeeded {
            // Structured outputs (checked against their schema) are kept as JSON.
            let child_wf = self.config.workflows.get(&child_workflow);
            let outputs: serde_json::Map<String, Value> = tx::run_outputs(c.t, child)?
                .into_iter()
                .map(|(name, output)| {
                    let structured = child_wf.and_then(|w| w.step(&name)).is_some_and(structured);
                    let value = match output {
                        None => Value::Null,
                        Some(text) => match serde_json::from_str(&text) {
                            Ok(json) if structured => json,
                            _ => Value::String(text),
                        },
                    };
                    (name, value)
                })
                .collect();
            let output = Value::Object(outputs).to_string();
            // Escaping can make the object several times its outputs' size.
            if output.len() > max {
                let error = format!(
                    "the child run's outputs together are {} bytes as JSON: more than a task may carry ({max} bytes)",
                    output.len()
                );
                fail_step(c, wf, run, step, &error, &by, &mut states)?;
            } else {
                self.record_success(c, wf, run, step, &output, &by, &[])?;
                states.set(step, StepStatus::Succeeded);
                self.release_dependents(c, wf, &run_row, s, &mut states, &mut None)?;
            }
        } else {
            let error = format!(
                "child run {child} of workflow \"{child_workflow}\" {}: {}",
                status.as_str(),
                error.unwrap_or_default()
            );
            fail_step(c, wf, run, step, &error, &by, &mut states)?;
        }
        finish_if_done(c, run)
    }
}
