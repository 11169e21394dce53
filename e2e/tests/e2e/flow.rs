//! The happy path: an order goes in over gRPC, its notification comes out of
//! notify-svc, in the same trace; an invalid order is refused naming the field.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{NOTIFICATION, OrderSvc, broker_with_topic, field, notify_env, order, start_notify};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_in_notification_out() {
    let (broker, topic) = broker_with_topic("flow", 1).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let group = testkit::unique("notify");
    let notify = start_notify(&notify_env(&broker.addr(), &topic, &group, &[])).await;
    let mut client = orders.client().await;

    // A known W3C trace context, as an instrumented caller would send it.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time after 1970")
        .as_nanos();
    let trace_id = format!("{:032x}", nanos | 1 << 100);
    let mut request = tonic::Request::new(order("alice"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .expect("valid metadata"),
    );
    let sent = Instant::now();
    let created = client
        .create_order(request)
        .await
        .expect("CreateOrder succeeds")
        .into_inner()
        .order
        .expect("the answer carries the order");
    assert_eq!(created.user_id, "alice");
    assert_eq!(created.total_minor, 2500);
    assert!(!created.order_id.is_empty());

    // The first notification may wait for the group join; later ones should
    // take well under the promised "second or two".
    let line = notify
        .wait_for_line(&[NOTIFICATION, &created.order_id], Duration::from_secs(20))
        .await;
    println!("first notification {:?} after CreateOrder", sent.elapsed());
    assert_eq!(
        field(&line, "order_id").as_deref(),
        Some(created.order_id.as_str()),
        "{line}"
    );
    assert_eq!(field(&line, "trace_id").as_deref(), Some(trace_id.as_str()), "{line}");
    assert!(line.contains("alice"), "the notification names the user: {line}");

    let second = client
        .create_order(order("bob"))
        .await
        .expect("CreateOrder succeeds")
        .into_inner()
        .order
        .expect("the answer carries the order");
    let sent = Instant::now();
    notify
        .wait_for_line(&[NOTIFICATION, &second.order_id], Duration::from_secs(2))
        .await;
    println!("second notification {:?} after CreateOrder answered", sent.elapsed());
    let notified = notify.lines_with(&[NOTIFICATION]);
    assert_eq!(notified.len(), 2, "exactly one notification per order: {notified:#?}");

    // Invalid: the status names the field, in the message and in the details.
    let mut invalid = order("carol");
    invalid.currency = "eur".into();
    invalid.items[0].quantity = 0;
    let refused_trace = format!("{:032x}", nanos | 1 << 101);
    let mut request = tonic::Request::new(invalid);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{refused_trace}-00f067aa0ba902b7-01")
            .parse()
            .expect("valid metadata"),
    );
    let status = client
        .create_order(request)
        .await
        .expect_err("an invalid order is refused");
    // Logged, in the caller's trace.
    let refused = orders
        .service
        .wait_for_line(&["order refused", &refused_trace], Duration::from_secs(5))
        .await;
    assert_eq!(
        field(&refused, "trace_id").as_deref(),
        Some(refused_trace.as_str()),
        "{refused}"
    );
    assert!(refused.contains("currency"), "the reason is logged: {refused}");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("currency"), "{status:?}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert!(fields.iter().any(|f| f == "currency"), "{fields:?}");
    assert!(fields.iter().any(|f| f.contains("quantity")), "{fields:?}");
    let mut no_user = order("");
    no_user.user_id.clear();
    let status = client.create_order(no_user).await.expect_err("no user_id is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("user_id"), "{status:?}");
}
