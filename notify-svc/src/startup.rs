//! Wiring: [`Application::build`] checks the broker and both topics, creates
//! the consumer, the dead-letter producer and the sink, and binds the
//! operations listener; [`Application::run_until_stopped`] consumes until the
//! injected shutdown future resolves, then stops fetching, finishes records in
//! hand, commits and leaves the group.

use std::{future::Future, net::SocketAddr, num::NonZeroUsize, sync::Arc};

use prometheus_client::registry::Registry;
use service_kit::{kafka, ops};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    consumer::{ConsumerHealth, Pipeline, consumer_defaults},
    dead_letter::{self, DeadLetters},
    dedup::Dedup,
    error::Error,
    metrics::Metrics,
    notifier::{LogSink, Notifier, Webhook},
    processor::Processor,
    retry::RetryPolicy,
};

/// A built, not yet consuming notify-svc.
#[derive(Debug)]
pub struct Application {
    config: Config,
    pipeline: Pipeline,
    ops_listener: TcpListener,
    registry: Arc<Registry>,
    health: Arc<ConsumerHealth>,
}

impl Application {
    /// Checks that the broker answers and both topics exist, creates the
    /// clients and the sink, and binds the operations listener.
    pub async fn build(config: Config) -> Result<Self, Error> {
        for (name, value) in [
            ("ORDERS_TOPIC", &config.orders_topic),
            ("DLQ_TOPIC", &config.dlq_topic),
            ("KAFKA_GROUP_ID", &config.kafka_group_id),
        ] {
            if value.trim().is_empty() {
                return Err(Error::Config(format!("{name} must not be empty")));
            }
        }
        if config.dlq_topic == config.orders_topic {
            return Err(Error::Config("DLQ_TOPIC must differ from ORDERS_TOPIC".into()));
        }
        if config.retry_initial_delay > config.retry_max_delay {
            return Err(Error::Config(
                "RETRY_INITIAL_DELAY must not exceed RETRY_MAX_DELAY".into(),
            ));
        }
        // At-least-once rests on storing offsets only after handling.
        if config
            .kafka
            .options
            .0
            .iter()
            .any(|(k, v)| k == "enable.auto.offset.store" && !v.eq_ignore_ascii_case("false"))
        {
            return Err(Error::Config(
                "KAFKA_OPTIONS must not set enable.auto.offset.store: notify-svc stores each offset after its record is handled"
                    .into(),
            ));
        }
        if config.notify_webhook_timeout.is_zero() {
            return Err(Error::Config("NOTIFY_WEBHOOK_TIMEOUT must be more than 0".into()));
        }
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let health = Arc::new(ConsumerHealth::default());

        let notifier = match &config.notify_webhook_url {
            Some(url) => {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(Error::Config(format!(
                        "NOTIFY_WEBHOOK_URL must be http(s), got {}",
                        url.scheme()
                    )));
                }
                Notifier::Webhook(Webhook::new(url.clone(), config.notify_webhook_timeout)?)
            }
            None => Notifier::Log(LogSink::new(config.service.log_format)),
        };
        config.kafka.security.validate().map_err(Error::Config)?;
        let dlq_config = config
            .kafka
            .client_config(kafka::Role::Producer, dead_letter::PRODUCER_DEFAULTS);
        let dead_letters =
            DeadLetters::new(&dlq_config, config.dlq_topic.clone())?.with_spring_headers(config.dlq_spring_headers);
        let retry = RetryPolicy {
            max_attempts: config.retry_max_attempts,
            initial_delay: config.retry_initial_delay,
            max_delay: config.retry_max_delay,
        };
        let dedup = Dedup::new(NonZeroUsize::new(config.dedup_cache_size as usize).unwrap_or(NonZeroUsize::MIN));
        let processor = Arc::new(Processor::new(
            notifier.clone(),
            dead_letters.clone(),
            dedup,
            retry,
            metrics.clone(),
            config.max_record_bytes as usize,
        ));
        let consumer_config = config
            .kafka
            .client_config(kafka::Role::Consumer, consumer_defaults(&config.kafka_group_id));
        let pipeline = Pipeline::new(
            &consumer_config,
            processor,
            metrics,
            health.clone(),
            config.partition_buffer as usize,
            usize::try_from(config.partition_buffer_bytes).unwrap_or(usize::MAX),
        )?;

        // Both topics must exist: the consumer's and the one failures go to.
        let producer = dead_letters.producer().clone();
        let (brokers, orders, dlq, timeout) = (
            config.kafka.brokers.clone(),
            config.orders_topic.clone(),
            config.dlq_topic.clone(),
            config.kafka.startup_timeout,
        );
        let partitions = tokio::task::spawn_blocking(move || {
            let client = rdkafka::producer::Producer::client(&producer);
            let partitions = kafka::check_topic(client, &brokers, &orders, timeout)?;
            kafka::check_topic(client, &brokers, &dlq, timeout)?;
            Ok::<_, kafka::CheckError>(partitions)
        })
        .await
        .map_err(|e| Error::Config(format!("broker check panicked: {e}")))??;
        tracing::info!(
            brokers = %config.kafka.brokers,
            topic = %config.orders_topic,
            partitions,
            dlq = %config.dlq_topic,
            group = %config.kafka_group_id,
            sink = notifier.kind(),
            "Kafka is reachable"
        );

        let ops_listener = TcpListener::bind(config.service.metrics_addr)
            .await
            .map_err(|source| Error::Io {
                context: format!("cannot bind METRICS_ADDR {}", config.service.metrics_addr),
                source,
            })?;
        Ok(Self {
            config,
            pipeline,
            ops_listener,
            registry: Arc::new(registry),
            health,
        })
    }

    /// The bound operations HTTP address.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_listener.local_addr().expect("a bound listener has an address")
    }

    /// Consumes until `shutdown` resolves, then stops cleanly.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let Application {
            config,
            pipeline,
            ops_listener,
            registry,
            health,
        } = self;
        let stop = CancellationToken::new();
        let readiness: ops::Readiness = {
            let (health, stop) = (health.clone(), stop.clone());
            Arc::new(move || health.ready() && !stop.is_cancelled())
        };
        let ops_stopped = CancellationToken::new();
        let ops_server = tokio::spawn(ops::serve(
            ops_listener,
            ops::router(registry, readiness),
            ops_stopped.clone().cancelled_owned(),
        ));
        tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down");
                stop.cancel();
            }
        });
        tracing::info!(metrics_addr = %config.service.metrics_addr, "notify-svc consuming");
        let result = pipeline
            .run(&config.orders_topic, stop, config.service.shutdown_grace)
            .await;
        ops_stopped.cancel();
        if let Ok(Err(error)) = ops_server.await {
            tracing::warn!(%error, "operations server failed");
        }
        tracing::info!("notify-svc stopped");
        Ok(result?)
    }
}
