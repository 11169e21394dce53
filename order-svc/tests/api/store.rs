//! The order store at start-up and over time: a database migrated by a newer
//! binary stops the service with a clear message, idempotency keys expire
//! after IDEMPOTENCY_RETENTION, and a store that cannot take writes answers
//! UNAVAILABLE and recovers by itself.

use std::time::Duration;

use orders_contract::v1::OrderCreated;
use prost::Message as _;
use rdkafka::Message as _;
use sqlx::Connection as _;
use tonic::Code;

use crate::helpers::{
    create, hold_sqlite_write_lock, spawn_app, spawn_app_on, spawn_app_with, sqlite_url, valid_request,
};

#[tokio::test]
async fn a_store_newer_than_the_binary_stops_the_service_with_a_clear_message() {
    let mut app = spawn_app().await;
    let database_url = app.database_url.clone();
    app.stop().await.unwrap();
    {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(database_url.expose()).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99990101000000, 'from the future', TRUE, $1, 0)",
        )
        .bind(vec![0u8])
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let error = spawn_app_on(app.broker.clone(), app.topic.clone(), |c| c.database_url = database_url)
        .await
        .expect_err("a newer schema is refused");
    let message = error.to_string();
    assert!(
        message.contains("99990101000000") && message.contains("newer"),
        "{message}"
    );
}

#[tokio::test]
async fn an_idempotency_key_names_its_order_for_the_retention_only() {
    let app = spawn_app_with(|c| c.idempotency_retention = Duration::from_secs(2)).await;
    let mut client = app.client().await;
    let mut request = valid_request("keeper");
    request.request_id = "short-lived".into();
    let first = create(&mut client, request.clone()).await;
    assert_eq!(
        create(&mut client, request.clone()).await,
        first,
        "a retry within the retention"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = create(&mut client, request.clone()).await;
    assert_ne!(
        later.order_id, first.order_id,
        "after the retention the key names a new order"
    );
    assert_eq!(create(&mut client, request).await, later, "and holds for it");
}

#[tokio::test]
async fn an_sqlite_store_that_cannot_write_answers_unavailable_and_recovers() {
    let app = spawn_app_with(|c| c.database_url = sqlite_url()).await;
    let mut client = app.client().await;
    let lock = hold_sqlite_write_lock(&app).await;
    let mut request = valid_request("patient");
    request.request_id = "through-the-outage".into();
    let status = client
        .create_order(request.clone())
        .await
        .expect_err("the store is locked");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(lock);
    let order = create(&mut client, request.clone()).await;
    assert_eq!(create(&mut client, request).await, order, "one order for the key");
}

/// A burst of concurrent calls, as one group commit sees it: every key sent
/// three times at once, and one of them also with another payload. Each
/// call keeps its own outcome: one order per key, the same answer to every
/// retry, the other payload refused, and one event per order.
#[tokio::test]
async fn concurrent_calls_keep_their_own_outcomes() {
    const KEYS: usize = 40;
    let app = spawn_app().await;
    let client = app.client().await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..3 * KEYS {
        let key = i % KEYS;
        let mut request = valid_request(&format!("burst-{}", key % 7));
        request.request_id = format!("key-{key}");
        if i == 3 * KEYS - 1 {
            request.items[0].quantity += 1;
        }
        let mut client = client.clone();
        calls.spawn(async move { (i, client.create_order(request).await) });
    }
    let mut by_key: std::collections::HashMap<usize, Vec<String>> = Default::default();
    let mut refused = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let (i, answer) = joined.unwrap();
        match answer {
            Ok(answer) => {
                let order = answer.into_inner().order.unwrap();
                assert_eq!(order.request_id, format!("key-{}", i % KEYS));
                by_key.entry(i % KEYS).or_default().push(order.order_id);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "call {i}: {status:?}");
                refused.push(i);
            }
        }
    }
    // Whichever payload of the last key commits first wins; the other is refused.
    refused.sort();
    let last = KEYS - 1;
    assert!(
        refused == [3 * KEYS - 1] || refused == [last, 2 * KEYS - 1],
        "refused: {refused:?}"
    );
    assert_eq!(by_key.len(), KEYS, "every key has its order");
    for (key, ids) in &by_key {
        assert!(ids.iter().all(|id| id == &ids[0]), "key-{key}: {ids:?}");
    }
    // One more than expected: a second event for some order would show.
    let records = app
        .broker
        .read_all(&app.topic, KEYS + 1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut published: Vec<String> = records
        .iter()
        .map(|r| {
            OrderCreated::decode(r.payload().unwrap())
                .unwrap()
                .order
                .unwrap()
                .order_id
        })
        .collect();
    let mut answered: Vec<String> = by_key.into_values().map(|ids| ids[0].clone()).collect();
    published.sort();
    answered.sort();
    assert_eq!(published, answered, "one event per order, for the orders answered");
}
