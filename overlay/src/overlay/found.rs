//! The providers this node's last lookup of each namespace found, kept for a short while so
//! that a repeat lookup has them at once (pure; the driver passes the time).
//!
//! # Rules
//! 1. Every lookup's query runs to its end (finished or timed out), even when its caller
//!    stopped listening early, and then records what *it* found under its namespace,
//!    replacing what was there (an empty result removes the entry); what the holders it
//!    reached list beyond it ([`super::providers`]) is added when they answer. Providers a lookup was
//!    given from here are not recorded again unless its query found them too, so a provider
//!    that is gone is listed by at most one lookup after the last query that found it.
//! 2. A lookup of a namespace whose last query ended at most [`FRESH`] ago is given those
//!    providers first, at once; its own query then runs as always and adds the rest, and the
//!    stream ends when the query does (and the holders it names have answered,
//!    [`super::providers`]). A Kademlia query takes a few round trips to nodes near
//!    the key even when every connection is open (27–72 ms at 500–1000 nodes, warm, on this
//!    machine; bench/RESULTS.md). Who benefits: a caller that stops at the first provider
//!    it can use (none in this tree does yet: each reads to the end, to order providers by
//!    RTT); and a caller that looks again and again, as an ingress does every second for each
//!    service it uses, whose list becomes the union of the last two queries, so one query
//!    that misses an instance (a timeout under load) does not make the ingress forget it. A
//!    caller that reads to the end still waits for the query.
//! 3. A provider that withdraws its records (the peers it tells include this node when it is
//!    connected or near the key, [`super::withdraw`]) leaves every entry at once, and the
//!    queries under way forget having found it.
//! 4. Entries older than [`FRESH`] are dropped whenever a lookup is recorded, so the map holds
//!    only namespaces looked up in the last [`FRESH`].

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::PeerId;

/// How long a lookup's result answers repeat lookups.
pub(crate) const FRESH: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub(crate) struct Found {
    by_namespace: HashMap<String, (Instant, Vec<PeerId>)>,
}

impl Found {
    /// The providers a lookup of `namespace` starting at `now` is given at once (rule 2).
    pub fn recent(&self, namespace: &str, now: Instant) -> &[PeerId] {
        match self.by_namespace.get(namespace) {
            Some((ended, providers)) if now.saturating_duration_since(*ended) <= FRESH => providers,
            _ => &[],
        }
    }

    /// A lookup of `namespace` ended at `now`, its query having found `providers` (rules 1, 4).
    pub fn record(&mut self, namespace: &str, providers: Vec<PeerId>, now: Instant) {
        self.by_namespace
            .retain(|_, (ended, _)| now.saturating_duration_since(*ended) <= FRESH);
        if providers.is_empty() {
            self.by_namespace.remove(namespace);
        } else {
            self.by_namespace
                .insert(namespace.to_owned(), (now, providers));
        }
    }

    /// The holders a lookup of `namespace` reached listed `providers` beyond what its query
    /// found ([`super::providers`]): they join what it recorded (rule 1).
    pub fn add(&mut self, namespace: &str, providers: Vec<PeerId>, now: Instant) {
        let (_, known) = (self.by_namespace)
            .entry(namespace.to_owned())
            .or_insert_with(|| (now, Vec::new()));
        for peer in providers {
            if !known.contains(&peer) {
                known.push(peer);
            }
        }
    }

    /// `peer` withdrew its records of `namespaces` (rule 3).
    pub fn withdrawn(&mut self, peer: &PeerId, namespaces: &[String]) {
        for namespace in namespaces {
            if let Some((_, providers)) = self.by_namespace.get_mut(namespace) {
                providers.retain(|p| p != peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_lookup_within_the_freshness_gets_the_last_result() {
        let mut found = Found::default();
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        assert!(found.recent("svc", t0).is_empty());
        found.record("svc", vec![a, b], t0);
        assert_eq!(found.recent("svc", t0 + FRESH), &[a, b]);
        assert!(
            found
                .recent("svc", t0 + FRESH + Duration::from_millis(1))
                .is_empty()
        );
        assert!(found.recent("other", t0).is_empty());
    }

    #[test]
    fn the_last_lookup_replaces_what_was_found_and_an_empty_one_forgets() {
        let mut found = Found::default();
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        found.record("svc", vec![a, b], t0);
        found.record("svc", vec![b], t0 + Duration::from_secs(1));
        assert_eq!(found.recent("svc", t0 + Duration::from_secs(2)), &[b]);
        found.record("svc", vec![], t0 + Duration::from_secs(3));
        assert!(found.recent("svc", t0 + Duration::from_secs(3)).is_empty());
        assert!(found.by_namespace.is_empty());
    }

    #[test]
    fn what_holders_list_beyond_the_query_joins_its_entry() {
        let mut found = Found::default();
        let t0 = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        found.record("svc", vec![a, b], t0);
        found.add("svc", vec![b, c], t0 + Duration::from_millis(5));
        assert_eq!(found.recent("svc", t0 + FRESH), &[a, b, c]);
        found.add("db", vec![c], t0);
        assert_eq!(found.recent("db", t0), &[c]);
    }

    #[test]
    fn a_withdrawn_provider_leaves_at_once_and_old_entries_are_dropped() {
        let mut found = Found::default();
        let t0 = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        found.record("svc", vec![a, b], t0);
        found.record("db", vec![a], t0);
        found.withdrawn(&a, &["svc".to_owned()]);
        assert_eq!(found.recent("svc", t0), &[b]);
        assert_eq!(found.recent("db", t0), &[a]);
        found.record("web", vec![b], t0 + FRESH + Duration::from_secs(1));
        assert_eq!(found.by_namespace.len(), 1);
    }
}
