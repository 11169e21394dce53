//! The broker goes away and comes back: CreateOrder answers UNAVAILABLE within
//! the publish timeout, health and readiness follow the broker, and orders
//! flow again without a restart.

use std::time::{Duration, Instant};

use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::helpers::{metric, spawn_app_alone_with, valid_request};

#[tokio::test]
async fn unavailable_while_the_broker_is_down_and_recovers_by_itself() {
    let mut app = spawn_app_alone_with(|c| c.publish_timeout = Duration::from_secs(2)).await;
    let mut client = app.client().await;
    client
        .create_order(valid_request("user-1"))
        .await
        .expect("works while the broker is up");

    app.broker.stop();
    let started = Instant::now();
    let status = client
        .create_order(valid_request("user-1"))
        .await
        .expect_err("no broker, no order");
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        took < Duration::from_secs(4),
        "answered in {took:?}, bound is the 2 s publish timeout"
    );

    let mut health = HealthClient::new(app.channel().await);
    testkit::eventually(Duration::from_secs(12), "health NOT_SERVING", || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest { service: String::new() })
                .await
                .ok()?
                .into_inner();
            (status.status() == ServingStatus::NotServing).then_some(())
        }
    })
    .await;
    assert_eq!(app.get("/readyz").await.0, 503);
    assert!(metric(&app.metrics().await, "kafka_produce_errors_total").unwrap_or(0.0) >= 1.0);

    app.broker.restart().await.expect("broker restarts");
    let recovered = Instant::now();
    let order = testkit::eventually(
        Duration::from_secs(30),
        "an order accepted after the broker is back",
        || {
            let mut client = client.clone();
            async move { client.create_order(valid_request("user-2")).await.ok() }
        },
    )
    .await
    .into_inner()
    .order
    .unwrap();
    eprintln!(
        "orders accepted again {:?} after the broker restarted",
        recovered.elapsed()
    );
    let status = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let serving = status.status() == ServingStatus::Serving;
    if !serving {
        testkit::eventually(Duration::from_secs(10), "health SERVING again", || {
            let mut health = health.clone();
            async move {
                let s = health
                    .check(HealthCheckRequest { service: String::new() })
                    .await
                    .ok()?
                    .into_inner();
                (s.status() == ServingStatus::Serving).then_some(())
            }
        })
        .await;
    }
    let records = app
        .broker
        .read_all(&app.topic, 3, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        records
            .iter()
            .any(|r| rdkafka::Message::key(r) == Some(order.order_id.as_bytes())),
        "the order accepted after recovery is on the topic"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn calls_abandoned_during_an_outage_queue_no_more_records_than_max_concurrent_calls() {
    let mut app = spawn_app_alone_with(|c| {
        c.max_concurrent_calls = 4;
        c.publish_timeout = Duration::from_secs(5);
    })
    .await;
    let mut client = app.client().await;
    client
        .create_order(valid_request("before"))
        .await
        .expect("works while the broker is up");

    app.broker.stop();
    // Each client gives up after 200 ms: the call (and its slot) ends, its
    // record may stay queued for the broker's return.
    for i in 0..30 {
        let mut request = tonic::Request::new(valid_request(&format!("abandoned-{i}")));
        request.set_timeout(Duration::from_millis(200));
        let answer = client.create_order(request).await;
        assert!(answer.is_err(), "call {i} cannot succeed without a broker");
    }
    app.broker.restart().await.expect("broker restarts");
    // Once the queued records are delivered the queue has room again.
    testkit::eventually(Duration::from_secs(30), "an order accepted after the outage", || {
        let mut client = client.clone();
        async move { client.create_order(valid_request("after")).await.ok() }
    })
    .await;

    let records = app
        .broker
        .read_all(&app.topic, 32, Duration::from_secs(10))
        .await
        .unwrap();
    let abandoned = records
        .iter()
        .filter(|r| {
            rdkafka::Message::payload(*r).is_some_and(|v| v.windows(b"abandoned-".len()).any(|w| w == b"abandoned-"))
        })
        .count();
    assert!(
        abandoned <= 4,
        "{abandoned} abandoned calls were published after the outage; MAX_CONCURRENT_CALLS is 4"
    );
}
