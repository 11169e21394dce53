//! The gRPC ceilings: a bare `OrderService` that answers a fixed order at
//! once (ceiling 1), or after one rdkafka produce with the service's producer
//! settings, through order-svc's produce path (`AckProducer`), has been
//! acknowledged (ceiling 2). With a store (`DATABASE_URL`), each call first
//! commits a new order through order-svc's own `Store::create`, the very
//! transaction CreateOrder runs (ceiling 5); with a store and a broker, the
//! committed record then goes to order-svc's `Outbox::publish_now` and the
//! call answers, as CreateOrder does, while the broker's acknowledgement is
//! recorded in the background by the outbox's marker (ceiling 6). No
//! validation, metrics, tracing or idempotency: what any service built from
//! tonic + rdkafka (+ the same store) can reach on this machine.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use order_svc::{
    metrics::Metrics,
    outbox::Outbox,
    producer::AckProducer,
    publisher::Publisher,
    store::{self, Created, OutboxRecord, Store, StoredOrder},
};
use orders_contract::{
    envelope::Record,
    v1::{
        CreateOrderRequest, CreateOrderResponse, Order,
        order_service_server::{OrderService, OrderServiceServer},
    },
};
use service_kit::{kafka::KafkaOptions, secret::Secret};
use tonic::{Request, Response, Status};

use crate::fixtures::{headers, sample_event, sample_record, service_producer_config};

/// order-svc's default `PUBLISH_TIMEOUT`.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Ceilings 5 and 6: the store each call commits an order to, and the
    /// outbox that publishes it (ceiling 6).
    store: Option<(Arc<Store>, Option<Arc<Outbox>>)>,
    record: Record,
    order: Order,
}

impl std::fmt::Debug for CeilingService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeilingService")
            .field("kafka", &self.producer.is_some())
            .field("store", &self.store.is_some())
            .finish()
    }
}

#[tonic::async_trait]
impl OrderService for CeilingService {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        if let Some((store, outbox)) = &self.store {
            return self.commit(store, outbox.as_ref(), request.into_inner()).await;
        }
        if let Some((producer, topic)) = &self.producer {
            let key = format!("{:016x}", self.calls.fetch_add(1, Ordering::Relaxed));
            // order-svc's produce path: `AckProducer`.
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

impl CeilingService {
    /// Ceilings 5 and 6: the request's order (its user, items and currency,
    /// with new ids, as CreateOrder makes it; unvalidated) committed with its
    /// outbox record in `Store::create`'s transaction. The user matters: the
    /// orders of many users spread over the store's index by user as
    /// CreateOrder's do, which costs more than appending one user's;
    /// with an outbox, the record is handed to the producer before the
    /// answer, as CreateOrder does. Without a `request_id` (the generator
    /// sends none) no idempotency key is written, as in CreateOrder.
    async fn commit(
        &self,
        store: &Store,
        outbox: Option<&Arc<Outbox>>,
        request: CreateOrderRequest,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let now_us = store::now_us();
        let order = Order {
            order_id: uuid::Uuid::now_v7().to_string(),
            created_at: Some(store::timestamp_from_us(now_us)),
            total_minor: request
                .items
                .iter()
                .map(|i| i64::from(i.quantity) * i.unit_price_minor)
                .sum(),
            user_id: request.user_id,
            items: request.items,
            currency: request.currency,
            request_id: String::new(),
        };
        let record = OutboxRecord {
            key: order.order_id.clone(),
            value: self.record.value.clone(),
            headers: self
                .record
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone().into_owned()))
                .collect(),
        };
        let event_id = uuid::Uuid::new_v4().to_string();
        let stored = StoredOrder {
            order: &order,
            event_id: &event_id,
            fingerprint: None,
        };
        let lease_until_us = match outbox {
            Some(outbox) => outbox.lease_until_us(),
            None => now_us,
        };
        let created = store
            .create(&stored, &record, lease_until_us, now_us)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if let (Created::New(id), Some(outbox)) = (created, outbox) {
            outbox.publish_now(id, &record);
        }
        Ok(Response::new(CreateOrderResponse { order: Some(order) }))
    }
}

/// Serves the ceiling on `addr` until the process ends; prints `listening
/// on <addr>` once bound. With `database_url`, ceiling 5 (and with `kafka`,
/// ceiling 6) on that store, migrated by order-svc's own migrations.
pub async fn serve(
    addr: SocketAddr,
    kafka: Option<KafkaTarget>,
    database_url: Option<String>,
    nodelay: bool,
) -> anyhow::Result<()> {
    let store = match database_url {
        Some(url) => {
            // order-svc's default DATABASE_MAX_CONNECTIONS.
            let store = Arc::new(Store::connect(&url.parse::<Secret>()?, 16).await?);
            let outbox = match &kafka {
                Some(k) => {
                    let metrics = Arc::new(Metrics::new(&mut prometheus_client::registry::Registry::default()));
                    let publisher = Arc::new(Publisher::new(
                        service_producer_config(&k.brokers, &k.options),
                        k.topic.clone(),
                        PUBLISH_TIMEOUT,
                        metrics.clone(),
                    )?);
                    let outbox = Arc::new(Outbox::new(store.clone(), publisher, metrics, PUBLISH_TIMEOUT));
                    // Records acknowledgements as order-svc does (batched
                    // UPDATEs), so the store carries the same writes.
                    tokio::spawn(outbox.clone().run_marker(Default::default()));
                    Some(outbox)
                }
                None => None,
            };
            Some((store, outbox))
        }
        None => None,
    };
    let producer = match &kafka {
        Some(_) if store.is_some() => None,
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
        store,
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

#[cfg(test)]
mod tests {
    use orders_contract::v1::order_service_client::OrderServiceClient;

    use super::*;

    /// Ceiling 5 commits every call's order, the request's user and items,
    /// with its outbox row, to the store it is given: what it measures is
    /// the store's transaction on CreateOrder's data.
    #[tokio::test]
    async fn ceiling_5_commits_each_order_to_the_store() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite://{}", dir.path().join("ceiling5.db").display());
        let addr: SocketAddr = ([127, 0, 0, 1], crate::procs::free_port()?).into();
        let server = tokio::spawn(serve(addr, None, Some(url.clone()), true));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut client = loop {
            match OrderServiceClient::connect(format!("http://{addr}")).await {
                Ok(client) => break client,
                Err(e) if std::time::Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let mut ids = Vec::new();
        for i in 0..2 {
            let order = client
                .create_order(crate::loadgen::request(i))
                .await?
                .into_inner()
                .order;
            ids.push(order.unwrap_or_default().order_id);
        }
        assert_ne!(ids[0], ids[1], "each call creates a new order");
        let store = Store::connect(&url.parse::<Secret>()?, 1).await?;
        for (i, id) in (0..).zip(&ids) {
            let stored = store.get(id).await?.expect("stored");
            let request = crate::loadgen::request(i);
            assert_eq!(
                (stored.user_id, stored.items),
                (request.user_id, request.items),
                "the request's order"
            );
        }
        assert_eq!(store.outbox_stats().await?.pending, 2, "one outbox row per order");
        server.abort();
        Ok(())
    }
}
