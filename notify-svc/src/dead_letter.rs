//! The dead-letter topic: records that cannot be handled are published there
//! with their original key, value and headers, plus headers saying where they
//! came from and why they failed. A record is only let go of (its offset
//! stored) once the dead-letter topic has acknowledged it.
//!
//! The original's own `dlq.*` headers are not copied: a reader of a dead
//! letter's `dlq.*` headers reads only what notify-svc wrote, whatever the
//! producer of the original put in its record. That includes the
//! `dlq.redriven.*` headers `orderctl dlq redrive` puts on a record it sends
//! back: a redriven record that fails again gets a fresh set of headers.
//!
//! With `DLQ_SPRING_HEADERS` the same context is also written under the names
//! Spring for Apache Kafka's `DeadLetterPublishingRecoverer` uses
//! ([`header::spring`]), in its encodings, so Spring-based tooling reads our
//! dead letters.

use std::time::Duration;

use rdkafka::{
    ClientConfig, ClientContext,
    error::KafkaError,
    message::{Header, Headers, Message, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
};

use crate::throttle::{ERROR_LOG_INTERVAL, Throttled};

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

    /// Spring for Apache Kafka's names (`KafkaHeaders.DLT_*`), written beside
    /// ours when `DLQ_SPRING_HEADERS` is on, in Spring's encodings: text is
    /// UTF-8, the partition a 4-byte and the offset an 8-byte big-endian
    /// two's-complement integer (Java's `ByteBuffer.putInt`/`putLong`).
    pub mod spring {
        /// The prefix of every header below; headers of the original with it
        /// are left out of its dead letter when these are written.
        pub const PREFIX: &str = "kafka_dlt-";
        /// Same as [`super::ORIGINAL_TOPIC`] (UTF-8).
        pub const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
        /// Same as [`super::ORIGINAL_PARTITION`] (4 bytes, big-endian).
        pub const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
        /// Same as [`super::ORIGINAL_OFFSET`] (8 bytes, big-endian).
        pub const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
        /// Same as [`super::ERROR_CLASS`] (UTF-8): Spring puts the Java
        /// exception's class name here; we put our error class.
        pub const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
        /// Same as [`super::ERROR_MESSAGE`] (UTF-8).
        pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
    }
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
    spring_headers: bool,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .field("spring_headers", &self.spring_headers)
            .finish()
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
            spring_headers: false,
        })
    }

    /// Also writes Spring's header names ([`header::spring`]) when `on`.
    pub fn with_spring_headers(mut self, on: bool) -> Self {
        self.spring_headers = on;
        self
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
            for header in h
                .iter()
                .filter(|h| !(is_dead_letter_header(h.key) || (self.spring_headers && is_spring_header(h.key))))
            {
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
        if self.spring_headers {
            headers = spring_headers(headers, original, failure);
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

/// Whether `key` is one of Spring's dead-letter headers (ASCII case ignored).
fn is_spring_header(key: &str) -> bool {
    key.get(..header::spring::PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(header::spring::PREFIX))
}

/// Adds Spring's names for where `original` came from and why it failed, in
/// Spring's encodings.
fn spring_headers(headers: OwnedHeaders, original: &OwnedMessage, failure: &Failure) -> OwnedHeaders {
    let partition = original.partition().to_be_bytes();
    let offset = original.offset().to_be_bytes();
    [
        (header::spring::ORIGINAL_TOPIC, original.topic().as_bytes()),
        (header::spring::ORIGINAL_PARTITION, &partition[..]),
        (header::spring::ORIGINAL_OFFSET, &offset[..]),
        (header::spring::EXCEPTION_FQCN, failure.class.as_bytes()),
        (header::spring::EXCEPTION_MESSAGE, failure.message.as_bytes()),
    ]
    .into_iter()
    .fold(headers, |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    })
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

    #[test]
    fn spring_headers_use_springs_names_and_encodings() {
        use rdkafka::Timestamp;
        let original = OwnedMessage::new(
            Some(b"v".to_vec()),
            Some(b"k".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            3,
            258,
            None,
        );
        let failure = Failure {
            class: "notify_permanent",
            message: "webhook answered 422".into(),
            attempts: 1,
        };
        let headers = spring_headers(OwnedHeaders::new(), &original, &failure);
        let got: Vec<(&str, Vec<u8>)> = headers
            .iter()
            .map(|h| (h.key, h.value.unwrap_or_default().to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("kafka_dlt-original-topic", b"orders".to_vec()),
                ("kafka_dlt-original-partition", vec![0, 0, 0, 3]),
                ("kafka_dlt-original-offset", vec![0, 0, 0, 0, 0, 0, 1, 2]),
                ("kafka_dlt-exception-fqcn", b"notify_permanent".to_vec()),
                ("kafka_dlt-exception-message", b"webhook answered 422".to_vec()),
            ]
        );
        assert!(is_spring_header("kafka_dlt-original-topic") && is_spring_header("KAFKA_DLT-x"));
        assert!(!is_spring_header("kafka_dlt") && !is_spring_header("ce_id"));
    }
}
