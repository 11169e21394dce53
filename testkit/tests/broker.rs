//! The brokers themselves: start, answer, stop, kill -9, restart with data,
//! and say why when they cannot start.

use std::time::{Duration, Instant};

use testkit::{Broker, BrokerKind, unique};

#[tokio::test(flavor = "multi_thread")]
async fn kafka_starts_keeps_records_across_kill_and_restart() {
    let started = Instant::now();
    let mut broker = Broker::start_kind(BrokerKind::Kafka).await.expect("kafka starts");
    eprintln!("Apache Kafka answered after {:?}", started.elapsed());
    let topic = unique("t");
    broker.create_topic(&topic, 2).await.unwrap();
    broker.produce(&topic, b"k", b"v1", &[("h", b"x")]).await.unwrap();
    broker.kill();
    broker.restart().await.expect("kafka restarts after kill -9");
    broker.produce(&topic, b"k", b"v2", &[]).await.unwrap();
    let read = broker.read_all(&topic, 2, Duration::from_secs(30)).await.unwrap();
    assert_eq!(read.len(), 2, "both records survive");
    assert_eq!(testkit::header(&read[0], "h").as_deref(), Some("x"));
    broker.stop();
    broker.restart().await.expect("kafka restarts after a clean stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_broker_is_one_node_and_cannot_be_stopped() {
    let a = Broker::shared().await.unwrap();
    let b = Broker::shared().await.unwrap();
    assert_eq!(a.addr(), b.addr());
    let mut c = b.clone();
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.stop()));
    assert!(stopped.is_err(), "stopping the shared broker must panic");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_without_its_jars_says_so() {
    // In a child process: the variable would change every test's broker.
    let err = tokio::task::spawn_blocking(|| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "missing_jars_child", "--nocapture", "--include-ignored"])
            .env("KAFKA_LIBS", "/nonexistent/kafka-libs")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&err.stdout).into_owned() + &String::from_utf8_lossy(&err.stderr);
    assert!(err.status.success(), "{out}");
    assert!(out.contains("missing-jars-ok"), "{out}");
}

#[tokio::test]
#[ignore = "run by a_broker_without_its_jars_says_so in a child process"]
async fn missing_jars_child() {
    let err = Broker::start_kind(BrokerKind::Kafka)
        .await
        .expect_err("no jars, no broker");
    let text = format!("{err:#}");
    assert!(text.contains("/nonexistent/kafka-libs"), "{text}");
    println!("missing-jars-ok");
}
