//! The dead-letter topic: records that cannot be handled are published there
//! with their original key, value and headers, plus headers saying where they
//! came from and why they failed. A record is only let go of (its offset
//! stored) once the dead-letter topic has acknowledged it.
//!
//! The original's own `dlq.*` headers are not copied: a reader of a dead
//! letter's `dlq.*` headers reads only what notify-svc wrote, whatever the
//! producer of the original put in its record.

use std::time::Duration;

use rdkafka::{
    ClientConfig, ClientContext,
    error::KafkaError,
    message::{Header, Headers, Message, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
};

use crate::consumer::{ERROR_LOG_INTERVAL, Throttled};

/// Header names added to a dead-lettered record.
pub mod header {
    /// The prefix of every header below; headers of the original with it are
    /// left out of its dead letter.
    pub const PREFIX: &str = "dlq.";
    /// Topic the record was consumed from.
    pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    /// Short error class, e.g. `malformed`, `unknown_type`, `retries_exhausted`.
    pub const ERROR_CLASS: &str = "dlq.error.class";
    /// Human-readable reason.
    pub const ERROR_MESSAGE: &str = "dlq.error.message";
    /// Notification attempts made (0 when it never got that far).
    pub const ATTEMPTS: &str = "dlq.attempts";
    /// When it was dead-lettered, RFC 3339.
    pub const FAILED_AT: &str = "dlq.failed.at";
    /// Present only when the record was too large for the dead-letter topic:
    /// what was left out (`value` or `value,headers`) and the original size.
    /// The record itself is still at its original topic, partition and offset.
    pub const OMITTED: &str = "dlq.omitted";
}

/// Why a record is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Short stable class (also the metric's `reason` label).
    pub class: &'static str,
    /// What happened.
    pub message: String,
    /// Notification attempts made.
    pub attempts: u32,
}

/// Producer defaults for the dead-letter topic: idempotent with `acks=all`,
/// like order-svc's, so the producer's own retries neither duplicate nor
/// reorder dead letters.
pub const PRODUCER_DEFAULTS: [(&str, &str); 4] = [
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("message.timeout.ms", "10000"),
    ("linger.ms", "5"),
];

/// The dead-letter producer's callbacks: client errors (an unreachable
/// broker, say) are logged at most every few seconds, not on every reconnect.
#[derive(Debug)]
pub struct DeadLetterCtx {
    errors: Throttled,
}

impl ClientContext for DeadLetterCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(suppressed) = self.errors.check() {
            tracing::warn!(%error, reason, suppressed, "dead-letter producer error; the client keeps reconnecting");
        }
    }
}

/// Publishes dead letters.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer<DeadLetterCtx>,
    topic: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").field("topic", &self.topic).finish()
    }
}

impl DeadLetters {
    /// A dead-letter publisher to `topic`.
    pub fn new(config: &ClientConfig, topic: String) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: config.create_with_context(DeadLetterCtx {
                errors: Throttled::new(ERROR_LOG_INTERVAL),
            })?,
            topic,
        })
    }

    /// The producer, for start-up checks.
    pub fn producer(&self) -> &FutureProducer<DeadLetterCtx> {
        &self.producer
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes `original` with `failure`'s headers; Ok once acknowledged.
    ///
    /// A record too large for the dead-letter topic (the client's or the
    /// broker's `message.max.bytes`) is published without its value, and then
    /// also without its original headers, saying so in [`header::OMITTED`]:
    /// refusing it for good would block its partition forever.
    pub async fn publish(&self, original: &OwnedMessage, failure: &Failure) -> Result<(), KafkaError> {
        let mut result = Ok(());
        for trim in [Trim::Nothing, Trim::Value, Trim::ValueAndHeaders] {
            result = self.publish_trimmed(original, failure, trim).await;
            match &result {
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                    tracing::warn!(
                        size = original.payload().map_or(0, <[u8]>::len),
                        ?trim,
                        "dead letter too large for the dead-letter topic; trimming it"
                    );
                }
                _ => return result,
            }
        }
        result
    }

    async fn publish_trimmed(&self, original: &OwnedMessage, failure: &Failure, trim: Trim) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        if let (Some(h), false) = (original.headers(), trim == Trim::ValueAndHeaders) {
            for header in h.iter().filter(|h| !is_dead_letter_header(h.key)) {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        let failed_at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let partition = original.partition().to_string();
        let offset = original.offset().to_string();
        let attempts = failure.attempts.to_string();
        for (key, value) in [
            (header::ORIGINAL_TOPIC, original.topic()),
            (header::ORIGINAL_PARTITION, partition.as_str()),
            (header::ORIGINAL_OFFSET, offset.as_str()),
            (header::ERROR_CLASS, failure.class),
            (header::ERROR_MESSAGE, failure.message.as_str()),
            (header::ATTEMPTS, attempts.as_str()),
            (header::FAILED_AT, failed_at.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let omitted = match trim {
            Trim::Nothing => None,
            Trim::Value => Some(format!("value; {} bytes", original.payload().map_or(0, <[u8]>::len))),
            Trim::ValueAndHeaders => Some(format!(
                "value,headers; {} bytes",
                original.payload().map_or(0, <[u8]>::len)
            )),
        };
        if let Some(omitted) = &omitted {
            headers = headers.insert(Header {
                key: header::OMITTED,
                value: Some(omitted.as_bytes()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(key) = original.key() {
            record = record.key(key);
        }
        if let (Some(value), Trim::Nothing) = (original.payload(), trim) {
            record = record.payload(value);
        }
        match tokio::time::timeout(
            Duration::from_secs(15),
            self.producer.send(record, Duration::from_secs(1)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(error),
            Err(_) => Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)),
        }
    }
}

/// Whether `key` is in the dead-letter headers' namespace (compared without
/// regard to ASCII case, as some readers look headers up).
fn is_dead_letter_header(key: &str) -> bool {
    key.get(..header::PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(header::PREFIX))
}

/// How much of a record is left out of its dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trim {
    Nothing,
    Value,
    ValueAndHeaders,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_dead_letter_namespace_is_left_out() {
        for key in ["dlq.error.class", "DLQ.error.class", "dlq.", "Dlq.x"] {
            assert!(is_dead_letter_header(key), "{key}");
        }
        for key in ["ce_id", "traceparent", "dlq", "dl", "", "x.dlq.error.class", "é"] {
            assert!(!is_dead_letter_header(key), "{key}");
        }
    }
}
