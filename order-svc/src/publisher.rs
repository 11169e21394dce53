//! Publishes event records to Kafka and waits for the broker's acknowledgement.
//!
//! The producer is idempotent with `acks=all`, so an acknowledged record is on
//! every in-sync replica exactly once. Every publish has a deadline
//! (`PUBLISH_TIMEOUT`): past it the caller gets [`Kind::Unavailable`] while
//! the record stays queued, so a timed-out call may still be published (a
//! retry with the same `request_id` is safe: same order, same event id).
//! Timeouts and broker outages are the idempotent producer's own business
//! (it retries, and bumps its epoch after a timed-out record). What it cannot
//! recover from is its *fatal* state (for example a sequence gap the broker
//! refuses): every send then fails at once. So a fatal producer *generation*
//! is replaced by a fresh one, with a new producer id; the old one is dropped
//! (its queue purged) once the last call using it has returned.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use orders_contract::envelope::Record;
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
};

use crate::{metrics::Metrics, producer::AckProducer};

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
///   were split into many small requests that the broker serves one after
///   another, and librdkafka's broker thread spun (`poll()` with a zero
///   timeout) while the window was full. A window of 1 gave +60% calls/s at
///   64 concurrent calls over 5; 2 gives another +7-9% at 64 and 256
///   concurrent calls (two partitions' batches overlap their round trips)
///   with the same single-call latency, and 3 was slower again (3 partitions,
///   BENCHMARKS.md). Ordering and idempotence are unchanged.
/// - `message.timeout.ms` well above `PUBLISH_TIMEOUT`: the service's own
///   deadline answers callers; librdkafka's must not fire first (see module docs).
/// - `queue.buffering.max.messages` = `MAX_CONCURRENT_CALLS`: a call that times
///   out or that its client abandons leaves its record queued, so the bound on
///   calls in flight would not bound the queue during an outage; with this
///   one it does, and a call that finds the queue full is shed.
pub fn producer_defaults(publish_timeout: Duration, max_concurrent_calls: u64) -> Vec<(&'static str, String)> {
    let message_timeout = (publish_timeout * 6).max(Duration::from_secs(30));
    vec![
        ("acks", "all".into()),
        ("queue.buffering.max.messages", max_concurrent_calls.to_string()),
        ("enable.idempotence", "true".into()),
        ("linger.ms", "0".into()),
        ("max.in.flight.requests.per.connection", "2".into()),
        ("socket.nagle.disable", "true".into()),
        ("message.timeout.ms", message_timeout.as_millis().to_string()),
        ("reconnect.backoff.ms", "50".into()),
        ("reconnect.backoff.max.ms", "1000".into()),
    ]
}

/// What kind of failure a [`PublishError`] is, for the caller's status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
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
    pub fn kind(&self) -> Kind {
        match self {
            PublishError::Timeout(_) | PublishError::Canceled => Kind::Unavailable,
            PublishError::QueueFull => Kind::Overloaded,
            PublishError::Kafka(e) => match e.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidRecord,
                ) => Kind::Rejected,
                _ => Kind::Unavailable,
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

    /// Sends `record` with the extra `headers` and waits for the broker's
    /// acknowledgement, at most the deadline.
    pub async fn publish(&self, record: &Record, extra_headers: &[(&str, String)]) -> Result<(), PublishError> {
        let started = Instant::now();
        let result = self.try_publish(record, extra_headers).await;
        self.metrics.produce_seconds.observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.produce_errors.inc();
        }
        result
    }

    async fn try_publish(&self, record: &Record, extra_headers: &[(&str, String)]) -> Result<(), PublishError> {
        let generation = self.current();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + extra_headers.len());
        for (key, value) in record
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_ref()))
            .chain(extra_headers.iter().map(|(k, v)| (*k, v.as_str())))
        {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let delivery = match generation
            .producer()
            .send(&self.topic, &record.key, &record.value, headers)
        {
            Ok(delivery) => delivery,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                return Err(PublishError::QueueFull);
            }
            Err(error) => {
                self.replace_if_fatal(&generation);
                return Err(PublishError::Kafka(error));
            }
        };
        match tokio::time::timeout(self.deadline, delivery).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(KafkaError::Canceled)) => Err(PublishError::Canceled),
            Ok(Err(error)) => {
                self.replace_if_fatal(&generation);
                Err(PublishError::Kafka(error))
            }
            Err(_elapsed) => Err(PublishError::Timeout(self.deadline)),
        }
    }

    /// Waits up to `timeout` for queued records to be delivered.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }
}
