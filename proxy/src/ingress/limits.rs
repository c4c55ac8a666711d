//! Limits on what one client of the ingress can hold, so that one client cannot take what
//! every other one needs. Each is a flag, each hit is counted in
//! `proxy_limit_hits_total{limit}` ([`Limit`]):
//!
//! | limit | flag | when hit |
//! |---|---|---|
//! | `client_connections` | `--max-client-connections` (1000) | a client address with this many connections open gets a `503` on its next one, which is closed |
//! | `head_bytes` | `--max-head-bytes` (64 KiB) | a request head longer than this is answered `431` and its connection closed |
//! | `head_time` | `--head-timeout` (10 s) | a client that has not sent a whole head within this is disconnected |
//! | `peer_streams` | 1024 (QUIC's `max_concurrent_bidi_streams`, [`crate::transport`]) | a request or tunnel to an instance waits for one of its 1024 open streams to end |
//!
//! On the data plane, a peer's concurrent streams are bounded by QUIC's stream limits: a
//! peer cannot open more, it waits, and only authenticated peers get that far. The ingress
//! counts its own waits (`peer_streams`): requests queued at an instance's limit.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// A limit of the module doc, as its `limit` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Connections open from one client address.
    ClientConnections,
    /// The size of a request head.
    HeadBytes,
    /// The time to send a request head.
    HeadTime,
    /// Concurrent streams to one instance (QUIC's stream limit).
    PeerStreams,
}

impl Limit {
    /// Every limit, for metrics that start at zero.
    pub const ALL: [Limit; 4] = [
        Limit::ClientConnections,
        Limit::HeadBytes,
        Limit::HeadTime,
        Limit::PeerStreams,
    ];

    /// The `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::ClientConnections => "client_connections",
            Limit::HeadBytes => "head_bytes",
            Limit::HeadTime => "head_time",
            Limit::PeerStreams => "peer_streams",
        }
    }
}

/// The connections open per client address, across every worker (a connection is admitted
/// once, so this lock is taken twice per connection and never per request).
#[derive(Debug)]
pub struct ClientConnections {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; it counts until dropped.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<ClientConnections>,
    client: IpAddr,
}

impl ClientConnections {
    /// At most `max` connections per client address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::default(),
        })
    }

    /// Admits a new connection from `client`, or `None` if it has `max` open already.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(client).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Admitted {
            table: Arc::clone(self),
            client,
        })
    }

    /// Connections open from `client` now.
    pub fn open_from(&self, client: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&client).copied().unwrap_or(0)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                // Forgotten at once: the table holds only addresses with connections open.
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_at_most_max_connections_and_one_more_once_one_closes() {
        let table = ClientConnections::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = table.admit(a).unwrap();
        let _second = table.admit(a).unwrap();
        assert!(table.admit(a).is_none(), "a third from the same address");
        let _other = table.admit(b).expect("another address is not affected");
        drop(first);
        assert_eq!(table.open_from(a), 1);
        assert!(table.admit(a).is_some());
    }

    #[test]
    fn an_address_with_nothing_open_is_forgotten() {
        let table = ClientConnections::new(1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(table.admit(a).unwrap());
        assert!(table.open.lock().unwrap().is_empty());
    }
}
