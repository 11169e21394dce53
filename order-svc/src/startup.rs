//! Wiring: [`Application::build`] checks the broker (a broker that refuses
//! the configuration stops the start, one that does not answer does not),
//! opens (and migrates) the
//! order store, creates the producer and binds both listeners (so the real
//! ports are known before serving); [`Application::run_until_stopped`] serves
//! and publishes the outbox until the injected shutdown future resolves, then
//! shuts down in one order: health NOT_SERVING, stop accepting, drain
//! in-flight calls, flush the producer, record the last acknowledgements.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use orders_contract::v1::order_service_server::OrderServiceServer;
use prometheus_client::registry::Registry;
use service_kit::{kafka, ops};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::OrderApi,
    auth::Authenticator,
    broker_check::{self, BrokerAtStart},
    config::Config,
    error::Error,
    metrics::{GrpcMetricsLayer, Metrics},
    outbox::Outbox,
    publisher::{Publisher, producer_defaults},
    store::{Backend, Store},
};

/// How often the store is checked for health and readiness.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How long one health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// The service name health checks use.
const SERVICE_NAME: &str = "orders.v1.OrderService";

/// A built, bound, not yet serving order-svc.
#[derive(Debug)]
pub struct Application {
    config: Config,
    grpc_listener: TcpListener,
    ops_listener: TcpListener,
    publisher: Arc<Publisher>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    tls: Option<ServerTlsConfig>,
    auth: Option<Authenticator>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl Application {
    /// Checks the broker (a missing topic or refused authentication is an
    /// error; no answer within `KAFKA_STARTUP_TIMEOUT` only a warning), opens and
    /// migrates the order store, creates the producer, and binds the gRPC
    /// and operations listeners.
    pub async fn build(config: Config) -> Result<Self, Error> {
        if config.orders_topic.trim().is_empty() {
            return Err(Error::Config("ORDERS_TOPIC must not be empty".into()));
        }
        if config.ce_source.trim().is_empty() {
            return Err(Error::Config("CE_SOURCE must not be empty".into()));
        }
        config.kafka.security.validate().map_err(Error::Config)?;
        let backend = Backend::of(config.database_url.expose())?;
        let tls = tls_config(&config)?;
        let auth = Authenticator::from_config(&config)?;
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let defaults = producer_defaults(config.publish_timeout, config.max_concurrent_calls);
        let client_config = config.kafka.client_config(kafka::Role::Producer, defaults);
        let publisher = Arc::new(Publisher::new(
            client_config.clone(),
            config.orders_topic.clone(),
            config.publish_timeout,
            metrics.clone(),
        )?);

        let (check_config, brokers, topic, timeout) = (
            client_config.clone(),
            config.kafka.brokers.clone(),
            config.orders_topic.clone(),
            config.kafka.startup_timeout,
        );
        let checked =
            tokio::task::spawn_blocking(move || broker_check::check(&check_config, &brokers, &topic, timeout))
                .await
                .map_err(|e| Error::Config(format!("broker check panicked: {e}")))??;
        match checked {
            BrokerAtStart::Ready(partitions) => {
                tracing::info!(brokers = %config.kafka.brokers, topic = %config.orders_topic, partitions, "Kafka is reachable");
            }
            // Availability follows the store: orders are taken and their
            // events wait in the outbox (`outbox_pending`,
            // `outbox_oldest_age_seconds`) until the broker answers.
            BrokerAtStart::Unreachable(error) => tracing::warn!(
                %error,
                topic = %config.orders_topic,
                "Kafka is unreachable: starting anyway; orders are stored and their events wait in the outbox until the broker answers"
            ),
        }
        // After the broker check: a broker that refuses the configuration
        // stops the process before it creates or migrates anything.
        let store = Arc::new(Store::connect(&config.database_url, config.database_max_connections).await?);
        tracing::info!(store = ?backend, schema_version = store.schema_version(), "order store ready");

        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(io(format!("cannot bind GRPC_ADDR {}", config.grpc_addr)))?;
        let ops_listener = TcpListener::bind(config.service.metrics_addr)
            .await
            .map_err(io(format!("cannot bind METRICS_ADDR {}", config.service.metrics_addr)))?;
        Ok(Self {
            config,
            grpc_listener,
            ops_listener,
            publisher,
            store,
            metrics,
            registry: Arc::new(registry),
            tls,
            auth,
        })
    }

    /// The bound gRPC address (with the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The order store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The publisher the outbox uses.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The bound operations HTTP address.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops cleanly.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let Application {
            config,
            grpc_listener,
            ops_listener,
            publisher,
            store,
            metrics,
            registry,
            tls,
            auth,
        } = self;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let ready = Arc::new(AtomicBool::new(true));
        set_health(&reporter, ServingStatus::Serving).await;

        let stop = CancellationToken::new();
        let monitor = tokio::spawn(monitor_store(
            store.clone(),
            reporter.clone(),
            ready.clone(),
            stop.clone(),
        ));
        let outbox = Arc::new(Outbox::new(
            store.clone(),
            publisher.clone(),
            metrics.clone(),
            config.publish_timeout,
        ));
        // The relay and housekeeping stop with the server; the marker only
        // after the producer's flush, to record the last acknowledgements.
        let stop_marker = CancellationToken::new();
        let relay = tokio::spawn(outbox.clone().run_relay(stop.clone()));
        let marker = tokio::spawn(outbox.clone().run_marker(stop_marker.clone()));
        let housekeeping = tokio::spawn(outbox.clone().run_housekeeping(
            config.outbox_retention,
            config.idempotency_retention,
            stop.clone(),
        ));
        let readiness: ops::Readiness = {
            let (ready, stop) = (ready.clone(), stop.clone());
            Arc::new(move || ready.load(Ordering::Relaxed) && !stop.is_cancelled())
        };
        let ops_server = tokio::spawn(ops::serve(
            ops_listener,
            ops::router(registry, readiness),
            stop.clone().cancelled_owned(),
        ));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(orders_contract::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Config(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(orders_contract::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Config(format!("reflection: {e}")))?;
        let max_in_flight = usize::try_from(config.max_concurrent_calls).unwrap_or(usize::MAX);
        let api = OrderApi::new(
            store.clone(),
            outbox.clone(),
            metrics.clone(),
            config.ce_source.clone(),
            config.idempotency_retention,
            max_in_flight,
        )
        .with_auth(auth);
        let max_message = usize::try_from(config.grpc_max_message_bytes).unwrap_or(usize::MAX);
        let orders = OrderServiceServer::new(api).max_decoding_message_size(max_message);

        // On shutdown: NOT_SERVING first, so balancers stop routing here, then
        // the server stops accepting and drains what is in flight.
        let (drain_started_tx, drain_started) = tokio::sync::oneshot::channel::<()>();
        let signal = {
            let (reporter, ready, stop) = (reporter.clone(), ready.clone(), stop.clone());
            async move {
                shutdown.await;
                tracing::info!("shutting down: health NOT_SERVING, draining in-flight calls");
                ready.store(false, Ordering::Relaxed);
                stop.cancel();
                set_health(&reporter, ServingStatus::NotServing).await;
                let _ = drain_started_tx.send(());
            }
        };
        tracing::info!(grpc_addr = %grpc_listener.local_addr().map_err(io("GRPC_ADDR"))?, metrics_addr = %config.service.metrics_addr, "order-svc serving");
        // TCP_NODELAY: a unary answer is one small write; Nagle would hold it
        // back waiting for the client's ACK.
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let server = builder
            .timeout(config.grpc_request_timeout)
            .layer(GrpcMetricsLayer::new(metrics))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(orders)
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(server);
        let grace = config.service.shutdown_grace;
        let served = tokio::select! {
            result = &mut server => result.map_err(Error::from),
            () = async { let _ = drain_started.await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "in-flight calls did not finish within the grace period; abandoning them");
                Ok(())
            }
        };
        stop.cancel();

        let _ = relay.await;
        match publisher.flush(grace).await {
            Ok(()) => tracing::info!("producer flushed"),
            Err(error) => {
                tracing::warn!(%error, "producer flush incomplete; the outbox sends the rest after a restart")
            }
        }
        // Let the acknowledgements of the flush reach the marker.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_marker.cancel();
        let _ = marker.await;
        let _ = housekeeping.await;
        let _ = monitor.await;
        store.close().await;
        if let Ok(Err(error)) = ops_server.await {
            tracing::warn!(%error, "operations server failed");
        }
        tracing::info!("order-svc stopped");
        served
    }
}

/// The gRPC server's TLS settings, if GRPC_TLS_CERT and GRPC_TLS_KEY are set;
/// with GRPC_TLS_CLIENT_CA, clients must present a certificate it signed.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, Error> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", path.display())))
    };
    let (Some(cert), Some(key)) = (&config.grpc_tls_cert, &config.grpc_tls_key) else {
        if config.grpc_tls_client_ca.is_some() {
            return Err(Error::Config(
                "GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY".into(),
            ));
        }
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("GRPC_TLS_CERT", cert)?,
        read("GRPC_TLS_KEY", key)?,
    ));
    if let Some(ca) = &config.grpc_tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("GRPC_TLS_CLIENT_CA", ca)?));
    }
    Ok(Some(tls))
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Keeps health and readiness in step with the store: SERVING while it
/// answers, NOT_SERVING when it does not. The broker's absence does not make
/// the service unready (orders wait in the outbox); it shows in
/// `outbox_pending`, `outbox_oldest_age_seconds` and the log.
async fn monitor_store(store: Arc<Store>, reporter: HealthReporter, ready: Arc<AtomicBool>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
        let check = tokio::time::timeout(HEALTH_TIMEOUT, store.ping()).await;
        if stop.is_cancelled() {
            return;
        }
        let healthy = matches!(check, Ok(Ok(())));
        let was = ready.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            match check {
                Ok(Err(error)) => tracing::warn!(%error, "order store unreachable: NOT_SERVING"),
                Err(_) => tracing::warn!("order store did not answer within {HEALTH_TIMEOUT:?}: NOT_SERVING"),
                Ok(Ok(())) => tracing::info!("order store reachable again: SERVING"),
            }
            let status = if healthy {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&reporter, status).await;
        }
    }
}
