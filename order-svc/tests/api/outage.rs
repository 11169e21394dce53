//! The broker goes away and comes back: CreateOrder keeps answering OK (the
//! orders and their events are in the store), health and readiness follow the
//! store and stay SERVING, the outbox metrics show the waiting events, and the
//! events reach the topic in order when the broker returns, without a restart;
//! events a stopped process could not publish go out from the next one, and
//! a process started while the broker is down serves all the same.

use std::time::{Duration, Instant};

use orders_contract::v1::OrderCreated;
use prost::Message as _;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::helpers::{metric, spawn_app_alone_with, spawn_app_on, valid_request};

/// The order ids of `records`, in partition order per partition.
fn by_partition(records: &[rdkafka::message::OwnedMessage]) -> std::collections::HashMap<i32, Vec<String>> {
    let mut out: std::collections::HashMap<i32, Vec<String>> = std::collections::HashMap::new();
    for r in records {
        let event = OrderCreated::decode(rdkafka::Message::payload(r).unwrap()).unwrap();
        out.entry(rdkafka::Message::partition(r))
            .or_default()
            .push(event.order.unwrap().order_id);
    }
    out
}

#[tokio::test]
async fn orders_are_accepted_while_the_broker_is_down_and_flow_in_order_when_it_returns() {
    let mut app = spawn_app_alone_with(|c| c.publish_timeout = Duration::from_secs(2)).await;
    let mut client = app.client().await;
    let before = client
        .create_order(valid_request("user-1"))
        .await
        .expect("works while the broker is up")
        .into_inner()
        .order
        .unwrap();

    app.broker.stop();
    let mut during = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        let order = client
            .create_order(valid_request(&format!("user-{}", i % 3)))
            .await
            .expect("the store takes orders without the broker")
            .into_inner()
            .order
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered in {:?}: a call does not wait for the broker",
            started.elapsed()
        );
        during.push(order.order_id);
    }
    let text = testkit::eventually(
        Duration::from_secs(10),
        "outbox_pending shows the waiting events",
        || {
            let app = &app;
            async move {
                let text = app.metrics().await;
                (metric(&text, "outbox_pending").unwrap_or(0.0) >= 30.0).then_some(text)
            }
        },
    )
    .await;
    assert!(
        metric(&text, "outbox_oldest_age_seconds").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    // Health follows the store, which is fine.
    let mut health = HealthClient::new(app.channel().await);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);
    assert_eq!(app.get("/readyz").await.0, 200);

    app.broker.restart().await.expect("broker restarts");
    let recovered = Instant::now();
    testkit::eventually(Duration::from_secs(60), "outbox_pending back to 0", || {
        let app = &app;
        async move { (metric(&app.metrics().await, "outbox_pending") == Some(0.0)).then_some(()) }
    })
    .await;
    eprintln!(
        "the outbox drained {:?} after the broker restarted",
        recovered.elapsed()
    );
    // Everything is acknowledged: read it all (resends included).
    let records = app
        .broker
        .read_all(&app.topic, 1000, Duration::from_secs(5))
        .await
        .unwrap();
    let partitions = by_partition(&records);
    let mut seen: Vec<String> = partitions.values().flatten().cloned().collect();
    seen.sort();
    seen.dedup();
    let mut want: Vec<String> = during.iter().cloned().chain([before.order_id.clone()]).collect();
    want.sort();
    assert_eq!(seen, want, "every accepted order's event is on the topic");
    // Within a partition the events are in commit order (the first sight of
    // each; a resend after a timed-out attempt may repeat one later).
    for ids in partitions.values() {
        let mut first_seen = Vec::new();
        for id in ids {
            if !first_seen.contains(id) {
                first_seen.push(id.clone());
            }
        }
        let expected: Vec<String> = during.iter().filter(|id| first_seen.contains(id)).cloned().collect();
        let got: Vec<String> = first_seen.iter().filter(|id| during.contains(id)).cloned().collect();
        assert_eq!(got, expected, "per-partition order");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn events_a_stopped_process_could_not_publish_go_out_from_the_next_one() {
    let mut app = spawn_app_alone_with(|c| c.publish_timeout = Duration::from_secs(1)).await;
    let mut client = app.client().await;
    app.broker.stop();
    let mut ids = Vec::new();
    for i in 0..5 {
        let order = client
            .create_order(valid_request(&format!("user-{i}")))
            .await
            .expect("accepted without the broker")
            .into_inner()
            .order
            .unwrap();
        ids.push(order.order_id);
    }
    app.stop().await.expect("stops even though the events are not out");
    let (mut broker, topic, database_url) = (app.broker.clone(), app.topic.clone(), app.database_url.clone());
    broker.restart().await.expect("broker restarts");
    assert!(
        broker
            .read_all(&topic, 1, Duration::from_secs(3))
            .await
            .unwrap()
            .is_empty(),
        "nothing was published before the next process"
    );
    let next = spawn_app_on(broker, topic, |c| c.database_url = database_url)
        .await
        .expect("the next process starts on the same store");
    testkit::eventually(Duration::from_secs(30), "the next process drains the outbox", || {
        let next = &next;
        async move { (metric(&next.metrics().await, "outbox_pending") == Some(0.0)).then_some(()) }
    })
    .await;
    let records = next
        .broker
        .read_all(&next.topic, 100, Duration::from_secs(5))
        .await
        .unwrap();
    let mut seen: Vec<String> = by_partition(&records).into_values().flatten().collect();
    seen.sort();
    seen.dedup();
    ids.sort();
    assert_eq!(seen, ids, "the next process published every stored event");
}

#[tokio::test]
async fn starts_while_the_broker_is_down_and_publishes_in_order_when_it_returns() {
    let mut broker = testkit::Broker::start().await.expect("broker starts");
    let topic = testkit::unique("orders");
    broker.create_topic(&topic, 3).await.expect("topic created");
    broker.stop();
    let started = Instant::now();
    let app = spawn_app_on(broker, topic, |c| {
        c.kafka.startup_timeout = Duration::from_secs(2);
        c.publish_timeout = Duration::from_secs(2);
    })
    .await
    .expect("an unreachable broker does not stop the start");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the start waits KAFKA_STARTUP_TIMEOUT, not longer: {:?}",
        started.elapsed()
    );
    let mut health = HealthClient::new(app.channel().await);
    let status = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), ServingStatus::Serving, "health follows the store");
    assert_eq!(app.get("/readyz").await.0, 200);

    let mut client = app.client().await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let order = client
            .create_order(valid_request(&format!("user-{}", i % 2)))
            .await
            .expect("the store takes orders although the broker never answered")
            .into_inner()
            .order
            .unwrap();
        ids.push(order.order_id);
    }
    testkit::eventually(Duration::from_secs(10), "outbox_pending shows the 12 events", || {
        let app = &app;
        async move { (metric(&app.metrics().await, "outbox_pending").unwrap_or(0.0) >= 12.0).then_some(()) }
    })
    .await;

    let mut broker = app.broker.clone();
    broker.restart().await.expect("broker starts again");
    testkit::eventually(Duration::from_secs(60), "outbox_pending back to 0", || {
        let app = &app;
        async move { (metric(&app.metrics().await, "outbox_pending") == Some(0.0)).then_some(()) }
    })
    .await;
    let records = broker
        .read_all(&app.topic, ids.len(), Duration::from_secs(10))
        .await
        .unwrap();
    let partitions = by_partition(&records);
    let mut seen: Vec<String> = partitions.values().flatten().cloned().collect();
    seen.sort();
    seen.dedup();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "every accepted order's event is on the topic");
    // Within a partition the events are in the order the orders were
    // accepted (the first sight of each; a resend may repeat one later).
    for events in partitions.values() {
        let mut first_seen: Vec<String> = Vec::new();
        for id in events {
            if !first_seen.contains(id) {
                first_seen.push(id.clone());
            }
        }
        let expected: Vec<String> = ids.iter().filter(|id| first_seen.contains(id)).cloned().collect();
        assert_eq!(first_seen, expected, "per-partition order");
    }
}
