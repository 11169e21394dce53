//! Kafka over SASL/SCRAM: the consumer and the dead-letter producer both
//! authenticate; a wrong password never starts, and never shows.

use std::time::Duration;

use orders_contract::envelope;
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};

use crate::helpers::{Receiver, TestApp, WAIT, config, order_created, order_id};

const PASSWORD: &str = "n0tify-s3cret";

fn with_sasl(mut config: notify_svc::config::Config, password: &str) -> notify_svc::config::Config {
    config.kafka.startup_timeout = Duration::from_secs(3);
    config.kafka.security.kafka_security_protocol = Some("sasl_plaintext".into());
    config.kafka.security.kafka_sasl_mechanism = Some("SCRAM-SHA-512".into());
    config.kafka.security.kafka_sasl_username = Some("notify-svc".into());
    config.kafka.security.kafka_sasl_password = Some(password.parse().unwrap());
    config
}

#[tokio::test]
async fn consumes_and_dead_letters_over_sasl_scram() {
    let topic = testkit::unique("orders");
    let dlq = format!("{topic}.dlq");
    let broker = testkit::Broker::start_with_sasl("notify-svc", PASSWORD, &[(topic.as_str(), 1), (dlq.as_str(), 1)])
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    let group = testkit::unique("group");

    let wrong = notify_svc::startup::Application::build(with_sasl(
        config(&broker, &topic, &group, Some(&receiver)),
        "not-the-password",
    ))
    .await
    .expect_err("a wrong password does not start");
    assert!(!format!("{wrong} {wrong:?}").contains("not-the-password"), "{wrong}");

    let app = TestApp::spawn_ready(with_sasl(config(&broker, &topic, &group, Some(&receiver)), PASSWORD)).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .set("security.protocol", "sasl_plaintext")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", "notify-svc")
        .set("sasl.password", PASSWORD)
        .create()
        .unwrap();
    let event = order_created();
    let record = envelope::encode_order_created(&event, "/test");
    let mut headers = OwnedHeaders::new();
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::to(&topic)
                .key(&record.key)
                .payload(&record.value)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    receiver.wait_delivered(&order_id(&event), WAIT).await;

    // The dead-letter producer authenticates too: a garbage record lands there
    // and the DLQ's offset store moves on (the receiver sees nothing for it).
    producer
        .send(
            FutureRecord::to(&topic).key("junk").payload(&b"\xff\xff"[..]),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    app.wait_metric("events_dead_lettered_total{reason=\"malformed\"}", 1.0)
        .await;
}
