//! What every benchmark shares: the order-sized event and record the
//! ceilings and the pre-fill send, order-svc's producer settings, and topic
//! creation.

use std::time::Duration;

use orders_contract::{
    envelope::{self, Record},
    v1::{Order, OrderCreated},
};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    types::RDKafkaErrorCode as Code,
};
use service_kit::kafka::{KafkaOptions, Role, client_config};

/// An `OrderCreated` like the ones order-svc publishes, created now.
pub fn sample_event(i: u64) -> OrderCreated {
    let now = orders_contract::timestamp(time::OffsetDateTime::now_utc());
    OrderCreated {
        event_id: uuid::Uuid::new_v4().to_string(),
        order: Some(Order {
            order_id: uuid::Uuid::now_v7().to_string(),
            user_id: format!("bench-user-{}", i % 1000),
            items: crate::loadgen::items(),
            currency: "EUR".into(),
            total_minor: 4498,
            created_at: Some(now),
            request_id: String::new(),
        }),
        occurred_at: Some(now),
    }
}

/// The record of [`sample_event`], with the CloudEvents headers and a W3C
/// `traceparent`, as order-svc sends it.
pub fn sample_record(i: u64) -> Record {
    let mut record = envelope::encode_order_created(&sample_event(i), "/order-svc");
    record.headers.push((
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    ));
    record
}

/// The headers of `record` as rdkafka headers.
pub fn headers(record: &Record) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// order-svc's producer configuration: its defaults, then `options`.
pub fn service_producer_config(brokers: &str, options: &KafkaOptions) -> rdkafka::ClientConfig {
    client_config(
        brokers,
        Role::Producer,
        order_svc::publisher::producer_defaults(Duration::from_secs(5), 1024),
        options,
    )
}

/// Creates `topics` (name, partitions); existing ones are left alone.
pub async fn create_topics(brokers: &str, topics: &[(String, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<_> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, Code::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}
