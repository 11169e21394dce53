//! Drops duplicate deliveries of an event this instance handled recently:
//! a bounded LRU of event ids, so memory stays flat however long it runs.
//! Across restarts and instances the webhook's `Idempotency-Key` lets the
//! receiver do the same.

use std::{num::NonZeroUsize, sync::Mutex};

/// Recently handled event ids.
#[derive(Debug)]
pub struct Dedup {
    seen: Mutex<lru::LruCache<String, ()>>,
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
            .get(event_id)
            .is_some()
    }

    /// Marks `event_id` handled.
    pub fn mark(&self, event_id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(event_id.to_owned(), ());
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
}
