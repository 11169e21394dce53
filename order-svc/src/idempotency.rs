//! Order and event ids, and the fingerprint that tells a retry from a reused
//! idempotency key.
//!
//! Every new order gets fresh time-ordered ids (UUIDv7). What makes a retried
//! `CreateOrder` safe is the store: `(user_id, request_id)` is unique there
//! (for `IDEMPOTENCY_RETENTION`), and a retry reads the first call's order
//! back, with its ids and `created_at`, on any instance and after any restart.
//! The fingerprint, a SHA-256 of the payload in a fixed encoding, is stored
//! with the key: the same payload is a retry, another one is a conflict. It
//! must not change between releases (it outlives the process), which is why it
//! is not Rust's `Hash`.

use orders_contract::v1::{CreateOrderRequest, LineItem};
use prost::Message;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::NewOrder;

/// The ids of a new order and of its `OrderCreated` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// The order id (also the record key).
    pub order_id: Uuid,
    /// The event id (`ce_id`, the downstream dedup key).
    pub event_id: Uuid,
}

/// Fresh, time-ordered ids for a new order.
pub fn new_ids() -> Ids {
    Ids {
        order_id: Uuid::now_v7(),
        event_id: Uuid::now_v7(),
    }
}

/// The payload's fingerprint: SHA-256 of the validated request encoded as a
/// `CreateOrderRequest` (protobuf's encoding of the same fields in the same
/// order is the same bytes).
pub fn fingerprint(order: &NewOrder) -> [u8; 32] {
    let request = CreateOrderRequest {
        user_id: order.user_id.clone(),
        currency: order.currency.clone(),
        items: order
            .items
            .iter()
            .map(|i| LineItem {
                sku: i.sku.clone(),
                quantity: i.quantity,
                unit_price_minor: i.unit_price_minor,
            })
            .collect(),
        request_id: order.request_id.clone().unwrap_or_default(),
    };
    Sha256::digest(request.encode_to_vec()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LineItem;

    fn order(quantity: u32) -> NewOrder {
        NewOrder {
            user_id: "u".into(),
            currency: "EUR".into(),
            items: vec![LineItem {
                sku: "a".into(),
                quantity,
                unit_price_minor: 5,
            }],
            total_minor: 5 * i64::from(quantity),
            request_id: Some("r".into()),
        }
    }

    #[test]
    fn the_same_payload_has_the_same_fingerprint_and_another_does_not() {
        assert_eq!(fingerprint(&order(1)), fingerprint(&order(1)));
        assert_ne!(fingerprint(&order(1)), fingerprint(&order(2)));
    }

    #[test]
    fn the_fingerprint_is_stable_across_releases() {
        // A stored key outlives the binary: this value must never change.
        let hex: String = fingerprint(&order(1)).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, STABLE);
    }

    const STABLE: &str = "f5f86383aff394d325dd1eed52425741ed18cb9610b39194e7e8b770e532f70d";

    #[test]
    fn ids_are_fresh() {
        assert_ne!(new_ids(), new_ids());
    }
}
