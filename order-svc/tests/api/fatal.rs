//! A producer that librdkafka has put in its fatal state fails every send at
//! once; order-svc replaces it and the outbox sends the failed event again
//! through the new one, without a restart. CreateOrder answers OK throughout:
//! its order is committed either way.

use std::time::Duration;

use order_svc::{config::Config, startup::Application};
use testkit::{Broker, unique};

use crate::helpers::{run, valid_request};

// librdkafka's test hook for the fatal state is only in its C API.
#[allow(unsafe_code)]
#[tokio::test]
async fn a_fatal_producer_is_replaced_and_calls_succeed_again() {
    service_kit::telemetry::init_for_tests("order-svc-tests");
    let broker = Broker::shared().await.expect("broker starts");
    let topic = unique("orders");
    broker.create_topic(&topic, 1).await.expect("topic created");
    let mut config = Config::for_tests(&broker.addr(), &topic);
    config.kafka.options = broker.client_options().parse().unwrap();
    config.publish_timeout = Duration::from_secs(3);
    let database_url = config.database_url.clone();
    let app = Application::build(config).await.expect("order-svc builds");

    let producer = app.publisher().producer();
    let reason = c"fatal state raised by the test";
    // SAFETY: the pointer is the live producer's handle (`producer` keeps the
    // client alive for the call), and `reason` is a NUL-terminated string
    // librdkafka copies. `rd_kafka_test_fatal_error` only raises the fatal
    // state librdkafka's own error paths raise.
    let raised = unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            producer.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(
        raised,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    assert!(producer.client().fatal_error().is_some(), "the producer is fatal now");
    drop(producer);

    let app = run(app, broker, topic.clone(), database_url);
    let mut client = app.client().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let order = client
            .create_order(valid_request("user-1"))
            .await
            .expect("the order is committed whatever the producer's state")
            .into_inner()
            .order
            .expect("an order");
        ids.push(order.order_id);
    }
    let records = app.broker.read_all(&topic, 2, Duration::from_secs(20)).await.unwrap();
    for id in &ids {
        assert!(
            records.iter().any(|r| rdkafka::Message::key(r) == Some(id.as_bytes())),
            "order {id} is on the topic: the failed send was made again through a new producer"
        );
    }
    let text = app.metrics().await;
    assert!(
        crate::helpers::metric(&text, "kafka_produce_errors_total").unwrap_or(0.0) >= 1.0,
        "the send that met the fatal producer failed: {text}"
    );
}
