//! Notifications reach the webhook: once, with the right body and
//! `Idempotency-Key`, after retries of transient failures, without duplicates,
//! and without one partition's trouble holding up another.

use std::time::Duration;

use crate::helpers::{Behaviour, WAIT, metric, order_id, webhook_setup};

#[tokio::test]
async fn a_valid_record_is_notified_once_with_its_json_and_idempotency_key() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let event = publisher.order(None).await;
    let id = order_id(&event);
    let got = receiver.wait_delivered(&id, WAIT).await;

    let order = event.order.as_ref().unwrap();
    assert_eq!(got.idempotency_key.as_deref(), Some(event.event_id.as_str()));
    assert!(
        got.content_type
            .as_deref()
            .unwrap_or_default()
            .starts_with("application/json")
    );
    let body = &got.body;
    assert_eq!(body["event_id"], event.event_id.as_str());
    assert_eq!(body["order_id"], id.as_str());
    assert_eq!(body["user_id"], "user-42");
    assert_eq!(body["currency"], "EUR");
    assert_eq!(body["total_minor"], 4498);
    assert_eq!(
        body["items"],
        serde_json::json!([
            {"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1999},
            {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 500},
        ])
    );
    let occurred_at = time::OffsetDateTime::parse(
        body["occurred_at"].as_str().expect("occurred_at is a string"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("occurred_at is RFC 3339");
    assert_eq!(
        orders_contract::timestamp(occurred_at),
        event.occurred_at.unwrap(),
        "occurred_at is the event's, to the nanosecond"
    );
    assert_eq!(order.items.len(), 2);

    // Exactly once: a later record is delivered, and the first was not resent.
    let next = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&next), WAIT).await;
    assert_eq!(receiver.attempts(&id).len(), 1, "one request for the order");
    app.wait_metric("notifications_sent_total", 2.0).await;
    app.wait_metric("notifications_failed_total", 0.0).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_then_delivered() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let event = crate::helpers::order_created();
    let id = order_id(&event);
    receiver.set(&id, Behaviour::FailFirst(1, 503));
    let throttled = crate::helpers::order_created();
    receiver.set(&order_id(&throttled), Behaviour::FailFirst(1, 429));
    publisher.event(None, &event, &[]).await;
    publisher.event(None, &throttled, &[]).await;

    let delivered = receiver.wait_delivered(&id, WAIT).await;
    receiver.wait_delivered(&order_id(&throttled), WAIT).await;
    let attempts = receiver.attempts(&id);
    assert_eq!(attempts.len(), 2, "one failed attempt, one retry");
    assert_eq!(attempts[0].status, 503);
    assert_eq!(
        attempts[0].idempotency_key, delivered.idempotency_key,
        "the retry carries the same Idempotency-Key"
    );
    app.wait_metric("notifications_failed_total", 2.0).await;
    app.wait_metric("notifications_sent_total", 2.0).await;
    let text = app.metrics().await;
    assert_eq!(
        crate::helpers::series(&text, "events_dead_lettered_total").len(),
        0,
        "nothing dead-lettered: {text}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_event_id_is_suppressed() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let event = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&event), WAIT).await;
    // The same event again (a producer retry, or a replay).
    publisher.event(None, &event, &[]).await;
    let marker = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&marker), WAIT).await;

    assert_eq!(
        receiver.attempts(&order_id(&event)).len(),
        1,
        "the duplicate is not sent"
    );
    app.wait_metric("events_duplicate_total", 1.0).await;
    app.wait_metric("events_consumed_total", 3.0).await;
    app.wait_metric("notifications_sent_total", 2.0).await;
    app.shutdown().await;
}

#[tokio::test]
async fn one_partitions_retries_do_not_stall_another_partition() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(2, |config| {
        config.retry_max_attempts = 10;
        // The backlog behind the stuck record fits in partition 0's buffer, so the
        // fetch loop keeps serving partition 1 while partition 0 retries.
        config.partition_buffer = 16;
    })
    .await;

    // Partition 0: a record whose webhook is slow and fails twice (>= 6 s),
    // then a backlog behind it.
    let stuck = crate::helpers::order_created();
    receiver.set(
        &order_id(&stuck),
        Behaviour::SlowFailFirst(Duration::from_secs(2), 2, 503),
    );
    publisher.event(Some(0), &stuck, &[]).await;
    let mut behind = Vec::new();
    for _ in 0..8 {
        behind.push(publisher.order(Some(0)).await);
    }
    receiver.wait_attempts(&order_id(&stuck), 1, WAIT).await;

    // Partition 1 flows meanwhile.
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(publisher.order(Some(1)).await);
    }
    for other in &others {
        receiver.wait_delivered(&order_id(other), WAIT).await;
    }
    assert!(
        receiver.delivered(&order_id(&stuck)).is_empty(),
        "partition 1 was notified while partition 0 was still retrying"
    );

    // Order within partition 0 is kept, and its backlog follows.
    let mut previous = receiver.wait_delivered(&order_id(&stuck), WAIT).await;
    for e in &behind {
        let done = receiver.wait_delivered(&order_id(e), WAIT).await;
        assert!(done.at >= previous.at, "partition order is kept");
        assert_eq!(receiver.attempts(&order_id(e)).len(), 1);
        previous = done;
    }
    assert_eq!(receiver.attempts(&order_id(&stuck)).len(), 3);
    let text = app.metrics().await;
    assert_eq!(metric(&text, "notifications_failed_total"), Some(2.0), "{text}");
    app.shutdown().await;
}

#[tokio::test]
async fn notifications_reuse_one_connection() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let mut events = Vec::new();
    for _ in 0..5 {
        events.push(publisher.order(None).await);
    }
    for e in &events {
        receiver.wait_delivered(&order_id(e), WAIT).await;
    }
    let peers: std::collections::HashSet<_> = receiver.requests().iter().map(|r| r.peer).collect();
    assert_eq!(peers.len(), 1, "all requests on one connection: {peers:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_stream_through_small_buffers_arrives_complete_once_and_in_partition_order() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(2, |config| {
        // The fetch loop waits on full buffers many times over.
        config.partition_buffer = 3;
    })
    .await;

    let mut published: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for i in 0..200 {
        let event = crate::helpers::order_created();
        let id = order_id(&event);
        if i % 7 == 3 {
            receiver.set(&id, Behaviour::FailFirst(1, 503));
        } else if i % 11 == 5 {
            receiver.set(&id, Behaviour::Slow(Duration::from_millis(30)));
        }
        let partition = (i % 2) as i32;
        publisher.event(Some(partition), &event, &[]).await;
        published[i % 2].push(id);
    }
    for id in published.iter().flatten() {
        receiver.wait_delivered(id, WAIT).await;
    }
    let delivered: Vec<String> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .map(|r| r.order_id().to_owned())
        .collect();
    assert_eq!(delivered.len(), 200, "each order delivered exactly once");
    for ids in &published {
        let seen: Vec<&String> = delivered.iter().filter(|d| ids.contains(d)).collect();
        assert_eq!(seen, ids.iter().collect::<Vec<_>>(), "partition order is kept");
    }
    app.wait_metric("notifications_sent_total", 200.0).await;
    app.shutdown().await;
}
