//! Bad configuration: each binary exits non-zero with a message naming the
//! problem, before it binds anything.

use std::time::Duration;

use testkit::{Service, free_port};

use crate::helpers::{broker_with_topic, exit_watching_port};

/// Runs `binary` with `env` plus a fresh port for its first listener
/// (`GRPC_ADDR` for order-svc, `METRICS_ADDR` for notify-svc) and checks it
/// exits non-zero, printing every one of `needles`, without binding the port.
async fn refuses(binary: &str, env: &[(&str, String)], needles: &[&str]) {
    let port = free_port();
    let listener = if binary == "order-svc" {
        "GRPC_ADDR"
    } else {
        "METRICS_ADDR"
    };
    let mut env: Vec<(&str, String)> = env.to_vec();
    env.push((listener, format!("127.0.0.1:{port}")));
    if binary == "order-svc" {
        env.push(("METRICS_ADDR", format!("127.0.0.1:{}", free_port())));
    }
    let mut service = Service::spawn(binary, &env).expect("starts");
    let (status, bound) = exit_watching_port(&mut service, port, Duration::from_secs(30)).await;
    let output = service.output().join("\n");
    let case: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{binary} {case:?}: {status}: {}",
        output.lines().last().unwrap_or_default()
    );
    assert!(
        !status.success(),
        "{binary} {case:?} exited {status}; output:\n{output}"
    );
    assert!(
        !bound,
        "{binary} {case:?} bound {listener} before failing; output:\n{output}"
    );
    for needle in needles {
        assert!(
            output.contains(needle),
            "{binary} {case:?}: the message does not name {needle:?}; output:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_nonzero_before_binding() {
    let (broker, topic) = broker_with_topic("config", 1).await;
    let good = |extra: &[(&'static str, &str)]| {
        let mut env = vec![
            ("KAFKA_BROKERS", broker.addr()),
            ("ORDERS_TOPIC", topic.clone()),
            ("DLQ_TOPIC", format!("{topic}.dlq")),
            ("KAFKA_OPTIONS", broker.client_options().to_owned()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, (*v).to_owned()));
        }
        env
    };
    let unreachable = format!("127.0.0.1:{}", free_port());
    let missing = testkit::unique("missing");

    refuses(
        "order-svc",
        &good(&[("PUBLISH_TIMEOUT", "20s")]),
        &["PUBLISH_TIMEOUT", "20s"],
    )
    .await;
    refuses("order-svc", &good(&[("PUBLISH_TIMEOUT", "soon")]), &["PUBLISH_TIMEOUT"]).await;
    refuses(
        "order-svc",
        &good(&[("KAFKA_OPTIONS", "garbage-without-equals")]),
        &["KAFKA_OPTIONS", "entry 1", "key=value"],
    )
    .await;
    refuses(
        "order-svc",
        &good(&[("ORDERS_TOPIC", &missing)]),
        &[&missing, "does not exist"],
    )
    .await;
    // A broker that does not answer does not stop order-svc (its outbox holds
    // the events): durability.rs restarts it during a broker outage.

    refuses(
        "notify-svc",
        &good(&[("KAFKA_OPTIONS", "garbage-without-equals")]),
        &["KAFKA_OPTIONS", "entry 1"],
    )
    .await;
    refuses(
        "notify-svc",
        &good(&[("ORDERS_TOPIC", &missing)]),
        &[&missing, "does not exist"],
    )
    .await;
    refuses(
        "notify-svc",
        &good(&[("DLQ_TOPIC", &format!("{missing}.dlq"))]),
        &["does not exist", &format!("{missing}.dlq")],
    )
    .await;
    refuses(
        "notify-svc",
        &good(&[("KAFKA_BROKERS", &unreachable), ("KAFKA_STARTUP_TIMEOUT", "2s")]),
        &["cannot reach Kafka", &unreachable],
    )
    .await;
    refuses(
        "notify-svc",
        &good(&[("RETRY_INITIAL_DELAY", "5s"), ("RETRY_MAX_DELAY", "1s")]),
        &["RETRY_INITIAL_DELAY"],
    )
    .await;
    refuses(
        "notify-svc",
        &good(&[("NOTIFY_WEBHOOK_URL", "not a url")]),
        &["NOTIFY_WEBHOOK_URL"],
    )
    .await;
}
