//! Three notify-svc processes share a 6-partition topic in one group while
//! orders flow: one member is killed with SIGKILL (its partitions move to the
//! others), then the broker itself is killed with SIGKILL and restarted.
//! Every acknowledged order reaches the webhook receiver at least once.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use crate::helpers::{OrderStream, OrderSvc, Receiver, notify_env, own_broker_with_topic, start_notify};

const ORDERS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_and_then_the_broker_killed_lose_nothing() {
    let (mut broker, topic) = own_broker_with_topic("group", 6).await;
    let receiver = Receiver::start(0).await;
    let orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let group = testkit::unique("notify");
    // Each member gets its own METRICS_ADDR from notify_env.
    let member_env = || {
        notify_env(
            &broker.addr(),
            &topic,
            &group,
            &[
                ("NOTIFY_WEBHOOK_URL", receiver.url.clone()),
                ("RETRY_INITIAL_DELAY", "20ms".into()),
                ("RETRY_MAX_DELAY", "500ms".into()),
                ("RETRY_MAX_ATTEMPTS", "20".into()),
            ],
        )
    };
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(start_notify(&member_env()).await);
    }

    let stream = OrderStream::start(orders.grpc_addr, 4, ORDERS, Duration::from_millis(25)).await;
    testkit::eventually(Duration::from_secs(60), "100 orders delivered", || async {
        (receiver.delivered_count() >= 100).then_some(())
    })
    .await;
    let mut victim = members.remove(0);
    victim.signal("KILL");
    victim.wait_exit(Duration::from_secs(5)).await.expect("SIGKILL ends it");
    println!("member killed with {} delivered", receiver.delivered_count());

    // The broker dies while orders still flow.
    stream.wait_ok(300, Duration::from_secs(60)).await;
    let down = Instant::now();
    tokio::task::block_in_place(|| broker.kill());
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await.expect("the broker restarts after SIGKILL");
    println!(
        "broker killed with {} acknowledged and {} delivered, back after {:?}",
        stream.ok_count(),
        receiver.delivered_count(),
        down.elapsed()
    );

    let outcomes = stream.finish(false).await;
    // Calls made while the broker was gone were refused (UNAVAILABLE); the
    // ones acknowledged must all arrive.
    let acknowledged: HashSet<String> = outcomes.ok.iter().cloned().collect();
    assert!(
        acknowledged.len() >= ORDERS / 2,
        "{} orders acknowledged",
        acknowledged.len()
    );
    let lost = receiver
        .wait_all_delivered(&acknowledged, Duration::from_secs(120))
        .await;
    let duplicates = receiver.with(|r| r.delivered.values().map(|n| n.saturating_sub(1)).sum::<u32>());
    println!(
        "group faults: acknowledged {}, refused during the outage {}, lost {}, duplicates {duplicates}",
        acknowledged.len(),
        outcomes.failed.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged orders never arrived: {lost:?}",
        lost.len()
    );
    drop(members);
}
