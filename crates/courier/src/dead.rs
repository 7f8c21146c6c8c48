//! `courier dead list|requeue`: inspect and replay dead-lettered tasks.
//!
//! Listing takes the messages without acknowledging them and closes the
//! channel, which puts them back. Requeueing publishes a message to its pool
//! again (confirmed) before acknowledging the dead copy.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use courier_amqp::{Broker, Delivery, Header, Outgoing};
use courier_wire::headers;

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
        /// The task (message) ID to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead-lettered task.
        #[arg(long)]
        all: bool,
    },
}

struct Dead {
    delivery: Delivery,
}

impl Dead {
    fn id(&self) -> &str {
        self.delivery.message_id.as_deref().unwrap_or("-")
    }

    fn pool(&self) -> &str {
        if self.is_result() {
            return "(result)";
        }
        self.delivery
            .header_str(headers::POOL)
            .unwrap_or(&self.delivery.routing_key)
    }

    /// A result the scheduler refused: kept to be read, never requeued.
    fn is_result(&self) -> bool {
        self.delivery.header_str(headers::KIND) == Some("result")
    }

    fn reason(&self) -> String {
        match (
            self.delivery.header_str(headers::DEAD_REASON),
            self.delivery.header_str(headers::BROKER_DEATH_REASON),
        ) {
            (Some(reason), _) => reason.to_string(),
            (None, Some(broker)) => format!("dead-lettered by the broker: {broker}"),
            (None, None) => "unknown".into(),
        }
    }
}

/// Take every message now in the dead queue, unacknowledged.
async fn take_all(broker: &Broker) -> anyhow::Result<(courier_amqp::Consumer, Vec<Dead>)> {
    let queue = broker.names().dead();
    let (ready, _) = broker
        .queue_depth(&queue)
        .await
        .with_context(|| format!("reading {queue}"))?;
    let prefetch = u16::try_from(ready.max(1)).unwrap_or(u16::MAX);
    let mut consumer = broker.consumer(&queue, prefetch, "courier-dead").await?;
    let mut dead = Vec::new();
    while dead.len() < ready as usize {
        match tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            Ok(Some(Ok(delivery))) => dead.push(Dead { delivery }),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => break,
        }
    }
    Ok((consumer, dead))
}

pub async fn run(settings: &Settings, cmd: DeadCommand) -> anyhow::Result<ExitCode> {
    let broker = Broker::connect(&settings.amqp_url, settings.names(), "courier-dead")
        .await
        .with_context(|| format!("connecting to {}", settings.amqp_url))?;
    let (consumer, dead) = take_all(&broker).await?;
    let code = match cmd {
        DeadCommand::List { json } => {
            if json {
                let list: Vec<serde_json::Value> = dead
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "task_id": d.id(),
                            "run_id": d.delivery.correlation_id,
                            "pool": d.pool(),
                            "attempt": d.delivery.header_int(headers::ATTEMPT),
                            "bytes": d.delivery.body.len(),
                            "reason": d.reason(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<38} {:<12} {:>8}  REASON", "TASK", "POOL", "BYTES");
                for d in &dead {
                    println!(
                        "{:<38} {:<12} {:>8}  {}",
                        d.id(),
                        d.pool(),
                        d.delivery.body.len(),
                        d.reason()
                    );
                }
                println!("{} dead-lettered task(s) in {}", dead.len(), broker.names().dead());
            }
            ExitCode::SUCCESS
        }
        DeadCommand::Requeue { id, all } => {
            let publisher = broker.publisher(256).await?;
            let exchange = broker.names().tasks_exchange();
            let mut requeued = 0;
            for d in dead.iter().filter(|d| all || id.as_deref() == Some(d.id())) {
                if d.is_result() {
                    if !all {
                        bail!("\"{}\" is a refused result, not a task: it cannot be requeued", d.id());
                    }
                    continue;
                }
                let mut kept: Vec<(&'static str, Header)> = Vec::new();
                for name in [headers::ATTEMPT, headers::SNAPSHOT_HASH, headers::SIGNATURE] {
                    if let Some(v) = d.delivery.headers.get(name) {
                        kept.push((name, v.clone()));
                    }
                }
                publisher
                    .publish(Outgoing {
                        exchange: &exchange,
                        routing_key: d.pool(),
                        body: &d.delivery.body,
                        message_id: d.id(),
                        correlation_id: d.delivery.correlation_id.as_deref().unwrap_or_default(),
                        headers: kept,
                    })
                    .await
                    .with_context(|| format!("requeueing {}", d.id()))?;
                d.delivery.ack().await?;
                requeued += 1;
            }
            if requeued == 0 && !all {
                bail!("no dead-lettered task with id \"{}\"", id.unwrap_or_default());
            }
            println!("requeued {requeued} task(s)");
            ExitCode::SUCCESS
        }
    };
    // Whatever was not acknowledged goes back to the dead queue.
    let _ = consumer.close().await;
    let _ = broker.close().await;
    Ok(code)
}
