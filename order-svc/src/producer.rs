//! A Kafka producer whose sends return a future of the broker's answer.
//!
//! rdkafka's [`ThreadedProducer`] serves librdkafka's delivery reports on its
//! own polling thread; [`AckContext`] completes each record's [`Ack`] from
//! there. order-svc's publisher and the benchmark's "tonic + produce"
//! ceiling both use it, so the ceiling measures the same produce path.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext,
    client::Client,
    config::FromClientConfigAndContext,
    error::{KafkaError, KafkaResult},
    message::{OwnedHeaders, ToBytes},
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer},
};
use tokio::sync::oneshot;

/// Delivers each record's outcome to its [`Ack`].
#[derive(Debug, Default)]
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<oneshot::Sender<KafkaResult<()>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.clone()),
        };
        let _ = ack.send(outcome);
    }
}

/// The broker's answer for one record: `Ok` once acknowledged,
/// `Err(KafkaError::Canceled)` if the producer went away first.
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<KafkaResult<()>>);

impl Future for Ack {
    type Output = KafkaResult<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(KafkaError::Canceled)))
    }
}

/// An idempotent-capable producer whose acknowledgements are futures. Cheap
/// to clone; the last clone dropped stops its polling thread and purges its
/// queue (which may block briefly).
#[derive(Clone)]
pub struct AckProducer(Arc<ThreadedProducer<AckContext>>);

impl std::fmt::Debug for AckProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckProducer").finish_non_exhaustive()
    }
}

impl AckProducer {
    /// Creates the producer and its polling thread.
    pub fn new(config: &ClientConfig) -> KafkaResult<Self> {
        Ok(Self(Arc::new(ThreadedProducer::from_config_and_context(
            config, AckContext,
        )?)))
    }

    /// Queues `payload` under `key` with `headers` for `topic`; the returned
    /// [`Ack`] resolves with the broker's answer. Fails at once if the record
    /// cannot be queued (e.g. `QueueFull`).
    pub fn send<K, P>(&self, topic: &str, key: &K, payload: &P, headers: OwnedHeaders) -> KafkaResult<Ack>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (tx, rx) = oneshot::channel();
        let record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .key(key)
            .payload(payload)
            .headers(headers);
        match self.0.send(record) {
            Ok(()) => Ok(Ack(rx)),
            Err((error, _record)) => Err(error),
        }
    }

    /// The underlying client, for metadata requests.
    pub fn client(&self) -> &Client<AckContext> {
        self.0.client()
    }

    /// Waits up to `timeout` for every queued record to be answered
    /// (blocking: call from a blocking thread).
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.0.flush(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer whose broker never answers: nothing listens on port 1.
    fn unreachable(message_timeout_ms: &str) -> AckProducer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", message_timeout_ms)
            .set("queue.buffering.max.messages", "1");
        AckProducer::new(&config).expect("a valid configuration")
    }

    #[tokio::test]
    async fn an_unanswered_record_fails_its_ack_when_its_timeout_passes() {
        let producer = unreachable("200");
        let ack = producer.send("t", "key", "value", OwnedHeaders::new()).expect("queued");
        let outcome = tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("answered within the message timeout");
        assert!(matches!(outcome, Err(KafkaError::MessageProduction(_))), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_full_queue_fails_the_send_at_once() {
        let producer = unreachable("60000");
        let _first = producer.send("t", "key", "value", OwnedHeaders::new()).expect("queued");
        let second = producer.send("t", "key", "value", OwnedHeaders::new());
        assert!(
            matches!(
                second,
                Err(KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull
                ))
            ),
            "{second:?}"
        );
    }

    #[tokio::test]
    async fn dropping_the_producer_answers_queued_records() {
        let producer = unreachable("60000");
        let ack = producer.send("t", "key", "value", OwnedHeaders::new()).expect("queued");
        tokio::task::spawn_blocking(move || drop(producer))
            .await
            .expect("dropped");
        let outcome = tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("answered once the producer is gone");
        assert!(outcome.is_err(), "{outcome:?}");
    }
}
