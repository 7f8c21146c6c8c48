//! What operators look at besides runs, for the CLI (`courier dead`,
//! `courier status`) and the web UI alike: dead letters, taken from their
//! queue one at a time and unacknowledged (closing puts them back) or
//! requeued to their pool, and this namespace's queues as RabbitMQ's management API
//! reports them.

use std::time::Duration;

use courier_amqp::{AmqpError, Broker, Delivery, Header, Outgoing, Publisher, Taker};
use courier_wire::headers;
use serde::{Deserialize, Serialize};

/// A message in the dead-letter queue: a task that could not run, or a
/// result the scheduler refused. Its body is kept only when asked for
/// (to requeue it); [`DeadLetter::bytes`] is its size either way.
#[derive(Debug)]
pub struct DeadLetter {
    /// The message, its body left out (see [`DeadLetter::body`]).
    pub delivery: Delivery,
    body: Option<Vec<u8>>,
    bytes: usize,
}

impl DeadLetter {
    /// The task (message) ID.
    pub fn id(&self) -> &str {
        self.delivery.message_id.as_deref().unwrap_or("-")
    }

    /// The run it belongs to.
    pub fn run_id(&self) -> &str {
        self.delivery.correlation_id.as_deref().unwrap_or_default()
    }

    /// The size of its body in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its body, when it was taken with it.
    pub fn body(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }

    /// The pool a task was for (`(result)` for a refused result).
    pub fn pool(&self) -> &str {
        if self.is_result() {
            return "(result)";
        }
        self.delivery
            .header_str(headers::POOL)
            .unwrap_or(&self.delivery.routing_key)
    }

    /// The attempt it was, if it says.
    pub fn attempt(&self) -> Option<i64> {
        self.delivery.header_int(headers::ATTEMPT)
    }

    /// A result the scheduler refused: kept to be read, never requeued.
    pub fn is_result(&self) -> bool {
        self.delivery.header_str(headers::KIND) == Some("result")
    }

    /// Why it died: Courier's reason, else the broker's latest (a retry's
    /// task died of `expired` in its delay queue first).
    pub fn reason(&self) -> String {
        match (self.delivery.header_str(headers::DEAD_REASON), &self.delivery.death) {
            (Some(reason), _) => reason.to_string(),
            (None, Some(death)) => format!("dead-lettered by the broker: {}", death.reason),
            (None, None) => "unknown".into(),
        }
    }
}

/// Dead letters the CLI reads at once, at most.
pub const MAX_DEAD_LISTED: u32 = 10_000;

/// The messages in the dead-letter queue when it was opened (the oldest
/// `limit`), taken one at a time and left unacknowledged: closing it puts
/// back whatever was not acknowledged. One body at a time is held, however
/// many are taken, unless the caller keeps them.
#[derive(Debug)]
pub struct DeadLetters {
    taker: Taker,
    left: u32,
}

impl DeadLetters {
    /// Open the dead-letter queue of `broker`'s namespace.
    ///
    /// # Errors
    /// The broker's.
    pub async fn open(broker: &Broker, limit: u32) -> Result<Self, AmqpError> {
        let queue = broker.names().dead();
        let (ready, _) = broker.queue_depth(&queue).await?;
        Ok(Self {
            taker: broker.taker(&queue).await?,
            left: ready.min(limit),
        })
    }

    /// The next dead letter, with its body if `keep_body` says so.
    ///
    /// # Errors
    /// The broker's.
    pub async fn next(&mut self, keep_body: impl FnOnce(&DeadLetter) -> bool) -> Result<Option<DeadLetter>, AmqpError> {
        if self.left == 0 {
            return Ok(None);
        }
        let Some(mut delivery) = self.taker.take().await? else {
            self.left = 0;
            return Ok(None);
        };
        self.left -= 1;
        let body = std::mem::take(&mut delivery.body);
        let mut dead = DeadLetter {
            bytes: body.len(),
            delivery,
            body: None,
        };
        if keep_body(&dead) {
            dead.body = Some(body);
        }
        Ok(Some(dead))
    }

    /// Every dead letter left, without their bodies.
    ///
    /// # Errors
    /// The broker's.
    pub async fn all(&mut self) -> Result<Vec<DeadLetter>, AmqpError> {
        let mut all = Vec::new();
        while let Some(dead) = self.next(|_| false).await? {
            all.push(dead);
        }
        Ok(all)
    }

    /// Put back what was taken and not acknowledged.
    pub async fn close(self) {
        let _ = self.taker.close().await;
    }
}

/// Publish a dead-lettered task again to its pool (confirmed), with the
/// body it was taken with, then acknowledge the dead copy.
///
/// # Errors
/// The broker's.
pub async fn requeue(broker: &Broker, publisher: &Publisher, dead: &DeadLetter, body: &[u8]) -> Result<(), AmqpError> {
    let mut kept: Vec<(&'static str, Header)> = Vec::new();
    for name in [headers::ATTEMPT, headers::SNAPSHOT_HASH, headers::SIGNATURE] {
        if let Some(v) = dead.delivery.headers.get(name) {
            kept.push((name, v.clone()));
        }
    }
    publisher
        .publish(Outgoing {
            exchange: &broker.names().tasks_exchange(),
            routing_key: dead.pool(),
            body,
            message_id: dead.id(),
            correlation_id: dead.run_id(),
            headers: kept,
        })
        .await?;
    dead.delivery.ack().await
}

/// One queue of this namespace, as the management API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub name: String,
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
    /// Messages per second in (published), out (delivered) and acknowledged,
    /// averaged by the broker over its last sample interval.
    pub publish_rate: f64,
    pub deliver_rate: f64,
    pub ack_rate: f64,
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
fn vhost(amqp_url: &str) -> Result<String, String> {
    let first = courier_amqp::broker_urls(amqp_url).first().copied().unwrap_or(amqp_url);
    let url = reqwest::Url::parse(first).map_err(|_| "amqp_url is not a URL".to_string())?;
    let path = url.path().trim_start_matches('/');
    Ok(if path.is_empty() { "%2F".into() } else { path.into() })
}

/// Queues whose names start with `<namespace>.`, sorted by name, from the
/// management API at `management_url` (credentials in the URL, never in
/// messages).
///
/// # Errors
/// What went wrong, naming the API without its password.
pub async fn queues(management_url: &str, amqp_url: &str, namespace: &str) -> Result<Vec<QueueStatus>, String> {
    let base = management_url.trim_end_matches('/');
    let url = format!(
        "{base}/api/queues/{}?columns=name,messages_ready,messages_unacknowledged,consumers,message_stats",
        vhost(amqp_url)?
    );
    let shown = reqwest::Url::parse(base).map_or_else(
        |_| "(management_url is not a URL)".to_string(),
        |mut u| {
            let _ = u.set_password(None);
            u.to_string()
        },
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("cannot reach RabbitMQ's management API at {shown} (management_url): {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("RabbitMQ's management API at {shown} answered {status}"));
    }
    let all: Vec<ApiQueue> = response
        .json()
        .await
        .map_err(|e| format!("unexpected answer from {shown}: {e}"))?;
    let prefix = format!("{namespace}.");
    let mut mine: Vec<QueueStatus> = all
        .into_iter()
        .filter(|q| q.name.starts_with(&prefix))
        .map(QueueStatus::from)
        .collect();
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(mine)
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
