//! Issue 3's fault test: orders flow while notify-svc (webhook sink) is killed
//! with SIGKILL twice and restarted, and the receiver refuses the first
//! attempt of every third order with 503. Every order must reach the
//! receiver at least once; duplicates are counted and reported.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use crate::helpers::{OrderStream, OrderSvc, Receiver, broker_with_topic, notify_env, start_notify};

const ORDERS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twice_and_503s_lose_nothing() {
    let started = Instant::now();
    let (broker, topic) = broker_with_topic("faults", 4).await;
    let receiver = Receiver::start(3).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let group = testkit::unique("notify");
    let env = notify_env(
        &broker.addr(),
        &topic,
        &group,
        &[
            ("NOTIFY_WEBHOOK_URL", receiver.url.clone()),
            ("RETRY_INITIAL_DELAY", "20ms".into()),
            ("RETRY_MAX_DELAY", "200ms".into()),
            ("RETRY_MAX_ATTEMPTS", "10".into()),
        ],
    );
    let mut notify = start_notify(&env).await;

    // About 60 orders a second, so the kills land while orders still flow.
    let flow_started = Instant::now();
    let stream = OrderStream::start(orders.grpc_addr, 8, ORDERS, Duration::from_millis(16)).await;
    let mut kills = Vec::new();
    for threshold in [120, 300] {
        testkit::eventually(
            Duration::from_secs(60),
            &format!("{threshold} orders delivered to the receiver"),
            || async { (receiver.delivered_count() >= threshold).then_some(()) },
        )
        .await;
        notify.signal("KILL");
        let status = notify.wait_exit(Duration::from_secs(5)).await.expect("SIGKILL ends it");
        assert!(!status.success());
        kills.push(format!(
            "SIGKILL at {:?} with {} delivered and {} orders acknowledged",
            flow_started.elapsed(),
            receiver.delivered_count(),
            stream.ok_count()
        ));
        notify = start_notify(&env).await;
    }
    let outcomes = stream.finish(false).await;
    let flow_ended = flow_started.elapsed();
    assert!(
        outcomes.failed.is_empty(),
        "CreateOrder failures: {:?}",
        outcomes.failed
    );
    let acknowledged: HashSet<String> = outcomes.ok.iter().cloned().collect();
    assert_eq!(acknowledged.len(), ORDERS);

    let lost = receiver
        .wait_all_delivered(&acknowledged, Duration::from_secs(90))
        .await;
    let total = started.elapsed();
    let (duplicates, refused, requests, bad_keys, unknown) = receiver.with(|r| {
        (
            r.delivered.values().map(|n| n.saturating_sub(1)).sum::<u32>(),
            r.refused,
            r.attempts.values().sum::<u32>(),
            r.bad_idempotency_key.clone(),
            r.delivered.keys().filter(|id| !acknowledged.contains(*id)).count(),
        )
    });
    for kill in &kills {
        println!("{kill}");
    }
    println!(
        "fault test: orders {ORDERS}, lost {}, duplicates {duplicates} (200s beyond the first per order), \
         503s {refused}, requests {requests}, orders flowed for {flow_ended:?}, total {total:?}",
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} orders never reached the receiver: {lost:?}",
        lost.len()
    );
    assert_eq!(kills.len(), 2);
    assert!(
        refused as usize >= ORDERS / 3,
        "every third order's first attempt was refused"
    );
    assert!(
        bad_keys.is_empty(),
        "Idempotency-Key missing or not the event id: {bad_keys:?}"
    );
    assert_eq!(unknown, 0, "the receiver got orders nobody created");
    drop(notify);
}
