//! CreateOrder answers once the order and its event are committed, and the
//! event reaches the topic right after: the record is the order, keyed by its
//! id, with CloudEvents and trace headers; a retried request_id gets the
//! first answer back, from the store, also after a restart.

use std::time::Duration;

use orders_contract::{envelope, v1::OrderCreated};
use prost::Message as _;
use rdkafka::Message as _;
use testkit::header;

use crate::helpers::{create, spawn_app, spawn_app_with, valid_request};

#[tokio::test]
async fn an_order_is_on_the_topic_when_create_order_answers() {
    let app = spawn_app().await;
    let order = create(&mut app.client().await, valid_request("user-1")).await;

    assert_eq!(order.user_id, "user-1");
    assert_eq!(order.total_minor, 2 * 1999 + 500);
    assert_eq!(order.currency, "EUR");
    assert_eq!(order.items.len(), 2);
    assert!(order.created_at.is_some());
    let id = uuid::Uuid::parse_str(&order.order_id).expect("order id is a UUID");
    assert_eq!(id.get_version_num(), 7, "time-ordered ids without a request_id");

    // Published right after the answer.
    let records = app
        .broker
        .read_all(&app.topic, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.key(), Some(order.order_id.as_bytes()), "keyed by order id");
    let event = OrderCreated::decode(record.payload().unwrap()).unwrap();
    assert_eq!(event.order.as_ref(), Some(&order));
    assert_eq!(event.occurred_at, order.created_at);
    assert_eq!(header(record, "ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(header(record, "ce_id"), Some(event.event_id.clone()));
    assert_eq!(header(record, "ce_type").as_deref(), Some(envelope::ORDER_CREATED_TYPE));
    assert_eq!(header(record, "ce_source").as_deref(), Some("/order-svc"));
    assert_eq!(header(record, "content-type").as_deref(), Some("application/protobuf"));
    let ce_time = header(record, "ce_time").unwrap();
    time::OffsetDateTime::parse(&ce_time, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    let traceparent = header(record, "traceparent").expect("a trace is started for every call");
    assert_eq!(traceparent.len(), 55, "{traceparent}");
}

#[tokio::test]
async fn every_order_and_event_gets_its_own_id() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let order = create(&mut client, valid_request("user-1")).await;
        assert!(ids.insert(order.order_id));
    }
    let records = app
        .broker
        .read_all(&app.topic, 20, Duration::from_secs(5))
        .await
        .unwrap();
    let events: std::collections::HashSet<_> = records
        .iter()
        .map(|r| OrderCreated::decode(r.payload().unwrap()).unwrap().event_id)
        .collect();
    assert_eq!(events.len(), 20, "unique event ids");
    assert!(events.is_disjoint(&ids));
}

#[tokio::test]
async fn a_retried_request_id_gives_the_same_order_and_event() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    let mut request = valid_request("user-7");
    request.request_id = "checkout-42".into();
    let first = create(&mut client, request.clone()).await;
    let second = create(&mut client, request.clone()).await;
    assert_eq!(first, second, "the same answer, created_at included");
    assert_eq!(first.request_id, "checkout-42");
    assert_eq!(uuid::Uuid::parse_str(&first.order_id).unwrap().get_version_num(), 7);

    // Another user may use the same key for their own order.
    let mut other = request.clone();
    other.user_id = "user-8".into();
    let theirs = create(&mut client, other).await;
    assert_ne!(theirs.order_id, first.order_id);

    // The same key with another payload is refused, naming the field.
    let mut changed = request.clone();
    changed.items[0].quantity = 3;
    let status = client.create_order(changed).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("request_id"), "{}", status.message());

    let records = app
        .broker
        .read_all(&app.topic, 2, Duration::from_secs(5))
        .await
        .unwrap();
    let ours: Vec<_> = records
        .iter()
        .map(|r| OrderCreated::decode(r.payload().unwrap()).unwrap())
        .filter(|e| e.order.as_ref().unwrap().order_id == first.order_id)
        .collect();
    assert_eq!(ours.len(), 1, "a replayed answer publishes nothing more");
}

#[tokio::test]
async fn a_request_id_survives_a_restart() {
    let mut request = valid_request("user-9");
    request.request_id = "retry-me".into();
    let mut first_app = spawn_app().await;
    let database_url = first_app.database_url.clone();
    let first = create(&mut first_app.client().await, request.clone()).await;
    first_app.stop().await.unwrap();
    let second_app = spawn_app_with(|c| c.database_url = database_url).await;
    let second = create(&mut second_app.client().await, request.clone()).await;
    assert_eq!(first, second, "the first answer, created_at included");
    let mut changed = request;
    changed.currency = "USD".into();
    let status = second_app.client().await.create_order(changed).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let events = first_app
        .broker
        .read_all(&first_app.topic, 2, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "one order, one event");
    assert_eq!(events[0].key(), Some(first.order_id.as_bytes()));
    let second_topic = second_app
        .broker
        .read_all(&second_app.topic, 1, Duration::from_secs(2))
        .await
        .unwrap_or_default();
    assert!(
        second_topic.is_empty(),
        "a replay publishes nothing: {}",
        second_topic.len()
    );
}

#[tokio::test]
async fn an_incoming_traceparent_is_continued_into_the_record() {
    let app = spawn_app().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(valid_request("user-1"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    app.client().await.create_order(request).await.unwrap();
    let records = app
        .broker
        .read_all(&app.topic, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let traceparent = header(&records[0], "traceparent").unwrap();
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "a child span of the caller's, not the caller's own"
    );
}
