//! How an event travels as a Kafka record, in one place for producer and consumer.
//!
//! Record value: the event as binary protobuf. Record key: the order id, so all
//! events of one order land on one partition, in order. Headers: the
//! CloudEvents Kafka protocol binding in binary mode (`ce_specversion`, `ce_id`,
//! `ce_type`, `ce_source`, `ce_time`, `content-type`), so routers and consumers
//! on any stack can tell what a record is without decoding it.

use std::borrow::Cow;

use prost::Message;

use crate::v1::OrderCreated;

/// Header names carried by every record.
pub mod header {
    /// CloudEvents spec version; always [`super::SPEC_VERSION`].
    pub const SPECVERSION: &str = "ce_specversion";
    /// CloudEvents id: the event id.
    pub const ID: &str = "ce_id";
    /// CloudEvents type: the full protobuf message name of the value.
    pub const TYPE: &str = "ce_type";
    /// CloudEvents source: which producer emitted the event.
    pub const SOURCE: &str = "ce_source";
    /// CloudEvents time: when the event happened, RFC 3339.
    pub const TIME: &str = "ce_time";
    /// Media type of the value: [`super::CONTENT_TYPE`].
    pub const CONTENT_TYPE: &str = "content-type";
    /// W3C trace context: the producing span.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context: vendor state.
    pub const TRACESTATE: &str = "tracestate";
}

/// The CloudEvents version the headers follow.
pub const SPEC_VERSION: &str = "1.0";
/// The media type of every record value.
pub const CONTENT_TYPE: &str = "application/protobuf";
/// `ce_type` of an [`OrderCreated`] record.
pub const ORDER_CREATED_TYPE: &str = "orders.v1.OrderCreated";

/// A record ready to hand to a Kafka client: key, value, headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The order id.
    pub key: String,
    /// The encoded event.
    pub value: Vec<u8>,
    /// CloudEvents headers, in a fixed order (constant values borrowed: no
    /// allocation per record for them).
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
}

/// Encodes an [`OrderCreated`] as a record with its CloudEvents headers.
///
/// `source` is the CloudEvents source (a URI reference naming the producer).
pub fn encode_order_created(event: &OrderCreated, source: &str) -> Record {
    let key = event.order.as_ref().map(|o| o.order_id.clone()).unwrap_or_default();
    let time = event
        .occurred_at
        .as_ref()
        .and_then(crate::from_timestamp)
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    Record {
        key,
        value: event.encode_to_vec(),
        headers: vec![
            (header::SPECVERSION, Cow::Borrowed(SPEC_VERSION)),
            (header::ID, Cow::Owned(event.event_id.clone())),
            (header::TYPE, Cow::Borrowed(ORDER_CREATED_TYPE)),
            (header::SOURCE, Cow::Owned(source.to_owned())),
            (header::TIME, Cow::Owned(time)),
            (header::CONTENT_TYPE, Cow::Borrowed(CONTENT_TYPE)),
        ],
    }
}

/// An event decoded from a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `orders.v1.OrderCreated`.
    OrderCreated(OrderCreated),
}

/// Why a record is not an event this consumer can handle. Each of these is
/// permanent: retrying the same bytes gives the same answer.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The record has no value (a tombstone or an empty record).
    #[error("record has no value")]
    Empty,
    /// The value is larger than the consumer accepts.
    #[error("record value is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Size of the value.
        size: usize,
        /// The consumer's limit.
        limit: usize,
    },
    /// `ce_type` names an event type this consumer does not know.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// `content-type` is set and is not protobuf.
    #[error("unsupported content-type {0:?}")]
    UnsupportedContentType(String),
    /// The value is not a valid protobuf encoding of the type.
    #[error("value is not a valid {ORDER_CREATED_TYPE}: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The value decodes but lacks what every event must have.
    #[error("invalid {ORDER_CREATED_TYPE}: {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// A short, stable name for metrics labels and dead-letter headers.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::UnsupportedContentType(_) => "unsupported_content_type",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// Decodes a record whose value may be at most `max_bytes` long. `header`
/// looks a header up by name (the last value wins, as Kafka clients do); a
/// record without `ce_type` is taken as an [`OrderCreated`], the only type
/// producers wrote before the headers existed.
pub fn decode<'a>(
    header: impl Fn(&str) -> Option<&'a [u8]>,
    value: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Event, DecodeError> {
    if let Some(ct) = header(header::CONTENT_TYPE) {
        let ct = String::from_utf8_lossy(ct);
        let media = ct.split(';').next().unwrap_or_default().trim();
        if !media.eq_ignore_ascii_case(CONTENT_TYPE) && !media.eq_ignore_ascii_case("application/x-protobuf") {
            return Err(DecodeError::UnsupportedContentType(ct.into_owned()));
        }
    }
    let ce_type = header(header::TYPE).map(|t| String::from_utf8_lossy(t).into_owned());
    let value = value.filter(|v| !v.is_empty()).ok_or(DecodeError::Empty)?;
    if value.len() > max_bytes {
        return Err(DecodeError::TooLarge {
            size: value.len(),
            limit: max_bytes,
        });
    }
    match ce_type.as_deref() {
        None | Some(ORDER_CREATED_TYPE) => {
            let event = OrderCreated::decode(value)?;
            if event.event_id.is_empty() {
                return Err(DecodeError::Invalid("event_id is empty"));
            }
            match &event.order {
                None => return Err(DecodeError::Invalid("order is missing")),
                Some(o) if o.order_id.is_empty() => {
                    return Err(DecodeError::Invalid("order.order_id is empty"));
                }
                Some(_) => {}
            }
            Ok(Event::OrderCreated(event))
        }
        Some(other) => Err(DecodeError::UnknownType(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{LineItem, Order};
    use proptest::prelude::*;

    const MAX: usize = 64 * 1024;

    fn sample() -> OrderCreated {
        OrderCreated {
            event_id: "0193a1b2-0000-7000-8000-000000000001".into(),
            order: Some(Order {
                order_id: "0193a1b2-0000-7000-8000-000000000002".into(),
                user_id: "user-42".into(),
                items: vec![LineItem {
                    sku: "SKU-1".into(),
                    quantity: 2,
                    unit_price_minor: 1999,
                }],
                currency: "EUR".into(),
                total_minor: 3998,
                created_at: Some(prost_types::Timestamp {
                    seconds: 1_764_000_000,
                    nanos: 5,
                }),
                request_id: String::new(),
            }),
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_764_000_000,
                nanos: 5,
            }),
        }
    }

    fn lookup<'r>(record: &'r Record) -> impl Fn(&str) -> Option<&'r [u8]> + 'r {
        move |name| {
            record
                .headers
                .iter()
                .rev()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let event = sample();
        let record = encode_order_created(&event, "/order-svc");
        assert_eq!(record.key, "0193a1b2-0000-7000-8000-000000000002");
        let decoded = decode(lookup(&record), Some(&record.value), MAX).unwrap();
        assert_eq!(decoded, Event::OrderCreated(event));
    }

    #[test]
    fn headers_follow_the_cloudevents_kafka_binding() {
        let record = encode_order_created(&sample(), "/order-svc");
        let h = lookup(&record);
        assert_eq!(h("ce_specversion"), Some(&b"1.0"[..]));
        assert_eq!(h("ce_id"), Some(&b"0193a1b2-0000-7000-8000-000000000001"[..]));
        assert_eq!(h("ce_type"), Some(&b"orders.v1.OrderCreated"[..]));
        assert_eq!(h("ce_source"), Some(&b"/order-svc"[..]));
        assert_eq!(h("ce_time"), Some(&b"2025-11-24T16:00:00.000000005Z"[..]));
        assert_eq!(h("content-type"), Some(&b"application/protobuf"[..]));
    }

    #[test]
    fn unknown_type_and_bad_bytes_are_permanent_errors() {
        let record = encode_order_created(&sample(), "/x");
        let err = decode(
            |n| (n == "ce_type").then_some(&b"orders.v1.OrderShipped"[..]),
            Some(&record.value),
            MAX,
        );
        assert!(matches!(err, Err(DecodeError::UnknownType(t)) if t == "orders.v1.OrderShipped"));
        assert!(matches!(
            decode(|_| None, Some(b"\xff\xff\xff"), MAX),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode(|_| None, None, MAX), Err(DecodeError::Empty)));
        let big = decode(|_| None, Some(&[0u8; 100]), 99);
        assert!(matches!(big, Err(DecodeError::TooLarge { size: 100, limit: 99 })));
        assert!(decode(|_| None, Some(b"not protobuf"), MAX).is_err());
        let ct = decode(
            |n| (n == "content-type").then_some(&b"application/json"[..]),
            Some(&record.value),
            MAX,
        );
        assert!(matches!(ct, Err(DecodeError::UnsupportedContentType(_))));
    }

    #[test]
    fn an_event_without_ids_is_invalid() {
        let mut event = sample();
        event.event_id.clear();
        let record = encode_order_created(&event, "/x");
        assert!(matches!(
            decode(lookup(&record), Some(&record.value), MAX),
            Err(DecodeError::Invalid(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            value in proptest::collection::vec(any::<u8>(), 0..512),
            ce_type in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            content_type in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ) {
            let header = |name: &str| match name {
                "ce_type" => ce_type.as_deref(),
                "content-type" => content_type.as_deref(),
                _ => None,
            };
            let _ = decode(header, Some(&value), MAX);
        }

        #[test]
        fn any_valid_event_round_trips(
            event_id in "[a-z0-9-]{1,40}",
            order_id in "[a-z0-9-]{1,40}",
            user_id in ".{0,30}",
            qty in 1u32..1000,
            price in 0i64..1_000_000,
        ) {
            let mut event = sample();
            event.event_id = event_id;
            let order = event.order.as_mut().unwrap();
            order.order_id = order_id;
            order.user_id = user_id;
            order.items[0].quantity = qty;
            order.items[0].unit_price_minor = price;
            let record = encode_order_created(&event, "/x");
            prop_assert_eq!(decode(lookup(&record), Some(&record.value), MAX).unwrap(), Event::OrderCreated(event));
        }

        // Random bytes rarely get past the first tag, so this one starts from
        // a real encoding and damages it (overwrites, an insertion, a cut),
        // which reaches the nested Order, LineItem and Timestamp decoders; the
        // headers are an arbitrary list (any names, duplicates, non-UTF-8
        // values) looked up last-wins as Kafka clients do, and the size limit
        // is arbitrary too. Whatever comes in, decode answers without
        // panicking, and an Ok is always a well-formed OrderCreated.
        #[test]
        fn decoding_damaged_records_with_arbitrary_headers_never_panics(
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..8),
            insert in proptest::option::of((any::<proptest::sample::Index>(), proptest::collection::vec(any::<u8>(), 1..16))),
            cut in proptest::option::of(any::<proptest::sample::Index>()),
            headers in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("ce_type".to_owned()),
                        Just("content-type".to_owned()),
                        Just("ce_id".to_owned()),
                        Just("ce_specversion".to_owned()),
                        "[a-z_-]{0,16}",
                    ],
                    proptest::option::of(prop_oneof![
                        Just(ORDER_CREATED_TYPE.as_bytes().to_vec()),
                        Just(CONTENT_TYPE.as_bytes().to_vec()),
                        Just(b"application/x-protobuf; proto=orders.v1.OrderCreated".to_vec()),
                        proptest::collection::vec(any::<u8>(), 0..48),
                    ]),
                ),
                0..8,
            ),
            max_bytes in prop_oneof![Just(MAX), 0usize..256],
            drop_value in proptest::bool::weighted(0.05),
        ) {
            let mut value = encode_order_created(&sample(), "/x").value;
            for (at, byte) in edits {
                let i = at.index(value.len());
                value[i] = byte;
            }
            if let Some((at, bytes)) = insert {
                let i = at.index(value.len() + 1);
                value.splice(i..i, bytes);
            }
            if let Some(at) = cut {
                value.truncate(at.index(value.len() + 1));
            }
            let header = |name: &str| {
                headers
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, v)| v.as_deref())
            };
            let result = decode(header, (!drop_value).then_some(value.as_slice()), max_bytes);
            match result {
                Ok(Event::OrderCreated(event)) => {
                    prop_assert!(!event.event_id.is_empty());
                    prop_assert!(event.order.as_ref().is_some_and(|o| !o.order_id.is_empty()));
                    prop_assert!(value.len() <= max_bytes);
                    let ce_type = header(header::TYPE);
                    prop_assert!(ce_type.is_none() || ce_type == Some(ORDER_CREATED_TYPE.as_bytes()));
                }
                Err(e) => {
                    // Every error has a stable class and a message.
                    prop_assert!(!e.class().is_empty());
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
