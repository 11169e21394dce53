//! The broker goes away and comes back: order-svc answers UNAVAILABLE within
//! its bound while it is gone, and both services recover by themselves.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::helpers::{NOTIFICATION, OrderSvc, field, notify_env, order, own_broker_with_topic, start_notify};

fn broker_log(broker: &testkit::Broker) -> String {
    let log = std::fs::read_to_string(broker.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let interesting: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("panic") || l.contains("ERROR"))
        .copied()
        .collect();
    format!(
        "{}: {} lines; panics/errors:\n{}\nlast lines:\n{}",
        broker.log_path().display(),
        lines.len(),
        interesting.iter().take(20).copied().collect::<Vec<_>>().join("\n"),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage() {
    let (mut broker, topic) = own_broker_with_topic("outage", 1).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let group = testkit::unique("notify");
    let notify = start_notify(&notify_env(&broker.addr(), &topic, &group, &[])).await;
    let mut client = orders.client().await;

    let before = client
        .create_order(order("before"))
        .await
        .expect("CreateOrder succeeds")
        .into_inner()
        .order
        .expect("an order");
    notify
        .wait_for_line(&[NOTIFICATION, &before.order_id], Duration::from_secs(20))
        .await;

    // Broker gone: UNAVAILABLE within the bound (PUBLISH_TIMEOUT defaults to 5 s).
    tokio::task::block_in_place(|| broker.stop());
    let asked = Instant::now();
    let mut request = tonic::Request::new(order("during"));
    request.set_timeout(Duration::from_secs(60));
    let answer = tokio::time::timeout(Duration::from_secs(60), client.create_order(request))
        .await
        .expect("CreateOrder answers at all while the broker is down");
    let unavailable_after = asked.elapsed();
    println!(
        "broker down: CreateOrder answered {:?} after {unavailable_after:?}",
        answer.as_ref().map_err(|s| s.code()).map(|_| "OK")
    );
    let status = answer.expect_err("no order is accepted while the broker is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        unavailable_after < Duration::from_secs(15),
        "UNAVAILABLE took {unavailable_after:?}"
    );
    // The failure is logged with the call's fields: who, which order, which trace.
    let failed = orders
        .service
        .wait_for_line(&["order failed", "during"], Duration::from_secs(5))
        .await;
    assert_eq!(field(&failed, "user_id").as_deref(), Some("during"), "{failed}");
    for name in ["order_id", "event_id", "trace_id"] {
        assert!(field(&failed, name).is_some_and(|v| v.len() >= 32), "{name}: {failed}");
    }

    // Broker back (same port, same data): orders flow again, no restarts.
    broker.restart().await.expect("the broker restarts");
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(60);
    let mut refusals = Vec::new();
    let after = loop {
        let mut request = tonic::Request::new(order("after"));
        request.set_timeout(Duration::from_secs(15));
        match tokio::time::timeout(Duration::from_secs(20), client.create_order(request)).await {
            Ok(Ok(response)) => break response.into_inner().order.expect("an order"),
            Ok(Err(status)) => refusals.push(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => refusals.push("client-side timeout".into()),
        }
        assert!(
            Instant::now() < deadline,
            "order-svc did not recover within 60 s of the broker restart; answers: {refusals:#?}\n{}\norder-svc:\n{}",
            broker_log(&broker),
            orders.service.output().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let accepted_after = restarted.elapsed();
    let notified = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if !notify.lines_with(&[NOTIFICATION, &after.order_id]).is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let notified_after = restarted.elapsed();
    assert!(
        notified.is_ok(),
        "the order accepted after the restart was not notified within 60 s\n{}\nnotify-svc:\n{}",
        broker_log(&broker),
        notify.output().join("\n")
    );
    println!(
        "broker restarted: first order accepted after {accepted_after:?} ({} refusals before), notified after {notified_after:?}",
        refusals.len()
    );
    assert_eq!(
        orders.service.lines_with(&["order-svc serving"]).len(),
        1,
        "order-svc was not restarted"
    );
}
