//! The broker goes away and comes back: order-svc keeps answering OK (each
//! order and its event are committed to its store), says in its log and
//! metrics that events wait, and when the broker returns every order of
//! before, during and after the outage is notified, without a restart.

use std::time::{Duration, Instant};

use crate::helpers::{NOTIFICATION, OrderSvc, notify_env, order, own_broker_with_topic, start_notify};
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

    // Broker gone: orders are still accepted, at the store's pace.
    tokio::task::block_in_place(|| broker.stop());
    let mut during = Vec::new();
    for i in 0..10 {
        let asked = Instant::now();
        let mut request = tonic::Request::new(order(&format!("during-{i}")));
        request.set_timeout(Duration::from_secs(10));
        let accepted = client
            .create_order(request)
            .await
            .expect("CreateOrder answers OK while the broker is down")
            .into_inner()
            .order
            .expect("an order");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "answered after {:?}: a call does not wait for the broker",
            asked.elapsed()
        );
        during.push(accepted.order_id);
    }
    // The log says the events wait in the outbox.
    orders
        .service
        .wait_for_line(&["Kafka did not take", "outbox"], Duration::from_secs(30))
        .await;

    // Broker back (same port, same data): the held events flow, no restarts.
    broker.restart().await.expect("the broker restarts");
    let restarted = Instant::now();
    let after = client
        .create_order(order("after"))
        .await
        .expect("CreateOrder succeeds")
        .into_inner()
        .order
        .expect("an order");
    for id in during.iter().chain([&after.order_id]) {
        let left = Duration::from_secs(90).saturating_sub(restarted.elapsed());
        let notified = tokio::time::timeout(left, async {
            while notify.lines_with(&[NOTIFICATION, id]).is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            notified.is_ok(),
            "order {id} was not notified within 90 s of the broker's return\n{}\norder-svc:\n{}\nnotify-svc:\n{}",
            broker_log(&broker),
            orders.service.output().join("\n"),
            notify.output().join("\n")
        );
    }
    println!(
        "broker restarted: the 10 orders accepted during the outage and 1 after were notified within {:?}",
        restarted.elapsed()
    );
    orders
        .service
        .wait_for_line(&["Kafka acknowledges events again"], Duration::from_secs(5))
        .await;
    assert_eq!(
        orders.service.lines_with(&["order-svc serving"]).len(),
        1,
        "order-svc was not restarted"
    );
}
