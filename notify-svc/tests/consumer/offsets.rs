//! At least once across instances: a clean shutdown commits what was handled
//! and leaves promptly; a record cut off by shutdown is redelivered.

use std::time::Duration;

use crate::helpers::{
    Behaviour, Publisher, Receiver, TestApp, WAIT, broker_with_topic, config, order_created, order_id,
    own_broker_with_topic,
};

#[tokio::test]
async fn after_a_clean_shutdown_the_next_instance_resumes_without_renotifying() {
    let (broker, topic, group) = broker_with_topic(2).await;
    let receiver = Receiver::start().await;
    let publisher = Publisher::new(&broker, &topic);

    let first = TestApp::spawn_ready(config(&broker, &topic, &group, Some(&receiver))).await;
    let mut handled = Vec::new();
    for p in [0, 1, 0, 1] {
        handled.push(publisher.order(Some(p)).await);
    }
    for e in &handled {
        receiver.wait_delivered(&order_id(e), WAIT).await;
    }
    // Straight away, before the periodic auto-commit: only the shutdown commit
    // saves these offsets.
    let took = first.shutdown().await;
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");

    let while_down = [publisher.order(Some(0)).await, publisher.order(Some(1)).await];
    let second = TestApp::spawn_ready(config(&broker, &topic, &group, Some(&receiver))).await;
    for e in &while_down {
        receiver.wait_delivered(&order_id(e), WAIT).await;
    }
    // Records of a partition are handled in order, so had the committed
    // offsets been missing, the handled ones would have come again by now.
    for e in &handled {
        assert_eq!(receiver.attempts(&order_id(e)).len(), 1, "{} re-notified", order_id(e));
    }
    second.wait_metric("events_consumed_total", 2.0).await;
    second.shutdown().await;
}

#[tokio::test]
async fn a_record_cut_off_by_shutdown_is_redelivered_to_the_next_instance() {
    let (broker, topic, group) = broker_with_topic(1).await;
    let receiver = Receiver::start().await;
    let publisher = Publisher::new(&broker, &topic);
    let mut cfg = config(&broker, &topic, &group, Some(&receiver));
    cfg.notify_webhook_timeout = Duration::from_secs(60);
    cfg.service.shutdown_grace = Duration::from_secs(1);

    let first = TestApp::spawn_ready(cfg.clone()).await;
    let done = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&done), WAIT).await;
    // The receiver hangs on this one far longer than the shutdown grace.
    let hung = order_created();
    receiver.set(&order_id(&hung), Behaviour::Slow(Duration::from_secs(40)));
    publisher.event(None, &hung, &[]).await;
    let queued = publisher.order(None).await;
    receiver.wait_attempts(&order_id(&hung), 1, WAIT).await;

    let took = first.shutdown().await;
    assert!(
        took < Duration::from_secs(6),
        "shutdown gives up on the hung record after the 1 s grace, took {took:?}"
    );
    assert!(receiver.delivered(&order_id(&hung)).is_empty());

    receiver.heal(&order_id(&hung));
    let second = TestApp::spawn_ready(cfg).await;
    let again = receiver.wait_delivered(&order_id(&hung), WAIT).await;
    assert_eq!(again.idempotency_key.as_deref(), Some(hung.event_id.as_str()));
    receiver.wait_delivered(&order_id(&queued), WAIT).await;
    assert_eq!(
        receiver.attempts(&order_id(&done)).len(),
        1,
        "the handled one is not redelivered"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn shutdown_with_the_broker_gone_is_still_prompt() {
    let (mut broker, topic, group) = own_broker_with_topic(1).await;
    let receiver = Receiver::start().await;
    let app = TestApp::spawn_ready(config(&broker, &topic, &group, Some(&receiver))).await;
    let publisher = Publisher::new(&broker, &topic);
    let e = publisher.order(None).await;
    receiver.wait_delivered(&order_id(&e), WAIT).await;

    broker.stop();
    app.wait_ready(false, Duration::from_secs(10)).await;
    let took = app.shutdown().await;
    assert!(
        took < Duration::from_secs(15),
        "shutdown with the broker gone is bounded, took {took:?}"
    );
}
