//! The order store at start-up and over time: a database migrated by a newer
//! binary stops the service with a clear message, idempotency keys expire
//! after IDEMPOTENCY_RETENTION, and a store that cannot take writes answers
//! UNAVAILABLE and recovers by itself.

use std::time::Duration;

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
