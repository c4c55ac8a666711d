//! UDP datagrams of tunnels as QUIC datagrams: unreliable and unordered, as UDP is, so a
//! lost packet between two proxies delays nothing behind it.
//!
//! A tunnel's QUIC datagram is `stream: u64 big-endian | payload`: the ID of the tunnel's
//! stream (the same at both ends of a connection) says which tunnel it belongs to. A datagram
//! larger than the path takes ([`quinn::Connection::max_datagram_size`], less those 8 bytes)
//! crosses on the stream as a `DATAGRAM` frame instead, as does every datagram of a peer that
//! takes none. A tunnel's sender waits for room in QUIC's datagram send buffer rather than
//! drop the oldest (back-pressure as on the stream); a receiver whose queue is full drops the
//! newest, counted.
//!
//! Each connection that carries a tunnel's datagrams has one reader task ([`DatagramRouter`])
//! handing them to the tunnels registered on it. QUIC datagrams that are empty (the transport's
//! silence checks) or name no tunnel here (one that ended) are dropped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::Connection;
use tokio::sync::mpsc;

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

/// One connection's tunnels, by stream ID.
#[derive(Default)]
struct Demux {
    tunnels: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
}

/// The datagrams of one tunnel, until dropped.
pub struct Registration {
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
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The datagrams that arrive on `connection` for the tunnel on `stream`. Register before
    /// the peer can send any (before `READY`, or before the first datagram sent).
    pub fn register(self: &Arc<Self>, connection: &Connection, stream: u64) -> Registration {
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
        lock(&demux.tunnels).insert(stream, sender);
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
        if let Some(tunnel) = tunnel
            && tunnel.try_send(payload).is_err()
        {
            tracing::debug!(stream, "tunnel datagram dropped: its queue is full");
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
    use super::*;

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
