//! What an operator sees: /metrics after traffic, /readyz following the
//! broker, lag gauges following the assignment, and one trace from the
//! producer's `traceparent` to the notification.

use std::time::Duration;

use crate::helpers::{
    Behaviour, Publisher, Receiver, TestApp, WAIT, broker_with_topic, config, metric, order_created, order_id,
    own_broker_with_topic, series, webhook_setup,
};

#[tokio::test]
async fn metrics_after_traffic_show_the_right_counts() {
    let (_broker, topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let ok = publisher.order(None).await;
    let flaky = order_created();
    receiver.set(&order_id(&flaky), Behaviour::FailFirst(1, 503));
    publisher.event(None, &flaky, &[]).await;
    publisher.raw(None, b"k", b"\xff\xff\xff", &[]).await;
    let last = publisher.order(None).await;
    for e in [&ok, &flaky, &last] {
        receiver.wait_delivered(&order_id(e), WAIT).await;
    }

    app.wait_metric("events_consumed_total", 4.0).await;
    // The lag gauge comes from librdkafka's statistics (every 2 s).
    app.wait_metric(&format!("kafka_consumer_lag{{topic=\"{topic}\",partition=\"0\"}}"), 0.0)
        .await;
    let text = app.metrics().await;
    let value = |series: &str| metric(&text, series);
    assert_eq!(value("notifications_sent_total"), Some(3.0), "{text}");
    assert_eq!(value("notifications_failed_total"), Some(1.0), "{text}");
    assert_eq!(
        value("events_dead_lettered_total{reason=\"malformed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value("events_duplicate_total"), Some(0.0), "{text}");
    assert_eq!(value("event_handling_seconds_count"), Some(4.0), "{text}");
    assert_eq!(value("event_end_to_end_seconds_count"), Some(3.0), "{text}");
    let e2e_sum = value("event_end_to_end_seconds_sum").unwrap();
    assert!(
        e2e_sum > 0.0 && e2e_sum < 60.0,
        "end-to-end seconds are plausible: {e2e_sum}"
    );
    assert_eq!(series(&text, "kafka_consumer_lag").len(), 1, "{text}");

    let (status, body) = app.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    app.shutdown().await;
}

#[tokio::test]
async fn lag_gauges_follow_the_assignment() {
    let (broker, topic, group) = broker_with_topic(2).await;
    let receiver = Receiver::start().await;
    let publisher = Publisher::new(&broker, &topic);
    let lag = |p: i32| format!("kafka_consumer_lag{{topic=\"{topic}\",partition=\"{p}\"}}");

    let first = TestApp::spawn_ready(config(&broker, &topic, &group, Some(&receiver))).await;
    for p in [0, 1] {
        let e = publisher.order(Some(p)).await;
        receiver.wait_delivered(&order_id(&e), WAIT).await;
    }
    first.wait_metric(&lag(0), 0.0).await;
    first.wait_metric(&lag(1), 0.0).await;

    // A second member takes one partition: the first must stop reporting it.
    let second = TestApp::spawn_ready(config(&broker, &topic, &group, Some(&receiver))).await;
    let deadline = std::time::Instant::now() + WAIT;
    let (a, b) = loop {
        let (a, b) = (first.metrics().await, second.metrics().await);
        let (a, b) = (
            series(&a, "kafka_consumer_lag").join("\n"),
            series(&b, "kafka_consumer_lag").join("\n"),
        );
        if (a.lines().count() == 1 && b.lines().count() == 1) || std::time::Instant::now() > deadline {
            break (a, b);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        a.lines().count() == 1 && b.lines().count() == 1 && a.lines().next() != b.lines().next(),
        "each member reports the lag of its own partition only:\nfirst:\n{a}\nsecond:\n{b}"
    );
    second.shutdown().await;
    first.shutdown().await;
}

#[tokio::test]
async fn readiness_follows_the_broker_and_consumption_resumes_after_it_returns() {
    let (mut broker, topic, group) = own_broker_with_topic(1).await;
    let receiver = Receiver::start().await;
    let app = TestApp::spawn(config(&broker, &topic, &group, Some(&receiver))).await;
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200, "alive from the start");
    app.wait_ready(true, WAIT).await;
    let publisher = Publisher::new(&broker, &topic);
    let before = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&before), WAIT).await;

    broker.stop();
    app.wait_ready(false, Duration::from_secs(10)).await;
    assert_eq!(app.get("/healthz").await.0, 200, "alive while the broker is away");

    broker.restart().await.expect("the broker restarts");
    app.wait_ready(true, Duration::from_secs(30)).await;
    let publisher = Publisher::new(&broker, &topic);
    let after = publisher.order(None).await;
    receiver
        .wait_delivered(&order_id(&after), Duration::from_secs(30))
        .await;
    assert_eq!(receiver.attempts(&order_id(&before)).len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_traceparent_on_the_record_carries_into_the_notification() {
    let (_broker, _topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced = order_created();
    publisher
        .event(
            None,
            &traced,
            &[("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))],
        )
        .await;
    let untraced = publisher.order(None).await;

    let got = receiver.wait_delivered(&order_id(&traced), WAIT).await;
    assert_eq!(got.body["trace_id"], trace_id);
    let traceparent = got.traceparent.expect("the webhook request carries a traceparent");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "the receiver can continue the trace: {traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the parent is notify-svc's span, not the producer's: {traceparent}"
    );
    let other = receiver.wait_delivered(&order_id(&untraced), WAIT).await;
    let other = other.body["trace_id"]
        .as_str()
        .expect("a record without traceparent starts a trace");
    assert_eq!(other.len(), 32);
    assert_ne!(other, trace_id);
    app.shutdown().await;
}
