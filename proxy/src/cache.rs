//! A TTL cache with negative entries, for the ingress's lookups (service name -> record) and
//! instance lists (pure: the caller passes the time).
//!
//! A found value is served for its TTL; from [`REFRESH_AT`] of the TTL on, reads say a refresh
//! is due so the caller can renew the entry in the background while it keeps serving it: a
//! warm cache never puts a lookup on the request path. A name found absent is remembered for
//! the (short) negative TTL, so a client hammering an unknown service does not hammer the
//! lookup service.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

/// Fraction of the TTL after which a read asks for a background refresh.
pub const REFRESH_AT: f64 = 0.75;

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'a, V> {
    /// A value, and whether it is time to refresh it.
    Found {
        /// The cached value.
        value: &'a V,
        /// Whether [`REFRESH_AT`] of the TTL has passed since it was stored.
        refresh_due: bool,
    },
    /// Known not to exist (a negative entry).
    Absent,
    /// Not cached, or expired: ask.
    Miss,
}

#[derive(Debug, Clone)]
struct Entry<V> {
    value: Option<V>,
    stored: Instant,
}

/// Values (or their known absence) by key, each kept for a TTL from when it was stored.
#[derive(Debug, Clone)]
pub struct TtlCache<K, V> {
    entries: HashMap<K, Entry<V>>,
    ttl: Duration,
    negative_ttl: Duration,
}

impl<K: Eq + Hash, V> TtlCache<K, V> {
    /// An empty cache keeping found values for `ttl` and negative entries for `negative_ttl`.
    pub fn new(ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            ttl,
            negative_ttl,
        }
    }

    /// What is known of `key` at `now` (looked up by any borrowed form, so a `&str` finds a
    /// `String` key without allocating).
    pub fn get<Q>(&self, key: &Q, now: Instant) -> Read<'_, V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(entry) = self.entries.get(key) else {
            return Read::Miss;
        };
        let age = now.saturating_duration_since(entry.stored);
        match &entry.value {
            Some(value) if age < self.ttl => Read::Found {
                value,
                refresh_due: age.as_secs_f64() >= self.ttl.as_secs_f64() * REFRESH_AT,
            },
            None if age < self.negative_ttl => Read::Absent,
            _ => Read::Miss,
        }
    }

    /// Stores what a lookup answered: `Some(value)`, or `None` for "does not exist".
    pub fn insert(&mut self, key: K, value: Option<V>, now: Instant) {
        self.entries.insert(key, Entry { value, stored: now });
    }

    /// Forgets `key`, found or absent, so the next read is a miss.
    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Drops expired entries; call now and then so the cache does not grow without bound.
    pub fn purge(&mut self, now: Instant) {
        let (ttl, negative_ttl) = (self.ttl, self.negative_ttl);
        self.entries.retain(|_, entry| {
            let limit = if entry.value.is_some() {
                ttl
            } else {
                negative_ttl
            };
            now.saturating_duration_since(entry.stored) < limit
        });
    }

    /// How many entries are held, negative and expired-but-not-purged ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held, not even an expired one.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn values_live_their_ttl_and_ask_for_refresh_near_its_end() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(SECOND * 100, SECOND * 5);
        assert_eq!(cache.get(&"svc", t0), Read::Miss);
        cache.insert("svc", Some(1), t0);
        assert_eq!(
            cache.get(&"svc", t0 + SECOND * 10),
            Read::Found {
                value: &1,
                refresh_due: false
            }
        );
        assert_eq!(
            cache.get(&"svc", t0 + SECOND * 80),
            Read::Found {
                value: &1,
                refresh_due: true
            }
        );
        assert_eq!(cache.get(&"svc", t0 + SECOND * 100), Read::Miss);
        // A refresh renews it.
        cache.insert("svc", Some(2), t0 + SECOND * 90);
        assert_eq!(
            cache.get(&"svc", t0 + SECOND * 120),
            Read::Found {
                value: &2,
                refresh_due: false
            }
        );
    }

    #[test]
    fn absence_is_remembered_briefly() {
        let t0 = Instant::now();
        let mut cache: TtlCache<&str, u32> = TtlCache::new(SECOND * 100, SECOND * 5);
        cache.insert("nope", None, t0);
        assert_eq!(cache.get(&"nope", t0 + SECOND * 4), Read::Absent);
        assert_eq!(cache.get(&"nope", t0 + SECOND * 5), Read::Miss);
    }

    #[test]
    fn purge_drops_only_what_expired() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(SECOND * 100, SECOND * 5);
        cache.insert("old", Some(1), t0);
        cache.insert("gone", None, t0);
        cache.insert("new", Some(2), t0 + SECOND * 90);
        cache.purge(t0 + SECOND * 100);
        assert_eq!(cache.len(), 1);
        assert!(matches!(
            cache.get(&"new", t0 + SECOND * 100),
            Read::Found { .. }
        ));
        cache.remove(&"new");
        assert!(cache.is_empty());
    }
}
