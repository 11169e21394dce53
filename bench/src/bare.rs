//! The gRPC ceilings: a bare `OrderService` that answers a fixed order at
//! once (ceiling 1), or after one rdkafka produce with the service's producer
//! settings, through order-svc's produce path (`AckProducer`), has been
//! acknowledged (ceiling 2). No validation, metrics,
//! tracing or idempotency: what any service built from tonic + rdkafka can
//! reach on this machine.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use order_svc::producer::AckProducer;
use orders_contract::{
    envelope::Record,
    v1::{
        CreateOrderRequest, CreateOrderResponse, Order,
        order_service_server::{OrderService, OrderServiceServer},
    },
};
use rdkafka::message::{Header, OwnedHeaders};
use service_kit::kafka::{KafkaOptions, Role, client_config};
use tonic::{Request, Response, Status};

use crate::raw;

/// Where the Kafka ceiling publishes.
#[derive(Debug, Clone)]
pub struct KafkaTarget {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// Extra librdkafka properties (as order-svc's `KAFKA_OPTIONS`).
    pub options: KafkaOptions,
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

struct BareApi {
    /// Varies the record key per call so records spread over the partitions,
    /// as order ids do.
    calls: AtomicU64,
    producer: Option<(AckProducer, String)>,
    record: Record,
    order: Order,
}

impl std::fmt::Debug for BareApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareApi")
            .field("kafka", &self.producer.is_some())
            .finish()
    }
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

#[tonic::async_trait]
impl OrderService for BareApi {
    async fn create_order(
        &self,
        _request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        if let Some((producer, topic)) = &self.producer {
            let key = format!("{:016x}", self.calls.fetch_add(1, Ordering::Relaxed));
            // order-svc's produce path: `AckProducer`, acks served on the runtime.
            let delivery = producer
                .send(topic, &key, &self.record.value, headers(&self.record))
                .map_err(|e| Status::unavailable(e.to_string()))?;
            delivery.await.map_err(|e| Status::unavailable(e.to_string()))?;
        }
        Ok(Response::new(CreateOrderResponse {
            order: Some(self.order.clone()),
        }))
    }
}

/// Serves the bare service on `addr` until the process ends; prints
/// `listening on <addr>` once bound.
pub async fn serve(addr: SocketAddr, kafka: Option<KafkaTarget>, nodelay: bool) -> anyhow::Result<()> {
    let producer = match &kafka {
        Some(k) => {
            let producer = AckProducer::new(&service_producer_config(&k.brokers, &k.options))?;
            Some((producer, k.topic.clone()))
        }
        None => None,
    };
    let event = raw::sample_event(0);
    let api = BareApi {
        calls: AtomicU64::new(0),
        producer,
        // The record order-svc would publish: CloudEvents headers and a traceparent.
        record: raw::sample_record(0),
        order: event.order.clone().unwrap_or_default(),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(nodelay));
    tonic::transport::Server::builder()
        .add_service(OrderServiceServer::new(api))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
