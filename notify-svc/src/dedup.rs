//! Drops duplicate deliveries of an event this instance handled recently:
//! a bounded LRU of event ids, so memory stays flat however long it runs.
//! Across restarts and instances the webhook's `Idempotency-Key` lets the
//! receiver do the same.
//!
//! Every entry has the same small size whatever the id: an event id comes
//! from the record (up to `MAX_RECORD_BYTES` of it), so the cache keeps a
//! UUID as its 16 bytes and any other id as a 16-byte digest, never the text.

use std::{num::NonZeroUsize, sync::Mutex};

use uuid::Uuid;

/// Namespace of the digests of event ids that are not UUIDs.
const OTHER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6e6f_7469_6679_2d64_6564_7570_2d69_6400);

/// An event id as the cache keeps it: order-svc's ids are UUIDs, kept as 16
/// bytes (no allocation, cheap to hash and compare); any other id as a
/// SHA-1-based name UUID (122 bits of digest: two ids collide by chance
/// with odds of about 2^-61 among 2^30 of them). Neither allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Id {
    Uuid(u128),
    Digest(u128),
}

impl Id {
    fn of(event_id: &str) -> Self {
        match Uuid::try_parse(event_id) {
            Ok(uuid) => Self::Uuid(uuid.as_u128()),
            Err(_) => Self::Digest(Uuid::new_v5(&OTHER_ID_NAMESPACE, event_id.as_bytes()).as_u128()),
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

    /// An id's entry is the same size however long the id is.
    #[test]
    fn long_ids_take_no_more_room_than_short_ones() {
        assert!(std::mem::size_of::<Id>() <= 32);
        let long = "x".repeat(256 * 1024);
        assert!(matches!(Id::of(&long), Id::Digest(_)));
        let mut other = long.clone();
        other.push('y');
        let d = Dedup::new(NonZeroUsize::new(8).unwrap());
        d.mark(&long);
        assert!(d.seen(&long));
        assert!(!d.seen(&other), "an id one character longer is another event");
    }

    /// A flood of distinct 64 KiB ids (a record of the default
    /// `MAX_RECORD_BYTES` can carry four times that) keeps the process's
    /// resident memory flat: 2,000 of them kept verbatim take 125 MiB.
    #[test]
    fn a_flood_of_long_ids_keeps_memory_flat() {
        fn rss_kib() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse().ok())
                })
                .expect("VmRSS in /proc/self/status")
        }
        let d = Dedup::new(NonZeroUsize::new(100_000).unwrap());
        let mut id = "e".repeat(64 * 1024);
        let before = rss_kib();
        for n in 0..2_000 {
            id.truncate(64 * 1024 - 8);
            id.push_str(&format!("{n:08}"));
            d.mark(&id);
        }
        let after = rss_kib();
        assert!(d.seen(&id));
        assert!(
            after.saturating_sub(before) < 32 * 1024,
            "resident memory grew from {before} KiB to {after} KiB"
        );
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
