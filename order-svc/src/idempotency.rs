//! Order and event ids, and what makes a retried `CreateOrder` safe.
//!
//! Without a `request_id` every call gets fresh time-ordered ids (UUIDv7).
//! With one, the ids are derived (UUIDv5) from `(user_id, request_id)`, so a
//! retry yields the same order id and the same event id on any instance and
//! after any restart: downstream deduplicates on the event id. Each instance
//! also remembers recent answers ([`Answers`], bounded LRU) so that a retry it
//! has seen gets the very same order back, and a key reused with a different
//! payload is refused instead of silently naming two orders.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    num::NonZeroUsize,
    sync::Mutex,
};

use orders_contract::v1::Order;
use uuid::Uuid;

use crate::domain::NewOrder;

/// Namespace of order ids derived from idempotency keys.
const ORDER_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7273_2d76_312d_6f72_6465_7200);
/// Namespace of event ids derived from order ids.
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7273_2d76_312d_6576_656e_7400);

/// The ids of a new order and of its `OrderCreated` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// The order id (also the record key).
    pub order_id: Uuid,
    /// The event id (`ce_id`, the downstream dedup key).
    pub event_id: Uuid,
}

/// Ids for `order`: derived from its idempotency key when it has one, fresh
/// and time-ordered otherwise.
pub fn ids_for(order: &NewOrder) -> Ids {
    match &order.request_id {
        Some(request_id) => {
            // Length-prefixed so that ("ab", "c") and ("a", "bc") differ.
            let name = format!("{}:{}:{}", order.user_id.len(), order.user_id, request_id);
            let order_id = Uuid::new_v5(&ORDER_NAMESPACE, name.as_bytes());
            Ids {
                order_id,
                event_id: Uuid::new_v5(&EVENT_NAMESPACE, order_id.as_bytes()),
            }
        }
        None => Ids {
            order_id: Uuid::now_v7(),
            event_id: Uuid::now_v7(),
        },
    }
}

/// What [`Answers::lookup`] found.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// Never seen (or forgotten): create the order.
    New,
    /// The same key with the same payload: answer with this order again.
    Replay(Order),
    /// The same key with another payload.
    Conflict,
}

/// Recent answers to requests that carried a `request_id`, bounded in size.
#[derive(Debug)]
pub struct Answers {
    cache: Mutex<lru::LruCache<(String, String), (u64, Order)>>,
}

fn fingerprint(order: &NewOrder) -> u64 {
    let mut h = DefaultHasher::new();
    order.hash(&mut h);
    h.finish()
}

impl Answers {
    /// Remembers at most `capacity` answers.
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            cache: Mutex::new(lru::LruCache::new(capacity)),
        }
    }

    fn key(order: &NewOrder) -> Option<(String, String)> {
        order.request_id.as_ref().map(|r| (order.user_id.clone(), r.clone()))
    }

    /// Looks `order`'s idempotency key up.
    pub fn lookup(&self, order: &NewOrder) -> Seen {
        let Some(key) = Self::key(order) else {
            return Seen::New;
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&key) {
            None => Seen::New,
            Some((fp, answer)) if *fp == fingerprint(order) => Seen::Replay(answer.clone()),
            Some(_) => Seen::Conflict,
        }
    }

    /// Remembers the answer given to `order` (only if it has a key).
    pub fn remember(&self, order: &NewOrder, answer: &Order) {
        if let Some(key) = Self::key(order) {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.put(key, (fingerprint(order), answer.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LineItem;

    fn order(user: &str, request_id: Option<&str>, qty: u32) -> NewOrder {
        NewOrder {
            user_id: user.into(),
            currency: "EUR".into(),
            items: vec![LineItem {
                sku: "A".into(),
                quantity: qty,
                unit_price_minor: 5,
            }],
            total_minor: 5 * i64::from(qty),
            request_id: request_id.map(Into::into),
        }
    }

    #[test]
    fn ids_without_a_key_are_fresh_and_time_ordered() {
        let a = ids_for(&order("u", None, 1));
        let b = ids_for(&order("u", None, 1));
        assert_ne!(a.order_id, b.order_id);
        assert_ne!(a.event_id, b.event_id);
        assert_ne!(a.order_id, a.event_id);
        assert_eq!(a.order_id.get_version_num(), 7);
        assert!(a.order_id < b.order_id);
    }

    #[test]
    fn ids_with_a_key_are_stable_per_user_and_key() {
        let a = ids_for(&order("u", Some("r1"), 1));
        assert_eq!(a, ids_for(&order("u", Some("r1"), 1)));
        assert_ne!(a, ids_for(&order("u", Some("r2"), 1)));
        assert_ne!(a, ids_for(&order("v", Some("r1"), 1)));
        assert_ne!(ids_for(&order("ab", Some("c"), 1)), ids_for(&order("a", Some("bc"), 1)));
        assert_ne!(a.order_id, a.event_id);
    }

    #[test]
    fn answers_replay_same_payload_and_refuse_another() {
        let answers = Answers::new(NonZeroUsize::new(2).unwrap());
        let first = order("u", Some("r"), 1);
        assert_eq!(answers.lookup(&first), Seen::New);
        let answer = Order {
            order_id: "o-1".into(),
            ..Default::default()
        };
        answers.remember(&first, &answer);
        assert_eq!(answers.lookup(&first), Seen::Replay(answer));
        assert_eq!(answers.lookup(&order("u", Some("r"), 2)), Seen::Conflict);
        assert_eq!(answers.lookup(&order("u", None, 1)), Seen::New);
    }

    #[test]
    fn answers_are_bounded() {
        let answers = Answers::new(NonZeroUsize::new(2).unwrap());
        for r in ["a", "b", "c"] {
            answers.remember(&order("u", Some(r), 1), &Order::default());
        }
        assert_eq!(answers.lookup(&order("u", Some("a"), 1)), Seen::New);
        assert!(matches!(answers.lookup(&order("u", Some("c"), 1)), Seen::Replay(_)));
    }
}
