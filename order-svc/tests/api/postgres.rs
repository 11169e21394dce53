//! order-svc on PostgreSQL (testkit's initdb + pg_ctl server): a database
//! that goes away gives UNAVAILABLE and NOT_SERVING, and the service recovers
//! by itself when it returns; two instances on one database answer the same
//! idempotency keys with one order and one event each; TLS to the database
//! (`sslmode=require`, `verify-full`) and a bad `sslmode` named as such.

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

/// Turns TLS on in `pg` (a reload, no restart) with a server certificate
/// for 127.0.0.1 signed by a fresh CA; returns the directory holding the
/// CA's certificate as `ca.pem`.
async fn enable_tls(pg: &Postgres) -> tempfile::TempDir {
    use rcgen::ExtendedKeyUsagePurpose;
    let ca = crate::security::make_ca("order-svc test PostgreSQL CA");
    let (cert, key) = crate::security::leaf(&ca, &["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), cert).unwrap();
    std::fs::write(dir.path().join("server.key"), key).unwrap();
    // The server (the postgres user when the tests run as root) reads the
    // key, which it insists is private to its owner.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path().join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let id = |args: &[&str]| -> Option<u32> {
        let out = std::process::Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"]) == Some(0) {
        let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
        for file in ["server.pem", "server.key"] {
            std::os::unix::fs::chown(dir.path().join(file), uid, gid).unwrap();
        }
    }
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url("postgres"))
        .await
        .unwrap();
    for statement in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            dir.path().join("server.pem").display()
        ),
        format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            dir.path().join("server.key").display()
        ),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        sqlx::query(&statement).execute(&mut admin).await.unwrap();
    }
    testkit::eventually(Duration::from_secs(10), "the server has TLS on", || {
        let url = pg.url("postgres");
        async move {
            let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.ok()?;
            let on: String = sqlx::query_scalar("SHOW ssl").fetch_one(&mut admin).await.ok()?;
            (on == "on").then_some(())
        }
    })
    .await;
    dir
}

#[tokio::test]
async fn postgres_over_tls_with_sslmode_require_and_verify_full() {
    let pg = Postgres::start().await.expect("PostgreSQL starts");
    let pki = enable_tls(&pg).await;
    let ca = pki.path().join("ca.pem");
    for params in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ] {
        let base = pg.create_database("orders").await.unwrap();
        let database = base.rsplit_once('/').unwrap().1.to_owned();
        let url = format!("{base}?{params}");
        let app = spawn_app_with(|c| c.database_url = url.parse().unwrap()).await;
        let mut client = app.client().await;
        create(&mut client, valid_request("tls-user")).await;
        // Every connection order-svc holds to its database is encrypted.
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url("postgres"))
            .await
            .unwrap();
        let (all, encrypted): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
        )
        .bind(&database)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        assert!(
            all > 0 && encrypted == all,
            "{params}: {encrypted} of {all} connections use TLS"
        );
    }

    // verify-full with another CA: the server's certificate is refused.
    let other = crate::security::make_ca("another CA");
    let other_ca = pki.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.pem()).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.create_database("orders").await.unwrap(),
        other_ca.display()
    );
    let (broker, topic) = (testkit::Broker::shared().await.unwrap(), testkit::unique("orders"));
    broker.create_topic(&topic, 1).await.unwrap();
    let refused = spawn_app_on(broker, topic, |c| c.database_url = url.parse().unwrap())
        .await
        .expect_err("an untrusted server certificate: no start");
    assert!(refused.to_string().contains("DATABASE_URL"), "{refused}");
}

#[tokio::test]
async fn a_bad_sslmode_or_a_missing_root_certificate_is_named() {
    for (params, named) in [
        (
            "sslmode=requir",
            "sslmode=\"requir\" is not one of disable, allow, prefer, require",
        ),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert=\"/nonexistent/ca.pem\" is not a readable file",
        ),
    ] {
        let url = format!("postgres://orders:s3cret@127.0.0.1:1/orders?{params}");
        let error = spawn_app_on(
            testkit::Broker::shared().await.unwrap(),
            testkit::unique("orders"),
            |c| c.database_url = url.parse().unwrap(),
        )
        .await
        .expect_err("bad TLS settings: no start");
        let text = error.to_string();
        assert!(text.contains(named), "{text}");
        assert!(!text.contains("s3cret"), "the password never shows: {text}");
    }
}
