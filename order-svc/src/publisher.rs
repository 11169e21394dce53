//! Publishes outbox records to Kafka and reports the broker's answer.
//!
//! The producer is idempotent with `acks=all`, so an acknowledged record is on
//! every in-sync replica exactly once per send. Every record is answered
//! within `PUBLISH_TIMEOUT` (librdkafka's `message.timeout.ms`); a record
//! that was not acknowledged stays in the outbox and is sent again (same
//! bytes, same event id). Broker outages are the idempotent producer's own
//! business (it retries, and bumps its epoch after a timed-out record). What
//! it cannot recover from is its *fatal* state (for example a sequence gap the
//! broker refuses): every send then fails at once. So a fatal producer
//! *generation* is replaced by a fresh one, with a new producer id; the old
//! one is dropped (its queue purged) once the last send using it is answered.

use std::{
    future::Future,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
};

use crate::{metrics::Metrics, producer::AckProducer, store::OutboxRecord};

/// Producer defaults; `KAFKA_OPTIONS` overrides any of them.
///
/// - `acks=all` + idempotence: an acknowledged record is durable and never
///   duplicated by the producer's own retries.
/// - `linger.ms=0`: the service answers each call as soon as the broker acks,
///   so batching delay would be paid by every caller; under load, records still
///   batch while earlier requests are in flight (measured in BENCHMARKS.md).
/// - `max.in.flight.requests.per.connection=2`: at most two ProduceRequests
///   on the wire at a time; records produced meanwhile go out together in the
///   next one. librdkafka sends one request per partition, so with the
///   default window (5 with idempotence) and `linger.ms=0` concurrent calls
///   are split into many small requests that the broker serves one after
///   another, and librdkafka's broker thread spins (`poll()` with a zero
///   timeout) while the window is full. A narrow window batches concurrent
///   calls instead; two lets two partitions' batches overlap their round
///   trips at the same single-call latency, and a wider one is slower again
///   (the measurements are in BENCHMARKS.md's history). Ordering and
///   idempotence are unchanged.
/// - `message.timeout.ms` = `PUBLISH_TIMEOUT`: every record gets its answer
///   within it (acknowledged or failed); a failed one stays in the outbox and
///   is sent again, so librdkafka need not hold it through a long outage.
/// - `queue.buffering.max.messages` = `MAX_CONCURRENT_CALLS`: a call that times
///   out or that its client abandons leaves its record queued, so the bound on
///   calls in flight would not bound the queue during an outage; with this
///   one it does, and a call that finds the queue full is shed.
pub fn producer_defaults(publish_timeout: Duration, max_concurrent_calls: u64) -> Vec<(&'static str, String)> {
    vec![
        ("acks", "all".into()),
        ("queue.buffering.max.messages", max_concurrent_calls.to_string()),
        ("enable.idempotence", "true".into()),
        ("linger.ms", "0".into()),
        ("max.in.flight.requests.per.connection", "2".into()),
        ("socket.nagle.disable", "true".into()),
        ("message.timeout.ms", publish_timeout.as_millis().to_string()),
        ("reconnect.backoff.ms", "50".into()),
        ("reconnect.backoff.max.ms", "1000".into()),
    ]
}

/// What kind of failure a [`PublishError`] is, for the caller's status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    /// The broker is unreachable or slow: retry later, with the same request_id.
    Unavailable,
    /// The local queue is full: shed load.
    Overloaded,
    /// The broker refused this record (too large, not authorized, ...).
    Rejected,
}

/// A record that was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No acknowledgement within the deadline.
    #[error("Kafka did not acknowledge the event within {0:?}")]
    Timeout(Duration),
    /// The producer's local queue is full.
    #[error("the Kafka producer queue is full")]
    QueueFull,
    /// The client or the broker reported an error.
    #[error("Kafka refused the event: {0}")]
    Kafka(KafkaError),
    /// The producer was shut down while the record was queued.
    #[error("the Kafka producer was shut down before the event was acknowledged")]
    Canceled,
}

impl PublishError {
    /// How the caller should treat it.
    pub fn kind(&self) -> PublishErrorKind {
        match self {
            PublishError::Timeout(_) | PublishError::Canceled => PublishErrorKind::Unavailable,
            PublishError::QueueFull => PublishErrorKind::Overloaded,
            PublishError::Kafka(e) => match e.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidRecord,
                ) => PublishErrorKind::Rejected,
                _ => PublishErrorKind::Unavailable,
            },
        }
    }
}

/// One producer instance; replaced as a whole when it turns fatal.
struct Generation {
    id: u64,
    producer: Option<AckProducer>,
}

impl Generation {
    fn producer(&self) -> &AckProducer {
        self.producer.as_ref().expect("present until drop")
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Dropping a producer purges its queue and may block briefly: keep it
        // off the async workers.
        if let Some(producer) = self.producer.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn_blocking(move || drop(producer));
                }
                Err(_) => drop(producer),
            }
        }
    }
}

/// Publishes records to one topic.
pub struct Publisher {
    config: ClientConfig,
    topic: String,
    deadline: Duration,
    current: RwLock<Arc<Generation>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl Publisher {
    /// Creates the first producer generation. No network traffic yet.
    pub fn new(
        config: ClientConfig,
        topic: String,
        deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let producer = AckProducer::new(&config)?;
        Ok(Self {
            config,
            topic,
            deadline,
            current: RwLock::new(Arc::new(Generation {
                id: 0,
                producer: Some(producer),
            })),
            metrics,
        })
    }

    fn current(&self) -> Arc<Generation> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current producer, for metadata checks.
    pub fn producer(&self) -> AckProducer {
        self.current().producer().clone()
    }

    /// Replaces `generation` with a new producer if librdkafka has put it in
    /// its fatal state (unless that happened already).
    fn replace_if_fatal(&self, generation: &Generation) {
        let Some((code, reason)) = generation.producer().client().fatal_error() else {
            return;
        };
        let failed = generation.id;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.id != failed {
            return;
        }
        match AckProducer::new(&self.config) {
            Ok(producer) => {
                tracing::warn!(
                    generation = failed + 1,
                    error = ?code,
                    reason,
                    "replacing the Kafka producer: the old one is in its fatal state"
                );
                *current = Arc::new(Generation {
                    id: failed + 1,
                    producer: Some(producer),
                });
            }
            Err(error) => {
                tracing::error!(%error, "cannot create a new Kafka producer; keeping the old one")
            }
        }
    }

    /// Hands an outbox record to the producer and returns the broker's
    /// answer to come, without a deadline of its own: librdkafka answers
    /// every record, at the latest when `message.timeout.ms`
    /// (`PUBLISH_TIMEOUT`) has passed. The answer is counted in
    /// `kafka_produce_seconds` / `kafka_produce_errors_total`.
    pub fn send(
        self: &Arc<Self>,
        record: &OutboxRecord,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + use<>, PublishError> {
        let generation = self.current();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let started = Instant::now();
        let ack = match generation
            .producer()
            .send(&self.topic, &record.key, &record.value, headers)
        {
            Ok(ack) => ack,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                self.metrics.produce_errors.inc();
                return Err(PublishError::QueueFull);
            }
            Err(error) => {
                self.metrics.produce_errors.inc();
                self.replace_if_fatal(&generation);
                return Err(PublishError::Kafka(error));
            }
        };
        let metrics = self.metrics.clone();
        let this = self.clone();
        Ok(async move {
            let result = ack.await;
            metrics.produce_seconds.observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => Ok(()),
                Err(error) => {
                    metrics.produce_errors.inc();
                    this.replace_if_fatal(&generation);
                    Err(match error {
                        KafkaError::Canceled => PublishError::Canceled,
                        other => PublishError::Kafka(other),
                    })
                }
            }
        })
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }
}
