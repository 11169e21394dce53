//! SIGTERM under load: order-svc drains and exits 0 with every acknowledged
//! order on the topic; notify-svc exits 0 promptly and, restarted, notifies
//! every order (nothing in flight is lost).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tonic::Code;

use crate::helpers::{
    OrderStream, OrderSvc, broker_with_topic, keys, missing_on_topic, notified_ids, notify_env, start_notify,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let (broker, topic) = broker_with_topic("drain", 3).await;
    let mut orders = OrderSvc::start(&broker.addr(), &topic, &[]).await;
    let group = testkit::unique("notify");
    let env = notify_env(&broker.addr(), &topic, &group, &[]);
    let mut notify = start_notify(&env).await;

    let stream = OrderStream::start(orders.grpc_addr, 8, 100_000, Duration::from_millis(3)).await;

    // notify-svc mid-stream: records keep arriving while it stops.
    stream.wait_ok(100, Duration::from_secs(30)).await;
    testkit::eventually(Duration::from_secs(20), "notify-svc to notify something", || async {
        (!notified_ids(&notify).is_empty()).then_some(())
    })
    .await;
    let signalled = Instant::now();
    notify.signal("TERM");
    let status = notify
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("notify-svc exits promptly");
    let notify_exit = signalled.elapsed();
    println!("notify-svc: exit {status} {notify_exit:?} after SIGTERM");
    assert!(
        status.success(),
        "notify-svc exit status {status}; output:\n{}",
        notify.output().join("\n")
    );
    let before = notified_ids(&notify);

    // order-svc mid-stream: calls in flight finish, then it exits 0.
    let at_signal = stream.ok_count();
    stream.wait_ok(at_signal + 100, Duration::from_secs(30)).await;
    let failed_before = stream.failed();
    assert!(
        failed_before.is_empty(),
        "calls failed before SIGTERM: {failed_before:?}"
    );
    let signalled = Instant::now();
    orders.service.signal("TERM");
    let status = orders
        .service
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("order-svc exits");
    println!("order-svc: exit {status} {:?} after SIGTERM", signalled.elapsed());
    assert!(
        status.success(),
        "order-svc exit status {status}; output:\n{}",
        orders.service.output().join("\n")
    );
    let outcomes = stream.finish(true).await;
    let ok: HashSet<String> = outcomes.ok.iter().cloned().collect();
    let codes: Vec<Code> = outcomes.failed.iter().map(|(code, _)| *code).collect();
    println!(
        "calls: {} OK, {} failed after SIGTERM {codes:?}, {} notified before notify-svc stopped",
        ok.len(),
        outcomes.failed.len(),
        before.len()
    );
    assert_eq!(ok.len(), outcomes.ok.len(), "order ids are unique");
    assert!(
        orders.service.lines_with(&["abandoning"]).is_empty(),
        "order-svc abandoned in-flight calls:\n{}",
        orders.service.output().join("\n")
    );
    assert!(ok.len() >= 200);

    // Every acknowledged order is on the topic.
    let missing = missing_on_topic(&broker, &topic, &ok, Duration::from_secs(20)).await;
    assert!(
        missing.is_empty(),
        "{} acknowledged orders not on the topic: {missing:?}",
        missing.len()
    );
    // And nothing else: a call that failed after SIGTERM was refused before it
    // was handled, not cut off after its record was published. (Which code a
    // refused call gets is the client's business: tonic reports a stream
    // refused by the server's GOAWAY as INTERNAL "h2 protocol error", one
    // queued on the closing connection as CANCELLED, later ones UNAVAILABLE.)
    let all = broker
        .read_all(&topic, usize::MAX, Duration::from_secs(3))
        .await
        .expect("the topic can be read");
    let unanswered: Vec<String> = keys(&all).into_iter().filter(|k| !ok.contains(k)).collect();
    assert!(
        unanswered.is_empty(),
        "{} records on the topic for calls that did not get OK (failures: {:?})",
        unanswered.len(),
        outcomes.failed
    );
    assert_eq!(all.len(), ok.len(), "one record per acknowledged order");

    // A new notify-svc in the same group picks up where the old one committed.
    let notify = start_notify(&env).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let lost = loop {
        let all: HashSet<String> = before.union(&notified_ids(&notify)).cloned().collect();
        let lost: Vec<&String> = ok.difference(&all).collect();
        if lost.is_empty() || Instant::now() > deadline {
            break lost.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let again = notified_ids(&notify).intersection(&before).count();
    println!(
        "after restart: {} orders, lost {}, notified again (redelivered) {again}, caught up in {:?}",
        ok.len(),
        lost.len(),
        started.elapsed()
    );
    assert!(lost.is_empty(), "{} orders never notified: {lost:?}", lost.len());
}
