//! `courier status`: this deployment's queues (from RabbitMQ's management
//! API) and its recent runs (from the scheduler's API), on one screen.

use std::process::ExitCode;

use crate::client;
use crate::settings::Settings;

/// This namespace's queues, from the management API.
async fn queues(settings: &Settings) -> anyhow::Result<Vec<courier_scheduler::ops::QueueStatus>> {
    courier_scheduler::ops::queues(&settings.management_url, &settings.amqp_url, &settings.namespace)
        .await
        .map_err(anyhow::Error::msg)
}

/// Print queues and the latest `limit` runs. Exits non-zero when either
/// source could not be read (what could be read is still shown).
pub async fn run(settings: &Settings, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let query = [("limit", limit.to_string())];
    let api = client::Api::new(settings)?;
    let (queues, runs) = tokio::join!(queues(settings), client::list_runs(&api, &query));
    if json {
        let value = serde_json::json!({
            "queues": queues.as_ref().ok(),
            "queues_error": queues.as_ref().err().map(|e| format!("{e:#}")),
            "runs": runs.as_ref().ok(),
            "runs_error": runs.as_ref().err().map(|e| format!("{e:#}")),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match &queues {
            Ok(queues) => {
                crate::term::out!(
                    "{:<44} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8}",
                    "QUEUE",
                    "READY",
                    "UNACKED",
                    "CONSUMERS",
                    "IN/s",
                    "OUT/s",
                    "ACK/s"
                );
                for q in queues {
                    crate::term::out!(
                        "{:<44} {:>8} {:>8} {:>9} {:>8.1} {:>8.1} {:>8.1}",
                        q.name,
                        q.ready,
                        q.unacked,
                        q.consumers,
                        q.publish_rate,
                        q.deliver_rate,
                        q.ack_rate
                    );
                }
                if queues.is_empty() {
                    crate::term::out!("(no queues named {}.*: has the scheduler started?)", settings.namespace);
                }
            }
            Err(e) => crate::term::out!("queues: {e:#}"),
        }
        println!();
        match &runs {
            Ok(runs) => client::print_runs(runs)?,
            Err(e) => crate::term::out!("runs: {e:#}"),
        }
    }
    Ok(if queues.is_ok() && runs.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
