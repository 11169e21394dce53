//! Order and event ids, and what makes a retried `CreateOrder` safe.
//!
//! Without a `request_id` every call gets fresh time-ordered ids (UUIDv7).
//! With one, the ids are derived (UUIDv5) from `(user_id, request_id)`, so a
//! retry yields the same order id and the same event id on any instance and
//! after any restart: downstream deduplicates on the event id. Each instance
//! also remembers recent answers ([`Answers`], bounded LRU) so that a retry it
//! has seen gets the very same order back, and a key reused with a different
//! payload is refused instead of silently naming two orders. A key is
//! reserved while its order is being created, so two calls with one key at
//! once on one instance never both create it.

use std::{
    collections::HashMap,
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

/// What [`Answers::reserve`] found.
#[derive(Debug)]
pub enum Seen<'a> {
    /// Never seen (or forgotten), and nobody is creating it: the caller
    /// creates the order and hands the answer to the [`Reservation`].
    New(Reservation<'a>),
    /// The same key with the same payload: answer with this order again.
    Replay(Order),
    /// The same key with another payload, answered or still being created.
    Conflict,
}

/// The fingerprint of the payload under a key, and the order it was answered with.
type Answer = (u64, Order);

/// A key whose order is being created, and how to wait for it.
#[derive(Debug)]
struct InFlight {
    fingerprint: u64,
    /// Closed when the creator is done (answered or gave up).
    done: tokio::sync::watch::Receiver<()>,
}

#[derive(Debug)]
struct State {
    answered: lru::LruCache<Key, Answer>,
    /// At most one entry per call in flight, so bounded by the in-flight limit.
    in_flight: HashMap<Key, InFlight>,
}

type Key = (String, String);

/// Recent answers to requests that carried a `request_id`, bounded in size,
/// and the keys whose orders are being created right now.
///
/// A key is reserved before its order is published, so that of two calls
/// with one key at once only one creates the order: the other, with the same
/// payload, waits and gets the same order; with another payload it is refused.
#[derive(Debug)]
pub struct Answers {
    state: Mutex<State>,
}

fn fingerprint(order: &NewOrder) -> u64 {
    let mut h = DefaultHasher::new();
    order.hash(&mut h);
    h.finish()
}

fn key(order: &NewOrder) -> Option<Key> {
    order.request_id.as_ref().map(|r| (order.user_id.clone(), r.clone()))
}

impl Answers {
    /// Remembers at most `capacity` answers.
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            state: Mutex::new(State {
                answered: lru::LruCache::new(capacity),
                in_flight: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks `order`'s idempotency key up and reserves it when it is new.
    /// While another call creates the order of the same key and payload, waits
    /// for that call's answer (or, if it fails, for the chance to try itself).
    pub async fn reserve(&self, order: &NewOrder) -> Seen<'_> {
        let Some(key) = key(order) else {
            return Seen::New(Reservation {
                answers: self,
                key: None,
            });
        };
        let fp = fingerprint(order);
        loop {
            let mut done = {
                let mut state = self.lock();
                match state.answered.get(&key) {
                    Some((seen, answer)) if *seen == fp => return Seen::Replay(answer.clone()),
                    Some(_) => return Seen::Conflict,
                    None => {}
                }
                match state.in_flight.get(&key) {
                    Some(flight) if flight.fingerprint != fp => return Seen::Conflict,
                    Some(flight) => flight.done.clone(),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(());
                        state.in_flight.insert(
                            key.clone(),
                            InFlight {
                                fingerprint: fp,
                                done: rx,
                            },
                        );
                        return Seen::New(Reservation {
                            answers: self,
                            key: Some((key, fp, tx)),
                        });
                    }
                }
            };
            // Nothing is ever sent: this returns when the creator drops its
            // reservation, answered or not; then look again.
            let _ = done.changed().await;
        }
    }
}

/// The right to create the order of one idempotency key; dropping it
/// without [`Reservation::answer`] (the call failed or was cancelled) lets the
/// next caller with that key try.
#[derive(Debug)]
pub struct Reservation<'a> {
    answers: &'a Answers,
    /// The key, its payload's fingerprint, and what wakes those who wait.
    key: Option<(Key, u64, tokio::sync::watch::Sender<()>)>,
}

impl Reservation<'_> {
    /// Remembers `answer` as the order of the reserved key (if it has one).
    pub fn answer(mut self, answer: &Order) {
        if let Some((key, fp, done)) = self.key.take() {
            let mut state = self.answers.lock();
            state.in_flight.remove(&key);
            state.answered.put(key, (fp, answer.clone()));
            drop(state);
            drop(done);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some((key, _, done)) = self.key.take() {
            self.answers.lock().in_flight.remove(&key);
            drop(done);
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

    fn answered(seen: Seen<'_>) -> Option<Order> {
        match seen {
            Seen::Replay(order) => Some(order),
            _ => None,
        }
    }

    #[tokio::test]
    async fn answers_replay_same_payload_and_refuse_another() {
        let answers = Answers::new(NonZeroUsize::new(2).unwrap());
        let first = order("u", Some("r"), 1);
        let Seen::New(reservation) = answers.reserve(&first).await else {
            panic!("a new key is reserved");
        };
        let answer = Order {
            order_id: "o-1".into(),
            ..Default::default()
        };
        reservation.answer(&answer);
        assert_eq!(answered(answers.reserve(&first).await), Some(answer));
        assert!(matches!(
            answers.reserve(&order("u", Some("r"), 2)).await,
            Seen::Conflict
        ));
        assert!(matches!(answers.reserve(&order("u", None, 1)).await, Seen::New(_)));
    }

    #[tokio::test]
    async fn a_key_in_flight_refuses_another_payload_and_holds_back_the_same_one() {
        let answers = Answers::new(NonZeroUsize::new(8).unwrap());
        let first = order("u", Some("r"), 1);
        let Seen::New(reservation) = answers.reserve(&first).await else {
            panic!("a new key is reserved");
        };
        assert!(matches!(
            answers.reserve(&order("u", Some("r"), 2)).await,
            Seen::Conflict
        ));
        let waiter = answers.reserve(&first);
        tokio::pin!(waiter);
        assert!(
            futures::poll!(waiter.as_mut()).is_pending(),
            "the same payload waits for the call in flight"
        );
        let answer = Order {
            order_id: "o-1".into(),
            ..Default::default()
        };
        reservation.answer(&answer);
        assert_eq!(answered(waiter.await), Some(answer));
    }

    #[tokio::test]
    async fn a_reservation_given_up_lets_the_next_caller_try() {
        let answers = Answers::new(NonZeroUsize::new(8).unwrap());
        let first = order("u", Some("r"), 1);
        let Seen::New(reservation) = answers.reserve(&first).await else {
            panic!("a new key is reserved");
        };
        let waiter = answers.reserve(&first);
        tokio::pin!(waiter);
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(reservation);
        assert!(matches!(waiter.await, Seen::New(_)), "the waiter may create it now");
        assert!(
            matches!(answers.reserve(&order("u", Some("r"), 2)).await, Seen::New(_)),
            "nothing was answered, so another payload is not a conflict"
        );
    }

    #[tokio::test]
    async fn answers_are_bounded() {
        let answers = Answers::new(NonZeroUsize::new(2).unwrap());
        for r in ["a", "b", "c"] {
            let Seen::New(reservation) = answers.reserve(&order("u", Some(r), 1)).await else {
                panic!("new");
            };
            reservation.answer(&Order::default());
        }
        assert!(matches!(answers.reserve(&order("u", Some("a"), 1)).await, Seen::New(_)));
        assert!(matches!(
            answers.reserve(&order("u", Some("c"), 1)).await,
            Seen::Replay(_)
        ));
    }
}
