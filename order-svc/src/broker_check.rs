//! The start-up broker check: a broker that answers and says the
//! configuration is wrong (no such topic, authentication or TLS refused)
//! stops the start; a broker that does not answer within
//! `KAFKA_STARTUP_TIMEOUT` does not, because the outbox holds the events
//! until it returns (availability follows the store, not the broker).

use std::{sync::Mutex, time::Duration};

use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseProducer, DeliveryResult, Producer, ProducerContext},
};
use service_kit::kafka::{self, CheckError};

use crate::error::Error;

/// What the broker said at start-up.
#[derive(Debug)]
pub enum BrokerAtStart {
    /// It answered and has the topic, with this many partitions.
    Ready(usize),
    /// It did not answer in time; the service starts anyway.
    Unreachable(CheckError),
}

/// Records the first error librdkafka reports that no retry can cure: the
/// metadata request itself only says it timed out, the reason arrives as an
/// error event.
#[derive(Debug, Default)]
struct Refusals(Mutex<Option<String>>);

impl ClientContext for Refusals {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_refusal(&error) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| format!("{error} ({reason})"));
        } else {
            tracing::debug!(%error, reason, "Kafka client error during the start-up check");
        }
    }
}

impl ProducerContext for Refusals {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Errors that say the broker is there but refuses this configuration.
fn is_refusal(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    )
}

/// Asks the broker for `topic` with a short-lived client of the producer's
/// configuration (its own, so its error events are read here and not by the
/// publisher's queue). Blocking: call from `spawn_blocking`.
pub fn check(config: &ClientConfig, brokers: &str, topic: &str, timeout: Duration) -> Result<BrokerAtStart, Error> {
    let client: BaseProducer<Refusals> = config.create_with_context(Refusals::default())?;
    match kafka::check_topic(client.client(), brokers, topic, timeout) {
        Ok(partitions) => Ok(BrokerAtStart::Ready(partitions)),
        Err(missing @ CheckError::MissingTopic { .. }) => Err(missing.into()),
        Err(unreachable @ CheckError::Unreachable { .. }) => {
            // Serve the error events the failed request left queued.
            client.poll(Duration::from_millis(200));
            let refused = client.context().0.lock().unwrap_or_else(|e| e.into_inner()).take();
            match refused {
                Some(reason) => Err(Error::KafkaRefused {
                    brokers: brokers.to_owned(),
                    reason,
                }),
                None => Ok(BrokerAtStart::Unreachable(unreachable)),
            }
        }
    }
}
