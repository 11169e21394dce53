//! One dead letter as an operator reads it: where it is, where it came from,
//! why it failed (notify-svc's `dlq.*` headers, or Spring's `kafka_dlt-*`
//! ones when ours are absent), and the order and event it carries when its
//! value decodes.

use orders_contract::envelope::{self, Event};
use rdkafka::message::{Headers, Message};
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Header names notify-svc writes (notify-svc's `dead_letter::header`; the
/// e2e test checks the two agree) and the ones a redrive adds.
pub(crate) mod header {
    /// notify-svc's namespace: left out of a redriven record.
    pub(crate) const PREFIX: &str = "dlq.";
    pub(crate) const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    pub(crate) const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    pub(crate) const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    pub(crate) const ERROR_CLASS: &str = "dlq.error.class";
    pub(crate) const ERROR_MESSAGE: &str = "dlq.error.message";
    pub(crate) const ATTEMPTS: &str = "dlq.attempts";
    pub(crate) const FAILED_AT: &str = "dlq.failed.at";
    pub(crate) const OMITTED: &str = "dlq.omitted";
    /// Added by a redrive: the dead letter it came from, `<dlq topic>:<partition>:<offset>`.
    pub(crate) const REDRIVEN_FROM: &str = "dlq.redriven.from";
    /// Added by a redrive: when, RFC 3339.
    pub(crate) const REDRIVEN_AT: &str = "dlq.redriven.at";

    /// Spring for Apache Kafka's names (text UTF-8, partition and offset
    /// big-endian 4- and 8-byte integers); also left out of a redriven record.
    pub(crate) mod spring {
        pub(crate) const PREFIX: &str = "kafka_dlt-";
        pub(crate) const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
        pub(crate) const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
        pub(crate) const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
        pub(crate) const EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
        pub(crate) const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
    }

    /// Whether `key` is dead-letter context rather than part of the original
    /// record (ASCII case ignored, as notify-svc compares).
    pub(crate) fn is_dead_letter_context(key: &str) -> bool {
        [PREFIX, spring::PREFIX].iter().any(|prefix| {
            key.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        })
    }
}

/// Largest value decoded to find the order and event ids (notify-svc's
/// largest MAX_RECORD_BYTES): a dead letter is decoded whatever limit made it
/// one.
const DECODE_LIMIT: usize = 16 * 1024 * 1024;

/// What `list` and `show` print about a dead letter.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub(crate) partition: i32,
    /// Offset in it.
    pub(crate) offset: i64,
    pub(crate) original_topic: Option<String>,
    pub(crate) original_partition: Option<i32>,
    pub(crate) original_offset: Option<i64>,
    pub(crate) error_class: Option<String>,
    pub(crate) error_message: Option<String>,
    pub(crate) attempts: Option<u32>,
    /// As written (RFC 3339).
    pub(crate) failed_at: Option<String>,
    /// From the decoded event.
    pub(crate) order_id: Option<String>,
    /// From the decoded event.
    pub(crate) event_id: Option<String>,
    /// Why the value does not decode, when it does not.
    pub(crate) decode_error: Option<String>,
    /// The record key, as text.
    pub(crate) key: Option<String>,
    /// What notify-svc left out of a dead letter too large for its topic
    /// (`dlq.omitted`); such a record cannot be redriven from here.
    pub(crate) omitted: Option<String>,
    /// Bytes of the value.
    pub(crate) value_bytes: usize,
}

fn last_header<'m, M: Message>(message: &'m M, name: &str) -> Option<&'m [u8]> {
    message
        .headers()
        .and_then(|h| h.iter().filter(|h| h.key == name).last().and_then(|h| h.value))
}

fn text<M: Message>(message: &M, name: &str) -> Option<String> {
    last_header(message, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Our header as text, else Spring's.
fn text_or_spring<M: Message>(message: &M, ours: &str, spring: &str) -> Option<String> {
    text(message, ours).or_else(|| text(message, spring))
}

impl DeadLetter {
    /// Reads `message`'s headers and decodes its value; never fails: what
    /// is missing or unreadable is `None`.
    pub(crate) fn read<M: Message>(message: &M) -> Self {
        let decoded = envelope::decode(|name| last_header(message, name), message.payload(), DECODE_LIMIT);
        let (order_id, event_id, decode_error) = match decoded {
            Ok(Event::OrderCreated(e)) => (e.order.map(|o| o.order_id), Some(e.event_id), None),
            Err(e) => (None, None, Some(e.to_string())),
        };
        Self {
            partition: message.partition(),
            offset: message.offset(),
            original_topic: text_or_spring(message, header::ORIGINAL_TOPIC, header::spring::ORIGINAL_TOPIC),
            original_partition: text(message, header::ORIGINAL_PARTITION)
                .and_then(|p| p.parse().ok())
                .or_else(|| {
                    last_header(message, header::spring::ORIGINAL_PARTITION)
                        .and_then(|v| <[u8; 4]>::try_from(v).ok())
                        .map(i32::from_be_bytes)
                }),
            original_offset: text(message, header::ORIGINAL_OFFSET)
                .and_then(|o| o.parse().ok())
                .or_else(|| {
                    last_header(message, header::spring::ORIGINAL_OFFSET)
                        .and_then(|v| <[u8; 8]>::try_from(v).ok())
                        .map(i64::from_be_bytes)
                }),
            error_class: text_or_spring(message, header::ERROR_CLASS, header::spring::EXCEPTION_FQCN),
            error_message: text_or_spring(message, header::ERROR_MESSAGE, header::spring::EXCEPTION_MESSAGE),
            attempts: text(message, header::ATTEMPTS).and_then(|a| a.parse().ok()),
            failed_at: text(message, header::FAILED_AT),
            order_id,
            event_id,
            decode_error,
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            omitted: text(message, header::OMITTED),
            value_bytes: message.payload().map_or(0, <[u8]>::len),
        }
    }

    /// The failed-at time, when it is there and RFC 3339.
    pub(crate) fn failed_at_time(&self) -> Option<OffsetDateTime> {
        self.failed_at
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    }

    /// Where it came from, `topic:partition:offset` (`?` for what is unknown).
    pub(crate) fn original(&self) -> String {
        fn or_q<T: ToString>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "?".into(), T::to_string)
        }
        format!(
            "{}:{}:{}",
            or_q(&self.original_topic),
            or_q(&self.original_partition),
            or_q(&self.original_offset)
        )
    }
}

/// A header value for people: the text when it is printable UTF-8, else hex.
pub(crate) fn printable(value: Option<&[u8]>) -> String {
    match value {
        None => "(null)".into(),
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
            _ => format!("0x{}", v.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::{
        Timestamp,
        message::{Header, OwnedHeaders, OwnedMessage},
    };

    fn message(headers: &[(&str, &[u8])], value: Option<&[u8]>) -> OwnedMessage {
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(*value),
            })
        });
        OwnedMessage::new(
            value.map(<[u8]>::to_vec),
            Some(b"o-1".to_vec()),
            "orders.dlq".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        )
    }

    #[test]
    fn reads_our_headers() {
        let m = message(
            &[
                ("dlq.original.topic", b"orders"),
                ("dlq.original.partition", b"2"),
                ("dlq.original.offset", b"41"),
                ("dlq.error.class", b"notify_permanent"),
                ("dlq.error.message", b"webhook answered 422"),
                ("dlq.attempts", b"1"),
                ("dlq.failed.at", b"2026-12-05T08:00:00Z"),
            ],
            Some(b"\xff\xff"),
        );
        let l = DeadLetter::read(&m);
        assert_eq!(l.original(), "orders:2:41");
        assert_eq!(l.error_class.as_deref(), Some("notify_permanent"));
        assert_eq!(l.attempts, Some(1));
        assert!(l.failed_at_time().is_some());
        assert_eq!((l.partition, l.offset), (0, 7));
        assert!(l.order_id.is_none() && l.decode_error.is_some(), "{l:?}");
        assert_eq!(l.key.as_deref(), Some("o-1"));
    }

    #[test]
    fn falls_back_to_springs_headers_and_encodings() {
        let m = message(
            &[
                ("kafka_dlt-original-topic", b"orders"),
                ("kafka_dlt-original-partition", &3i32.to_be_bytes()),
                ("kafka_dlt-original-offset", &258i64.to_be_bytes()),
                ("kafka_dlt-exception-fqcn", b"com.example.Boom"),
                ("kafka_dlt-exception-message", b"boom"),
            ],
            None,
        );
        let l = DeadLetter::read(&m);
        assert_eq!(l.original(), "orders:3:258");
        assert_eq!(l.error_class.as_deref(), Some("com.example.Boom"));
        assert_eq!(l.error_message.as_deref(), Some("boom"));
        assert_eq!(l.decode_error.as_deref(), Some("record has no value"));
    }

    #[test]
    fn dead_letter_context_is_recognised() {
        for key in [
            "dlq.error.class",
            "DLQ.redriven.from",
            "kafka_dlt-original-offset",
            "KAFKA_DLT-x",
        ] {
            assert!(header::is_dead_letter_context(key), "{key}");
        }
        for key in ["ce_id", "traceparent", "dlq", "kafka_dlt", "x.dlq.a", ""] {
            assert!(!header::is_dead_letter_context(key), "{key}");
        }
        assert_eq!(printable(Some(b"abc")), "abc");
        assert_eq!(printable(Some(&[0, 1, 255])), "0x0001ff");
        assert_eq!(printable(None), "(null)");
    }
}
