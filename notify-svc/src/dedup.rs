//! Drops duplicate deliveries of an event this instance handled recently:
//! a bounded LRU of event ids, so memory stays flat however long it runs.
//! Across restarts and instances the webhook's `Idempotency-Key` lets the
//! receiver do the same.

use std::{num::NonZeroUsize, sync::Mutex};

/// An event id as the cache keeps it: order-svc's ids are UUIDs, kept as 16
/// bytes (no allocation, cheap to hash and compare); any other id verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Id {
    Uuid(u128),
    Other(Box<str>),
}

impl Id {
    fn of(event_id: &str) -> Self {
        match uuid::Uuid::try_parse(event_id) {
            Ok(uuid) => Self::Uuid(uuid.as_u128()),
            Err(_) => Self::Other(event_id.into()),
        }
    }
}

/// Recently handled event ids.
#[derive(Debug)]
pub struct Dedup {
    seen: Mutex<lru::LruCache<Id, ()>>,
}

impl Dedup {
    /// Remembers at most `capacity` ids.
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            seen: Mutex::new(lru::LruCache::new(capacity)),
        }
    }

    /// Whether `event_id` was handled recently.
    pub fn seen(&self, event_id: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&Id::of(event_id))
            .is_some()
    }

    /// Marks `event_id` handled.
    pub fn mark(&self, event_id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(Id::of(event_id), ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_ids_within_its_bound() {
        let d = Dedup::new(NonZeroUsize::new(2).unwrap());
        assert!(!d.seen("a"));
        d.mark("a");
        d.mark("b");
        assert!(d.seen("a"));
        d.mark("c");
        assert!(!d.seen("b"), "least recently used id is forgotten");
        assert!(d.seen("a") && d.seen("c"));
    }

    #[test]
    fn uuids_and_other_ids_are_told_apart_exactly() {
        let d = Dedup::new(NonZeroUsize::new(8).unwrap());
        let a = "0192f3c4-7b1e-7cc0-9a57-6f1d2c3b4a59";
        let b = "0192f3c4-7b1e-7cc0-9a57-6f1d2c3b4a5a";
        d.mark(a);
        assert!(d.seen(a));
        assert!(!d.seen(b), "a UUID one bit away is another event");
        assert!(!d.seen("evt-1"));
        d.mark("evt-1");
        assert!(d.seen("evt-1") && !d.seen("evt-2"));
    }
}
