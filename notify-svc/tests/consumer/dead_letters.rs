//! What cannot be notified lands on the dead-letter topic with the original
//! key, value and headers and headers saying where it came from and why, and
//! the partition moves on.

use orders_contract::envelope;
use rdkafka::message::{Headers, Message, OwnedMessage};
use testkit::header;

use crate::helpers::{
    Behaviour, Publisher, Receiver, TestApp, WAIT, broker_with_topic, config, order_created, order_id, webhook_setup,
};

async fn dead_letters(broker: &testkit::Broker, topic: &str, want: usize) -> Vec<OwnedMessage> {
    let dlq = format!("{topic}.dlq");
    let got = broker.read_all(&dlq, want, WAIT).await.expect("read the DLQ");
    assert_eq!(got.len(), want, "{want} dead letters on {dlq}");
    got
}

fn headers_of(message: &OwnedMessage) -> Vec<(String, Vec<u8>)> {
    message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_dead_letter(message: &OwnedMessage, topic: &str, offset: i64, class: &str, attempts: u32) {
    assert_eq!(header(message, "dlq.original.topic").as_deref(), Some(topic));
    assert_eq!(header(message, "dlq.original.partition").as_deref(), Some("0"));
    assert_eq!(header(message, "dlq.original.offset"), Some(offset.to_string()));
    assert_eq!(header(message, "dlq.error.class").as_deref(), Some(class));
    assert!(
        !header(message, "dlq.error.message").unwrap_or_default().is_empty(),
        "an error message"
    );
    assert_eq!(header(message, "dlq.attempts"), Some(attempts.to_string()));
    let failed_at = header(message, "dlq.failed.at").expect("dlq.failed.at");
    let failed_at = time::OffsetDateTime::parse(&failed_at, &time::format_description::well_known::Rfc3339)
        .expect("dlq.failed.at is RFC 3339");
    let age = time::OffsetDateTime::now_utc() - failed_at;
    assert!(age.whole_seconds().abs() < 120, "dlq.failed.at is now-ish: {failed_at}");
}

#[tokio::test]
async fn garbage_and_unknown_types_are_dead_lettered_as_they_were_and_the_partition_moves_on() {
    let (broker, topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    // Offset 0: bytes that are not protobuf, with a header of their own.
    let garbage = b"\xff\xff\xffnot an event".to_vec();
    publisher
        .raw(None, b"garbage-key", &garbage, &[("x-custom", b"kept")])
        .await;
    // Offset 1: a valid encoding announced as a type this consumer does not know.
    let shipped = order_created();
    let record = envelope::encode_order_created(&shipped, "/order-svc");
    let mut unknown_headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .map(|(k, v)| {
            (
                *k,
                if *k == "ce_type" {
                    &b"orders.v1.OrderShipped"[..]
                } else {
                    v.as_bytes()
                },
            )
        })
        .collect();
    unknown_headers.push((
        "traceparent",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ));
    publisher
        .raw(None, record.key.as_bytes(), &record.value, &unknown_headers)
        .await;
    // Offset 2: a valid order behind them.
    let next = publisher.order(None).await;

    receiver.wait_delivered(&order_id(&next), WAIT).await;
    let dlq = dead_letters(&broker, &topic, 2).await;

    let (g, u) = (&dlq[0], &dlq[1]);
    assert_dead_letter(g, &topic, 0, "malformed", 0);
    assert_eq!(g.key(), Some(&b"garbage-key"[..]));
    assert_eq!(g.payload(), Some(&garbage[..]));
    assert_eq!(header(g, "x-custom").as_deref(), Some("kept"));

    assert_dead_letter(u, &topic, 1, "unknown_type", 0);
    assert_eq!(u.key(), Some(record.key.as_bytes()));
    assert_eq!(u.payload(), Some(&record.value[..]));
    let original: Vec<(String, Vec<u8>)> = unknown_headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect();
    assert_eq!(
        headers_of(u)[..original.len()],
        original[..],
        "the original headers come first, unchanged and in order"
    );

    assert!(
        receiver.attempts(&order_id(&shipped)).is_empty(),
        "an unknown type is not notified"
    );
    app.wait_metric("events_dead_lettered_total{reason=\"malformed\"}", 1.0)
        .await;
    app.wait_metric("events_dead_lettered_total{reason=\"unknown_type\"}", 1.0)
        .await;
    app.wait_metric("events_consumed_total", 3.0).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_permanent_refusal_is_dead_lettered_without_retries() {
    let (broker, topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let refused = order_created();
    receiver.set(&order_id(&refused), Behaviour::Always(400));
    publisher.event(None, &refused, &[]).await;
    let next = publisher.order(None).await;

    receiver.wait_delivered(&order_id(&next), WAIT).await;
    let dlq = dead_letters(&broker, &topic, 1).await;
    assert_dead_letter(&dlq[0], &topic, 0, "notify_permanent", 1);
    assert!(header(&dlq[0], "dlq.error.message").unwrap().contains("400"));
    assert_eq!(dlq[0].key(), Some(order_id(&refused).as_bytes()));
    assert_eq!(header(&dlq[0], "ce_id").as_deref(), Some(refused.event_id.as_str()));
    assert_eq!(receiver.attempts(&order_id(&refused)).len(), 1, "a 400 is not retried");
    app.wait_metric("events_dead_lettered_total{reason=\"notify_permanent\"}", 1.0)
        .await;
    app.wait_metric("notifications_failed_total", 1.0).await;
    app.shutdown().await;
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered_after_retry_max_attempts() {
    let (broker, topic, receiver, app, publisher) = webhook_setup(1, |config| config.retry_max_attempts = 3).await;

    let failing = order_created();
    receiver.set(&order_id(&failing), Behaviour::Always(503));
    publisher.event(None, &failing, &[]).await;
    let next = publisher.order(None).await;

    receiver.wait_delivered(&order_id(&next), WAIT).await;
    let dlq = dead_letters(&broker, &topic, 1).await;
    assert_dead_letter(&dlq[0], &topic, 0, "retries_exhausted", 3);
    assert_eq!(
        receiver.attempts(&order_id(&failing)).len(),
        3,
        "RETRY_MAX_ATTEMPTS attempts in all"
    );
    app.wait_metric("events_dead_lettered_total{reason=\"retries_exhausted\"}", 1.0)
        .await;
    app.wait_metric("notifications_failed_total", 3.0).await;
    app.wait_metric("notifications_sent_total", 1.0).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_record_over_max_record_bytes_is_dead_lettered() {
    let (broker, topic, receiver, app, publisher) = webhook_setup(1, |config| config.max_record_bytes = 1024).await;

    let mut big = order_created();
    big.order.as_mut().unwrap().user_id = "u".repeat(2000);
    publisher.event(None, &big, &[]).await;
    let next = publisher.order(None).await;

    receiver.wait_delivered(&order_id(&next), WAIT).await;
    let dlq = dead_letters(&broker, &topic, 1).await;
    assert_dead_letter(&dlq[0], &topic, 0, "too_large", 0);
    assert!(dlq[0].payload().is_some_and(|p| p.len() > 2000), "the value is kept");
    assert!(receiver.attempts(&order_id(&big)).is_empty());
    app.wait_metric("events_dead_lettered_total{reason=\"too_large\"}", 1.0)
        .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_record_too_large_for_the_dead_letter_topic_is_dead_lettered_without_its_value() {
    let broker = testkit::Broker::shared().await.unwrap();
    let (topic, group) = (testkit::unique("orders"), testkit::unique("notify"));
    // The orders topic takes the record; the dead-letter topic keeps the
    // broker's default limit (about 1 MB).
    broker
        .create_topic_with(&topic, 1, &[("max.message.bytes", "4000000")])
        .await
        .unwrap();
    broker.create_topic(&format!("{topic}.dlq"), 1).await.unwrap();
    let receiver = Receiver::start().await;
    let app = TestApp::spawn_ready(config(&broker, &topic, &group, Some(&receiver))).await;
    // Over the dead-letter producer's 1 MB message.max.bytes.
    let publisher = Publisher::with_max_bytes(&broker, &topic, 4_000_000);

    let huge = vec![7u8; 1_500_000];
    publisher.raw(None, b"huge", &huge, &[("x-custom", b"kept")]).await;
    let next = publisher.order(None).await;

    receiver.wait_delivered(&order_id(&next), WAIT).await;
    let dlq = dead_letters(&broker, &topic, 1).await;
    assert_dead_letter(&dlq[0], &topic, 0, "too_large", 0);
    assert_eq!(dlq[0].key(), Some(&b"huge"[..]));
    assert_eq!(dlq[0].payload(), None, "the value is left out");
    assert_eq!(header(&dlq[0], "dlq.omitted").as_deref(), Some("value; 1500000 bytes"));
    assert_eq!(header(&dlq[0], "x-custom").as_deref(), Some("kept"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_is_dead_lettered() {
    let (broker, topic, receiver, app, publisher) = webhook_setup(1, |_| {}).await;

    let moved = order_created();
    receiver.set(&order_id(&moved), Behaviour::Redirect);
    publisher.event(None, &moved, &[]).await;
    let next = publisher.order(None).await;

    receiver.wait_delivered(&order_id(&next), WAIT).await;
    let dlq = dead_letters(&broker, &topic, 1).await;
    assert_dead_letter(&dlq[0], &topic, 0, "notify_permanent", 1);
    assert!(header(&dlq[0], "dlq.error.message").unwrap().contains("302"));
    assert_eq!(receiver.redirected(), 0, "a POST is never replayed elsewhere as a GET");
    app.wait_metric("notifications_sent_total", 1.0).await;
    app.shutdown().await;
}

#[tokio::test]
async fn connection_errors_are_retried_and_the_dead_letter_does_not_leak_the_webhook_url() {
    let (broker, topic, group) = broker_with_topic(1).await;
    let mut config = config(&broker, &topic, &group, None);
    // Nothing listens there; the path holds a token, as webhook URLs often do.
    let port = testkit::free_port();
    config.notify_webhook_url = Some(
        format!("http://127.0.0.1:{port}/hooks/T0001/s3cr3t-t0ken")
            .parse()
            .unwrap(),
    );
    config.retry_max_attempts = 2;
    let app = TestApp::spawn_ready(config).await;
    let publisher = Publisher::new(&broker, &topic);

    publisher.order(None).await;
    let dlq = dead_letters(&broker, &topic, 1).await;
    assert_dead_letter(&dlq[0], &topic, 0, "retries_exhausted", 2);
    let message = header(&dlq[0], "dlq.error.message").unwrap();
    assert!(!message.contains("s3cr3t"), "the webhook URL leaked: {message}");
    assert!(
        message.to_lowercase().contains("connect"),
        "the cause is named: {message}"
    );
    app.wait_metric("notifications_failed_total", 2.0).await;
    app.shutdown().await;
}
