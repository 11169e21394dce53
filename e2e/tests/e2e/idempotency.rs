//! Idempotent CreateOrder through the binary: a retried request (same user and
//! request_id) names one order and one event, also after a restart; the same
//! key with another payload is refused.

use std::time::Duration;

use rdkafka::Message;
use tonic::Code;

use crate::helpers::{OrderSvc, broker_with_topic, order};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_request_id_is_one_order_and_one_event() {
    let (broker, topic) = broker_with_topic("idem", 2).await;
    let mut orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let mut client = orders.client().await;
    let mut request = order("dave");
    request.request_id = testkit::unique("req");

    let first = client
        .create_order(request.clone())
        .await
        .expect("first call")
        .into_inner()
        .order
        .expect("an order");
    let second = client
        .create_order(request.clone())
        .await
        .expect("retry")
        .into_inner()
        .order
        .expect("an order");
    assert_eq!(first.order_id, second.order_id, "a retry names the same order");

    let mut conflicting = request.clone();
    conflicting.items[0].quantity = 3;
    let status = client
        .create_order(conflicting)
        .await
        .expect_err("key reuse with another payload");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("request_id"), "{status:?}");

    // Another instance (a restart): same order id again.
    orders.service.signal("TERM");
    assert!(
        orders
            .service
            .wait_exit(Duration::from_secs(20))
            .await
            .expect("exits")
            .success()
    );
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let mut client = orders.client().await;
    let third = client
        .create_order(request.clone())
        .await
        .expect("retry after restart")
        .into_inner()
        .order
        .expect("an order");
    assert_eq!(
        first.order_id, third.order_id,
        "a retry after a restart names the same order"
    );

    // A different order, so the reader below knows when it has read enough.
    let other = client
        .create_order(order("dave"))
        .await
        .expect("another order")
        .into_inner()
        .order
        .expect("an order");
    // Everything on the topic (the reader stops after a quiet 3 s).
    let records = broker
        .read_all(&topic, usize::MAX, Duration::from_secs(3))
        .await
        .expect("reads the topic");
    let ours: Vec<_> = records
        .iter()
        .filter(|m| m.key() == Some(first.order_id.as_bytes()))
        .collect();
    let event_ids: Vec<Option<String>> = ours.iter().map(|m| testkit::header(m, "ce_id")).collect();
    println!(
        "same request_id, 3 calls: {} records for order {}, event ids {event_ids:?}",
        ours.len(),
        first.order_id
    );
    assert!(!ours.is_empty() && ours.len() <= 3, "{} records", ours.len());
    assert!(
        event_ids.iter().all(|e| e.is_some() && *e == event_ids[0]),
        "one event id: {event_ids:?}"
    );
    let other_ids: Vec<_> = records
        .iter()
        .filter(|m| m.key() == Some(other.order_id.as_bytes()))
        .map(|m| testkit::header(m, "ce_id"))
        .collect();
    assert_eq!(other_ids.len(), 1);
    assert_ne!(other_ids[0], event_ids[0], "another order has another event id");
}
