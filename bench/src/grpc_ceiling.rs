//! The gRPC ceilings: a bare `OrderService` that answers a fixed order at
//! once (ceiling 1), or after one rdkafka produce with the service's producer
//! settings, through order-svc's produce path (`AckProducer`), has been
//! acknowledged (ceiling 2). No validation, metrics,
//! tracing or idempotency: what any service built from tonic + rdkafka can
//! reach on this machine.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use order_svc::producer::AckProducer;
use orders_contract::{
    envelope::Record,
    v1::{
        CreateOrderRequest, CreateOrderResponse, Order,
        order_service_server::{OrderService, OrderServiceServer},
    },
};
use service_kit::kafka::KafkaOptions;
use tonic::{Request, Response, Status};

use crate::fixtures::{headers, sample_event, sample_record, service_producer_config};

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

struct CeilingService {
    /// Varies the record key per call so records spread over the partitions,
    /// as order ids do.
    calls: AtomicU64,
    producer: Option<(AckProducer, String)>,
    record: Record,
    order: Order,
}

impl std::fmt::Debug for CeilingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeilingService")
            .field("kafka", &self.producer.is_some())
            .finish()
    }
}

#[tonic::async_trait]
impl OrderService for CeilingService {
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
    let event = sample_event(0);
    let api = CeilingService {
        calls: AtomicU64::new(0),
        producer,
        // The record order-svc would publish: CloudEvents headers and a traceparent.
        record: sample_record(0),
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
