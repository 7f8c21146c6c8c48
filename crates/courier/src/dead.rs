//! `courier dead list|requeue`: inspect and replay dead-lettered tasks.
//!
//! Listing takes the messages one at a time without acknowledging them
//! (holding their sizes, not their bodies) and closes the channel, which
//! puts them back. Requeueing publishes a message to its pool
//! again (confirmed) before acknowledging the dead copy.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use courier_amqp::Broker;
use courier_scheduler::ops;

use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead-lettered tasks with the reason each died.
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead-lettered tasks to their pool again.
    Requeue {
        /// The task (message) ID to replay (its oldest dead copy).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead-lettered task.
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(settings: &Settings, cmd: DeadCommand) -> anyhow::Result<ExitCode> {
    let broker = Broker::connect(&settings.amqp_url, settings.names(), "courier-dead")
        .await
        .with_context(|| format!("connecting to {}", settings.amqp_url))?;
    let queue = broker.names().dead();
    let mut letters = ops::DeadLetters::open(&broker, ops::MAX_DEAD_LISTED)
        .await
        .with_context(|| format!("reading {queue}"))?;
    let code = match cmd {
        DeadCommand::List { json } => {
            let dead = letters.all().await.with_context(|| format!("reading {queue}"))?;
            if json {
                let list: Vec<serde_json::Value> = dead
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "task_id": d.id(),
                            "run_id": d.delivery.correlation_id,
                            "pool": d.pool(),
                            "attempt": d.attempt(),
                            "bytes": d.bytes(),
                            "reason": d.reason(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                crate::term::out!("{:<38} {:<12} {:>8}  REASON", "TASK", "POOL", "BYTES");
                for d in &dead {
                    crate::term::out!("{:<38} {:<12} {:>8}  {}", d.id(), d.pool(), d.bytes(), d.reason());
                }
                crate::term::out!("{} dead-lettered task(s) in {queue}", dead.len());
            }
            ExitCode::SUCCESS
        }
        DeadCommand::Requeue { id, all } => {
            let publisher = broker.publisher(256).await?;
            let (mut requeued, mut skipped) = (0, 0);
            // A refused result carries its task's id: the task is looked
            // for past it.
            let mut only_results = false;
            // One at a time: a body is held only while it is requeued.
            let wanted = |d: &ops::DeadLetter| !d.is_result() && (all || id.as_deref() == Some(d.id()));
            loop {
                let next = letters
                    .next(wanted)
                    .await
                    .with_context(|| format!("reading {queue} (after requeueing {requeued} task(s))"))?;
                let Some(d) = next else { break };
                if !wanted(&d) {
                    only_results |= d.is_result() && id.as_deref() == Some(d.id());
                    continue;
                }
                let body = d.body().context("the dead letter was read without its body")?;
                let outcome = if d.pool().is_empty() {
                    Err(anyhow::anyhow!("it names no pool (not a task Courier dead-lettered)"))
                } else {
                    ops::requeue(&broker, &publisher, &d, body)
                        .await
                        .map_err(anyhow::Error::from)
                };
                match outcome {
                    Ok(()) => requeued += 1,
                    // One bad letter does not stop the others: it stays, and is named.
                    Err(e) if all => {
                        eprintln!("{}", crate::term::printable(&format!("skipped {}: {e:#}", d.id())));
                        skipped += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(e.context(format!("requeueing {}", d.id())));
                    }
                }
                if !all {
                    break;
                }
            }
            if requeued == 0 && !all {
                let id = id.unwrap_or_default();
                if only_results {
                    bail!("\"{id}\" is a refused result, not a task: it cannot be requeued");
                }
                bail!("no dead-lettered task with id \"{id}\"");
            }
            crate::term::out!("requeued {requeued} task(s)");
            if skipped > 0 {
                eprintln!("{skipped} dead letter(s) skipped, left in {queue}");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    };
    // Whatever was not acknowledged goes back to the dead queue.
    letters.close().await;
    let _ = broker.close().await;
    Ok(code)
}
