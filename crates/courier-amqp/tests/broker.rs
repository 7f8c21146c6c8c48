//! Against the real RabbitMQ at `COURIER_AMQP_URL` (default 127.0.0.1:5672).
//! Each test uses its own namespace, so tests run in parallel.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use courier_amqp::{AmqpError, Broker, Header, Names, Outgoing};

fn url() -> String {
    std::env::var("COURIER_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn broker() -> Broker {
    let names = Names::new(format!("t-{}", uuid::Uuid::now_v7()));
    Broker::connect(&url(), names, "courier-amqp-test")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ is not reachable at {} ({e}); start it with `rabbitmq-server -detached`",
                url()
            )
        })
}

#[tokio::test]
async fn publish_confirmed_then_consume_with_headers_and_ack() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    // Declaring twice is harmless.
    broker.declare_topology(&pools, 5).await.unwrap();
    let names = broker.names().clone();
    let publisher = broker.publisher(16).await.unwrap();
    publisher
        .publish(Outgoing {
            exchange: &names.tasks_exchange(),
            routing_key: "default",
            body: b"frame-bytes",
            message_id: "m-1",
            correlation_id: "run-1",
            headers: vec![("x-attempt", Header::Int(2)), ("x-hash", Header::Str("abc".into()))],
        })
        .await
        .unwrap();
    let mut consumer = broker.consumer(&names.task_queue("default"), 4, "t").await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.body, b"frame-bytes");
    assert_eq!(delivery.message_id.as_deref(), Some("m-1"));
    assert_eq!(delivery.correlation_id.as_deref(), Some("run-1"));
    assert_eq!(delivery.header_int("x-attempt"), Some(2));
    assert_eq!(delivery.header_str("x-hash"), Some("abc"));
    assert!(!delivery.redelivered);
    delivery.ack().await.unwrap();
    consumer.close().await.unwrap();
    broker.delete_topology(&pools).await.unwrap();
}

#[tokio::test]
async fn a_message_larger_than_a_frame_travels_whole_in_several() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    let names = broker.names().clone();
    let publisher = broker.publisher(16).await.unwrap();
    // Ten frames and a bit, of bytes that differ from frame to frame.
    let body: Vec<u8> = (0..10 * courier_amqp::FRAME_MAX as usize + 123)
        .map(|i| (i % 251) as u8)
        .collect();
    publisher
        .publish(Outgoing {
            exchange: &names.tasks_exchange(),
            routing_key: "default",
            body: &body,
            message_id: "big",
            correlation_id: "run",
            headers: vec![],
        })
        .await
        .unwrap();
    let mut consumer = broker.consumer(&names.task_queue("default"), 4, "t").await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.body, body);
    delivery.ack().await.unwrap();
    consumer.close().await.unwrap();
    broker.delete_topology(&pools).await.unwrap();
}

#[tokio::test]
async fn a_url_that_does_not_parse_is_refused_at_once_without_echoing_it() {
    let started = std::time::Instant::now();
    let err = Broker::connect_with_retry(
        "amqp://user:s3cret@host:notaport/%2f",
        Names::new("t-bad-url"),
        "courier-amqp-test",
        Duration::from_secs(30),
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, AmqpError::BadUrl(_)), "{err}");
    assert!(err.to_string().starts_with("invalid broker URL: "), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn publishing_to_a_pool_without_a_queue_is_unroutable() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    let names = broker.names().clone();
    let publisher = broker.publisher(16).await.unwrap();
    let err = publisher
        .publish(Outgoing {
            exchange: &names.tasks_exchange(),
            routing_key: "gpu",
            body: b"x",
            message_id: "m",
            correlation_id: "r",
            headers: vec![],
        })
        .await
        .unwrap_err();
    assert!(matches!(err, AmqpError::Unroutable { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "no queue is bound to {} with routing key \"gpu\"",
            names.tasks_exchange()
        )
    );
    broker.delete_topology(&pools).await.unwrap();
}

/// Publish a task `poison` (message id `p-1`) to the pool `default` and
/// reject it, as a worker refuses junk: the broker dead-letters it.
async fn reject_a_poison_task(broker: &Broker) {
    let names = broker.names();
    let publisher = broker.publisher(16).await.unwrap();
    publisher
        .publish(Outgoing {
            exchange: &names.tasks_exchange(),
            routing_key: "default",
            body: b"poison",
            message_id: "p-1",
            correlation_id: "r",
            headers: vec![],
        })
        .await
        .unwrap();
    let mut tasks = broker.consumer(&names.task_queue("default"), 1, "t").await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), tasks.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    delivery.reject().await.unwrap();
}

#[tokio::test]
async fn rejected_messages_are_dead_lettered() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    let names = broker.names().clone();
    reject_a_poison_task(&broker).await;
    let mut dead = broker.consumer(&names.dead(), 1, "d").await.unwrap();
    let dead_letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(dead_letter.body, b"poison");
    assert_eq!(dead_letter.message_id.as_deref(), Some("p-1"));
    dead_letter.ack().await.unwrap();
    broker.delete_topology(&pools).await.unwrap();
}

#[tokio::test]
async fn a_list_of_broker_urls_fails_over_to_a_node_that_answers() {
    assert_eq!(
        courier_amqp::broker_urls(" amqp://a:5672/%2f , amqp://b:5672/%2f,"),
        ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]
    );
    // A node that refuses, then one cut off (a non-routable address), then the real one.
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:1/%2f,amqp://guest:guest@10.255.255.1:5672/%2f,{}",
        url()
    );
    let names = Names::new(format!("t-{}", uuid::Uuid::now_v7()));
    let started = std::time::Instant::now();
    let broker = Broker::connect(&urls, names.clone(), "courier-amqp-failover")
        .await
        .unwrap();
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    broker.delete_topology(&pools).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(12), "{:?}", started.elapsed());
    // The next connection starts at the node that answered.
    let started = std::time::Instant::now();
    Broker::connect(&urls, names, "courier-amqp-failover-2").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // None answers: the last error.
    let dead = "amqp://guest:guest@127.0.0.1:1/%2f,amqp://guest:guest@127.0.0.1:2/%2f";
    assert!(Broker::connect(dead, Names::new("t-dead"), "x").await.is_err());
}

#[tokio::test]
async fn a_pools_lane_is_a_queue_of_its_own_routed_by_the_lane_key_and_deleted_with_the_pool() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    let names = broker.names().clone();
    let [own, lane] = names.pool_queues("default");
    assert_eq!(lane, names.task_queue(&courier_amqp::lane_key("default")));
    let publisher = broker.publisher(16).await.unwrap();
    for (key, id) in [
        (courier_amqp::lane_key("default"), "small"),
        ("default".to_string(), "wide"),
    ] {
        publisher
            .publish(Outgoing {
                exchange: &names.tasks_exchange(),
                routing_key: &key,
                body: id.as_bytes(),
                message_id: id,
                correlation_id: "run-1",
                headers: vec![],
            })
            .await
            .unwrap();
    }
    // Each queue holds its own: the lane's task is not behind the pool's.
    assert_eq!(broker.queue_depth(&own).await.unwrap().0, 1);
    assert_eq!(broker.queue_depth(&lane).await.unwrap().0, 1);
    let mut consumer = broker.consumer(&lane, 4, "t").await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message_id.as_deref(), Some("small"));
    delivery.ack().await.unwrap();
    consumer.close().await.unwrap();
    broker.delete_topology(&pools).await.unwrap();
    // Gone with the pool's topology.
    assert!(broker.queue_depth(&lane).await.is_err());
}

/// A raw channel, to declare queues the way another client (or an earlier
/// Courier) would.
async fn raw_channel() -> lapin::Channel {
    let connection = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    connection.create_channel().await.unwrap()
}

fn quorum(bounds: Option<(i64, i64)>) -> lapin::types::FieldTable {
    use lapin::types::AMQPValue;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    if let Some((count, bytes)) = bounds {
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(count));
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(bytes));
    }
    args
}

fn durable() -> lapin::options::QueueDeclareOptions {
    lapin::options::QueueDeclareOptions {
        durable: true,
        ..lapin::options::QueueDeclareOptions::default()
    }
}

#[tokio::test]
async fn the_dead_letter_queue_is_bounded_in_count_and_bytes() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    broker.declare_topology(&pools, 5).await.unwrap();
    let dead = broker.names().dead();
    // The broker compares arguments on each declaration: the queue's are
    // exactly these bounds (without them, or with others, it refuses).
    let channel = raw_channel().await;
    let bounds = (courier_amqp::DEAD_MAX, courier_amqp::DEAD_MAX_BYTES);
    channel
        .queue_declare(dead.as_str().into(), durable(), quorum(Some(bounds)))
        .await
        .unwrap();
    for other in [None, Some((bounds.0 + 1, bounds.1))] {
        let channel = raw_channel().await;
        let refused = channel
            .queue_declare(dead.as_str().into(), durable(), quorum(other))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("PRECONDITION_FAILED"), "{refused}");
    }
    broker.delete_topology(&pools).await.unwrap();
}

#[tokio::test]
async fn an_unbounded_dead_letter_queue_from_an_earlier_courier_is_kept_with_its_letters() {
    let broker = broker().await;
    let pools = vec!["default".to_string()];
    let names = broker.names().clone();
    // As Courier declared it before it was bounded, holding a dead letter.
    let channel = raw_channel().await;
    channel
        .queue_declare(names.dead().as_str().into(), durable(), quorum(None))
        .await
        .unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            names.dead().as_str().into(),
            Default::default(),
            b"an old dead letter",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Declared again (and again) around it: the rest of the topology too.
    broker.declare_topology(&pools, 5).await.unwrap();
    broker.declare_topology(&pools, 5).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while broker.queue_depth(&names.dead()).await.unwrap().0 != 1 {
        assert!(std::time::Instant::now() < deadline, "the old dead letter is gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Dead letters still reach it, and the pool's queues are there.
    reject_a_poison_task(&broker).await;
    while broker.queue_depth(&names.dead()).await.unwrap().0 != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new dead letter did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.delete_topology(&pools).await.unwrap();
}
