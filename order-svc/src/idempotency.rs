//! Order and event ids, and what makes a retried `CreateOrder` safe.
//!
//! Without a `request_id` every call gets fresh time-ordered ids (UUIDv7).
//! With one, the ids are derived (UUIDv5) from `(user_id, request_id)`, so a
//! retry yields the same order id and the same event id on any instance and
//! after any restart: downstream deduplicates on the event id. Each instance
//! also remembers recent answers ([`Answers`], an LRU bounded in entries and
//! in bytes) so that a retry it has seen gets the very same order back, and a
//! key reused with a different payload is refused instead of silently naming
//! two orders. A key is reserved while its order is being created, so two
//! calls with one key at once on one instance never both create it.
//!
//! An answer is kept as the payload's fingerprint, the order id and the
//! creation time, not as the order: a replay has the same payload, so its
//! order is rebuilt from the request. An entry's size then depends only on
//! the key (at most 2 x 128 characters), never on the order's items, whose
//! size the client controls.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    num::NonZeroUsize,
    sync::Mutex,
};

use orders_contract::v1::Order;
use prost_types::Timestamp;
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

/// What is remembered of an answered key: the fingerprint of its payload,
/// and what of the order a replay cannot take from its request.
#[derive(Debug, Clone, Copy)]
struct Answer {
    fingerprint: u64,
    order_id: Uuid,
    created_at: Option<Timestamp>,
}

impl Answer {
    /// The order answered for `order` (whose payload has this answer's
    /// fingerprint), as the first call answered it.
    fn order(&self, order: &NewOrder) -> Order {
        Order {
            order_id: self.order_id.to_string(),
            user_id: order.user_id.clone(),
            items: order.items.iter().map(Into::into).collect(),
            currency: order.currency.clone(),
            total_minor: order.total_minor,
            created_at: self.created_at,
            request_id: order.request_id.clone().unwrap_or_default(),
        }
    }
}

/// Bookkeeping per remembered answer beyond its key's text and the entry
/// itself: the LRU's list links and the hash table's slot, rounded up.
const ENTRY_OVERHEAD: usize = 64;

/// The bytes an answer under `key` is counted for.
fn entry_bytes(key: &Key) -> usize {
    key.0.len() + key.1.len() + std::mem::size_of::<(Key, Answer)>() + ENTRY_OVERHEAD
}

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
    /// What `answered` holds, by [`entry_bytes`].
    bytes: usize,
    max_bytes: usize,
    /// At most one entry per call in flight, so bounded by the in-flight limit.
    in_flight: HashMap<Key, InFlight>,
}

type Key = (String, String);

/// Recent answers to requests that carried a `request_id`, bounded in count
/// and in bytes, and the keys whose orders are being created right now.
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
    /// Remembers at most `capacity` answers taking at most `max_bytes`
    /// (keys included), forgetting the least recently used first.
    pub fn new(capacity: NonZeroUsize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State {
                answered: lru::LruCache::new(capacity),
                bytes: 0,
                max_bytes,
                in_flight: HashMap::new(),
            }),
        }
    }

    /// How many answers are remembered, and the bytes they are counted for.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.lock();
        (state.answered.len(), state.bytes)
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
                    Some(answer) if answer.fingerprint == fp => return Seen::Replay(answer.order(order)),
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
        if let Some((key, fingerprint, done)) = self.key.take() {
            let mut state = self.answers.lock();
            state.in_flight.remove(&key);
            // Order ids are UUIDs; one that is not is not remembered (a
            // retry still gets the same ids, derived from its key).
            if let Ok(order_id) = Uuid::try_parse(&answer.order_id) {
                let entry = Answer {
                    fingerprint,
                    order_id,
                    created_at: answer.created_at,
                };
                state.bytes += entry_bytes(&key);
                // The replaced entry of the same key, or the one evicted for room.
                if let Some((old, _)) = state.answered.push(key, entry) {
                    state.bytes -= entry_bytes(&old);
                }
                while state.bytes > state.max_bytes {
                    let Some((old, _)) = state.answered.pop_lru() else {
                        break;
                    };
                    state.bytes -= entry_bytes(&old);
                }
            }
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

    /// The order the API answers for `new`, as `api` builds it.
    fn answer_for(new: &NewOrder) -> Order {
        Order {
            order_id: ids_for(new).order_id.to_string(),
            user_id: new.user_id.clone(),
            items: new.items.iter().map(Into::into).collect(),
            currency: new.currency.clone(),
            total_minor: new.total_minor,
            created_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 123,
            }),
            request_id: new.request_id.clone().unwrap_or_default(),
        }
    }

    /// An order of `MAX_ITEMS` lines of `MAX_SKU_CHARS`-character SKUs.
    fn large(request_id: &str) -> NewOrder {
        let items: Vec<LineItem> = (0..crate::domain::MAX_ITEMS)
            .map(|i| LineItem {
                sku: format!("{i:0>64}"),
                quantity: 1,
                unit_price_minor: 1,
            })
            .collect();
        NewOrder {
            user_id: "u".repeat(crate::domain::MAX_ID_CHARS),
            currency: "EUR".into(),
            total_minor: items.len() as i64,
            items,
            request_id: Some(request_id.into()),
        }
    }

    async fn create(answers: &Answers, new: &NewOrder) {
        let Seen::New(reservation) = answers.reserve(new).await else {
            panic!("a new key is reserved");
        };
        reservation.answer(&answer_for(new));
    }

    /// What an answer takes depends on its key, not on the order's items.
    #[tokio::test]
    async fn an_answer_is_counted_by_its_key_not_its_items() {
        let answers = Answers::new(NonZeroUsize::new(8).unwrap(), usize::MAX);
        create(&answers, &order("u", Some("r1"), 1)).await;
        let (_, small) = answers.usage();
        let big = large("r2");
        create(&answers, &big).await;
        let (count, both) = answers.usage();
        assert_eq!(count, 2);
        // Keys ("u", "r1") and (128 x "u", "r2"): 3 and 130 bytes of text.
        assert_eq!(both - small, small - 3 + 130, "only the longer key adds bytes");
        assert!(
            both - small < 1024,
            "a 100-line order is counted for {} bytes",
            both - small
        );
        assert_eq!(
            answered(answers.reserve(&big).await),
            Some(answer_for(&big)),
            "the replay is the order first answered, rebuilt from the request"
        );
    }

    /// A flood of keys never holds more than the byte bound: the least
    /// recently used are forgotten first.
    #[tokio::test]
    async fn answers_are_bounded_in_bytes() {
        let max_bytes = 64 * 1024;
        let answers = Answers::new(NonZeroUsize::new(1_000_000).unwrap(), max_bytes);
        let first = large("r-0");
        create(&answers, &first).await;
        for i in 1..5_000 {
            create(&answers, &large(&format!("r-{i}"))).await;
            let (_, bytes) = answers.usage();
            assert!(bytes <= max_bytes, "{bytes} > {max_bytes}");
        }
        let (count, bytes) = answers.usage();
        assert!(
            count > 50 && bytes > max_bytes - 1024,
            "{count} answers in {bytes} bytes"
        );
        assert!(
            matches!(answers.reserve(&first).await, Seen::New(_)),
            "the oldest is forgotten"
        );
        let last = large("r-4999");
        assert_eq!(answered(answers.reserve(&last).await), Some(answer_for(&last)));
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
        let answers = Answers::new(NonZeroUsize::new(2).unwrap(), usize::MAX);
        let first = order("u", Some("r"), 1);
        let Seen::New(reservation) = answers.reserve(&first).await else {
            panic!("a new key is reserved");
        };
        let answer = answer_for(&first);
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
        let answers = Answers::new(NonZeroUsize::new(8).unwrap(), usize::MAX);
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
        let answer = answer_for(&first);
        reservation.answer(&answer);
        assert_eq!(answered(waiter.await), Some(answer));
    }

    #[tokio::test]
    async fn a_reservation_given_up_lets_the_next_caller_try() {
        let answers = Answers::new(NonZeroUsize::new(8).unwrap(), usize::MAX);
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
        let answers = Answers::new(NonZeroUsize::new(2).unwrap(), usize::MAX);
        for r in ["a", "b", "c"] {
            let Seen::New(reservation) = answers.reserve(&order("u", Some(r), 1)).await else {
                panic!("new");
            };
            reservation.answer(&answer_for(&order("u", Some(r), 1)));
        }
        assert!(matches!(answers.reserve(&order("u", Some("a"), 1)).await, Seen::New(_)));
        assert!(matches!(
            answers.reserve(&order("u", Some("c"), 1)).await,
            Seen::Replay(_)
        ));
    }
}
