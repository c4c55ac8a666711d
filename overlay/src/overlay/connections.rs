//! How many connections a node holds, so that its cost does not grow with the network.
//!
//! Two mechanisms, as in kubo's connection manager:
//! - **Idleness**: a connection with no stream open for [`Connections::idle_timeout`] is
//!   closed, unless it is kept ([`super::keep`]: bootstraps, and every connection of a node
//!   that measures everyone). This bounds an idle node to its bootstraps.
//! - **Water marks**: a busy node (answering many DHT queries, serving many peers) may have
//!   many connections in use at once. When it holds more than [`Connections::high`], it closes
//!   connections until [`Connections::low`] remain ([`to_close`]): never a kept one, never one
//!   younger than [`Connections::grace`] (just opened means about to be used: a query's next
//!   hop, a request's answer), and the oldest first (the longest-lived are the least likely to
//!   be part of what the node is doing now). A closed connection that was still needed is
//!   dialled again; Kademlia keeps its contacts in the routing table, not as connections.
//!
//! A node that keeps every connection (the ping monitor, whose job is to measure every member)
//! has no water marks: its cost is one connection per member, by design.

use std::time::{Duration, Instant};

/// A node's connection limits.
#[derive(Debug, Clone)]
pub struct Connections {
    /// Keep every connection open and never trim (the ping monitor).
    pub keep_all: bool,
    /// A connection without an open stream for this long is closed (unless kept).
    pub idle_timeout: Duration,
    /// Trimming stops when this many connections remain.
    pub low: usize,
    /// Trimming starts when the node holds more than this many connections.
    pub high: usize,
    /// A connection younger than this is not trimmed.
    pub grace: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            keep_all: false,
            idle_timeout: Duration::from_secs(30),
            low: 32,
            high: 64,
            grace: Duration::from_secs(10),
        }
    }
}

/// One open connection, as trimming sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Open<I> {
    pub id: I,
    pub opened: Instant,
    /// Kept open by this node or at its peer's request: never trimmed.
    pub kept: bool,
}

/// The connections to close now so that at most `limits.low` remain (see the module doc);
/// none while at most `limits.high` are open. May close fewer than asked when the rest are
/// kept or young.
pub(crate) fn to_close<I: Copy>(limits: &Connections, open: &[Open<I>], now: Instant) -> Vec<I> {
    if limits.keep_all || open.len() <= limits.high {
        return Vec::new();
    }
    let excess = open.len() - limits.low.min(open.len());
    let mut candidates: Vec<&Open<I>> = open
        .iter()
        .filter(|c| !c.kept && now.saturating_duration_since(c.opened) >= limits.grace)
        .collect();
    candidates.sort_by_key(|c| c.opened);
    candidates.iter().take(excess).map(|c| c.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(low: usize, high: usize) -> Connections {
        Connections {
            low,
            high,
            ..Connections::default()
        }
    }

    /// `n` connections, ids 0..n, opened a second apart from `start` on.
    fn opened(start: Instant, n: usize) -> Vec<Open<usize>> {
        (0..n)
            .map(|id| Open {
                id,
                opened: start + Duration::from_secs(id as u64),
                kept: false,
            })
            .collect()
    }

    #[test]
    fn nothing_is_closed_up_to_the_high_mark() {
        let t0 = Instant::now();
        let open = opened(t0, 8);
        assert!(to_close(&limits(4, 8), &open, t0 + Duration::from_secs(100)).is_empty());
    }

    #[test]
    fn above_the_high_mark_the_oldest_go_down_to_the_low_mark() {
        let t0 = Instant::now();
        let open = opened(t0, 9);
        let closed = to_close(&limits(4, 8), &open, t0 + Duration::from_secs(100));
        assert_eq!(closed, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn kept_and_young_connections_are_spared() {
        let t0 = Instant::now();
        let mut open = opened(t0, 10);
        open[0].kept = true;
        open[1].kept = true;
        // Now is 15 s after t0: connections 6..10 are younger than the 10 s grace.
        let closed = to_close(&limits(2, 8), &open, t0 + Duration::from_secs(15));
        assert_eq!(
            closed,
            [2, 3, 4, 5],
            "only the old unkept ones, even if short of low"
        );
    }

    #[test]
    fn a_node_that_keeps_everything_never_trims() {
        let t0 = Instant::now();
        let open = opened(t0, 100);
        let all = Connections {
            keep_all: true,
            ..limits(4, 8)
        };
        assert!(to_close(&all, &open, t0 + Duration::from_secs(1000)).is_empty());
    }
}
