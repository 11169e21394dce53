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

/// Runs the ignored test `name` in a child process with `env` (a variable
/// set here would change every test's broker) and returns its output.
async fn child(name: &'static str, env: &'static [(&'static str, &'static str)]) -> String {
    let out = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command.args(["--exact", name, "--nocapture", "--include-ignored"]);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_without_its_jars_or_java_says_so() {
    let out = child("missing_jars_child", &[("KAFKA_LIBS", "/nonexistent/kafka-libs")]).await;
    assert!(out.contains("missing-jars-ok"), "{out}");
    let out = child(
        "missing_java_child",
        &[("JAVA_HOME", "/nonexistent/jdk"), ("PATH", "/nonexistent/bin")],
    )
    .await;
    assert!(out.contains("missing-java-ok"), "{out}");
}

#[tokio::test]
#[ignore = "run by a_broker_without_its_jars_or_java_says_so in a child process"]
async fn missing_jars_child() {
    let err = Broker::start_kind(BrokerKind::Kafka)
        .await
        .expect_err("no jars, no broker");
    let text = format!("{err:#}");
    assert!(text.contains("/nonexistent/kafka-libs"), "{text}");
    println!("missing-jars-ok");
}

#[tokio::test]
#[ignore = "run by a_broker_without_its_jars_or_java_says_so in a child process"]
async fn missing_java_child() {
    let err = Broker::start_kind(BrokerKind::Kafka)
        .await
        .expect_err("no java, no broker");
    let text = format!("{err:#}");
    assert!(text.contains("Java 17 or newer"), "{text}");
    println!("missing-java-ok");
}
