//! Golden vectors: the committed encodings in `proto/testdata/` (written by
//! `proto/testdata/generate.py` from Python code generated from `proto/`)
//! decode in Rust to the expected values, byte-compatible with Python's
//! encoder, and a record from a later schema version (with fields today's
//! schema lacks) still decodes on today's consumer path.

use std::path::PathBuf;

use orders_contract::envelope::{self, DecodeError, Event};
use orders_contract::v1::{LineItem, Order, OrderCreated};
use prost::Message;

const MAX: usize = 256 * 1024;

fn vector(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("proto/testdata")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// What `order_created_v1.json` says, written out by hand so that a change to
/// the vectors has to be made here too.
fn expected() -> OrderCreated {
    let at = prost_types::Timestamp {
        seconds: 1_764_000_000,
        nanos: 123_456_789,
    };
    OrderCreated {
        event_id: "01938f4e-5a00-7000-8000-000000000001".into(),
        order: Some(Order {
            order_id: "01938f4e-5a00-7000-8000-000000000002".into(),
            user_id: "user-42".into(),
            items: vec![
                LineItem {
                    sku: "SKU-1".into(),
                    quantity: 2,
                    unit_price_minor: 1999,
                },
                LineItem {
                    sku: "SKU-2".into(),
                    quantity: 1,
                    unit_price_minor: 500,
                },
            ],
            currency: "EUR".into(),
            total_minor: 4498,
            created_at: Some(at),
            request_id: "req-1".into(),
        }),
        occurred_at: Some(at),
    }
}

/// Headers as order-svc writes them for the sample event.
fn headers(name: &str) -> Option<&'static [u8]> {
    match name {
        "ce_specversion" => Some(b"1.0"),
        "ce_id" => Some(b"01938f4e-5a00-7000-8000-000000000001"),
        "ce_type" => Some(b"orders.v1.OrderCreated"),
        "ce_source" => Some(b"/order-svc"),
        "ce_time" => Some(b"2025-11-24T16:00:00.123456789Z"),
        "content-type" => Some(b"application/protobuf"),
        _ => None,
    }
}

#[test]
fn v1_vector_decodes_to_the_expected_event() {
    let decoded = OrderCreated::decode(vector("order_created_v1.bin").as_slice()).unwrap();
    assert_eq!(decoded, expected());
}

#[test]
fn rust_encodes_the_v1_event_byte_for_byte_like_python() {
    assert_eq!(expected().encode_to_vec(), vector("order_created_v1.bin"));
}

#[test]
fn v1_vector_passes_the_consumer_envelope() {
    let value = vector("order_created_v1.bin");
    let event = envelope::decode(headers, Some(&value), MAX).unwrap();
    assert_eq!(event, Event::OrderCreated(expected()));
}

#[test]
fn envelope_headers_for_the_vector_match_what_the_producer_writes() {
    let record = envelope::encode_order_created(&expected(), "/order-svc");
    assert_eq!(record.key, "01938f4e-5a00-7000-8000-000000000002");
    assert_eq!(record.value, vector("order_created_v1.bin"));
    for (name, value) in &record.headers {
        assert_eq!(headers(name), Some(value.as_bytes()), "header {name} differs");
    }
}

#[test]
fn a_record_with_unknown_fields_still_decodes() {
    let value = vector("order_created_with_unknown_field.bin");
    assert_ne!(
        value,
        vector("order_created_v1.bin"),
        "the vector must carry extra fields"
    );
    let decoded = OrderCreated::decode(value.as_slice()).unwrap();
    assert_eq!(decoded, expected());
    let event = envelope::decode(headers, Some(&value), MAX).unwrap();
    assert_eq!(event, Event::OrderCreated(expected()));
    // Without headers (a record from before CloudEvents headers) it is still
    // taken as an OrderCreated.
    let event = envelope::decode(|_| None, Some(&value), MAX).unwrap();
    assert_eq!(event, Event::OrderCreated(expected()));
}

#[test]
fn the_vector_under_an_unknown_ce_type_is_rejected_not_misread() {
    let value = vector("order_created_v1.bin");
    let lookup = |name: &str| match name {
        "ce_type" => Some(&b"orders.v1.OrderShipped"[..]),
        other => headers(other),
    };
    let err = envelope::decode(lookup, Some(&value), MAX).unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnknownType(t) if t == "orders.v1.OrderShipped"),
        "{err:?}"
    );
}

#[test]
fn truncated_vectors_fail_cleanly() {
    let value = vector("order_created_with_unknown_field.bin");
    for len in 0..value.len() {
        // Every prefix either decodes or is a permanent decode error; none panics.
        let _ = envelope::decode(headers, Some(&value[..len]), MAX);
    }
    assert!(matches!(
        envelope::decode(headers, Some(&value[..value.len() - 1]), MAX),
        Err(DecodeError::Malformed(_))
    ));
}
