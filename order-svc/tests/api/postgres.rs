//! order-svc on PostgreSQL (testkit's initdb + pg_ctl server): a database
//! that goes away gives UNAVAILABLE and NOT_SERVING, and the service recovers
//! by itself when it returns; two instances on one database answer the same
//! idempotency keys with one order and one event each.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use orders_contract::v1::OrderCreated;
use prost::Message as _;
use testkit::Postgres;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::helpers::{create, spawn_app_on, spawn_app_with, valid_request};

#[tokio::test]
async fn a_database_that_goes_away_gives_unavailable_and_the_service_recovers_by_itself() {
    let pg = Postgres::start().await.expect("PostgreSQL starts");
    let url = pg.create_database("orders").await.unwrap();
    let app = spawn_app_with(|c| c.database_url = url.parse().unwrap()).await;
    let mut client = app.client().await;
    create(&mut client, valid_request("pg-user")).await;

    pg.stop().await.unwrap();
    let mut request = valid_request("pg-user");
    request.request_id = "during-the-outage".into();
    let status = client
        .create_order(request.clone())
        .await
        .expect_err("no database, no order");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut health = HealthClient::new(app.channel().await);
    let check = |health: &mut HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest { service: String::new() })
                .await
                .ok()
                .map(|r| r.into_inner().status())
        }
    };
    testkit::eventually(Duration::from_secs(15), "health NOT_SERVING", || {
        let check = check(&mut health);
        async move { (check.await == Some(ServingStatus::NotServing)).then_some(()) }
    })
    .await;
    assert_eq!(app.get("/readyz").await.0, 503);

    pg.restart().await.unwrap();
    let order = testkit::eventually(Duration::from_secs(30), "an order accepted again", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.create_order(request).await.ok() }
    })
    .await
    .into_inner()
    .order
    .unwrap();
    assert_eq!(create(&mut client, request).await, order, "one order for the key");
    testkit::eventually(Duration::from_secs(15), "health SERVING again", || {
        let check = check(&mut health);
        async move { (check.await == Some(ServingStatus::Serving)).then_some(()) }
    })
    .await;
    let records = app
        .broker
        .read_all(&app.topic, 2, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        records
            .iter()
            .any(|r| rdkafka::Message::key(r) == Some(order.order_id.as_bytes())),
        "the order accepted after the outage is on the topic"
    );
}

#[tokio::test]
async fn two_instances_on_one_database_answer_the_same_keys_with_one_order_each() {
    let pg = Postgres::shared().await.expect("PostgreSQL starts");
    let url = pg.create_database("orders").await.unwrap();
    let a = spawn_app_with(|c| c.database_url = url.parse().unwrap()).await;
    let b = spawn_app_on(a.broker.clone(), a.topic.clone(), |c| {
        c.database_url = url.parse().unwrap()
    })
    .await
    .expect("a second instance");
    let (ca, cb) = (a.client().await, b.client().await);
    let keys = 100;
    let mut calls = Vec::new();
    for i in 0..keys {
        for client in [&ca, &cb] {
            let mut client = client.clone();
            let mut request = valid_request(&format!("shopper-{}", i % 5));
            request.request_id = format!("key-{i}");
            calls.push(tokio::spawn(async move { (i, create(&mut client, request).await) }));
        }
    }
    let mut by_key: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut answers: HashMap<usize, Vec<orders_contract::v1::Order>> = HashMap::new();
    for call in calls {
        let (i, order) = call.await.unwrap();
        by_key.entry(i).or_default().insert(order.order_id.clone());
        answers.entry(i).or_default().push(order);
    }
    for (i, orders) in &answers {
        assert_eq!(
            orders[0], orders[1],
            "key-{i}: both instances answer the very same order"
        );
    }
    let ids: HashSet<String> = by_key.values().flatten().cloned().collect();
    assert_eq!(ids.len(), keys, "one order per key");

    // One event per order on the topic (a resend would repeat its event id).
    let records = a
        .broker
        .read_all(&a.topic, keys, Duration::from_secs(30))
        .await
        .unwrap();
    let mut events: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &records {
        let event = OrderCreated::decode(rdkafka::Message::payload(r).unwrap()).unwrap();
        events
            .entry(event.order.unwrap().order_id)
            .or_default()
            .insert(event.event_id);
    }
    assert_eq!(
        events.keys().cloned().collect::<HashSet<_>>(),
        ids,
        "every order's event"
    );
    assert!(events.values().all(|e| e.len() == 1), "one event id per order");
}
