//! UDP datagrams of tunnels as QUIC datagrams: unreliable and unordered, as UDP is, so a
//! lost packet between two proxies delays nothing behind it.
//!
//! A tunnel's QUIC datagram is `stream: u64 big-endian | payload`: the ID of the tunnel's
//! stream (the same at both ends of a connection) says which tunnel it belongs to. A datagram
//! larger than the path takes ([`Connection::max_datagram_size`], less those 8 bytes)
//! crosses on the stream as a `DATAGRAM` frame instead, as does every datagram of a peer that
//! takes none. A tunnel's sender waits for room in QUIC's datagram send buffer rather than
//! drop the oldest (back-pressure as on the stream); a receiver whose queue is full drops the
//! newest, counted (`l4_datagrams_dropped_total{reason="receive_queue_full"}`).
//!
//! Each connection that carries a tunnel's datagrams has one reader task ([`DatagramRouter`])
//! handing them to the tunnels registered on it. QUIC datagrams that are empty (the transport's
//! silence checks) or name no tunnel here (one that ended) are dropped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use bytes::{BufMut, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::transport::Connection;

/// Bytes in front of a tunnel's datagram.
pub const HEADER_BYTES: usize = 8;
/// Datagrams queued for one tunnel before the newest are dropped: with the connection's own
/// receive buffer (1 MiB), what a stalled tunnel can hold.
const QUEUE: usize = 256;

/// The tunnels whose datagrams arrive on each connection.
#[derive(Default)]
pub struct DatagramRouter {
    connections: Mutex<HashMap<usize, Arc<Demux>>>,
}

/// One connection's tunnels, by stream ID: each one's queue, and what counts its drops.
#[derive(Default)]
struct Demux {
    tunnels: Mutex<HashMap<u64, (mpsc::Sender<Bytes>, IntCounter)>>,
}

/// The datagrams of one tunnel, until dropped.
pub struct Registration {
    /// The payloads of the tunnel's QUIC datagrams, stream ID removed, as they arrived; at
    /// most 256 wait here, newer ones are dropped.
    pub datagrams: mpsc::Receiver<Bytes>,
    demux: Arc<Demux>,
    stream: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.demux.tunnels).remove(&self.stream);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DatagramRouter {
    /// A router with no connections yet; a connection's reader starts with its first tunnel.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The datagrams that arrive on `connection` for the tunnel on `stream`; those dropped
    /// for a full queue are counted in `dropped`. Register before the peer can send any
    /// (before `READY`, or before the first datagram sent).
    pub fn register(
        self: &Arc<Self>,
        connection: &Connection,
        stream: u64,
        dropped: IntCounter,
    ) -> Registration {
        let id = connection.stable_id();
        let (demux, new) = {
            let mut connections = lock(&self.connections);
            match connections.get(&id) {
                Some(demux) => (Arc::clone(demux), false),
                None => {
                    let demux = Arc::new(Demux::default());
                    connections.insert(id, Arc::clone(&demux));
                    (demux, true)
                }
            }
        };
        let (sender, datagrams) = mpsc::channel(QUEUE);
        lock(&demux.tunnels).insert(stream, (sender, dropped));
        if new {
            tokio::spawn(read(
                Arc::downgrade(self),
                connection.clone(),
                Arc::clone(&demux),
            ));
        }
        Registration {
            datagrams,
            demux,
            stream,
        }
    }
}

/// Hands every datagram of `connection` to its tunnel until the connection closes.
async fn read(router: Weak<DatagramRouter>, connection: Connection, demux: Arc<Demux>) {
    while let Ok(datagram) = connection.read_datagram().await {
        let Some((stream, payload)) = split(datagram) else {
            continue;
        };
        let tunnel = lock(&demux.tunnels).get(&stream).cloned();
        if let Some((queue, dropped)) = tunnel
            && queue.try_send(payload).is_err()
        {
            dropped.inc();
        }
    }
    if let Some(router) = router.upgrade() {
        lock(&router.connections).remove(&connection.stable_id());
    }
}

/// The stream ID and payload of a tunnel's datagram; `None` for one too short to be one.
pub fn split(mut datagram: Bytes) -> Option<(u64, Bytes)> {
    if datagram.len() < HEADER_BYTES {
        return None;
    }
    let header = datagram.split_to(HEADER_BYTES);
    let stream = u64::from_be_bytes(header[..].try_into().expect("8 bytes"));
    Some((stream, datagram))
}

/// A tunnel's datagram on `stream` carrying `payload`.
pub fn join(stream: u64, payload: &[u8]) -> Bytes {
    let mut datagram = BytesMut::with_capacity(HEADER_BYTES + payload.len());
    datagram.put_u64(stream);
    datagram.put_slice(payload);
    datagram.freeze()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use libp2p::identity::Keypair;

    use super::*;
    use crate::transport::Transport;

    #[tokio::test]
    async fn datagrams_past_a_full_tunnel_queue_are_dropped_and_counted() {
        let bind = || {
            let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            Arc::new(Transport::bind(any, Keypair::generate_ed25519(), None).unwrap())
        };
        let (server, client) = (bind(), bind());
        let accepting = tokio::spawn({
            let server = Arc::clone(&server);
            async move { server.accept().await }
        });
        let to_server = client
            .connect(server.peer_id(), server.local_addr().unwrap())
            .await
            .unwrap();
        let (_, at_server) = accepting.await.unwrap().unwrap().unwrap();
        let router = DatagramRouter::new();
        let dropped = IntCounter::new("dropped", "datagrams dropped").unwrap();
        let registration = router.register(&at_server, 4, dropped.clone());
        // Nothing reads the tunnel's queue: it fills, and the rest are dropped, counted.
        let extra = 44;
        for _ in 0..QUEUE + extra {
            to_server.send_datagram_wait(join(4, b"x")).await.unwrap();
        }
        testkit::wait_until("the drops counted", Duration::from_secs(10), || {
            std::future::ready(dropped.get() > 0)
        })
        .await;
        assert_eq!(registration.datagrams.len(), QUEUE);
        assert!(dropped.get() <= extra as u64, "{}", dropped.get());
    }

    #[test]
    fn a_datagram_names_its_tunnel() {
        let datagram = join(7, b"payload");
        assert_eq!(datagram.len(), HEADER_BYTES + 7);
        assert_eq!(split(datagram), Some((7, Bytes::from_static(b"payload"))));
        assert_eq!(split(join(u64::MAX, b"")), Some((u64::MAX, Bytes::new())));
        // The transport's silence checks are empty; anything under a header is not ours.
        assert_eq!(split(Bytes::new()), None);
        assert_eq!(split(Bytes::from_static(b"1234567")), None);
    }
}
