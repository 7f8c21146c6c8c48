//! `courier status`: this deployment's queues (from RabbitMQ's management
//! API) and its recent runs (from the scheduler's API), on one screen.

use std::process::ExitCode;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::client;
use crate::settings::Settings;

/// One queue of this namespace, as the management API reports it.
#[derive(Debug, Serialize)]
struct QueueStatus {
    name: String,
    ready: u64,
    unacked: u64,
    consumers: u64,
    /// Messages per second in (published), out (delivered) and acknowledged,
    /// averaged by the broker over its last sample interval.
    publish_rate: f64,
    deliver_rate: f64,
    ack_rate: f64,
}

#[derive(Debug, Deserialize)]
struct ApiQueue {
    name: String,
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    consumers: u64,
    #[serde(default)]
    message_stats: Option<serde_json::Value>,
}

impl From<ApiQueue> for QueueStatus {
    fn from(q: ApiQueue) -> Self {
        let rate = |key: &str| {
            q.message_stats
                .as_ref()
                .and_then(|s| s[key]["rate"].as_f64())
                .unwrap_or(0.0)
        };
        Self {
            publish_rate: rate("publish_details"),
            deliver_rate: rate("deliver_get_details"),
            ack_rate: rate("ack_details"),
            name: q.name,
            ready: q.messages_ready,
            unacked: q.messages_unacknowledged,
            consumers: q.consumers,
        }
    }
}

/// The vhost of an AMQP URL (the first of a list), percent-encoded as the
/// management API wants it.
fn vhost(amqp_url: &str) -> anyhow::Result<String> {
    let first = courier_amqp::broker_urls(amqp_url).first().copied().unwrap_or(amqp_url);
    let url = reqwest::Url::parse(first).with_context(|| "amqp_url is not a URL")?;
    let path = url.path().trim_start_matches('/');
    Ok(if path.is_empty() { "%2F".into() } else { path.into() })
}

/// Queues whose names start with `<namespace>.`, sorted by name.
async fn queues(settings: &Settings) -> anyhow::Result<Vec<QueueStatus>> {
    let base = settings.management_url.trim_end_matches('/');
    let url = format!(
        "{base}/api/queues/{}?columns=name,messages_ready,messages_unacknowledged,consumers,message_stats",
        vhost(&settings.amqp_url)?
    );
    let shown = reqwest::Url::parse(base).map_or_else(
        |_| base.to_string(),
        |mut u| {
            let _ = u.set_password(None);
            u.to_string()
        },
    );
    let response = client::client()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach RabbitMQ's management API at {shown} (management_url)"))?;
    let status = response.status();
    if !status.is_success() {
        anyhow::bail!("RabbitMQ's management API at {shown} answered {status}");
    }
    let all: Vec<ApiQueue> = response
        .json()
        .await
        .with_context(|| format!("unexpected answer from {shown}"))?;
    let prefix = format!("{}.", settings.namespace);
    let mut mine: Vec<QueueStatus> = all
        .into_iter()
        .filter(|q| q.name.starts_with(&prefix))
        .map(QueueStatus::from)
        .collect();
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(mine)
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
                println!(
                    "{:<44} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8}",
                    "QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/s", "OUT/s", "ACK/s"
                );
                for q in queues {
                    println!(
                        "{:<44} {:>8} {:>8} {:>9} {:>8.1} {:>8.1} {:>8.1}",
                        q.name, q.ready, q.unacked, q.consumers, q.publish_rate, q.deliver_rate, q.ack_rate
                    );
                }
                if queues.is_empty() {
                    println!("(no queues named {}.*: has the scheduler started?)", settings.namespace);
                }
            }
            Err(e) => println!("queues: {e:#}"),
        }
        println!();
        match &runs {
            Ok(runs) => client::print_runs(runs)?,
            Err(e) => println!("runs: {e:#}"),
        }
    }
    Ok(if queues.is_ok() && runs.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_comes_from_the_amqp_url() {
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(), "%2f");
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672").unwrap(), "%2F");
        assert_eq!(vhost("amqp://u:p@a:5672/prod,amqp://u:p@b:5672/prod").unwrap(), "prod");
        assert_eq!(vhost("amqp://h/prod").unwrap(), "prod");
    }
}
